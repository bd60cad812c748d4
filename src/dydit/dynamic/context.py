"""DynamicContext: how the routed blocks of a forward pass run, and what they record.

Modes:
  ``auto``     (the default) what the authors' model does: routers applied — the fast engine when the
               batch shares one timestep, the masked computation otherwise, training masks in train
               mode with gradients on;
  ``train``    gumbel-sigmoid straight-through masks, applied multiplicatively (differentiable);
  ``masked``   eval threshold masks applied multiplicatively: full compute, the equality reference;
  ``fast``     the inference engine: per-timestep sliced weights and compacted token batches;
  ``complete`` routers bypassed: full width, all tokens (the warm-up "complete model"; on request only).

A context binds what it computes (the width plan, index tables) to the model it was computed for: using
one context on a second model computes that model's own plan. A model's plan is recomputed when its
routers or timestep embedder change (their tensors' version counters move).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from dydit.dynamic.adapters import BlockSpec, block_adapter, linear_index, model_adapter
from dydit.dynamic.compiled import compile_options
from dydit.dynamic.plan import DEFAULT_CACHE_BYTES, SlicedWeights, WidthPlan, as_range

MODES = ("auto", "train", "masked", "fast", "complete")
GEOMETRY = "_dydit_geometry"  # model attribute: the token geometry of its last call (ModelAdapter.geometry)


@dataclass
class BlockUsage:
    """The masks one routed block applied in a masked/train forward (None = full)."""

    spec: BlockSpec
    masks: dict  # unit name -> (B, slots) or None
    token_mask: torch.Tensor | None  # (B, N)

    @property
    def head_mask(self):
        return self.masks[self.spec.heads[0].name] if self.spec.heads else None

    @property
    def group_mask(self):
        return self.masks[self.spec.groups[0].name] if self.spec.groups else None


@dataclass
class StepUsage:
    """What one fast forward actually ran (for plan reports): counts per block."""

    t: float | tuple  # the plan key: the timestep, or (t, guidance, …)
    batch: int
    heads: list[int]  # active slots of each block's primary head unit
    groups: list[int]  # … and of its primary group unit
    tokens_kept: list[int]  # summed over the batch
    tokens_total: int  # per sample
    # per block: unit name -> active slots, for every routed unit (FLUX double blocks: ff and ff_context)
    units: list[dict] = field(default_factory=list)


class ModelBinding:
    """What a context knows about one model: its routed blocks, their specs, its plan, index tables."""

    def __init__(self, model, plan: WidthPlan | None = None):
        adapter = model_adapter(model)
        self.model_ref = weakref.ref(model)
        self.blocks = [b for b in adapter.blocks(model) if block_adapter(b) is not None]
        self.specs = [block_adapter(b).spec(b, model) for b in self.blocks]
        self._position = {id(b): i for i, b in enumerate(self.blocks)}
        self._modules: dict = {}
        self._indices: dict = {}
        self.plan = plan if plan is not None else WidthPlan()
        self.num_tokens = adapter.num_tokens(model)
        self.geometry = model.__dict__.get(GEOMETRY)

    def follow_geometry(self, model):
        """Re-reads the specs when the model's token geometry changed (another resolution or prompt
        length): the units and index tables stay, the token counts of the FLOPs description move."""
        geometry = model.__dict__.get(GEOMETRY)
        if geometry != self.geometry:
            self.specs = [block_adapter(b).spec(b, model) for b in self.blocks]
            self.num_tokens = model_adapter(model).num_tokens(model)
            self.geometry = geometry

    def position(self, block) -> int | None:
        i = self._position.get(id(block))
        return i if i is not None and self.blocks[i] is block else None

    def module(self, index: int, path: str):
        key = (index, path)
        m = self._modules.get(key)
        if m is None:
            m = self._modules[key] = self.blocks[index].get_submodule(path)
        return m

    def indices(self, index: int, width, path: str, module):
        key = (index, width.key, path)
        hit = self._indices.get(key)
        if hit is None:
            spec = self.specs[index]
            dev = module.weight.device
            slots = {k: v.to(dev) for k, v in width.slots.items()}
            hit = (as_range(linear_index(spec, path, "out", slots, module.out_features)),
                   as_range(linear_index(spec, path, "in", slots, module.in_features)))
            self._indices[key] = hit
        return hit


class DynamicContext:
    def __init__(self, mode: str = "auto", tau: float | None = None, plan: WidthPlan | None = None,
                 weights: SlicedWeights | None = None, record_usage: bool = False, max_cache_bytes: int = DEFAULT_CACHE_BYTES,
                 noise: float = 1.0, record_tokens: bool = False, compile=False, token_noise: float | None = None):
        if mode not in MODES:
            raise ValueError(f"unknown dynamic mode {mode!r}; choose from {MODES}")
        self.mode = mode
        self.tau = tau
        self.noise = noise  # gumbel-noise scale of the train-mode masks (annealed to 0 by fine-tuning)
        # the token routers' own scale (None: the same as the width routers'; 0: deterministic token masks)
        self.token_noise = noise if token_noise is None else token_noise
        self._given_plan = plan
        self.weights = weights if weights is not None else SlicedWeights(max_cache_bytes)
        self.record_usage = record_usage
        # record_tokens: keep every routed block's token mask of every fast/masked forward, as
        # (plan key, block index, (B, N) bool on the CPU), for token-keep maps and spatial selectivity
        self.record_tokens = record_tokens
        # compile: run the fast path's blocks under torch.compile (True, a backend name or a dict of
        # torch.compile options; dynamic/compiled.py); None here when off. Other modes stay eager.
        self.compile = compile_options(compile)
        self.token_masks: list[tuple[float | tuple, int, torch.Tensor]] = []
        self.records: list[BlockUsage] = []
        self.usage: list[StepUsage] = []
        self.step_width = None
        self.current_mode = None
        self.t_emb = None
        self.binding: ModelBinding | None = None
        self._bindings: dict[int, ModelBinding] = {}
        self._current = None

    def __deepcopy__(self, memo):  # a copied model gets a fresh context, not this one's caches
        return DynamicContext(self.mode, self.tau, None, type(self.weights)(self.weights.cache.max_bytes),
                              self.record_usage, noise=self.noise, compile=self.compile or False,
                              token_noise=self.token_noise)

    @property
    def plan(self) -> WidthPlan:
        """The width plan of the model this context ran last (or the plan it was given)."""
        if self.binding is not None:
            return self.binding.plan
        if self._given_plan is None:
            self._given_plan = WidthPlan()
        return self._given_plan

    def bind(self, model) -> ModelBinding:
        b = self._bindings.get(id(model))
        if b is None or b.model_ref() is not model:
            plan, self._given_plan = self._given_plan, None  # a given plan belongs to the first model
            b = self._bindings[id(model)] = ModelBinding(model, plan)
        self.binding = b
        return b

    # ---- called by the engine ----
    def begin_forward(self, model, t: torch.Tensor, t_emb: torch.Tensor):
        """``t``: the plan keys of the batch, (B,) timesteps or (B, K) (t, guidance, …); ``t_emb`` (B, D)."""
        binding = self.bind(model)
        binding.follow_geometry(model)
        self.records = []
        self.dynamic_config = model.dynamic_config
        if self.tau is None:
            self.tau = model.dynamic_config.tau
        t = t.reshape(t.shape[0], -1) if t.ndim > 1 else t.reshape(-1)
        shared = bool((t == t[0]).all())
        mode = self.mode
        if mode == "auto":
            mode = "train" if model.training and torch.is_grad_enabled() else ("fast" if shared else "masked")
        self.current_mode = mode
        self.t_emb = t_emb
        key = t[0].tolist()  # the exact key (a float, or a list for (t, guidance, …))
        self.t_value = tuple(key) if isinstance(key, list) else key
        if mode == "fast":
            if not shared:
                raise ValueError("the fast dynamic path needs one timestep for the whole batch (as in sampling); "
                                 "use mode='masked' (or the default 'auto') for mixed timesteps")
            t0 = key
            self.step_width = binding.plan.get(model, t0, binding)
            if hasattr(self.weights, "begin_step"):  # e.g. TD-LoRA: weights that depend on t
                self.weights.begin_step(t0, t_emb[:1])
            if self.record_usage:
                n = len(self.step_width)
                key = tuple(t0) if isinstance(t0, list) else t0
                self._current = StepUsage(key, t.shape[0], [0] * n, [0] * n, [0] * n, binding.num_tokens,
                                          [{} for _ in range(n)])
                self.usage.append(self._current)

    def record(self, spec, masks, token_mask):
        self.records.append(BlockUsage(spec, masks, token_mask))

    def record_token_mask(self, index: int, keep: torch.Tensor):
        if self.record_tokens:
            self.token_masks.append((self.t_value, index, keep.detach().bool().cpu()))

    def record_fast(self, i: int, heads: int, groups: int, tokens_kept: int, units: dict | None = None):
        if self._current is not None:
            self._current.heads[i] = heads
            self._current.groups[i] = groups
            self._current.tokens_kept[i] = tokens_kept
            if units is not None:
                self._current.units[i] = units

    # ---- called by samplers ----
    def prepare(self, model, process):
        """Precomputes the width plan for every timestep the sampler will visit."""
        if self.mode in ("fast", "auto") and hasattr(process, "sampling_timesteps"):
            binding = self.bind(model)
            first = next(binding.blocks[0].parameters(), None) if binding.blocks else None
            if first is not None and hasattr(first, "full_tensor"):  # a DTensor: sharded by FSDP
                raise ValueError("this model's weights are FSDP-sharded; the plan and the fast engine need full "
                                 "weights: sample from the gathered EMA that training returns, or its saved ema/ folder")
            binding.plan.compute(model, process.sampling_timesteps())


def default_context(model) -> DynamicContext:
    """The context a plain call of a dynamic model uses (mode ``auto``, kept with the model)."""
    ctx = model.__dict__.get("_dydit_context")
    if ctx is None:
        ctx = model.__dict__["_dydit_context"] = DynamicContext("auto")
    return ctx


def resolve_context(model, dyn) -> DynamicContext | None:
    """The context of one call: ``dyn`` itself, a mode name, or the model's default; None = complete."""
    if dyn is None:
        dyn = default_context(model)
    elif isinstance(dyn, str):
        if dyn not in MODES and dyn != "static":
            raise ValueError(f"dyn={dyn!r}: choose a DynamicContext or one of {MODES}")
        if dyn in ("complete", "static"):
            return None
        contexts = model.__dict__.setdefault("_dydit_contexts", {})
        dyn = contexts.setdefault(dyn, DynamicContext(dyn))
    elif not isinstance(dyn, DynamicContext):
        raise TypeError(f"dyn must be a DynamicContext or a mode name, got {type(dyn).__name__}")
    if dyn.mode == "complete":
        return None
    return dyn
