"""The inference plan: per sampler timestep, per block, which slots of every routed unit run.

Width routers see only the timestep embedding, so the whole plan is known before sampling starts.
Weights restricted to each distinct active set are cached (memory-bounded) and shared by every step
that uses the same set, so a step runs a static, narrower network.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from dydit.dynamic.adapters import GATE, block_adapter, model_adapter


class BlockWidth:
    """Active slots of every routed unit of one block at one timestep."""

    def __init__(self, heads=None, groups=None, slots: dict | None = None, primary=("attn", "mlp"),
                 skipped: bool = False):
        """Either ``slots`` (unit name -> active ids) with the names of the primary head and group unit, or
        ``heads``/``groups`` tensors for a block with one unit of each (named by ``primary``)."""
        if slots is None:
            slots = {primary[0]: heads, primary[1]: groups}
        self.slots = {k: v for k, v in slots.items() if v is not None}
        self.primary = primary
        self.skipped = skipped
        self.key = (skipped, tuple((k, tuple(v.tolist())) for k, v in sorted(self.slots.items())))

    @property
    def heads(self):
        return self.slots.get(self.primary[0])

    @property
    def groups(self):
        return self.slots.get(self.primary[1])


def time_key(t):
    """The plan's key of one routers' input: a timestep (float), or a tuple of floats when the routers
    see more scalars than t (FLUX with a guidance embedding: (t, guidance)); a 0-d/1-d tensor works too."""
    if isinstance(t, torch.Tensor):
        t = t.tolist()
    if isinstance(t, (tuple, list)):
        return tuple(round(float(v), 6) for v in t)
    return round(float(t), 6)


def _fingerprint(model, blocks, specs):
    """Version counters of what the plan depends on: the width routers, gates and the router input."""
    tensors = []
    for block, spec in zip(blocks, specs):
        for name in [u.router for u in spec.units] + [GATE]:
            r = getattr(block, name, None)
            if r is not None:
                tensors += list(r.parameters())
    for m in model_adapter(model).router_input_modules(model):
        tensors += list(m.parameters())
    return tuple((id(p), p._version) for p in tensors)


class WidthPlan:
    """Maps a plan key (a model-unit timestep, or (t, guidance) for guidance-embedding models) to one
    :class:`BlockWidth` per routed block of one model."""

    def __init__(self):
        self.steps: dict = {}
        self._model = None
        self._fingerprint = None

    def _check(self, model, blocks, specs):
        if self._model is not None and self._model() is not model:
            self.steps.clear()  # never apply another model's plan
        self._model = weakref.ref(model)
        fp = _fingerprint(model, blocks, specs)
        if self._fingerprint is not None and fp != self._fingerprint:
            self.steps.clear()  # routers or the timestep embedder changed since the plan was made
        self._fingerprint = fp

    @torch.no_grad()
    def compute(self, model, timesteps) -> "WidthPlan":
        """Evaluates every block's width routers at each key (one batched call per router).

        ``timesteps``: keys, each a timestep or a tuple (t, guidance, …) as the model adapter's
        ``router_input`` forms them; the routers see the exact values (the first seen per rounded key)."""
        adapter = model_adapter(model)
        blocks = [b for b in adapter.blocks(model) if block_adapter(b) is not None]
        specs = [block_adapter(b).spec(b, model) for b in blocks]
        self._check(model, blocks, specs)
        device = next(model.parameters()).device
        if not isinstance(timesteps, torch.Tensor):
            timesteps = [v.tolist() if isinstance(v, torch.Tensor) else v for v in timesteps]
        values = torch.as_tensor(timesteps, dtype=torch.float32).cpu()  # (T,) or (T, K)
        exact = {}
        for v in values:
            exact.setdefault(time_key(v), v)
        new = sorted(k for k in exact if k not in self.steps)
        if not new:
            return self
        t_emb = adapter.timestep_embedding(model, torch.stack([exact[k] for k in new]).to(device))  # (T, D)
        per_block = []
        for block, spec in zip(blocks, specs):
            masks = {}
            for unit in spec.units:
                router = getattr(block, unit.router, None)
                masks[unit.name] = (router.active(t_emb) if router is not None
                                    else torch.ones(len(new), unit.num_slots, dtype=torch.bool, device=device))
            gate = getattr(block, GATE, None)
            run = gate.active(t_emb)[:, 0] if gate is not None else torch.ones(len(new), dtype=torch.bool)
            primary = (spec.heads[0].name if spec.heads else None, spec.groups[0].name if spec.groups else None)
            per_block.append((masks, run.cpu(), primary))
        for i, t in enumerate(new):
            widths = []
            for masks, run, primary in per_block:
                skipped = not bool(run[i])
                slots = {k: (m[i] & ~torch.tensor(skipped)).nonzero().squeeze(1).cpu() for k, m in masks.items()}
                widths.append(BlockWidth(slots=slots, primary=primary, skipped=skipped))
            self.steps[time_key(t)] = widths
        return self

    def get(self, model, t, binding=None) -> list[BlockWidth]:
        """The widths at key ``t`` (computed on first use, and again after the routers changed).

        ``binding`` (a context's :class:`~dydit.dynamic.context.ModelBinding` of ``model``) saves
        re-reading the block specs on every forward."""
        k = time_key(t)
        if self._model is None or self._model() is not model or k not in self.steps:
            self.compute(model, [t])
        elif self._fingerprint is not None:
            if binding is not None:
                blocks, specs = binding.blocks, binding.specs
            else:
                adapter = model_adapter(model)
                blocks = [b for b in adapter.blocks(model) if block_adapter(b) is not None]
                specs = [block_adapter(b).spec(b, model) for b in blocks]
            if _fingerprint(model, blocks, specs) != self._fingerprint:
                self.compute(model, [t])
        return self.steps[k]


def routed_blocks(model):
    """The blocks of a dynamic model that carry routers."""
    adapter = model_adapter(model, required=False)
    if adapter is None or getattr(model, "dynamic_config", None) is None:
        return []
    return [b for b in adapter.blocks(model) if block_adapter(b) is not None]


@dataclass
class _Cache:
    max_bytes: int
    used: int = 0
    entries: dict = field(default_factory=dict)


# The fast path's default cache budget for gathered (non-contiguous) weight restrictions: none. Caching
# every distinct active set cost +14% peak memory on DiT-B/2 (docs/RESULTS.md, B2) and grows with the
# model (per-step copies of FLUX-size weights); gathering one Linear's rows on the fly is a copy of the
# narrowed matrix that the matmul then reads anyway. Contiguous restrictions (importance-ordered slots:
# the always-on slot first) are zero-copy views and never need it.
DEFAULT_CACHE_BYTES = 0


def as_range(idx):
    """``idx`` (sorted 1-D indices) as a ``slice`` when it is one contiguous run, else unchanged."""
    if idx is None or not isinstance(idx, torch.Tensor) or idx.numel() == 0:
        return idx
    first, last = int(idx[0]), int(idx[-1])
    if last - first + 1 == idx.numel() and bool((idx[1:] > idx[:-1]).all()):
        return slice(first, last + 1)
    return idx


def _as_tensor(idx, device):
    if isinstance(idx, slice):
        return torch.arange(idx.start, idx.stop, device=device)
    return idx


def _take(w: torch.Tensor, dim: int, idx):
    if idx is None:
        return w
    if isinstance(idx, slice):
        return w.narrow(dim, idx.start, idx.stop - idx.start)  # a view: no copy
    return w.index_select(dim, idx)


class SlicedWeights:
    """Narrowed weights of the fast path: views where the active set is contiguous, gathered otherwise.

    Row restrictions that form one contiguous run are views of the weight (no copy); column runs are
    strided views BLAS reads directly. Other restrictions are gathered on the fly each forward (a copy
    of the narrowed matrix, freed after use) and cached only within ``max_bytes`` (default
    :data:`DEFAULT_CACHE_BYTES`), so the dynamic model's memory stays at the static model's and no
    per-step copy of the full weights is ever kept. An entry is dropped when its weight has changed in
    place since (an optimizer step, a merge): the tensor's version counter moved.
    A layer with timestep-dependent weights (unmerged TD-LoRA experts: ``needs_merged_weights`` and
    ``merged_weight(t_emb, rows, cols)``) is folded at each step's E_t, so the step runs plain narrow
    matmuls with no adapter matmuls.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES):
        self.cache = _Cache(max_bytes)
        self.t_key: float | None = None
        self.t_emb: torch.Tensor | None = None  # (1, D)

    def begin_step(self, t, t_emb: torch.Tensor):
        """Called once per fast forward by the context: the step's timestep and its E_t row."""
        self.t_key = time_key(t)
        self.t_emb = t_emb[:1].detach()

    def _store(self, key, stamp, tensors):
        if self.cache.max_bytes <= 0:
            return tensors
        size = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        old = self.cache.entries.pop(key, None)
        if old is not None:
            self.cache.used -= old[2]
        if self.cache.used + size <= self.cache.max_bytes:
            self.cache.entries[key] = (stamp, tensors, size)
            self.cache.used += size
        return tensors

    @torch.no_grad()
    def _merged(self, module, rows, cols, key):
        if self.t_emb is None:
            raise RuntimeError("merged fast-path weights need the step's E_t: run through a DynamicContext")
        k = (id(module), self.t_key, key)
        hit = self.cache.entries.get(k)
        if hit is not None:
            return hit[1]
        dev = module.weight.device
        rows, cols = _as_tensor(rows, dev), _as_tensor(cols, dev)
        b = module.bias
        if b is not None and rows is not None:
            b = b.index_select(0, rows)
        return self._store(k, None, (module.merged_weight(self.t_emb, rows, cols), b))

    def restricted(self, module, rows, cols, key):
        """(weight, bias) of Linear ``module`` restricted to output ``rows`` and input ``cols``.

        Each of ``rows``/``cols`` is None (all), a ``slice`` (a contiguous run: views) or an index tensor."""
        if getattr(module, "needs_merged_weights", False):
            return self._merged(module, rows, cols, key)
        if rows is None and cols is None:
            return module.weight, module.bias
        w, b = module.weight, module.bias
        gathered = isinstance(rows, torch.Tensor) or isinstance(cols, torch.Tensor)
        if not gathered:  # views only: nothing to copy, nothing to cache
            return _take(_take(w, 0, rows), 1, cols), (_take(b, 0, rows) if b is not None else None)
        stamp = (w._version, w.data_ptr())
        k = (id(module), key)
        hit = self.cache.entries.get(k)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        w = _take(_take(w, 0, rows), 1, cols)
        if isinstance(rows, torch.Tensor):
            w = w.contiguous()
        if b is not None and rows is not None:
            b = _take(b, 0, rows)
        return self._store(k, stamp, (w, b))

    def clear(self):
        self.cache = _Cache(self.cache.max_bytes)
