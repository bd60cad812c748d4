"""DiT / SiT backbone: the published Diffusion Transformer with adaLN-Zero blocks.

The parameter names and layout are those of the official DiT, so its ``.pt`` state dicts load with
strict matching. SiT is the same network trained for flow matching; the released SiT checkpoints keep
DiT's 2C-channel final layer and return only the first C channels, which ``out_channels_used`` models.

This file knows nothing of DyDiT: :func:`dydit.dynamize` makes any registered backbone dynamic from
outside (:mod:`dydit.dynamic.adapters`; the DiT adapter is :mod:`dydit.dynamic.backbones.dit`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn

from dydit.models.inputs import check_inputs
from dydit.models.layers import (
    Attention,
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    get_2d_sincos_pos_embed,
    modulate,
)


@dataclass
class DiTConfig:
    """Architecture of a DiT/SiT backbone; saved as config.json beside the weights."""

    input_size: int = 32  # latent (or pixel) side length
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True  # output 2C channels (ε and the variance interpolation)
    freq_shift: float = 0.0  # 0: official DiT timestep features; 1: diffusers' DiT port
    # What the network is trained for: "diffusion" (DiT, t in [0, 1000)) or "flow" (SiT, t in [0, 1]).
    objective: str = "diffusion"
    # SiT checkpoints keep a 2C-channel head but use only the first C channels (the velocity).
    out_channels_used: int | None = None
    # Pixel-space models have no VAE; latent models name one (a local diffusers AutoencoderKL folder).
    vae: str | None = None
    vae_scaling_factor: float = 0.18215
    # Clamp predicted x0 to [-1, 1] while sampling: right for pixel-space data, not for VAE latents.
    clip_denoised: bool = False
    # Init std of the class-embedding table. DiT uses 0.02, which makes the class signal tiny next to
    # the timestep embedding (norm ~20): fine over 400k steps, but a 2k-step CPU run then never learns to
    # condition on the class. Small configs meant for short training use 1.0 (nn.Embedding's default).
    class_embed_std: float = 0.02
    # Pixel-space images are padded by this many background pixels per side to fit input_size.
    pixel_pad: int = 0
    name: str = "custom"
    extra: dict = field(default_factory=dict)

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DiTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown DiT config keys {sorted(unknown)}; is this a dydit config.json?")
        _check_types(cls, d)
        return cls(**d)


def _check_types(cls, d: dict):
    """A config.json value of the wrong type (``"hidden_size": "128"``) is refused here, naming the key, not
    deep inside a layer constructor."""
    import typing

    kinds = {int: (int,), float: (int, float), bool: (bool,), str: (str,), dict: (dict,), type(None): (type(None),)}
    for key, tp in typing.get_type_hints(cls).items():
        if key not in d:
            continue
        allowed = tuple(k for a in (typing.get_args(tp) or (tp,)) for k in kinds.get(a, (object,)))
        v = d[key]
        if not isinstance(v, allowed) or (isinstance(v, bool) and bool not in allowed):
            names = " or ".join(sorted({a.__name__.replace("NoneType", "null") for a in (typing.get_args(tp) or (tp,))}))
            raise ValueError(f"config key {key!r} must be {names}, got {v!r} ({type(v).__name__}); fix config.json")


class DiTBlock(nn.Module):
    """adaLN-Zero block: x += g1·Attn(mod(LN(x))); x += g2·MLP(mod(LN(x)))."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        """x: (B, N, D) tokens; c: (B, D) conditioning."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def init_timestep_and_adaln_zero(model) -> None:
    """The DiT initialisation shared by its forks (Latte): the timestep MLP ~ N(0, 0.02); adaLN-Zero, so
    every block and the final layer start as the identity / zero, which makes deep DiTs train stably."""
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    for block in model.blocks:
        nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
    nn.init.constant_(model.final_layer.adaLN_modulation[-1].weight, 0)
    nn.init.constant_(model.final_layer.adaLN_modulation[-1].bias, 0)
    nn.init.constant_(model.final_layer.linear.weight, 0)
    nn.init.constant_(model.final_layer.linear.bias, 0)


class DiT(nn.Module):
    """Diffusion Transformer; ``forward(x, t, y)`` maps (B, C, H, W) to (B, 2C or C, H, W)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        c = config
        self.in_channels = c.in_channels
        self.out_channels = c.out_channels
        self.patch_size = c.patch_size
        self.num_heads = c.num_heads
        self.x_embedder = PatchEmbed(c.input_size, c.patch_size, c.in_channels, c.hidden_size)
        self.t_embedder = TimestepEmbedder(c.hidden_size, freq_shift=c.freq_shift)
        self.y_embedder = LabelEmbedder(c.num_classes, c.hidden_size, c.class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # Fixed sin-cos embedding; a parameter (not a buffer) so official state dicts match key for key.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, c.hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(c.hidden_size, c.num_heads, c.mlp_ratio) for _ in range(c.depth)])
        self.final_layer = FinalLayer(c.hidden_size, c.patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.x_embedder.grid_size)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=self.config.class_embed_std)
        init_timestep_and_adaln_zero(self)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W)."""
        c = self.out_channels
        p = self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def embed(self, x, t, y, force_drop_ids=None):
        """Returns tokens (B, N, D), conditioning c = E_t + E_y (B, D) and E_t (B, D)."""
        x = self.x_embedder(x) + self.pos_embed
        t_emb = self.t_embedder(t)
        y_emb = self.y_embedder(y, self.training, force_drop_ids)
        return x, t_emb + y_emb, t_emb

    def forward(self, x, t, y, force_drop_ids=None):
        """x: (B, C, H, W); t: (B,) timesteps in the backbone's units; y: (B,) labels.

        ``force_drop_ids`` (B,), 1 = null label, replaces the random label dropout of training (the
        official DiT's LabelEmbedder argument).
        """
        t = check_inputs(self.config, x, t, y)  # shapes, dtypes, batch agreement, label and t ranges
        tokens, c, _ = self.embed(x, t, y, force_drop_ids)
        for block in self.blocks:
            tokens = block(tokens, c)
        out = self.unpatchify(self.final_layer(tokens, c))
        if self.config.out_channels_used is not None:
            out = out[:, : self.config.out_channels_used]
        return out

    def forward_with_cfg(self, x, t, y, cfg_scale: float, guided_channels: int | None = 3, **kwargs):
        """Classifier-free guidance with the conditional and unconditional halves in one batch.

        x, t, y hold both halves (first half conditional). ``guided_channels`` = 3 is the DiT
        convention (guide the first three latent channels); None guides every predicted channel.
        ``kwargs`` go to ``forward`` (a dynamic model's ``dyn=``, for one).
        """
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        model_out = self.forward(combined, t, y, **kwargs)
        C = self.in_channels
        n = C if guided_channels is None else min(guided_channels, C)
        eps, rest = model_out[:, :n], model_out[:, n:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)


#################################################################################
#                                   DiT Configs                                 #
#################################################################################

_SIZES = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}


def _published(size: str, patch: int, **overrides) -> DiTConfig:
    kw = dict(_SIZES[size], patch_size=patch, name=f"DiT-{size}/{patch}")
    kw.update(overrides)
    return DiTConfig(**kw)


CONFIGS: dict[str, callable] = {}
for _size in _SIZES:
    for _patch in (2, 4, 8):
        CONFIGS[f"DiT-{_size}/{_patch}"] = (lambda s, p: (lambda **kw: _published(s, p, **kw)))(_size, _patch)
        CONFIGS[f"SiT-{_size}/{_patch}"] = (
            lambda s, p: (lambda **kw: _published(s, p, **{"name": f"SiT-{s}/{p}", "objective": "flow", **kw}))
        )(_size, _patch)

# Small configs for tests and CPU work (pixel space, no VAE).
CONFIGS["DiT-Tiny"] = lambda **kw: DiTConfig(
    **{**dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
              num_classes=10, name="DiT-Tiny"), **kw})
CONFIGS["SiT-Tiny"] = lambda **kw: DiTConfig(
    **{**dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
              num_classes=10, objective="flow", name="SiT-Tiny"), **kw})
# The embedded Fashion-MNIST model: 28x28 pixels padded to 30x30, patch 3 -> 100 tokens, 4 heads.
CONFIGS["DiT-FMNIST"] = lambda **kw: DiTConfig(
    **{**dict(input_size=30, patch_size=3, in_channels=1, hidden_size=128, depth=6, num_heads=4,
              num_classes=10, pixel_pad=1, clip_denoised=True, class_embed_std=1.0, name="DiT-FMNIST"), **kw})
CONFIGS["SiT-FMNIST"] = lambda **kw: DiTConfig(
    **{**dict(input_size=30, patch_size=3, in_channels=1, hidden_size=128, depth=6, num_heads=4,
              num_classes=10, pixel_pad=1, objective="flow", learn_sigma=False, clip_denoised=True,
              class_embed_std=1.0, name="SiT-FMNIST"), **kw})


def build_config(name: str, **overrides) -> DiTConfig:
    if name not in CONFIGS:
        raise KeyError(f"unknown model {name!r}; choose one of: {', '.join(sorted(CONFIGS))}")
    return CONFIGS[name](**overrides)


def build_model(name_or_config, **overrides):
    """A model from a config or any backbone's registry name (DiT, SiT, and Latte/FLUX when present)."""
    if isinstance(name_or_config, DiTConfig):
        return DiT(name_or_config)
    if name_or_config in CONFIGS:
        return DiT(build_config(name_or_config, **overrides))
    from dydit.models.registry import build_any

    return build_any(name_or_config, **overrides)


from dydit.models.registry import register_architecture  # noqa: E402

register_architecture(DiT, DiTConfig)
