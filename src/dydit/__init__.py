"""dydit: Dynamic Diffusion Transformers (DyDiT++) that generate faster in wall-clock time."""
from __future__ import annotations

import logging

from dydit.io.native import save
from dydit.models.dit import CONFIGS, DiT, DiTConfig, build_config, build_model

__version__ = "0.1.0"
logging.getLogger(__name__).addHandler(logging.NullHandler())


def load(path, **kwargs):
    """Loads any supported checkpoint (see :func:`dydit.io.loaders.load`)."""
    from dydit.io.loaders import load as _load

    return _load(path, **kwargs)


def dynamize(model, config=None, **kwargs):
    """Turns a static DiT/SiT into a DyDiT with routers initialised to the exact static function."""
    from dydit.dynamic import dynamize as _dynamize

    return _dynamize(model, config, **kwargs)


def finetune(init, out, recipe=None, **kwargs):
    """Fine-tunes a static checkpoint into a DyDiT under a recipe, as `dydit finetune` does (see
    :func:`dydit.dynamic.finetune.finetune`)."""
    from dydit.dynamic.finetune import finetune as _finetune

    return _finetune(init, out, recipe, **kwargs)


__all__ = ["DiT", "DiTConfig", "CONFIGS", "build_model", "build_config", "load", "save", "dynamize", "finetune",
           "__version__"]
