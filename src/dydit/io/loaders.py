"""`dydit.load(path)`: recognise a checkpoint's format and load it without executing code from it.

Supported: official DiT/SiT/DyDiT ``.pt`` (plain state dict or training dict), the same weights as a
``.safetensors`` file, dydit training checkpoints, dydit model folders, diffusers
``DiTTransformer2DModel`` and ``FluxTransformer2DModel`` folders (or pipeline folders with a
``transformer/`` subfolder), and the authors' DyFLUX ``{"module": state_dict}`` files (``config=``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from dydit.io.checkpoints import load_state_dict_strict
from dydit.io.diffusers_dit import apply_mlp_norm_eps, is_diffusers_dit_config, load_diffusers
from dydit.io.native import CONFIG_NAME, FORMAT_TAG, load_native
from dydit.io.official import load_official, read_weights_file

TRAIN_FORMAT = "dydit-train-v1"

# Other backbones' formats plug in here (their loader modules call these at import time):
#   folder loaders:  (cfg: dict) -> bool  and  (path, cfg, objective, map_location) -> model
#   file loaders:    (obj, path) -> bool  and  (obj, path, which, model_name, objective, config) -> model
_FOLDER_LOADERS: list = []
_FILE_LOADERS: list = []


def register_folder_loader(matches, loader):
    """Teaches `dydit.load(folder)` a new config.json layout (e.g. a diffusers transformer class)."""
    _FOLDER_LOADERS.append((matches, loader))


def register_file_loader(matches, loader):
    """Teaches `dydit.load(file)` a new single-file layout (e.g. an official Latte ``.pt``)."""
    _FILE_LOADERS.append((matches, loader))


def _import_backbone_loaders():
    """Backbone loader modules register themselves on import; missing optional ones are skipped."""
    import importlib

    for name in ("dydit.io.latte", "dydit.io.flux"):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise


def load(path, which: str = "ema", model_name: str | None = None, objective: str | None = None,
         map_location="cpu", config=None):
    """Loads any supported checkpoint as an eval-mode DiT (dynamic if it carries DyDiT routers).

    ``which`` picks the 'ema' or raw 'model' weights of training checkpoints. ``model_name`` (a
    registry name such as 'DiT-XL/2') and ``objective`` ('diffusion' or 'flow') fill in what official
    ``.pt`` files do not record: the head count, and whether it is a SiT (also guessed from 'SiT' in
    the file name or the training args). ``config`` is the base model's config (a folder, a
    config.json path or a dict) for checkpoint layouts that do not record it (the authors' DyFLUX).
    """
    _import_backbone_loaders()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder; check the path")
    if objective not in (None, "diffusion", "flow"):
        raise ValueError(f"objective must be 'diffusion' or 'flow', got {objective!r}")
    if path.is_dir():
        model = _load_folder(path, objective, map_location)
    else:
        obj = read_weights_file(path, map_location)
        if isinstance(obj, dict) and obj.get("format") == TRAIN_FORMAT:
            model = _load_training_checkpoint(obj, path, which)
        elif (hit := next((ld for m, ld in _FILE_LOADERS if m(obj, path)), None)) is not None:
            model = hit(obj, path, which, model_name, objective, config)
        else:
            model = load_official(obj, path, which, model_name, objective)
    apply_mlp_norm_eps(model)
    if isinstance(map_location, (str, torch.device)):
        model = model.to(map_location)
    return model.eval()


def _load_folder(path: Path, objective, map_location):
    cfg_path = path / CONFIG_NAME
    if not cfg_path.exists():
        if (path / "transformer" / CONFIG_NAME).exists():  # a diffusers pipeline folder
            return _load_folder(path / "transformer", objective, map_location)
        raise ValueError(
            f"{path}: folder has no {CONFIG_NAME}. Expected a dydit model folder (config.json + "
            "model.safetensors), a diffusers DiTTransformer2DModel or FluxTransformer2DModel folder, or a diffusers "
            "pipeline folder."
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e}); the file is corrupted, copy it again") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}")
    if cfg.get("_format") == FORMAT_TAG:
        return load_native(path, map_location)
    if is_diffusers_dit_config(cfg):
        return load_diffusers(path, objective, map_location, config=cfg)
    for matches, loader in _FOLDER_LOADERS:
        if matches(cfg):
            return loader(path, cfg, objective, map_location)
    kind = cfg.get("_class_name")
    if kind == "AutoencoderKL":
        raise ValueError(f"{path}: this folder holds a VAE (AutoencoderKL); load it with dydit.vae.load_vae")
    raise ValueError(
        f"{cfg_path}: describes {kind or 'an unknown model'!r}, which dydit.load cannot build. Supported "
        "folders: dydit models (_format 'dydit') and diffusers DiTTransformer2DModel and FluxTransformer2DModel."
    )


def _load_training_checkpoint(obj: dict, path: Path, which: str):
    from dydit.models.registry import model_from_config

    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
    model = model_from_config(obj.get("class", "DiT"), obj["config"])
    if obj.get("dynamic"):
        from dydit.dynamic import DynamicConfig, dynamize

        model = dynamize(model, DynamicConfig.from_dict(obj["dynamic"]), reorder=False)
    load_state_dict_strict(model, obj[which], source=f"{path} [{which}]")
    return model
