"""Which backbone classes exist, by class name (config.json ``_class``) and by registry name.

``dydit.models.dit`` registers DiT; other backbone modules (``dydit.models.latte``,
``dydit.models.flux``) register themselves when imported, and :func:`ensure_backbones` imports them.
dydit's own folders and training checkpoints record the class name, so loading rebuilds the right one.
"""
from __future__ import annotations

import importlib

# class name -> (model class, config class with from_dict/to_dict)
ARCHITECTURES: dict[str, tuple[type, type]] = {}
_BACKBONE_MODULES = ("dydit.models.dit", "dydit.models.latte")
# modules with a CONFIGS registry whose configs build() a class dydit does not own
_CONFIG_ONLY_MODULES = ("dydit.models.flux",)


def register_architecture(model_cls: type, config_cls: type) -> None:
    ARCHITECTURES[model_cls.__name__] = (model_cls, config_cls)


def ensure_backbones() -> None:
    for name in _BACKBONE_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise


def model_from_config(class_name: str | None, config: dict):
    """Builds an (untrained) model of the named class from its saved config dict."""
    ensure_backbones()
    model_cls, config_cls = ARCHITECTURES.get(class_name or "DiT", (None, None))
    if model_cls is None:
        raise ValueError(f"unknown model class {class_name!r} in config; known: {', '.join(sorted(ARCHITECTURES))}")
    return model_cls(config_cls.from_dict(config))


def all_model_names() -> dict:
    """Every registry name (e.g. 'DiT-XL/2', 'Latte-S/2') -> its config factory."""
    ensure_backbones()
    names = {}
    for model_cls, _ in ARCHITECTURES.values():
        names.update(getattr(importlib.import_module(model_cls.__module__), "CONFIGS", {}))
    for module in _CONFIG_ONLY_MODULES:  # registries of foreign classes (FLUX: diffusers' own model)
        names.update(importlib.import_module(module).CONFIGS)
    return names


def build_any(name: str, **overrides):
    """Builds a model from any backbone's registry name."""
    names = all_model_names()
    if name not in names:
        raise KeyError(f"unknown model {name!r}; choose one of: {', '.join(sorted(names))} (see `dydit models`)")
    cfg = names[name](**overrides)
    if hasattr(cfg, "build"):  # a config that builds a foreign class (FluxT2IConfig -> diffusers' FLUX)
        return cfg.build()
    return ARCHITECTURES[_class_for(cfg)][0](cfg)


def _class_for(cfg) -> str:
    for cls_name, (_, config_cls) in ARCHITECTURES.items():
        if type(cfg) is config_cls:
            return cls_name
    raise ValueError(f"no registered model class takes a {type(cfg).__name__}")
