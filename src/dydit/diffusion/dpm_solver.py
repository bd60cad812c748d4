"""DPM-Solver++ (2M) for ε-prediction DiTs, through diffusers' ``DPMSolverMultistepScheduler``.

The scheduler is configured with DiT's own training schedule (linear betas 1e-4 → 0.02 over 1000
steps), so it integrates the same diffusion the network learned; its timesteps are integers in the
original 1000-step units, which is exactly what the network (and a DyDiT width plan) is indexed by.
The learned-variance channels of a DiT are ignored: the solver is deterministic and needs only ε.
"""
from __future__ import annotations

import warnings

import torch


class DPMSolverPlusPlus:
    """Multistep DPM-Solver++ of order 2 with ``num_steps`` network calls (data-prediction form)."""

    objective = "diffusion"
    sampler = "dpm++2m"

    def __init__(self, num_steps: int = 20, num_train_timesteps: int = 1000, solver_order: int = 2):
        from diffusers import DPMSolverMultistepScheduler

        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if num_train_timesteps != 1000:
            raise ValueError("the DiT linear schedule (1e-4 → 0.02) is defined for 1000 training steps")
        self.num_steps = num_steps
        self.scheduler = DPMSolverMultistepScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_start=1e-4,
            beta_end=0.02,
            beta_schedule="linear",
            prediction_type="epsilon",
            algorithm_type="dpmsolver++",
            solver_order=solver_order,
        )
        self._set_timesteps()

    def _set_timesteps(self, device=None):
        with warnings.catch_warnings():  # diffusers' np.array(tensor) trips a numpy-2 DeprecationWarning
            warnings.simplefilter("ignore", DeprecationWarning)
            self.scheduler.set_timesteps(self.num_steps, device=device)

    def sampling_timesteps(self) -> list[int]:
        """The integer model-unit timesteps queried, in call order (999 first)."""
        return [int(t) for t in self.scheduler.timesteps]

    @torch.no_grad()
    def sample(self, model_fn, noise, progress=None, generator=None):
        """``model_fn(x, t)`` -> (B, C or 2C, H, W) with ε in the first C channels; t are long (B,)."""
        self._set_timesteps(noise.device)  # also resets the multistep history: one object samples repeatedly
        x = noise.float() * self.scheduler.init_noise_sigma
        C = x.shape[1]
        steps = list(self.scheduler.timesteps)
        for t in progress(steps) if progress else steps:
            tt = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
            eps = model_fn(x, tt)[:, :C].float()
            x = self.scheduler.step(eps, t, x).prev_sample
        return x
