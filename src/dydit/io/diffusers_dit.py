"""diffusers ``DiTTransformer2DModel`` folders <-> dydit's DiT, in both directions and exactly.

diffusers' DiT port differs from the official code in ways the conversion must keep:
- its timestep features use ``downscale_freq_shift=1`` (our ``freq_shift=1.0``);
- the LayerNorm before the MLP uses ``norm_eps`` (1e-5 by default; the official DiT uses 1e-6),
  kept in ``DiTConfig.extra['mlp_norm_eps']`` and applied by :func:`apply_mlp_norm_eps`;
- every block stores its own copy of the timestep + label embedder, which dydit's DiT shares once;
- attention has separate q/k/v projections, which we fuse into ``attn.qkv`` (rows q, k, v).
The position embedding is the same fixed 2-D sin-cos table in both and is not stored by diffusers.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from dydit.io.atomic import atomic_path, atomic_write_text
from dydit.io.checkpoints import load_state_dict_strict
from dydit.io.official import read_safetensors_file, read_torch_file
from dydit.models.dit import CONFIGS, DiT, DiTConfig

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CLASS_NAME = "DiTTransformer2DModel"
MLP_NORM_EPS = "mlp_norm_eps"  # key in DiTConfig.extra
OFFICIAL_NORM_EPS = 1e-6

# DiTTransformer2DModel's defaults, for keys a config.json leaves out.
_DEFAULTS = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=None, num_layers=28,
                 attention_bias=True, sample_size=32, patch_size=2, activation_fn="gelu-approximate",
                 num_embeds_ada_norm=1000, norm_type="ada_norm_zero", norm_elementwise_affine=False, norm_eps=1e-5)

# (dydit name, diffusers name) pairs without ".weight"/".bias"; {i} is the block index.
_TOP = [("x_embedder.proj", "pos_embed.proj"),
        ("final_layer.adaLN_modulation.1", "proj_out_1"),
        ("final_layer.linear", "proj_out_2")]
_BLOCK = [("blocks.{i}.adaLN_modulation.1", "transformer_blocks.{i}.norm1.linear"),
          ("blocks.{i}.attn.proj", "transformer_blocks.{i}.attn1.to_out.0"),
          ("blocks.{i}.mlp.fc1", "transformer_blocks.{i}.ff.net.0.proj"),
          ("blocks.{i}.mlp.fc2", "transformer_blocks.{i}.ff.net.2")]
# The shared embedder, copied into every diffusers block.
_EMBED = [("t_embedder.mlp.0.weight", "norm1.emb.timestep_embedder.linear_1.weight"),
          ("t_embedder.mlp.0.bias", "norm1.emb.timestep_embedder.linear_1.bias"),
          ("t_embedder.mlp.2.weight", "norm1.emb.timestep_embedder.linear_2.weight"),
          ("t_embedder.mlp.2.bias", "norm1.emb.timestep_embedder.linear_2.bias"),
          ("y_embedder.embedding_table.weight", "norm1.emb.class_embedder.embedding_table.weight")]


def is_diffusers_dit_config(cfg: dict) -> bool:
    """True for a DiTTransformer2DModel config (or the legacy Transformer2DModel one with adaLN-Zero patches)."""
    name = cfg.get("_class_name")
    legacy = name == "Transformer2DModel" and cfg.get("norm_type") == "ada_norm_zero" and cfg.get("patch_size")
    return name == CLASS_NAME or bool(legacy)


def apply_mlp_norm_eps(model) -> None:
    """Sets the pre-MLP LayerNorm eps recorded in ``config.extra`` (diffusers-converted models)."""
    extra = getattr(model.config, "extra", None)  # diffusers models (FLUX) have no such field
    eps = extra.get(MLP_NORM_EPS) if isinstance(extra, dict) else None
    if eps is not None:
        for block in model.blocks:
            block.norm2.eps = float(eps)


#################################################################################
#                                diffusers -> dydit                             #
#################################################################################


def config_from_diffusers(dcfg: dict, source, objective: str | None = None) -> DiTConfig:
    """DiTConfig equivalent to a DiTTransformer2DModel config; raises on what dydit's DiT cannot represent."""
    c = {**_DEFAULTS, **{k: v for k, v in dcfg.items() if not k.startswith("_")}}
    unsupported = [
        (c["norm_type"] == "ada_norm_zero", f"norm_type {c['norm_type']!r} (only 'ada_norm_zero')"),
        (c["activation_fn"] == "gelu-approximate", f"activation_fn {c['activation_fn']!r} (only 'gelu-approximate')"),
        (bool(c["attention_bias"]), "attention_bias=False"),
        (not c["norm_elementwise_affine"], "norm_elementwise_affine=True"),
        (c["num_embeds_ada_norm"] is not None, "num_embeds_ada_norm=None (no class embedder)"),
        (isinstance(c["sample_size"], int), f"non-square sample_size {c['sample_size']!r}"),
    ]
    bad = [why for ok, why in unsupported if not ok]
    if bad:
        raise ValueError(f"{source}: dydit's DiT cannot represent this diffusers model: {'; '.join(bad)}")
    heads, C = c["num_attention_heads"], c["in_channels"]
    out = c["out_channels"] or C
    if out not in (C, 2 * C):
        raise ValueError(f"{source}: out_channels={out} for in_channels={C}; dydit's DiT predicts C or 2C channels")
    hidden, learn_sigma = heads * c["attention_head_dim"], out == 2 * C
    flow = objective == "flow"
    name = next((n for n, make in CONFIGS.items() if n.startswith("SiT-" if flow else "DiT-")
                 and _same_arch(make(), hidden, c["num_layers"], c["patch_size"], heads)), "DiT-custom")
    return DiTConfig(
        input_size=c["sample_size"], patch_size=c["patch_size"], in_channels=C, hidden_size=hidden,
        depth=c["num_layers"], num_heads=heads, mlp_ratio=4.0, class_dropout_prob=0.1,
        num_classes=c["num_embeds_ada_norm"], learn_sigma=learn_sigma, freq_shift=1.0,
        objective="flow" if flow else "diffusion", out_channels_used=C if flow and learn_sigma else None,
        name=name, extra={MLP_NORM_EPS: float(c["norm_eps"])},
    )


def _same_arch(cfg: DiTConfig, hidden, depth, patch, heads) -> bool:
    return (cfg.hidden_size, cfg.depth, cfg.patch_size, cfg.num_heads) == (hidden, depth, patch, heads)


def read_diffusers_weights(folder, map_location="cpu") -> tuple[dict, Path]:
    """Reads ``diffusion_pytorch_model`` weights (single or sharded safetensors, or .bin); returns (state, file)."""
    folder = Path(folder)
    single = folder / WEIGHTS_NAME
    if single.exists():
        return read_safetensors_file(single, map_location), single
    index = folder / f"{WEIGHTS_NAME}.index.json"
    if index.exists():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        state = {}
        for shard in shards:
            state.update(read_safetensors_file(folder / shard, map_location))
        return state, index
    legacy = folder / "diffusion_pytorch_model.bin"
    if legacy.exists():
        return read_torch_file(legacy, map_location), legacy
    raise FileNotFoundError(
        f"{folder}: no {WEIGHTS_NAME} (or sharded index / .bin) beside config.json; the folder is incomplete. "
        "Download the weights file too."
    )


def diffusers_to_dydit(dstate: dict, depth: int, source) -> dict:
    """Renames a DiTTransformer2DModel state dict to dydit keys (no pos_embed); checks the embedder copies."""
    dstate = dict(dstate)
    dstate.pop("pos_embed.pos_embed", None)  # a fixed buffer, recomputed by DiT

    def take(key):
        if key not in dstate:
            raise ValueError(f"{source}: key {key!r} is missing; the weights do not match config.json "
                             "(wrong num_layers, or not a DiTTransformer2DModel)")
        return dstate.pop(key)

    out = {}
    for ours, theirs in _pairs(depth):
        for suffix in (".weight", ".bias"):
            out[ours + suffix] = take(theirs + suffix)
    for i in range(depth):
        p = f"transformer_blocks.{i}.attn1."
        for suffix in (".weight", ".bias"):
            out[f"blocks.{i}.attn.qkv{suffix}"] = torch.cat([take(p + f"to_{n}{suffix}") for n in "qkv"], dim=0)
        for ours, theirs in _EMBED:
            t = take(f"transformer_blocks.{i}.{theirs}")
            if i == 0:
                out[ours] = t
            elif not torch.equal(t, out[ours]):
                raise ValueError(
                    f"{source}: block {i}'s timestep/label embedder ({theirs}) differs from block 0's. dydit's "
                    "DiT shares one embedder across blocks (as the official DiT does, and as diffusers' "
                    "conversions of it do), so this model cannot be represented exactly."
                )
    if dstate:
        extra = sorted(dstate)
        raise ValueError(f"{source}: unexpected keys ({len(extra)}): {extra[:8]}; not a standard DiTTransformer2DModel")
    return out


def _pairs(depth: int):
    yield from _TOP
    for i in range(depth):
        for ours, theirs in _BLOCK:
            yield ours.format(i=i), theirs.format(i=i)


def load_diffusers(folder, objective: str | None = None, map_location="cpu", config: dict | None = None) -> DiT:
    """Loads a diffusers DiTTransformer2DModel folder as a dydit DiT with the same outputs."""
    folder = Path(folder)
    dcfg = config if config is not None else _read_json(folder / CONFIG_NAME)
    cfg = config_from_diffusers(dcfg, folder / CONFIG_NAME, objective)
    dstate, source = read_diffusers_weights(folder, map_location)
    state = diffusers_to_dydit(dstate, cfg.depth, source)
    model = DiT(cfg)
    state["pos_embed"] = model.pos_embed.detach().clone()
    load_state_dict_strict(model, state, source=str(source))
    apply_mlp_norm_eps(model)
    return model.eval()


def _read_json(path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); the file is corrupted, download or copy it again") from e


#################################################################################
#                                dydit -> diffusers                             #
#################################################################################


def diffusers_config(model) -> dict:
    """The DiTTransformer2DModel config.json for ``model``."""
    c = model.config
    try:
        import diffusers

        version = diffusers.__version__
    except ImportError:
        version = "0.30.0"
    return {
        "_class_name": CLASS_NAME, "_diffusers_version": version,
        "num_attention_heads": c.num_heads, "attention_head_dim": c.hidden_size // c.num_heads,
        "in_channels": c.in_channels, "out_channels": c.out_channels, "num_layers": c.depth, "dropout": 0.0,
        "norm_num_groups": 32, "attention_bias": True, "sample_size": c.input_size, "patch_size": c.patch_size,
        "activation_fn": "gelu-approximate", "num_embeds_ada_norm": c.num_classes, "upcast_attention": False,
        "norm_type": "ada_norm_zero", "norm_elementwise_affine": False,
        "norm_eps": float(c.extra.get(MLP_NORM_EPS, OFFICIAL_NORM_EPS)),
    }


def dydit_to_diffusers(state: dict, depth: int) -> dict:
    """Renames a dydit DiT state dict to DiTTransformer2DModel keys, copying the embedder into every block."""
    out = {}
    for ours, theirs in _pairs(depth):
        for suffix in (".weight", ".bias"):
            out[theirs + suffix] = state[ours + suffix]
    for i in range(depth):
        p = f"transformer_blocks.{i}."
        for suffix in (".weight", ".bias"):
            q, k, v = state[f"blocks.{i}.attn.qkv{suffix}"].chunk(3, dim=0)
            out.update({p + f"attn1.to_q{suffix}": q, p + f"attn1.to_k{suffix}": k, p + f"attn1.to_v{suffix}": v})
        for ours, theirs in _EMBED:
            out[p + theirs] = state[ours]
    return {k: v.detach().cpu().contiguous().clone() for k, v in out.items()}  # safetensors refuses shared storage


def export_diffusers(model, folder, strict: bool = True) -> Path:
    """Writes ``model`` as a diffusers DiTTransformer2DModel folder (config.json + safetensors), atomically.

    ``strict`` refuses models whose diffusers port would compute something different (official
    ``freq_shift=0`` timestep features, SiT's first-C-channel output); with ``strict=False`` they are
    exported with a warning.
    """
    if getattr(model, "dynamic_config", None) is not None:
        raise ValueError("diffusers' DiT has no DyDiT routers; export the static backbone, or use dydit.save")
    c = model.config
    if c.mlp_ratio != 4.0 or c.class_dropout_prob <= 0 or c.hidden_size % c.num_heads:
        raise ValueError(f"{c.name}: diffusers' DiT needs mlp_ratio 4 and a null class row "
                         f"(got mlp_ratio={c.mlp_ratio}, class_dropout_prob={c.class_dropout_prob})")
    differences = []
    if c.freq_shift != 1.0:
        differences.append(f"timestep features use freq_shift={c.freq_shift}, diffusers' DiT always uses 1")
    if c.out_channels_used is not None:
        differences.append(f"the model returns only its first {c.out_channels_used} channels, diffusers returns all")
    if differences:
        msg = f"{c.name}: the diffusers export would not compute the same function: {'; '.join(differences)}"
        if strict:
            raise ValueError(msg + ". Pass strict=False to export anyway.")
        log.warning("%s", msg)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    state = dydit_to_diffusers(model.state_dict(), c.depth)
    with atomic_path(folder / WEIGHTS_NAME) as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
    atomic_write_text(json.dumps(diffusers_config(model), indent=2, sort_keys=True), folder / CONFIG_NAME)
    return folder
