"""Benchmark B4 quality metrics for class-conditional Moving Fashion-MNIST videos (BENCHMARKS.md B4).

A sample is a video of one Fashion-MNIST item moving on a black canvas. Every metric works from where the
item is in each frame, found without any model:

- **locating**: the intensity-weighted centroid of each frame (pixels above a small floor, so a faint
  background does not pull it) for the track, and the ``item_size`` window holding the most intensity for
  the crop — the item size is the data module's (:data:`dydit.data.moving_fmnist.ITEM_SIZE`);
- **per-frame FID and class accuracy**: each frame's window is resized to 28×28 and scored by the shipped
  FMNIST classifier (:mod:`dydit.classifier`). The reference is the Fashion-MNIST test set passed through the
  same size change as the data (area-resized to the item size, then back to 28×28 as the crops are), so that
  real clips score a FID near 0 rather than the blur of that round trip. Named "FID (FMNIST classifier,
  frame crops)": not comparable with Inception FID, nor with B1's FID on full-size images;
- **frame consistency**: the share of clips whose per-frame predictions are one class in every frame;
- **motion error**: the mean pixel distance between the located track and the best-fitting trajectory of
  the Moving-MNIST procedure that made the data (:func:`dydit.data.moving_fmnist.bouncing_trajectory`: a
  constant velocity, each component reflected at the walls). Fitted per clip: the start on each axis, the
  direction (the speed is the data's known ``step_length``; ``speed=None`` fits any velocity per axis) and a
  constant offset per axis (the centroid of an item need not be its box centre); a static, jittering or
  shuffled track fits badly.

FVD needs the I3D network's weights, which cannot be had offline: :func:`save_videos_npz` writes videos for
users' own FVD (``dydit sample --npz`` and ``dydit eval --save-npz`` write the same layout).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dydit.data.moving_fmnist import ITEM_SIZE, STEP_LENGTH

log = logging.getLogger(__name__)

VIDEO_FID_NAME = "FID (FMNIST classifier, frame crops)"
FVD_NOTE = ("FVD is not reported: it needs the I3D network's weights, which cannot be had offline; "
            "`dydit eval --save-npz` (or `dydit sample --npz`) exports the videos for your own FVD.")
BACKGROUND_FLOOR = 0.15  # intensities (in [0, 1]) at or below this do not count toward the centroid


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------


def as_video_frames(videos) -> torch.Tensor:
    """Videos as float (B, F, H, W) in [0, 1]: uint8 (B, F, H, W[, 1|3]) or (B, F, 1, H, W) in [0, 255], or
    floating model-space videos (B, F, 1, H, W) in [-1, 1] (what :func:`dydit.sampling.sample` returns)."""
    x = videos if isinstance(videos, torch.Tensor) else torch.from_numpy(np.array(videos))
    if x.ndim == 5 and x.shape[2] == 1:
        x = x[:, :, 0]
    elif x.ndim == 5 and x.shape[-1] in (1, 3):  # (B, F, H, W, C) as `dydit sample --npz` writes
        x = x[..., 0] if x.shape[-1] == 1 else x.float().mean(-1).round().to(x.dtype)
    if x.ndim != 4:
        raise ValueError(f"expected grayscale videos (B, F, H, W), (B, F, H, W, C) or (B, F, 1, H, W), "
                         f"got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    if not x.is_floating_point():
        raise ValueError(f"expected uint8 videos or floating model-space videos in [-1, 1], got {x.dtype}")
    return (x.float().clamp(-1, 1) + 1) / 2


# ---------------------------------------------------------------------------------------------
# locating the item
# ---------------------------------------------------------------------------------------------


def locate_items(frames: torch.Tensor, item_size: int = ITEM_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(track (B, F, 2) float, windows (B, F, 2) long) from frames (B, F, H, W) in [0, 1].

    ``track``: the intensity-weighted centroid minus (item_size − 1)/2, i.e. the top-left corner (y, x) of an
    item whose mass is centred in its box; unclamped and sub-pixel, for the motion fit (a rigid item's
    centroid moves exactly as its box). ``windows``: the top-left of the crop, the ``item_size`` window that
    holds the most intensity (ties, e.g. an item with dark margins, go to the one nearest the centroid's):
    on real clips it contains the whole item, where a window centred on an asymmetric item's centroid cuts
    part of it off (per-frame FID of 1,000 real test clips 1.2 instead of 4.0). Pixels at or below
    :data:`BACKGROUND_FLOOR` do not count; a frame with nothing above it counts as centred.
    """
    B, Fr, H, W = frames.shape
    if item_size > min(H, W):
        raise ValueError(f"item size {item_size} is larger than the {H}x{W} frames")
    w = (frames.double() - BACKGROUND_FLOOR).clamp(min=0)
    mass = w.sum((-1, -2))  # (B, F)
    ys = torch.arange(H, dtype=torch.float64)
    xs = torch.arange(W, dtype=torch.float64)
    cy = (w.sum(-1) * ys).sum(-1) / mass.clamp(min=1e-12)
    cx = (w.sum(-2) * xs).sum(-1) / mass.clamp(min=1e-12)
    empty = mass <= 1e-9
    cy = torch.where(empty, torch.full_like(cy, (H - 1) / 2), cy)
    cx = torch.where(empty, torch.full_like(cx, (W - 1) / 2), cx)
    half = (item_size - 1) / 2
    track = torch.stack([cy - half, cx - half], -1)
    # the window sums of every position, (B·F, H − s + 1, W − s + 1), and the most-mass ones nearest the centroid
    sums = F.avg_pool2d(w.flatten(0, 1)[:, None], item_size, stride=1)[:, 0] * item_size**2
    best = sums.flatten(1).max(1).values[:, None, None]
    wy, wx = torch.meshgrid(torch.arange(H - item_size + 1, dtype=torch.float64),
                            torch.arange(W - item_size + 1, dtype=torch.float64), indexing="ij")
    centre = track.reshape(-1, 2)
    dist = (wy[None] - centre[:, 0, None, None]) ** 2 + (wx[None] - centre[:, 1, None, None]) ** 2
    dist = torch.where(sums >= best - 1e-9 * best.clamp(min=1), dist, torch.full_like(dist, float("inf")))
    flat = dist.flatten(1).argmin(1)
    cols = W - item_size + 1
    windows = torch.stack([flat // cols, flat % cols], -1).view(B, Fr, 2)
    return track, windows


def item_crops(frames: torch.Tensor, windows: torch.Tensor, item_size: int = ITEM_SIZE, size: int = 28) -> torch.Tensor:
    """uint8 (B·F, size, size): each frame's ``item_size`` window at ``windows`` (top-left (y, x)), resized
    (nearest) to the classifier's input size."""
    B, Fr, H, W = frames.shape
    flat = frames.reshape(B * Fr, H, W)
    wy, wx = windows.reshape(-1, 2).unbind(-1)
    r = torch.arange(item_size)
    rows = (wy[:, None] + r[None])[:, :, None]  # (M, s, 1)
    cols = (wx[:, None] + r[None])[:, None, :]  # (M, 1, s)
    crops = flat[torch.arange(len(flat))[:, None, None], rows, cols]  # (M, s, s)
    return _to_classifier_size(crops, size)


def _to_classifier_size(images01: torch.Tensor, size: int) -> torch.Tensor:
    """float (M, s, s) in [0, 1] -> uint8 (M, size, size), nearest-neighbour (the crops' and the reference's
    resize). Nearest, not bilinear: on the Fashion-MNIST test images area-halved and brought back, the
    classifier is right on 84.7% with nearest and 63.8% with bilinear (91.6% on the originals)."""
    if images01.shape[-1] != size:
        images01 = F.interpolate(images01[:, None].float(), size=(size, size), mode="nearest")[:, 0]
    return (images01.clamp(0, 1) * 255).round().to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# motion: the located track against the Moving-MNIST bouncing procedure
# ---------------------------------------------------------------------------------------------


def bouncing_tracks(start: np.ndarray, velocity: np.ndarray, num_frames: int) -> np.ndarray:
    """(K, F) positions in [0, 1] of K one-axis walks of the Moving-MNIST procedure (vectorised
    :func:`dydit.data.moving_fmnist.bouncing_trajectory`, whose axes move independently)."""
    pos = np.asarray(start, dtype=np.float64).copy()
    vel = np.asarray(velocity, dtype=np.float64).copy()
    out = np.empty((len(pos), num_frames))
    for f in range(num_frames):
        pos = pos + vel
        low, high = pos <= 0, pos >= 1
        pos = np.where(low, 0.0, np.where(high, 1.0, pos))
        vel = np.where(low | high, -vel, vel)
        out[:, f] = pos
    return out


def _axis_errors(tracks: np.ndarray, candidates: np.ndarray, span: float, max_offset: float,
                 chunk: int = 64) -> np.ndarray:
    """(n, K) mean absolute error of n one-axis tracks (n, F) against K candidate walks (K, F) scaled by
    ``span`` pixels, each with its best constant offset (the mean residual, bounded by ``max_offset``)."""
    scaled = candidates * span  # (K, F)
    out = np.empty((len(tracks), len(candidates)))
    for i in range(0, len(tracks), chunk):
        resid = tracks[i : i + chunk, None, :] - scaled[None]  # (n, K, F)
        offset = np.clip(resid.mean(-1, keepdims=True), -max_offset, max_offset)
        out[i : i + chunk] = np.abs(resid - offset).mean(-1)
    return out


def motion_error(track, canvas: int, item_size: int = ITEM_SIZE, speed: float | None = STEP_LENGTH,
                 start_grid: int = 73, velocity_grid: int = 181, directions: int = 720) -> np.ndarray:
    """(B,) mean pixel error of located tracks (B, F, 2) (top-left (y, x)) against their best-fitting
    Moving-MNIST trajectories on a ``canvas`` with an ``item_size`` item.

    With ``speed`` (in units of the free range canvas − item_size per frame, the data's ``step_length``):
    the velocity is ``speed``·(sin θ, cos θ), θ fitted; ``speed=None`` fits each axis's velocity freely in
    [−0.5, 0.5]. Starts, velocities and θ are searched on grids (sub-pixel for the default 32-pixel canvas).
    """
    track = np.asarray(track.cpu() if isinstance(track, torch.Tensor) else track, dtype=np.float64)
    B, Fr, _ = track.shape
    if Fr < 3:
        raise ValueError(f"motion needs at least 3 frames, got {Fr}")
    span = float(canvas - item_size)
    if span <= 0:
        raise ValueError(f"the item ({item_size}) fills the canvas ({canvas}): nothing can move")
    starts = np.linspace(0.0, 1.0, start_grid)
    vmax = speed if speed is not None else 0.5
    velocities = np.linspace(-vmax, vmax, velocity_grid)
    s, v = np.meshgrid(starts, velocities, indexing="ij")  # (S, V)
    candidates = bouncing_tracks(s.ravel(), v.ravel(), Fr)  # (S·V, F)
    max_offset = item_size / 2  # the centroid lies inside the item's box
    per_axis = []
    for axis in range(2):
        err = _axis_errors(track[:, :, axis], candidates, span, max_offset)  # (B, S·V)
        per_axis.append(err.reshape(B, start_grid, velocity_grid).min(1))  # best start per velocity: (B, V)
    if speed is None:
        return (per_axis[0].min(1) + per_axis[1].min(1)) / 2
    theta = np.linspace(0.0, 2 * np.pi, directions, endpoint=False)
    # each direction's components, linearly interpolated on the velocity grid
    ey = np.stack([np.interp(speed * np.sin(theta), velocities, e) for e in per_axis[0]])  # (B, directions)
    ex = np.stack([np.interp(speed * np.cos(theta), velocities, e) for e in per_axis[1]])
    return (ey + ex).min(1) / 2


# ---------------------------------------------------------------------------------------------
# the reference: Fashion-MNIST test images through the data's size change
# ---------------------------------------------------------------------------------------------


def crop_reference_statistics(classifier=None, item_size: int = ITEM_SIZE, split: str = "test", data=None,
                              cache_dir=None, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the classifier features of the ``split`` images area-resized to ``item_size`` (as
    Moving Fashion-MNIST draws its items) and back to 28×28 (as the crops are); cached per classifier,
    images and item size."""
    from dydit.evaluate import reference_statistics

    return reference_statistics(classifier, split, data, cache_dir, limit, tag=f"crops{item_size}nearest",
                                transform=lambda images: reference_crops(images, item_size))


def reference_crops(images_uint8, item_size: int = ITEM_SIZE, size: int = 28) -> torch.Tensor:
    """uint8 (N, 28, 28) images area-resized to ``item_size`` and back to ``size`` as the crops are."""
    x = torch.from_numpy(np.array(images_uint8)).float()[:, None] / 255.0
    if item_size != x.shape[-1]:
        x = F.interpolate(x, size=(item_size, item_size), mode="area")
    return _to_classifier_size(x[:, 0], size)


# ---------------------------------------------------------------------------------------------
# scoring videos
# ---------------------------------------------------------------------------------------------


def evaluate_videos(videos, labels=None, item_size: int = ITEM_SIZE, speed: float | None = STEP_LENGTH,
                    classifier=None, reference=None, data=None, cache_dir=None) -> dict:
    """B4 quality of videos (see :func:`as_video_frames` for the layouts) with requested ``labels``
    (optional): per-frame FID and class accuracy, frame consistency, motion error (pixels)."""
    from dydit.classifier import load_classifier, predict
    from dydit.evaluate import feature_statistics, frechet_distance

    frames = as_video_frames(videos)
    B, Fr, H, W = frames.shape
    if B == 0:
        raise ValueError("no videos to score")
    classifier = classifier if classifier is not None else load_classifier()
    track, windows = locate_items(frames, item_size)
    crops = item_crops(frames, windows, item_size, classifier.config.image_size)
    feats, preds = predict(classifier, crops)
    preds = preds.view(B, Fr)
    if reference is None:
        reference = crop_reference_statistics(classifier, item_size, data=data, cache_dir=cache_dir)
    motion = motion_error(track, H, item_size, speed)
    out = {
        "frame_fid": frechet_distance(*feature_statistics(feats), *reference) if len(feats) >= 2 else None,
        "frame_acc": None,
        "consistency": (preds == preds[:, :1]).all(1).double().mean().item(),
        "motion_error_px": float(motion.mean()),
        "num_videos": B,
        "num_frames": Fr,
    }
    if labels is not None:
        y = torch.as_tensor(np.asarray(labels)).long().view(-1)
        if len(y) != B:
            raise ValueError(f"{B} videos but {len(y)} labels")
        out["frame_acc"] = (preds == y[:, None]).double().mean().item()
    return out


def save_videos_npz(path, videos_uint8: np.ndarray, labels=None) -> Path:
    """Writes uint8 videos (N, F, H, W, 3) as ``arr_0`` (grayscale is replicated to RGB, as video
    evaluators expect) and the requested labels as ``arr_1``: the input of users' own FVD (I3D weights
    cannot be had offline, so dydit does not compute FVD)."""
    v = np.asarray(videos_uint8)
    if v.dtype != np.uint8 or v.ndim != 5:
        raise ValueError(f"expected uint8 videos (N, F, H, W, C), got {v.dtype} {v.shape}")
    if v.shape[-1] == 1:
        v = np.repeat(v, 3, axis=-1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"arr_0": v}
    if labels is not None:
        arrays["arr_1"] = np.asarray(labels)
    with open(path, "wb") as f:  # a file object keeps the name as given (np.savez would append .npz)
        np.savez(f, **arrays)
    return path


def is_video_array(images) -> bool:
    """Whether an .npz ``arr_0`` holds videos (N, F, H, W, C) rather than images (N, H, W, C)."""
    return np.ndim(images) == 5


def evaluate_real_clips(num_videos: int = 1000, split: str = "test", num_frames: int = 8, canvas: int = 32,
                        seed: int = 0, data=None, cache_dir=None, reference=None) -> dict:
    """The metrics of real Moving Fashion-MNIST clips (the first ``num_videos`` items of ``split``): the
    ceiling a generator's scores are read against (the classifier's accuracy on halved items, the
    finite-sample FID floor, the motion error of integer item positions)."""
    from dydit.data import MovingFashionMNIST

    clips = MovingFashionMNIST(split, data, num_frames=num_frames, canvas=canvas, seed=seed, limit=num_videos)
    x, y = clips.batch(torch.arange(len(clips)))
    return evaluate_videos(x, y, item_size=clips.item_size, speed=clips.step_length, data=data, cache_dir=cache_dir,
                           reference=reference)
