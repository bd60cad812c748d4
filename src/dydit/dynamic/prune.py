"""Static magnitude width pruning: the B3 baseline that spends the same FLOPs at every timestep.

It keeps, in every block, the ``k_h`` most important heads and ``k_g`` most important MLP channel groups
(the paper's magnitude ranking, :func:`reorder_by_importance`), chosen so the routed-block FLOPs ratio
is as close to λ as the head/group granularity allows. It is expressed as a DyDiT with constant,
frozen width routers and no token routers, so the pruned network runs on the same engine (the plan is
the same narrow width at every step) and is fine-tuned by the same loop as DyDiT: the comparison then
measures what *dynamic* allocation buys, nothing else.
"""
from __future__ import annotations

import torch

from dydit.dynamic.config import DynamicConfig
from dydit.dynamic.convert import dynamize, router_parameters
from dydit.dynamic.flops import flops_spec

_ON = 30.0  # router bias far beyond the reach of the gumbel noise: the mask is constant in training too


def choose_widths(model, target: float) -> tuple[int, int, float]:
    """(heads kept, groups kept, resulting ratio) per block closest to ``target``."""
    b = flops_spec(model).blocks[0]
    H, G = b.num_heads, b.num_groups
    best = None
    for kh in range(1, H + 1):
        for kg in range(1, G + 1):
            r = (kh / H * b.attn + kg / G * b.mlp) / (b.attn + b.mlp)
            cand = (abs(r - target), -kh - kg, kh, kg, r)
            best = cand if best is None or cand < best else best
    return best[2], best[3], best[4]


@torch.no_grad()
def static_width_prune(model, target: float, reorder: bool = True):
    """Prunes a static DiT/SiT in place to FLOPs ratio ≈ ``target``; returns ``(model, info)``."""
    if getattr(model, "dynamic_config", None) is not None:
        raise ValueError("static pruning starts from a static model; pass the base checkpoint")
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target must be in (0, 1], got {target}")
    dynamize(model, DynamicConfig(width=True, tokens=False, always_on=True), reorder=reorder)
    kh, kg, ratio = choose_widths(model, target)
    for block in model.blocks:
        for router, k in ((block.attn_rate, kh), (block.mlp_rate, kg)):
            router.router.weight.zero_()
            bias = torch.full_like(router.router.bias, -_ON)
            bias[: k - 1] = _ON  # slot 0 is always on; router outputs are slots 1..H-1
            router.router.bias.copy_(bias)
    for p in router_parameters(model):
        p.requires_grad_(False)
    return model, {"heads_kept": kh, "groups_kept": kg, "flops_ratio": ratio, "target": target}
