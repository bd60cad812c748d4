#!/usr/bin/env bash
# Benchmark B4 (docs: BENCHMARKS.md; issue 17): the Moving Fashion-MNIST Latte base, DyLatte at λ = 0.7 and
# 0.5, their video metrics, the video B3 table and plot, the side-by-side GIFs, and B2 on Latte-B/2.
# NOT RUN YET: no numbers in the docs come from this script so far.
#
# CPU-time estimate (2-core AMD EPYC dev machine, shared with other jobs, 2026-12-04), from timed smoke runs:
#   - `dydit train --model Latte-MFMNIST --steps 20 --batch-size 64 --threads 2` (a Latte-MFMNIST forward is
#     0.657 GMACs per 8-frame video): stopped by its 200 s limit after 12 steps, 125 CPU-s (user + sys), so
#     ~10 CPU-s per 64-video step, ~5 per 32-video step;
#   - `dydit finetune <random Latte-MFMNIST> --target 0.5 --steps 20 --batch-size 16 --set flops.ramp_steps=5
#     --set warmup.steps=5 --set feedback.every=10 --set feedback.images=10 --set calibration.enabled=false
#     --threads 2`: 101 s wall, 120 CPU-s, of which the 2 feedback measurements (10 videos, 20 DDIM steps,
#     CFG: 400 video forwards each) took ~25 CPU-s each, i.e. ~0.06 CPU-s per video forward (two per guided step).
# Hence, in CPU-hours (halve for wall-clock on 2 free cores):
#   1. base, 3000 steps × 32 videos                                   ~4.2 CPU-h
#   2. each fine-tune, 300 steps × 32 (10% of the base's steps): training ~0.6, warm-up ~0.07, feedback
#      (8 × 20 videos) ~0.1, calibration (~8 × 40 videos) ~0.2           ~1.0 CPU-h each, ~2 for both
#   3. video B3, 1000 videos per row at 25 steps with CFG (~0.9 CPU-h for the static row; DyLatte, fewer
#      steps and cache rows less) plus the timing pass                  ~5 CPU-h
#   4. GIFs                                                              ~0.3 CPU-h
#   total ~11.5 CPU-h, ~6 h wall on a quiet 2-core machine (far less on a GPU). B2 (step 5) is separate:
#   one Latte-B/2 forward is 364 GMACs (16 frames at 256²); Latte-XL/2 (1,893 GMACs) is too slow here.
set -euo pipefail
cd "$(dirname "$0")/.."
A=src/dydit/assets
# the shipped Fashion-MNIST DyDiT recipes at the video batch size, smaller feedback and calibration samples
# (multiples of the 10 classes)
VFT="--ckpt-every 50 --set optim.batch_size=32 --set feedback.images=20 --set calibration.images=40"

# 1. The static Latte-MFMNIST base (8 frames of 32×32, 64 tokens per frame), on Moving Fashion-MNIST made
#    on the fly from the Fashion-MNIST training items. The LR is constant after warm-up, so `--steps N`
#    reproduces any prefix of the run.
dydit train --model Latte-MFMNIST --out runs/mfmnist-latte --steps 3000 --batch-size 32 --lr 3e-4 \
  --warmup-steps 100 --ema-decay 0.995 --ckpt-every 250 --sample-every 500 --seed 0
rm -rf $A/mfmnist_latte && cp -r runs/mfmnist-latte/ema $A/mfmnist_latte

# 2. DyLatte at λ = 0.7 and 0.5: the recipes of the shipped image DyDiTs (dydit recipes), 300 steps each.
dydit finetune $A/mfmnist_latte --out runs/mfmnist-dylatte-0.7 --recipe fmnist-0.7 $VFT
dydit finetune $A/mfmnist_latte --out runs/mfmnist-dylatte-0.5 --recipe fmnist-0.5 $VFT
rm -rf $A/mfmnist_dylatte_0.7 && cp -r runs/mfmnist-dylatte-0.7/ema $A/mfmnist_dylatte_0.7
rm -rf $A/mfmnist_dylatte_0.5 && cp -r runs/mfmnist-dylatte-0.5/ema $A/mfmnist_dylatte_0.5

# 3. The video B3 table and plot (static, DyLatte 0.7 / 0.5, fewer steps, FBCache, DyLatte 0.5 + FBCache):
#    per-frame FID and accuracy, consistency, motion error, GMACs and s per video. --resume keeps scored rows.
V="--video static=$A/mfmnist_latte --video 0.7=$A/mfmnist_dylatte_0.7 --video 0.5=$A/mfmnist_dylatte_0.5"
dydit bench compare $V --num-samples 1000 --steps 25 --cfg-scale 4 --batch-size 50 --seed 0 \
  --out docs/results/b3_video --resume
# the static base's videos for users' own FVD (I3D weights cannot be had offline)
dydit eval $A/mfmnist_latte --num-samples 1000 --steps 25 --cfg-scale 4 --batch-size 50 \
  --json docs/results/eval_mfmnist_latte.json --save-npz runs/mfmnist-latte/videos_1000.npz

# 4. GIFs: each model, and all three side by side (one row per class)
dydit demo $V --steps 25 --cfg-scale 4 --per-class 2 --repeats 1 --out docs/results/video_demo

# 5. B2 on video, on a quiet machine: random-weight Latte-B/2, 16 frames at 256² (32×32×4 latents)
dydit bench engine --models Latte-B/2 --targets 0.5 --schedules 50 --batches 1 --timed-steps 5 \
  --out docs/results/bench_engine_latte
