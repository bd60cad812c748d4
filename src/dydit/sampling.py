"""One sampling entry point for every backbone, objective and sampler, with classifier-free guidance."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dydit.diffusion.flow import FlowMatching
from dydit.diffusion.gaussian import GaussianDiffusion

DIFFUSION_SAMPLERS = ("ddpm", "ddim")
FLOW_SAMPLERS = ("euler",)


@dataclass
class SamplerSpec:
    method: str = "ddim"
    num_steps: int = 50
    cfg_scale: float = 1.0
    guided_channels: int | None = 3  # DiT convention; None guides all channels


def make_process(model, method: str, num_steps: int):
    """The diffusion/flow process object that both samples and tells the plan which t it visits."""
    objective = model.config.objective
    if objective == "diffusion":
        if method not in DIFFUSION_SAMPLERS:
            raise ValueError(f"sampler {method!r} is not for diffusion models; choose from {DIFFUSION_SAMPLERS}")
        respacing = f"ddim{num_steps}" if method == "ddim" and 1000 % num_steps == 0 else str(num_steps)
        return GaussianDiffusion(respacing=respacing, learn_sigma=model.config.learn_sigma)
    if objective == "flow":
        if method not in FLOW_SAMPLERS:
            raise ValueError(f"sampler {method!r} is not for flow models; choose from {FLOW_SAMPLERS}")
        return FlowMatching(num_steps=num_steps)
    raise ValueError(f"unknown objective {objective!r}")


def guided_model_fn(model, labels: torch.Tensor, cfg_scale: float, guided_channels: int | None, dyn=None):
    """Returns f(x, t) for the sampler; with guidance, both halves run in one batch of 2B."""
    num_classes = model.config.num_classes
    if cfg_scale == 1.0:
        return lambda x, t: model(x, t, labels, dyn=dyn)
    if model.y_embedder.dropout_prob <= 0:
        raise ValueError("classifier-free guidance needs a model trained with class dropout (a null class)")
    y = torch.cat([labels, torch.full_like(labels, num_classes)])
    gc = guided_channels
    if model.config.objective == "flow" and gc == 3:
        gc = None  # SiT guides the whole velocity

    def fn(x, t):
        xx = torch.cat([x, x])
        tt = torch.cat([t, t])
        out = model.forward_with_cfg(xx, tt, y, cfg_scale, guided_channels=gc, dyn=dyn)
        return out[: len(x)]

    return fn


@torch.no_grad()
def sample(model, labels, method: str = "ddim", num_steps: int = 50, cfg_scale: float = 1.0,
           guided_channels: int | None = 3, seed: int = 0, progress=None, dyn=None, noise=None):
    """Draws one image per label; returns model-space samples (B, C, H, W)."""
    cfg = model.config
    device = next(model.parameters()).device
    labels = torch.as_tensor(labels, device=device, dtype=torch.long)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D list of class ids, got shape {tuple(labels.shape)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= cfg.num_classes):
        raise ValueError(f"class ids must be in [0, {cfg.num_classes}); got {labels.tolist()}")
    gen = torch.Generator().manual_seed(seed)
    if noise is None:
        noise = torch.randn(len(labels), cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen).to(device)
    process = make_process(model, method, num_steps)
    fn = guided_model_fn(model, labels, cfg_scale, guided_channels, dyn)
    if dyn is not None:
        dyn.prepare(model, process)
    if method == "ddpm":
        return process.ddpm_sample(fn, noise, progress=progress, generator=gen)
    if method == "ddim":
        return process.ddim_sample(fn, noise, progress=progress, generator=gen)
    if method == "euler":
        return process.euler_sample(fn, noise, progress=progress, generator=gen)
    raise ValueError(f"unknown sampler {method!r}")
