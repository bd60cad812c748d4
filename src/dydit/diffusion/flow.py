"""Flow matching as in SiT: linear interpolant, velocity prediction, ODE/SDE samplers.

Convention (SiT): ``x_t = t * x_data + (1 - t) * noise``; t = 0 is noise, t = 1 is data; the velocity
target is ``x_data - noise``; t in [0, 1] goes straight into the timestep embedder. diffusers'
FlowMatch scheduler uses sigma = 1 - t and the negated velocity: convert at that boundary only.
"""
from __future__ import annotations

import numpy as np
import torch


class FlowMatching:
    objective = "flow"

    def __init__(self, num_steps: int = 50, t_eps: float = 0.0):
        self.num_steps = num_steps
        self.t_eps = t_eps

    # ---- path ----
    @staticmethod
    def interpolate(x_data, noise, t):
        tt = t.view(-1, *([1] * (x_data.ndim - 1)))
        return tt * x_data + (1 - tt) * noise

    @staticmethod
    def velocity_target(x_data, noise):
        return x_data - noise

    # ---- training ----
    def sample_t(self, batch_size, device, generator=None, stratified: bool = False, strata: int = 4):
        u = torch.rand(batch_size, generator=generator).to(device)
        if stratified:
            groups = np.array_split(np.arange(batch_size), strata)
            for k, g in enumerate(groups):
                u[g] = (k + u[g]) / strata
        return u

    def training_losses(self, model_fn, x_data, t, noise=None):
        if noise is None:
            noise = torch.randn_like(x_data)
        x_t = self.interpolate(x_data, noise, t)
        v = model_fn(x_t, t)
        C = x_data.shape[1]
        mse = ((v[:, :C].float() - self.velocity_target(x_data, noise)) ** 2).mean(dim=list(range(1, x_data.ndim)))
        return {"loss": mse, "mse": mse}

    def model_timesteps(self, t):
        return t

    def sampling_timesteps(self) -> list[float]:
        """Model-unit times at which an Euler run evaluates the network (for the inference plan)."""
        return [float(v) for v in torch.linspace(self.t_eps, 1.0, self.num_steps + 1)[:-1]]

    # ---- samplers ----
    def euler_sample(self, model_fn, noise, progress=None, generator=None):
        ts = torch.linspace(self.t_eps, 1.0, self.num_steps + 1)
        x = noise
        steps = range(self.num_steps)
        for i in progress(steps) if progress else steps:
            t = torch.full((x.shape[0],), float(ts[i]), device=x.device)
            v = model_fn(x, t)[:, : x.shape[1]].float()
            x = x + (ts[i + 1] - ts[i]) * v
        return x
