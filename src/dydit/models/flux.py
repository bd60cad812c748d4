"""FLUX-style text-to-image configs in dydit's registry; the model is diffusers' ``FluxTransformer2DModel``.

A registry name (``FLUX-CFMNIST``, ``FLUX-Tiny``) maps to a :class:`FluxT2IConfig`, whose ``build()``
returns diffusers' own class from a config dict, so everything diffusers and DyFLUX
(:mod:`dydit.dynamic.backbones.flux`) do with FLUX applies unchanged. The images are pixels, packed as
FLUX packs its latents: a ``patch``×``patch`` block of the 1-channel canvas becomes one token of
``patch²`` channels (``in_channels``), and ``img_ids`` carry (0, row, col) (:mod:`dydit.t2i`). Text comes
from the shipped all-MiniLM-L6-v2 caption table (384-d token states and their mean).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from dydit.text import TEXT_DIM


@dataclass
class FluxT2IConfig:
    """A small FLUX for pixel-space text-to-image (Captioned Fashion-MNIST)."""

    name: str = "FLUX-CFMNIST"
    num_layers: int = 2  # double-stream blocks
    num_single_layers: int = 4  # single-stream blocks
    attention_head_dim: int = 32
    num_attention_heads: int = 4
    patch: int = 4  # pixels per token side (FLUX: 2×2 latent patches of a 8× VAE)
    channels: int = 1
    canvas: int = 56
    axes_dims_rope: tuple = (8, 12, 12)  # sums to attention_head_dim
    guidance_embeds: bool = False
    extra: dict = field(default_factory=dict)

    # the fields `dydit models` prints
    @property
    def depth(self) -> int:
        return self.num_layers + self.num_single_layers

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def num_heads(self) -> int:
        return self.num_attention_heads

    @property
    def num_tokens(self) -> int:
        return (self.canvas // self.patch) ** 2

    objective = "flow"

    def diffusers_config(self) -> dict:
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim {self.attention_head_dim}")
        if self.canvas % self.patch:
            raise ValueError(f"canvas {self.canvas} is not a multiple of the patch {self.patch}")
        return dict(patch_size=1, in_channels=self.channels * self.patch ** 2, out_channels=None,
                    num_layers=self.num_layers, num_single_layers=self.num_single_layers,
                    attention_head_dim=self.attention_head_dim, num_attention_heads=self.num_attention_heads,
                    joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM,
                    guidance_embeds=self.guidance_embeds, axes_dims_rope=tuple(self.axes_dims_rope), **self.extra)

    def build(self):
        import torch
        from diffusers import FluxTransformer2DModel

        model = FluxTransformer2DModel(**self.diffusers_config())
        # diffusers zero-initialises nothing in FLUX; start every block as the identity (adaLN-Zero, as DiT
        # does): the gates are the modulation's outputs, so zero its last Linear, and the output layer
        with torch.no_grad():
            for block in model.transformer_blocks:
                for norm in (block.norm1, block.norm1_context):
                    norm.linear.weight.zero_(), norm.linear.bias.zero_()
            for block in model.single_transformer_blocks:
                block.norm.linear.weight.zero_(), block.norm.linear.bias.zero_()
            model.proj_out.weight.zero_(), model.proj_out.bias.zero_()
        return model

    def to_dict(self) -> dict:
        return asdict(self)


CONFIGS: dict[str, callable] = {
    # the B5 base: 2 double + 4 single blocks, width 128 (4 heads × 32), 196 image tokens + 13 text tokens
    "FLUX-CFMNIST": lambda **kw: FluxT2IConfig(**{"name": "FLUX-CFMNIST", **kw}),
    # tests: 1 + 1 blocks, width 32
    "FLUX-Tiny": lambda **kw: FluxT2IConfig(**{**dict(name="FLUX-Tiny", num_layers=1, num_single_layers=1,
                                                      attention_head_dim=16, num_attention_heads=2,
                                                      axes_dims_rope=(4, 6, 6)), **kw}),
}
