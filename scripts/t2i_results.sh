#!/usr/bin/env bash
# B5 (docs/BENCHMARKS.md): a FLUX-style base on Captioned Fashion-MNIST and DyFLUX λ = 0.5 (TDW + SDT),
# the released-style ablations, and the comparison table.
# Run on 2026-12-04 at a REDUCED size that fits one session on the 2-core CPU (no GPU was lent): the base
# trains 2,500 steps at batch 32 (not 3,000 at 64) with bf16 autocast (1.0-1.1 s/step at 1 thread beside
# another job, ~45 min), each fine-tune 375 steps at batch 32 (15% of the base's iterations, its warm-up
# included), and the table scores 400 captions per row at 20 steps. Change BASE_STEPS, FT_STEPS, BS, N and
# STEPS for a larger run (a GPU, `--bf16`, makes it minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=runs
BASE_STEPS=${BASE_STEPS:-2500}; FT_STEPS=${FT_STEPS:-375}; BS=${BS:-32}; N=${N:-400}; STEPS=${STEPS:-20}

# 1. The static base: diffusers' FluxTransformer2DModel (2 double + 4 single blocks, width 128), diffusers'
#    flow-matching convention, 10% caption dropout, the shipped all-MiniLM-L6-v2 caption embeddings.
dydit train --model FLUX-CFMNIST --out $OUT/t2i-base --steps $BASE_STEPS --batch-size $BS --lr 3e-4 \
  --warmup-steps 100 --ema-decay 0.998 --ckpt-every 250 --sample-every 500 --seed 0 --bf16

# 2. DyFLUX λ = 0.5 (TDW + SDT), shipped: the shipped image DyDiT's recipe (fmnist-0.5: LR 3e-4, 30-step λ ramp,
#    routers frozen for the second half, feedback, calibration) with token routing on and the token routers
#    centred (routing.token_center, docs/RESULTS.md "Text-to-image"); 375 steps = 15% of the base's.
FT="--target 0.5 --steps $FT_STEPS --batch-size $BS --ckpt-every 25 --set feedback.images=40 --set calibration.images=80 --bf16"
dydit finetune $OUT/t2i-base/ema --out $OUT/t2i-dyflux-c2-0.5 --recipe fmnist-0.5 --set routing.tokens=true \
  --set routing.token_center=true $FT
# 3. The ablations, all on the default recipe (LR 1e-4, 100 warm-up steps): TDW + SDT centred, TDW + SDT with
#    the authors' uncentred text-aware router, tokens only (what the authors released; centred), width only.
dydit finetune $OUT/t2i-base/ema --out $OUT/t2i-dyflux-c-0.5 $FT --set routing.token_center=true
dydit finetune $OUT/t2i-base/ema --out $OUT/t2i-dyflux-0.5 $FT
dydit finetune $OUT/t2i-base/ema --out $OUT/t2i-sdt-c-0.5 $FT --set routing.width=false --set routing.token_center=true
dydit finetune $OUT/t2i-base/ema --out $OUT/t2i-tdw-0.5 $FT --set routing.tokens=false
# the shipped pair
A=src/dydit/assets
rm -rf $A/cfmnist_flux $A/cfmnist_dyflux_0.5
cp -r $OUT/t2i-base/ema $A/cfmnist_flux && cp -r $OUT/t2i-dyflux-c2-0.5/ema $A/cfmnist_dyflux_0.5
# where the token routers send compute (object vs background patches, keep maps)
python3 scripts/t2i_token_report.py $A/cfmnist_dyflux_0.5 docs/results/b5_tokens_shipped
python3 scripts/t2i_token_report.py $OUT/t2i-dyflux-c-0.5/ema docs/results/b5_tokens_centred
python3 scripts/t2i_token_report.py $OUT/t2i-dyflux-0.5/ema docs/results/b5_tokens_authors

# 4. One table and plot (docs/results/b5_compare.{md,json,png}). --resume keeps scored rows: session 25 scored
#    the rows without token routers as single-thread passes beside other jobs (--threads 1 --timing-repeats 0,
#    --out runs/b5_passA / b5_passB, the same rows), concatenated into docs/results/b5_compare.rows.jsonl; this
#    command scored the token-routed rows (after the FLOPs counter's fix for DyFLUX's per-sample linear_t) and
#    timed every row in one interleaved pass on the otherwise idle machine.
dydit bench compare --no-defaults --num-samples $N --steps $STEPS --cfg-scale 4 --batch-size 100 --threads 2 \
  --timing-repeats 1 --out docs/results/b5_compare --resume \
  --row "static=$A/cfmnist_flux" \
  --row "DyFLUX λ=0.5 TDW + SDT (centred; shipped)=$A/cfmnist_dyflux_0.5" \
  --row "DyFLUX λ=0.5 TDW + SDT (centred; default recipe)=$OUT/t2i-dyflux-c-0.5/ema" \
  --row "DyFLUX λ=0.5 TDW + SDT (authors' router; default recipe)=$OUT/t2i-dyflux-0.5/ema" \
  --row "DyFLUX λ=0.5 tokens only (centred; default recipe)=$OUT/t2i-sdt-c-0.5/ema" \
  --row "DyFLUX λ=0.5 width only (default recipe)=$OUT/t2i-tdw-0.5/ema" \
  --row "static 10 steps=$A/cfmnist_flux,steps=10" \
  --row "static 14 steps=$A/cfmnist_flux,steps=14" \
  --row "FBCache rdt=0.1=$A/cfmnist_flux,fbcache=0.1" \
  --row "DyFLUX λ=0.5 (centred; default recipe) + FBCache rdt=0.1=$OUT/t2i-dyflux-c-0.5/ema,fbcache=0.1"

# 5. Sample grids with the captions under the images.
python3 - <<'EOF'
import dydit
from dydit.data.captioned_fmnist import CAPTIONS, balanced_caption_ids
from dydit.t2i import sample_captions, save_captioned_grid
ids = balanced_caption_ids(16, seed=0)
for name in ("cfmnist_flux", "cfmnist_dyflux_0.5"):
    model = dydit.load(f"src/dydit/assets/{name}").eval()
    x = sample_captions(model, ids, steps=20, cfg_scale=4.0, seed=0)
    save_captioned_grid(x, [CAPTIONS[int(i)] for i in ids], f"docs/results/b5_{name}.png")
EOF

# 6. B5 engine at FLUX.1 width (random weights, 4096 image + 512 text tokens, λ = 0.5-shaped plans), on the CPU
dydit bench flux --device cpu --dtype bf16 --blocks 1 --repeats 2 --out docs/results/bench_flux_cpu
