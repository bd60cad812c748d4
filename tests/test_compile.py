"""The fast path under torch.compile: equal to the eager fast path, no graph break inside a block, a
bounded number of graphs (never one per step or per block), static blocks compiled the same way."""
import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.utils import counters

from dydit.dynamic import DynamicConfig, DynamicContext, dynamize
from dydit.dynamic.compiled import DYNAMO_CONFIG, _dynamic_block, compiled_blocks, prepare
from dydit.dynamic.adapters import block_adapter
from dydit.models.dit import build_model
from dydit.sampling import sample
from helpers import randomize, scramble_routers

AOT = {"backend": "aot_eager"}  # the tests trace and partition as inductor does, without C++ codegen
DYNAMO = {"backend": "eager"}  # dynamo's capture alone (fullgraph: a graph break fails the call)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def tiny_dydit(**layout):
    return scramble_routers(dynamize(randomize(build_model("DiT-Tiny"), scale=0.1), DynamicConfig(**layout))).eval()


def width_configs(ctx):
    """Distinct (active slots per unit, skipped) of the blocks over the plan's steps."""
    return {(w.skipped, tuple(sorted((k, len(v)) for k, v in w.slots.items())))
            for widths in ctx.plan.steps.values() for w in widths}


@pytest.fixture
def fresh_dynamo():
    dynamo.reset()
    counters.clear()
    yield
    dynamo.reset()


def test_compiled_fast_sampling_equals_eager_with_bounded_graphs(fresh_dynamo):
    model = tiny_dydit(block_skip=True)  # widths, tokens and whole blocks switched on and off
    eager = DynamicContext("fast", record_usage=True, record_tokens=True)
    a = sample(model, [1, 2, 3], "ddim", 6, cfg_scale=4.0, dyn=eager)
    compiled = DynamicContext("fast", record_usage=True, record_tokens=True, compile=AOT)
    b = sample(model, [1, 2, 3], "ddim", 6, cfg_scale=4.0, dyn=compiled)
    assert rel_err(b, a) < 1e-5
    configs = width_configs(eager)
    assert len(configs) >= 4, "the routers must vary the widths across steps and blocks in this test"
    graphs = counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= len(configs)  # not one per step × block (6 × 4 here)
    assert not counters["graph_break"]
    # what the compiled run records is what the eager one does: widths, kept tokens, token masks
    assert [(u.heads, u.groups, u.tokens_kept, u.units) for u in compiled.usage] == \
        [(u.heads, u.groups, u.tokens_kept, u.units) for u in eager.usage]
    assert len(compiled.token_masks) == len(eager.token_masks) > 0
    assert all(torch.equal(m, n) for (_, _, m), (_, _, n) in zip(compiled.token_masks, eager.token_masks))
    # steady state: other labels, seed and batch size reuse the graphs (sizes are symbolic)
    c = sample(model, [4, 5], "ddim", 6, cfg_scale=4.0, seed=3, dyn=DynamicContext("fast", compile=AOT))
    assert rel_err(c, sample(model, [4, 5], "ddim", 6, cfg_scale=4.0, seed=3, dyn="fast")) < 1e-5
    assert counters["stats"]["unique_graphs"] == graphs


def test_no_graph_break_inside_a_block_and_every_token_kept_still_traces():
    """dynamo.explain (no fullgraph) over one block's compiled region: one graph, no break; with every
    token kept the gather path runs too (no keep.all() shortcut and its sync under compile)."""
    model = tiny_dydit()
    for block in model.blocks:
        block.token_selection.mlp_head[2].bias.data.fill_(50.0)  # every token kept
    ctx = DynamicContext("fast", compile=AOT)
    x, y, t = torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.full((2,), 500.0)
    ref = model(x, t, y, dyn="fast")
    with torch.no_grad():
        assert rel_err(model(x, t, y, dyn=ctx), ref) < 1e-5
        tokens, c, _ = model.embed(x, t, y)
        ctx.begin_forward(model, t, model.t_embedder(t))
        run = prepare(ctx, model.blocks[1], 1)
        with dynamo.config.patch(**DYNAMO_CONFIG):
            report = dynamo.explain(_dynamic_block)(block_adapter(model.blocks[1]), model.blocks[1], run, (tokens, c), {})
    assert report.graph_break_count == 0 and report.graph_count == 1
    assert run.keep is not None and bool(run.keep.all())


def test_static_blocks_compile_the_same_way(fresh_dynamo):
    static = randomize(build_model("DiT-Tiny"), scale=0.1).eval()
    a = sample(static, [1, 2, 3], "ddim", 4, cfg_scale=4.0)
    b = sample(static, [1, 2, 3], "ddim", 4, cfg_scale=4.0, compile=AOT)
    assert rel_err(b, a) < 1e-5
    assert 1 <= counters["stats"]["unique_graphs"] <= 2 and not counters["graph_break"]  # block 0's input layout
    assert "forward" not in static.blocks[0].__dict__  # the blocks are restored afterwards
    dyn = tiny_dydit()  # a dynamic model's complete network compiles as static blocks
    with compiled_blocks(dyn, AOT):
        x, t, y = torch.randn(2, 4, 8, 8), torch.full((2,), 10.0), torch.tensor([0, 1])
        with torch.no_grad():
            assert rel_err(dyn(x, t, y, dyn="complete"), build_and_copy(dyn)(x, t, y)) < 1e-5
    with pytest.raises(ValueError, match="no compiled path"):
        sample(dyn, [1], "ddim", 2, dyn="masked", compile=AOT)


def build_and_copy(dyn):
    static = build_model("DiT-Tiny").eval()
    static.load_state_dict({k: v for k, v in dyn.state_dict().items() if k in static.state_dict()})
    return static


def test_latte_and_flux_adapters_compile_without_graph_breaks(fresh_dynamo):
    from test_flux import flux_inputs, run, scramble, tiny_flux
    from test_latte import tiny, video

    latte = scramble_routers(dynamize(tiny())).eval()
    x, y, t = video(2), torch.tensor([1, 2]), torch.full((2,), 300.0)
    with torch.no_grad():
        assert rel_err(latte(x, t, y, dyn=DynamicContext("fast", compile=DYNAMO)), latte(x, t, y, dyn="fast")) < 1e-5
    latte_graphs = counters["stats"]["unique_graphs"]
    assert latte_graphs >= 2  # compiled, not run eagerly: spatial and temporal blocks (their own adapters)
    flux = scramble(dynamize(tiny_flux(True)))  # ff_context unrouted: run.linear of a Linear no unit spans
    kw = flux_inputs(2, True)
    assert rel_err(run(flux, kw, DynamicContext("fast", compile=DYNAMO)), run(flux, kw, "fast")) < 1e-5
    assert counters["stats"]["unique_graphs"] >= latte_graphs + 2  # double and single blocks
    assert not counters["graph_break"]


def test_inductor_compiled_fast_path(fresh_dynamo):
    model = tiny_dydit(width=False)
    a = sample(model, [1, 2], "ddim", 3, cfg_scale=4.0, dyn="fast")
    b = sample(model, [1, 2], "ddim", 3, cfg_scale=4.0, compile=True)
    assert rel_err(b, a) < 1e-5
    assert counters["stats"]["unique_graphs"] >= 1
    assert not counters["graph_break"]


def test_cli_sample_compile(fresh_dynamo, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import dydit.dynamic.compiled as compiled
    from dydit.cli import app

    monkeypatch.setitem(compiled.DEFAULTS, "backend", "eager")  # the CLI's path, without inductor's codegen
    r = CliRunner().invoke(app, ["sample", "--classes", "0", "--steps", "2", "--compile", "--threads", "2",
                                 "--out", str(tmp_path / "g.png")])
    assert r.exit_code == 0, r.output
    assert counters["stats"]["unique_graphs"] >= 1 and (tmp_path / "g.png").exists()
    r = CliRunner().invoke(app, ["sample", "--compile", "--fbcache", "0.1", "--out", ""])
    assert r.exit_code != 0 and "--compile and --fbcache" in r.output
