"""A training run's folder: the settings that define its trajectory, resuming it safely, stopping it at a
checkpoint.

`dydit train` and `dydit finetune` share one loop (:func:`dydit.train.train`); this module holds what makes
its folder trustworthy: options checked before any work, ``--resume`` refused when it would silently
change the run (other settings, another model, no checkpoint at all), ``log.jsonl`` cut back to the
checkpoint's step, temp files of a killed write removed, and SIGINT/SIGTERM turned into "finish the
step, write a checkpoint, stop".
"""
from __future__ import annotations

import json
import logging
import signal
import threading
from dataclasses import asdict
from pathlib import Path

from dydit.errors import Interrupted, UserError, check_count, check_finite, check_writable_folder

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
# TrainConfig fields that decide which weights a run produces; the others (out, ckpt_every, sample_every,
# log_every, stop_after, threads, resume) only say where and how this machine runs it.
TRAJECTORY_FIELDS = ("model", "init", "data", "steps", "batch_size", "lr", "warmup_steps", "lr_schedule",
                     "weight_decay", "ema_decay", "grad_clip", "grad_skip", "bf16", "seed", "limit_data", "extra")


def check_train_config(cfg) -> None:
    """Every option of a run, checked before anything is loaded (UserError naming the option)."""
    for option, value in (("--steps", cfg.steps), ("--batch-size", cfg.batch_size), ("--ckpt-every", cfg.ckpt_every),
                          ("log_every", cfg.log_every)):
        check_count(option, value, allow_none=False)
    for option, value in (("--limit-data", cfg.limit_data), ("--stop-after", cfg.stop_after),
                          ("--threads", cfg.threads)):
        check_count(option, value)
    for option, value in (("--sample-every", cfg.sample_every), ("--warmup-steps", cfg.warmup_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UserError(f"{option} must be a whole number >= 0, got {value!r}")
    check_finite("--lr", cfg.lr)
    if cfg.lr <= 0:
        raise UserError(f"--lr must be > 0, got {cfg.lr}")
    check_finite("--grad-clip", cfg.grad_clip, minimum=0.0)
    check_finite("grad_skip", cfg.grad_skip, minimum=0.0)
    check_finite("weight_decay", cfg.weight_decay, minimum=0.0)
    if getattr(cfg, "parallel", "ddp") not in ("ddp", "fsdp"):
        raise UserError(f"--parallel must be ddp or fsdp, got {cfg.parallel!r}")
    check_finite("--ema-decay", cfg.ema_decay)
    if not 0.0 <= cfg.ema_decay <= 1.0:
        raise UserError(f"--ema-decay must be in [0, 1], got {cfg.ema_decay}")


def prepare_run_folder(out, resume: bool, checkpoint: str = CHECKPOINT) -> Path | None:
    """Checks that ``out`` is writable and fits ``resume``; removes temp files of a killed write.

    Returns the checkpoint to resume from (None for a new run). A new run into a folder that already holds
    a checkpoint is refused (it would overwrite it), and so is ``resume`` into a folder without one (a typo
    in --out would otherwise start from scratch).
    """
    from dydit.io.atomic import remove_stale_temp_files

    out = Path(out)
    ckpt = out / checkpoint  # checkpoint.pt, or FSDP's sharded checkpoint.dcp/
    other = out / ("checkpoint.dcp" if checkpoint == CHECKPOINT else CHECKPOINT)
    if other.exists():
        raise UserError(f"{out} holds a run saved under --parallel {'fsdp' if other.suffix == '.dcp' else 'ddp'} "
                        f"({other.name}); continue it with that --parallel, or choose another --out")
    if resume and not ckpt.exists():
        raise UserError(f"--resume: {out} holds no {checkpoint} to continue from; check --out, or drop --resume "
                        "to start a new run")
    if not resume and ckpt.exists():
        raise UserError(f"{out} already holds a run ({checkpoint}); pass --resume to continue it, or choose "
                        "another --out (a new run would overwrite it)")
    check_writable_folder(out)
    for folder in (out, out / "ema"):
        if folder.is_dir():
            for f in remove_stale_temp_files(folder):
                log.info("removed %s, left by an interrupted write", f)
    return ckpt if resume else None


LOCK_NAME = ".dydit.lock"


def hold_run_lock(out):
    """An exclusive lock on the run folder for as long as the returned file stays open (the OS drops it when
    the process ends, even by SIGKILL, so no stale lock survives). A second process training into the same
    folder is refused instead of interleaving its checkpoints and log with this one's."""
    import fcntl

    f = open(Path(out) / LOCK_NAME, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise UserError(f"{out} is in use by another dydit run (it holds {LOCK_NAME}); wait for it to finish, "
                        "or choose another --out") from None
    return f


def trajectory_settings(cfg) -> dict:
    """The settings of ``cfg`` that define its trajectory, as the checkpoint stores them (JSON values)."""
    args = json.loads(json.dumps(asdict(cfg), default=str))
    return {k: args[k] for k in TRAJECTORY_FIELDS if k in args}


def settings_diff(saved: dict, current: dict) -> list[str]:
    """``key: old -> new`` for every trajectory setting that differs (nested dicts by dotted key)."""
    a, b = _flatten({k: saved.get(k) for k in TRAJECTORY_FIELDS if k in saved or k in current}), \
        _flatten({k: current.get(k) for k in TRAJECTORY_FIELDS if k in saved or k in current})
    diff = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            diff.append(f"{key.removeprefix('extra.')} {json.dumps(a.get(key))} -> {json.dumps(b.get(key))}")
    return diff


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def model_config_dict(model) -> dict:
    """The architecture a checkpoint records: dydit's config, or a diffusers model's own (FLUX)."""
    c = model.config
    return c.to_dict() if hasattr(c, "to_dict") else dict(c)


def check_resume(ckpt: dict, cfg, model, path) -> None:
    """Refuses a resume that would continue another run: other trajectory settings (unless
    ``cfg.resume_with_changes``), or a model of another architecture than the checkpoint's."""
    saved_args = ckpt.get("train_args") or {}
    if not getattr(cfg, "resume_with_changes", False):
        diff = settings_diff(saved_args, trajectory_settings(cfg))
        if diff:
            shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
            raise UserError(f"--resume: {path} was trained with other settings ({shown}); resuming would silently "
                            "change its trajectory. Rerun with the original settings, choose another --out, or "
                            "pass --resume-with-changes to continue anyway")
    saved_cfg, own_cfg = ckpt.get("config") or {}, model_config_dict(model)
    keys = sorted(k for k in set(saved_cfg) | set(own_cfg) if saved_cfg.get(k) != own_cfg.get(k) and k != "extra")
    saved_dyn = ckpt.get("dynamic")
    dyn = getattr(model, "dynamic_config", None)
    own_dyn = dyn.to_dict() if dyn is not None else None
    if keys or (saved_dyn is None) != (own_dyn is None):
        what = ", ".join(f"{k} {saved_cfg.get(k)!r} vs {own_cfg.get(k)!r}" for k in keys[:5]) or \
            f"dynamic {saved_dyn is not None} vs {own_dyn is not None}"
        raise UserError(f"--resume: {path} holds a {saved_cfg.get('name', '?')} model, not this run's "
                        f"{own_cfg.get('name', '?')} ({what}); resume with the --model (or --init) the run was "
                        "started with, or choose another --out")


def what_survives(checkpoint, last_saved: int | None) -> str:
    """For a failed write during a run: which checkpoint is intact, and how to go on."""
    if last_saved is None:
        return "no checkpoint was written yet"
    return f"the last checkpoint {checkpoint} (step {last_saved}) is intact; continue with --resume once the problem is fixed"


def cut_log(path, step: int) -> int:
    """Drops the lines of ``log.jsonl`` past ``step`` (written after the checkpoint a resume starts from), so
    that no step is logged twice; returns how many were dropped."""
    from dydit.io.atomic import atomic_write_text

    path = Path(path)
    if not path.exists():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            entry_step = json.loads(line).get("step", 0)
        except (json.JSONDecodeError, AttributeError):  # a line cut short by a kill
            dropped += 1
            continue
        if entry_step <= step:
            keep.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write_text("".join(line + "\n" for line in keep), path)
        log.info("log.jsonl: dropped %d line(s) past step %d, the checkpoint's", dropped, step)
    return dropped


class StopSignals:
    """While entered (in the main thread), SIGINT and SIGTERM ask the loop to stop at the next step boundary
    instead of killing it; a second signal of the same kind acts as usual (Ctrl-C twice aborts at once)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
        return False

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
        log.warning("%s: stopping after this step, at a checkpoint (send it again to abort at once)",
                    signal.Signals(signum).name)

    def interrupted(self, step: int, steps: int, checkpoint) -> Interrupted:
        """The error a stopped run raises once its checkpoint is written."""
        return Interrupted(f"stopped by {signal.Signals(self.signum).name} at step {step} of {steps}; {checkpoint} "
                           "holds it, continue with --resume", self.signum)

    def requested(self, world: int = 1) -> bool:
        """Whether to stop now; with several processes, every rank agrees (any rank's signal stops all)."""
        if world <= 1:
            return self.signum is not None
        import torch
        import torch.distributed as dist

        flag = torch.tensor([0 if self.signum is None else self.signum], dtype=torch.int64)
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if self.signum is None and int(flag.item()):
            self.signum = int(flag.item())
        return self.signum is not None


def check_data_fits(dataset, model) -> None:
    """The training images have the shape the model takes (a Fashion-MNIST run of DiT-Tiny, say, is refused
    here with a one-line error, not in the first forward)."""
    import inspect

    import torch

    if len(dataset) == 0:
        raise UserError("the training data holds no images; check --data and --limit-data")
    c = model.config
    if not all(hasattr(c, k) for k in ("in_channels", "input_size")):
        return  # another backbone (video, say): its own forward checks the shape
    kw = {"step": 0} if "step" in inspect.signature(dataset.batch).parameters else {}
    x, _ = dataset.batch(torch.zeros(1, dtype=torch.long), **kw)
    want = (c.in_channels, c.input_size, c.input_size)
    if x.ndim == 4 and tuple(x.shape[1:]) != want:
        raise UserError(f"the training data is {'x'.join(map(str, x.shape[1:]))} (channels x height x width) but "
                        f"model {getattr(c, 'name', '?')} takes {'x'.join(map(str, want))}; choose a --model made "
                        "for this data (`dydit models` lists them) or other --data")
