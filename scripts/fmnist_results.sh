#!/usr/bin/env bash
# Reproduces the Fashion-MNIST models shipped in src/dydit/assets and the B1 / TD-LoRA figures in
# docs/RESULTS.md, on a 2-core CPU (about 2.5 hours). Each step is also listed in docs/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
A=src/dydit/assets
EVAL="--num-samples 5000 --sampler ddim --steps 25 --cfg-scale 4.0 --seed 0 --batch-size 500"

# 1. the embedded static DiT (2000 steps; the LR is constant after warm-up, so --steps N reproduces
#    any prefix of this run exactly)
dydit train --model DiT-FMNIST --out runs/fmnist-base --steps 2000 --batch-size 128 --lr 4e-4 \
  --warmup-steps 100 --ema-decay 0.995 --ckpt-every 200 --sample-every 500 --seed 0
rm -rf $A/fmnist_dit && cp -r runs/fmnist-base/ema $A/fmnist_dit

# 2. DyDiT at λ = 0.7 and 0.5, 300 steps each (15% of the base run's 2000)
for lam in 0.7 0.5; do
  dydit finetune $A/fmnist_dit --out runs/fmnist-dydit-$lam --target $lam --steps 300 --batch-size 128 \
    --ramp-steps 100 --warmup-steps 50 --ckpt-every 100 --seed 0
  rm -rf $A/fmnist_dydit_$lam && cp -r runs/fmnist-dydit-$lam/ema $A/fmnist_dydit_$lam
done

# 3. B1 quality and compute of the shipped models
mkdir -p docs/results
dydit eval $A/fmnist_dit $EVAL --json docs/results/eval_static.json
for lam in 0.7 0.5; do
  dydit eval $A/fmnist_dydit_$lam $EVAL --json docs/results/eval_dydit_$lam.json
  dydit plan $A/fmnist_dydit_$lam --out docs/results/plan_$lam
done

# 4. TD-LoRA vs plain LoRA vs full fine-tuning at λ = 0.5, same 300 steps
for peft in lora td-lora; do
  dydit finetune $A/fmnist_dit --out runs/fmnist-$peft-0.5 --target 0.5 --steps 300 --batch-size 128 \
    --ramp-steps 100 --warmup-steps 50 --ckpt-every 100 --seed 0 --peft $peft
  dydit eval $A/fmnist_dit --adapters runs/fmnist-$peft-0.5/adapters $EVAL --json docs/results/eval_$peft-0.5.json
done
