"""Text-to-image with a FLUX-style model (diffusers' ``FluxTransformer2DModel``) on Captioned Fashion-MNIST.

One place for how a FLUX model meets pixels and captions, in diffusers' conventions:

- packing: a (B, C, H, W) canvas becomes ``hidden_states`` (B, (H/p)(W/p), C·p²) tokens (FLUX packs 2×2
  latent patches the same way), ``img_ids`` (S, 3) = (0, row, col), ``txt_ids`` (L, 3) = 0;
- flow matching as diffusers' FlowMatch schedulers define it: ``timestep`` = σ ∈ [0, 1],
  x_σ = (1 − σ)·x0 + σ·noise, the model predicts noise − x0, sampling integrates σ from 1 to 0
  (the opposite of dydit's SiT convention in :mod:`dydit.diffusion.flow`);
- text: caption ids index the shipped all-MiniLM-L6-v2 table (:mod:`dydit.text`): token states as
  ``encoder_hidden_states``, their mean as ``pooled_projections``; caption dropout to the empty caption
  (id 0) trains the unconditional half of classifier-free guidance.

:class:`TextFlowObjective` is the loss both `dydit train` (:class:`TextToImageTask`) and `dydit finetune`
(:class:`~dydit.dynamic.finetune.FinetuneTask`) use; :func:`sample_captions` is the sampler.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from dydit.data.captioned_fmnist import CANVAS, NULL_CAPTION

log = logging.getLogger(__name__)


def is_text_to_image(model) -> bool:
    """Whether ``model`` (or the module DDP wraps) is a FLUX-style text-to-image model."""
    from diffusers import FluxTransformer2DModel

    return isinstance(getattr(model, "module", model), FluxTransformer2DModel)


def patch_size(model, channels: int = 1) -> int:
    """Pixels per token side: ``in_channels`` = channels · patch²."""
    c = getattr(model, "module", model).config.in_channels
    p = int(round(math.sqrt(c / channels)))
    if p * p * channels != c:
        raise ValueError(f"in_channels {c} is not {channels} × a square patch")
    return p


# ---------------------------------------------------------------------------------------------
# packing (diffusers' FluxPipeline._pack_latents / _unpack_latents, for any patch)
# ---------------------------------------------------------------------------------------------


def pack(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)·(W/p), C·p²), row-major tokens, channels-then-(dy, dx) inside a token."""
    B, C, H, W = x.shape
    x = x.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def unpack(tokens: torch.Tensor, p: int, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack`."""
    B, _, D = tokens.shape
    C = D // (p * p)
    x = tokens.view(B, height // p, width // p, C, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, C, height, width)


def image_ids(height_tokens: int, width_tokens: int, device=None) -> torch.Tensor:
    """(S, 3) RoPE positions (0, row, col), as FluxPipeline._prepare_latent_image_ids."""
    ids = torch.zeros(height_tokens, width_tokens, 3, device=device)
    ids[..., 1] = torch.arange(height_tokens, device=device)[:, None]
    ids[..., 2] = torch.arange(width_tokens, device=device)[None, :]
    return ids.reshape(-1, 3)


def text_ids(num_tokens: int, device=None) -> torch.Tensor:
    return torch.zeros(num_tokens, 3, device=device)


def velocity(model, tokens, sigma, states, pooled, p: int, canvas: int, dyn=None, guidance=None):
    """The model's prediction (noise − x0) for packed tokens (B, S, C·p²) at σ (B,) or a float."""
    B = tokens.shape[0]
    sigma = torch.as_tensor(sigma, device=tokens.device, dtype=tokens.dtype).reshape(-1).expand(B)
    kwargs = dict(hidden_states=tokens, encoder_hidden_states=states.to(tokens.dtype),
                  pooled_projections=pooled.to(tokens.dtype), timestep=sigma,
                  img_ids=image_ids(canvas // p, canvas // p, tokens.device),
                  txt_ids=text_ids(states.shape[1], tokens.device), return_dict=False)
    if getattr(model, "module", model).config.guidance_embeds:
        g = 1.0 if guidance is None else guidance
        kwargs["guidance"] = torch.as_tensor(g, device=tokens.device, dtype=tokens.dtype).reshape(-1).expand(B)
    if dyn is not None:
        kwargs["dyn"] = dyn
    return model(**kwargs)[0]


def set_t2i_token_geometry(model, canvas: int = CANVAS, table=None):
    """Tells DyFLUX's FLOPs counter this model's (image, text) token counts on the canvas before its first call."""
    from dydit.dynamic.backbones.flux import set_token_geometry
    from dydit.text import caption_table

    p = patch_size(model)
    set_token_geometry(getattr(model, "module", model), (canvas // p) ** 2, (table or caption_table()).num_tokens)


# ---------------------------------------------------------------------------------------------
# the objective (shared by training and fine-tuning)
# ---------------------------------------------------------------------------------------------


class TextFlowObjective:
    """diffusers' flow matching with caption conditioning: MSE(model(x_σ, σ, text), noise − x0)."""

    def __init__(self, model, caption_dropout: float = 0.1, table=None):
        from dydit.text import caption_table

        self.table = table or caption_table()
        self.p = patch_size(model)
        self.caption_dropout = caption_dropout

    @staticmethod
    def make_dataset(cfg):
        """The training set: Captioned Fashion-MNIST (``cfg.data``: the Fashion-MNIST IDX folder)."""
        from dydit.data.captioned_fmnist import CaptionedFashionMNIST

        return CaptionedFashionMNIST("train", cfg.data, seed=cfg.seed, limit=cfg.limit_data)

    def set_token_geometry(self, model, canvas: int = CANVAS):
        set_t2i_token_geometry(model, canvas, self.table)

    def sample_t(self, batch_size, device, generator=None, stratified: bool = False, strata: int = 4):
        """σ ~ U(0, 1); stratified: the batch split into ``strata`` groups covering the quarters in order."""
        u = torch.rand(batch_size, generator=generator)
        if stratified:
            group = torch.arange(batch_size) * strata // batch_size
            u = (group + u) / strata
        return u.to(device)

    def drop_captions(self, y: torch.Tensor) -> torch.Tensor:
        """Caption ids with a ``caption_dropout`` share replaced by the empty caption (global RNG: the loop
        seeds it per step, so a resume redraws the same)."""
        if self.caption_dropout <= 0:
            return y
        drop = torch.rand(len(y)) < self.caption_dropout
        return torch.where(drop.to(y.device), torch.full_like(y, NULL_CAPTION), y)

    def losses(self, model, x, y, sigma, noise, dyn=None) -> dict:
        """x, noise: images (B, C, H, W); y: caption ids (B,); sigma (B,) -> {"loss", "mse"} (B,) each."""
        states, pooled = self.table.lookup(y, x.device)
        s = sigma.view(-1, 1, 1, 1).to(x.dtype)
        xt = (1.0 - s) * x + s * noise
        out = velocity(model, pack(xt, self.p), sigma, states, pooled, self.p, x.shape[-1], dyn=dyn)
        mse = ((out.float() - pack(noise - x, self.p).float()) ** 2).mean(dim=(1, 2))
        return {"loss": mse, "mse": mse}


class TextToImageTask:
    """What `dydit train` runs for a text-to-image model: :class:`TextFlowObjective` on Captioned Fashion-MNIST."""

    def __init__(self, model, caption_dropout: float = 0.1):
        self.objective = TextFlowObjective(model, caption_dropout)

    def make_dataset(self, cfg):
        return self.objective.make_dataset(cfg)

    def loss(self, model, x, y, step, gen):
        sigma = self.objective.sample_t(len(x), x.device, generator=gen)
        noise = torch.randn(x.shape, generator=gen).to(x.device)
        terms = self.objective.losses(model, x, self.objective.drop_captions(y), sigma, noise)
        return terms["loss"].mean(), {"loss": terms["loss"].mean().item(), "mse": terms["mse"].mean().item()}

    def progress_fields(self, logs):
        return {"loss": f"{logs['loss']:.4f}"}


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------


def sigma_grid(steps: int) -> list[float]:
    return torch.linspace(1.0, 0.0, steps + 1).tolist()


@torch.no_grad()
def sample_captions(model, caption_ids, steps: int = 25, cfg_scale: float = 4.0, seed: int = 0, dyn=None,
                    canvas: int = CANVAS, table=None, batch_size: int | None = None, guidance=None) -> torch.Tensor:
    """Images (N, 1, canvas, canvas) in [-1, 1] for caption ids (N,): Euler over σ = 1 → 0 (diffusers'
    FlowMatchEulerDiscreteScheduler with shift 1), classifier-free guidance against the empty caption
    (both halves in one batch, so they share σ and the DyFLUX plan). Noise depends on ``seed`` only."""
    from dydit.text import caption_table

    table = table or caption_table()
    ids = torch.as_tensor(caption_ids).long()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    p = patch_size(model)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(ids), 1, canvas, canvas, generator=g)
    out = []
    bs = batch_size or len(ids)
    for i in range(0, len(ids), bs):
        y = ids[i:i + bs]
        x = pack(noise[i:i + bs], p).to(device, dtype)
        states, pooled = table.lookup(y, device)
        if cfg_scale != 1.0:
            ns, npool = table.lookup(torch.full_like(y, NULL_CAPTION), device)
            states, pooled = torch.cat([states, ns]), torch.cat([pooled, npool])
        grid = sigma_grid(steps)
        for s, s_next in zip(grid[:-1], grid[1:]):
            inp = torch.cat([x, x]) if cfg_scale != 1.0 else x
            v = velocity(model, inp, s, states, pooled, p, canvas, dyn=dyn, guidance=guidance).float()
            if cfg_scale != 1.0:
                vc, vu = v.chunk(2)
                v = vu + cfg_scale * (vc - vu)
            x = (x.float() + (s_next - s) * v).to(dtype)
        out.append(unpack(x.float().cpu(), p, canvas, canvas))
    return torch.cat(out).clamp(-1, 1)


def save_captioned_grid(images: torch.Tensor, captions: list[str], path, ncol: int = 4, scale: int = 3):
    """Images (N, 1, H, W) in [-1, 1] as a PNG grid, each caption written under its image."""
    from PIL import Image, ImageDraw

    n, _, h, w = images.shape
    rows = math.ceil(n / ncol)
    cw, ch, text_h = w * scale, h * scale, 30
    sheet = Image.new("L", (ncol * (cw + 4), rows * (ch + text_h)), color=255)
    draw = ImageDraw.Draw(sheet)
    u8 = ((images[:, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    for i in range(n):
        r, c = divmod(i, ncol)
        x0, y0 = c * (cw + 4), r * (ch + text_h)
        sheet.paste(Image.fromarray(u8[i]).resize((cw, ch), Image.NEAREST), (x0, y0))
        words, lines = captions[i].split(), [""]
        for word in words:  # wrap to the cell width (~6 px per character of the default font)
            if len(lines[-1]) + len(word) + 1 > cw // 6:
                lines.append("")
            lines[-1] = f"{lines[-1]} {word}".strip()
        draw.multiline_text((x0 + 2, y0 + ch + 1), "\n".join(lines[:2]), fill=0, spacing=1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return Path(path)


def write_captioned_grid(model, path, num: int = 16, steps: int = 25, cfg_scale: float = 4.0, dyn=None):
    """A sample grid of ``num`` balanced captions (the training loop's periodic samples)."""
    from dydit.data.captioned_fmnist import CAPTIONS, balanced_caption_ids

    ids = balanced_caption_ids(num, seed=0)
    was_training = model.training
    model.eval()
    x = sample_captions(model, ids, steps=steps, cfg_scale=cfg_scale, seed=0, dyn=dyn)
    model.train(was_training)
    return save_captioned_grid(x, [CAPTIONS[int(i)] for i in ids], path)
