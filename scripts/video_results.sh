#!/usr/bin/env bash
# Benchmark B4 (docs: BENCHMARKS.md; issue 17): the Moving Fashion-MNIST Latte base, DyLatte at λ = 0.7 and
# 0.5, their video metrics, the video B3 table and plot, the side-by-side GIFs, and B2 on Latte-B/2.
# Session 25 (2026-12-04, 2-core CPU, no GPU) trained an ε-prediction base (`--model Latte-MFMNIST`, 1,500 steps):
# it did not learn where the one item is (samples are scattered patches; docs/RESULTS.md "Video"). Session 26
# trains the same network by flow matching (`Latte-MFMNIST-Flow`, Euler sampling), which weighs the high-noise
# steps that decide placement; its models are the shipped ones. The defaults below are the sizes that fit one
# session on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
A=src/dydit/assets
# the shipped Fashion-MNIST DyDiT recipes at the video batch size, smaller feedback and calibration samples
# (multiples of the 10 classes)
BASE_STEPS=${BASE_STEPS:-2500}; FT_STEPS=${FT_STEPS:-300}; N=${N:-250}; STEPS=${STEPS:-20}
# TDW routers see the timestep embedding only, so the plan (and the FLOPs ratio) does not depend on the videos:
# 10 videos (one per class) measure the inference ratio exactly for the feedback and the calibration.
# The width plan is frozen for the second half with the time embedding (whose EMA otherwise drifts and moves the plan
# after the freeze) and calibrated to λ at the freeze, so the backbone trains on the plan that ships.
VFT="--recipe fmnist-0.5 --steps $FT_STEPS --ckpt-every 25 --set optim.batch_size=32 --set feedback.images=10 \
  --set calibration.images=10 --set freeze.time_embed=true --set freeze.calibrate=true --bf16"

# 1. The static Latte-MFMNIST base (8 frames of 32×32, 64 tokens per frame), on Moving Fashion-MNIST made
#    on the fly from the Fashion-MNIST training items. The LR is constant after warm-up, so `--steps N`
#    reproduces any prefix of the run (session 26 ran 1,500 steps, then `--steps 2500 --resume --resume-with-changes`: the step count is the only change).
dydit train --model Latte-MFMNIST-Flow --out runs/mfmnist-latte-flow --steps $BASE_STEPS --batch-size 32 --lr 3e-4 \
  --warmup-steps 100 --ema-decay 0.995 --ckpt-every 250 --sample-every 250 --seed 0 --bf16
rm -rf $A/mfmnist_latte && cp -r runs/mfmnist-latte-flow/ema $A/mfmnist_latte

# 2. DyLatte at λ = 0.7 and 0.5: the shipped image λ=0.5 recipe (dydit recipes fmnist-0.5: width only, routers
#    frozen for the second half; at λ=0.7 it beat the fmnist-0.7 recipe on images, RESULTS "TD-LoRA ... holds"),
#    300 steps each (12% of the base's 2,500; the budget rule is ≤ 15%).
dydit finetune $A/mfmnist_latte --out runs/mfmnist-dylatte-0.7 $VFT --target 0.7
dydit finetune $A/mfmnist_latte --out runs/mfmnist-dylatte-0.5 $VFT --target 0.5
rm -rf $A/mfmnist_dylatte_0.7 && cp -r runs/mfmnist-dylatte-0.7/ema $A/mfmnist_dylatte_0.7
rm -rf $A/mfmnist_dylatte_0.5 && cp -r runs/mfmnist-dylatte-0.5/ema $A/mfmnist_dylatte_0.5

# 3. The video B3 table and plot (static, DyLatte 0.7 / 0.5, fewer steps, FBCache, DyLatte 0.5 + FBCache):
#    per-frame FID and accuracy, consistency, motion error, GMACs and s per video. --resume keeps scored rows.
V="--video static=$A/mfmnist_latte --video 0.7=$A/mfmnist_dylatte_0.7 --video 0.5=$A/mfmnist_dylatte_0.5"
#    Session 26 scored the rows in two 1-thread passes (`--no-defaults --row ... --timing-repeats 0`, same settings,
#    their .rows.jsonl concatenated into docs/results/b3_video.rows.jsonl), then ran this command on the quiet
#    machine: every row kept, one interleaved timing round after a warm-up round.
dydit bench compare $V --num-samples $N --steps $STEPS --cfg-scale 4 --batch-size 50 --seed 0 \
  --out docs/results/b3_video --resume --timing-repeats 1
# the static base's videos for users' own FVD (I3D weights cannot be had offline)
dydit eval $A/mfmnist_latte --num-samples $N --steps $STEPS --cfg-scale 4 --batch-size 50 \
  --save-npz runs/mfmnist-latte-flow/videos_$N.npz

# 4. GIFs: each model, and all three side by side (one row per class)
dydit demo $V --steps $STEPS --cfg-scale 4 --per-class 2 --repeats 1 --out docs/results/video_demo

# 5. B2 on video, on a quiet machine: random-weight Latte-B/2, 16 frames at 256² (32×32×4 latents)
dydit bench engine --models Latte-B/2 --targets 0.5 --schedules 50 --batches 1 --timed-steps 3 \
  --out docs/results/bench_engine_latte
