"""Latent-space VAE: a thin wrapper over diffusers' AutoencoderKL read from a local folder.

The folder has the ``stabilityai/sd-vae-ft-ema`` layout (config.json + diffusion_pytorch_model.*).
Latents are ``(z - shift_factor) * scaling_factor`` with the factors from the VAE's own config
(0.18215 and no shift for the SD VAEs DiT uses), so the backbone sees unit-variance inputs.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

DEFAULT_SCALING_FACTOR = 0.18215


class VAE(nn.Module):
    """Images in [-1, 1] (B, 3, H, W) <-> scaled latents (B, C, H/f, W/f)."""

    def __init__(self, autoencoder):
        super().__init__()
        self.autoencoder = autoencoder
        cfg = autoencoder.config
        self.scaling_factor = float(getattr(cfg, "scaling_factor", None) or DEFAULT_SCALING_FACTOR)
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None):
        """(B, 3, H, W) in [-1, 1] -> (B, C, H/f, W/f) latents; ``sample`` draws from q(z|x) as DiT's training does."""
        images = images.to(device=self.device, dtype=self.dtype)
        dist = self.autoencoder.encode(images).latent_dist
        z = dist.sample(generator=generator) if sample else dist.mode()
        return (z - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) scaled latents -> (B, 3, h*f, w*f) images, roughly in [-1, 1] (not clamped)."""
        z = latents.to(device=self.device, dtype=self.dtype) / self.scaling_factor + self.shift_factor
        return self.autoencoder.decode(z).sample

    @property
    def device(self) -> torch.device:
        return next(self.autoencoder.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.autoencoder.parameters()).dtype


def load_vae(folder, device="cpu", dtype: torch.dtype = torch.float32) -> VAE:
    """Loads an AutoencoderKL saved with ``save_pretrained`` (local files only) as an eval-mode :class:`VAE`."""
    from diffusers import AutoencoderKL

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such VAE folder; point to a local AutoencoderKL folder "
                                "(e.g. a download of stabilityai/sd-vae-ft-ema)")
    cfg_path = folder / "config.json"
    if not cfg_path.exists() and (folder / "vae" / "config.json").exists():  # a pipeline folder
        folder, cfg_path = folder / "vae", folder / "vae" / "config.json"
    try:
        kind = json.loads(cfg_path.read_text()).get("_class_name")
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder}: no config.json; the VAE folder is incomplete") from None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{cfg_path}: not a valid JSON config ({e}); the file is corrupted") from e
    if kind not in (None, "AutoencoderKL"):
        raise ValueError(f"{cfg_path}: describes {kind!r}, not an AutoencoderKL")
    try:
        ae = AutoencoderKL.from_pretrained(folder, local_files_only=True, torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{folder}: cannot load the AutoencoderKL ({e}); the weights are missing, truncated "
                         "or do not match config.json") from e
    log.info("loaded VAE from %s (scaling factor %s)", folder, ae.config.scaling_factor)
    return VAE(ae.to(device).eval())
