"""Flow matching as in SiT: linear interpolant, velocity prediction, ODE/SDE samplers.

Convention (SiT): ``x_t = t * x_data + (1 - t) * noise``; t = 0 is noise, t = 1 is data; the velocity
target is ``x_data - noise``; t in [0, 1] goes straight into the timestep embedder. diffusers'
FlowMatch scheduler uses sigma = 1 - t and the negated velocity: convert at that boundary only.

Samplers integrate from t = 0 to t = 1 on a uniform grid of ``num_steps`` steps:
  ``euler``  probability-flow ODE, one network call per step;
  ``heun``   the same ODE with Heun's 2nd-order predictor-corrector, two calls per step (the last
             call is at t = 1, where the velocity is still well defined);
  ``em``     Euler–Maruyama on SiT's reverse SDE ``dx = [v + w(t)/2 · score] dt + sqrt(w(t)) dW``, whose
             marginals match the ODE's for any w. The score comes from the velocity under the linear
             path, ``score = (t·v - x) / (1 - t)``; we use SiT's "sigma" diffusion ``w(t) = norm·(1 - t)``,
             for which ``w·score = norm·(t·v - x)`` stays finite at both ends, so no t-interval clipping
             is needed. The last step adds no noise (SiT's "Mean" last step).
"""
from __future__ import annotations

import numpy as np
import torch

FLOW_SAMPLERS = ("euler", "heun", "em")


def _randn(x: torch.Tensor, generator) -> torch.Tensor:
    """Standard normal like ``x``, drawn on the generator's device (CPU) so seeds reproduce anywhere."""
    return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)


class FlowMatching:
    """The SiT linear path: training loss and the fixed-step samplers ``euler``, ``heun`` and ``em``."""

    objective = "flow"

    def __init__(self, num_steps: int = 50, t_eps: float = 0.0, sampler: str = "euler", diffusion_norm: float = 1.0):
        if sampler not in FLOW_SAMPLERS:
            raise ValueError(f"unknown flow sampler {sampler!r}; choose from {FLOW_SAMPLERS}")
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        self.num_steps = num_steps
        self.t_eps = t_eps
        self.sampler = sampler
        self.diffusion_norm = diffusion_norm  # SDE: w(t) = diffusion_norm * (1 - t)

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

    def time_grid(self) -> torch.Tensor:
        """(num_steps + 1,) float64 grid from t_eps (noise) to 1 (data)."""
        return torch.linspace(self.t_eps, 1.0, self.num_steps + 1, dtype=torch.float64)

    def sampling_timesteps(self) -> list[float]:
        """Model-unit times the chosen sampler queries, in call order (Heun: both calls of each step)."""
        ts = [float(v) for v in self.time_grid()]
        if self.sampler == "heun":
            return [t for i in range(self.num_steps) for t in (ts[i], ts[i + 1])]
        return ts[:-1]

    # ---- samplers ----
    def sample(self, model_fn, noise, progress=None, generator=None):
        """Runs the sampler chosen at construction; ``model_fn(x, t)`` -> (B, >=C, H, W) velocity."""
        run = {"euler": self.euler_sample, "heun": self.heun_sample, "em": self.em_sample}[self.sampler]
        return run(model_fn, noise, progress=progress, generator=generator)

    def _velocity(self, model_fn, x, t: float):
        tt = torch.full((x.shape[0],), t, device=x.device)
        return model_fn(x, tt)[:, : x.shape[1]].float()

    def euler_sample(self, model_fn, noise, progress=None, generator=None):
        """Probability-flow ODE, explicit Euler."""
        ts = self.time_grid().tolist()
        x = noise.float()
        steps = range(self.num_steps)
        for i in progress(steps) if progress else steps:
            x = x + (ts[i + 1] - ts[i]) * self._velocity(model_fn, x, ts[i])
        return x

    def heun_sample(self, model_fn, noise, progress=None, generator=None):
        """Probability-flow ODE, Heun (explicit trapezoid): Euler predictor, averaged-slope corrector."""
        ts = self.time_grid().tolist()
        x = noise.float()
        steps = range(self.num_steps)
        for i in progress(steps) if progress else steps:
            h = ts[i + 1] - ts[i]
            v = self._velocity(model_fn, x, ts[i])
            v_next = self._velocity(model_fn, x + h * v, ts[i + 1])
            x = x + 0.5 * h * (v + v_next)
        return x

    def sde_drift(self, x, v, t: float):
        """Drift ``v + w/2 · score`` of the reverse SDE, with ``w·score = norm·(t·v - x)`` (see module doc)."""
        return v + 0.5 * self.diffusion_norm * (t * v - x)

    def em_sample(self, model_fn, noise, progress=None, generator=None):
        """Euler–Maruyama on the reverse SDE; the final step is the deterministic mean update."""
        ts = self.time_grid().tolist()
        x = noise.float()
        steps = range(self.num_steps)
        for i in progress(steps) if progress else steps:
            t, h = ts[i], ts[i + 1] - ts[i]
            x_mean = x + h * self.sde_drift(x, self._velocity(model_fn, x, t), t)
            if i == self.num_steps - 1:
                x = x_mean
            else:
                x = x_mean + (self.diffusion_norm * (1 - t) * h) ** 0.5 * _randn(x, generator)
        return x
