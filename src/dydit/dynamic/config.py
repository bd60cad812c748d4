"""DynamicConfig: how a backbone's blocks are made dynamic (saved with the model)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class DynamicConfig:
    """Router layout and binarisation settings of a DyDiT model."""

    width: bool = True  # TDW: timestep-wise dynamic heads and MLP channel groups
    tokens: bool = True  # SDT: spatial-wise dynamic tokens through the MLP
    block_skip: bool = False  # ablation: one timestep gate per block that runs or skips the whole block
    always_on: bool = True  # head 0 / group 0 always run (router has H-1 outputs); False: legacy H-wide routers
    width_bias_init: float = 15.0  # starts every head/group on: the converted model is the static function
    token_bias_init: float = 35.0
    token_center: bool = False  # token logits centred over each image's tokens (TokenRouter.center); authors: off
    token_count: bool = False  # + a per-sample count term on the block conditioning (TokenRouter.count); DiT/SiT
    token_hidden_ratio: int = 16  # token router hidden width = D // ratio
    tau: float = 5.0  # gumbel-sigmoid temperature in training
    # Units an adapter marks optional that get width routers too (FLUX double blocks: "mlp_context",
    # the text tokens' ff_context); the others run at full width.
    optional_units: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DynamicConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown dynamic config keys {sorted(unknown)}")
        return cls(**d)
