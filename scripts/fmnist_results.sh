#!/usr/bin/env bash
# Reproduces the Fashion-MNIST models shipped in src/dydit/assets and the figures in docs/RESULTS.md
# on a 2-core CPU (about 3 hours in all). These are the commands that produced the committed results.
set -euo pipefail
cd "$(dirname "$0")/.."
A=src/dydit/assets

# 1. The embedded static DiT: 2000 steps, ~40 min. The LR is constant after warm-up, so
#    `--steps N` reproduces any prefix of this run exactly.
dydit train --model DiT-FMNIST --out runs/fmnist-base --steps 2000 --batch-size 128 --lr 4e-4 \
  --warmup-steps 100 --ema-decay 0.995 --ckpt-every 200 --sample-every 500 --seed 0
rm -rf $A/fmnist_dit && cp -r runs/fmnist-base/ema $A/fmnist_dit

# 2. DyDiT at λ = 0.5 and 0.7: 300 steps each (15% of the base run's 2000), ~11 min each.
for lam in 0.5 0.7; do
  dydit finetune $A/fmnist_dit --out runs/fmnist-dydit-$lam --target $lam --steps 300 --batch-size 128 \
    --ramp-steps 100 --warmup-steps 50 --ckpt-every 100 --seed 0
  rm -rf $A/fmnist_dydit_$lam && cp -r runs/fmnist-dydit-$lam/ema $A/fmnist_dydit_$lam
done

# 3. B2 on the CPU (random-weight DiT-B/2 and DiT-XL/2 at 256², trained-like plans).
dydit bench engine --models DiT-B/2 --targets 0.7,0.5,0.3 --schedules 50 --batches 8,1 --timed-steps 5 \
  --repeats 3 --out docs/results/bench_engine_cpu_b2
dydit bench engine --models DiT-XL/2 --targets 0.5 --schedules 50 --batches 8 --timed-steps 3 --repeats 3 \
  --out docs/results/bench_engine_cpu_xl2

# 4. B1 + B3: every row on 5,000 samples (DDIM 20 steps, CFG 4, seed 0), table + plot.
dydit bench compare --num-samples 5000 --steps 20 --cfg-scale 4.0 --batch-size 64 --fbcache 0.1 \
  --out docs/results/b3_compare

# 5. TD-LoRA vs plain LoRA (vs the full fine-tune of step 2) at λ = 0.5, same 300 steps.
for peft in lora td-lora; do
  dydit finetune $A/fmnist_dit --out runs/fmnist-$peft-0.5 --target 0.5 --steps 300 --batch-size 128 \
    --ramp-steps 100 --warmup-steps 50 --ckpt-every 100 --seed 0 --peft $peft
done
