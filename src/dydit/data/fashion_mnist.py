"""Fashion-MNIST from its four IDX files (Debian: package ``dataset-fashion-mnist``)."""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def default_fmnist_dir() -> str:
    return os.environ.get("DYDIT_FMNIST_DIR", DEBIAN_DIR)


def _open(path: Path):
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.exists():
            return gzip.open(candidate, "rb") if candidate.suffix == ".gz" else open(candidate, "rb")
    raise FileNotFoundError(
        f"Fashion-MNIST file {path.name}(.gz) not found in {path.parent}. Install it with "
        f"`apt-get install dataset-fashion-mnist` (files land in {DEBIAN_DIR}) or pass --data DIR "
        f"pointing at the four IDX files."
    )


def _read_idx(path: Path) -> np.ndarray:
    with _open(path) as f:
        data = f.read()
    if len(data) < 4:
        raise ValueError(f"{path}: truncated IDX file")
    _, dtype_code, ndim = data[0:2], data[2], data[3]
    if dtype_code != 0x08:
        raise ValueError(f"{path}: expected unsigned-byte IDX data, got type code {dtype_code:#x}")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: IDX header promises {shape} but the file holds {arr.size} bytes; truncated?")
    return arr.reshape(shape)


def load_fashion_mnist(split: str = "train", root: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Returns (images uint8 (N, 28, 28), labels int64 (N,))."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root_path = Path(root or default_fmnist_dir())
    img_name, lab_name = _FILES[split]
    images = _read_idx(root_path / img_name)
    labels = _read_idx(root_path / lab_name).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{root_path}: {len(images)} images but {len(labels)} labels")
    return images, labels


def to_model_space(images_uint8: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """uint8 (N, H, W) or (N, C, H, W) -> float in [-1, 1], padded with background (-1) by ``pad`` pixels."""
    x = images_uint8.float().div(127.5).sub(1.0)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if pad:
        x = F.pad(x, (pad, pad, pad, pad), value=-1.0)
    return x


def to_uint8(x: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """Model-space samples (N, C, H, W) in [-1, 1] -> uint8, with the padding cropped away."""
    if pad:
        x = x[..., pad:-pad, pad:-pad]
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class FashionMNIST(torch.utils.data.Dataset):
    """Whole split held in memory as one tensor (70k x 784 bytes)."""

    def __init__(self, split: str = "train", root: str | None = None, pad: int = 0, limit: int | None = None):
        images, labels = load_fashion_mnist(split, root)
        if limit:
            images, labels = images[:limit], labels[:limit]
        self.images = torch.from_numpy(images.copy())
        self.labels = torch.from_numpy(labels.copy())
        self.pad = pad
        self.num_classes = 10

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return to_model_space(self.images[i : i + 1], self.pad)[0], self.labels[i]

    def batch(self, idx: torch.Tensor):
        """Fast batched access without a DataLoader: (x, y) for integer indices."""
        return to_model_space(self.images[idx], self.pad), self.labels[idx]
