"""Static -> dynamic conversion, importance ranking, and loading the authors' DyDiT checkpoints."""
from __future__ import annotations

import logging

import torch

from dydit.dynamic.config import DynamicConfig
from dydit.dynamic.routers import TokenRouter, WidthRouter

log = logging.getLogger(__name__)


def dynamize(model, config: DynamicConfig | None = None, reorder: bool = False):
    """Attaches DyDiT routers to every block, in place; returns the model.

    The routers start fully on, so the result computes exactly the static function until fine-tuned.
    ``reorder`` first ranks heads and MLP channels by weight magnitude (the paper's importance
    ranking) so the always-on head/group is the most important one; the static function is unchanged.
    """
    config = config or DynamicConfig()
    if getattr(model, "dynamic_config", None) is not None:
        raise ValueError("model is already dynamic")
    if reorder:
        reorder_by_importance(model)
    D = model.config.hidden_size
    for i, block in enumerate(model.blocks):
        H = block.attn.num_heads
        if block.mlp.fc1.out_features % H:
            raise ValueError(f"MLP hidden size {block.mlp.fc1.out_features} is not divisible into {H} groups")
        dev = block.attn.qkv.weight.device
        if config.width:
            block.attn_rate = WidthRouter(D, H, config.always_on, config.width_bias_init).to(dev)
            block.mlp_rate = WidthRouter(D, H, config.always_on, config.width_bias_init).to(dev)
        if config.block_skip:
            block.block_gate = WidthRouter(D, 1, always_on=False, bias_init=config.width_bias_init).to(dev)
        if config.tokens:
            block.token_selection = TokenRouter(D, config.token_hidden_ratio, config.token_bias_init).to(dev)
    model.dynamic_config = config
    return model


def router_parameters(model):
    return [p for n, p in model.named_parameters() if _is_router_name(n)]


def _is_router_name(name: str) -> bool:
    return any(k in name for k in ROUTER_NAMES)


ROUTER_NAMES = ("attn_rate.", "mlp_rate.", "token_selection.", "block_gate.")


@torch.no_grad()
def copy_routers(src, dst):
    """Copies the router parameters of ``src`` into ``dst`` (same architecture; ``src`` may be DDP-wrapped).

    Routers are thresholded: an EMA of fast-moving router logits shifts every threshold (the λ=0.5
    Fashion-MNIST fine-tune realised 0.60 with EMA routers, 0.48 with the live ones), so an EMA model
    takes the backbone's average but the live routers.
    """
    live = dict(getattr(src, "module", src).named_parameters())
    for name, p in dst.named_parameters():
        if _is_router_name(name) and name in live:
            p.copy_(live[name].detach().to(p.device))


@torch.no_grad()
def reorder_by_importance(model):
    """Permutes heads and MLP channels of every block by descending weight magnitude, in place.

    Head importance: L1 norm of its q/k/v rows and its output-projection columns. Channel importance:
    L1 norm of its fc1 row times that of its fc2 column. Groups are contiguous chunks of the sorted
    channels, so group 0 (always on) holds the most important channels.
    """
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        D, H, hd = attn.qkv.in_features, attn.num_heads, attn.head_dim
        w = attn.qkv.weight.view(3, H, hd, D)
        score = w.abs().sum(dim=(0, 2, 3)) + attn.proj.weight.view(D, H, hd).abs().sum(dim=(0, 2))
        order = torch.argsort(score, descending=True)
        attn.qkv.weight.copy_(w[:, order].reshape(3 * D, D))
        if attn.qkv.bias is not None:
            attn.qkv.bias.copy_(attn.qkv.bias.view(3, H, hd)[:, order].reshape(-1))
        attn.proj.weight.copy_(attn.proj.weight.view(D, H, hd)[:, order].reshape(D, D))
        ch_score = mlp.fc1.weight.abs().sum(1) * mlp.fc2.weight.abs().sum(0)
        ch_order = torch.argsort(ch_score, descending=True)
        mlp.fc1.weight.copy_(mlp.fc1.weight[ch_order])
        mlp.fc1.bias.copy_(mlp.fc1.bias[ch_order])
        mlp.fc2.weight.copy_(mlp.fc2.weight[:, ch_order])
    return model


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
