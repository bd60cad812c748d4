"""B5 engine at FLUX scale: random-weight double and single blocks at FLUX.1 width, per block kind.

A few blocks of one kind (FLUX.1: 3072 = 24 heads × 128, MLP ×4) run inside diffusers'
``FluxTransformer2DModel`` with 1024² token counts (4096 image + 512 text tokens), static and on the
fast engine with λ-shaped plans (widths narrow at high noise and vary per block, as in
:mod:`dydit.bench`; a share of the image tokens kept by each token router). Measured speedup beside the
ideal one (static MACs / realised MACs of what ran) and peak memory. Whole forwards are timed, so the
embedders and final layer are in both; with 19 double and 38 single blocks they are well under 1% of
FLUX.1's MACs, and per-block times scale linearly with the block count.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

import torch
from diffusers import FluxTransformer2DModel

from dydit.bench import _peak_rss_mb, _reset_peak_rss, _sync, _time, shaped_width
from dydit.dynamic import DynamicConfig, DynamicContext, dynamize
from dydit.dynamic.backbones.flux import set_token_geometry
from dydit.dynamic.flops import flops_spec, realised_macs
from dydit.dynamic.plan import BlockWidth, WidthPlan, time_key
from dydit.dynamic.report import summarize


@dataclass
class FluxBlockResult:
    kind: str  # "double" or "single"
    blocks: int
    width: int
    image_tokens: int
    text_tokens: int
    target: float
    batch: int
    dtype: str
    device: str
    static_s_per_block: float  # per forward, divided by the block count
    dynamic_s_per_block: float
    speedup: float
    ideal_speedup: float  # static MACs / realised MACs of the whole forward
    efficiency: float
    realised_ratio: float  # realised / static block MACs (the paper's ratio)
    static_peak_mb: float | None = None  # CUDA: max allocated; CPU: peak resident set
    dynamic_peak_mb: float | None = None


def _shaped_plan(model, spec, keys, level: float) -> WidthPlan:
    plan = WidthPlan()
    for t in keys:
        widths = []
        for layer, bf in enumerate(spec.blocks):
            H = bf.num_heads
            h, g = shaped_width(float(t), layer, len(spec.blocks), level, H)
            slots = {name: torch.arange(bf.unit_slots[name]) for name in bf.units}  # unrouted units: all
            slots.update(attn=torch.arange(h), mlp=torch.arange(g))
            widths.append(BlockWidth(slots=slots))
        plan.steps[time_key(t)] = widths
    return plan


def _plan_ratio(spec, plan, keep: float) -> float:
    ratios = []
    for widths in plan.steps.values():
        units = [{k: len(v) for k, v in w.slots.items()} for w in widths]
        m = realised_macs(spec, [len(w.heads) for w in widths], [len(w.groups) for w in widths],
                          [keep * b.num_tokens for b in spec.blocks], units)
        ratios.append(m["blocks"] / spec.block_total)
    return sum(ratios) / len(ratios)


@torch.no_grad()
def _calibrate_tokens(model, kw, keep: float, ctx):
    """One forward that sets each token router's bias so that ``keep`` of the image tokens pass, given the
    narrowed blocks upstream (later blocks see the already calibrated earlier ones)."""
    hooks = []

    def hook(linear, inputs):
        logits = torch.nn.functional.linear(inputs[0], linear.weight).float().flatten()
        linear.bias.fill_(-float(torch.quantile(logits[: 2**24], 1 - keep)))

    for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
        hooks.append(block.token_selection.router.register_forward_pre_hook(hook))
    try:
        model(**kw, dyn=ctx)
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def bench_flux_blocks(kind: str = "double", blocks: int = 2, heads: int = 24, head_dim: int = 128,
                      image_tokens: int = 4096, text_tokens: int = 512, target: float = 0.5, keep: float = 0.7,
                      batch: int = 1, steps: int = 4, repeats: int = 3, dtype: str = "bf16", device: str = "cuda",
                      seed: int = 0) -> FluxBlockResult:
    """Times ``blocks`` random-weight FLUX blocks of ``kind`` static vs on the fast engine at a ``target``-shaped
    plan over ``steps`` timesteps (defaults: FLUX.1 width and 1024² token counts)."""
    if kind not in ("double", "single"):
        raise ValueError(f"kind must be 'double' or 'single', got {kind!r}")
    torch.manual_seed(seed)
    D = heads * head_dim
    rope_t = max(2, head_dim // 16 * 2)  # FLUX.1: (16, 56, 56) for 128; every axis even
    rope_h = (head_dim - rope_t) // 4 * 2
    model = FluxTransformer2DModel(in_channels=64, num_layers=blocks if kind == "double" else 0,
                                   num_single_layers=blocks if kind == "single" else 0, attention_head_dim=head_dim,
                                   num_attention_heads=heads, joint_attention_dim=min(4096, D),
                                   pooled_projection_dim=min(768, D),
                                   axes_dims_rope=(rope_t, rope_h, head_dim - rope_t - rope_h))
    for p in model.parameters():  # non-degenerate random weights (adaLN linears start at zero elsewhere)
        p.data.normal_(0, 0.02)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    model = dynamize(model, DynamicConfig(width=True, tokens=True)).to(device, torch_dtype).eval()
    for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
        block.token_selection.router.weight.data.normal_(0, D ** -0.5)  # token-dependent logits
    side = int(image_tokens ** 0.5)
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(side)), torch.arange(float(image_tokens // side)),
                                     indexing="ij"), -1).reshape(-1, 3)
    cfg = model.config
    kw = dict(hidden_states=torch.randn(batch, image_tokens, 64).to(device, torch_dtype),
              encoder_hidden_states=torch.randn(batch, text_tokens, cfg.joint_attention_dim).to(device, torch_dtype),
              pooled_projections=torch.randn(batch, cfg.pooled_projection_dim).to(device, torch_dtype),
              img_ids=ids.to(device), txt_ids=torch.zeros(text_tokens, 3, device=device))
    keys = [round(1 - (i + 0.5) / steps, 6) for i in range(steps)]  # t from noise (1) to data (0)
    spec = flops_spec(set_token_geometry(model, image_tokens, text_tokens))
    lo, hi = 0.0, 1.5  # the width level whose plan meets the target at ``keep`` (monotone in the level)
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _plan_ratio(spec, _shaped_plan(model, spec, keys, mid), keep) < target else (lo, mid)
    plan = _shaped_plan(model, spec, keys, (lo + hi) / 2)

    def step(t):  # fp32 timesteps, so the plan keys are the shaped plan's (diffusers casts them itself)
        return dict(kw, timestep=torch.full((batch,), t, device=device))

    _calibrate_tokens(model, step(keys[len(keys) // 2]), keep, DynamicContext("fast", plan=plan))
    ctx = DynamicContext("fast", plan=plan, record_usage=True)

    def run_static():
        for t in keys:
            model(**step(t), dyn="complete")
        _sync(device)

    def run_dynamic():
        ctx.usage.clear()
        for t in keys:
            model(**step(t), dyn=ctx)
        _sync(device)

    peak = {}
    for name, fn in (("static", run_static), ("dynamic", run_dynamic)):
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        else:
            _reset_peak_rss()
        fn()
        peak[name] = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else _peak_rss_mb()
    ts, td = [], []
    for _ in range(repeats):  # interleaved, so drifts in machine load hit both sides alike
        ts.append(_time(run_static, 1))
        td.append(_time(run_dynamic, 1))
    t_static, t_dyn = statistics.median(ts), statistics.median(td)
    realised = summarize(ctx.usage, spec)
    ideal = spec.static_macs / (realised["gmacs_per_forward"] * 1e9)
    per = len(keys) * blocks
    return FluxBlockResult(kind=kind, blocks=blocks, width=D, image_tokens=image_tokens, text_tokens=text_tokens,
                           target=target, batch=batch, dtype=dtype, device=device, static_s_per_block=t_static / per,
                           dynamic_s_per_block=t_dyn / per, speedup=t_static / t_dyn, ideal_speedup=ideal,
                           efficiency=(t_static / t_dyn) / ideal, realised_ratio=realised["flops_ratio"],
                           static_peak_mb=peak.get("static"), dynamic_peak_mb=peak.get("dynamic"))


def flux_results_table(results: list[FluxBlockResult]) -> str:
    head = ("| block kind | blocks | width | tokens (image + text) | λ | batch | dtype | static s/block | dynamic s/block "
            "| speedup | ideal | efficiency | realised ratio | peak MB static / dynamic |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")

    def mb(v):
        return f"{v:.0f}" if v is not None else "n/a"

    return head + "\n".join(
        f"| {r.kind} | {r.blocks} | {r.width} | {r.image_tokens} + {r.text_tokens} | {r.target} | {r.batch} | {r.dtype} | "
        f"{r.static_s_per_block:.4f} | {r.dynamic_s_per_block:.4f} | {r.speedup:.2f}× | {r.ideal_speedup:.2f}× | "
        f"{r.efficiency:.2f} | {r.realised_ratio:.3f} | {mb(r.static_peak_mb)} / {mb(r.dynamic_peak_mb)} |"
        for r in results) + "\n"


def flux_result_dicts(results):
    return [asdict(r) for r in results]
