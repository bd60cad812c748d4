"""Parameter-efficient fine-tuning of dydit models, one folder per method (peft's tuner shape)."""
from dydit.peft.td_lora import (
    TDLoRAConfig,
    TDLoRALinear,
    TDLoRAWeights,
    apply_td_lora,
    load_adapters,
    save_adapters,
    td_lora_fast_context,
    trainable_report,
)

__all__ = [
    "TDLoRAConfig", "TDLoRALinear", "TDLoRAWeights", "apply_td_lora", "load_adapters",
    "save_adapters", "td_lora_fast_context", "trainable_report",
]
