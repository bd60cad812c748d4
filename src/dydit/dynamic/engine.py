"""The dynamic engine: how a routed block runs, for every backbone, in every mode.

:func:`install` makes a model dynamic without editing its file: the model's class and each routed
block's class are swapped for thin subclasses (peft-style module replacement; state-dict keys and
``isinstance`` are unchanged) whose ``forward`` resolves a :class:`DynamicContext` and hands each block
to its adapter's dynamic forward with a :class:`BlockRun`:

- ``masked`` / ``train``: everything is computed and the router masks multiply head outputs, MLP
  channel groups and token updates (the authors' released computation; the equality reference);
- ``fast``: every :meth:`BlockRun.linear` runs the Linear restricted to the plan's active rows/columns,
  and only the kept tokens of the whole batch run the token-routed MLP;
- ``complete``: routers bypassed, the full network (the warm-up's complete model, on request only).

A plain call ``model(x, t, y)`` of a dynamic model routes: the fast engine when the batch shares one
timestep, the masked computation otherwise (and training masks in train mode with gradients on).
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from dydit.dynamic.adapters import GATE, block_adapter, model_adapter
from dydit.dynamic.context import GEOMETRY, resolve_context
from dydit.dynamic.ops import gather_tokens, scatter_add_tokens

log = logging.getLogger(__name__)
_RUNNING: list = []  # stack of the contexts of the dynamic forwards in progress (None: complete)
_WARNED: set = set()


def _pick_rows(v):
    """All tokens: a per-sample (B, C) tensor broadcast over tokens; a per-token (B, N, C) one as is."""
    return v.unsqueeze(1) if v.ndim == 2 else v


def _picker(B: int, N: int, flat_idx: torch.Tensor, sample_idx: torch.Tensor):
    """Kept tokens (M rows): a per-sample (B, C) tensor repeated per kept token, a per-token (B, N, C)
    tensor gathered at the kept tokens."""
    def pick(v):
        if v.ndim == 2:
            return v.index_select(0, sample_idx)
        return v.reshape(B * N, *v.shape[2:]).index_select(0, flat_idx)

    return pick


def _plain_linear(module):
    """The nn.Linear that computes ``module``: itself, or the base layer of an adapter wrapper (peft's LoRA
    layers) whose adapters are merged into it or disabled; None when unmerged adapters run beside it."""
    if isinstance(module, nn.Linear) or getattr(module, "needs_merged_weights", False):
        return module
    base = getattr(module, "base_layer", None)
    merged, disabled = bool(getattr(module, "merged", False)), bool(getattr(module, "disable_adapters", False))
    if isinstance(base, nn.Linear) and merged != disabled:  # merged and on, or unmerged and off: the base alone
        return base
    return None


def _wrapped_linear(module, rows, cols, x: torch.Tensor, path: str) -> torch.Tensor:
    """A Linear wrapped by an adapter (an unmerged LoRA layer) at the active rows/columns: computed at full
    width with the inactive input columns zero, so the result is exact though not narrower."""
    if path not in _WARNED:
        _WARNED.add(path)
        log.warning("%s is a %s, not a plain Linear: the fast path runs it at full width (exact, not faster); "
                    "merge the adapter (e.g. pipe.fuse_lora()) for the speedup", path, type(module).__name__)
    if cols is not None:
        full = x.new_zeros(*x.shape[:-1], module.in_features)
        full[..., cols] = x
        x = full
    out = module(x)
    return out if rows is None else out[..., rows]


class BlockRun:
    """One routed block's view of the current forward; the API adapters write their forward against."""

    def __init__(self, ctx, block, index: int):
        self.ctx, self.block, self.index = ctx, block, index
        binding = ctx.binding
        self.spec = binding.specs[index]
        self.fast = ctx.current_mode == "fast"
        self.token_mask = None
        self.kept = None
        self.samples = ctx.t_emb.shape[0]  # samples in the batch (rows of x may be samples × frames)
        if self.fast:
            self.width = ctx.step_width[index]
            self.skipped = self.width.skipped
            return
        self.skipped = False
        training = ctx.current_mode == "train"
        E = ctx.t_emb
        self.masks = {}
        for unit in self.spec.units:
            router = getattr(block, unit.router, None)
            self.masks[unit.name] = router(E, ctx.tau, training, ctx.noise) if router is not None else None
        gate = getattr(block, GATE, None)
        self.run_mask = gate(E, ctx.tau, training, ctx.noise) if gate is not None else None  # (B, 1)

    # ---- width ----
    def num_heads(self, unit: str) -> int:
        if self.fast:
            return len(self.width.slots[unit])
        return self.spec.unit(unit).num_heads

    def linear(self, path: str, x: torch.Tensor) -> torch.Tensor:
        """``block.<path>(x)``; on the fast path the Linear restricted to the active rows and columns."""
        module = self.ctx.binding.module(self.index, path)
        if not self.fast:
            return module(x)
        rows, cols = self.ctx.binding.indices(self.index, self.width, path, module)
        plain = _plain_linear(module)
        if plain is None:
            return _wrapped_linear(module, rows, cols, x, path)
        w, b = self.ctx.weights.restricted(plain, rows, cols, (self.width.key, path))
        return F.linear(x, w, b)

    def _apply(self, unit_name: str, out: torch.Tensor, repeat: int) -> torch.Tensor:
        mask = None if self.fast else self.masks.get(unit_name)
        if mask is None:
            return out
        unit = self.spec.unit(unit_name)
        if repeat > 1:  # rows of ``out`` are samples repeated (e.g. Latte's frames folded into the batch)
            mask = mask.repeat_interleave(repeat, dim=0)
        shape = out.shape
        view = out.view(*shape[:-1], unit.num_slots, unit.slot_size)
        m = mask.view(mask.shape[0], *([1] * (len(shape) - 2)), unit.num_slots, 1).to(out.dtype)
        return (view * m).reshape(shape)

    def mask_heads(self, unit: str, out: torch.Tensor, repeat: int = 1) -> torch.Tensor:
        """Concatenated head outputs (B, ..., H·hd) times the head mask (masked modes; identity when fast)."""
        return self._apply(unit, out, repeat)

    def mask_groups(self, unit: str, a: torch.Tensor, repeat: int = 1) -> torch.Tensor:
        """MLP pre-activations (B, ..., hidden) times the group mask (act(0) = 0, so masking before the
        activation removes the channel); identity when fast."""
        return self._apply(unit, a, repeat)

    # ---- block skip ----
    def gate_update(self, update: torch.Tensor, repeat: int = 1) -> torch.Tensor:
        """A residual update (B·repeat, ...) times the block gate (masked modes of the block-skip ablation)."""
        if self.fast or self.run_mask is None:
            return update
        gate = self.run_mask.repeat_interleave(repeat, dim=0) if repeat > 1 else self.run_mask
        return update * gate.view(-1, *([1] * (update.ndim - 1))).to(update.dtype)

    # ---- tokens ----
    def token_update(self, unit: str, x: torch.Tensor, update_fn, repeat: int = 1, route: tuple = ()) -> torch.Tensor:
        """x + update of the token-routed branch ``unit``; x: (B·repeat, N, D), the tokens the router sees.

        ``update_fn(z, pick)`` computes the branch's residual update for tokens ``z`` — all of x, or on the
        fast path only the kept tokens of the whole batch (M, D) — where ``pick(v)`` aligns with z's rows a
        per-row tensor v (B·repeat, C) or a per-token one (B·repeat, N, C) (e.g. the normalised tokens or
        their attention output, when the update is not a function of x alone). ``repeat`` > 1: each
        sample's tokens span ``repeat`` rows of x (Latte folds frames or patch positions into the batch);
        the recorded token mask is per sample, (B, repeat·N), so the FLOPs ratio counts a sample's tokens
        over all its rows. ``route``: further inputs of the token router (DyFLUX's: the conditioning and
        the text tokens).
        """
        name = self.spec.unit(unit).token_router
        router = getattr(self.block, name, None) if name is not None else None
        if self.fast:
            if router is None:
                self.kept = x.shape[0] * x.shape[1]
                return x + update_fn(x, _pick_rows)
            keep = router.keep(x, *route)  # (B·repeat, N)
            self.ctx.record_token_mask(self.index, keep.reshape(x.shape[0] // repeat, -1))
            if bool(keep.all()):  # nothing skipped: no gather/scatter copies (time and peak memory)
                self.kept = keep.numel()
                return x + update_fn(x, _pick_rows)
            xs, flat_idx, sample_idx = gather_tokens(x, keep)  # (M, D)
            self.kept = flat_idx.numel()
            pick = _picker(x.shape[0], x.shape[1], flat_idx, sample_idx)
            return scatter_add_tokens(x, flat_idx, update_fn(xs, pick))
        update = update_fn(x, _pick_rows)
        if router is not None:
            mask = router(x, *route, tau=self.ctx.tau, training=self.ctx.current_mode == "train",
                          noise=self.ctx.token_noise)  # (B·repeat, N)
            update = update * mask.unsqueeze(-1).to(update.dtype)
            self.token_mask = mask.reshape(x.shape[0] // repeat, -1)
            self.ctx.record_token_mask(self.index, self.token_mask > 0.5)
        return x + self.gate_update(update, repeat)

    def finish(self):
        ctx = self.ctx
        if self.fast:
            if ctx.record_usage:
                w = self.width
                ctx.record_fast(self.index, len(w.heads) if w.heads is not None else 0,
                                len(w.groups) if w.groups is not None else 0, self.kept or 0,
                                {name: len(s) for name, s in w.slots.items()})
            return
        masks = dict(self.masks)
        if self.run_mask is not None:  # the FLOPs accounting sees a skipped block as zero heads and groups
            run = self.run_mask
            for unit in self.spec.units:
                m = masks[unit.name]
                ones = torch.ones(len(run), unit.num_slots, device=run.device, dtype=run.dtype)
                masks[unit.name] = (m if m is not None else ones) * run
        ctx.record(self.spec, masks, self.token_mask)


# ---------------------------------------------------------------------------------------------
# the swapped-in forwards
# ---------------------------------------------------------------------------------------------


def _model_forward(self, *args, dyn=None, **kwargs):
    base = type(self)._dydit_base
    ctx = resolve_context(self, dyn)
    if ctx is None:  # the complete network, on explicit request
        _RUNNING.append(None)
        try:
            return base.forward(self, *args, **kwargs)
        finally:
            _RUNNING.pop()
    adapter = model_adapter(self)
    geometry = adapter.geometry(self, args, kwargs)
    if geometry is not None:
        self.__dict__[GEOMETRY] = geometry
    t, t_emb = adapter.router_input(self, args, kwargs)
    ctx.begin_forward(self, t, t_emb)
    _RUNNING.append(ctx)
    try:
        return base.forward(self, *args, **kwargs)
    finally:
        _RUNNING.pop()


def _block_forward(self, *args, **kwargs):
    ctx = _RUNNING[-1] if _RUNNING else None
    index = ctx.binding.position(self) if ctx is not None else None
    if index is None:  # outside a dynamic forward of its model: the static block
        return type(self)._dydit_base.forward(self, *args, **kwargs)
    if ctx.compile is not None and ctx.current_mode == "fast":  # the compiled fast path (dynamic/compiled.py)
        from dydit.dynamic.compiled import run_block

        out = run_block(ctx, self, index, args, kwargs)
        if out is not None:
            return out
    run = BlockRun(ctx, self, index)
    out = block_adapter(self).forward(self, run, *args, **kwargs)
    run.finish()
    return out


_CLASSES: dict[type, type] = {}


DYNAMIC_CONFIG_NAME = "dydit_dynamic.json"  # beside a diffusers folder's config.json: the DynamicConfig


def _save_pretrained(self, save_directory, *args, **kwargs):
    """diffusers' ``save_pretrained``, plus the model's DynamicConfig in ``dydit_dynamic.json``: the router
    tensors say which routers exist, this file says the rest (e.g. centred token logits)."""
    import json
    from pathlib import Path

    from dydit.io.atomic import atomic_write_text

    out = type(self)._dydit_base.save_pretrained(self, save_directory, *args, **kwargs)
    cfg = getattr(self, "dynamic_config", None)
    if cfg is not None:
        atomic_write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", Path(save_directory) / DYNAMIC_CONFIG_NAME)
    return out


def _dynamic_class(cls: type, forward) -> type:
    if getattr(cls, "_dydit_base", None) is not None:
        return cls
    if cls not in _CLASSES:
        # Same name, so saved files, reprs and error messages keep the backbone's own class name.
        namespace = {"forward": forward, "_dydit_base": cls, "__module__": cls.__module__,
                     "__qualname__": cls.__qualname__}
        if forward is _model_forward and hasattr(cls, "save_pretrained"):  # a diffusers model (FLUX)
            namespace["save_pretrained"] = _save_pretrained
        _CLASSES[cls] = type(cls.__name__, (cls,), namespace)
    return _CLASSES[cls]


def install(model):
    """Swaps the model's and its routed blocks' classes for their dynamic subclasses (idempotent)."""
    adapter = model_adapter(model)
    for block in adapter.blocks(model):
        if block_adapter(block) is None:
            raise TypeError(f"{type(block).__name__} has no registered dydit block adapter; register one with "
                            "dydit.dynamic.adapters.register_block_adapter (see docs/ARCHITECTURE.md)")
        block.__class__ = _dynamic_class(type(block), _block_forward)
    model.__class__ = _dynamic_class(type(model), _model_forward)
    return model


def base_class(module) -> type:
    """The backbone's own class of a (possibly dynamic) module."""
    return getattr(type(module), "_dydit_base", None) or type(module)
