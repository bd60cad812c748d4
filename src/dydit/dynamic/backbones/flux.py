"""FLUX — diffusers' ``FluxTransformer2DModel`` — through the adapter registry: DyFLUX.

The backbone is diffusers' own class (users keep their ``FluxPipeline``, scheduler, VAE and LoRAs);
these adapters only describe its blocks to the dynamic core and rewrite their computation through a
:class:`~dydit.dynamic.engine.BlockRun`.

- Double-stream blocks (``FluxTransformerBlock``, kind "double"): heads span q/k/v and the added text
  projections ``add_{q,k,v}_proj`` (rows) and both output projections ``to_out.0``/``to_add_out``
  (columns); joint attention runs over text + image tokens. MLP groups span the image ``ff``; the text
  ``ff_context`` is an optional unit (``DynamicConfig(optional_units=["mlp_context"])``). The token
  router sees the image tokens after the attention residual and gates only the image ``ff``.
- Single-stream blocks (``FluxSingleTransformerBlock``, kind "single"): attention and ``proj_mlp`` run in
  parallel and one ``proj_out`` reads [attention ; MLP], so heads and MLP groups each own one span of
  its input columns. The token router sees the block's input; a skipped image token gets no update at
  all (it still serves as key and value), text tokens always run.
- RoPE and the per-head RMS qk-norm act per head, so narrowing the head set leaves them unchanged.

Width routers see E_t = timestep embedding (+ guidance embedding), never the pooled text that diffusers
adds into ``temb``: one plan then serves every prompt, both CFG halves and the batch. The plan key is t,
or (t, guidance) for guidance-embedding models. The token router is the authors' DyFLUX router
(:class:`~dydit.dynamic.routers.TextAwareTokenRouter`): their checkpoints load as they are.
"""
from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import (FluxAttnProcessor, FluxSingleTransformerBlock,
                                                            FluxTransformer2DModel, FluxTransformerBlock)

from dydit.dynamic.adapters import (BlockAdapter, BlockSpec, GroupUnit, HeadUnit, ModelAdapter, Span,
                                    register_block_adapter, register_model_adapter)
from dydit.dynamic.context import GEOMETRY
from dydit.dynamic.routers import TextAwareTokenRouter

# Tokens per sample the FLOPs counter assumes before the model has run: FLUX.1 at 1024² (64×64 latent
# patches) with a 512-token T5 prompt. Every dynamic call records its own (image, text) counts.
DEFAULT_GEOMETRY = (4096, 512)
_FORWARD_ARGS = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids",
                 "guidance")


def token_geometry(model) -> tuple[int, int]:
    """(image tokens, text tokens) per sample of the model's last dynamic call (or the default)."""
    return model.__dict__.get(GEOMETRY, DEFAULT_GEOMETRY)


def set_token_geometry(model, image_tokens: int, text_tokens: int):
    """Sets the token counts the FLOPs counter describes (e.g. another resolution), before any call."""
    model.__dict__[GEOMETRY] = (int(image_tokens), int(text_tokens))
    return model


def _check_supported(attn, joint_attention_kwargs):
    if type(attn.processor) is not FluxAttnProcessor:
        raise TypeError(f"dynamic FLUX blocks run diffusers' FluxAttnProcessor, this one has "
                        f"{type(attn.processor).__name__}; set FluxAttnProcessor() or call the model with dyn='complete'")
    if getattr(attn, "fused_projections", False):
        raise ValueError("dynamic FLUX blocks slice to_q/to_k/to_v separately: call unfuse_qkv_projections() first")
    if joint_attention_kwargs:
        raise NotImplementedError(f"joint_attention_kwargs {sorted(joint_attention_kwargs)} are not supported by "
                                  "dynamic FLUX blocks (only the LoRA 'scale'); call the model with dyn='complete'")


def _attend(attn, q, k, v, rope):
    """Joint attention as diffusers' FluxAttnProcessor computes it. q, k, v: (B, S, h, hd) -> (B, S, h·hd)."""
    if rope is not None:
        q = apply_rotary_emb(q, rope, sequence_dim=1)
        k = apply_rotary_emb(k, rope, sequence_dim=1)
    proc = attn.processor
    o = dispatch_attention_fn(q, k, v, attn_mask=None, backend=proc._attention_backend,
                              parallel_config=proc._parallel_config)
    return o.flatten(2, 3).to(q.dtype)


def _heads(run, attn, path: str, norm, h, nh: int):
    """Projection ``path`` of h (B, S, D) as (B, S, nh, hd), qk-normed per head when ``norm`` is given."""
    out = run.linear(path, h).unflatten(-1, (nh, attn.head_dim))
    return norm(out) if norm is not None else out


class _FluxBlockAdapter(BlockAdapter):
    """Both FLUX block kinds route image tokens with the authors' text-aware router (DyFLUX)."""

    def make_token_router(self, block, spec, config):
        if config.token_count:
            raise ValueError("token_count (routing.token_count) adds a count term on the DiT block conditioning; "
                             "DyFLUX's text-aware router has no such form: turn it off")
        return TextAwareTokenRouter(spec.token_dim, spec.width_dim, config.token_bias_init, center=config.token_center)


class FluxDoubleBlockAdapter(_FluxBlockAdapter):
    def spec(self, block: FluxTransformerBlock, model) -> BlockSpec:
        Ni, Nt = token_geometry(model)
        attn = block.attn
        D, H, hd = attn.query_dim, attn.heads, attn.head_dim
        hidden = block.ff.net[0].proj.out_features
        if hidden % H:
            raise ValueError(f"MLP hidden size {hidden} is not divisible into {H} groups")
        heads = HeadUnit("attn", "attn_rate", H, hd, seq_len=Ni + Nt, spans=(
            *(Span(f"attn.to_{p}", "out", 0, Ni) for p in "qkv"),
            *(Span(f"attn.add_{p}_proj", "out", 0, Nt) for p in "qkv"),
            Span("attn.to_out.0", "in", 0, Ni), Span("attn.to_add_out", "in", 0, Nt)))
        mlp = GroupUnit("mlp", "mlp_rate", H, hidden // H, token_router="token_selection", spans=(
            Span("ff.net.0.proj", "out", 0, Ni), Span("ff.net.2", "in", 0, Ni)))
        text_mlp = GroupUnit("mlp_context", "mlp_context_rate", H, hidden // H, optional=True, spans=(
            Span("ff_context.net.0.proj", "out", 0, Nt), Span("ff_context.net.2", "in", 0, Nt)))
        return BlockSpec(heads=(heads,), groups=(mlp, text_mlp), width_dim=D, token_router="token_selection",
                         token_dim=D, num_tokens=Ni, fixed_macs=2 * D * 6 * D, kind="double")

    def forward(self, block: FluxTransformerBlock, run, hidden_states, encoder_hidden_states, temb,
                image_rotary_emb=None, joint_attention_kwargs=None):
        """hidden_states: (B, Ni, D) image tokens; encoder_hidden_states: (B, Nt, D) text; temb: (B, D)."""
        attn = block.attn
        _check_supported(attn, joint_attention_kwargs)
        x, c = hidden_states, encoder_hidden_states
        if run.skipped:
            return c, x
        nx, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(x, emb=temb)
        nc, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(c, emb=temb)
        B, Ni, Nt = x.shape[0], x.shape[1], c.shape[1]
        nh = run.num_heads("attn")
        if nh == 0:
            a_txt, a_img = c.new_zeros(B, Nt, 0), x.new_zeros(B, Ni, 0)
        else:
            q = torch.cat([_heads(run, attn, "attn.add_q_proj", attn.norm_added_q, nc, nh),
                           _heads(run, attn, "attn.to_q", attn.norm_q, nx, nh)], dim=1)  # (B, Nt+Ni, nh, hd)
            k = torch.cat([_heads(run, attn, "attn.add_k_proj", attn.norm_added_k, nc, nh),
                           _heads(run, attn, "attn.to_k", attn.norm_k, nx, nh)], dim=1)
            v = torch.cat([_heads(run, attn, "attn.add_v_proj", None, nc, nh),
                           _heads(run, attn, "attn.to_v", None, nx, nh)], dim=1)
            o = run.mask_heads("attn", _attend(attn, q, k, v, image_rotary_emb))  # (B, Nt+Ni, nh·hd)
            a_txt, a_img = o[:, :Nt], o[:, Nt:]
        x = x + run.gate_update(gate_msa.unsqueeze(1) * run.linear("attn.to_out.0", a_img.contiguous()))
        c = c + run.gate_update(c_gate_msa.unsqueeze(1) * run.linear("attn.to_add_out", a_txt.contiguous()))

        def ff_update(z, pick):  # z: the image tokens that run the MLP (all, or the kept ones)
            h = block.norm2(z) * (1 + pick(scale_mlp)) + pick(shift_mlp)
            a = run.mask_groups("mlp", run.linear("ff.net.0.proj", h))
            return pick(gate_mlp) * run.linear("ff.net.2", block.ff.net[0].gelu(a))

        # the authors' DyFLUX: the mask is taken after the attention residual, from the image tokens, the
        # conditioning and the text tokens; only the image MLP is token-routed
        x = run.token_update("mlp", x, ff_update, route=(temb, c))
        hc = block.norm2_context(c) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        ac = run.mask_groups("mlp_context", run.linear("ff_context.net.0.proj", hc))
        c = c + run.gate_update(c_gate_mlp.unsqueeze(1) * run.linear("ff_context.net.2", block.ff_context.net[0].gelu(ac)))
        if c.dtype == torch.float16:
            c = c.clip(-65504, 65504)
        return c, x


class FluxSingleBlockAdapter(_FluxBlockAdapter):
    def spec(self, block: FluxSingleTransformerBlock, model) -> BlockSpec:
        Ni, Nt = token_geometry(model)
        S = Ni + Nt
        attn = block.attn
        D, H, hd = attn.query_dim, attn.heads, attn.head_dim
        hidden = block.proj_mlp.out_features
        if hidden % H:
            raise ValueError(f"MLP hidden size {hidden} is not divisible into {H} groups")
        # proj_out reads [attention (H·hd) ; MLP (hidden)]: each unit owns one run of its input columns, and
        # only text tokens and kept image tokens pass through it
        heads = HeadUnit("attn", "attn_rate", H, hd, seq_len=S, spans=(
            *(Span(f"attn.to_{p}", "out", 0, S) for p in "qkv"), Span("proj_out", "in", 0, S, routed=Ni)))
        mlp = GroupUnit("mlp", "mlp_rate", H, hidden // H, token_router="token_selection", spans=(
            Span("proj_mlp", "out", 0, S, routed=Ni), Span("proj_out", "in", H * hd, S, routed=Ni)))
        return BlockSpec(heads=(heads,), groups=(mlp,), width_dim=D, token_router="token_selection",
                         token_dim=D, num_tokens=Ni, fixed_macs=D * 3 * D, kind="single")

    def forward(self, block: FluxSingleTransformerBlock, run, hidden_states, encoder_hidden_states, temb,
                image_rotary_emb=None, joint_attention_kwargs=None):
        """hidden_states: (B, Ni, D) image tokens; encoder_hidden_states: (B, Nt, D) text; temb: (B, D)."""
        attn = block.attn
        _check_supported(attn, joint_attention_kwargs)
        x, c = hidden_states, encoder_hidden_states
        if run.skipped:
            return c, x
        Nt = c.shape[1]
        n, gate = block.norm(torch.cat([c, x], dim=1), emb=temb)  # (B, Nt+Ni, D), (B, D)
        nh = run.num_heads("attn")
        q = _heads(run, attn, "attn.to_q", attn.norm_q, n, nh)
        k = _heads(run, attn, "attn.to_k", attn.norm_k, n, nh)
        v = _heads(run, attn, "attn.to_v", None, n, nh)
        o = run.mask_heads("attn", _attend(attn, q, k, v, image_rotary_emb))  # (B, Nt+Ni, nh·hd), all queries

        def fused(nz, oz):  # proj_out([attention ; MLP]) of normalised tokens nz and their attention output oz
            m = run.mask_groups("mlp", run.linear("proj_mlp", nz))
            return run.linear("proj_out", torch.cat([oz, block.act_mlp(m)], dim=-1))

        c = c + run.gate_update(gate.unsqueeze(1) * fused(n[:, :Nt], o[:, :Nt]))
        n_img, o_img = n[:, Nt:], o[:, Nt:]
        # the authors' DyFLUX: the mask is taken on the block input; a skipped image token gets no update
        x = run.token_update("mlp", x, lambda z, pick: pick(gate) * fused(pick(n_img), pick(o_img)),
                             route=(temb, encoder_hidden_states))
        if x.dtype == torch.float16:
            c, x = c.clip(-65504, 65504), x.clip(-65504, 65504)
        return c, x


def _arg(args, kwargs, name):
    i = _FORWARD_ARGS.index(name)
    return args[i] if len(args) > i else kwargs.get(name)


def _time_embedding(model, key: torch.Tensor) -> torch.Tensor:
    """E_t (B, D) of plan keys (B,) = t or (B, 2) = (t, guidance): diffusers' ``temb`` without the pooled text."""
    tte = model.time_text_embed
    dtype = model.x_embedder.weight.dtype
    t = key if key.ndim == 1 else key[:, 0]
    e = tte.timestep_embedder(tte.time_proj(t.to(dtype) * 1000).to(dtype))
    if key.ndim == 2:
        e = e + tte.guidance_embedder(tte.time_proj(key[:, 1].to(dtype) * 1000).to(dtype))
    return e


class FluxModelAdapter(ModelAdapter):
    def blocks(self, model: FluxTransformer2DModel):
        return [*model.transformer_blocks, *model.single_transformer_blocks]

    def geometry(self, model, args, kwargs):
        return (_arg(args, kwargs, "hidden_states").shape[1], _arg(args, kwargs, "encoder_hidden_states").shape[1])

    def router_input(self, model, args, kwargs):
        x = _arg(args, kwargs, "hidden_states")
        B = x.shape[0]
        t = torch.as_tensor(_arg(args, kwargs, "timestep"), device=x.device).reshape(-1).float().expand(B)
        g = _arg(args, kwargs, "guidance")
        if model.config.guidance_embeds:
            if g is None:
                raise ValueError("this FLUX model has a guidance embedding (guidance_embeds=True): pass guidance=")
            g = torch.as_tensor(g, device=x.device).reshape(-1).float().expand(B)
            key = torch.stack([t, g], dim=1)  # (B, 2): the routers see t and the guidance scale
        else:
            if g is not None:
                raise ValueError("this FLUX model has no guidance embedding (guidance_embeds=False): pass guidance=None")
            key = t
        return key, _time_embedding(model, key)

    def timestep_embedding(self, model, t):
        return _time_embedding(model, t)

    def router_input_modules(self, model):
        tte = model.time_text_embed
        return [m for m in (tte.timestep_embedder, getattr(tte, "guidance_embedder", None)) if m is not None]

    def other_macs(self, model):
        Ni, Nt = token_geometry(model)

        def lin(m, tokens=1):
            return tokens * sum(x.in_features * x.out_features for x in m.modules() if isinstance(x, torch.nn.Linear))

        embed = lin(model.x_embedder, Ni) + lin(model.context_embedder, Nt) + lin(model.time_text_embed)
        final = lin(model.norm_out) + lin(model.proj_out, Ni)
        return embed, final

    def num_tokens(self, model) -> int:
        return token_geometry(model)[0]


register_block_adapter(FluxTransformerBlock, FluxDoubleBlockAdapter())
register_block_adapter(FluxSingleTransformerBlock, FluxSingleBlockAdapter())
register_model_adapter(FluxTransformer2DModel, FluxModelAdapter())
