"""Official DiT / SiT / DyDiT ``.pt`` checkpoints: safe reading, architecture inference, strict loading.

The official files hold either a plain state dict (the released EMA weights) or a training dict
``{'model', 'ema', 'opt', 'args'}`` whose ``args`` is an ``argparse.Namespace``. Nothing in them is
executed: tensors are read with ``torch.load(weights_only=True)`` (``Namespace`` is the one extra
type allowed) or with safetensors.
"""
from __future__ import annotations

import argparse
import logging
import pickle
import re
from pathlib import Path

import torch

from dydit.io.checkpoints import load_state_dict_strict
from dydit.models.dit import CONFIGS, DiT, DiTConfig, build_config

log = logging.getLogger(__name__)

ROUTER_MARKERS = (".attn_rate.", ".mlp_rate.", ".token_selection.")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


#################################################################################
#                              Reading files safely                             #
#################################################################################


def read_torch_file(path, map_location="cpu"):
    """``torch.load(weights_only=True)`` that also accepts ``argparse.Namespace`` and names the file on failure."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        found = re.search(r"GLOBAL (\S+)", msg, re.IGNORECASE)
        if found or "unsupported global" in msg.lower():
            what = found.group(1) if found else "an unknown type"
            raise ValueError(
                f"{path}: the file holds pickled code or Python objects ({what}), not only tensors; dydit never "
                "runs code from files, so it will not load it. If you trust the file, convert its weights once to "
                "safetensors: python -c \"import torch; from safetensors.torch import save_file; "
                f"save_file(torch.load('{path}', weights_only=False)['model'], '{path.with_suffix('.safetensors')}')\" "
                "(use the key that holds the state dict), then load the .safetensors file."
            ) from None
        if "weights only load failed" in msg.lower():  # a pickle the tensor-only unpickler cannot parse
            raise ValueError(
                f"{path}: the file is a Python pickle that is not a plain tensor checkpoint (torch's safe loader "
                "stops at it); it may hold code, and dydit never runs code from files. If you trust the file, "
                "load it yourself with torch.load(..., weights_only=False) and save the state dict with "
                "safetensors.torch.save_file, then load that file."
            ) from None
        raise _corrupted(path, e) from e
    except Exception as e:  # truncated zips raise OSError/RuntimeError, garbage raises UnpicklingError
        raise _corrupted(path, e) from e


def read_safetensors_file(path, map_location="cpu") -> dict:
    """safetensors ``load_file`` whose errors name the file and say what to do."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(map_location))
    except Exception as e:  # SafetensorError for bad headers, OSError for unreadable files
        raise _corrupted(path, e) from e


def read_weights_file(path, map_location="cpu"):
    """Reads a ``.safetensors`` file or a torch checkpoint (``.pt``/``.pth``/``.bin``), never running code."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors_file(path, map_location)
    return read_torch_file(path, map_location)


def _corrupted(path, err: Exception) -> ValueError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ValueError(
        f"{path}: cannot read the checkpoint ({type(err).__name__}: {reason[:200]}); the file is truncated "
        "or corrupted. Download or copy it again and check its size/checksum."
    )


#################################################################################
#                        Training dicts and state dicts                         #
#################################################################################


def is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def select_weights(obj, which: str, source) -> tuple[dict, object]:
    """Returns (state dict, training args or None) from a plain state dict or a ``{'model','ema',...}`` dict."""
    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
    if is_state_dict(obj):
        return _strip_prefix(obj), None
    if isinstance(obj, dict) and ("ema" in obj or "model" in obj):
        key = which if which in obj else ("model" if which == "ema" else "ema")
        if key != which:
            log.info("%s: no %r weights in the checkpoint; using %r", source, which, key)
        state = obj[key]
        if not is_state_dict(state):
            raise ValueError(f"{source}: entry {key!r} is not a state dict of tensors; the checkpoint is malformed")
        return _strip_prefix(state), obj.get("args")
    keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
    raise ValueError(
        f"{source}: unrecognised checkpoint layout (top level: {keys}). Expected a DiT/SiT state dict, a "
        "training dict with 'model'/'ema', a dydit training checkpoint, or a model folder."
    )


def _strip_prefix(state: dict) -> dict:
    """Removes the ``module.`` prefix left by DistributedDataParallel, if every key has it."""
    if all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def has_router_keys(state: dict) -> bool:
    return any(m in k for k in state for m in ROUTER_MARKERS)


#################################################################################
#                           Architecture from shapes                            #
#################################################################################


def heads_by_hidden_size() -> dict[int, int]:
    """hidden size -> num_heads for every registry config whose hidden size fixes the head count."""
    seen: dict[int, set[int]] = {}
    for make in CONFIGS.values():
        cfg = make()
        seen.setdefault(cfg.hidden_size, set()).add(cfg.num_heads)
    return {d: next(iter(h)) for d, h in seen.items() if len(h) == 1}


def _registry_name(hidden: int, depth: int, patch: int, flow: bool) -> str | None:
    prefix = "SiT-" if flow else "DiT-"
    for name, make in CONFIGS.items():
        cfg = make()
        if name.startswith(prefix) and (cfg.hidden_size, cfg.depth, cfg.patch_size) == (hidden, depth, patch):
            return name
    return None


def _depth(state: dict) -> int:
    return 1 + max((int(m.group(1)) for k in state if (m := _BLOCK_RE.match(k))), default=-1)


def _need(state: dict, key: str, source) -> torch.Tensor:
    if key not in state:
        sample = sorted(state)[:5]
        raise ValueError(
            f"{source}: not a DiT/SiT state dict: key {key!r} is missing (keys start with {sample}). "
            "dydit.load reads official DiT/SiT/DyDiT checkpoints, diffusers DiT folders and dydit files."
        )
    return state[key]


def infer_config(state: dict, source, model_name: str | None = None, objective: str | None = None,
                 hint: str = "") -> DiTConfig:
    """DiTConfig of an official-layout state dict; ``model_name`` fixes what shapes cannot (num_heads).

    ``hint`` (file name, training ``args.model``) selects SiT's flow objective when it mentions SiT.
    """
    w = _need(state, "x_embedder.proj.weight", source)  # (D, C, p, p)
    hidden, in_channels, patch = w.shape[0], w.shape[1], w.shape[2]
    pos = _need(state, "pos_embed", source)  # (1, N, D)
    grid = int(round(pos.shape[1] ** 0.5))
    if grid * grid != pos.shape[1]:
        raise ValueError(f"{source}: pos_embed has {pos.shape[1]} tokens, not a square grid")
    depth = _depth(state)
    if depth == 0:
        raise ValueError(f"{source}: no transformer blocks ('blocks.{{i}}.*' keys) in the checkpoint")
    table = _need(state, "y_embedder.embedding_table.weight", source)  # (classes + 1, D)
    out = _need(state, "final_layer.linear.weight", source).shape[0] // (patch * patch)
    if out not in (in_channels, 2 * in_channels):
        raise ValueError(f"{source}: final layer predicts {out} channels for {in_channels} input channels; "
                         "expected C or 2C")
    learn_sigma = out == 2 * in_channels
    mlp_ratio = _need(state, "blocks.0.mlp.fc1.weight", source).shape[0] / hidden
    shapes = dict(input_size=grid * patch, in_channels=in_channels, num_classes=table.shape[0] - 1,
                  class_dropout_prob=0.1, learn_sigma=learn_sigma, freq_shift=0.0)

    if model_name is not None:
        try:
            named = build_config(model_name)
        except KeyError as e:
            raise ValueError(f"{source}: {e.args[0]}") from None
        got, want = (hidden, depth, patch), (named.hidden_size, named.depth, named.patch_size)
        if got != want:
            raise ValueError(
                f"{source}: checkpoint has hidden size {hidden}, depth {depth}, patch {patch}, but "
                f"model_name={model_name!r} has hidden size {want[0]}, depth {want[1]}, patch {want[2]}. "
                "Pass the model_name the checkpoint was trained as, or omit it to infer the architecture."
            )
        flow = (objective or named.objective) == "flow"
        cfg = build_config(model_name, **shapes, mlp_ratio=mlp_ratio, objective="flow" if flow else "diffusion")
    else:
        heads = heads_by_hidden_size().get(hidden)
        if heads is None:
            raise ValueError(
                f"{source}: cannot infer the number of attention heads for hidden size {hidden} (it is not "
                "in the weights' shapes). Pass model_name=... naming the architecture, e.g. 'DiT-XL/2'."
            )
        flow = objective == "flow" if objective is not None else "sit" in hint.lower()
        name = _registry_name(hidden, depth, patch, flow) or f"{'SiT' if flow else 'DiT'}-custom"
        cfg = DiTConfig(hidden_size=hidden, depth=depth, patch_size=patch, num_heads=heads, mlp_ratio=mlp_ratio,
                        objective="flow" if flow else "diffusion", name=name, **shapes)
    # The released SiT keeps DiT's 2C head but its forward returns the first C channels (the velocity).
    cfg.out_channels_used = in_channels if flow and learn_sigma else None
    return cfg


def _matches(name: str, state: dict) -> bool:
    """True if registry model ``name`` has the hidden size, depth and patch of ``state``."""
    if name not in CONFIGS or "x_embedder.proj.weight" not in state:
        return False
    cfg, w = build_config(name), state["x_embedder.proj.weight"]
    return (cfg.hidden_size, cfg.depth, cfg.patch_size) == (w.shape[0], _depth(state), w.shape[2])


#################################################################################
#                                    Loading                                    #
#################################################################################


def load_official(obj, source, which: str = "ema", model_name: str | None = None,
                  objective: str | None = None) -> DiT:
    """Builds the DiT/SiT (or DyDiT, when router keys are present) for a read checkpoint and loads it strictly."""
    state, args = select_weights(obj, which, source)
    hint = Path(str(source)).name
    arg_model = getattr(args, "model", None) if isinstance(args, argparse.Namespace) else None
    if isinstance(arg_model, str):
        hint = f"{hint} {arg_model}"
        if model_name is None and _matches(arg_model, state):
            model_name = arg_model  # the training run's --model names the head count
    cfg = infer_config(state, source, model_name, objective, hint)
    model = DiT(cfg)
    if has_router_keys(state):
        from dydit.dynamic import load_dydit_state_dict

        load_dydit_state_dict(model, state, source=str(source))
    else:
        load_state_dict_strict(model, state, source=str(source))
    return model.eval()
