"""Sharded sampling: exactly K class-balanced samples in an ADM ``.npz``, from any number of processes.

What a sample is never depends on how many processes draw it. Sample ``i`` asks for class
``classes[i % len(classes)]``; the K samples are cut into shards of ``shard_size`` (the sampling batch),
and shard ``s`` takes its initial noise and any sampler noise from one generator seeded with
``seed * 100_003 + s`` — how one-process `dydit sample` seeds its batches. So a run on N processes
writes the same bytes as a run on one (on the same kind of device with the same thread settings).

The shards go, each written atomically, into a work folder beside the output (``OUT.npz.parts/``,
with ``settings.json`` naming what they were drawn with). A rerun with the same settings skips the
shards that exist, so a killed run resumes without redoing finished work; a rerun with other
settings is refused rather than mixing samples. Rank 0 hands the missing shards out round-robin,
and when every shard exists assembles them into ``OUT.npz`` (``arr_0`` uint8 (K, H, W, 3),
``arr_1`` int64 labels) and removes the work folder. Processes must share the file system.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dydit.io.atomic import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

SETTINGS = "settings.json"


def shard_seed(seed: int, index: int) -> int:
    """Seed of shard ``index``'s generator (= `dydit sample`'s seed of its batch ``index``)."""
    return seed * 100_003 + index


@dataclass(frozen=True)
class ShardPlan:
    """Which samples exist and how they are cut: everything a sample depends on except the model."""

    num_samples: int
    shard_size: int
    classes: tuple[int, ...]
    seed: int = 0

    def __post_init__(self):
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.shard_size < 1:
            raise ValueError(f"shard size (the batch size) must be >= 1, got {self.shard_size}")
        if not self.classes:
            raise ValueError("no classes to sample")

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def bounds(self, index: int) -> tuple[int, int]:
        start = index * self.shard_size
        return start, min(start + self.shard_size, self.num_samples)

    def labels(self, index: int) -> torch.Tensor:
        """Requested classes of shard ``index`` (B,), cycling through ``classes`` over the whole run."""
        start, stop = self.bounds(index)
        return torch.tensor(self.classes, dtype=torch.long)[torch.arange(start, stop) % len(self.classes)]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["classes"] = list(self.classes)
        return d


def parts_dir(npz) -> Path:
    """The work folder of the shards of ``npz``."""
    npz = Path(npz)
    return npz.with_name(npz.name + ".parts")


def shard_path(parts: Path, index: int) -> Path:
    return parts / f"shard_{index:06d}.npz"


def finished_shards(npz, plan: ShardPlan) -> list[int]:
    """Indices of the shards already written for ``npz`` (a shard file only exists once complete)."""
    parts = parts_dir(npz)
    return [s for s in range(plan.num_shards) if shard_path(parts, s).exists()]


def model_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the weights (names, dtypes, shapes, bytes): which model finished shards came from."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# the .npz files
# ---------------------------------------------------------------------------------------------


def write_npz(path, **arrays):
    """An ``np.load``-able .npz written atomically and byte for byte reproducibly.

    ``np.savez`` stamps each member with the current time; here every member carries a fixed date, so
    equal arrays give equal files.
    """
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, array in arrays.items():
                buf = io.BytesIO()
                np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.external_attr = 0o644 << 16
                zf.writestr(info, buf.getvalue())


def adm_arrays(images: np.ndarray, labels) -> dict:
    """The ADM evaluation layout: ``arr_0`` uint8 (N, H, W, 3) (gray replicated), ``arr_1`` int64 labels."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected uint8 images (N, H, W, 1 or 3), got {images.dtype} {images.shape}")
    rgb = np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images
    return {"arr_0": rgb, "arr_1": np.asarray(labels, dtype=np.int64)}


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------


def _dist():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist
    return None


def _claim_parts(npz, plan: ShardPlan, settings: dict) -> list[int]:
    """Rank 0: prepares the work folder; returns the missing shards. Raises if it holds other settings."""
    parts = parts_dir(npz)
    wanted = {"plan": plan.to_dict(), **settings}
    recorded = parts / SETTINGS
    if recorded.exists():
        have = json.loads(recorded.read_text())
        if have != wanted:
            diff = sorted(k for k in set(have) | set(wanted) if have.get(k) != wanted.get(k))
            raise ValueError(f"{parts} holds shards drawn with other settings ({', '.join(diff)} differ); delete it "
                             "to start over, or rerun with the same settings to resume")
    else:
        parts.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps(wanted, indent=2, sort_keys=True) + "\n", recorded)
    for stale in parts.glob(".*.tmp"):  # a write cut short by a killed process
        stale.unlink(missing_ok=True)
    done = set(finished_shards(npz, plan))
    return [s for s in range(plan.num_shards) if s not in done]


def sample_sharded(npz, plan: ShardPlan, draw: Callable[[torch.Tensor, int], np.ndarray], settings: dict,
                   on_shard: Callable[[int], None] | None = None) -> dict | None:
    """Draws the missing shards of ``plan`` on this process's share and, on rank 0, writes ``npz``.

    ``draw(labels, seed)`` returns the uint8 images (B, H, W, C) of one shard; ``settings`` (JSON) are
    the other things the samples depend on (model digest, sampler, steps, guidance, ...): a rerun
    resumes only under equal ones. Every process of a torchrun group must call this. Returns on rank 0
    ``{"path", "num_samples", "shape", "drawn", "reused"}``, None elsewhere.
    """
    dist = _dist()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)
    message: list = [None]
    if rank == 0:
        try:
            message[0] = _claim_parts(npz, plan, json.loads(json.dumps(settings)))
        except (ValueError, OSError) as e:
            if world == 1:
                raise
            message[0] = str(e)  # every rank stops with rank 0's reason
    if dist:
        dist.broadcast_object_list(message, src=0)
    if isinstance(message[0], str):
        raise ValueError(message[0])
    missing: list[int] = message[0]
    parts = parts_dir(npz)
    mine = missing[rank::world]
    for s in mine:
        labels = plan.labels(s)
        images = np.asarray(draw(labels, shard_seed(plan.seed, s)))
        if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f"shard {s}: draw() returned {images.dtype} {images.shape}, expected uint8 "
                             f"({len(labels)}, H, W, C)")
        write_npz(shard_path(parts, s), images=images, labels=labels.numpy())
        if on_shard is not None:
            on_shard(s)
    log.info("rank %d drew %d of %d shards (%d already done)", rank, len(mine), plan.num_shards,
             plan.num_shards - len(missing))
    if dist:
        dist.barrier()  # every shard is on disk
    if rank != 0:
        return None
    return _assemble(npz, plan, drawn=len(missing))


def _assemble(npz, plan: ShardPlan, drawn: int) -> dict:
    parts = parts_dir(npz)
    images, labels = [], []
    for s in range(plan.num_shards):
        path = shard_path(parts, s)
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: a process stopped before writing it; rerun to finish")
        with np.load(path) as f:
            images.append(f["images"])
            labels.append(f["labels"])
        if not np.array_equal(labels[-1], plan.labels(s).numpy()):
            raise ValueError(f"{path} holds other labels than shard {s} of this run; delete {parts} and rerun")
    arrays = adm_arrays(np.concatenate(images), np.concatenate(labels))
    write_npz(npz, **arrays)
    shutil.rmtree(parts)
    log.info("wrote %d samples to %s", plan.num_samples, npz)
    return {"path": str(npz), "num_samples": plan.num_samples, "shape": tuple(arrays["arr_0"].shape),
            "drawn": drawn, "reused": plan.num_shards - drawn}


def init_processes() -> tuple[int, int]:
    """Joins the torchrun process group, if launched by torchrun (gloo on CPU, nccl on GPU)."""
    from dydit.train import maybe_init_distributed

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return maybe_init_distributed()
    return 0, 1


def close_processes():
    dist = _dist()
    if dist:
        dist.barrier()
        dist.destroy_process_group()


def run_sample_command(model, npz, num_samples: int, shard_size: int, classes, seed: int, draw, settings: dict,
                       grid=None, grid_columns: int = 10, echo=None):
    """`dydit sample --num-samples`: :func:`sample_sharded`, then on rank 0 a grid of the first rows and a
    line through ``echo``; leaves the torchrun process group."""
    plan = ShardPlan(num_samples, shard_size, tuple(int(c) for c in classes), seed)
    settings = {**settings, "model_sha256": model_digest(model)}
    result = sample_sharded(npz, plan, draw, settings)
    if result is not None:
        if grid:
            from PIL import Image

            from dydit.viz import make_grid

            with np.load(npz) as f:
                first = f["arr_0"][: 4 * grid_columns]
            mosaic = make_grid(first, grid_columns, scale=3 if first.shape[1] < 64 else 1)
            Path(grid).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mosaic).save(grid)
            if echo:
                echo(f"wrote a grid of the first {len(first)} samples to {grid}")
        if echo:
            echo(f"wrote {result['num_samples']} samples (uint8 {'x'.join(map(str, result['shape']))}) and their "
                 f"labels to {npz} ({result['drawn']} shards drawn, {result['reused']} reused)")
    close_processes()
    return result
