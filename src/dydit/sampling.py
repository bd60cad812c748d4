"""One sampling entry point for every backbone, objective and sampler, with classifier-free guidance.

Samplers by objective (all with a fixed number of network-call steps):
  diffusion (DiT, t in original 1000-step units): ``ddpm`` (ancestral, learned variance; 250 steps is
  the paper's protocol), ``ddim`` (deterministic), ``dpm++2m`` (DPM-Solver++ 2M);
  flow (SiT, t in [0, 1]): ``euler``, ``heun`` (2 calls per step), ``em`` (Euler–Maruyama SDE).
Every process object answers ``sampling_timesteps()`` (the model-unit t of each network call, in
order) and ``sample(model_fn, noise, progress, generator)``.
"""
from __future__ import annotations

import contextlib

import torch

from dydit.diffusion.flow import FLOW_SAMPLERS, FlowMatching
from dydit.diffusion.gaussian import GaussianDiffusion, ddim_or_even_spacing
from dydit.models.inputs import trusted_values

DIFFUSION_SAMPLERS = ("ddpm", "ddim", "dpm++2m")
SAMPLERS = {"diffusion": DIFFUSION_SAMPLERS, "flow": FLOW_SAMPLERS}


def default_sampler(model) -> str:
    """``ddim`` for diffusion models, ``euler`` for flow models."""
    # diffusers' FLUX has no objective field: a flow model (sampled by dydit.t2i.sample_captions)
    return "ddim" if getattr(model.config, "objective", "flow") == "diffusion" else "euler"


def make_process(model, method: str, num_steps: int):
    """The diffusion/flow process object that both samples and tells the plan which t it visits."""
    objective = model.config.objective
    if objective not in SAMPLERS:
        raise ValueError(f"unknown objective {objective!r}")
    if method not in SAMPLERS[objective]:
        raise ValueError(f"sampler {method!r} is not for {objective} models; choose from {SAMPLERS[objective]}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if objective == "flow":
        return FlowMatching(num_steps=num_steps, sampler=method)
    if method == "dpm++2m":
        from dydit.diffusion.dpm_solver import DPMSolverPlusPlus

        return DPMSolverPlusPlus(num_steps)
    if num_steps > 1000:
        raise ValueError(f"a 1000-step diffusion can be respaced to at most 1000 steps, got {num_steps}")
    # DDIM takes strided steps (0, s, 2s, ...) when the stride is exact; DDPM uses IDDPM's even spacing (ends at 999).
    respacing = ddim_or_even_spacing(1000, num_steps) if method == "ddim" else str(num_steps)
    return GaussianDiffusion(respacing=respacing, learn_sigma=model.config.learn_sigma, sampler=method,
                             clip_denoised=model.config.clip_denoised)


def video_frames(model) -> int | None:
    """Frames per sample of a video model (Latte: inputs (B, F, C, H, W)); None for image models."""
    return getattr(model.config, "num_frames", None)


def channels_first(fn):
    """A video model's f(x, t) on (B, F, C, H, W) as the diffusion processes call it: channels on dim 1.

    The processes split ε from the variance channels and broadcast per-sample coefficients along dim 1
    and over every other dimension, so a video is just a (B, C, F, H, W) tensor to them.
    """
    return lambda x, t: fn(x.transpose(1, 2), t).transpose(1, 2)


DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _autocast(fn, model, dtype: str):
    """f(x, t) whose network call runs under autocast to ``dtype`` (the sampler's arithmetic stays fp32)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if DTYPES[dtype] is None:
        return fn
    device_type = next(model.parameters()).device.type

    def cast(x, t):
        with torch.autocast(device_type, dtype=DTYPES[dtype]):
            out = fn(x, t)
        return out.float()

    return cast


def guided_model_fn(model, labels: torch.Tensor, cfg_scale: float, guided_channels: int | None, dyn=None,
                    dtype: str = "fp32"):
    """Returns f(x, t) for the sampler; with guidance, both halves run in one batch of 2B.

    ``guided_channels``: DiT guides only the first 3 predicted channels (its released convention),
    None guides every channel; flow models always guide the full velocity, as SiT does. ``dtype``
    'bf16'/'fp16' runs the network under autocast.
    """
    num_classes = model.config.num_classes
    kw = {"dyn": dyn} if dyn is not None else {}  # a dynamic model without one uses its own default
    if cfg_scale == 1.0:
        return _autocast(lambda x, t: model(x, t, labels, **kw), model, dtype)
    embedder = getattr(model, "y_embedder", None)  # unconditional models (Latte extras=1) have none
    if embedder is None or embedder.dropout_prob <= 0:
        raise ValueError("classifier-free guidance needs a class-conditional model trained with class dropout "
                         "(a null class); sample with cfg_scale=1")
    y = torch.cat([labels, torch.full_like(labels, num_classes)])
    gc = None if model.config.objective == "flow" else guided_channels

    def fn(x, t):  # (B, C, H, W), (B,) -> (B, C_out, H, W), guided
        xx = torch.cat([x, x])
        tt = torch.cat([t, t])
        out = model.forward_with_cfg(xx, tt, y, cfg_scale, guided_channels=gc, **kw)
        return out[: len(x)]

    return _autocast(fn, model, dtype)


@torch.no_grad()
def sample(model, labels, method: str = "ddim", num_steps: int = 50, cfg_scale: float = 1.0,
           guided_channels: int | None = 3, seed: int = 0, progress=None, dyn=None, noise=None,
           dtype: str = "fp32", compile=False):
    """Draws one image per label; returns model-space samples (B, C, H, W) (latents for latent models),
    or (B, F, C, H, W) videos for a video model (``noise`` in the same layout).

    ``progress`` wraps the step loop (e.g. tqdm). A dynamic model samples on the fast engine unless
    ``dyn`` says otherwise (a :class:`dydit.dynamic.DynamicContext` or a mode name: ``"masked"``,
    ``"complete"``); its plan covers every timestep the sampler will query before the first step.
    ``dtype`` 'bf16' (or 'fp16') runs each network call under autocast; the sampler stays in fp32.
    ``compile`` (True, a backend name or a dict of ``torch.compile`` options) runs every block under
    ``torch.compile``: a dynamic model's fast path (``dydit.dynamic.compiled``), a static model's (or
    ``dyn="complete"``'s) static blocks; the first call of each block layout compiles.
    """
    cfg = model.config
    device = next(model.parameters()).device
    labels = torch.as_tensor(labels, device=device, dtype=torch.long)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D list of class ids, got shape {tuple(labels.shape)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= cfg.num_classes):
        raise ValueError(f"class ids must be in [0, {cfg.num_classes}); got {labels.tolist()}")
    gen = torch.Generator().manual_seed(seed)
    frames = video_frames(model)
    if noise is None:
        shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
        noise = torch.randn(len(labels), *((frames,) if frames else ()), *shape, generator=gen).to(device)
    process = make_process(model, method, num_steps)
    compiling = contextlib.nullcontext()
    if compile:
        dyn, compiling = _compiled(model, dyn, compile)  # entered around the sampling loop only
    fn = guided_model_fn(model, labels, cfg_scale, guided_channels, dyn, dtype)
    if frames:
        fn, noise = channels_first(fn), noise.transpose(1, 2)
    was_training = model.training
    model.eval()  # training mode would drop labels and draw gumbel noise in the routers
    try:
        ctx = dyn
        if ctx is None and getattr(model, "dynamic_config", None) is not None:
            from dydit.dynamic.context import default_context

            ctx = default_context(model)
        if hasattr(ctx, "prepare"):  # a context (a mode name plans lazily, step by step)
            ctx.prepare(model, process)
        with compiling, trusted_values():  # labels checked above, timesteps made by the process: no per-step sync
            out = process.sample(fn, noise, progress=progress, generator=gen)
        return out.transpose(1, 2) if frames else out
    finally:
        model.train(was_training)


def _compiled(model, dyn, compile):
    """(``dyn``, a context manager) of a compiled sampling run: what to pass the model, and what compiles
    its blocks while entered."""
    from dydit.dynamic.compiled import compile_options, compiled_blocks
    from dydit.dynamic.context import DynamicContext

    options = compile_options(compile)
    mode = dyn.mode if isinstance(dyn, DynamicContext) else (dyn or "auto")
    if getattr(model, "dynamic_config", None) is None or mode in ("complete", "static"):
        return dyn, compiled_blocks(model, options)  # the static blocks, compiled
    if mode not in ("auto", "fast"):
        raise ValueError(f"compile runs the fast engine (or the complete/static network) compiled; the {mode!r} "
                         "mode has no compiled path: sample it without compile")
    if not isinstance(dyn, DynamicContext):
        return DynamicContext(mode, compile=options), contextlib.nullcontext()

    @contextlib.contextmanager
    def compiling():  # the caller's context, compiled for this run only
        previous, dyn.compile = dyn.compile, options
        try:
            yield
        finally:
            dyn.compile = previous

    return dyn, compiling()
