"""Dynamic forward of an adaLN-Zero transformer block (DiT, SiT; Latte's spatial and temporal blocks).

``masked``/``train`` modes compute everything and multiply by router masks (the reference the authors
released); ``fast`` runs narrower matmuls with the plan's sliced weights and sends only the selected
tokens of the whole batch through the MLP.
"""
from __future__ import annotations

import torch

from dydit.dynamic.ops import gather_tokens, masked_heads, masked_mlp, scatter_add_tokens, sliced_attention, sliced_mlp
from dydit.models.layers import modulate


def dynamic_block_forward(block, x, c, t_emb, dyn):
    """x: (B, N, D) tokens; c: (B, D) conditioning; t_emb: (B, D) router input."""
    i = dyn.next_block()
    cfg = dyn.dynamic_config
    width = cfg.width and block.attn_rate is not None
    tokens = cfg.tokens and block.token_selection is not None
    gated = block.block_gate is not None
    H = block.attn.num_heads
    if dyn.mode == "fast" and gated and len(dyn.step_width[i].heads) == 0:  # block skipped at this step
        if dyn.record_usage:
            dyn.record_fast(i, 0, 0, 0)
        return x
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.adaLN_modulation(c).chunk(6, dim=1)
    h = modulate(block.norm1(x), shift_msa, scale_msa)

    if dyn.mode == "fast":
        bw = dyn.step_width[i]
        # weight providers that depend on t (merged TD-LoRA) are used even at full width
        always = getattr(dyn.weights, "always_slice", False)
        if always or (width and len(bw.heads) < H):
            qkv_w, qkv_b, proj_w, proj_b = dyn.weights.attention(block, bw.heads)
            attn_out = sliced_attention(h, qkv_w, qkv_b, proj_w, proj_b, len(bw.heads), block.attn.head_dim)
        else:
            attn_out = block.attn(h)
        x = x + gate_msa.unsqueeze(1) * attn_out
        narrow_mlp = always or (width and len(bw.groups) < H)
        if narrow_mlp:
            fc1_w, fc1_b, fc2_w, fc2_b = dyn.weights.mlp(block, bw.groups, H)
            mlp = lambda z: sliced_mlp(z, fc1_w, fc1_b, fc2_w, fc2_b, block.mlp.act)  # noqa: E731
        else:
            mlp = block.mlp
        if tokens:
            keep = block.token_selection.logits(x) > 0  # (B, N)
            xs, flat_idx, sample_idx = gather_tokens(x, keep)  # (M, D)
            hs = block.norm2(xs) * (1 + scale_mlp.index_select(0, sample_idx)) + shift_mlp.index_select(0, sample_idx)
            update = mlp(hs) * gate_mlp.index_select(0, sample_idx)
            x = scatter_add_tokens(x, flat_idx, update)
            kept = flat_idx.numel()
        else:
            x = x + gate_mlp.unsqueeze(1) * mlp(modulate(block.norm2(x), shift_mlp, scale_mlp))
            kept = x.shape[0] * x.shape[1]
        if dyn.record_usage:
            dyn.record_fast(i, len(bw.heads) if width else H, len(bw.groups) if width else H, kept)
        return x

    training = dyn.mode == "train"
    head_mask = block.attn_rate(t_emb, dyn.tau, training, dyn.noise) if width else None
    run = block.block_gate(t_emb, dyn.tau, training, dyn.noise) if gated else None  # (B, 1)
    heads = block.attn.heads(h)
    if head_mask is not None:
        heads = masked_heads(heads, head_mask, H)
    attn_update = gate_msa.unsqueeze(1) * block.attn.proj(heads)
    x = x + (attn_update * run.unsqueeze(-1).to(attn_update.dtype) if run is not None else attn_update)
    token_mask = block.token_selection(x, dyn.tau, training, dyn.noise) if tokens else None
    group_mask = block.mlp_rate(t_emb, dyn.tau, training, dyn.noise) if width else None
    hm = modulate(block.norm2(x), shift_mlp, scale_mlp)
    mlp_out = masked_mlp(block.mlp, hm, group_mask) if group_mask is not None else block.mlp(hm)
    update = gate_mlp.unsqueeze(1) * mlp_out
    if token_mask is not None:
        update = update * token_mask.unsqueeze(-1).to(update.dtype)
    if run is not None:  # the FLOPs accounting sees a skipped block as zero heads and zero groups
        update = update * run.unsqueeze(-1).to(update.dtype)
        ones = torch.ones(len(run), H, device=run.device, dtype=run.dtype)
        head_mask = (head_mask if head_mask is not None else ones) * run
        group_mask = (group_mask if group_mask is not None else ones) * run
    dyn.record(head_mask, group_mask, token_mask)
    return x + update
