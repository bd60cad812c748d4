"""`dydit.load(path)`: recognise a checkpoint's format and load it without executing code from it."""
from __future__ import annotations

from pathlib import Path

import torch

from dydit.io.native import is_native_folder, load_native


def load(path, which: str = "ema", map_location="cpu"):
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir():
        if is_native_folder(path):
            return load_native(path, map_location)
        raise ValueError(f"{path}: folder is not a dydit model (config.json with _format 'dydit')")
    obj = torch.load(path, map_location=map_location, weights_only=True)
    if isinstance(obj, dict) and obj.get("format") == "dydit-train-v1":
        from dydit.models.dit import DiT, DiTConfig

        model = DiT(DiTConfig.from_dict(obj["config"]))
        if obj.get("dynamic"):
            from dydit.dynamic import DynamicConfig, dynamize

            model = dynamize(model, DynamicConfig.from_dict(obj["dynamic"]), reorder=False)
        model.load_state_dict(obj[which])
        return model.eval()
    raise ValueError(f"{path}: unrecognised checkpoint format")
