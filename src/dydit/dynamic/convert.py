"""Static -> dynamic conversion, importance ranking, and loading the authors' DyDiT checkpoints."""
from __future__ import annotations

import logging

import torch

from dydit.dynamic.adapters import GATE, block_adapter, model_adapter
from dydit.dynamic.config import DynamicConfig
from dydit.dynamic.engine import install
from dydit.dynamic.routers import WidthRouter

log = logging.getLogger(__name__)


def dynamize(model, config: DynamicConfig | None = None, reorder: bool = False):
    """Attaches DyDiT routers to every routable block, in place, and makes the model dynamic; returns it.

    Works for any backbone with a registered adapter (:mod:`dydit.dynamic.adapters`): each head unit
    gets a width router (on the timestep embedding E_t) under the unit's router name, each group unit
    likewise, the token router and the block-skip gate go where the block's spec names them. The
    routers start fully on, so the result computes exactly the static function until fine-tuned.
    ``reorder`` first ranks heads and MLP channels by weight magnitude (the paper's importance ranking)
    so the always-on head/group is the most important one; the static function is unchanged.
    """
    config = config or DynamicConfig()
    if getattr(model, "dynamic_config", None) is not None:
        raise ValueError("model is already dynamic")
    if reorder:
        reorder_by_importance(model)
    if config.optional_units:  # a misspelt unit would silently stay at full width
        known = {u.name for b in model_adapter(model).blocks(model) if block_adapter(b) is not None
                 for u in block_adapter(b).spec(b, model).units if u.optional}
        unknown = sorted(set(config.optional_units) - known)
        if unknown:
            raise ValueError(f"optional_units {unknown} name no optional unit of this model; "
                             f"it has {sorted(known) or 'none'}")
    for block in model_adapter(model).blocks(model):
        adapter = block_adapter(block)
        if adapter is None:
            continue
        spec = adapter.spec(block, model)
        dev = next(block.parameters()).device
        for name in [u.router for u in spec.units] + [GATE, spec.token_router]:
            if name is not None:
                setattr(block, name, None)  # every router slot exists; None = not routed
        if config.width:
            for unit in spec.units:
                if unit.optional and unit.name not in config.optional_units:
                    continue
                setattr(block, unit.router, WidthRouter(spec.width_dim, unit.num_slots, config.always_on,
                                                        config.width_bias_init).to(dev))
        if config.block_skip:
            setattr(block, GATE, WidthRouter(spec.width_dim, 1, always_on=False,
                                             bias_init=config.width_bias_init).to(dev))
        if config.tokens and spec.token_router is not None:
            setattr(block, spec.token_router, adapter.make_token_router(block, spec, config).to(dev))
    model.dynamic_config = config
    install(model)
    return model


def router_parameters(model):
    return [p for n, p in model.named_parameters() if _is_router_name(n)]


def _is_router_name(name: str) -> bool:
    return any(k in name for k in ROUTER_NAMES)


ROUTER_NAMES = ("attn_rate.", "mlp_rate.", "mlp_context_rate.", "token_selection.", "block_gate.")


@torch.no_grad()
def copy_routers(src, dst):
    """Copies the router parameters of ``src`` into ``dst`` (same architecture; ``src`` may be DDP-wrapped).

    Routers are thresholded: an EMA of fast-moving router logits shifts every threshold (the λ=0.5
    Fashion-MNIST fine-tune realised 0.60 with EMA routers, 0.48 with the live ones), so an EMA model
    takes the backbone's average but the live routers.
    """
    from dydit.fsdp import copy_into, full_tensor

    live = dict(getattr(src, "module", src).named_parameters())
    for name, p in dst.named_parameters():
        if _is_router_name(name) and name in live:  # either side may be FSDP-sharded (every rank calls this)
            copy_into(p, full_tensor(live[name].detach()).to(p.device))


@torch.no_grad()
def reorder_by_importance(model):
    """Permutes the slots of every routed unit by descending weight magnitude, in place.

    A slot's importance is the L1 norm of everything it spans (a head: its q/k/v rows and its
    output-projection columns; an MLP channel: its fc1 row times its fc2 column, ranked per channel and
    then cut into contiguous groups), so slot 0 (always on) is the most important one. Generic over the
    spans of the block adapters; the static function is unchanged.
    """
    for block in model_adapter(model).blocks(model):
        adapter = block_adapter(block)
        if adapter is None:
            continue
        spec = adapter.spec(block, model)
        for unit in spec.heads:
            score = sum(_span_view(block, s, unit.num_slots, unit.slot_size).abs().sum(dim=(1, 2))
                        for s in unit.spans)
            _permute(block, unit, torch.argsort(score, descending=True), unit.num_slots, unit.slot_size)
        for unit in spec.groups:
            channels = unit.num_slots * unit.slot_size
            score = None
            for s in unit.spans:  # channel score: product over the linears it spans (fc1 row × fc2 column)
                part = _span_view(block, s, channels, 1).abs().sum(dim=(1, 2))
                score = part if score is None else score * part
            _permute(block, unit, torch.argsort(score, descending=True), channels, 1)
    return model


def _span_view(block, span, num: int, size: int) -> torch.Tensor:
    """The span's weight part as (num, size, other)."""
    w = block.get_submodule(span.linear).weight
    if span.axis == "out":
        return w[span.offset : span.offset + num * size].reshape(num, size, -1)
    return w[:, span.offset : span.offset + num * size].t().reshape(num, size, -1)


def _permute(block, unit, order: torch.Tensor, num: int, size: int):
    for span in unit.spans:
        linear = block.get_submodule(span.linear)
        lo, hi = span.offset, span.offset + num * size
        w = linear.weight
        if span.axis == "out":
            w[lo:hi] = w[lo:hi].reshape(num, size, -1)[order].reshape(num * size, -1)
            if linear.bias is not None:
                linear.bias[lo:hi] = linear.bias[lo:hi].reshape(num, size)[order].reshape(-1)
        else:
            w[:, lo:hi] = w[:, lo:hi].reshape(-1, num, size)[:, order].reshape(-1, num * size)


def detect_dydit_layout(state: dict, num_heads: int | None = None) -> DynamicConfig | None:
    """DynamicConfig matching the router keys of an official DyDiT state dict (None if static)."""
    keys = list(state)
    has_width = any(".attn_rate.router.weight" in k for k in keys)
    has_tokens = any(".token_selection.mlp_head.0.weight" in k for k in keys)
    if not (has_width or has_tokens):
        return None
    always_on = True
    if has_width and num_heads is not None:
        rows = next(v.shape[0] for k, v in state.items() if k.endswith("attn_rate.router.weight"))
        if rows == num_heads:
            always_on = False
        elif rows != num_heads - 1:
            raise ValueError(f"width router has {rows} outputs; expected {num_heads - 1} (released layout) "
                             f"or {num_heads} (early layout) for {num_heads} heads")
    ratio = 16
    if has_tokens:
        w0 = next(v for k, v in state.items() if k.endswith("token_selection.mlp_head.0.weight"))
        ratio = max(1, w0.shape[1] // w0.shape[0])
    return DynamicConfig(width=has_width, tokens=has_tokens, always_on=always_on, token_hidden_ratio=ratio)


def load_dydit_state_dict(model, state: dict, source: str = "checkpoint"):
    """Dynamizes a static model to the layout found in ``state`` and loads it strictly."""
    from dydit.io.checkpoints import load_state_dict_strict

    layout = detect_dydit_layout(state, model.config.num_heads)
    if layout is None:
        raise ValueError(f"{source}: no DyDiT router weights found")
    if getattr(model, "dynamic_config", None) is None:
        dynamize(model, layout)
    load_state_dict_strict(model, state, source)
    return model
