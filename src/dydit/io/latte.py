"""Latte checkpoints for ``dydit.load``: official class-conditional ``.pt`` files and diffusers folders.

Official (the Latte repository's ``models/latte.py``, trained on UCF101/FaceForensics/SkyTimelapse/
Taichi): a ``.pt`` holding a dict with ``ema`` (the training script's checkpoints; ``model`` with
``which='model'``) or a plain state dict, recognised by its ``temp_embed``. The architecture is read
from the tensor shapes (frames from ``temp_embed``, tokens from ``pos_embed``, patch and channels from
``x_embedder.proj``, classes from ``y_embedder``); the head count is not stored, so it comes from the
published size with the same depth and width, or from ``model_name``. Tensors are read with
``torch.load(weights_only=True)``; nothing in the file is executed.

diffusers ``LatteTransformer3DModel`` folders (the Latte-1 text-to-video layout: adaLN-single, caption
cross-attention, separate spatial and temporal block lists) load as diffusers' own class. We wrap
rather than re-implement it: the model *is* diffusers' forward (the same arguments, the same output,
bit for bit, in every diffusers version that can read the folder), and nothing of ours can drift from
it. Its config.json is parsed by us and its weights are read with safetensors, so loading runs no code
from the folder. No dydit adapter is registered for diffusers' ``BasicTransformerBlock`` here: that class
is shared by many diffusers models, so DyLatte on this layout (a block adapter that checks the block's
norm type before claiming it) is left to a later change; dynamize() says so.
"""
from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

from dydit.io.checkpoints import load_state_dict_strict
from dydit.io.loaders import register_file_loader, register_folder_loader
from dydit.models.latte import _SIZES, CONFIGS, Latte, LatteConfig

DIFFUSERS_CLASS = "LatteTransformer3DModel"
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


#################################################################################
#                                 official .pt                                  #
#################################################################################


def _state_of(obj, which: str = "ema"):
    if isinstance(obj, dict) and isinstance(obj.get(which), dict):
        return obj[which]
    if isinstance(obj, dict) and isinstance(obj.get("ema"), dict):
        return obj["ema"]
    return obj


def is_official_latte(obj, path) -> bool:
    state = _state_of(obj)
    return isinstance(state, dict) and "temp_embed" in state and "x_embedder.proj.weight" in state


def config_from_state(state: dict, source, model_name: str | None = None) -> LatteConfig:
    """The LatteConfig an official state dict was made with (num_heads from the published sizes or ``model_name``)."""
    try:
        D, C, p, _ = state["x_embedder.proj.weight"].shape
        N, F = state["pos_embed"].shape[1], state["temp_embed"].shape[1]
        depth = 1 + max(int(m.group(1)) for k in state if (m := _BLOCK_RE.match(k)))
        hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
        out = state["final_layer.linear.weight"].shape[0] // (p * p)
    except (KeyError, ValueError) as e:
        raise ValueError(f"{source}: not an official Latte state dict (missing or malformed {e}); "
                         "expected the keys of the Latte repository's models/latte.py") from None
    side = int(round(N**0.5))
    if side * side != N:
        raise ValueError(f"{source}: pos_embed has {N} tokens, not a square grid; not an official Latte checkpoint")
    kw = dict(input_size=side * p, patch_size=p, in_channels=C, hidden_size=D, depth=depth, num_frames=F,
              mlp_ratio=hidden / D, learn_sigma=out == 2 * C, extras=1, name="Latte-custom")
    if out not in (C, 2 * C):
        raise ValueError(f"{source}: final layer predicts {out} channels for {C} input channels (expected C or 2C)")
    table = state.get("y_embedder.embedding_table.weight")
    if table is not None:  # class-conditional; the last row is the null class of classifier-free guidance
        kw.update(extras=2, num_classes=table.shape[0] - 1, class_dropout_prob=0.1)
    if model_name is not None:
        if model_name not in CONFIGS:
            raise ValueError(f"model_name {model_name!r} is not a Latte registry name; choose one of: "
                             f"{', '.join(sorted(CONFIGS))}")
        ref = CONFIGS[model_name]()
        if (ref.depth, ref.hidden_size, ref.patch_size) != (depth, D, p):
            raise ValueError(f"{source}: the weights have depth {depth}, width {D}, patch {p}, but {model_name} has "
                             f"{ref.depth}, {ref.hidden_size}, {ref.patch_size}; pass the matching model_name")
        kw.update(num_heads=ref.num_heads, name=model_name)
    else:
        size = next((s for s, v in _SIZES.items() if (v["depth"], v["hidden_size"]) == (depth, D)), None)
        if size is None:
            raise ValueError(f"{source}: a Latte of depth {depth} and width {D} is not a published size, and the "
                             "file does not record its head count; pass model_name= (a registry name such as "
                             "'Latte-XL/2', see `dydit models`)")
        kw.update(num_heads=_SIZES[size]["num_heads"], name=f"Latte-{size}/{p}")
    return LatteConfig(**kw)


def load_official_latte(obj, path, which="ema", model_name=None, objective=None, config=None) -> Latte:
    """An official Latte ``.pt`` (dict with ``ema``/``model``, or a plain state dict) as a dydit Latte, strictly."""
    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
    if objective not in (None, "diffusion"):
        raise ValueError(f"{path}: Latte checkpoints are diffusion models; objective={objective!r} does not apply")
    state = {k: v for k, v in _state_of(obj, which).items()}
    cfg = config_from_state(state, path, model_name)
    model = Latte(cfg)
    from dydit.dynamic.convert import detect_dydit_layout

    layout = detect_dydit_layout(state, cfg.num_heads)  # a DyLatte saved in the same layout
    if layout is not None:
        from dydit.dynamic import dynamize

        dynamize(model, layout)
    load_state_dict_strict(model, state, source=f"{path} [{which}]")
    return model.eval()


#################################################################################
#                      diffusers LatteTransformer3DModel                        #
#################################################################################


def is_diffusers_latte_config(cfg: dict) -> bool:
    return cfg.get("_class_name") == DIFFUSERS_CLASS


def load_diffusers_latte(folder, cfg: dict, objective=None, map_location="cpu"):
    """A diffusers ``LatteTransformer3DModel`` folder as diffusers' own class (see the module docstring)."""
    from diffusers import LatteTransformer3DModel

    from dydit.io.diffusers_dit import read_diffusers_weights

    folder = Path(folder)
    accepted = set(inspect.signature(LatteTransformer3DModel.__init__).parameters) - {"self"}
    kwargs = {k: v for k, v in cfg.items() if not k.startswith("_")}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(f"{folder / 'config.json'}: keys {unknown} are not LatteTransformer3DModel arguments in "
                         "the installed diffusers; upgrade diffusers or check the folder")
    model = LatteTransformer3DModel(**kwargs)
    state, source = read_diffusers_weights(folder, map_location)
    own = model.state_dict()
    for k in [k for k in own if k not in state and k.endswith("pos_embed.pos_embed")]:
        state[k] = own[k]  # the fixed sin-cos table: recomputed from the config, some savers leave it out
    load_state_dict_strict(model, state, source=str(source))
    from dydit.dynamic.backbones.latte import register_diffusers_latte

    register_diffusers_latte()  # DyLatte and First-Block-Cache on this layout
    return model.eval()


def save_diffusers_latte(model, folder) -> Path:
    """Writes a diffusers ``LatteTransformer3DModel`` (config.json + safetensors) without diffusers' pickle paths."""
    from safetensors.torch import save_file

    from dydit.io.atomic import atomic_path, atomic_write_text
    from dydit.io.diffusers_dit import WEIGHTS_NAME

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(folder / WEIGHTS_NAME) as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
    cfg = {"_class_name": DIFFUSERS_CLASS, **{k: v for k, v in dict(model.config).items() if not k.startswith("_")}}
    atomic_write_text(json.dumps(cfg, indent=2, sort_keys=True), folder / "config.json")
    return folder


register_file_loader(is_official_latte, load_official_latte)
register_folder_loader(is_diffusers_latte_config, load_diffusers_latte)
