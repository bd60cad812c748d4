"""DyLatte: Latte through the adapter registry (the DyDiT++ video extension, METHOD.md §6).

Both block kinds are DiT's adaLN-Zero block, so both reuse :class:`DiTBlockAdapter`'s units and dynamic
forward unchanged; only the token geometry differs. Per video sample of F frames × N patches:

- spatial blocks attend within each frame: F attention instances of length N (QK^T, AV ∝ F·N²);
- temporal blocks attend across frames at each position: N instances of length F (∝ N·F²);
- every linear (qkv, proj, fc1, fc2) sees all F·N tokens; the adaLN modulation runs once per row of
  the repeated conditioning (F rows for spatial blocks, N for temporal ones), as in the official code.

TDW: the width routers of every block see E_t only, so one plan serves the whole batch, both CFG halves
and every frame and position (the masks are repeated over the rows a sample spans: ``repeat=``).
SDT: the token router of every block gates which spatio-temporal tokens run its MLP.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dydit.dynamic.adapters import (BlockAdapter, BlockSpec, GroupUnit, HeadUnit, ModelAdapter, Span,
                                    register_block_adapter, register_model_adapter)
from dydit.dynamic.backbones.dit import DiTBlockAdapter
from dydit.models.latte import Latte, SpatialBlock, TemporalBlock


class LatteSpatialAdapter(DiTBlockAdapter):
    kind = "spatial"

    def geometry(self, block, model: Latte):
        c = model.config
        return c.num_tokens, c.num_frames, c.num_patches  # F instances of length N


class LatteTemporalAdapter(DiTBlockAdapter):
    kind = "temporal"

    def geometry(self, block, model: Latte):
        c = model.config
        return c.num_tokens, c.num_patches, c.num_frames  # N instances of length F


class LatteModelAdapter(ModelAdapter):
    def blocks(self, model: Latte):
        return list(model.blocks)  # execution order: spatial, temporal, spatial, ...

    def router_input(self, model: Latte, args, kwargs):
        x = args[0] if args else kwargs["x"]
        t = args[1] if len(args) > 1 else kwargs["t"]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        return t, model.t_embedder(t)

    def router_input_modules(self, model: Latte):
        return [model.t_embedder]

    def timestep_embedding(self, model: Latte, t):
        return model.t_embedder(t)

    def other_macs(self, model: Latte):
        c = model.config
        F, N, D, p = c.num_frames, c.num_patches, c.hidden_size, c.patch_size
        embed = F * N * p**2 * c.in_channels * D + 256 * D + D * D
        final = F * D * 2 * D + F * N * D * p**2 * c.out_channels  # adaLN once per frame row, as computed
        return embed, final

    def num_tokens(self, model: Latte) -> int:
        return model.config.num_tokens


register_block_adapter(SpatialBlock, LatteSpatialAdapter())
register_block_adapter(TemporalBlock, LatteTemporalAdapter())
register_model_adapter(Latte, LatteModelAdapter())


class DiffusersLatteBlockAdapter(BlockAdapter):
    """diffusers' ``BasicTransformerBlock`` in the configuration ``LatteTransformer3DModel`` builds
    (adaLN-single modulation, self-attention ``attn1``, optional caption cross-attention ``attn2`` in the
    spatial blocks, GELU feed-forward ``ff``), routed like DiT: heads over ``attn1``'s to_q/to_k/to_v rows
    and to_out columns, MLP groups over ``ff.net.0.proj`` rows and ``ff.net.2`` columns, a token router on
    the tokens entering the feed-forward. The cross-attention runs dense (its keys are the caption's).

    ``BasicTransformerBlock`` is shared by many diffusers models; this adapter only ever runs for blocks a
    registered model adapter lists (only diffusers' Latte here), and :meth:`spec` refuses any other
    configuration of the block by name.
    """

    def _check(self, block):
        a = block.attn1
        problems = [
            (block.norm_type == "ada_norm_single", f"norm_type {block.norm_type!r} (only 'ada_norm_single')"),
            (block.pos_embed is None and not block.only_cross_attention and block.fuser is None if
             hasattr(block, "fuser") else block.pos_embed is None and not block.only_cross_attention,
             "positional embeddings, only_cross_attention or GLIGEN"),
            (isinstance(block.ff.net[0], _gelu_class()), f"feed-forward {type(block.ff.net[0]).__name__} (only GELU)"),
            (a.norm_q is None and a.norm_k is None and not a.residual_connection and a.rescale_output_factor == 1.0
             and a.spatial_norm is None and a.group_norm is None, "attn1 with q/k norms, residuals or rescaling"),
            (block._chunk_size is None, "chunked feed-forward"),
        ]
        bad = [why for ok, why in problems if not ok]
        if bad:
            raise ValueError(f"dydit's DyLatte adapter does not cover this BasicTransformerBlock: {'; '.join(bad)}")

    def spec(self, block, model) -> BlockSpec:
        self._check(block)
        c = model.config
        F_, N = c.video_length, (c.sample_size // c.patch_size) ** 2
        temporal = any(b is block for b in model.temporal_transformer_blocks)
        tokens, instances, seq_len = F_ * N, (N if temporal else F_), (F_ if temporal else N)
        a = block.attn1
        D, H = a.to_q.in_features, a.heads
        hd = a.to_q.out_features // H
        hidden = block.ff.net[2].in_features
        if hidden % H:
            raise ValueError(f"feed-forward width {hidden} is not divisible into {H} groups")
        heads = HeadUnit("attn", "attn_rate", H, hd, seq_len=seq_len, instances=instances, spans=(
            Span("attn1.to_q", "out", 0, tokens), Span("attn1.to_k", "out", 0, tokens),
            Span("attn1.to_v", "out", 0, tokens), Span("attn1.to_out.0", "in", 0, tokens)))
        groups = GroupUnit("mlp", "mlp_rate", H, hidden // H, token_router="token_selection", spans=(
            Span("ff.net.0.proj", "out", 0, tokens), Span("ff.net.2", "in", 0, tokens)))
        # dense cross-attention: q and out projections of every token (the caption's k/v and the attention
        # matmuls depend on its length, which the config does not fix, and are not counted)
        fixed = 0 if block.attn2 is None else tokens * (block.attn2.to_q.in_features * block.attn2.to_q.out_features
                                                        + block.attn2.to_out[0].in_features * D)
        return BlockSpec(heads=(heads,), groups=(groups,), width_dim=D, token_router="token_selection",
                         token_dim=D, num_tokens=tokens, fixed_macs=fixed,
                         kind="temporal" if temporal else "spatial")

    def forward(self, block, run, hidden_states, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, timestep=None, cross_attention_kwargs=None, class_labels=None,
                added_cond_kwargs=None):
        """hidden_states: (B·r, S, D), r rows per sample; timestep: (B·r, 6D) adaLN-single modulation."""
        if attention_mask is not None:
            raise ValueError("DyLatte's diffusers blocks take no self-attention mask (Latte passes none)")
        x = hidden_states
        repeat = x.shape[0] // run.samples
        if run.skipped:
            return x
        rows, S, _ = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            block.scale_shift_table[None] + timestep.reshape(rows, 6, -1)).chunk(6, dim=1)  # each (B·r, 1, D)
        h = block.norm1(x) * (1 + scale_msa) + shift_msa
        a = block.attn1
        nh, hd = run.num_heads("attn"), a.to_q.out_features // a.heads
        if nh == 0:
            attn_out = run.linear("attn1.to_out.0", h.new_zeros(rows, S, 0))
        else:
            q, k, v = (run.linear(f"attn1.to_{n}", h).view(rows, S, nh, hd).transpose(1, 2) for n in "qkv")
            o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(rows, S, nh * hd)
            attn_out = run.linear("attn1.to_out.0", run.mask_heads("attn", o, repeat))
        x = x + run.gate_update(gate_msa * attn_out, repeat)
        if block.attn2 is not None:  # the caption cross-attention: dense, on the un-normalised stream (PixArt)
            x = x + block.attn2(x, encoder_hidden_states=encoder_hidden_states,
                                attention_mask=encoder_attention_mask, **(cross_attention_kwargs or {}))
        act = block.ff.net[0]

        def ff_update(z, pick):  # z: the tokens that run the feed-forward; pick aligns per-row tensors with them
            sc, sh, g = (pick(v[:, 0]) for v in (scale_mlp, shift_mlp, gate_mlp))  # (B·r, 1, D) or (M, D)
            hz = block.norm2(z) * (1 + sc) + sh
            u = run.mask_groups("mlp", run.linear("ff.net.0.proj", hz), repeat)
            return g * run.linear("ff.net.2", act.gelu(u))

        return run.token_update("mlp", x, ff_update, repeat)


def _gelu_class():
    from diffusers.models.activations import GELU

    return GELU


class DiffusersLatteModelAdapter(ModelAdapter):
    """diffusers ``LatteTransformer3DModel``: its blocks in execution order (spatial and temporal lists
    interleaved) and the routers' input, the embedding of t alone that ``adaln_single`` computes (the
    caption never changes the width)."""

    def blocks(self, model):
        return [b for pair in zip(model.transformer_blocks, model.temporal_transformer_blocks) for b in pair]

    def router_input(self, model, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        return t, self.timestep_embedding(model, t)

    def timestep_embedding(self, model, t):
        emb = model.adaln_single.emb
        return emb(t, resolution=None, aspect_ratio=None, batch_size=len(t), hidden_dtype=model.proj_out.weight.dtype)

    def router_input_modules(self, model):
        return [model.adaln_single.emb]

    def num_tokens(self, model) -> int:
        c = model.config
        return c.video_length * (c.sample_size // c.patch_size) ** 2


def register_diffusers_latte() -> None:
    """Registers the diffusers Latte adapters (imports diffusers, which takes seconds: so not at import)."""
    from diffusers import LatteTransformer3DModel
    from diffusers.models.attention import BasicTransformerBlock

    register_model_adapter(LatteTransformer3DModel, DiffusersLatteModelAdapter())
    register_block_adapter(BasicTransformerBlock, DiffusersLatteBlockAdapter())
