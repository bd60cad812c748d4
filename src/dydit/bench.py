"""Benchmark B2: engine efficiency at paper scale (DiT-B/2, DiT-XL/2 at 256², random weights); the same for
video backbones (B4: Latte-B/2 or Latte-XL/2, their registry configs being 16 frames of 32×32×4 latents, i.e.
256² video), whose shaped plans span the spatial and the temporal blocks alike.

Static and dynamic sampling steps are timed side by side in one process on the same inputs, after a
warm-up, as the median of several repeats. Plans are shaped like trained ones: narrower at high noise,
different per block, with a token share calibrated per block; they hit a requested FLOPs ratio.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from dydit.dynamic import DynamicConfig, DynamicContext, dynamize
from dydit.dynamic.flops import flops_spec, realised_macs
from dydit.dynamic.report import summarize
from dydit.dynamic.plan import BlockWidth, WidthPlan, time_key
from dydit.models.dit import build_model


@dataclass
class EngineResult:
    model: str
    target: float
    schedule_steps: int
    timed_steps: int
    batch: int
    dtype: str
    device: str
    static_s_per_step: float
    dynamic_s_per_step: float
    speedup: float
    ideal_speedup: float
    efficiency: float
    realised_ratio: float
    static_gmacs: float
    dynamic_gmacs: float
    # Peak memory of one pass of each side: the model's own tensors plus the most that the pass held
    # allocated at once (activations, sliced or gathered weights, index tables, any cache). CUDA: max
    # allocated; CPU: the profiler's allocation timeline (deterministic, unlike the resident set).
    static_peak_mb: float | None = None
    dynamic_peak_mb: float | None = None
    # CPU only, as context: the process's peak resident set over the pass, freed heap returned to the
    # system (malloc_trim) and the high-water mark reset before each side
    static_peak_rss_mb: float | None = None
    dynamic_peak_rss_mb: float | None = None
    # per block kind (Latte: "spatial", "temporal"; DiT: "block"): the realised MACs ratio of that kind
    ratio_by_kind: dict | None = None
    frames: int | None = None  # video models: frames per sample


def shaped_width(t_frac: float, layer: int, depth: int, level: float, H: int, phase: float = 0.0):
    """Active head/group counts shaped like trained routers: narrow at high noise, varying by layer."""
    wiggle = 0.15 * math.sin(2.3 * layer + phase)
    frac = level + 0.25 * (0.5 - t_frac) + wiggle
    heads = max(1, min(H, round(H * frac)))
    groups = max(1, min(H, round(H * (frac - 0.1 + 0.1 * math.cos(1.7 * layer)))))
    return heads, groups


def build_shaped_plan(model, timesteps, level: float, t_max: float) -> WidthPlan:
    plan = WidthPlan()
    H, depth = model.config.num_heads, model.config.depth
    for t in timesteps:
        widths = []
        for layer in range(depth):
            h, g = shaped_width(float(t) / t_max, layer, depth, level, H)
            widths.append(BlockWidth(torch.arange(h), torch.arange(g)))
        plan.steps[time_key(t)] = widths
    return plan


@torch.no_grad()
def calibrate_tokens_in_plan(model, x, t: float, y, keep: float, ctx: DynamicContext):
    """One fast forward at timestep ``t`` that sets each token router's bias, block after block, so that
    ``keep`` of the tokens pass *given the narrowed upstream blocks of the plan* (later blocks see the
    already calibrated earlier ones, as the hook runs inside the forward)."""
    hooks = []

    def make_hook(head):
        def hook(module, inputs):
            h = F.relu(head[0](inputs[0]))
            logits = F.linear(h, head[2].weight).squeeze(-1)  # (B, N) without the bias
            q = torch.quantile(logits.float().flatten(), 1 - keep)
            head[2].bias.fill_(-float(q))

        return hook

    for block in model.blocks:
        head = block.token_selection.mlp_head
        hooks.append(head.register_forward_pre_hook(make_hook(head)))
    try:
        model(x, torch.full((len(x),), t, device=x.device), y, dyn=ctx)
    finally:
        for h in hooks:
            h.remove()


def plan_ratio(spec, plan: WidthPlan, keep: float, timesteps) -> float:
    ratios = []
    for t in timesteps:
        widths = plan.steps[time_key(t)]
        m = realised_macs(spec, [len(b.heads) for b in widths], [len(b.groups) for b in widths],
                          [keep * spec.blocks[0].num_tokens] * len(widths))
        ratios.append(m["blocks"] / spec.block_total)
    return sum(ratios) / len(ratios)


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


@torch.no_grad()
def bench_engine(model_name: str = "DiT-B/2", target: float = 0.5, schedule_steps: int = 50,
                 timed_steps: int = 10, batch: int = 8, repeats: int = 3, dtype: str = "fp32",
                 device: str = "cpu", keep: float = 0.8, cfg: bool = False, seed: int = 0,
                 model_overrides: dict | None = None) -> EngineResult:
    """Times static vs dynamic denoising steps over ``timed_steps`` evenly spaced schedule steps.

    ``model_name``: any registry backbone, image (DiT) or video (Latte: inputs (B, F, C, H, W));
    ``model_overrides`` change its config (tests: fewer frames)."""
    from dydit.sampling import video_frames

    torch.manual_seed(seed)
    model = build_model(model_name, **(model_overrides or {}))
    # random, non-degenerate weights everywhere (adaLN-Zero would make every block the identity); the
    # frozen sin-cos tables (pos_embed, Latte's temp_embed) stay
    for name, p in model.named_parameters():
        if p.requires_grad and p.ndim >= 1:
            p.data.normal_(0, 0.02)
    model = dynamize(model, DynamicConfig()).to(device).eval()
    for block in model.blocks:  # the token routers' output layer starts at zero: give it token-dependent logits
        head = block.token_selection.mlp_head
        head[2].weight.data.normal_(0, head[2].in_features ** -0.5)
    c = model.config
    schedule = torch.linspace(999, 0, schedule_steps).round().tolist()
    timed = schedule[:: max(1, schedule_steps // timed_steps)][:timed_steps]
    B = batch * (2 if cfg else 1)
    frames = video_frames(model)
    x = torch.randn(B, *((frames,) if frames else ()), c.in_channels, c.input_size, c.input_size, device=device)
    y = torch.randint(0, c.num_classes, (B,), device=device)
    spec = flops_spec(model)
    amp = dict(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=dtype == "bf16")

    def solve_plan(goal: float) -> WidthPlan:
        lo, hi = 0.0, 1.5  # the width level meeting ``goal`` (the ratio is monotone in the level)
        for _ in range(30):
            mid = (lo + hi) / 2
            r = plan_ratio(spec, build_shaped_plan(model, schedule, mid, 999), keep, schedule)
            lo, hi = (mid, hi) if r < goal else (lo, mid)
        return build_shaped_plan(model, schedule, (lo + hi) / 2, 999)

    def realised(plan) -> float:
        ctx = DynamicContext("fast", plan=plan, record_usage=True)
        for t in timed:
            with torch.autocast(**amp):
                model(x[:2], torch.full((len(x[:2]),), t, device=device), y[:2], dyn=ctx)  # batch 1: one t
        return summarize(ctx.usage, spec)["flops_ratio"]

    # Token routers are calibrated inside the narrowed network (random weights make token logits depend
    # on the widths upstream), then the width level is corrected until the *measured* ratio meets the
    # target: the table labels each plan with what actually ran.
    goal, plan = target, None
    for _ in range(4):
        plan = solve_plan(goal)
        mid_t = timed[len(timed) // 2]
        calibrate_tokens_in_plan(model, x[:2], mid_t, y[:2], keep, DynamicContext("fast", plan=plan))
        r = realised(plan)
        if abs(r - target) < 0.01:
            break
        goal = min(1.0, max(0.02, goal + (target - r)))

    def run_static():  # the full network: a plain call of a dynamic model would route
        for t in timed:
            with torch.autocast(**amp):
                model(x, torch.full((B,), t, device=device), y, dyn="complete")
        _sync(device)

    ctx = DynamicContext("fast", plan=plan, record_usage=True)

    def run_dynamic():
        ctx.usage.clear()
        for t in timed:
            with torch.autocast(**amp):
                model(x, torch.full((B,), t, device=device), y, dyn=ctx)
        _sync(device)

    peak, rss = {}, {}
    for name, fn in (("static", run_static), ("dynamic", run_dynamic)):
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            fn()
            peak[name] = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak[name] = (tensor_bytes(model) + peak_allocated_bytes(fn)) / 2**20
            _release_heap()
            _reset_peak_rss()
            fn()
            rss[name] = _peak_rss_mb()
    # interleave repeats so drifts in machine load hit both sides alike
    ts, td = [], []
    for _ in range(repeats):
        ts.append(_time(run_static, 1))
        td.append(_time(run_dynamic, 1))
    t_static, t_dyn = statistics.median(ts), statistics.median(td)
    # realised FLOPs from what actually ran (token counts measured, not assumed)
    realised_run = summarize(ctx.usage, spec)
    from dydit.dynamic.report import usage_by_kind

    by_kind = {k: v["flops_ratio"] for k, v in usage_by_kind(ctx.usage, spec).items()}
    static_macs = spec.static_macs
    dynamic_macs = realised_run["gmacs_per_forward"] * 1e9
    ideal = static_macs / dynamic_macs
    speedup = t_static / t_dyn
    return EngineResult(
        model=model_name, target=target, schedule_steps=schedule_steps, timed_steps=len(timed), batch=batch,
        dtype=dtype, device=device, static_s_per_step=t_static / len(timed), dynamic_s_per_step=t_dyn / len(timed),
        speedup=speedup, ideal_speedup=ideal, efficiency=speedup / ideal, realised_ratio=realised_run["flops_ratio"],
        static_gmacs=static_macs / 1e9, dynamic_gmacs=dynamic_macs / 1e9,
        static_peak_mb=peak.get("static"), dynamic_peak_mb=peak.get("dynamic"),
        static_peak_rss_mb=rss.get("static"), dynamic_peak_rss_mb=rss.get("dynamic"),
        ratio_by_kind=by_kind, frames=frames,
    )


def tensor_bytes(model) -> int:
    """Bytes of the model's parameters and buffers (what stays allocated between passes)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def peak_allocated_bytes(fn) -> int:
    """The most bytes that ``fn()`` held allocated at once on the CPU beyond what existed before it,
    read from the profiler's allocation timeline (every tensor allocation and free, in order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def _release_heap():
    """Returns freed heap memory to the system (glibc), so each side's resident set starts level."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss():
    """Linux: writing 5 to clear_refs resets the process's peak resident set (VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_mb() -> float | None:
    """Process peak resident set since the last reset (CPU 'peak memory': weights, activations, caches)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def results_table(results: list[EngineResult]) -> str:
    kinds = any(r.ratio_by_kind and len(r.ratio_by_kind) > 1 for r in results)  # video: spatial and temporal
    head = ("| model | λ | steps | batch | dtype | static s/step | dynamic s/step | speedup | ideal | efficiency "
            "| realised ratio |" + (" ratio by block kind |" if kinds else "")
            + " peak MB static / dynamic | peak RSS MB static / dynamic |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if kinds else "") + "---|---|\n")

    def mb(v):
        return f"{v:.0f}" if v is not None else "n/a"

    def by_kind(r):
        if not kinds:
            return ""
        return " " + ", ".join(f"{k} {v:.3f}" for k, v in (r.ratio_by_kind or {}).items()) + " |"

    rows = [
        f"| {r.model}{f' ({r.frames} frames)' if r.frames else ''} | {r.target} | {r.schedule_steps} | {r.batch} | "
        f"{r.dtype} | {r.static_s_per_step:.3f} | "
        f"{r.dynamic_s_per_step:.3f} | {r.speedup:.2f}× | {r.ideal_speedup:.2f}× | {r.efficiency:.2f} | "
        f"{r.realised_ratio:.3f} |{by_kind(r)} {mb(r.static_peak_mb)} / {mb(r.dynamic_peak_mb)} | "
        f"{mb(r.static_peak_rss_mb)} / {mb(r.dynamic_peak_rss_mb)} |"
        for r in results
    ]
    return head + "\n".join(rows) + "\n"


def result_dicts(results):
    return [asdict(r) for r in results]
