"""DynamicContext: how the routed blocks of one forward pass run, and what they record.

Modes:
  ``train``    gumbel-sigmoid straight-through masks, applied multiplicatively (differentiable);
  ``masked``   eval threshold masks applied multiplicatively: full compute, the equality reference;
  ``fast``     the inference engine: per-timestep sliced weights and compacted token batches;
  ``complete`` routers bypassed: full width, all tokens (the warm-up "complete model").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dydit.dynamic.plan import SlicedWeights, WidthPlan

MODES = ("train", "masked", "fast", "complete")


@dataclass
class BlockUsage:
    head_mask: torch.Tensor | None  # (B, H)
    group_mask: torch.Tensor | None  # (B, G)
    token_mask: torch.Tensor | None  # (B, N)


@dataclass
class StepUsage:
    """What one fast forward actually ran (for plan reports): counts per block."""

    t: float
    batch: int
    heads: list[int]
    groups: list[int]
    tokens_kept: list[int]  # summed over the batch
    tokens_total: int  # per sample


class DynamicContext:
    def __init__(self, mode: str = "masked", tau: float | None = None, plan: WidthPlan | None = None,
                 weights: SlicedWeights | None = None, record_usage: bool = False, max_cache_bytes: int = 2 * 1024**3,
                 noise: float = 1.0):
        if mode not in MODES:
            raise ValueError(f"unknown dynamic mode {mode!r}; choose from {MODES}")
        self.mode = mode
        self.tau = tau
        self.noise = noise  # gumbel-noise scale of the train-mode masks (annealed to 0 by fine-tuning)
        self.plan = plan if plan is not None else WidthPlan()
        self.weights = weights if weights is not None else SlicedWeights(max_cache_bytes)
        self.record_usage = record_usage
        self.records: list[BlockUsage] = []
        self.usage: list[StepUsage] = []
        self.step_width = None
        self._block_pos = 0
        self._current = None

    # ---- called by backbones ----
    def active(self, block) -> bool:
        if self.mode == "complete":
            return False
        return getattr(block, "is_dynamic", False) is True

    def begin_forward(self, model, t: torch.Tensor, t_emb: torch.Tensor):
        self.records = []
        self._block_pos = 0
        self.dynamic_config = model.dynamic_config
        if self.tau is None:
            self.tau = model.dynamic_config.tau
        if self.mode == "fast":
            t0 = t.reshape(-1)[0]
            if not bool((t == t0).all()):
                raise ValueError("the fast dynamic path needs one timestep for the whole batch (as in sampling); "
                                 "use mode='masked' for mixed timesteps")
            self.step_width = self.plan.get(model, float(t0))
            if hasattr(self.weights, "begin_step"):  # e.g. TD-LoRA: weights that depend on t
                self.weights.begin_step(float(t0), t_emb[:1])
            if self.record_usage:
                n = len(self.step_width)
                self._current = StepUsage(float(t0), t.numel(), [0] * n, [0] * n, [0] * n, model.config.num_tokens)
                self.usage.append(self._current)

    def next_block(self) -> int:
        i = self._block_pos
        self._block_pos += 1
        return i

    def record(self, head_mask, group_mask, token_mask):
        self.records.append(BlockUsage(head_mask, group_mask, token_mask))

    def record_fast(self, i: int, heads: int, groups: int, tokens_kept: int):
        if self._current is not None:
            self._current.heads[i] = heads
            self._current.groups[i] = groups
            self._current.tokens_kept[i] = tokens_kept

    # ---- called by samplers ----
    def prepare(self, model, process):
        """Precomputes the width plan for every timestep the sampler will visit."""
        if self.mode == "fast" and hasattr(process, "sampling_timesteps"):
            self.plan.compute(model, process.sampling_timesteps())
