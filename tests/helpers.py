"""Shared test fixtures-by-function: random weights and routers that really switch things on and off."""
import torch


def randomize(model, seed=0, scale=0.3):
    """Random weights everywhere but pos_embed, so adaLN-Zero blocks are not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def scramble_routers(model, seed=1):
    """Router weights that switch heads, groups and tokens on and off across timesteps and blocks."""
    from dydit.dynamic.plan import routed_blocks

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in routed_blocks(model):
            for r in (block.attn_rate, block.mlp_rate):
                if r is not None:
                    r.router.weight.copy_(torch.randn(r.router.weight.shape, generator=g))
                    r.router.bias.copy_(torch.randn(r.router.bias.shape, generator=g))
            gate = getattr(block, "block_gate", None)
            if gate is not None:  # a timestep gate that skips the block for part of the trajectory
                gate.router.weight.copy_(torch.randn(gate.router.weight.shape, generator=g))
                gate.router.bias.copy_(torch.randn(gate.router.bias.shape, generator=g) * 0.1)
            if block.token_selection is not None:
                ts = block.token_selection
                for lin in (ts.mlp_head[0], ts.mlp_head[2]) + ((ts.count,) if getattr(ts, "count", None) is not None else ()):
                    lin.weight.copy_(torch.randn(lin.weight.shape, generator=g))
                    lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * 0.1)
    return model


def tiny_dit():
    """A 2-block DiT-FMNIST, seeded: the model of the training and reliability tests."""
    from dydit.models.dit import build_model

    torch.manual_seed(0)
    return build_model("DiT-FMNIST", hidden_size=32, depth=2, num_heads=4)
