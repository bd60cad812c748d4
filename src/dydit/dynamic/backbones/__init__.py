"""Adapters of the backbones dydit ships (importing this package registers them)."""
import logging

from dydit.dynamic.backbones import dit, latte  # noqa: F401

try:
    from dydit.dynamic.backbones import flux  # noqa: F401  (diffusers' FluxTransformer2DModel)
except ImportError as e:  # a diffusers release without the FLUX classes this adapter reads (before 0.35)
    if not (e.name or "").startswith("diffusers"):
        raise
    logging.getLogger(__name__).info("FLUX adapters not registered: %s", e)
