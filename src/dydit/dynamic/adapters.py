"""Block adapters: how the dynamic core sees a backbone it does not own.

A backbone file (``dydit.models``) defines plain static modules and knows nothing of DyDiT. An
adapter, registered for one block class, names that block's *routed units* and writes its dynamic
forward once against a :class:`dydit.dynamic.engine.BlockRun`; everything else — routers, the
per-timestep plan, weight slicing, the FLOPs counter, the masked reference, the fast engine,
conversion — is generic over those units. This is the shape of diffusers' hook registry
(``apply_first_block_cache`` knows how to read each block class) and of peft's module replacement.

Units:
  :class:`HeadUnit`   attention heads routed together, over the projections they span: a fused qkv
                      (three row spans), split q/k/v, FLUX's added text projections, an output
                      projection's columns, or part of a fused output projection;
  :class:`GroupUnit`  MLP hidden channels in G equal groups, over the linears they span (rows of the
                      up projection, columns of the down projection or of a fused output projection);
  token stream        the tokens a token router sees and gates (SDT), named by the adapter's forward.

A :class:`Span` says where a unit's slots sit in one ``nn.Linear``: along its output rows (weight rows
and bias) or its input columns, from an offset, and how many tokens per sample pass through it (the
FLOPs). Slot ``s`` of a unit with slot size ``k`` occupies indices ``offset + s·k … offset + s·k + k-1``.

To make a new backbone dynamic, subclass :class:`BlockAdapter` and :class:`ModelAdapter` and register
them with :func:`register_block_adapter` / :func:`register_model_adapter` (docs/ARCHITECTURE.md has a
worked example; tests/test_adapters.py registers one for a block class defined only in the test).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from dydit.dynamic.routers import TokenRouter

# Router attribute names on a block: those of the authors' DyDiT checkpoints (``attn_rate``,
# ``mlp_rate``, ``token_selection``) and the block-skip ablation's gate.
GATE = "block_gate"


@dataclass(frozen=True)
class Span:
    """Where a unit's slots sit inside one Linear of the block."""

    linear: str  # module path inside the block, e.g. "attn.qkv"
    axis: str  # "out": weight rows (and bias entries); "in": weight columns
    offset: int = 0  # index of the unit's first slot along that axis
    tokens: int = 0  # tokens per sample that pass through this linear (for the FLOPs counter)
    # Of those, the tokens of the token router's stream: they pass only when kept (SDT). None: all of
    # them in a token-routed unit, none otherwise. FLUX single blocks: the image tokens of a fused
    # projection that text tokens also pass through.
    routed: int | None = None

    def __post_init__(self):
        if self.axis not in ("out", "in"):
            raise ValueError(f"Span axis must be 'out' or 'in', got {self.axis!r}")


@dataclass(frozen=True)
class HeadUnit:
    """Attention heads routed by one width router (E_t -> mask over heads)."""

    name: str
    router: str  # block attribute holding its WidthRouter
    num_heads: int
    head_dim: int
    spans: tuple[Span, ...]
    seq_len: int = 0  # attention length: the quadratic term is 2·seq_len²·width per instance
    instances: int = 1  # attention instances per sample (Latte spatial: frames; temporal: positions)
    optional: bool = False  # routed only when DynamicConfig.optional_units names it

    @property
    def num_slots(self) -> int:
        return self.num_heads

    @property
    def slot_size(self) -> int:
        return self.head_dim


@dataclass(frozen=True)
class GroupUnit:
    """MLP hidden channels in equal groups, routed by one width router; optionally token-gated."""

    name: str
    router: str
    num_groups: int
    group_size: int
    spans: tuple[Span, ...]
    token_router: str | None = None  # the token router whose kept tokens alone run this unit (SDT)
    optional: bool = False  # routed only when DynamicConfig.optional_units names it (FLUX's ff_context)

    @property
    def num_slots(self) -> int:
        return self.num_groups

    @property
    def slot_size(self) -> int:
        return self.group_size


@dataclass(frozen=True)
class BlockSpec:
    """Everything the dynamic core needs to know about one block instance."""

    heads: tuple[HeadUnit, ...]
    groups: tuple[GroupUnit, ...]
    width_dim: int  # width of the width routers' input (the timestep embedding E_t)
    token_router: str | None = None  # block attribute of the token router (None: no SDT here)
    token_dim: int = 0  # width of the tokens the token router sees
    num_tokens: int = 0  # tokens per sample the token router sees
    fixed_macs: float = 0.0  # per-sample MACs the routers never scale (adaLN modulation, …)
    kind: str = "block"  # reported per kind (Latte: "spatial"/"temporal"; FLUX: "double"/"single")

    @property
    def units(self) -> tuple:
        return (*self.heads, *self.groups)

    def unit(self, name: str):
        for u in self.units:
            if u.name == name:
                return u
        raise KeyError(f"block has no routed unit {name!r}; units: {[u.name for u in self.units]}")


def span_routed(unit, span: Span) -> int:
    """Tokens per sample through ``span`` that only run when the token router keeps them."""
    if span.routed is not None:
        return span.routed
    return span.tokens if getattr(unit, "token_router", None) is not None else 0


class BlockAdapter:
    """How one block class is routed. Subclass, implement both methods, register for the class."""

    # whether forward() passes the block conditioning to its token router (route=(c,)), which the token
    # routers' count term (DynamicConfig.token_count) needs
    token_conditioning: bool = False

    def spec(self, block: nn.Module, model: nn.Module) -> BlockSpec:
        """The routed units of ``block`` (an instance inside ``model``)."""
        raise NotImplementedError

    def forward(self, block: nn.Module, run, *args, **kwargs):
        """The dynamic forward of ``block``: the static computation written against ``run``.

        ``run`` (a :class:`dydit.dynamic.engine.BlockRun`) gives ``run.linear(path, x)`` (the Linear
        restricted to the active rows/columns on the fast path), ``run.num_heads(unit)``,
        ``run.mask_heads(unit, out)`` / ``run.mask_groups(unit, a)`` (the masked reference; identity on
        the fast path), ``run.token_update(unit, x, fn, route=())`` (SDT) and ``run.gate_update(u)`` / ``run.skipped``
        (block skip). The arguments are those of the block's own forward.
        """
        raise NotImplementedError

    def make_token_router(self, block: nn.Module, spec: BlockSpec, config) -> nn.Module:
        """The token router ``dynamize`` attaches (default: the DyDiT per-token MLP on the token itself).
        Its ``forward(x, *route, tau, training, noise)`` and ``keep(x, *route)`` see the tokens and the
        extra inputs the adapter's forward passes as ``run.token_update(..., route=...)``."""
        if config.token_count and not self.token_conditioning:
            raise ValueError(f"token_count (routing.token_count) needs a block adapter that passes the block "
                             f"conditioning to its token router; {type(self).__name__} does not (DiT/SiT and "
                             "official Latte blocks do): turn it off")
        return TokenRouter(spec.token_dim, config.token_hidden_ratio, config.token_bias_init,
                           center=config.token_center, count_dim=spec.width_dim if config.token_count else None)


class ModelAdapter:
    """How a whole backbone exposes its routed blocks and the routers' input."""

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The routable blocks, in execution order (block i of the plan and the FLOPs spec)."""
        raise NotImplementedError

    def router_input(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(key, E_t (B, D)) of one call ``model(*args, **kwargs)``: what the width routers see.

        ``key`` is (B,) timesteps, or (B, K) when the routers' input depends on more scalars than t (FLUX's
        guidance scale: (t, guidance)); the width plan is keyed by it."""
        raise NotImplementedError

    def timestep_embedding(self, model: nn.Module, t: torch.Tensor) -> torch.Tensor:
        """E_t (T, D) for plan keys (T,) or (T, K): the plan evaluates the width routers on it."""
        raise NotImplementedError

    def geometry(self, model: nn.Module, args: tuple, kwargs: dict):
        """Token counts of one call, for backbones whose sequence length varies per call (FLUX: image and
        text tokens); None when the config fixes them. The model keeps the last call's geometry, and the
        block specs (hence the FLOPs counter) describe it."""
        return None

    def router_input_modules(self, model: nn.Module) -> list[nn.Module]:
        """Modules the routers' input depends on (a plan is recomputed when their weights change)."""
        return []

    def other_macs(self, model: nn.Module) -> tuple[float, float]:
        """Per-sample MACs outside the blocks: (embedders, final layer)."""
        return 0.0, 0.0

    def num_tokens(self, model: nn.Module) -> int:
        """Tokens per sample (for usage reports)."""
        raise NotImplementedError


_BLOCK_ADAPTERS: dict[type, BlockAdapter] = {}
_MODEL_ADAPTERS: dict[type, ModelAdapter] = {}


def register_block_adapter(cls: type, adapter: BlockAdapter) -> BlockAdapter:
    """Registers ``adapter`` for ``cls`` and its subclasses (the most specific registration wins)."""
    _BLOCK_ADAPTERS[cls] = adapter
    return adapter


def register_model_adapter(cls: type, adapter: ModelAdapter) -> ModelAdapter:
    _MODEL_ADAPTERS[cls] = adapter
    return adapter


def _lookup(registry: dict, obj):
    for klass in type(obj).__mro__:
        if klass in registry:
            return registry[klass]
    return None


def block_adapter(block) -> BlockAdapter | None:
    return _lookup(_BLOCK_ADAPTERS, block)


def model_adapter(model, required: bool = True) -> ModelAdapter | None:
    adapter = _lookup(_MODEL_ADAPTERS, model)
    if adapter is None and required:
        raise TypeError(f"{type(model).__name__} has no registered dydit model adapter; register one with "
                        "dydit.dynamic.adapters.register_model_adapter (see docs/ARCHITECTURE.md)")
    return adapter


def slot_indices(slots: torch.Tensor, slot_size: int, offset: int = 0) -> torch.Tensor:
    """Active slot ids (s,) -> indices (s·slot_size,) along a Linear axis."""
    ar = torch.arange(slot_size, device=slots.device)
    return (offset + slots[:, None] * slot_size + ar[None]).reshape(-1)


def linear_index(spec: BlockSpec, path: str, axis: str, active: dict[str, torch.Tensor], size: int):
    """Indices of ``path``'s weight along ``axis`` kept by the active slots of every unit spanning it.

    Spans are concatenated in the order the spec lists them (units, then spans), which is the order the
    adapter's forward lays out its narrowed activations (q, k, v; attention before MLP in a fused
    projection). None when the result is the whole axis in order (no slicing needed).
    """
    parts = []
    for unit in spec.units:
        for span in unit.spans:
            if span.linear == path and span.axis == axis:
                parts.append(slot_indices(active[unit.name], unit.slot_size, span.offset))
    if not parts:
        return None
    idx = torch.cat(parts)
    if idx.numel() == size and bool((idx == torch.arange(size, device=idx.device)).all()):
        return None
    return idx
