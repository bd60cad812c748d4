"""FLUX in ``dydit.load``: diffusers ``FluxTransformer2DModel`` folders and the authors' DyFLUX checkpoints.

- A diffusers transformer folder (config.json + safetensors, sharded or not), or a pipeline folder with a
  ``transformer/`` subfolder, loads as diffusers' own model through ``from_pretrained`` (weights only:
  safetensors, or ``torch.load(weights_only=True)``); ``dydit.dynamize`` makes it DyFLUX. A DyFLUX saved
  with ``save_pretrained`` (its router tensors in the folder) loads dynamic again.
- The authors' DyFLUX file is ``{"module": state_dict}`` (plus training counters): diffusers' keys and, in
  every double and single block, ``token_selection.{linear_t, norm, router}``. It records no config, so
  ``dydit.load(path, config=<the base model's transformer folder, its config.json, or a dict>)``. Router
  keys decide the dynamic layout (their token routers; width routers when a dydit TDW model was saved so).
  A plain FLUX state dict file loads the same way, static.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from diffusers import FluxTransformer2DModel

from safetensors import safe_open

from dydit.dynamic.convert import ROUTER_NAMES
from dydit.dynamic.engine import DYNAMIC_CONFIG_NAME
from dydit.io.checkpoints import load_state_dict_strict
from dydit.io.loaders import register_file_loader, register_folder_loader
from dydit.io.official import read_safetensors_file

CLASS_NAME = "FluxTransformer2DModel"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_CONFIG_HINT = ("pass config=<the base model's diffusers transformer folder or its config.json>, e.g. "
                "dydit.load(path, config='FLUX.1-dev/transformer')")


def is_flux_config(cfg: dict) -> bool:
    return cfg.get("_class_name") == CLASS_NAME


def _folder_weights(path: Path):
    """(tensor names, safetensors files) of a diffusers model folder, single-file or sharded; (None, []) else."""
    single = path / WEIGHTS_NAME
    if single.exists():
        with safe_open(str(single), framework="pt") as f:
            return list(f.keys()), [single]
    index = path / (WEIGHTS_NAME + ".index.json")
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return list(weight_map), [path / name for name in sorted(set(weight_map.values()))]
    return None, []


def load_flux_folder(path, cfg, objective, map_location):
    """diffusers' own loading for a static folder; a DyFLUX saved with ``save_pretrained`` (router tensors
    beside diffusers' keys, which ``from_pretrained`` would drop) is rebuilt dynamic from its keys."""
    if objective not in (None, "flow"):
        raise ValueError(f"{path}: FLUX is a flow-matching model; objective={objective!r} does not apply")
    path = Path(path)
    keys, files = _folder_weights(path)
    if keys is None or not any(r in k for k in keys for r in ROUTER_NAMES):
        return FluxTransformer2DModel.from_pretrained(str(path))
    state = {}
    for f in files:
        state.update(read_safetensors_file(f, map_location))
    return _build(state, cfg, path)


def _state_of(obj):
    state = obj.get("module") if isinstance(obj, dict) and isinstance(obj.get("module"), dict) else obj
    if not isinstance(state, dict):
        return None
    return state if "x_embedder.weight" in state and "context_embedder.weight" in state else None


def is_flux_file(obj, path) -> bool:
    return _state_of(obj) is not None


def read_flux_config(config) -> dict:
    """A FluxTransformer2DModel config from a folder (transformer or pipeline), a config.json or a dict."""
    if isinstance(config, dict):
        cfg, source = dict(config), "config"
    else:
        p = Path(config)
        if p.is_dir():
            p = p / "transformer" / "config.json" if (p / "transformer" / "config.json").exists() else p / "config.json"
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such config; {_CONFIG_HINT}")
        try:
            cfg = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{p}: not valid JSON ({e}); the file is corrupted, copy it again") from e
        source = str(p)
    if cfg.get("_class_name", CLASS_NAME) != CLASS_NAME:
        raise ValueError(f"{source} describes {cfg.get('_class_name')!r}, not a {CLASS_NAME}; {_CONFIG_HINT}")
    return cfg


def _layout(state: dict) -> dict:
    """What the state dict's shapes say about the architecture (names as in the config)."""
    def count(prefix):
        ids = {int(m.group(1)) for k in state if (m := re.match(prefix + r"\.(\d+)\.", k))}
        return max(ids) + 1 if ids else 0

    norm_q = next((v for k, v in state.items() if k.endswith("attn.norm_q.weight")), None)
    pooled = state.get("time_text_embed.text_embedder.linear_1.weight")
    return {"num_layers": count("transformer_blocks"), "num_single_layers": count("single_transformer_blocks"),
            "inner_dim": state["x_embedder.weight"].shape[0], "in_channels": state["x_embedder.weight"].shape[1],
            "attention_head_dim": norm_q.shape[0] if norm_q is not None else None,
            "joint_attention_dim": state["context_embedder.weight"].shape[1],
            "pooled_projection_dim": pooled.shape[1] if pooled is not None else None,
            "guidance_embeds": any(k.startswith("time_text_embed.guidance_embedder.") for k in state)}


def _differences(want: dict, have: dict) -> tuple[str, str]:
    keys = [k for k in want if want[k] != have[k]]
    return ", ".join(f"{k}={want[k]}" for k in keys), ", ".join(f"{k}={have[k]}" for k in keys)


def dynamic_layout(state: dict, num_heads: int):
    """DynamicConfig of the router keys in a FLUX state dict (None: a static model)."""
    from dydit.dynamic import DynamicConfig

    width = any(k.endswith(".attn_rate.router.weight") for k in state)
    tokens = any(k.endswith(".token_selection.router.weight") for k in state)
    if not (width or tokens):
        return None
    always_on = True
    if width:
        rows = next(v.shape[0] for k, v in state.items() if k.endswith(".attn_rate.router.weight"))
        always_on = rows == num_heads - 1
    optional = ["mlp_context"] if any(".mlp_context_rate." in k for k in state) else []
    return DynamicConfig(width=width, tokens=tokens, always_on=always_on, optional_units=optional)


def load_flux_file(obj, path, which, model_name, objective, config):
    if config is None:
        raise ValueError(f"{path}: a DyFLUX/FLUX checkpoint records no model config; {_CONFIG_HINT}")
    return _build(_state_of(obj), read_flux_config(config), path)


def _build(state: dict, cfg: dict, path):
    """The model ``cfg`` describes, dynamic when ``state`` holds router tensors, with ``state`` loaded strictly."""
    model = FluxTransformer2DModel.from_config(cfg)
    want, have = _layout(state), _layout(model.state_dict())
    if want != have:
        ckpt, conf = _differences(want, have)
        raise ValueError(f"{path}: the checkpoint has {ckpt} but the config describes {conf}; "
                         "pass the config of the model this checkpoint was fine-tuned from")
    layout = dynamic_layout(state, model.config.num_attention_heads)
    saved = Path(path) / DYNAMIC_CONFIG_NAME if Path(path).is_dir() else None
    if layout is not None and saved is not None and saved.exists():  # what the router keys cannot say
        from dydit.dynamic import DynamicConfig

        try:
            recorded = DynamicConfig.from_dict(json.loads(saved.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as e:
            raise ValueError(f"{saved}: not a dydit dynamic config ({e}); the file is damaged, save the model again "
                             "or delete the file to load the authors' layout") from None
        for key in ("width", "tokens", "always_on", "optional_units"):
            if getattr(recorded, key) != getattr(layout, key):
                raise ValueError(f"{saved}: {key}={getattr(recorded, key)!r} but the weights' router tensors say "
                                 f"{getattr(layout, key)!r}; the folder mixes two models, save it again")
        layout = recorded
    if layout is not None:
        from dydit.dynamic import dynamize

        dynamize(model, layout)
    load_state_dict_strict(model, state, source=str(path))
    dtype = state["x_embedder.weight"].dtype
    return model.to(dtype) if dtype.is_floating_point else model  # a bf16 checkpoint stays bf16


register_folder_loader(is_flux_config, load_flux_folder)
register_file_loader(is_flux_file, load_flux_file)
