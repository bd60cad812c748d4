"""FSDP fine-tuning: torch's FSDP2 (``fully_shard``) in the one training loop, beside DDP.

``parallel="fsdp"`` (``dydit train|finetune --parallel fsdp``) shards each transformer block and then
the rest of the model over the processes: parameters, gradients and AdamW state live 1/N per rank,
and a block's full weights exist only while it runs. What else changes:

- **The DyDiT forward.** :func:`dydit.dynamic.engine.install` swaps the model's and the blocks' classes
  for dynamic subclasses, and ``fully_shard`` swaps them again for ``FSDP<Name>`` subclasses of those;
  the engine reads its base class through the MRO (``_dydit_base``) and FSDP gathers weights in forward
  hooks, so routers (parameters of their block) and contexts work unchanged. Models are made dynamic
  before they are sharded.
- **The EMA is gathered:** every rank keeps a full, unsharded EMA replica, updated each step from the
  all-gathered parameters. Everything that reads the EMA — sample grids, the fine-tune's inference-ratio
  feedback and calibration on the fast engine, the saved ``ema/`` folder — sees a plain model whose
  fast path slices real weights. It costs one all-gather of the trainable parameters per step and one
  full copy of the weights per rank, beside the sharded training state (weights, gradients and AdamW's
  two moments: 4/N of the weights' size).
- **Checkpoints are sharded** (``checkpoint.dcp/``, :mod:`torch.distributed.checkpoint`): each rank
  writes its own shards of the model and optimizer; the EMA is written once (DCP de-duplicates
  replicated tensors); ``meta.json`` holds the step, the task's state and the run's settings. A save goes
  to a temporary folder that replaces the last one only when complete. Loading reads the DCP metadata
  with an unpickler that admits only DCP's own metadata classes, and the optimizer's non-tensor
  entries with ``weights_only=True``: nothing in a checkpoint can run code. DCP reshards on load, so a
  run can also resume on another number of processes; the state loads exactly, but the continuation
  draws other noise (train() seeds each rank's draws by its rank), so it is not the same trajectory.
- Inference needs full weights: the width plan evaluates routers and the timestep embedder outside the
  blocks' forwards, where FSDP has not gathered them, so sampling from the sharded model on the fast
  engine is refused (sample from the EMA or the saved folder); its masked forward works.
- One process with ``--parallel fsdp`` runs FSDP over a group of one (same checkpoints), so a run can
  move between one process and torchrun.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from dydit.io.atomic import atomic_write_text

PARALLEL = ("ddp", "fsdp")
FSDP_FORMAT = "dydit-train-fsdp-v1"
CHECKPOINT = "checkpoint.dcp"


# ---------------------------------------------------------------------------------------------
# wrapping
# ---------------------------------------------------------------------------------------------


def ensure_process_group():
    """FSDP needs a process group: torchrun's, or a group of this one process."""
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "MASTER_ADDR" in os.environ:  # torchrun with one process
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """``fully_shard`` on every transformer block, then on the model (embedders, final layer), in place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    ensure_process_group()
    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    from dydit.dynamic.adapters import model_adapter

    adapter = model_adapter(model, required=False)
    blocks = adapter.blocks(model) if adapter is not None else list(getattr(model, "blocks", []))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded parameter (an all-gather: every rank must call it); others as they are."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def copy_into(dst: torch.Tensor, src: torch.Tensor):
    """``dst.copy_(src)`` where ``dst`` may be a sharded parameter and ``src`` the full tensor (same on every rank)."""
    if is_sharded(dst):
        from torch.distributed.tensor import distribute_tensor

        src = distribute_tensor(src.to(dst.device), dst.device_mesh, dst.placements, src_data_rank=None)
    dst.copy_(src)


def full_state_dict(module: torch.nn.Module) -> dict:
    """``module.state_dict()`` with sharded entries gathered (every rank must call it)."""
    return {k: full_tensor(v) for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# sharded checkpoints
# ---------------------------------------------------------------------------------------------


def checkpoint_path(out) -> Path:
    return Path(out) / CHECKPOINT


def _tmp_path(out) -> Path:
    return Path(out) / f".{CHECKPOINT}.tmp"


def _old_path(out) -> Path:
    return Path(out) / f".{CHECKPOINT}.old"


def _state(model, ema, opt) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, opt_sd = get_state_dict(model, opt)
    return {"model": model_sd, "optim": opt_sd, "ema": ema.state_dict()}


def save_checkpoint(out, model, ema, opt, step: int, meta: dict):
    """Collective: every rank writes its shards into ``out/checkpoint.dcp`` (replaced only when complete)."""
    import torch.distributed.checkpoint as dcp

    out = Path(out)
    rank = dist.get_rank()
    tmp, final, old = _tmp_path(out), checkpoint_path(out), _old_path(out)
    if rank == 0 and tmp.exists():
        shutil.rmtree(tmp)
    dist.barrier()
    dcp.save(_state(model, ema, opt), storage_writer=dcp.FileSystemWriter(tmp))
    if rank == 0:
        atomic_write_text(json.dumps({"format": FSDP_FORMAT, "step": step, "world_size": dist.get_world_size(),
                                      **meta}, indent=2, default=str) + "\n", tmp / "meta.json")
        if final.exists():
            if old.exists():
                shutil.rmtree(old)
            final.rename(old)
        tmp.rename(final)
        if old.exists():
            shutil.rmtree(old)
    dist.barrier()


def find_checkpoint(out) -> Path | None:
    """The last complete sharded checkpoint in ``out`` (a save cut between its two renames leaves ``.old``)."""
    for path in (checkpoint_path(out), _old_path(out)):
        if (path / "meta.json").exists():
            return path
    return None


def read_meta(path) -> dict:
    """``meta.json`` of a sharded checkpoint: step, world size, task state, the run's settings and model."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the sharded checkpoint's meta.json ({e})") from e
    if meta.get("format") != FSDP_FORMAT:
        raise ValueError(f"{path}: not a dydit FSDP checkpoint (format {meta.get('format')!r})")
    return meta


def load_checkpoint(path, model, ema, opt) -> dict:
    """Collective: loads model, optimizer (resharded to this world size) and EMA; returns ``meta.json``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    path = Path(path)
    meta = read_meta(path)
    state = _state(model, ema, opt)
    try:
        dcp.load(state, storage_reader=_SafeReader(path), planner=_SafeLoadPlanner())
    except Exception as e:
        raise ValueError(f"{path}: cannot load the sharded checkpoint ({e}); it is incomplete or was written for "
                         "another model") from e
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    ema.load_state_dict(state["ema"])
    return meta


# DCP pickles its metadata; these are the only classes it needs to be read back.
_DCP_MODULES = ("torch.distributed.checkpoint.metadata",)
_DCP_GLOBALS = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
                ("pathlib", "PureWindowsPath"), ("pathlib", "Path")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module in _DCP_MODULES or (module, name) in _DCP_GLOBALS or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"the checkpoint metadata names {module}.{name}, which is not part of "
                                     "torch.distributed.checkpoint's metadata; refusing to load it")


def _reader_class():
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        """FileSystemReader whose metadata load admits only DCP's metadata classes."""

        def read_metadata(self, *args, **kwargs):
            rank = kwargs.get("rank")
            with self.fs.create_stream(self._get_metadata_path(rank), "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader


def _SafeReader(path):
    return _reader_class()(path)


def _SafeLoadPlanner():
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class SafeLoadPlanner(DefaultLoadPlanner):
        """Non-tensor entries (the optimizer's hyper-parameters) read with ``weights_only=True``."""

        def load_bytes(self, read_item, value):
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeLoadPlanner()
