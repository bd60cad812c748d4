"""Backbone-agnostic dynamic operators: the masked reference and the fast (sliced / gathered) path.

Every backbone with multi-head attention (a fused or split q/k/v projection followed by an output
projection) and a two-layer MLP uses these, so DiT, SiT, Latte and FLUX share one implementation.
Weight layouts are torch's Linear: (out_features, in_features).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# masked reference (training and the equality oracle): full compute, multiply by 0/1
# ---------------------------------------------------------------------------------------------


def masked_heads(head_outputs: torch.Tensor, head_mask: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Concatenated head outputs (B, N, D) times a per-sample head mask (B, H)."""
    B, N, D = head_outputs.shape
    out = head_outputs.view(B, N, num_heads, D // num_heads) * head_mask[:, None, :, None].to(head_outputs.dtype)
    return out.reshape(B, N, D)


def masked_mlp(mlp, h: torch.Tensor, group_mask: torch.Tensor) -> torch.Tensor:
    """fc1 -> mask groups (before the activation, act(0) = 0) -> act -> fc2; group_mask (B, G)."""
    a = mlp.fc1(h)  # (B, N, hidden)
    B, N, hidden = a.shape
    G = group_mask.shape[1]
    a = (a.view(B, N, G, hidden // G) * group_mask[:, None, :, None].to(a.dtype)).reshape(B, N, hidden)
    return mlp.fc2(mlp.act(a))


# ---------------------------------------------------------------------------------------------
# index helpers for the fast path
# ---------------------------------------------------------------------------------------------


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Active head ids (h,) -> row/column indices (h*hd,) into a D-wide projection."""
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)[None]).reshape(-1)


def qkv_rows(heads: torch.Tensor, head_dim: int, dim: int) -> torch.Tensor:
    """Row indices of a fused (3D, D) qkv weight for the active heads, q then k then v."""
    r = head_rows(heads, head_dim)
    return torch.cat([r, r + dim, r + 2 * dim])


def group_rows(groups: torch.Tensor, group_size: int) -> torch.Tensor:
    return (groups[:, None] * group_size + torch.arange(group_size, device=groups.device)[None]).reshape(-1)


# ---------------------------------------------------------------------------------------------
# fast path: genuinely narrower matmuls
# ---------------------------------------------------------------------------------------------


def sliced_attention(h: torch.Tensor, qkv_w, qkv_b, proj_w, proj_b, num_active: int, head_dim: int):
    """Attention with only the active heads: qkv_w (3*h*hd, D), proj_w (D, h*hd); h: (B, N, D)."""
    B, N, _ = h.shape
    if num_active == 0:
        return proj_b.to(h.dtype).expand(B, N, -1)
    qkv = F.linear(h, qkv_w, qkv_b).view(B, N, 3, num_active, head_dim).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, h, N, hd)
    return F.linear(out.transpose(1, 2).reshape(B, N, num_active * head_dim), proj_w, proj_b)


def sliced_mlp(h: torch.Tensor, fc1_w, fc1_b, fc2_w, fc2_b, act) -> torch.Tensor:
    """MLP restricted to the active hidden channels; h: (..., D)."""
    if fc1_w.shape[0] == 0:
        return fc2_b.to(h.dtype).expand(*h.shape[:-1], -1)
    return F.linear(act(F.linear(h, fc1_w, fc1_b)), fc2_w, fc2_b)


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
