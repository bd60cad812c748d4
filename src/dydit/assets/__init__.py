"""Files shipped inside the package: the embedded Fashion-MNIST DiT and the FID classifier."""
from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL = "fmnist_dit"
CLASSIFIER = "fmnist_classifier"

_HOW_TO_MAKE = {
    DEFAULT_MODEL: "train it with `dydit train --out runs/fmnist` and copy runs/fmnist/ema to {path}",
    CLASSIFIER: "train it with `dydit train-classifier --out {path}`",
}


def asset_path(name: str, must_exist: bool = True) -> Path:
    """Path of the shipped asset folder ``name``; a FileNotFoundError says how to produce a missing one."""
    path = ASSETS_DIR / name
    if must_exist and not path.exists():
        how = _HOW_TO_MAKE.get(name, "").format(path=path)
        raise FileNotFoundError(f"asset {name!r} is missing at {path}" + (f"; {how}" if how else ""))
    return path


def default_model_path() -> Path:
    """The embedded generative model (config.json + model.safetensors)."""
    return asset_path(DEFAULT_MODEL)


def classifier_path() -> Path:
    """The Fashion-MNIST classifier whose features define "FID (FMNIST classifier)"."""
    return asset_path(CLASSIFIER)
