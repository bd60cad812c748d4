"""First-Block-Cache: exact when it never skips, skips what its rules allow, reuses the right residual,
works with guidance and dynamic models, and its MACs accounting adds up."""
import pytest
import torch

from dydit.cache import FirstBlockCache, cached, cached_macs
from dydit.dynamic import DynamicContext, dynamize, flops_spec
from dydit.dynamic.report import summarize
from dydit.models.dit import build_model
from dydit.sampling import sample
from helpers import randomize as shared_randomize

torch.set_num_threads(1)


def randomize(model, seed=0, scale=0.3):
    return shared_randomize(model, seed, scale).eval()


def tiny(depth=3, seed=0):
    return randomize(build_model("DiT-Tiny", depth=depth), seed)


def dynamic_tiny(depth=3):
    model = dynamize(tiny(depth))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # routers that switch heads, groups and tokens off
        for name, p in model.named_parameters():
            if any(k in name for k in ("attn_rate.", "mlp_rate.", "token_selection.")):
                p.copy_(torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_rdt_zero_never_skips_and_is_bit_equal(cfg_scale):
    model = tiny()
    ref = sample(model, [0, 1], "ddim", 5, cfg_scale=cfg_scale)
    cache = FirstBlockCache(rdt=0.0, warmup=0)
    with cached(model, cache):
        out = sample(model, [0, 1], "ddim", 5, cfg_scale=cfg_scale)
    assert torch.equal(out, ref)
    assert (cache.steps, cache.full_steps, cache.skipped_steps) == (5, 5, 0)
    assert cache.blocks_run == 5 * 3 and cache.block_share() == 1.0
    assert "forward" not in model.__dict__  # the patch is undone


def test_huge_rdt_skips_all_but_warmup():
    model = tiny()
    cache = FirstBlockCache(rdt=1e9, warmup=1, num_steps=6)
    with cached(model, cache):
        sample(model, [0, 1], "ddim", 6)
    assert [s.skipped for s in cache.history] == [False, True, True, True, True, False]
    assert (cache.full_steps, cache.skipped_steps) == (2, 4)
    assert cache.blocks_run == 2 * 3 + 4 * 1
    assert cache.block_share() == pytest.approx(10 / 18)


def test_max_consecutive_forces_refresh():
    model = tiny()
    cache = FirstBlockCache(rdt=1e9, warmup=1, max_consecutive=2, num_steps=7)
    with cached(model, cache):
        sample(model, [0], "ddim", 7)
    assert [s.skipped for s in cache.history] == [False, True, True, False, True, True, False]


def test_skipped_step_is_block0_plus_cached_residual():
    model = tiny()
    g = torch.Generator().manual_seed(3)
    x1, x2 = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t1, t2, y = torch.tensor([500, 500]), torch.tensor([480, 480]), torch.tensor([1, 2])
    cache = FirstBlockCache(rdt=1e9, warmup=0)
    with torch.no_grad():
        with cached(model, cache):
            full1 = model(x1, t1, y)
            out2 = model(x2, t2, y)
        assert torch.equal(full1, model(x1, t1, y))  # a full step is the plain forward
        # by construction: rest residual from step 1, block 0 of step 2
        tok, c, te = model.embed(x1, t1, y)
        b0 = model.blocks[0](tok, c)
        rest = b0
        for block in model.blocks[1:]:
            rest = block(rest, c)
        tok2, c2, te2 = model.embed(x2, t2, y)
        expect = model.unpatchify(model.final_layer(model.blocks[0](tok2, c2) + (rest - b0), c2))
        assert torch.equal(out2, expect)
        assert not torch.allclose(out2, model(x2, t2, y))  # the skip really changed the output
    assert [s.skipped for s in cache.history] == [False, True]


def test_batch_size_change_raises_within_a_run():
    model = tiny()
    cache = FirstBlockCache(rdt=0.1)
    t, x = torch.tensor(10), torch.randn(3, 4, 8, 8)
    with torch.no_grad(), cached(model, cache):
        model(x[:2], t, torch.tensor([0, 1]))
        with pytest.raises(ValueError, match="batch size must stay constant"):
            model(x, t, torch.tensor([0, 1, 2]))
        cache.start()  # a new run may use another batch size
        model(x, t, torch.tensor([0, 1, 2]))
    # with num_steps, consecutive sampling runs of different batch sizes need no start()
    cache = FirstBlockCache(rdt=0.1, num_steps=3)
    with cached(model, cache):
        sample(model, [0, 1], "ddim", 3)
        sample(model, [0, 1, 2], "ddim", 3)
    assert cache.runs == 2 and [s.step for s in cache.history] == [0, 1, 2] * 2


def test_dynamic_fast_model_with_cfg():
    model = dynamic_tiny()
    labels = [0, 3]
    ref_ctx = DynamicContext("fast", record_usage=True)
    ref = sample(model, labels, "ddim", 6, cfg_scale=4.0, dyn=ref_ctx)
    exact = FirstBlockCache(rdt=0.0)
    with cached(model, exact):
        out = sample(model, labels, "ddim", 6, cfg_scale=4.0, dyn=DynamicContext("fast"))
    assert torch.equal(out, ref)
    assert all(s.batch == 4 for s in exact.history)  # both CFG halves in one batch
    ctx = DynamicContext("fast", record_usage=True)
    cache = FirstBlockCache(rdt=1e9, warmup=1, num_steps=6)
    with cached(model, cache):
        out = sample(model, labels, "ddim", 6, cfg_scale=4.0, dyn=ctx)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert cache.skipped_steps == 4
    for s, u in zip(cache.history, ctx.usage):  # skipped steps ran block 0's dynamic compute only
        assert all(h > 0 for h in u.heads[: s.blocks_run])
        assert all(h == 0 and k == 0 for h, k in zip(u.heads[s.blocks_run:], u.tokens_kept[s.blocks_run:]))
    spec = flops_spec(model)
    # never skipping, the cache's accounting equals the dynamic report's
    assert cached_macs(spec, exact, ref_ctx.usage, cfg_batches=2)["per_image"] == pytest.approx(
        summarize(ref_ctx.usage, spec, cfg_batches=2)["gmacs_per_image"] * 1e9)
    skipped = cached_macs(spec, cache, ctx.usage, cfg_batches=2)
    assert skipped["per_image"] < cached_macs(spec, exact, ref_ctx.usage, cfg_batches=2)["per_image"]


def test_static_accounting_matches_hand_count():
    model = tiny()
    spec = flops_spec(model)
    cache = FirstBlockCache(rdt=1e9, warmup=1, num_steps=6)
    with cached(model, cache):
        sample(model, [0, 1], "ddim", 6, cfg_scale=4.0)
    b0 = spec.blocks[0]
    skipped_forward = spec.embed + spec.final + b0.attn + b0.mlp + b0.modulation
    m = cached_macs(spec, cache, cfg_batches=2)
    assert m["per_image"] == pytest.approx(2 * (2 * spec.static_macs + 4 * skipped_forward))
    assert m["static_per_image"] == pytest.approx(2 * 6 * spec.static_macs)
    assert m["block_ratio"] == pytest.approx(cache.block_share())  # equal-cost blocks
    assert m["macs_ratio"] == pytest.approx(m["per_image"] / m["static_per_image"])
    assert m["per_forward"] == pytest.approx(m["per_image"] / 12)


def test_cached_rejects_models_without_the_hook():
    class NoHook(torch.nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(TypeError, match="First-Block-Cache"):
        with cached(NoHook(), FirstBlockCache()):
            pass
