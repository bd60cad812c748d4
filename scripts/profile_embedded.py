"""Where the time of one sampling run goes, static vs DyDiT, on the embedded Fashion-MNIST models.

Samples one batch as `dydit eval` does (DDIM, CFG 4, the fast engine for the dynamic model) under
torch.profiler and splits the run's wall time into what scales with the routed width (the matmuls of
the blocks' linears, attention, the MLP activation) and the fixed costs per step that do not (norms and
modulation, the embedders and final layer, router evaluation and plan look-up, token gather/scatter,
CFG and sampler arithmetic, Python). Also reports the FLOPs-ideal and the measured speedup of the
same runs (median of interleaved timing rounds, outside the profiler).

    python scripts/profile_embedded.py --out docs/results/profile_embedded
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import dydit
from dydit.assets import default_model_path
from dydit.dynamic import DynamicContext
from dydit.dynamic.flops import flops_spec
from dydit.dynamic.report import sampling_forwards, summarize
from dydit.sampling import sample

# aten ops by what they are; the first matching prefix wins
CATEGORIES = [
    ("linear matmuls", ("aten::addmm", "aten::mm", "aten::bmm", "aten::linear", "aten::matmul")),
    ("attention", ("aten::_scaled_dot_product", "aten::scaled_dot_product")),
    ("MLP activation", ("aten::gelu",)),
    ("norms and modulation", ("aten::native_layer_norm", "aten::layer_norm", "aten::mul", "aten::add",
                              "aten::addcmul", "aten::chunk", "aten::split")),
    ("token gather/scatter", ("aten::index_select", "aten::index_add", "aten::nonzero", "aten::div")),
    ("copies and layout", ("aten::copy_", "aten::cat", "aten::clone", "aten::contiguous", "aten::reshape",
                           "aten::view", "aten::permute", "aten::transpose", "aten::t", "aten::expand",
                           "aten::narrow", "aten::slice", "aten::select", "aten::unsqueeze", "aten::empty",
                           "aten::to", "aten::_to_copy", "aten::stack")),
]
SCOPES = ("embedders", "blocks", "final layer", "routers and plan", "sampler")


def categorize(name: str) -> str:
    for cat, prefixes in CATEGORIES:
        if name.startswith(prefixes):
            return cat
    return "other ops"


def scoped(model):
    """Wraps the model's parts in record_function ranges so the profile can be split by scope."""
    handles = []

    def wrap(module, label):
        def pre(*_):
            module._dydit_rf = record_function(label)
            module._dydit_rf.__enter__()

        def post(*_):
            module._dydit_rf.__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))

    for m in (model.x_embedder, model.t_embedder, model.y_embedder):
        wrap(m, "embedders")
    for b in model.blocks:
        wrap(b, "blocks")
    wrap(model.final_layer, "final layer")
    return handles


DTYPE = "fp32"


def run_once(model, labels, steps, dyn):
    return sample(model, labels, "ddim", steps, cfg_scale=4.0, seed=0, dyn=dyn, dtype=DTYPE)


def profile_run(model, labels, steps, make_dyn) -> dict:
    handles = scoped(model)
    try:
        run_once(model, labels, steps, make_dyn())  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            with record_function("sampling run"):
                run_once(model, labels, steps, make_dyn())
            wall = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    # self time of every aten op, by category and by enclosing scope
    by_cat, by_scope = defaultdict(float), defaultdict(float)
    events = [e for e in prof.events()]
    ranges = [(e.time_range.start, e.time_range.end, e.name) for e in events if e.name in SCOPES[:3]]
    for e in events:
        if not e.name.startswith("aten::"):
            continue
        us = e.self_cpu_time_total
        by_cat[categorize(e.name)] += us
        start = e.time_range.start
        scope = next((n for s, t, n in ranges if s <= start <= t), "outside blocks")
        by_scope[scope] += us
    ops = sum(by_cat.values()) / 1e6
    return {"wall_s": wall, "ops_s": ops, "python_and_dispatch_s": max(0.0, wall - ops),
            "by_category_s": {k: v / 1e6 for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
            "by_scope_s": {k: v / 1e6 for k, v in sorted(by_scope.items(), key=lambda kv: -kv[1])}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="fp32", help="fp32 or bf16 (autocast of each network call)")
    ap.add_argument("--dynamic", default="fmnist_dydit_0.5", help="asset folder of the dynamic model")
    ap.add_argument("--out", default="docs/results/profile_embedded")
    args = ap.parse_args()
    global DTYPE
    DTYPE = args.dtype
    torch.set_num_threads(args.threads)
    root = Path(default_model_path()).parent
    static = dydit.load(root / "fmnist_dit").eval()
    dyn = dydit.load(root / args.dynamic).eval()
    labels = torch.arange(args.batch) % 10

    def fast():
        return DynamicContext("fast", record_usage=True)

    # FLOPs-ideal speedup of exactly these runs
    ctx = fast()
    run_once(dyn, labels, args.steps, ctx)
    spec = flops_spec(dyn)
    summary = summarize(ctx.usage, spec, cfg_batches=2, forwards=sampling_forwards(dyn, "ddim", args.steps))
    ideal = 1 / summary["flops_ratio"]

    # measured speedup: interleaved rounds, median
    ts, td = [], []
    run_once(static, labels, args.steps, None), run_once(dyn, labels, args.steps, fast())
    for _ in range(args.rounds):
        t0 = time.perf_counter(); run_once(static, labels, args.steps, None); ts.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); run_once(dyn, labels, args.steps, fast()); td.append(time.perf_counter() - t0)
    measured = statistics.median(ts) / statistics.median(td)

    prof = {"static": profile_run(static, labels, args.steps, lambda: None),
            "dynamic": profile_run(dyn, labels, args.steps, fast)}
    result = {"batch": args.batch, "steps": args.steps, "rounds": args.rounds, "dtype": args.dtype, "cfg_scale": 4.0, "threads": args.threads,
              "flops_ratio": summary["flops_ratio"], "ideal_speedup": ideal, "measured_speedup": measured,
              "efficiency": measured / ideal, "static_s": statistics.median(ts), "dynamic_s": statistics.median(td),
              "profile": prof}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(render(result))
    print(render(result))


def render(r) -> str:
    s, d = r["profile"]["static"], r["profile"]["dynamic"]
    lines = [f"Embedded λ model vs static: batch {r['batch']}, DDIM {r['steps']}, CFG {r['cfg_scale']}, "
             f"{r['threads']} threads, {r['dtype']}. FLOPs ratio {r['flops_ratio']:.3f}: ideal {r['ideal_speedup']:.2f}×, "
             f"measured {r['measured_speedup']:.2f}× (static {r['static_s']:.2f} s, dynamic {r['dynamic_s']:.2f} s "
             f"per run; median of {r['rounds']} interleaved rounds), efficiency {r['efficiency']:.2f}.", "",
             "Profiled run (self time of aten ops; the rest is Python, dispatch and profiler overhead):", "",
             "| part | static s | dynamic s | dynamic / static |", "|---|---|---|---|"]
    keys = list(dict.fromkeys([*s["by_category_s"], *d["by_category_s"]]))
    for k in keys:
        a, b = s["by_category_s"].get(k, 0.0), d["by_category_s"].get(k, 0.0)
        lines.append(f"| {k} | {a:.3f} | {b:.3f} | {b / a if a else float('nan'):.2f} |")
    for k in ("ops_s", "python_and_dispatch_s", "wall_s"):
        lines.append(f"| **{k[:-2].replace('_', ' ')}** | {s[k]:.3f} | {d[k]:.3f} | {d[k] / s[k]:.2f} |")
    lines += ["", "| scope (aten self time) | static s | dynamic s |", "|---|---|---|"]
    for k in dict.fromkeys([*s["by_scope_s"], *d["by_scope_s"]]):
        lines.append(f"| {k} | {s['by_scope_s'].get(k, 0.0):.3f} | {d['by_scope_s'].get(k, 0.0):.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
