"""TD-LoRA inference speed: the adapters folded into the per-timestep plan weights vs a plain DyDiT.

Usage: python3 scripts/bench_td_lora.py BASE ADAPTERS [--images 100 --steps 25 --repeats 5]

Both sides run the same routers and therefore the same width plan and token selections: the plain
side is the adapted model with its TD-LoRA layers swapped back for their base linears (the timing a
fully fine-tuned DyDiT of the same plan has). Runs alternate, after one warm-up run each (which also
fills the per-timestep merged-weight cache); the median of the repeats is reported.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

import dydit
from dydit.dynamic import DynamicContext
from dydit.peft import load_adapters, td_lora_fast_context
from dydit.peft.td_lora.layer import TDLoRALinear
from dydit.sampling import sample


def strip_adapters(model):
    plain = copy.deepcopy(model)
    for name, module in list(plain.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, TDLoRALinear):
                setattr(module, child_name, child.base_layer)
    return plain


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base")
    ap.add_argument("adapters")
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg-scale", type=float, default=4.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    adapted = load_adapters(dydit.load(args.base), args.adapters).eval()
    plain = strip_adapters(adapted).eval()
    labels = torch.arange(args.images) % adapted.config.num_classes
    ctx_adapted = td_lora_fast_context(adapted)
    ctx_plain = DynamicContext("fast")

    def run(model, ctx):
        t0 = time.perf_counter()
        sample(model, labels, "ddim", args.steps, cfg_scale=args.cfg_scale, seed=0, dyn=ctx)
        return time.perf_counter() - t0

    run(adapted, ctx_adapted), run(plain, ctx_plain)  # warm-up (fills both weight caches)
    ta, tp = [], []
    for _ in range(args.repeats):
        ta.append(run(adapted, ctx_adapted))
        tp.append(run(plain, ctx_plain))
    res = {"images": args.images, "steps": args.steps, "cfg_scale": args.cfg_scale, "repeats": args.repeats,
           "threads": torch.get_num_threads(),
           "td_lora_s_per_image": statistics.median(ta) / args.images,
           "plain_dydit_s_per_image": statistics.median(tp) / args.images,
           "td_lora_runs_s": ta, "plain_runs_s": tp}
    res["ratio"] = res["td_lora_s_per_image"] / res["plain_dydit_s_per_image"]
    print(json.dumps(res, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
