#!/usr/bin/env bash
# B5 (docs/BENCHMARKS.md): a FLUX-style base on Captioned Fashion-MNIST and DyFLUX λ = 0.5 (TDW + SDT),
# the released-style ablations, and the comparison table. NOT RUN YET: no model or number exists.
#
# Cost, from a timed 20-step smoke run of step 1 (`dydit train --model FLUX-CFMNIST --steps 20
# --batch-size 32 --sample-every 0 --threads 2`, 2-core AMD EPYC shared with other jobs, load ~4.5):
#   20 steps: 100 s wall (5.0 s/step, 6.3 images/s; steps ran 2.5-11 s as the load varied), 85 s CPU
#   (user) for the whole process; the losses equal an earlier identical run's bit for bit.
# A fine-tune step (routers, masked training forward) cost about the same (10 steps at batch 32: ~8 s/step).
# So, on this shared 2-core CPU, per 1,000 steps at batch 64: ~2.8 h (≈ 10 s/step, twice batch 32). Step 1 (3,000 steps) ~8.5 h, step 2
# (450 steps = 15% of the base's iterations) ~1.3 h plus its feedback/calibration sampling; step 4 samples
# 400 images × 25 steps × 2 (CFG) per row. An idle machine or a GPU (`--bf16`) is several times faster.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=runs

# 1. The static base: diffusers' FluxTransformer2DModel (2 double + 4 single blocks, width 128), diffusers'
#    flow-matching convention, 10% caption dropout, the shipped all-MiniLM-L6-v2 caption embeddings.
dydit train --model FLUX-CFMNIST --out $OUT/t2i-base --steps 3000 --batch-size 64 --lr 3e-4 \
  --warmup-steps 100 --ema-decay 0.999 --ckpt-every 250 --sample-every 500 --seed 0

# 2. DyFLUX λ = 0.5 (TDW + SDT): 450 steps = 15% of the base's 3000, the default recipe's ramp, warm-up,
#    inference-ratio feedback (captions sampled on the fast engine) and final calibration.
FT="--target 0.5 --steps 450 --batch-size 64 --ckpt-every 50 --set feedback.images=40 --set calibration.images=80"
dydit finetune $OUT/t2i-base/ema --out $OUT/t2i-dyflux-0.5 $FT
# 3. The ablations of B3/B5: tokens only (what the authors released), width only.
dydit finetune $OUT/t2i-base/ema --out $OUT/t2i-sdt-0.5 $FT --set routing.width=false
dydit finetune $OUT/t2i-base/ema --out $OUT/t2i-tdw-0.5 $FT --set routing.tokens=false

# 4. One table and plot (docs/results/b5_compare.{md,json,png}): static, DyFLUX (both / tokens only / width
#    only), fewer steps. First-Block-Cache refuses FLUX blocks (FLUX's two-stream keyword blocks), so it
#    has no row here.
dydit bench compare --no-defaults --num-samples 400 --steps 25 --cfg-scale 4 --batch-size 100 \
  --out docs/results/b5_compare \
  --row "static=$OUT/t2i-base/ema" \
  --row "DyFLUX λ=0.5 (TDW + SDT)=$OUT/t2i-dyflux-0.5/ema" \
  --row "DyFLUX λ=0.5 tokens only=$OUT/t2i-sdt-0.5/ema" \
  --row "DyFLUX λ=0.5 width only=$OUT/t2i-tdw-0.5/ema" \
  --row "static, 13 steps=$OUT/t2i-base/ema,steps=13"

# 5. Sample grids with the captions under the images.
python3 - <<'EOF'
import dydit
from dydit.data.captioned_fmnist import CAPTIONS, balanced_caption_ids
from dydit.t2i import sample_captions, save_captioned_grid
ids = balanced_caption_ids(16, seed=0)
for name in ("t2i-base", "t2i-dyflux-0.5"):
    model = dydit.load(f"runs/{name}/ema").eval()
    x = sample_captions(model, ids, steps=25, cfg_scale=4.0, seed=0)
    save_captioned_grid(x, [CAPTIONS[int(i)] for i in ids], f"docs/results/b5_{name}.png")
EOF
