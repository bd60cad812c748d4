"""TDLoRAConfig: the TD-LoRA hyper-parameters; each field's help doubles as CLI help."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

DEFAULT_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
ROUTER_FORMS = ("linear", "mlp")


@dataclass
class TDLoRAConfig:
    """Timestep-based dynamic LoRA: W(t) = W0 + Σ_k a_k(E_t)·(α/r)·B_k A_k."""

    r: int | None = field(default=None, metadata={
        "help": "rank of every expert; default hidden_size // 256 (at least 1): ~1.2% trainable on DiT-XL/2"})
    num_experts: int = field(default=4, metadata={
        "help": "K low-rank experts per layer, mixed by a(E_t); 1 = plain LoRA (mixing weight 1)"})
    lora_alpha: float | None = field(default=None, metadata={
        "help": "LoRA alpha; the update is scaled by alpha / r (default: alpha = r, scaling 1)"})
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS), metadata={
        "help": "block linear layers to adapt, by name suffix inside each block"})
    router: str = field(default="linear", metadata={
        "help": "mixing router over E_t: 'linear' (softmax(W·E_t + b)) or 'mlp' (softmax of Linear-SiLU-Linear)"})
    router_hidden: int = field(default=64, metadata={"help": "hidden width of the 'mlp' mixing router"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input (training only)"})
    train_routers: bool = field(default=True, metadata={
        "help": "train the DyDiT width/token routers together with the adapters (the TD-LoRA recipe)"})

    def __post_init__(self):
        if self.r is not None and self.r < 1:
            raise ValueError(f"TD-LoRA rank r must be >= 1, got {self.r}")
        if self.num_experts < 1:
            raise ValueError(f"TD-LoRA needs at least one expert, got num_experts={self.num_experts}")
        if self.router not in ROUTER_FORMS:
            raise ValueError(f"unknown TD-LoRA router {self.router!r}; choose from {ROUTER_FORMS}")
        if not self.target_modules:
            raise ValueError("TD-LoRA target_modules is empty")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        self.target_modules = list(self.target_modules)

    def resolved(self, hidden_size: int) -> "TDLoRAConfig":
        """A copy with the width-dependent defaults (r, lora_alpha) filled in for this backbone."""
        d = self.to_dict()
        d["r"] = self.r if self.r is not None else max(1, hidden_size // 256)
        d["lora_alpha"] = self.lora_alpha if self.lora_alpha is not None else float(d["r"])
        return TDLoRAConfig(**d)

    @property
    def scaling(self) -> float:
        if self.r is None or self.lora_alpha is None:
            raise ValueError("call resolved(hidden_size) first: r / lora_alpha are still the width defaults")
        return self.lora_alpha / self.r

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TDLoRAConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown TD-LoRA config keys {sorted(unknown)}; is this a dydit adapter_config.json?")
        return cls(**d)

    @classmethod
    def help(cls, name: str) -> str:
        """The help text of field ``name`` (used by the CLI)."""
        return next(f.metadata.get("help", "") for f in fields(cls) if f.name == name)
