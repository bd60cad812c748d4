"""The inference plan: per sampler timestep, per block, which heads and MLP channel groups run.

Width routers see only the timestep embedding, so the whole plan is known before sampling starts.
Sliced weights for each distinct active set are cached (memory-bounded) and shared by every step that
uses the same set, so a step runs a static, narrower network.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dydit.dynamic.ops import group_rows, head_rows, qkv_rows


@dataclass
class BlockWidth:
    heads: torch.Tensor  # (h,) active head ids, ascending
    groups: torch.Tensor  # (g,) active MLP channel-group ids, ascending

    def key(self):
        return tuple(self.heads.tolist()), tuple(self.groups.tolist())


def time_key(t: float) -> float:
    return round(float(t), 6)


class WidthPlan:
    """Maps a model-unit timestep to one :class:`BlockWidth` per routed block."""

    def __init__(self):
        self.steps: dict[float, list[BlockWidth]] = {}

    @torch.no_grad()
    def compute(self, model, timesteps) -> "WidthPlan":
        """Evaluates every block's width routers at each timestep (one batched call per block)."""
        ts = torch.as_tensor(list(timesteps), dtype=torch.float32, device=next(model.parameters()).device)
        new = [t for t in ts.tolist() if time_key(t) not in self.steps]
        if not new:
            return self
        t_emb = model.t_embedder(torch.tensor(new, device=ts.device))  # (T, D)
        per_block = []
        for block in routed_blocks(model):
            H = block.attn.num_heads
            if block.attn_rate is not None and model.dynamic_config.width:
                hm = block.attn_rate(t_emb, training=False) > 0.5  # (T, H)
                gm = block.mlp_rate(t_emb, training=False) > 0.5
            else:
                hm = torch.ones(len(new), H, dtype=torch.bool, device=ts.device)
                gm = hm
            if getattr(block, "block_gate", None) is not None:  # skipped block: no heads, no groups
                run = block.block_gate(t_emb, training=False) > 0.5  # (T, 1)
                hm, gm = hm & run, gm & run
            per_block.append((hm, gm))
        for i, t in enumerate(new):
            self.steps[time_key(t)] = [
                BlockWidth(hm[i].nonzero().squeeze(1).cpu(), gm[i].nonzero().squeeze(1).cpu()) for hm, gm in per_block
            ]
        return self

    def get(self, model, t: float) -> list[BlockWidth]:
        k = time_key(t)
        if k not in self.steps:
            self.compute(model, [t])
        return self.steps[k]


def routed_blocks(model):
    return [b for b in model.modules() if getattr(b, "is_dynamic", False) is True]


@dataclass
class _Cache:
    max_bytes: int
    used: int = 0
    entries: dict = field(default_factory=dict)


class SlicedWeights:
    """Cache of narrowed weights keyed by (block, active set); falls back to slicing per call when
    the cache would exceed ``max_bytes`` (weights are then gathered on the fly, nothing is kept)."""

    def __init__(self, max_bytes: int = 2 * 1024**3):
        self.cache = _Cache(max_bytes)

    def _store(self, key, tensors):
        size = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        if self.cache.used + size <= self.cache.max_bytes:
            self.cache.entries[key] = tensors
            self.cache.used += size
        return tensors

    def attention(self, block, heads: torch.Tensor):
        attn = block.attn
        key = (id(block), "attn", tuple(heads.tolist()))
        hit = self.cache.entries.get(key)
        if hit is not None:
            return hit
        D = attn.qkv.in_features
        dev = attn.qkv.weight.device
        heads = heads.to(dev)
        rows = qkv_rows(heads, attn.head_dim, D)
        cols = head_rows(heads, attn.head_dim)
        qkv_b = attn.qkv.bias.index_select(0, rows) if attn.qkv.bias is not None else None
        return self._store(
            key,
            (
                attn.qkv.weight.index_select(0, rows).contiguous(),
                qkv_b,
                attn.proj.weight.index_select(1, cols).contiguous(),
                attn.proj.bias,
            ),
        )

    def mlp(self, block, groups: torch.Tensor, num_groups: int):
        mlp = block.mlp
        key = (id(block), "mlp", tuple(groups.tolist()))
        hit = self.cache.entries.get(key)
        if hit is not None:
            return hit
        dev = mlp.fc1.weight.device
        rows = group_rows(groups.to(dev), mlp.fc1.out_features // num_groups)
        return self._store(
            key,
            (
                mlp.fc1.weight.index_select(0, rows).contiguous(),
                mlp.fc1.bias.index_select(0, rows),
                mlp.fc2.weight.index_select(1, rows).contiguous(),
                mlp.fc2.bias,
            ),
        )

    def clear(self):
        self.cache = _Cache(self.cache.max_bytes)
