"""Image grids and plots (matplotlib/PIL; no torchvision)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8_images(x: torch.Tensor, pad: int = 0) -> np.ndarray:
    """Model-space (B, C, H, W) in [-1, 1] -> uint8 (B, H, W, C), padding cropped."""
    if pad:
        x = x[..., pad:-pad, pad:-pad]
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: np.ndarray, nrow: int, border: int = 2, scale: int = 1) -> np.ndarray:
    """uint8 (B, H, W, C) -> one (rows*H, nrow*W, C) mosaic with white borders."""
    B, H, W, C = images.shape
    rows = (B + nrow - 1) // nrow
    grid = np.full((rows * (H + border) + border, nrow * (W + border) + border, C), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, nrow)
        y0, x0 = border + r * (H + border), border + c * (W + border)
        grid[y0 : y0 + H, x0 : x0 + W] = img
    if scale > 1:
        grid = grid.repeat(scale, 0).repeat(scale, 1)
    return grid


def save_grid(x: torch.Tensor, path, nrow: int = 10, pad: int = 0, scale: int = 3) -> Path:
    images = to_uint8_images(x, pad)
    grid = make_grid(images, nrow, scale=scale)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
    return path


def video_grid_frames(videos: np.ndarray, nrow: int, scale: int = 1) -> list[np.ndarray]:
    """uint8 videos (B, F, H, W, C) -> F mosaics (one per frame index), each as :func:`make_grid` lays them out."""
    return [make_grid(videos[:, f], nrow, scale=scale) for f in range(videos.shape[1])]


def save_gif(frames: list[np.ndarray], path, fps: float = 4.0) -> Path:
    """Writes uint8 (H, W, C) frames as a looping animated GIF."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(f[..., 0] if f.shape[-1] == 1 else f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path


def save_video_grid(x: torch.Tensor, path, nrow: int = 10, pad: int = 0, scale: int = 3, fps: float = 4.0) -> Path:
    """Model-space videos (B, F, C, H, W) in [-1, 1] -> one animated GIF grid, ``nrow`` videos per row."""
    B, F = x.shape[:2]
    videos = to_uint8_images(x.flatten(0, 1), pad)  # (B·F, H, W, C)
    videos = videos.reshape(B, F, *videos.shape[1:])
    return save_gif(video_grid_frames(videos, nrow, scale=scale), path, fps)
