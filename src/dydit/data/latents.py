"""Precomputed VAE latents, so latent-space training does not run the VAE encoder every step.

Every image and its horizontal flip are encoded once with the posterior mode (``sample=False``) and kept
in one safetensors file, with metadata that ties the file to its image set, image size and VAE.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from dydit.data.image_folder import flip_mask
from dydit.io.atomic import atomic_path

log = logging.getLogger(__name__)

LATENT_FORMAT = "dydit-latents-v1"


def _dataset_meta(dataset) -> dict[str, str]:
    """What a cache must agree on with the dataset it serves (all strings, as safetensors metadata)."""
    return {
        "num_images": str(len(dataset)),
        "image_size": str(getattr(dataset, "image_size", "")),
        "pad": str(getattr(dataset, "pad", 0)),
        "files_hash": str(getattr(dataset, "fingerprint", "")),
    }


def _vae_meta(vae) -> dict[str, str]:
    return {
        "scaling_factor": repr(float(vae.scaling_factor)),
        "shift_factor": repr(float(vae.shift_factor)),
        "latent_channels": str(vae.latent_channels),
        "downsample": str(vae.downsample),
    }


class LatentCache(torch.utils.data.Dataset):
    """Scaled VAE latents of an image set and of its mirror image, with the ImageFolder interface:
    ``batch(idx, step)`` picks the flipped latent per (seed, step, index) exactly as ImageFolder flips."""

    def __init__(self, latents: torch.Tensor, latents_flip: torch.Tensor, labels: torch.Tensor, meta: dict,
                 flip: bool = True, seed: int = 0):
        self.latents, self.latents_flip = latents, latents_flip  # (N, C, h, w) each
        self.labels = labels  # (N,)
        self.meta = dict(meta)
        self.classes = json.loads(meta.get("classes", "[]"))
        self.num_classes = int(meta.get("num_classes", len(self.classes)))
        self.flip, self.seed = bool(flip), int(seed)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.latents[i], self.labels[i]

    def batch(self, idx: torch.Tensor, step: int | None = None):
        """(z (N, C, h, w), y (N,)); the flipped image's latent where ImageFolder would flip."""
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        z = self.latents[idx]
        if self.flip and step is not None:
            m = flip_mask(idx, self.seed, step)
            z[m] = self.latents_flip[idx[m]]
        return z, self.labels[idx]

    @classmethod
    @torch.no_grad()
    def build(cls, dataset, vae, path, batch_size: int = 32, progress: bool = True, seed: int | None = None):
        """Encodes every image of ``dataset`` and its flip with ``vae`` and writes ``path`` atomically."""
        from safetensors.torch import save_file
        from tqdm.auto import tqdm

        n = len(dataset)
        lat, lat_flip = [], []
        with tqdm(total=n, desc="encode latents", unit="img", disable=not progress, dynamic_ncols=True) as bar:
            for start in range(0, n, batch_size):
                idx = torch.arange(start, min(start + batch_size, n))
                x, _ = dataset.batch(idx)  # no step: unflipped images (N, 3, H, W)
                # encoded separately, not as one 2N batch, so each half matches a direct encode of the same batch
                lat.append(vae.encode(x, sample=False).float().cpu())
                lat_flip.append(vae.encode(x.flip(-1), sample=False).float().cpu())
                bar.update(len(idx))
        tensors = {
            "latents": torch.cat(lat).contiguous(),  # (N, C, h, w)
            "latents_flip": torch.cat(lat_flip).contiguous(),  # (N, C, h, w)
            "labels": torch.as_tensor(dataset.labels, dtype=torch.long)[:n].contiguous(),  # (N,)
        }
        classes = list(getattr(dataset, "classes", []))
        meta = {"format": LATENT_FORMAT, **_dataset_meta(dataset), **_vae_meta(vae),
                "num_classes": str(getattr(dataset, "num_classes", len(classes))), "classes": json.dumps(classes)}
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=meta)
        log.info("cached %d latents %s (and flips) in %s", n, tuple(tensors["latents"].shape[1:]), path)
        seed = getattr(dataset, "seed", 0) if seed is None else seed
        return cls(tensors["latents"], tensors["latents_flip"], tensors["labels"], meta,
                   flip=getattr(dataset, "flip", True), seed=seed)

    @classmethod
    def load(cls, path, dataset=None, vae=None, flip: bool | None = None, seed: int | None = None):
        """Reads a cache; with ``dataset``/``vae`` given, raises ValueError unless it was built from them.
        ``flip``/``seed`` default to the dataset's (else on, 0)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no latent cache; create it with LatentCache.build(dataset, vae, path)")
        rebuild = f"delete {path} and rebuild it with LatentCache.build"
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
        except Exception as e:
            raise ValueError(f"{path}: cannot read the latent cache ({e}); it is truncated or corrupted: "
                             f"{rebuild}") from e
        if meta.get("format") != LATENT_FORMAT or not {"latents", "latents_flip", "labels"} <= set(tensors):
            raise ValueError(f"{path}: not a dydit latent cache (format {meta.get('format')!r}); {rebuild}")
        n = len(tensors["labels"])
        if tensors["latents"].shape != tensors["latents_flip"].shape or len(tensors["latents"]) != n:
            raise ValueError(f"{path}: latents, flipped latents and labels disagree in length; {rebuild}")
        expect = {}
        if dataset is not None:
            expect.update(_dataset_meta(dataset))
        if vae is not None:
            expect.update(_vae_meta(vae))
        wrong = [f"{k}: cache has {meta.get(k)!r}, expected {v!r}" for k, v in expect.items() if meta.get(k) != v]
        if wrong:
            raise ValueError(f"{path}: latent cache was built for a different dataset, image size or VAE "
                             f"({'; '.join(wrong)}); {rebuild}")
        flip = getattr(dataset, "flip", True) if flip is None else flip
        seed = getattr(dataset, "seed", 0) if seed is None else seed
        return cls(tensors["latents"], tensors["latents_flip"], tensors["labels"], meta, flip=flip, seed=seed)

    @classmethod
    def build_or_load(cls, dataset, vae, path, batch_size: int = 32, progress: bool = True):
        """Loads ``path`` if it exists (checked against dataset and VAE), else builds it."""
        if Path(path).exists():
            cache = cls.load(path, dataset=dataset, vae=vae)
            log.info("loaded %d cached latents from %s", len(cache), path)
            return cache
        return cls.build(dataset, vae, path, batch_size=batch_size, progress=progress)
