"""The B3 baselines built on the shared machinery: static magnitude pruning and whole-block skipping."""
import pytest
import torch

import dydit
from dydit.dynamic import DynamicConfig, DynamicContext, dynamize, flops_spec
from dydit.dynamic.calibrate import measure_ratio
from dydit.dynamic.convert import router_parameters
from dydit.dynamic.flops import dynamic_ratio
from dydit.dynamic.prune import choose_widths, static_width_prune
from dydit.models.dit import build_model
from dydit.sampling import sample
from helpers import randomize, scramble_routers


def test_static_prune_keeps_the_same_narrow_width_at_every_step():
    model, info = static_width_prune(randomize(build_model("DiT-Tiny")), 0.5)
    model.eval()
    assert info["flops_ratio"] == pytest.approx(0.5, abs=0.13)
    assert not any(p.requires_grad for p in router_parameters(model))
    ctx = DynamicContext("fast", record_usage=True)
    fast = sample(model, [1, 2, 3], "ddim", 5, cfg_scale=4.0, dyn=ctx)
    assert {tuple(u.heads) for u in ctx.usage} == {(info["heads_kept"],) * len(model.blocks)}
    assert {tuple(u.groups) for u in ctx.usage} == {(info["groups_kept"],) * len(model.blocks)}
    masked = sample(model, [1, 2, 3], "ddim", 5, cfg_scale=4.0, dyn=DynamicContext("masked"))
    assert (fast - masked).abs().max() <= 1e-5 * masked.abs().max()
    # the training masks are the same constant ones (noise cannot flip a ±30 logit)
    ctx = DynamicContext("train", noise=1.0)
    model.train()(torch.randn(4, 4, 8, 8), torch.tensor([0.0, 300.0, 600.0, 999.0]), torch.arange(4), dyn=ctx)
    assert torch.allclose(dynamic_ratio(flops_spec(model), ctx.records), torch.full((4,), info["flops_ratio"]))


def test_prune_widths_for_the_embedded_model_hit_half_exactly():
    from dydit.assets import default_model_path

    model = dydit.load(default_model_path())
    assert choose_widths(dynamize(model, DynamicConfig(tokens=False)), 0.5)[2] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="static"):
        static_width_prune(model, 0.5)  # already dynamic


def test_block_skip_runs_no_block_work_when_gated_off():
    model = scramble_routers(dynamize(randomize(build_model("DiT-Tiny"), scale=0.1),
                                      DynamicConfig(width=False, tokens=False, block_skip=True))).eval()
    ctx = DynamicContext("fast", record_usage=True)
    fast = sample(model, [1, 2], "ddim", 8, cfg_scale=4.0, dyn=ctx)
    heads = [h for u in ctx.usage for h in u.heads]
    assert 0 in heads and max(heads) == model.blocks[0].attn.num_heads  # some blocks skipped, some full
    masked = sample(model, [1, 2], "ddim", 8, cfg_scale=4.0, dyn=DynamicContext("masked"))
    assert (fast - masked).abs().max() <= 1e-5 * masked.abs().max()
    assert 0.0 < measure_ratio(model, "ddim", 8, 4.0, 2) < 1.0
    # a skipped block is the identity: all gates off gives the input back through every block
    with torch.no_grad():
        for b in model.blocks:
            b.block_gate.router.bias.fill_(-100.0)
            b.block_gate.router.weight.zero_()
    x, t, y = torch.randn(2, 4, 8, 8), torch.zeros(2), torch.tensor([1, 2])
    with torch.no_grad():
        tokens, c, _ = model.embed(x, t, y)
        through_no_block = model.unpatchify(model.final_layer(tokens, c))
        assert torch.equal(model(x, t, y, dyn=DynamicContext("fast")), through_no_block)
        assert not torch.equal(model(x, t, y, dyn="complete"), through_no_block)
