"""Analytic FLOPs accounting (paper convention: multiply-accumulates, attention matmuls included).

Generic over the routed units of the block adapters (:mod:`dydit.dynamic.adapters`): a unit's MACs are
its share of every Linear it spans times the tokens through it, plus, for attention, the QK^T and AV
matmuls quadratic in the attention length. The dynamic ratio, the FLOPs loss and every report are
computed from that description, so a new backbone adds no FLOPs code of its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dydit.dynamic.adapters import GATE, block_adapter, model_adapter, span_routed


@dataclass
class BlockFlops:
    """MACs of one transformer block for one sample at full width and all tokens."""

    attn: float  # the head units: projections + QK^T + AV (DiT: 4ND^2 + 2N^2D)
    mlp: float  # the group units over all tokens (DiT: 2 N D hidden)
    num_heads: int
    num_groups: int
    num_tokens: int
    modulation: float = 0.0  # MACs the routers never scale (adaLN linear, …)
    width_router: float = 0.0  # per sample per step (in the plan: once per step for the whole batch)
    token_router: float = 0.0  # per sample
    units: dict = field(default_factory=dict)  # routed unit name -> its MACs (attn/mlp are their sums)
    token_units: tuple = ()  # units whose tokens the token router gates
    kind: str = "block"
    # unit name -> the part of its MACs that runs only for kept tokens (scaled by the token share)
    gated: dict = field(default_factory=dict)
    unit_slots: dict = field(default_factory=dict)  # unit name -> its number of slots
    head_units: tuple = ()  # names of the head units (the rest are group units)

    def unit_macs(self, name: str, share, tokens=1.0):
        """MACs of unit ``name`` with ``share`` of its slots on and ``tokens`` of the router's tokens kept."""
        gated = self.gated.get(name, 0.0)
        return share * (self.units[name] - gated + tokens * gated)


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

    def by_kind(self) -> dict:
        """Per block kind (DiT: "block"; FLUX: "double"/"single"): count, attention and MLP MACs per
        sample, summed over the blocks of that kind."""
        out = {}
        for b in self.blocks:
            k = out.setdefault(b.kind, {"blocks": 0, "attn": 0.0, "mlp": 0.0, "modulation": 0.0})
            k["blocks"] += 1
            k["attn"] += b.attn
            k["mlp"] += b.mlp
            k["modulation"] += b.modulation
        return out


def attention_macs(N: int, D: int) -> float:
    return 4 * N * D * D + 2 * N * N * D


def mlp_macs(N: int, D: int, hidden: int) -> float:
    return 2 * N * D * hidden


def unit_macs(block, unit, gated_only: bool = False) -> float:
    """Per-sample MACs of one routed unit at full width: its share of every Linear it spans, plus the
    attention matmuls (QK^T and AV, quadratic in the attention length) for a head unit.
    ``gated_only``: only the part that runs for the token router's kept tokens alone (``Span.routed``)."""
    macs = 0
    width = unit.num_slots * unit.slot_size
    for span in unit.spans:
        linear = block.get_submodule(span.linear)
        other = linear.in_features if span.axis == "out" else linear.out_features
        macs += (span_routed(unit, span) if gated_only else span.tokens) * width * other
    if hasattr(unit, "seq_len") and not gated_only:  # attention itself sees every token
        macs += unit.instances * 2 * unit.seq_len * unit.seq_len * width
    return macs


def _linear_macs(module) -> int:
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear))


def token_router_macs(router, num_tokens: int) -> int:
    """Per-sample MACs of a token router: its per-token Linears for every token, plus the Linears it runs
    once per sample on the conditioning (``router.per_sample_modules``: DyFLUX's ``linear_t``, the count term)."""
    once = [m for name in getattr(router, "per_sample_modules", ()) if (m := getattr(router, name, None)) is not None]
    seen = {id(x) for m in once for x in m.modules()}
    per_token = sum(m.in_features * m.out_features for m in router.modules()
                    if isinstance(m, torch.nn.Linear) and id(m) not in seen)
    return num_tokens * per_token + sum(_linear_macs(m) for m in once)


def block_flops(block, spec) -> BlockFlops:
    """The FLOPs description of one block from its adapter's spec (and the routers attached to it)."""
    units = {u.name: unit_macs(block, u) for u in spec.units}
    width_router = sum(_linear_macs(getattr(block, name))
                       for name in [u.router for u in spec.units] + [GATE] if getattr(block, name, None) is not None)
    token = getattr(block, spec.token_router, None) if spec.token_router else None
    gated = {u.name: unit_macs(block, u, gated_only=True) if token is not None else 0.0 for u in spec.units}
    return BlockFlops(
        attn=sum(units[u.name] for u in spec.heads),
        mlp=sum(units[u.name] for u in spec.groups),
        num_heads=spec.heads[0].num_heads if spec.heads else 0,
        num_groups=spec.groups[0].num_groups if spec.groups else 0,
        num_tokens=spec.num_tokens,
        modulation=spec.fixed_macs,
        width_router=width_router,
        token_router=token_router_macs(token, spec.num_tokens) if token is not None else 0.0,
        units=units,
        token_units=tuple(name for name, g in gated.items() if g),
        kind=spec.kind,
        gated=gated,
        unit_slots={u.name: u.num_slots for u in spec.units},
        head_units=tuple(u.name for u in spec.heads),
    )


def flops_spec(model) -> FlopsSpec:
    """FlopsSpec of any registered backbone (static or dynamic), from its block adapters."""
    adapter = model_adapter(model)
    blocks = []
    for block in adapter.blocks(model):
        ba = block_adapter(block)
        if ba is not None:
            blocks.append(block_flops(block, ba.spec(block, model)))
    embed, final = adapter.other_macs(model)
    return FlopsSpec(blocks=blocks, embed=embed, final=final)


def static_gmacs(model) -> float:
    return flops_spec(model).static_macs / 1e9


def dynamic_ratio(spec: FlopsSpec, records, count_tokens: bool = True) -> torch.Tensor:
    """Per-sample r_b = Σ_l[(h_l/H)F_attn + (g_l/G)(n_l/N)F_mlp] / Σ_l(F_attn + F_mlp), differentiable.

    ``records`` holds one :class:`dydit.dynamic.context.BlockUsage` per routed block (masks (B, slots)
    per unit, token_mask (B, N); None = full). Every routed unit counts with its own share, its
    token-gated part (``BlockFlops.gated``) also with the kept-token share. ``count_tokens=False``: the
    width-only ratio, every token counted as kept (``flops.width_target``).
    """
    total = None
    for bf, rec in zip(spec.blocks, records):
        tokens = rec.token_mask.float().mean(1) if count_tokens and rec.token_mask is not None else 1.0
        term = None
        for name in bf.units:
            m = rec.masks.get(name)
            share = m.float().mean(1) if m is not None else 1.0
            part = bf.unit_macs(name, share, tokens)
            term = part if term is None else term + part
        total = term if total is None else total + term
    if not torch.is_tensor(total):
        total = torch.tensor(float(total))
    return total / spec.block_total


def realised_macs(spec: FlopsSpec, heads: list[int], groups: list[int], tokens: list[float],
                  units: list[dict] | None = None) -> dict:
    """MACs of one sample's forward at given per-block active heads, groups and mean kept tokens.

    ``units`` (per block: unit name -> active slots, as :class:`StepUsage.units` records them) gives
    every routed unit its own count; without it (or for a unit it leaves out) a block's head units
    take ``heads`` and its group units ``groups``. The token-gated part of each unit scales with the
    kept share of the token router's tokens. Returns the parts separately: blocks (the paper's ratio
    numerator), routers, and the rest.
    """
    blocks = 0.0
    routers = 0.0
    units = units if units is not None else [None] * len(spec.blocks)
    for bf, h, g, n, per_unit in zip(spec.blocks, heads, groups, tokens, units):
        keep = n / bf.num_tokens if bf.num_tokens else 1.0
        for name in bf.units:
            count = (per_unit or {}).get(name, h if name in bf.head_units else g)
            blocks += bf.unit_macs(name, count / bf.unit_slots[name], keep)
        routers += bf.token_router + bf.width_router
    other = spec.embed + spec.final + sum(b.modulation for b in spec.blocks)
    return {"blocks": blocks, "routers": routers, "other": other, "total": blocks + routers + other}
