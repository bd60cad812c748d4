"""Moving Fashion-MNIST: real Fashion-MNIST items moving and bouncing on a canvas (BENCHMARKS.md B4).

The motion is the Moving-MNIST procedure of Srivastava et al. (2015, "Unsupervised Learning of Video
Representations using LSTMs"): a start position uniform over the canvas, a direction uniform over the
circle, a constant speed of ``step_length`` (in units of the free range canvas − item) per frame, and
a reflection of the velocity component whenever the item would leave the canvas. We keep one item per
video, so each video is labelled with its item's class, and return every frame's true item position
(top-left corner, pixels) for the motion metrics.

Video ``i`` of a split shows item ``i`` of the Fashion-MNIST split on a trajectory drawn from
``numpy.random.default_rng((seed, i))``: deterministic in the seed, independent of batch order, nothing
is stored.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dydit.data.fashion_mnist import load_fashion_mnist

ITEM_SIZE = 14  # side of the item on the canvas (the 28x28 image area-resized: half size)
STEP_LENGTH = 0.2  # speed per frame, in units of the free range (canvas − item size)


def bouncing_trajectory(rng: np.random.Generator, num_frames: int, step_length: float) -> np.ndarray:
    """(num_frames, 2) positions (y, x) in [0, 1] of the Moving-MNIST bouncing walk."""
    pos = rng.random(2)  # (y, x)
    theta = rng.random() * 2 * np.pi
    vel = np.array([np.sin(theta), np.cos(theta)])
    out = np.empty((num_frames, 2))
    for f in range(num_frames):
        pos = pos + vel * step_length
        for d in range(2):  # reflect off the walls, as the original generator does
            if pos[d] <= 0:
                pos[d], vel[d] = 0.0, -vel[d]
            if pos[d] >= 1:
                pos[d], vel[d] = 1.0, -vel[d]
        out[f] = pos
    return out


class MovingFashionMNIST(torch.utils.data.Dataset):
    """Videos (F, 1, canvas, canvas) in [-1, 1] of one Fashion-MNIST item bouncing on a black canvas."""

    def __init__(self, split: str = "train", root: str | None = None, num_frames: int = 8, canvas: int = 32,
                 item_size: int = ITEM_SIZE, step_length: float = STEP_LENGTH, seed: int = 0, limit: int | None = None):
        """``item_size``: the 28x28 item is area-resized to this side (14: half size, so it has room to move
        on a 32-pixel canvas); ``step_length``: speed per frame as a fraction of the free range."""
        if not 1 <= item_size <= canvas:
            raise ValueError(f"item_size {item_size} must be in [1, canvas={canvas}]")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        images, labels = load_fashion_mnist(split, root)
        if limit:
            images, labels = images[:limit], labels[:limit]
        items = torch.from_numpy(images.copy()).float().unsqueeze(1) / 255.0  # (N, 1, 28, 28) in [0, 1]
        if item_size != items.shape[-1]:
            items = F.interpolate(items, size=(item_size, item_size), mode="area")
        self.items = items[:, 0].numpy()  # (N, s, s)
        self.labels = torch.from_numpy(labels.copy())
        self.num_frames, self.canvas, self.item_size = num_frames, canvas, item_size
        self.step_length, self.seed = step_length, seed
        self.num_classes = 10

    def __len__(self):
        return len(self.labels)

    def positions(self, i: int) -> np.ndarray:
        """(F, 2) integer top-left (y, x) pixel positions of item ``i`` in each frame."""
        rng = np.random.default_rng((self.seed, int(i)))
        traj = bouncing_trajectory(rng, self.num_frames, self.step_length)
        return np.floor(traj * (self.canvas - self.item_size)).astype(np.int64)

    def video(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(frames (F, canvas, canvas) float in [0, 1], positions (F, 2))."""
        pos = self.positions(i)
        s = self.item_size
        frames = np.zeros((self.num_frames, self.canvas, self.canvas), dtype=np.float32)
        for f, (y, x) in enumerate(pos):
            frames[f, y : y + s, x : x + s] = self.items[i]
        return frames, pos

    def __getitem__(self, i):
        x, y, _ = self.batch_with_positions(torch.tensor([int(i)]))
        return x[0], y[0]

    def batch_with_positions(self, idx: torch.Tensor):
        """(videos (B, F, 1, H, W) in [-1, 1], labels (B,), positions (B, F, 2) top-left (y, x) pixels)."""
        frames, pos = zip(*(self.video(int(i)) for i in idx))
        x = torch.from_numpy(np.stack(frames)).unsqueeze(2) * 2 - 1
        return x, self.labels[idx], torch.from_numpy(np.stack(pos))

    def batch(self, idx: torch.Tensor):
        """(x, y) for integer indices, as the training loop reads them."""
        x, y, _ = self.batch_with_positions(idx)
        return x, y
