"""What a backbone's ``forward(x, t, y)`` accepts, checked in one place with errors that name the argument.

Shapes, dtypes and batch agreement are checked on every call (Python attribute reads, no device sync).
The values (labels in range, t in the model's range) need one host sync on a GPU; they are checked on
every direct call, but not inside :func:`dydit.sampling.sample`, which checks its labels once and makes
its timesteps itself (:func:`trusted_values`), and not while ``torch.compile`` traces.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

_STATE = threading.local()

# the timestep range of each objective, in the backbone's units (diffusion: 1000 discrete steps)
T_RANGE = {"diffusion": (0.0, 1000.0), "flow": (0.0, 1.0)}


@contextmanager
def trusted_values():
    """Within it, forward calls skip the value checks (the caller made t and checked y); shapes still checked."""
    previous = getattr(_STATE, "trusted", False)
    _STATE.trusted = True
    try:
        yield
    finally:
        _STATE.trusted = previous


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def check_inputs(config, x, t, y) -> torch.Tensor:
    """Checks one call of a (B, C, H, W) class-conditional backbone; returns t as a (B,) tensor.

    ``y`` may hold ``num_classes``, the null class of classifier-free guidance.
    """
    if _compiling():
        return t.expand(x.shape[0]) if t.ndim == 0 else t
    c = config
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor (B, {c.in_channels}, {c.input_size}, {c.input_size}), got "
                        f"{type(x).__name__}")
    want = (c.in_channels, c.input_size, c.input_size)
    if x.ndim != 4 or tuple(x.shape[1:]) != want:
        raise ValueError(f"x: expected input of shape (B, {c.in_channels}, {c.input_size}, {c.input_size}), "
                         f"got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x: expected a floating-point tensor, got {x.dtype}")
    B = x.shape[0]
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a tensor of timesteps (B,) or a scalar tensor, got {type(t).__name__}")
    if t.ndim == 0:
        t = t.expand(B)
    if t.ndim != 1 or len(t) != B:
        raise ValueError(f"t: expected one timestep per image, shape ({B},) like x's batch, got {tuple(t.shape)}")
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a tensor of class ids (B,), got {type(y).__name__}")
    if y.ndim != 1 or len(y) != B:
        raise ValueError(f"y: expected one class id per image, shape ({B},) like x's batch, got {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"y: class ids must be an integer tensor (torch.long), got {y.dtype}")
    if getattr(_STATE, "trusted", False) or B == 0:
        return t
    lo, hi = T_RANGE.get(getattr(c, "objective", "diffusion"), (float("-inf"), float("inf")))
    y_min, y_max, t_min, t_max = torch.stack([y.min().double(), y.max().double(), t.min().double(),
                                              t.max().double()]).tolist()  # one host sync
    if y_min < 0 or y_max > c.num_classes:
        raise ValueError(f"y: class ids must be in [0, {c.num_classes}] ({c.num_classes}: the null class of "
                         f"guidance), got values in [{int(y_min)}, {int(y_max)}]")
    if not (lo <= t_min and t_max <= hi):  # also catches NaN
        raise ValueError(f"t: timesteps of a {c.objective} model must be in [{lo:g}, {hi:g}], got values in "
                         f"[{t_min:g}, {t_max:g}]")
    return t
