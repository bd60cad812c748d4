"""The DyDiT machinery shared by every backbone: routers, FLOPs accounting, plan, engine, losses."""
from dydit.dynamic import backbones  # noqa: F401  (registers the shipped backbones' adapters)
from dydit.dynamic.adapters import (BlockAdapter, BlockSpec, GroupUnit, HeadUnit, ModelAdapter, Span,
                                    register_block_adapter, register_model_adapter)
from dydit.dynamic.config import DynamicConfig
from dydit.dynamic.context import DynamicContext
from dydit.dynamic.convert import detect_dydit_layout, dynamize, load_dydit_state_dict, reorder_by_importance
from dydit.dynamic.flops import dynamic_ratio, flops_spec, realised_macs, static_gmacs
from dydit.dynamic.plan import SlicedWeights, WidthPlan

__all__ = [
    "DynamicConfig", "DynamicContext", "dynamize", "reorder_by_importance", "load_dydit_state_dict",
    "detect_dydit_layout", "flops_spec", "static_gmacs", "dynamic_ratio", "realised_macs", "WidthPlan",
    "SlicedWeights", "BlockAdapter", "ModelAdapter", "BlockSpec", "HeadUnit", "GroupUnit", "Span",
    "register_block_adapter", "register_model_adapter",
]
