"""dydit's own model format: a folder with config.json and model.safetensors (diffusers-like)."""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from dydit.io.atomic import atomic_path, atomic_write_text

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_TAG = "dydit"


_OWN_KEYS = ("_format", "_class", "model", "dynamic")  # what load_native reads; any other key is metadata


def save(model, folder, extra_config: dict | None = None) -> Path:
    """Writes ``folder/config.json`` and ``folder/model.safetensors`` atomically.

    Dynamic models also record their router layout, so :func:`dydit.load` rebuilds them.
    ``extra_config`` adds metadata keys to config.json (e.g. ``"recipe"``, the fine-tune recipe that made
    the model); loading ignores them, and they cannot replace the keys that describe the model.
    """
    folder = Path(folder)
    if not hasattr(model.config, "to_dict"):  # a diffusers model used as the backbone (FLUX)
        raise TypeError(f"{type(model).__name__} is a diffusers model: save it with model.save_pretrained(folder) "
                        "(router tensors included); dydit.load(folder) rebuilds it")
    clash = sorted(set(extra_config or {}) & set(_OWN_KEYS))
    if clash:
        raise ValueError(f"extra_config cannot set {clash}: config.json keeps them for the model itself")
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"_format": FORMAT_TAG, "_class": type(model).__name__, "model": model.config.to_dict()}
    dyn = getattr(model, "dynamic_config", None)
    if dyn is not None:
        cfg["dynamic"] = dyn.to_dict()
    if extra_config:
        cfg.update(extra_config)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(folder / WEIGHTS_NAME) as tmp:
        save_file(state, tmp, metadata={"format": "pt", "dydit": "1"})
    atomic_write_text(json.dumps(cfg, indent=2, sort_keys=True), folder / CONFIG_NAME)
    return folder


def is_native_folder(path) -> bool:
    p = Path(path)
    if not (p.is_dir() and (p / CONFIG_NAME).exists()):
        return False
    try:
        return json.loads((p / CONFIG_NAME).read_text()).get("_format") == FORMAT_TAG
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def read_native_config(folder) -> dict:
    path = Path(folder) / CONFIG_NAME
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: config.json is not valid JSON ({e}); the file is corrupted") from e


def load_native(folder, map_location="cpu"):
    """Rebuilds the model saved by :func:`save` (static or dynamic) with strict key matching.

    Only ``model`` and ``dynamic`` of config.json shape the model; metadata such as ``recipe`` is left in
    the file (``read_native_config`` returns it).
    """
    from dydit.models.registry import model_from_config

    folder = Path(folder)
    cfg = read_native_config(folder)
    try:
        model = model_from_config(cfg.get("_class", "DiT"), cfg["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{folder / CONFIG_NAME}: {e}") from e
    if "dynamic" in cfg:
        from dydit.dynamic import DynamicConfig, dynamize

        model = dynamize(model, DynamicConfig.from_dict(cfg["dynamic"]), reorder=False)
    weights = folder / WEIGHTS_NAME
    if not weights.exists():
        raise FileNotFoundError(f"{folder}: missing {WEIGHTS_NAME}; the folder is incomplete")
    try:
        state = load_file(str(weights), device=str(map_location))
    except Exception as e:  # safetensors raises its own error types for truncated headers/data
        raise ValueError(f"{weights}: cannot read safetensors ({e}); the file is truncated or corrupted") from e
    from dydit.io.checkpoints import load_state_dict_strict

    load_state_dict_strict(model, state, source=str(weights))
    return model.eval()
