"""Training loop shared by `dydit train` (static DiT/SiT) and `dydit finetune` (DyDiT).

Exact resumption without saving RNG streams: every random draw of step s on rank r comes from a
generator seeded with (seed, s, r), and the data order of each epoch from (seed, epoch). A checkpoint
therefore only needs model, EMA, optimizer and step to continue bit-for-bit.
"""
from __future__ import annotations

import inspect
import json
import logging
import math
import os
import time
from copy import deepcopy
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from dydit.io.atomic import atomic_torch_save
from dydit.io.runs import model_config_dict

log = logging.getLogger(__name__)

TRAIN_FORMAT = "dydit-train-v1"


@dataclass
class TrainConfig:
    """Options of `dydit train`; each field's comment is its CLI help."""

    model: str = "DiT-FMNIST"  # registry name of the architecture (ignored with --init)
    out: str = "runs/fmnist"  # output folder: checkpoints, sample grids, log.jsonl
    data: str | None = None  # Fashion-MNIST IDX folder (default: Debian's) or an ImageFolder tree
    steps: int = 3000  # total optimizer steps
    batch_size: int = 128  # global batch size (split across processes)
    lr: float = 3e-4  # AdamW learning rate
    warmup_steps: int = 200  # linear learning-rate warm-up
    lr_schedule: str = "constant"  # after the warm-up: "constant", or "cosine" (half a cosine, down to ~0 at the last step)
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0  # clip the gradient norm to this (0 disables)
    grad_skip: float = 0.0  # skip the update when the gradient norm exceeds this (0 disables)
    bf16: bool = False  # bf16 autocast (fast on GPUs; slower than fp32 on many CPUs)
    seed: int = 0
    ckpt_every: int = 500
    sample_every: int = 500  # write an EMA sample grid every N steps (0 disables)
    log_every: int = 25
    resume: bool = False  # continue from OUT/checkpoint.pt (an error if there is none)
    resume_with_changes: bool = False  # resume even though trajectory settings differ from the checkpoint's
    init: str | None = None  # start from this checkpoint's weights (EMA) instead of random
    limit_data: int | None = None  # use only the first N training images (tests)
    stop_after: int | None = None  # stop after this many steps in this run, at a checkpoint
    threads: int | None = None  # torch CPU threads
    parallel: str = "ddp"  # "ddp" (replicas), or "fsdp": FSDP2 shards weights, gradients, optimizer (dydit.fsdp)
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# distributed helpers
# ---------------------------------------------------------------------------------------------


def dist_info():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def maybe_init_distributed():
    """Initialises torch.distributed when launched by torchrun (gloo on CPU, nccl on GPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist_info()


def step_generator(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63 - 1)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 10_007 + epoch)
    return torch.randperm(n, generator=g)


def batch_indices(n: int, step: int, global_batch: int, seed: int, rank: int, world: int) -> torch.Tensor:
    """Global batch of step ``step`` (epochs without replacement), this rank's contiguous share."""
    per_epoch = n // global_batch
    if per_epoch == 0:
        raise ValueError(f"batch size {global_batch} is larger than the dataset ({n} images)")
    epoch, pos = divmod(step, per_epoch)
    perm = epoch_permutation(n, seed, epoch)
    idx = perm[pos * global_batch : (pos + 1) * global_batch]
    local = global_batch // world
    return idx[rank * local : (rank + 1) * local]


# ---------------------------------------------------------------------------------------------
# EMA and checkpoints
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float):
    ema_params = dict(ema.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            if hasattr(p, "full_tensor"):  # FSDP: the EMA is a full replica (dydit.fsdp)
                p = p.full_tensor()
            ema_params[name].mul_(decay).add_(p.detach(), alpha=1 - decay)


def save_training_checkpoint(path, model, ema, opt, step, cfg: TrainConfig, extra: dict | None = None):
    dyn = getattr(model, "dynamic_config", None)
    obj = {
        "format": TRAIN_FORMAT,
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "opt": opt.state_dict(),
        "step": step,
        "config": model_config_dict(model),
        "class": type(model).__name__,
        "dynamic": dyn.to_dict() if dyn is not None else None,
        "train_args": json.loads(json.dumps(asdict(cfg), default=str)),
    }
    if extra:
        obj.update(extra)
    atomic_torch_save(obj, path)


def load_training_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot read training checkpoint ({e}); it is truncated or not a dydit checkpoint") from e


def _save_checkpoint_or_explain(path, model, ema, opt, step, cfg, task, last_saved):
    """save_training_checkpoint; a failed write says which checkpoint is still intact."""
    from dydit.errors import WriteError
    from dydit.io.runs import what_survives

    extra = {"task": task.state_dict()} if hasattr(task, "state_dict") else None
    try:
        save_training_checkpoint(path, model, ema, opt, step, cfg, extra=extra)
    except WriteError as e:
        raise WriteError(f"{e} at step {step}; {what_survives(path, last_saved)}") from e


# ---------------------------------------------------------------------------------------------
# tasks: what a step computes
# ---------------------------------------------------------------------------------------------


def process_layout(fn, x, video: bool):
    """``(fn, x)`` as the diffusion and flow processes take them: a video model's f on (B, F, C, H, W)
    and its batch become channels-first (B, C, F, H, W) (see :func:`dydit.sampling.channels_first`);
    images pass unchanged. ``fn`` itself always sees the model's own layout."""
    if not video:
        return fn, x
    from dydit.sampling import channels_first

    return channels_first(fn), x.transpose(1, 2)


class StaticTask:
    """The backbone's own loss: IDDPM ε-MSE + VLB for diffusion, velocity MSE for flow."""

    def __init__(self, model):
        from dydit.diffusion.flow import FlowMatching
        from dydit.diffusion.gaussian import GaussianDiffusion

        obj = model.config.objective
        self.process = GaussianDiffusion(learn_sigma=model.config.learn_sigma) if obj == "diffusion" else FlowMatching()
        self.video = getattr(model.config, "num_frames", None) is not None  # x: (B, F, C, H, W)

    def loss(self, model, x, y, step, gen):
        t = self.process.sample_t(len(x), x.device, generator=gen)
        fn, x = process_layout(lambda xt, mt: model(xt, mt, y), x, self.video)
        noise = torch.randn(x.shape, generator=gen).to(x.device)
        terms = self.process.training_losses(fn, x, t, noise)
        return terms["loss"].mean(), {"loss": terms["loss"].mean().item(), "mse": terms["mse"].mean().item()}

    def progress_fields(self, logs):
        return {"loss": f"{logs['loss']:.4f}"}


def default_task(model):
    """The task of a plain `dydit train`: the backbone's own loss, or the text-to-image one for FLUX."""
    from dydit.t2i import TextToImageTask, is_text_to_image

    return TextToImageTask(model) if is_text_to_image(model) else StaticTask(model)


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------


LR_SCHEDULES = ("constant", "cosine")


def _lr_at(cfg: TrainConfig, step: int) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        span = max(cfg.steps - cfg.warmup_steps, 1)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(step - cfg.warmup_steps, span) / span))
    return cfg.lr


def build_or_load_model(cfg: TrainConfig):
    from dydit.models.dit import build_model

    if cfg.init:
        import dydit

        return dydit.load(cfg.init)
    return build_model(cfg.model)


def train(cfg: TrainConfig, model=None, task=None, dataset=None, progress: bool = True):
    """Runs (or resumes) training; returns the EMA model. ``model``/``task`` default to a static run.

    It stops only at a checkpoint: at its last step, after ``stop_after`` steps, or on SIGINT/SIGTERM (then
    it raises :class:`dydit.errors.Interrupted` once the checkpoint is written).
    """
    from dydit.io.runs import StopSignals, check_train_config

    check_train_config(cfg)
    with StopSignals() as stop:
        return _train(cfg, model, task, dataset, progress, stop)


def _train(cfg: TrainConfig, model, task, dataset, progress: bool, stop):
    from dydit.io.runs import check_data_fits, check_resume, cut_log, hold_run_lock, prepare_run_folder

    rank, world = maybe_init_distributed()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    out = Path(cfg.out)
    sharded = cfg.parallel == "fsdp"
    run_lock = None
    if rank == 0:
        prepare_run_folder(out, cfg.resume, checkpoint="checkpoint.dcp" if sharded else "checkpoint.pt")
        run_lock = hold_run_lock(out)  # released when this run ends (or its process dies)
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {cfg.lr_schedule!r}")
    if cfg.batch_size % world:
        raise ValueError(f"batch size {cfg.batch_size} is not divisible by the {world} processes")

    torch.manual_seed(cfg.seed)
    if model is None:
        model = build_or_load_model(cfg)
    model = model.to(device).train()
    if task is None:
        task = default_task(model)
    ema = deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    if sharded:  # before the optimizer: fully_shard replaces the parameters
        from dydit import fsdp

        fsdp.shard_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if hasattr(task, "configure_optimizer"):
        opt = task.configure_optimizer(model, cfg)

    start_step = 0
    ckpt_path = fsdp.checkpoint_path(out) if sharded else out / "checkpoint.pt"
    if cfg.resume and sharded:
        start_step = _resume_sharded(out, model, ema, opt, task, cfg)
    elif cfg.resume:
        ckpt = load_training_checkpoint(ckpt_path)
        check_resume(ckpt, cfg, model, ckpt_path)
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        if hasattr(task, "load_state_dict") and "task" in ckpt:
            task.load_state_dict(ckpt["task"])
        start_step = int(ckpt["step"])
        log.info("resumed from %s at step %d", ckpt_path, start_step)

    if dataset is None and hasattr(task, "make_dataset"):  # e.g. text-to-image: Captioned Fashion-MNIST
        dataset = task.make_dataset(cfg)  # None: the model's default below
    if dataset is None:
        from dydit.data import FashionMNIST, ImageFolder, LatentCache, is_image_folder

        mc = model.config
        image_tree = is_image_folder(cfg.data)
        if image_tree and mc.vae:
            from dydit.vae import load_vae

            # the VAE only runs once, to fill the cache; training then reads latents
            vae = load_vae(mc.vae, device=device)
            images = ImageFolder(cfg.data, mc.input_size * vae.downsample, channels=3, seed=cfg.seed,
                                 limit=cfg.limit_data)
            cache_path = out / "latents.safetensors"
            if rank == 0:
                dataset = LatentCache.build_or_load(images, vae, cache_path, progress=progress)
            if world > 1:
                dist.barrier()  # the other ranks read what rank 0 wrote
            if rank != 0:
                dataset = LatentCache.load(cache_path, dataset=images, vae=vae)
            del vae
        elif getattr(mc, "num_frames", None):  # a video model: Moving Fashion-MNIST (BENCHMARKS.md B4)
            from dydit.data import MovingFashionMNIST

            dataset = MovingFashionMNIST("train", cfg.data, num_frames=mc.num_frames, canvas=mc.input_size,
                                         seed=cfg.seed, limit=cfg.limit_data)
        elif image_tree:
            # input_size counts the background padding, as for Fashion-MNIST
            dataset = ImageFolder(cfg.data, mc.input_size - 2 * mc.pixel_pad, pad=mc.pixel_pad,
                                  channels=mc.in_channels, seed=cfg.seed, limit=cfg.limit_data)
        else:
            dataset = FashionMNIST("train", cfg.data, pad=mc.pixel_pad, limit=cfg.limit_data)
    check_data_fits(dataset, model)
    # FashionMNIST has no augmentation and its batch takes no step
    batch_takes_step = "step" in inspect.signature(dataset.batch).parameters
    ddp_model = model
    if world > 1 and not sharded:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=getattr(task, "find_unused_parameters", False),
        )

    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start_step, desc="train", dynamic_ncols=True)
    if rank == 0:
        cut_log(out / "log.jsonl", start_step)  # lines past the checkpoint would repeat
    log_file = open(out / "log.jsonl", "a") if rank == 0 else None
    last_saved = start_step if cfg.resume else None
    t_last, imgs_since = time.time(), 0
    step = start_step
    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, start_step + cfg.stop_after)
    while step < end and not stop.requested(world):
        idx = batch_indices(len(dataset), step, cfg.batch_size, cfg.seed, rank, world)
        x, y = dataset.batch(idx, step=step) if batch_takes_step else dataset.batch(idx)
        x, y = x.to(device), y.to(device)
        gen = torch.Generator().manual_seed(step_generator(cfg.seed, step, rank))
        torch.manual_seed(step_generator(cfg.seed + 1, step, rank))  # label dropout, gumbel noise
        for g in opt.param_groups:
            g["lr"] = _lr_at(cfg, step) * g.get("lr_scale", 1.0)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            loss, logs = task.loss(ddp_model, x, y, step, gen)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower --lr or disable --bf16")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if hasattr(gnorm, "full_tensor"):  # FSDP: the norm over every shard
            gnorm = gnorm.full_tensor()
        skipped = cfg.grad_skip > 0 and (not math.isfinite(gnorm.item()) or gnorm.item() > cfg.grad_skip)
        if not skipped:
            opt.step()
            update_ema(ema, model, cfg.ema_decay)
        step += 1
        if hasattr(task, "after_step"):  # e.g. the fine-tune's inference-ratio feedback
            task.after_step(step, model, ema, logs)
        imgs_since += cfg.batch_size
        logs.update(step=step, grad_norm=float(gnorm), lr=opt.param_groups[0]["lr"], skipped=bool(skipped))
        if sharded and (step % cfg.ckpt_every == 0 or step == cfg.steps):  # every rank writes its shards
            fsdp.save_checkpoint(out, model, ema, opt, step, _sharded_meta(model, cfg, task))
            last_saved = step
        if rank == 0:
            if step % cfg.log_every == 0 or step == end:
                now = time.time()
                logs["img_per_s"] = imgs_since / max(now - t_last, 1e-9)
                t_last, imgs_since = now, 0
                _append_log(log_file, logs, ckpt_path, last_saved)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(task.progress_fields(logs))
            if not sharded and (step % cfg.ckpt_every == 0 or step == cfg.steps):
                _save_checkpoint_or_explain(ckpt_path, model, ema, opt, step, cfg, task, last_saved)
                last_saved = step
            if cfg.sample_every and (step % cfg.sample_every == 0 or step == cfg.steps):
                write_sample_grid(ema, out / f"samples_{step:07d}.png", task)
    if sharded and step != last_saved and step > start_step:  # stop_after or a signal: every rank writes its shards
        fsdp.save_checkpoint(out, model, ema, opt, step, _sharded_meta(model, cfg, task))
        last_saved = step
    if rank == 0 and step != last_saved and step > start_step:  # stop_after or a signal: stop at a checkpoint
        _save_checkpoint_or_explain(ckpt_path, model, ema, opt, step, cfg, task, last_saved)
        last_saved = step
    if rank == 0:
        summary = memory_summary(model, params, opt, device)
        summary.update(step=step, steps=cfg.steps)
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        log.info("trainable %d of %d parameters; training state %.1f MB; peak memory %.1f MB (%s)",
                 summary["trainable_params"], summary["total_params"], summary["training_state_mb"],
                 summary["peak_memory_mb"], summary["peak_memory_kind"])
    if rank == 0 and step == cfg.steps:
        from dydit.io.native import save

        if hasattr(ema.config, "to_dict"):
            save(ema, out / "ema")
        else:  # a diffusers model (FLUX): its own folder format, which dydit.load reads
            ema.save_pretrained(out / "ema")
    if bar is not None:
        bar.close()
    if log_file:
        log_file.close()
    if world > 1:  # no rank returns before rank 0's checkpoint and ema/ are written (a resume reads them)
        dist.barrier()
    if run_lock is not None:
        run_lock.close()
    if stop.signum is not None:
        raise stop.interrupted(step, cfg.steps, ckpt_path)
    return ema


def _append_log(log_file, logs: dict, ckpt_path, last_saved):
    try:
        log_file.write(json.dumps(logs) + "\n")
        log_file.flush()
    except OSError as e:  # a full disk: say so, and what survives
        from dydit.errors import write_error
        from dydit.io.runs import what_survives

        raise write_error(e, log_file.name, kept=what_survives(ckpt_path, last_saved)) from e


def _sharded_meta(model, cfg: TrainConfig, task) -> dict:
    from dydit.dynamic.engine import base_class

    dyn = getattr(model, "dynamic_config", None)
    return {"config": model_config_dict(model), "class": base_class(model).__name__,
            "dynamic": dyn.to_dict() if dyn is not None else None,
            "train_args": json.loads(json.dumps(asdict(cfg), default=str)),
            "task": task.state_dict() if hasattr(task, "state_dict") else None}


def _resume_sharded(out: Path, model, ema, opt, task, cfg: TrainConfig) -> int:
    from dydit import fsdp
    from dydit.errors import UserError
    from dydit.io.runs import check_resume

    path = fsdp.find_checkpoint(out)
    if path is None:
        raise UserError(f"--resume: {out} holds no complete {fsdp.CHECKPOINT}; check --out, or drop --resume")
    meta = fsdp.read_meta(path)
    check_resume(meta, cfg, model, path)  # the same settings and architecture as the run it continues
    fsdp.load_checkpoint(path, model, ema, opt)
    if hasattr(task, "load_state_dict") and meta.get("task") is not None:
        task.load_state_dict(meta["task"])
    log.info("resumed from %s at step %d (written by %d processes)", path, meta["step"], meta["world_size"])
    return int(meta["step"])


def _local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def memory_summary(model, params, opt, device) -> dict:
    """Trainable share and training memory: weights + gradients + optimizer state (exact bytes), and the
    peak seen (CUDA: max allocated; CPU: the process's peak resident set, which includes the data)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in params)
    weights = sum(_local_bytes(p) for p in model.parameters())  # FSDP: this process's shards
    grads = sum(_local_bytes(p) for p in params)
    state = sum(_local_bytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim > 0)
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda max allocated"
    else:
        import resource

        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"
    return {"total_params": total, "trainable_params": trainable, "trainable_share": trainable / max(total, 1),
            "training_state_mb": (weights + grads + state) / 2**20, "peak_memory_mb": peak,
            "peak_memory_kind": kind}


@torch.no_grad()
def write_sample_grid(model, path, task=None, per_class: int = 4, steps: int = 25, cfg_scale: float = 3.0):
    """A grid with ``per_class`` rows of every class, sampled from ``model`` (usually the EMA)."""
    from dydit.sampling import default_sampler, sample
    from dydit.t2i import is_text_to_image, write_captioned_grid
    from dydit.viz import save_grid

    dyn = task.sampling_context(model) if task is not None and hasattr(task, "sampling_context") else None
    if is_text_to_image(model):  # captions under the images
        return write_captioned_grid(model, path, num=4 * per_class, steps=steps, cfg_scale=cfg_scale, dyn=dyn)
    n = model.config.num_classes
    labels = torch.arange(min(n, 10)).repeat(per_class)
    method = default_sampler(model)
    x = sample(model, labels, method=method, num_steps=steps, cfg_scale=cfg_scale, seed=0, dyn=dyn)
    if x.ndim == 5:  # a video model: an animated GIF beside the PNG name
        from dydit.viz import save_video_grid

        return save_video_grid(x, Path(path).with_suffix(".gif"), nrow=min(n, 10), pad=model.config.pixel_pad)
    if model.config.vae:  # latents -> images
        from dydit.vae import load_vae

        x = load_vae(model.config.vae, device=x.device).decode(x)
    save_grid(x, path, nrow=min(n, 10), pad=model.config.pixel_pad)
