"""DiT / SiT through the adapter registry: one routed attention, one routed MLP, tokens through the MLP.

The units are those of the authors' DyDiT: heads span the fused qkv rows (q, k and v blocks of D rows)
and the output projection's columns (router ``attn_rate``); MLP channel groups span fc1's rows and
fc2's columns (``mlp_rate``); the token router ``token_selection`` sees the tokens after the attention
update and gates which of them run the MLP. The width routers see E_t, the timestep embedding.
"""
from __future__ import annotations

import torch.nn.functional as F

from dydit.dynamic.adapters import (BlockAdapter, BlockSpec, GroupUnit, HeadUnit, ModelAdapter, Span,
                                    register_block_adapter, register_model_adapter)
from dydit.models.dit import DiT, DiTBlock
from dydit.models.layers import modulate


class DiTBlockAdapter(BlockAdapter):
    """The adaLN-Zero block's units and dynamic forward; Latte's spatial/temporal blocks reuse both with
    their own token geometry (:meth:`geometry`) and their frames or positions folded into the batch."""

    kind = "block"
    token_conditioning = True  # forward passes c to the token router

    def geometry(self, block: DiTBlock, model) -> tuple[int, int, int]:
        """(tokens per sample, attention instances per sample, attention length) of ``block``."""
        N = model.config.num_tokens
        return N, 1, N

    def spec(self, block: DiTBlock, model: DiT) -> BlockSpec:
        tokens, instances, seq_len = self.geometry(block, model)
        D = block.attn.qkv.in_features
        H, hd = block.attn.num_heads, block.attn.head_dim
        hidden = block.mlp.fc1.out_features
        if hidden % H:
            raise ValueError(f"MLP hidden size {hidden} is not divisible into {H} groups")
        heads = HeadUnit("attn", "attn_rate", H, hd, seq_len=seq_len, instances=instances, spans=(
            Span("attn.qkv", "out", 0, tokens), Span("attn.qkv", "out", D, tokens),
            Span("attn.qkv", "out", 2 * D, tokens), Span("attn.proj", "in", 0, tokens)))
        groups = GroupUnit("mlp", "mlp_rate", H, hidden // H, token_router="token_selection", spans=(
            Span("mlp.fc1", "out", 0, tokens), Span("mlp.fc2", "in", 0, tokens)))
        # adaLN modulation runs once per row of c: once per sample in DiT, once per attention instance
        # (frame or position) in Latte, whose c is repeated per row as in the official code
        return BlockSpec(heads=(heads,), groups=(groups,), width_dim=D, token_router="token_selection",
                         token_dim=D, num_tokens=tokens, fixed_macs=instances * D * 6 * D, kind=self.kind)

    def forward(self, block: DiTBlock, run, x, c):
        """x: (B·r, N, D) tokens, r rows per sample (DiT: 1); c: (B·r, D) conditioning, one row per x row."""
        repeat = x.shape[0] // run.samples
        if run.skipped:
            return x
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.adaLN_modulation(c).chunk(6, dim=1)
        # the attention's intermediates live only inside _attention, so they are freed before the MLP runs
        # (as the static block's temporaries are): the dynamic block's peak memory stays at the static one's
        attn_out = _attention(block, run, modulate(block.norm1(x), shift_msa, scale_msa), repeat)
        x = x + run.gate_update(gate_msa.unsqueeze(1) * attn_out, repeat)
        del attn_out

        def mlp_update(z, pick):  # z: the tokens that run the MLP; pick(v) aligns per-row tensors with them
            # rebinding `a` frees each intermediate as soon as the next exists, as the static Mlp does
            a = block.norm2(z) * (1 + pick(scale_mlp)) + pick(shift_mlp)  # modulated tokens
            a = run.linear("mlp.fc1", a)
            a = block.mlp.act(run.mask_groups("mlp", a, repeat))
            return pick(gate_mlp) * run.linear("mlp.fc2", a)

        return run.token_update("mlp", x, mlp_update, repeat, route=(c,))  # c: for a router's count term


def _attention(block: DiTBlock, run, h, repeat: int = 1):
    """The routed attention's output projection of h: (B·repeat, N, D), ``repeat`` rows per sample."""
    B, N, _ = h.shape
    nh, hd = run.num_heads("attn"), block.attn.head_dim
    if nh == 0:
        return run.linear("attn.proj", h.new_zeros(B, N, 0))
    qkv = run.linear("attn.qkv", h).view(B, N, 3, nh, hd).permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, h, N, hd)
    del qkv
    return run.linear("attn.proj", run.mask_heads("attn", o.transpose(1, 2).reshape(B, N, nh * hd), repeat))


class DiTModelAdapter(ModelAdapter):
    def blocks(self, model: DiT):
        return list(model.blocks)

    def router_input(self, model: DiT, args, kwargs):
        from dydit.models.inputs import check_inputs

        x = args[0] if args else kwargs["x"]
        t = args[1] if len(args) > 1 else kwargs["t"]
        y = args[2] if len(args) > 2 else kwargs.get("y")
        t = check_inputs(model.config, x, t, y)  # before the routers read t
        return t, model.t_embedder(t)

    def router_input_modules(self, model: DiT):
        return [model.t_embedder]

    def timestep_embedding(self, model: DiT, t):
        return model.t_embedder(t)

    def other_macs(self, model: DiT):
        c = model.config
        N, D = c.num_tokens, c.hidden_size
        embed = N * c.patch_size**2 * c.in_channels * D + 256 * D + D * D
        final = D * 2 * D + N * D * c.patch_size**2 * c.out_channels
        return embed, final

    def num_tokens(self, model: DiT) -> int:
        return model.config.num_tokens


register_block_adapter(DiTBlock, DiTBlockAdapter())
register_model_adapter(DiT, DiTModelAdapter())
