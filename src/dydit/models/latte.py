"""Latte: the class-conditional video Diffusion Transformer of the Latte repository (``models/latte.py``).

Latte is a DiT fork: its blocks are exactly DiT's adaLN-Zero blocks (:class:`dydit.models.dit.DiTBlock`,
reused here), and they alternate between two kinds:

- even blocks (``blocks[0::2]``) are *spatial*: attention within one frame, tokens (B·F, N, D);
- odd blocks (``blocks[1::2]``) are *temporal*: attention across the F frames at one patch position,
  tokens (B·N, F, D).

The fixed sin-cos ``pos_embed`` (1, N, D) is added to the patch tokens, the fixed ``temp_embed`` (1, F, D)
once, after the first spatial block. The conditioning c = E_t (+ E_y for a class-conditional model,
the official ``extras == 2``) is repeated per frame for spatial blocks and the final layer, per position
for temporal blocks, as the official code does. Parameter names are the official ones, so its ``.pt``
files load with strict key matching (:mod:`dydit.io.latte`).

This file knows nothing of DyDiT; the adapters are in :mod:`dydit.dynamic.backbones.latte`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.nn as nn

from dydit.models.dit import _SIZES as DIT_SIZES, DiTBlock, FinalLayer, init_timestep_and_adaln_zero
from dydit.models.layers import LabelEmbedder, PatchEmbed, TimestepEmbedder, _1d_sincos, get_2d_sincos_pos_embed


@dataclass
class LatteConfig:
    """Architecture of a Latte backbone; saved as config.json beside the weights."""

    input_size: int = 32  # latent (or pixel) side length of one frame
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28  # spatial + temporal blocks (even: alternating, spatial first)
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_frames: int = 16
    class_dropout_prob: float = 0.1
    num_classes: int = 101  # UCF101
    learn_sigma: bool = True  # output 2C channels per frame (ε and the variance interpolation)
    extras: int = 2  # the official switch: 1 unconditional (no y_embedder), 2 class-conditional
    objective: str = "diffusion"  # Latte is trained as IDDPM (t in [0, 1000))
    vae: str | None = None
    vae_scaling_factor: float = 0.18215
    clip_denoised: bool = False  # clamp predicted x0 to [-1, 1] while sampling (pixel-space data)
    class_embed_std: float = 0.02  # see DiTConfig.class_embed_std: 1.0 for short CPU runs
    pixel_pad: int = 0
    name: str = "custom"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.extras not in (1, 2):
            raise ValueError(f"extras={self.extras}: dydit's Latte supports 1 (unconditional) and 2 (class-conditional); "
                             "the text-conditioned variant (78) is the diffusers LatteTransformer3DModel layout")
        if self.depth % 2:
            raise ValueError(f"depth {self.depth} must be even: Latte alternates spatial and temporal blocks")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_patches(self) -> int:
        """Tokens per frame (N)."""
        return (self.input_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        """Tokens per video sample (F·N): what the token routers see and the FLOPs count."""
        return self.num_frames * self.num_patches

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LatteConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown Latte config keys {sorted(unknown)}; is this a dydit Latte config.json?")
        return cls(**d)


class SpatialBlock(DiTBlock):
    """DiT's adaLN-Zero block, unchanged, attending within one frame: tokens (B·F, N, D).

    A subclass only so that the block kind is part of the module (the dynamic core registers one
    adapter per block class); parameters and computation are DiTBlock's.
    """


class TemporalBlock(DiTBlock):
    """DiT's adaLN-Zero block, unchanged, attending across the F frames at one position: tokens (B·N, F, D)."""


def get_1d_sincos_temp_embed(embed_dim: int, length: int) -> np.ndarray:
    """(length, embed_dim) fixed [sin, cos] table over frame indices, as the official ``temp_embed``."""
    return _1d_sincos(embed_dim, np.arange(length, dtype=np.float64))


class Latte(nn.Module):
    """Latte video DiT; ``forward(x, t, y)`` maps (B, F, C, H, W) to (B, F, 2C or C, H, W)."""

    def __init__(self, config: LatteConfig):
        super().__init__()
        self.config = c = config
        self.in_channels = c.in_channels
        self.out_channels = c.out_channels
        self.patch_size = c.patch_size
        self.num_heads = c.num_heads
        self.num_frames = c.num_frames
        self.x_embedder = PatchEmbed(c.input_size, c.patch_size, c.in_channels, c.hidden_size)
        self.t_embedder = TimestepEmbedder(c.hidden_size)
        if c.extras == 2:
            self.y_embedder = LabelEmbedder(c.num_classes, c.hidden_size, c.class_dropout_prob)
        # Fixed sin-cos tables; parameters (not buffers) so official state dicts match key for key.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, c.hidden_size), requires_grad=False)
        self.temp_embed = nn.Parameter(torch.zeros(1, c.num_frames, c.hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([(SpatialBlock if i % 2 == 0 else TemporalBlock)(c.hidden_size, c.num_heads,
                                                                                      c.mlp_ratio)
                                     for i in range(c.depth)])
        self.final_layer = FinalLayer(c.hidden_size, c.patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.x_embedder.grid_size)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        temp = get_1d_sincos_temp_embed(self.temp_embed.shape[-1], self.temp_embed.shape[-2])
        self.temp_embed.data.copy_(torch.from_numpy(temp).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        if self.config.extras == 2:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=self.config.class_embed_std)
        init_timestep_and_adaln_zero(self)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B·F, N, p*p*C) -> (B·F, C, H, W)."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def conditioning(self, t, y=None, force_drop_ids=None):
        """(c (B, D), E_t (B, D)): c = E_t + E_y for a class-conditional model, E_t otherwise."""
        t_emb = self.t_embedder(t)
        if self.config.extras == 2:
            if y is None:
                raise ValueError("this Latte is class-conditional (extras=2): pass class labels y")
            return t_emb + self.y_embedder(y, self.training, force_drop_ids), t_emb
        return t_emb, t_emb

    def forward(self, x, t, y=None, force_drop_ids=None):
        """x: (B, F, C, H, W); t: (B,) timesteps; y: (B,) labels (class-conditional models).

        ``force_drop_ids`` (B,), 1 = null label, replaces the random label dropout of training.
        """
        c = self.config
        if x.ndim != 5 or x.shape[1:3] != (c.num_frames, c.in_channels):
            raise ValueError(f"expected a video of shape (B, {c.num_frames}, {c.in_channels}, {c.input_size}, "
                             f"{c.input_size}) (batch, frames, channels, height, width), got {tuple(x.shape)}")
        B, F = x.shape[:2]
        if t.ndim == 0:
            t = t.expand(B)
        N = self.x_embedder.num_patches
        tokens = self.x_embedder(x.flatten(0, 1)) + self.pos_embed  # (B·F, N, D)
        cond, _ = self.conditioning(t, y, force_drop_ids)
        c_spatial = cond.repeat_interleave(F, dim=0)  # (B·F, D): one row per frame
        c_temporal = cond.repeat_interleave(N, dim=0)  # (B·N, D): one row per patch position
        D = tokens.shape[-1]
        for i in range(0, len(self.blocks), 2):
            tokens = self.blocks[i](tokens, c_spatial)
            tokens = tokens.view(B, F, N, D).transpose(1, 2).reshape(B * N, F, D)  # (b f) n d -> (b n) f d
            if i == 0:
                tokens = tokens + self.temp_embed
            tokens = self.blocks[i + 1](tokens, c_temporal)
            tokens = tokens.view(B, N, F, D).transpose(1, 2).reshape(B * F, N, D)  # (b n) f d -> (b f) n d
        out = self.unpatchify(self.final_layer(tokens, c_spatial))  # (B·F, C_out, H, W)
        return out.view(B, F, *out.shape[1:])

    def forward_with_cfg(self, x, t, y, cfg_scale: float, guided_channels: int | None = 4, **kwargs):
        """Classifier-free guidance with both halves in one batch (first half conditional), as the official.

        The official code guides the first four output channels of every frame (``[:, :, :4]``: the ε of
        a 4-channel latent); ``guided_channels`` = None guides every channel. ``kwargs`` go to ``forward``.
        """
        half = x[: len(x) // 2]
        model_out = self.forward(torch.cat([half, half], dim=0), t, y, **kwargs)  # (2B, F, C_out, H, W)
        n = model_out.shape[2] if guided_channels is None else guided_channels
        eps, rest = model_out[:, :, :n], model_out[:, :, n:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=2)


#################################################################################
#                                  Latte Configs                                #
#################################################################################

_SIZES = DIT_SIZES  # Latte's published S/B/L/XL are DiT's depths, widths and head counts


def _published(size: str, patch: int, **overrides) -> LatteConfig:
    kw = dict(_SIZES[size], patch_size=patch, name=f"Latte-{size}/{patch}")
    kw.update(overrides)
    return LatteConfig(**kw)


CONFIGS: dict[str, callable] = {}
for _size in _SIZES:
    for _patch in (2, 4, 8):
        CONFIGS[f"Latte-{_size}/{_patch}"] = (lambda s, p: (lambda **kw: _published(s, p, **kw)))(_size, _patch)

# Tests: 4 frames of 8x8, 4 patches per frame (so spatial and temporal attention lengths differ).
CONFIGS["Latte-Tiny"] = lambda **kw: LatteConfig(
    **{**dict(input_size=8, patch_size=4, in_channels=2, hidden_size=64, depth=4, num_heads=4, num_frames=3,
              num_classes=10, name="Latte-Tiny"), **kw})
# Moving Fashion-MNIST (BENCHMARKS.md B4): 8 frames of 32x32 pixels, patch 4 -> 64 tokens per frame.
CONFIGS["Latte-MFMNIST"] = lambda **kw: LatteConfig(
    **{**dict(input_size=32, patch_size=4, in_channels=1, hidden_size=128, depth=6, num_heads=4, num_frames=8,
              num_classes=10, clip_denoised=True, class_embed_std=1.0, name="Latte-MFMNIST"), **kw})
# The same network trained by flow matching (velocity prediction, as SiT; Euler sampling): the B4 base. An
# ε-prediction base at 1,500 steps did not learn where the one item is (docs/RESULTS.md "Video"): at high
# noise its ε-MSE carries almost no signal about placement, while the velocity loss weighs it fully.
CONFIGS["Latte-MFMNIST-Flow"] = lambda **kw: CONFIGS["Latte-MFMNIST"](
    **{**dict(objective="flow", learn_sigma=False, name="Latte-MFMNIST-Flow"), **kw})


def build_config(name: str, **overrides) -> LatteConfig:
    if name not in CONFIGS:
        raise KeyError(f"unknown Latte model {name!r}; choose one of: {', '.join(sorted(CONFIGS))}")
    return CONFIGS[name](**overrides)


from dydit.models.registry import register_architecture  # noqa: E402

register_architecture(Latte, LatteConfig)
