"""Compiled vs eager sampling, static and dynamic, on the embedded Fashion-MNIST models.

Samples one batch as `dydit eval` does (DDIM 20, CFG 4, batch 64; the fast engine for the dynamic model)
four ways: static eager, static compiled (each block's static forward under torch.compile), dynamic eager
(the fast engine), dynamic compiled (the fast engine's blocks under torch.compile, dydit.dynamic.compiled).
The compile time of each compiled side is its first run minus its steady-state run (inductor's on-disk
caches are off unless --warm-cache, so it is a cold compile); the steady-state times are the medians of
interleaved rounds. Also records the compiled graphs and graph breaks, and checks that compiled and
eager samples agree.

    python scripts/bench_compile.py                  # writes docs/results/compile_embedded.{md,json}
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

if "--warm-cache" not in sys.argv:  # a cold compile: no FX-graph / autotuning cache from earlier runs
    os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"

import torch  # noqa: E402
import torch._dynamo as dynamo  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import dydit  # noqa: E402
from dydit.assets import default_model_path  # noqa: E402
from dydit.dynamic import DynamicContext  # noqa: E402
from dydit.sampling import sample  # noqa: E402


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--dynamic", default="fmnist_dydit_0.5", help="asset folder of the dynamic model")
    ap.add_argument("--warm-cache", action="store_true", help="keep inductor's on-disk caches (warm compile)")
    ap.add_argument("--machine", default="", help="a note on the machine's state, written into the report")
    ap.add_argument("--out", default="docs/results/compile_embedded")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(default_model_path()).parent
    static = dydit.load(root / "fmnist_dit").eval()
    dyn = dydit.load(root / args.dynamic).eval()
    labels = torch.arange(args.batch) % 10
    options = {"backend": args.backend}

    def run(name):
        if name == "static eager":
            return sample(static, labels, "ddim", args.steps, cfg_scale=4.0, seed=0)
        if name == "static compiled":
            return sample(static, labels, "ddim", args.steps, cfg_scale=4.0, seed=0, compile=options)
        if name == "dynamic eager":
            return sample(dyn, labels, "ddim", args.steps, cfg_scale=4.0, seed=0, dyn=DynamicContext("fast"))
        return sample(dyn, labels, "ddim", args.steps, cfg_scale=4.0, seed=0,
                      dyn=DynamicContext("fast", compile=options))

    def timed(name):
        t0 = time.perf_counter()
        out = run(name)
        return time.perf_counter() - t0, out

    names = ["static eager", "static compiled", "dynamic eager", "dynamic compiled"]
    first, outs, graphs = {}, {}, {}
    dynamo.reset()
    for name in names:  # first runs: the compiled sides compile here (their graphs counted separately)
        counters.clear()
        first[name], outs[name] = timed(name)
        if "compiled" in name:
            graphs[name] = {"unique_graphs": int(counters["stats"]["unique_graphs"]),
                            "graph_breaks": int(sum(counters["graph_break"].values())),
                            "calls_captured": int(counters["stats"]["calls_captured"])}
    counters.clear()  # no graph should compile from here on (recorded as graphs_compiled_during_timing)
    times = {n: [] for n in names}
    for _ in range(args.rounds):
        for name in names:  # interleaved: machine noise hits every variant alike
            times[name].append(timed(name)[0])
    recompiled = int(counters["stats"]["unique_graphs"])
    med = {n: statistics.median(v) for n, v in times.items()}
    result = {
        "batch": args.batch, "steps": args.steps, "cfg_scale": 4.0, "rounds": args.rounds, "threads": args.threads,
        "backend": args.backend, "dynamic_model": args.dynamic, "cold_compile": not args.warm_cache,
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "load_average": os.getloadavg(), "machine": args.machine,
        "median_s": med, "times_s": times, "first_run_s": first,
        "compile_s": {n: first[n] - med[n] for n in names if "compiled" in n},
        "graphs": graphs, "graphs_compiled_during_timing": recompiled,
        "compiled_vs_eager_rel_err": {"static": rel_err(outs["static compiled"], outs["static eager"]),
                                      "dynamic": rel_err(outs["dynamic compiled"], outs["dynamic eager"])},
        "speedup": {"static: compiled vs eager": med["static eager"] / med["static compiled"],
                    "dynamic: compiled vs eager": med["dynamic eager"] / med["dynamic compiled"],
                    "eager: dynamic vs static": med["static eager"] / med["dynamic eager"],
                    "compiled: dynamic vs static": med["static compiled"] / med["dynamic compiled"]},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(render(result))
    sys.stdout.write(render(result))


def render(r) -> str:
    cache = "cold (inductor caches off)" if r["cold_compile"] else "warm (inductor's on-disk caches on)"
    lines = [f"Compiled vs eager sampling on the embedded models: static `fmnist_dit` vs dynamic `{r['dynamic_model']}` "
             f"(fast engine), batch {r['batch']}, DDIM {r['steps']}, CFG {r['cfg_scale']}, {r['threads']} threads, fp32, "
             f"torch {r['torch']} `{r['backend']}`. Steady-state time: median of {r['rounds']} interleaved rounds; "
             f"compile time: first run − steady state, {cache}.", ""]
    if r["machine"]:
        lines += [f"Machine: {r['machine']} (load average at the end: "
                  f"{', '.join(f'{v:.2f}' for v in r['load_average'])}).", ""]
    lines += ["| variant | steady state s | rounds min–max s | first run s | compile s | graphs | graph breaks |",
              "|---|---|---|---|---|---|---|"]
    for n, t in r["median_s"].items():
        g = r["graphs"].get(n)
        comp = r["compile_s"].get(n)
        lo, hi = min(r["times_s"][n]), max(r["times_s"][n])
        lines.append(f"| {n} | {t:.3f} | {lo:.2f}–{hi:.2f} | {r['first_run_s'][n]:.2f} | {'' if comp is None else f'{comp:.1f}'} | "
                     f"{'' if g is None else g['unique_graphs']} | {'' if g is None else g['graph_breaks']} |")
    lines += ["", "| speedup | × |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in r["speedup"].items()]
    e = r["compiled_vs_eager_rel_err"]
    lines += ["", f"Compiled vs eager samples: max relative difference static {e['static']:.1e}, dynamic {e['dynamic']:.1e}. "
              f"Graphs compiled during the timing rounds (recompiles): {r['graphs_compiled_during_timing']}.", "",
              "Rerun: `PYTHONPATH=src python3 scripts/bench_compile.py --machine \"<state of the machine>\"`."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
