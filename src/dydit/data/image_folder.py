"""ImageNet-layout image trees (``root/<class_name>/*.png``) preprocessed exactly like DiT's train.py."""
from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_LAYOUT = "root/<class_name>/<image>.{png,jpg,jpeg,webp,bmp} (one subfolder per class, ImageNet style)"
_MODES = {1: "L", 3: "RGB"}


def center_crop_arr(pil_image, image_size: int):
    """ADM's center crop (as in the official DiT train.py): box-halve while the short side is at least
    2 * image_size, bicubic-resize the short side to image_size, then crop the center square."""
    from PIL import Image

    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.Resampling.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.Resampling.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size])


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _class_dirs(root: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def is_image_folder(path) -> bool:
    """True when ``path`` is a directory with at least one class subfolder holding an image (cheap: stops at
    the first image found)."""
    if path is None or not Path(path).is_dir():
        return False
    for name in _class_dirs(Path(path)):
        for _, dirs, files in os.walk(Path(path) / name, followlinks=True):
            if any(_is_image(f) for f in files):
                return True
    return False


def _scan(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, [(path relative to root, label)]) in sorted order, so label ids and indices are stable."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such image folder; expected the layout {_LAYOUT}")
    classes = _class_dirs(root)
    if not classes:
        raise ValueError(f"{root}: no class subfolders; expected the layout {_LAYOUT}")
    samples = []
    for label, name in enumerate(classes):
        found = []
        for dirpath, dirs, files in os.walk(root / name, followlinks=True):
            dirs.sort()
            found += [os.path.relpath(os.path.join(dirpath, f), root) for f in sorted(files) if _is_image(f)]
        if not found:
            log.warning("%s: class folder %r holds no images", root, name)
        samples += [(rel, label) for rel in found]
    if not samples:
        raise ValueError(f"{root}: the class subfolders {classes[:5]}{'...' if len(classes) > 5 else ''} hold no "
                         f"images; expected the layout {_LAYOUT}")
    return classes, samples


def flip_mask(idx: torch.Tensor, seed: int, step: int) -> torch.Tensor:
    """Bool (N,): flip image ``idx[i]`` at ``step``? A function of (seed, step, index) only, not of the batch
    position, so any split of a batch across processes and any resumed run see the same flips."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + 0xF11F) % (2**63 - 1))
    salt = np.uint64(int(torch.randint(0, 2**62, (1,), generator=g)))
    # splitmix64 of (salt + index): uint64 arrays wrap silently, giving well-mixed independent bits per index
    z = idx.cpu().numpy().astype(np.uint64) + salt + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return torch.from_numpy((z >> np.uint64(63)).astype(np.bool_))


class ImageFolder(torch.utils.data.Dataset):
    """Class-labelled image tree, center-cropped to ``image_size`` and scaled to [-1, 1].

    ``batch(idx, step)`` applies a random horizontal flip that depends only on (seed, step, index), so
    training resumes bit for bit; ``__getitem__`` and ``batch(idx)`` without a step return unflipped images.
    Images are decoded lazily; decoded crops are kept in a byte-bounded LRU cache (whole small sets fit).
    """

    cache_bytes = 256 * 2**20  # decoded uint8 crops kept in memory

    def __init__(self, root, image_size: int, pad: int = 0, channels: int = 3, flip: bool = True, seed: int = 0,
                 limit: int | None = None):
        if channels not in _MODES:
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        self.root = Path(root)
        self.classes, samples = _scan(self.root)
        if limit:
            samples = samples[:limit]
        self.files = [rel for rel, _ in samples]
        self.labels = torch.tensor([lab for _, lab in samples], dtype=torch.long)
        self.image_size, self.pad, self.channels = int(image_size), int(pad), int(channels)
        self.flip, self.seed = bool(flip), int(seed)
        self.num_classes = len(self.classes)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cached_bytes = 0

    @property
    def fingerprint(self) -> str:
        """sha256 of the (label, relative path) list: identifies the image set for latent caches."""
        h = hashlib.sha256()
        for rel, lab in zip(self.files, self.labels.tolist()):
            h.update(f"{lab}\t{Path(rel).as_posix()}\n".encode())
        return h.hexdigest()

    def __len__(self):
        return len(self.files)

    def load_uint8(self, i: int) -> np.ndarray:
        """Decoded, center-cropped image ``i``: uint8 (H, W) or (H, W, 3)."""
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        from PIL import Image

        path = self.root / self.files[i]
        try:
            with Image.open(path) as im:
                # DiT's loader converts first, so the crop sees the same pixels as the model
                arr = np.array(center_crop_arr(im.convert(_MODES[self.channels]), self.image_size))
        except OSError as e:
            raise ValueError(f"{path}: cannot decode image ({e})") from e
        self._cache[i] = arr
        self._cached_bytes += arr.nbytes
        while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
            self._cached_bytes -= self._cache.popitem(last=False)[1].nbytes
        return arr

    def _to_model_space(self, arrs: list[np.ndarray]) -> torch.Tensor:
        x = torch.from_numpy(np.stack(arrs)).float().div(127.5).sub(1.0)  # (N, H, W[, C]) in [-1, 1]
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # (N, C, H, W)
        if self.pad:
            x = F.pad(x, (self.pad,) * 4, value=-1.0)
        return x.contiguous()

    def __getitem__(self, i):
        return self._to_model_space([self.load_uint8(int(i))])[0], self.labels[i]

    def batch(self, idx: torch.Tensor, step: int | None = None):
        """(x (N, C, H, W) in [-1, 1], y (N,)) for integer indices; flipped per (seed, step, index) when a
        step is given and ``flip`` is on."""
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        x = self._to_model_space([self.load_uint8(i) for i in idx.tolist()])
        if self.flip and step is not None:
            m = flip_mask(idx, self.seed, step)
            x[m] = x[m].flip(-1)
        return x, self.labels[idx]
