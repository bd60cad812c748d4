"""The FLOPs-constrained objective (METHOD.md §4): w·(mean_b r_b − λ_t)², with λ_t ramping 1 → λ."""
from __future__ import annotations

import torch


def target_at(step: int, target: float, ramp_steps: int) -> float:
    """λ_t: linear ramp from 1.0 (the static model's cost) down to ``target`` over ``ramp_steps``."""
    if ramp_steps <= 0:
        return target
    return 1.0 - (1.0 - target) * min(1.0, step / ramp_steps)


def flops_loss(ratio: torch.Tensor, target: float, weight: float = 2.0) -> torch.Tensor:
    """ratio: (B,) per-sample dynamic FLOPs ratios; penalises the batch mean's distance to target."""
    return weight * (ratio.mean() - target) ** 2
