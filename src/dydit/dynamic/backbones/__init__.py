"""Adapters of the backbones dydit ships (importing this package registers them)."""
from dydit.dynamic.backbones import dit, latte  # noqa: F401
