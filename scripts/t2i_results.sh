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

# 2. DyFLUX λ = 0.5 (TDW + SDT): 15% of the base's steps, the default recipe's ramp, warm-up,
#    inference-ratio feedback (captions sampled on the fast engine) and final calibration.
FT="--target 0.5 --steps $FT_STEPS --batch-size $BS --ckpt-every 25 --set feedback.images=40 --set calibration.images=80 --bf16"
dydit finetune $OUT/t2i-base/ema --out $OUT/t2i-dyflux-0.5 $FT
# 3. The ablations of B3/B5: tokens only (what the authors released), width only.
dydit finetune $OUT/t2i-base/ema --out $OUT/t2i-sdt-0.5 $FT --set routing.width=false
dydit finetune $OUT/t2i-base/ema --out $OUT/t2i-tdw-0.5 $FT --set routing.tokens=false

# 4. One table and plot (docs/results/b5_compare.{md,json,png}): static, DyFLUX (both / tokens only / width
#    only), fewer steps, First-Block-Cache alone and stacked on DyFLUX.
dydit bench compare --no-defaults --num-samples $N --steps $STEPS --cfg-scale 4 --batch-size 100 \
  --out docs/results/b5_compare \
  --row "static=$OUT/t2i-base/ema" \
  --row "DyFLUX λ=0.5 (TDW + SDT)=$OUT/t2i-dyflux-0.5/ema" \
  --row "DyFLUX λ=0.5 tokens only=$OUT/t2i-sdt-0.5/ema" \
  --row "DyFLUX λ=0.5 width only=$OUT/t2i-tdw-0.5/ema" \
  --row "static, 10 steps=$OUT/t2i-base/ema,steps=10" \
  --row "static, 14 steps=$OUT/t2i-base/ema,steps=14" \
  --row "FBCache rdt=0.1=$OUT/t2i-base/ema,fbcache=0.1" \
  --row "DyFLUX λ=0.5 + FBCache rdt=0.1=$OUT/t2i-dyflux-0.5/ema,fbcache=0.1"

# 5. Sample grids with the captions under the images.
python3 - <<'EOF'
import dydit
from dydit.data.captioned_fmnist import CAPTIONS, balanced_caption_ids
from dydit.t2i import sample_captions, save_captioned_grid
ids = balanced_caption_ids(16, seed=0)
for name in ("t2i-base", "t2i-dyflux-0.5"):
    model = dydit.load(f"runs/{name}/ema").eval()
    x = sample_captions(model, ids, steps=20, cfg_scale=4.0, seed=0)
    save_captioned_grid(x, [CAPTIONS[int(i)] for i in ids], f"docs/results/b5_{name}.png")
EOF
