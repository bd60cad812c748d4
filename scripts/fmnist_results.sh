#!/usr/bin/env bash
# Reproduces the Fashion-MNIST models shipped in src/dydit/assets and the figures in docs/RESULTS.md
# on a 2-core CPU. These are the commands that produced the committed results (2026-11-23). The
# fine-tunes ran two at a time with --threads 1; that changes their wall-clock, not their numbers.
# Since issue 15 a fine-tune's settings are a recipe (`dydit recipes`, src/dydit/dynamic/recipe.py): each
# line below is the recipe its run used, written as --recipe plus --set for the flags of the time. The
# token routers' random initial weights are now seeded from the recipe's seed; the runs here drew them
# unseeded, so reruns of runs with token routers start from other initial token routers.
set -euo pipefail
cd "$(dirname "$0")/.."
A=src/dydit/assets
# $FT: the original recipe (300 steps, batch 128, LR 3e-4, a 100-step λ ramp after a 50-step complete-model
# warm-up, seed 0), which the shipped λ=0.7 model has (recipe fmnist-0.7); the λ=0.5 runs take it with --target.
FT="--recipe fmnist-0.7 --ckpt-every 100"

# 1. The embedded static DiT: 2000 steps, ~40 min. The LR is constant after warm-up, so
#    `--steps N` reproduces any prefix of this run exactly.
dydit train --model DiT-FMNIST --out runs/fmnist-base --steps 2000 --batch-size 128 --lr 4e-4 \
  --warmup-steps 100 --ema-decay 0.995 --ckpt-every 200 --sample-every 500 --seed 0
rm -rf $A/fmnist_dit && cp -r runs/fmnist-base/ema $A/fmnist_dit

# 2. DyDiT at λ = 0.7 and 0.5: 300 steps each (15% of the base run's 2000), ~8 min each alone.
#    λ = 0.7: the original recipe (100-step ramp after a 50-step complete-model warm-up).
#    λ = 0.5: the session-11 recipe (30-step ramp, no warm-up, router LR 0.01, TDW only, the plan frozen
#    for the last half), seed 1 of the three seeds run (seeds 0 and 2 are e10 and e20 in step 3b).
#    Until session 11 the shipped λ=0.5 was runs/fmnist-dydit-0.5 (the original recipe with feedback.images=16).
#    $SR: $FT with the short ramp (30 steps, no warm-up). $E10: the session-10/11 recipe, $SR with router LR
#    0.01, TDW only and the plan frozen for the last half; at seed 1 it is the shipped λ=0.5 (recipe fmnist-0.5).
SR="$FT --set flops.ramp_steps=30 --set warmup.steps=0"
E10="--recipe fmnist-0.5 --ckpt-every 100"
dydit finetune $A/fmnist_dit --out runs/fmnist-dydit-0.7 --recipe fmnist-0.7 --ckpt-every 100
dydit finetune $A/fmnist_dit --out runs/e17-e10-seed1 --recipe fmnist-0.5 --ckpt-every 100
dydit finetune $A/fmnist_dit --out runs/fmnist-dydit-0.5 --target 0.5 $FT --set feedback.images=16
rm -rf $A/fmnist_dydit_0.7 && cp -r runs/fmnist-dydit-0.7/ema $A/fmnist_dydit_0.7
rm -rf $A/fmnist_dydit_0.5 && cp -r runs/e17-e10-seed1/ema $A/fmnist_dydit_0.5
# plan.json, and for models with token routers selectivity.{md,json} and token_maps.png (64 images)
for lam in 0.5 0.7; do dydit plan $A/fmnist_dydit_$lam --steps 20 --num-images 64 --out docs/results/plan_$lam; done

# 3. TD-LoRA and plain LoRA at λ = 0.5, the same 300 steps (issue 6), and two B3 baselines: static
#    magnitude pruning + fine-tune, and the static model + the same extra fine-tune.
for peft in lora td-lora; do
  dydit finetune $A/fmnist_dit --out runs/fmnist-$peft-0.5 --target 0.5 $FT --peft $peft
done
dydit finetune $A/fmnist_dit --out runs/fmnist-prune-0.5 --target 0.5 $FT --set prune_static=true
dydit train --model DiT-FMNIST --init $A/fmnist_dit --out runs/fmnist-static-ft --steps 300 --batch-size 128 \
  --lr 3e-4 --warmup-steps 0 --ema-decay 0.99 --ckpt-every 100 --seed 0

# 3b. The B3 ablations and λ = 0.3, the same 300 steps: TDW only, SDT only, whole-block skip, and
#     DyDiT at λ = 0.3 (run before step 4, which scores them).
dydit finetune $A/fmnist_dit --out runs/fmnist-tdw-0.5 --target 0.5 $FT --set routing.tokens=false
dydit finetune $A/fmnist_dit --out runs/fmnist-sdt-0.5 --target 0.5 $FT --set routing.width=false
dydit finetune $A/fmnist_dit --out runs/fmnist-blockskip-0.5 --target 0.5 $FT --set routing.block_skip=true \
  --set routing.width=false --set routing.tokens=false
dydit finetune $A/fmnist_dit --out runs/fmnist-dydit-0.3 --target 0.3 $FT
# Issue-4 attempts at the λ=0.5 FID gap (the first two did not help; docs/RESULTS.md): a per-quarter FLOPs balance
# (scored in step 4), and a frozen plan for the last 40% with damped feedback (1,000-sample screen only).
dydit finetune $A/fmnist_dit --out runs/e3-balance --target 0.5 $FT --set flops.balance=1.0
dydit finetune $A/fmnist_dit --out runs/e1-freeze --target 0.5 $FT --set freeze.routers=0.4 --set feedback.gain=0.5
# and the best so far, not shipped yet: a 30-step λ ramp without the complete-model warm-up.
dydit finetune $A/fmnist_dit --out runs/e4-shortramp --target 0.5 $SR
dydit eval runs/e4-shortramp/ema --num-samples 5000 --steps 20 --cfg-scale 4.0 --batch-size 64
# Session 10 attempts, all with the short ramp (1,000-sample screens below): output distillation from the
# static model (with and without the data loss), per-quarter balance on TDW only, a lower router LR, and
# TDW only with a frozen plan for the last 50% / 80%.
dydit finetune $A/fmnist_dit --out runs/e5-distill --target 0.5 $SR --set distill.weight=1
dydit finetune $A/fmnist_dit --out runs/e6-kd --target 0.5 $SR --set distill.weight=1 --set distill.data_weight=0
dydit finetune $A/fmnist_dit --out runs/e7-tdw-bal1 --target 0.5 $SR --set routing.tokens=false --set flops.balance=1
dydit finetune $A/fmnist_dit --out runs/e8-tdw-bal05 --target 0.5 $SR --set routing.tokens=false --set flops.balance=0.5
dydit finetune $A/fmnist_dit --out runs/e9-rlr01 --target 0.5 $SR --set optim.router_lr=0.01
dydit finetune $A/fmnist_dit --out runs/e10-tdw-freeze $E10 --seed 0
dydit finetune $A/fmnist_dit --out runs/e11-tdw-freeze08 $E10 --seed 0 --set freeze.routers=0.8
dydit finetune $A/fmnist_dit --out runs/e12-tdw-freeze08-rlr03 --target 0.5 $SR --set routing.tokens=false \
  --set freeze.routers=0.8
# the frozen plan with the timestep embedder fixed too (did not help)
dydit finetune $A/fmnist_dit --out runs/e13-tdw-freeze-temb $E10 --seed 0 --set freeze.time_embed=true
dydit finetune $A/fmnist_dit --out runs/e14-tdw-freeze07-temb $E10 --seed 0 --set freeze.routers=0.7 \
  --set freeze.time_embed=true
for m in runs/e1-freeze/ema runs/e4-shortramp/ema runs/fmnist-dydit-0.5/ema runs/e5-distill/ema runs/e6-kd/ema \
         runs/e7-tdw-bal1/ema runs/e8-tdw-bal05/ema runs/e9-rlr01/ema runs/e10-tdw-freeze/ema \
         runs/e11-tdw-freeze08/ema runs/e12-tdw-freeze08-rlr03/ema runs/e13-tdw-freeze-temb/ema \
         runs/e14-tdw-freeze07-temb/ema; do
  dydit eval $m --num-samples 1000 --steps 20 --cfg-scale 4.0 --batch-size 64
done
# Session 11: a cosine LR decay (optim.lr_schedule), e10 with tokens, the e10 recipe on two more seeds (seed 1 is
# the shipped λ=0.5 of step 2), and calibration at the freeze (freeze.calibrate). The "-nocal" models are
# the same runs without the final calibration (calibration.enabled=false). The scored ones were made by shifting
# the width-router biases back by the logged calibration shift; rerunning e17 without calibration (session 12)
# gave those weights to float noise (largest difference 3e-5, in an attention qkv bias).
dydit finetune $A/fmnist_dit --out runs/e15-tdw-freeze-cos $E10 --seed 0 --set optim.lr_schedule=cosine
dydit finetune $A/fmnist_dit --out runs/e16-freeze-cos $E10 --seed 0 --set routing.tokens=true \
  --set optim.lr_schedule=cosine
dydit finetune $A/fmnist_dit --out runs/e20-e10-seed2 $E10 --seed 2
dydit finetune $A/fmnist_dit --out runs/e10-nocal-run $E10 --seed 0 --set calibration.enabled=false
dydit finetune $A/fmnist_dit --out runs/e17-nocal-run $E10 --set calibration.enabled=false
dydit finetune $A/fmnist_dit --out runs/e18-calfreeze-s0 $E10 --seed 0 --set freeze.calibrate=true
for m in runs/e15-tdw-freeze-cos/ema runs/e16-freeze-cos/ema runs/e20-e10-seed2/ema runs/e10-nocal-run/ema \
         runs/e17-nocal-run/ema $A/fmnist_dydit_0.5 runs/e18-calfreeze-s0/ema; do
  dydit eval $m --num-samples 1000 --steps 20 --cfg-scale 4.0 --batch-size 64
done
for m in runs/e10-nocal-run/ema $A/fmnist_dydit_0.5 runs/e20-e10-seed2/ema; do
  dydit eval $m --num-samples 5000 --steps 20 --cfg-scale 4.0 --batch-size 64
done
# The plans that docs/RESULTS.md describes (tokens kept, widths per step and block).
for m in runs/fmnist-dydit-0.5/ema runs/fmnist-sdt-0.5/ema runs/e3-balance/ema runs/e1-freeze/ema runs/e4-shortramp/ema; do
  dydit plan $m --out runs/plans/$(echo $m | tr '/' '_') --steps 20 --num-images 10
done

# 4. B1 + B3: every row on 5,000 samples (DDIM 20 steps, CFG 4, seed 0), then one interleaved timing
#    pass; table + plot. --resume keeps rows already scored with the same weights and settings.
R="--row"
EMBEDDED_ROWS=($R "static=$A/fmnist_dit" $R "DyDiT λ 0.7=$A/fmnist_dydit_0.7" $R "DyDiT λ 0.5=$A/fmnist_dydit_0.5"
  $R "static, 14 steps=$A/fmnist_dit,steps=14" $R "FBCache rdt 0.1=$A/fmnist_dit,fbcache=0.1"
  $R "DyDiT λ 0.5 + FBCache rdt 0.1=$A/fmnist_dydit_0.5,fbcache=0.1")
dydit bench compare --num-samples 5000 --steps 20 --cfg-scale 4.0 --batch-size 64 --resume --no-defaults \
  "${EMBEDDED_ROWS[@]}" \
  $R "static pruning to 0.5 + 300 ft steps=runs/fmnist-prune-0.5/ema" \
  $R "static + 300 ft steps=runs/fmnist-static-ft/ema" \
  $R "LoRA λ 0.5 (frozen backbone)=$A/fmnist_dit,adapters=runs/fmnist-lora-0.5/adapters" \
  $R "TD-LoRA λ 0.5 (frozen backbone)=$A/fmnist_dit,adapters=runs/fmnist-td-lora-0.5/adapters" \
  $R "TDW only λ 0.5=runs/fmnist-tdw-0.5/ema" \
  $R "SDT only λ 0.5=runs/fmnist-sdt-0.5/ema" \
  $R "block skip λ 0.5=runs/fmnist-blockskip-0.5/ema" \
  $R "DyDiT λ 0.3=runs/fmnist-dydit-0.3/ema" \
  $R "DyDiT λ 0.5, per-quarter FLOPs balance=runs/e3-balance/ema" \
  --out docs/results/b3_compare

# 4b. The shipped models alone, timed in one pass (the table in the README). The rows file starts as a copy of the
#     full pass's, so --resume scores only rows whose weights changed (the λ=0.5 model of session 11).
cp docs/results/b3_compare.rows.jsonl docs/results/b3_embedded.rows.jsonl
dydit bench compare --num-samples 5000 --steps 20 --cfg-scale 4.0 --batch-size 64 --resume --no-defaults \
  "${EMBEDDED_ROWS[@]}" \
  --out docs/results/b3_embedded

# 5. TD-LoRA merged-plan speed against a plain DyDiT on the identical plan.
python3 scripts/bench_td_lora.py $A/fmnist_dit runs/fmnist-td-lora-0.5/adapters --steps 20 --json docs/results/td_lora_speed.json

# 6. B2 on the CPU (random-weight DiT-B/2 and DiT-XL/2 at 256², trained-like plans). Each run alone.
dydit bench engine --models DiT-B/2 --targets 0.7,0.5,0.3 --schedules 50 --batches 8 --timed-steps 5 \
  --repeats 3 --out docs/results/bench_engine_cpu_b2
dydit bench engine --models DiT-XL/2 --targets 0.5 --schedules 50 --batches 8 --timed-steps 3 --repeats 3 \
  --out docs/results/bench_engine_cpu_xl2
dydit bench engine --models DiT-B/2 --targets 0.7,0.5,0.3 --schedules 50 --batches 1 --timed-steps 5 --repeats 3 \
  --out docs/results/bench_engine_cpu_b2_batch1
dydit bench engine --models DiT-B/2 --targets 0.5 --schedules 250 --batches 8 --timed-steps 5 --repeats 3 \
  --out docs/results/bench_engine_cpu_b2_250
dydit bench engine --models DiT-XL/2 --targets 0.7,0.3 --schedules 50 --batches 8 --timed-steps 3 --repeats 3 \
  --out docs/results/bench_engine_cpu_xl2_more

# 7. Issue 19 (memory, bf16, end to end). One model and batch per process, so each peak is its own:
#    peak memory = model tensors + the allocation timeline's peak of one pass (profiler), per side.
for b in 1 8; do
  dydit bench engine --models DiT-S/2 --targets 0.5 --schedules 50 --batches $b --timed-steps 5 --repeats 3 \
    --out docs/results/b2_mem_dits2_b$b
  dydit bench engine --models DiT-B/2 --targets 0.5 --schedules 50 --batches $b --timed-steps 5 --repeats 3 \
    --out docs/results/b2_mem_ditb2_b$b
  dydit bench engine --models DiT-XL/2 --targets 0.5 --schedules 50 --batches $b --timed-steps 2 --repeats 3 \
    --out docs/results/b2_mem_ditxl2_b$b
done
dydit bench engine --models DiT-S/2,DiT-B/2 --targets 0.5 --schedules 50 --batches 8 --timed-steps 5 --repeats 3 \
  --dtype bf16 --out docs/results/b2_bf16
# the embedded λ=0.5 model end to end (as dydit eval samples: DDIM 20, CFG 4, batch 64), with a profile
python3 scripts/profile_embedded.py --out docs/results/profile_embedded
python3 scripts/profile_embedded.py --dtype bf16 --out docs/results/profile_embedded_bf16

# 8. Issue 16 (session 24). Token routers centred over each image's tokens (routing.token_center), on the
#    shipped λ=0.5 recipe with tokens on; t3 adds a per-sample token-count term (routing.token_count).
#    Plans, selectivity (object = final-image patch mean > 0.1) and token-keep maps over 64 images.
TC="--recipe fmnist-0.5 --set routing.tokens=true --set routing.token_center=true --ckpt-every 100"
dydit finetune $A/fmnist_dit --out runs/t1-center $TC
dydit finetune $A/fmnist_dit --out runs/t2-center-rlr $TC --set optim.router_lr=0.03 --set freeze.routers=0.3
dydit finetune $A/fmnist_dit --out runs/t3-center-count $TC --set routing.token_count=true
for t in t1-center:t1 t2-center-rlr:t2 t3-center-count:t3; do
  dydit plan runs/${t%%:*}/ema --steps 20 --num-images 64 --out docs/results/plan_centred_${t##*:}
done
dydit eval runs/t1-center/ema --num-samples 5000 --steps 20 --cfg-scale 4.0 --batch-size 64 \
  --json docs/results/eval_centred_t1_5000.json
dydit eval runs/t2-center-rlr/ema --num-samples 1000 --steps 20 --cfg-scale 4.0 --batch-size 64 \
  --json docs/results/eval_centred_t2_1000.json
dydit eval runs/t3-center-count/ema --num-samples 1000 --steps 20 --cfg-scale 4.0 --batch-size 64 \
  --json docs/results/eval_centred_t3_1000.json

# 9. Flow matching: the SiT base (bf16 autocast, ~73 min at 1 thread beside other jobs) and DyDiT-SiT λ=0.5 with
#    the shipped λ=0.5 recipe (300 steps = 15% of 2000; feedback and calibration on the Euler sampler),
#    then their B3 rows (static, DyDiT-SiT, fewer Euler steps at about equal time, First-Block-Cache).
dydit train --model SiT-FMNIST --out runs/fmnist-sit-base --steps 2000 --batch-size 128 --lr 4e-4 \
  --warmup-steps 100 --ema-decay 0.995 --ckpt-every 200 --sample-every 500 --seed 0 --bf16
rm -rf $A/fmnist_sit && cp -r runs/fmnist-sit-base/ema $A/fmnist_sit
# (session 26) the shipped DyDiT-SiT: the λ=0.5 recipe with the timestep embedder frozen with the routers, the plan
# calibrated to λ at the freeze, and an output-distillation loss toward the static SiT (docs/RESULTS.md "DyDiT-SiT:
# the plan that ships"); 9b below screens the steps to it.
dydit finetune $A/fmnist_sit --out runs/fmnist-dysit-0.5 --recipe fmnist-0.5 --set freeze.time_embed=true \
  --set freeze.calibrate=true --set distill.weight=1.0 --ckpt-every 100
rm -rf $A/fmnist_dysit_0.5 && cp -r runs/fmnist-dysit-0.5/ema $A/fmnist_dysit_0.5
dydit plan $A/fmnist_dysit_0.5 --out docs/results/plan_sit_0.5
dydit bench compare --num-samples 5000 --steps 20 --cfg-scale 4.0 --batch-size 64 --resume --no-defaults \
  --row "SiT static=$A/fmnist_sit" --row "DyDiT-SiT λ 0.5=$A/fmnist_dysit_0.5" \
  --row "SiT static 12 steps=$A/fmnist_sit,steps=12" --row "SiT FBCache rdt 0.1=$A/fmnist_sit,fbcache=0.1" \
  --out docs/results/b3_sit

# 9b. (session 26) DyDiT-SiT screens at 1,000 samples: session 24's recipe (fmnist-0.5 alone, shipped until then),
#     s1 = + the frozen timestep embedder and calibration at the freeze, s2 = s1 + distillation (shipped above).
dydit finetune $A/fmnist_sit --out runs/dysit-s1 --recipe fmnist-0.5 --set freeze.time_embed=true \
  --set freeze.calibrate=true --ckpt-every 100
for r in dysit-s1 fmnist-dysit-0.5; do
  dydit eval runs/$r/ema --num-samples 1000 --steps 20 --cfg-scale 4.0 --batch-size 64 \
    --json docs/results/eval_${r}_1000.json
done

# 10. TD-LoRA and plain LoRA at λ=0.7 on the λ=0.7 recipe, adapting adaLN's modulation too (rank 2; TD-LoRA
#     2 experts), LR 1e-3, the feedback correction damped by half; calibrated on the width thresholds to 0.70
#     (the token routers step), then scored against the full fine-tune (the shipped λ=0.7, B3 above).
LA="--recipe fmnist-0.7 --set peft.targets=attn.qkv,attn.proj,mlp.fc1,mlp.fc2,adaLN_modulation.1 --set peft.rank=2 \
  --set optim.lr=1e-3 --set feedback.gain=0.5 --ckpt-every 100"
dydit finetune $A/fmnist_dit --out runs/tdlora-0.7-adaln $LA --peft td-lora --set peft.experts=2
dydit finetune $A/fmnist_dit --out runs/lora-0.7-adaln $LA --peft lora
for r in tdlora-0.7-adaln lora-0.7-adaln; do
  dydit calibrate $A/fmnist_dit --adapters runs/$r/adapters --target 0.7 --knob width --out runs/$r/cal
  dydit eval $A/fmnist_dit --adapters runs/$r/cal --num-samples 1000 --steps 20 --cfg-scale 4.0 --batch-size 64 \
    --json docs/results/eval_${r}_1000.json
done
dydit eval $A/fmnist_dit --adapters runs/tdlora-0.7-adaln/cal --num-samples 5000 --steps 20 --cfg-scale 4.0 \
  --batch-size 64 --json docs/results/eval_tdlora-0.7-adaln.json

# 10b. (session 26) TD-LoRA at λ=0.7 on the shipped λ=0.5 recipe's schedule (fmnist-0.5 --target 0.7: width only,
#      router LR 1e-2, 30-step ramp, routers frozen for the second half so the adapters train on the plan that
#      ships), with step 10's adapter settings; beside it the full fine-tune on the same recipe. The fine-tune's own
#      final calibration (width thresholds) applies to the adapters.
LW="--recipe fmnist-0.5 --target 0.7 --ckpt-every 100"
dydit finetune $A/fmnist_dit --out runs/tdlora-0.7-w $LW --peft td-lora --set peft.experts=2 \
  --set peft.targets=attn.qkv,attn.proj,mlp.fc1,mlp.fc2,adaLN_modulation.1 --set peft.rank=2 --set optim.lr=1e-3 \
  --set feedback.gain=0.5
dydit finetune $A/fmnist_dit --out runs/full-0.7-w $LW
dydit eval $A/fmnist_dit --adapters runs/tdlora-0.7-w/adapters --num-samples 1000 --steps 20 --cfg-scale 4.0 \
  --batch-size 64 --json docs/results/eval_tdlora-0.7-w_1000.json
dydit eval runs/full-0.7-w/ema --num-samples 1000 --steps 20 --cfg-scale 4.0 --batch-size 64 \
  --json docs/results/eval_full-0.7-w_1000.json
dydit eval $A/fmnist_dit --adapters runs/tdlora-0.7-w/adapters --num-samples 5000 --steps 20 --cfg-scale 4.0 \
  --batch-size 64 --json docs/results/eval_tdlora-0.7-w.json

# 11. One fine-tune, several budgets: the shipped λ=0.5 model calibrated at inference to 0.7, 0.6 and 0.4
#     (width thresholds: it is width-only), 1,000-sample screens, beside the shipped λ=0.7 fine-tune.
for lp in 0.7 0.6 0.4; do
  dydit calibrate $A/fmnist_dydit_0.5 --target $lp --out runs/budget-$lp
  dydit eval runs/budget-$lp --num-samples 1000 --steps 20 --cfg-scale 4.0 --batch-size 64 \
    --json docs/results/eval_budget_$lp.json
done
dydit eval $A/fmnist_dydit_0.7 --num-samples 1000 --steps 20 --cfg-scale 4.0 --batch-size 64 \
  --json docs/results/eval_dydit07_1000.json

# 12. (session 27) TDW + SDT at λ = 0.5 (issue 16): centred token routers on the shipped λ=0.5 recipe with the
#     session-26 options that made DyDiT-SiT hold ($FZ: the timestep embedder frozen with the plan, the plan
#     calibrated to λ at the freeze, distillation toward the static init), then the EMA restarted at the freeze
#     (freeze.ema_restart, new). 1,000-sample screens, plans over 64 images; TDW-only twins with the same options.
TC="--recipe fmnist-0.5 --set routing.tokens=true --set routing.token_center=true --ckpt-every 100"
FZ="--set freeze.time_embed=true --set freeze.calibrate=true --set distill.weight=1.0"
dydit finetune $A/fmnist_dit --out runs/u1-center-count-fzd $TC $FZ --set routing.token_count=true
dydit finetune $A/fmnist_dit --out runs/u2-center-fzd $TC $FZ
dydit finetune $A/fmnist_dit --out runs/u2s2-center-fzd $TC $FZ --seed 2
dydit finetune $A/fmnist_dit --out runs/w1-tdw-fzd --recipe fmnist-0.5 --ckpt-every 100 $FZ
dydit finetune $A/fmnist_dit --out runs/v1-center-fzdr $TC $FZ --set freeze.ema_restart=true
dydit finetune $A/fmnist_dit --out runs/v2-center-fzdr-tb4 $TC $FZ --set freeze.ema_restart=true \
  --set router_init.token_bias=4
dydit finetune $A/fmnist_dit --out runs/v1s2-center-fzdr $TC $FZ --set freeze.ema_restart=true --seed 2
dydit finetune $A/fmnist_dit --out runs/w2-tdw-fzdr --recipe fmnist-0.5 --ckpt-every 100 $FZ --set freeze.ema_restart=true
for r in u1-center-count-fzd u2-center-fzd u2s2-center-fzd w1-tdw-fzd v1-center-fzdr v2-center-fzdr-tb4 \
    v1s2-center-fzdr w2-tdw-fzdr; do
  dydit eval runs/$r/ema --num-samples 1000 --steps 20 --cfg-scale 4.0 --batch-size 64 \
    --json docs/results/eval_${r}_1000.json
  dydit plan runs/$r/ema --steps 20 --num-images 64 --out runs/plans/$r
done
# 12b. The B3 ablation pass at λ = 0.5, every row with the step-12 options ($FZ + freeze.ema_restart, recipe
#      fmnist-0.5-sdt): TDW + SDT (v1, two seeds), TDW only (w2), SDT only, whole-block skip; beside the static model
#      and the shipped width-only λ=0.5. Quality rows were scored two at a time (--timing-repeats 0 into runs/abl_*,
#      the .rows.jsonl concatenated), then this command (--resume) times every row in one interleaved pass.
dydit finetune $A/fmnist_dit --out runs/x1-sdt-only --recipe fmnist-0.5-sdt --set routing.width=false --ckpt-every 100
dydit finetune $A/fmnist_dit --out runs/x2-blockskip --recipe fmnist-0.5-sdt --set routing.block_skip=true \
  --set routing.width=false --set routing.tokens=false --ckpt-every 100
ABL=($R "static=$A/fmnist_dit" $R "shipped λ 0.5 (TDW only; fmnist-0.5)=$A/fmnist_dydit_0.5"
  $R "TDW+SDT λ 0.5 seed 1=runs/v1-center-fzdr/ema" $R "TDW+SDT λ 0.5 seed 2=runs/v1s2-center-fzdr/ema"
  $R "TDW only λ 0.5=runs/w2-tdw-fzdr/ema" $R "SDT only λ 0.5=runs/x1-sdt-only/ema"
  $R "block skip λ 0.5=runs/x2-blockskip/ema")
Q="dydit bench compare --num-samples 5000 --steps 20 --cfg-scale 4.0 --batch-size 64 --no-defaults --timing-repeats 0"
$Q --row "TDW+SDT λ 0.5 seed 1=runs/v1-center-fzdr/ema" --out runs/abl_v1
$Q --row "TDW+SDT λ 0.5 seed 2=runs/v1s2-center-fzdr/ema" --out runs/abl_v1s2
$Q --row "block skip λ 0.5=runs/x2-blockskip/ema" --row "TDW only λ 0.5=runs/w2-tdw-fzdr/ema" --out runs/abl_a
$Q --row "SDT only λ 0.5=runs/x1-sdt-only/ema" --out runs/abl_b
# (the static and shipped rows are cited from b3_embedded: their cached rows, written by an older bench compare, do
# not match today's row keys, and re-scoring them did not fit the session; the command below times the five others)
cat runs/abl_*.rows.jsonl > docs/results/b3_ablation.rows.jsonl
dydit bench compare --num-samples 5000 --steps 20 --cfg-scale 4.0 --batch-size 64 --resume --no-defaults \
  "${ABL[@]:4}" --out docs/results/b3_ablation
dydit plan runs/v1-center-fzdr/ema --steps 20 --num-images 64 --out docs/results/plan_tdw_sdt_0.5

# 13. (session 28) Making the token routers carry part of λ = 0.5 (issue 16). All on fmnist-0.5-sdt:
#     y: routing.token_noise=0 (the token masks in training are the inference ones; no random token dropout);
#     z: y + freeze.width_target (at the freeze, width thresholds to 0.55 / 0.60, then the token thresholds to λ);
#     r: y + routing.token_count + flops.width_target (a second FLOPs term holds the width-only ratio at 0.52 / 0.55
#        while the routers learn, so the tokens carry the rest; the freeze calibration splits the plan the same way).
Y="--recipe fmnist-0.5-sdt --set routing.token_noise=0 --ckpt-every 100"
dydit finetune $A/fmnist_dit --out runs/y1-tnoise0 $Y
dydit finetune $A/fmnist_dit --out runs/y1s2-tnoise0 $Y --seed 2
dydit finetune $A/fmnist_dit --out runs/z1-wt055 $Y --set freeze.width_target=0.55
dydit finetune $A/fmnist_dit --out runs/z2-wt060 $Y --set freeze.width_target=0.6
dydit finetune $A/fmnist_dit --out runs/r1-lw052 $Y --set routing.token_count=true --set flops.width_target=0.52
dydit finetune $A/fmnist_dit --out runs/r2-lw055 $Y --set routing.token_count=true --set flops.width_target=0.55
for r in y1-tnoise0 y1s2-tnoise0 z1-wt055 z2-wt060 r1-lw052 r2-lw055; do
  dydit eval runs/$r/ema --num-samples 1000 --steps 20 --cfg-scale 4.0 --batch-size 64 \
    --json docs/results/eval_${r}_1000.json
  dydit plan runs/$r/ema --steps 20 --num-images 64 --out runs/plans/$r
done
# z3: the smallest split tried, on two seeds
dydit finetune $A/fmnist_dit --out runs/z3-wt051 $Y --set freeze.width_target=0.51
dydit finetune $A/fmnist_dit --out runs/z3s2-wt051 $Y --set freeze.width_target=0.51 --seed 2
for r in z3-wt051 z3s2-wt051; do
  dydit eval runs/$r/ema --num-samples 1000 --steps 20 --cfg-scale 4.0 --batch-size 64 \
    --json docs/results/eval_${r}_1000.json
  dydit plan runs/$r/ema --steps 20 --num-images 64 --out runs/plans/$r
done
# y1 on 5,000 samples, both seeds (quality only; the rows of docs/results/b3_tokens_det.md)
$Q --row "TDW+SDT token_noise 0 seed 1=runs/y1-tnoise0/ema" --out runs/abl_y1
$Q --row "TDW+SDT token_noise 0 seed 2=runs/y1s2-tnoise0/ema" --out runs/abl_y1s2
for r in y1-tnoise0 z3-wt051 r1-lw052; do mkdir -p docs/results/plans_s28/$r; cp runs/plans/$r/{plan.json,plan.md,selectivity.json,selectivity.md} docs/results/plans_s28/$r/; done
cp runs/plans/z3-wt051/token_maps.png docs/results/plans_s28/z3-wt051/
# y1 (both seeds) beside v1 and w2, scored rows reused (--resume), timed in one interleaved pass
cat runs/abl_y1.rows.jsonl runs/abl_y1s2.rows.jsonl docs/results/b3_ablation.rows.jsonl > docs/results/b3_tokens_det.rows.jsonl
dydit bench compare --num-samples 5000 --steps 20 --cfg-scale 4.0 --batch-size 64 --resume --no-defaults \
  $R "TDW+SDT token_noise 0 seed 1=runs/y1-tnoise0/ema" $R "TDW+SDT token_noise 0 seed 2=runs/y1s2-tnoise0/ema" \
  $R "TDW+SDT λ 0.5 seed 1=runs/v1-center-fzdr/ema" $R "TDW+SDT λ 0.5 seed 2=runs/v1s2-center-fzdr/ema" \
  $R "TDW only λ 0.5=runs/w2-tdw-fzdr/ema" --out docs/results/b3_tokens_det
# w2 (TDW only on the step-12 options) on a second seed, 5,000 samples (quality only)
dydit finetune $A/fmnist_dit --out runs/w2s2-tdw-fzdr --recipe fmnist-0.5 --ckpt-every 100 $FZ --set freeze.ema_restart=true --seed 2
$Q --row "TDW only λ 0.5 seed 2=runs/w2s2-tdw-fzdr/ema" --out runs/abl_w2s2
cp runs/abl_w2s2.md docs/results/b3_w2s2.md
