"""Strict state-dict loading with errors that name the file and the problem."""
from __future__ import annotations

import torch


def load_state_dict_strict(model: torch.nn.Module, state: dict, source: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        msg = [f"{source}: checkpoint does not match the model {getattr(model.config, 'name', '')!r}."]
        if missing:
            msg.append(f"  missing keys ({len(missing)}): {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            msg.append(f"  unexpected keys ({len(unexpected)}): {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        msg.append("  Check that the config (model size, patch, classes, dynamic routers) matches the checkpoint.")
        raise ValueError("\n".join(msg))
    bad = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items() if state[k].shape != v.shape]
    if bad:
        lines = "\n".join(f"  {k}: checkpoint {a} vs model {b}" for k, a, b in bad[:8])
        raise ValueError(
            f"{source}: tensor shapes do not match the model config:\n{lines}\n"
            "  The checkpoint was made for another architecture (size, patch, channels or classes)."
        )
    model.load_state_dict(state, strict=True)
