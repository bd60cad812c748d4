"""Analytic FLOPs accounting (paper convention: multiply-accumulates, attention matmuls included).

Generic in tokens N, width D, heads H, depth and MLP ratio. A backbone describes itself as a list of
:class:`BlockFlops` plus the cost of its non-block parts; the dynamic ratio, the FLOPs loss and every
report are computed from that description, so Latte/FLUX only add their own description.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class BlockFlops:
    """MACs of one transformer block for one sample at full width and all tokens."""

    attn: float  # qkv + QK^T + AV + proj: 4ND^2 + 2N^2D
    mlp: float  # fc1 + fc2 over all tokens: 2 N D hidden
    num_heads: int
    num_groups: int
    num_tokens: int
    modulation: float = 0.0  # adaLN linear (not scaled by the routers)
    width_router: float = 0.0  # per sample per step (in the plan: once per step for the whole batch)
    token_router: float = 0.0  # per sample


@dataclass
class FlopsSpec:
    blocks: list[BlockFlops]
    embed: float = 0.0  # patch embedding, timestep/label embedders
    final: float = 0.0  # final adaLN + linear
    extra: dict = field(default_factory=dict)

    @property
    def block_total(self) -> float:
        return sum(b.attn + b.mlp for b in self.blocks)

    @property
    def static_macs(self) -> float:
        """Whole static forward for one sample (what the DiT paper reports as GFLOPs)."""
        return self.block_total + sum(b.modulation for b in self.blocks) + self.embed + self.final


def attention_macs(N: int, D: int) -> float:
    return 4 * N * D * D + 2 * N * N * D


def mlp_macs(N: int, D: int, hidden: int) -> float:
    return 2 * N * D * hidden


def dit_flops_spec(model) -> FlopsSpec:
    """FlopsSpec of a DiT/SiT (static or dynamic) from its config alone."""
    c = model.config
    N, D, H = c.num_tokens, c.hidden_size, c.num_heads
    hidden = int(D * c.mlp_ratio)
    dyn = getattr(model, "dynamic_config", None)
    token_hidden = D // dyn.token_hidden_ratio if dyn is not None else 0
    blocks = []
    for _ in range(c.depth):
        width_out = (H - 1 if (dyn is None or dyn.always_on) else H) if dyn is not None and dyn.width else 0
        width_out += 0.5 if dyn is not None and dyn.block_skip else 0  # one gate: D MACs, counted as 2·D·0.5
        blocks.append(
            BlockFlops(
                attn=attention_macs(N, D),
                mlp=mlp_macs(N, D, hidden),
                num_heads=H,
                num_groups=H,
                num_tokens=N,
                modulation=D * 6 * D,
                width_router=2 * D * width_out,
                token_router=(N * (D * token_hidden + token_hidden)) if dyn is not None and dyn.tokens else 0.0,
            )
        )
    p2c = c.patch_size**2 * c.in_channels
    embed = N * p2c * D + 256 * D + D * D
    final = D * 2 * D + N * D * c.patch_size**2 * c.out_channels
    return FlopsSpec(blocks=blocks, embed=embed, final=final)


def flops_spec(model) -> FlopsSpec:
    if hasattr(model, "flops_spec"):
        return model.flops_spec()
    return dit_flops_spec(model)


def static_gmacs(model) -> float:
    return flops_spec(model).static_macs / 1e9


def dynamic_ratio(spec: FlopsSpec, records) -> torch.Tensor:
    """Per-sample r_b = Σ_l[(h_l/H)F_attn + (g_l/G)(n_l/N)F_mlp] / Σ_l(F_attn + F_mlp), differentiable.

    ``records`` holds one entry per routed block with head_mask (B, H), group_mask (B, G) and
    token_mask (B, N) or None (None = full).
    """
    total = None
    for bf, rec in zip(spec.blocks, records):
        heads = rec.head_mask.float().mean(1) if rec.head_mask is not None else 1.0
        groups = rec.group_mask.float().mean(1) if rec.group_mask is not None else 1.0
        tokens = rec.token_mask.float().mean(1) if rec.token_mask is not None else 1.0
        term = heads * bf.attn + groups * tokens * bf.mlp
        total = term if total is None else total + term
    if not torch.is_tensor(total):
        total = torch.tensor(float(total))
    return total / spec.block_total


def realised_macs(spec: FlopsSpec, heads: list[int], groups: list[int], tokens: list[float]) -> dict:
    """MACs of one sample's forward at given per-block active heads, groups and mean kept tokens.

    Returns the parts separately: blocks (the paper's ratio numerator), routers, and the rest.
    """
    blocks = 0.0
    routers = 0.0
    for bf, h, g, n in zip(spec.blocks, heads, groups, tokens):
        blocks += (h / bf.num_heads) * bf.attn + (g / bf.num_groups) * (n / bf.num_tokens) * bf.mlp
        routers += bf.token_router + bf.width_router
    other = spec.embed + spec.final + sum(b.modulation for b in spec.blocks)
    return {"blocks": blocks, "routers": routers, "other": other, "total": blocks + routers + other}
