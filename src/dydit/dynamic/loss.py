"""The FLOPs-constrained objective: w·(mean_b r_b − λ_t)², with λ_t ramping 1 → λ."""
from __future__ import annotations

import torch


def target_at(step: int, target: float, ramp_steps: int) -> float:
    """λ_t: linear ramp from 1.0 (the static model's cost) down to ``target`` over ``ramp_steps``."""
    if ramp_steps <= 0:
        return target
    return 1.0 - (1.0 - target) * min(1.0, step / ramp_steps)


def flops_loss(ratio: torch.Tensor, target: float, weight: float = 2.0, balance: float = 0.0,
               strata: int = 4) -> torch.Tensor:
    """ratio: (B,) per-sample dynamic FLOPs ratios; penalises the batch mean's distance to target.

    ``balance`` > 0 (not in the paper) moves that share of the penalty onto each trajectory stratum:
    the batch is the stratified one (``strata`` contiguous groups, one per quarter of t), and every
    group's mean must meet the target too. At 1 each quarter of the trajectory runs at λ on average;
    the allocation across blocks, and across timesteps inside a quarter, stays learned.
    """
    batch = (ratio.mean() - target) ** 2
    if balance <= 0:
        return weight * batch
    groups = [g for g in torch.arange(len(ratio), device=ratio.device).tensor_split(strata) if len(g)]
    per = torch.stack([(ratio[g].mean() - target) ** 2 for g in groups]).mean()
    return weight * ((1.0 - balance) * batch + balance * per)
