"""TD-LoRA: timestep-based dynamic LoRA for parameter-efficient DyDiT fine-tuning."""
from dydit.peft.td_lora.config import TDLoRAConfig
from dydit.peft.td_lora.layer import TDLoRALinear, TimestepState
from dydit.peft.td_lora.model import (
    TDLoRAWeights,
    apply_td_lora,
    load_adapters,
    read_adapter_config,
    save_adapters,
    td_lora_fast_context,
    td_lora_layers,
    trainable_report,
)

__all__ = [
    "TDLoRAConfig", "TDLoRALinear", "TimestepState", "TDLoRAWeights", "apply_td_lora",
    "load_adapters", "read_adapter_config", "save_adapters", "td_lora_fast_context", "td_lora_layers",
    "trainable_report",
]
