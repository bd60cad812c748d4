"""Token compaction for the fast path: the kept tokens of the whole batch as one matrix, and back.

(Weight restriction is generic too: :func:`dydit.dynamic.adapters.linear_index` gives a Linear's kept
rows/columns from the units that span it, and :class:`dydit.dynamic.plan.SlicedWeights` caches them.)
"""
from __future__ import annotations

import torch


def gather_tokens(x: torch.Tensor, token_mask: torch.Tensor):
    """Selected tokens of the whole batch as one (M, D) matrix, plus flat and per-sample indices.

    No padding: any mix of per-sample counts, CFG halves included.
    """
    B, N, D = x.shape
    flat_idx = token_mask.reshape(-1).nonzero().squeeze(1)  # (M,)
    return x.reshape(B * N, D).index_select(0, flat_idx), flat_idx, torch.div(flat_idx, N, rounding_mode="floor")


def scatter_add_tokens(x: torch.Tensor, flat_idx: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """x (B, N, D) with ``update`` (M, D) added at the gathered positions (out of place)."""
    B, N, D = x.shape
    return x.reshape(B * N, D).index_add(0, flat_idx, update.to(x.dtype)).view(B, N, D)
