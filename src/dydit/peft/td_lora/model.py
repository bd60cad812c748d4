"""Applying TD-LoRA to a (Dy)DiT, saving/loading adapters, and merged per-timestep inference weights.

Training: :func:`apply_td_lora` freezes the backbone and wraps the target linears of every block; the
DyDiT routers and the adapters train. Inference: the mixing weights depend only on t, so
:class:`TDLoRAWeights` folds the adapters into the per-timestep sliced weights of the fast plan and a
step runs exactly the narrow matmuls of a fully fine-tuned DyDiT, with no adapter matmuls.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from dydit.dynamic.context import DynamicContext
from dydit.dynamic.convert import _is_router_name
from dydit.dynamic.plan import SlicedWeights
from dydit.peft.td_lora.config import TDLoRAConfig
from dydit.peft.td_lora.layer import TDLoRALinear, TimestepState, capture_t_emb

PEFT_TYPE = "TD_LORA"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_ADAPTER_KEYS = (".lora_A.", ".lora_B.", ".lora_router.")
# Architecture fields an adapter must match (name/extra/vae paths may differ between copies of a base).
_ARCH_FIELDS = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio",
                "num_classes", "learn_sigma", "objective")
_DYNAMIC_FIELDS = ("width", "tokens", "always_on", "token_hidden_ratio")


# ---------------------------------------------------------------------------------------------
# applying adapters
# ---------------------------------------------------------------------------------------------


def td_lora_layers(model) -> dict[str, TDLoRALinear]:
    """Every TD-LoRA layer of ``model`` by module path."""
    return {n: m for n, m in model.named_modules() if isinstance(m, TDLoRALinear)}


def _find_targets(model, targets: list[str]):
    """(path, parent, attribute, linear) for every block linear whose path ends with a target name."""
    found, hits = [], {t: 0 for t in targets}
    for i, block in enumerate(model.blocks):
        for sub, module in block.named_modules():
            t = next((t for t in targets if sub == t or sub.endswith("." + t)), None)
            if t is None or not isinstance(module, (nn.Linear, TDLoRALinear)):
                continue
            parent_name, _, attr = sub.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            found.append((f"blocks.{i}.{sub}", parent, attr, module))
            hits[t] += 1
    unmatched = [t for t, n in hits.items() if n == 0]
    if unmatched:
        names = sorted({s for s, m in model.blocks[0].named_modules() if isinstance(m, (nn.Linear, TDLoRALinear))})
        raise ValueError(f"TD-LoRA target_modules {unmatched} match no linear layer in the blocks; "
                         f"block linears are: {names}")
    return found


def apply_td_lora(model, config: TDLoRAConfig | None = None, adapter_name: str = "default"):
    """Adds a TD-LoRA adapter to every target linear of every block, in place; returns the model.

    The whole backbone is frozen; the adapters (and, with ``train_routers``, the DyDiT routers) train.
    B starts at zero, so the adapted model computes exactly the function it had before.
    """
    config = (config or TDLoRAConfig()).resolved(model.config.hidden_size)
    configs = getattr(model, "td_lora_config", None) or {}
    if adapter_name in configs:
        raise ValueError(f"model already has a TD-LoRA adapter named {adapter_name!r}")
    targets = _find_targets(model, config.target_modules)
    for p in model.parameters():
        p.requires_grad_(False)

    t_embedder = model.t_embedder
    state = getattr(t_embedder, "td_lora_state", None)
    if state is None:
        state = TimestepState()
        t_embedder.td_lora_state = state
        t_embedder.register_forward_hook(capture_t_emb)

    D = model.config.hidden_size
    for _, parent, attr, module in targets:
        if not isinstance(module, TDLoRALinear):
            module = TDLoRALinear(module, state)
            setattr(parent, attr, module)
        module.add_adapter(adapter_name, config.r, config.num_experts, config.lora_alpha, D, config.router,
                           config.router_hidden, config.lora_dropout)
    for name, p in model.named_parameters():
        own_adapter = any(f"{k}{adapter_name}." in name for k in _ADAPTER_KEYS)
        if own_adapter or (config.train_routers and _is_router_name(name)):
            p.requires_grad_(True)
    model.td_lora_config = {**configs, adapter_name: config}
    return model


def trainable_report(model) -> tuple[int, int, float]:
    """(trainable parameters, backbone parameters, trainable / backbone); routers are not backbone."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    backbone = sum(p.numel() for n, p in model.named_parameters()
                   if not any(k in n for k in _ADAPTER_KEYS) and not _is_router_name(n))
    return trainable, backbone, trainable / max(backbone, 1)


# ---------------------------------------------------------------------------------------------
# saving and loading adapters
# ---------------------------------------------------------------------------------------------


def _adapter_tensors(model, adapter_name: str, with_routers: bool) -> dict[str, torch.Tensor]:
    """File key -> live parameter: adapters (keys without the adapter name, as peft) and DyDiT routers."""
    out = {}
    for path, layer in td_lora_layers(model).items():
        if adapter_name not in layer.lora_A:
            continue
        out[f"{path}.lora_A.weight"] = layer.lora_A[adapter_name].weight
        out[f"{path}.lora_B.weight"] = layer.lora_B[adapter_name].weight
        if adapter_name in layer.lora_router:
            for k, p in layer.lora_router[adapter_name].named_parameters():
                out[f"{path}.lora_router.{k}"] = p
    if not out:
        raise ValueError(f"model has no TD-LoRA adapter named {adapter_name!r}")
    if with_routers:
        out.update({n: p for n, p in model.named_parameters() if _is_router_name(n)})
    return out


def _fingerprint(w: torch.Tensor) -> list[float]:
    """Position-sensitive checksum of a base weight: (Σ w·ramp, Σ |w|) in float64."""
    flat = w.detach().reshape(-1).double()
    ramp = torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64, device=flat.device)
    return [float((flat * ramp).sum()), float(flat.abs().sum())]


def _base_fingerprints(model, paths) -> dict[str, list[float]]:
    layers = dict(model.named_modules())
    return {p: _fingerprint(layers[p].weight) for p in paths if layers[p].weight.device.type != "meta"}


def save_adapters(model, folder, adapter_name: str = "default", base_reordered: bool = False) -> Path:
    """Writes ``adapter_config.json`` + ``adapter_model.safetensors``: the adapter and, if they trained,
    the DyDiT routers, but no backbone weight.

    ``base_reordered`` records that the base was importance-reordered (``dynamize(reorder=True)``)
    before fine-tuning, so :func:`load_adapters` reorders a fresh base checkpoint the same way.
    """
    from dydit.io.atomic import atomic_path, atomic_write_text

    configs = getattr(model, "td_lora_config", None) or {}
    if adapter_name not in configs:
        raise ValueError(f"model has no TD-LoRA adapter named {adapter_name!r} (has {sorted(configs)})")
    config = configs[adapter_name]
    tensors = _adapter_tensors(model, adapter_name, config.train_routers)
    paths = [p for p, layer in td_lora_layers(model).items() if adapter_name in layer.lora_A]
    dyn = getattr(model, "dynamic_config", None)
    meta = {
        "peft_type": PEFT_TYPE,
        "format_version": 1,
        "config": config.to_dict(),
        "base_model": {k: model.config.to_dict()[k] for k in _ARCH_FIELDS},
        "base_model_name": model.config.name,
        "dynamic": dyn.to_dict() if dyn is not None else None,
        "base_reordered": bool(base_reordered),
        "base_fingerprint": _base_fingerprints(model, paths),
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(folder / ADAPTER_WEIGHTS_NAME) as tmp:
        save_file(state, tmp, metadata={"format": "pt", "peft_type": PEFT_TYPE})
    atomic_write_text(json.dumps(meta, indent=2, sort_keys=True), folder / ADAPTER_CONFIG_NAME)
    return folder


def read_adapter_config(folder) -> dict:
    path = Path(folder) / ADAPTER_CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(f"{folder}: no {ADAPTER_CONFIG_NAME}; not a TD-LoRA adapter folder")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); the file is corrupted") from e
    if meta.get("peft_type") != PEFT_TYPE:
        raise ValueError(f"{path}: peft_type is {meta.get('peft_type')!r}, expected {PEFT_TYPE!r}")
    return meta


def load_adapters(model, folder, adapter_name: str = "default"):
    """Applies saved adapters (and routers) to a base model, in place, with strict checks; returns it.

    A static base is first made dynamic with the saved router layout (and importance-reordered if the
    fine-tune was); the base weights must be those the adapters were trained on.
    """
    from dydit.dynamic import DynamicConfig, dynamize

    folder = Path(folder)
    meta = read_adapter_config(folder)
    weights = folder / ADAPTER_WEIGHTS_NAME
    if not weights.exists():
        raise FileNotFoundError(f"{folder}: missing {ADAPTER_WEIGHTS_NAME}; the adapter folder is incomplete")
    own = model.config.to_dict()
    diff = [f"{k}: adapter {v!r} vs model {own[k]!r}" for k, v in meta["base_model"].items() if own.get(k) != v]
    if diff:
        raise ValueError(f"{folder}: adapters were trained on {meta.get('base_model_name')!r}, which differs from "
                         f"this model ({model.config.name!r}):\n  " + "\n  ".join(diff))
    if meta["dynamic"] is not None:
        saved = DynamicConfig.from_dict(meta["dynamic"])
        current = getattr(model, "dynamic_config", None)
        if current is None:
            dynamize(model, saved, reorder=meta["base_reordered"])
        else:
            bad = [f for f in _DYNAMIC_FIELDS if getattr(current, f) != getattr(saved, f)]
            if bad:
                raise ValueError(f"{folder}: the model's router layout differs from the adapters' in {bad}")
    config = TDLoRAConfig.from_dict(meta["config"])

    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, TDLoRALinear))}
    expected = meta["base_fingerprint"]
    wrong = []
    for path, fp in expected.items():
        if path not in layers:
            wrong.append(f"{path} (missing)")
            continue
        have = _fingerprint(layers[path].weight)
        if abs(have[0] - fp[0]) > 1e-6 * max(fp[1], 1e-12) or abs(have[1] - fp[1]) > 1e-6 * max(fp[1], 1e-12):
            wrong.append(path)
    if wrong:
        hint = " (the fine-tune reordered heads by importance; pass the original static base)" \
            if meta["base_reordered"] else ""
        raise ValueError(f"{folder}: the base weights differ from those the adapters were trained on{hint}; "
                         f"{len(wrong)} layer(s) differ, e.g. {wrong[:3]}")

    apply_td_lora(model, config, adapter_name)
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for truncated headers/data
        raise ValueError(f"{weights}: cannot read safetensors ({e}); the file is truncated or corrupted") from e
    own_tensors = _adapter_tensors(model, adapter_name, config.train_routers)
    missing = sorted(set(own_tensors) - set(state))
    unexpected = sorted(set(state) - set(own_tensors))
    if missing or unexpected:
        msg = [f"{weights}: adapter tensors do not match the model."]
        if missing:
            msg.append(f"  missing ({len(missing)}): {missing[:6]}{' ...' if len(missing) > 6 else ''}")
        if unexpected:
            msg.append(f"  unexpected ({len(unexpected)}): {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
        raise ValueError("\n".join(msg))
    bad = [(k, tuple(state[k].shape), tuple(p.shape)) for k, p in own_tensors.items() if state[k].shape != p.shape]
    if bad:
        raise ValueError(f"{weights}: tensor shapes differ from the config: "
                         + "; ".join(f"{k}: file {a} vs model {b}" for k, a, b in bad[:6]))
    with torch.no_grad():
        for k, p in own_tensors.items():
            p.copy_(state[k].to(p.dtype))
    return model


# ---------------------------------------------------------------------------------------------
# merged inference
# ---------------------------------------------------------------------------------------------


def _is_adapted(layer) -> bool:
    return isinstance(layer, TDLoRALinear) and any(n not in layer.merged_adapters for n in layer.active_adapters)


class TDLoRAWeights(SlicedWeights):
    """Fast-path weights with the adapters folded in per timestep: W0[rows, cols] + Σ a_k(E_t)·(α/r)·B_k[rows] A_k[:, cols].

    The folding itself is generic (:class:`dydit.dynamic.plan.SlicedWeights` folds every layer that
    reports ``needs_merged_weights``); this class names it for adapter users. The cache assumes frozen
    weights: call ``clear()`` after changing them.
    """


def td_lora_fast_context(model, max_cache_bytes: int = 0, record_usage: bool = False) -> DynamicContext:
    """DynamicContext('fast') whose sliced weights carry the model's TD-LoRA adapters, merged per timestep."""
    if getattr(model, "dynamic_config", None) is None:
        raise ValueError("the fast path needs a dynamic model (dydit.dynamize); for a static model with "
                         "TD-LoRA run it without a DynamicContext")
    return DynamicContext("fast", weights=TDLoRAWeights(max_cache_bytes), record_usage=record_usage)
