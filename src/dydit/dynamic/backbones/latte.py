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

from dydit.dynamic.adapters import ModelAdapter, register_block_adapter, register_model_adapter
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


class DiffusersLatteModelAdapter(ModelAdapter):
    """diffusers ``LatteTransformer3DModel``: its blocks in execution order (spatial and temporal lists
    interleaved) and the routers' input, the embedding of t alone that ``adaln_single`` computes.

    This is what First-Block-Cache needs (:mod:`dydit.cache`). No block adapter is registered for
    diffusers' ``BasicTransformerBlock`` (shared by many diffusers models), so ``dynamize`` refuses this
    layout with a one-line error until one is written.
    """

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
    """Registers :class:`DiffusersLatteModelAdapter` (imports diffusers, which takes seconds: so not at import)."""
    from diffusers import LatteTransformer3DModel

    register_model_adapter(LatteTransformer3DModel, DiffusersLatteModelAdapter())
