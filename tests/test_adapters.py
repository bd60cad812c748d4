"""The dynamic core is backbone-independent: adapters, dynamic-by-default calls, bound plans."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

import dydit
from dydit.dynamic import (BlockAdapter, BlockSpec, DynamicConfig, DynamicContext, GroupUnit, HeadUnit, ModelAdapter,
                           Span, dynamize, flops_spec, register_block_adapter, register_model_adapter)
from dydit.dynamic.context import default_context
from dydit.models.dit import build_model
from dydit.sampling import sample
from helpers import randomize, scramble_routers

SRC = Path(__file__).resolve().parents[1] / "src" / "dydit"


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def test_models_import_nothing_from_dynamic():
    for path in (SRC / "models").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            assert not any(n.startswith("dydit.dynamic") for n in names), f"{path.name} imports {names}"


# ---- a backbone the package has never seen: pre-norm block, split q/k/v, timestep-shifted input ----


class ToyBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.up, self.down = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x, temb):
        h = self.norm(x + temb[:, None])
        B, N, D = h.shape
        q, k, v = (p(h).view(B, N, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        x = x + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D))
        return x + self.down(F.silu(self.up(self.norm(x))))


class ToyModel(nn.Module):
    def __init__(self, dim=32, heads=4, depth=2, tokens=6):
        super().__init__()
        self.tokens = tokens
        self.temb = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.layers = nn.ModuleList([ToyBlock(dim, heads) for _ in range(depth)])

    def forward(self, x, t):
        temb = self.temb(t[:, None].float())
        for layer in self.layers:
            x = layer(x, temb)
        return x


class ToyBlockAdapter(BlockAdapter):
    def spec(self, block, model):
        D, H, N = block.q.in_features, block.heads, model.tokens
        heads = HeadUnit("attn", "attn_rate", H, D // H, seq_len=N, spans=(
            Span("q", "out", 0, N), Span("k", "out", 0, N), Span("v", "out", 0, N), Span("out", "in", 0, N)))
        groups = GroupUnit("mlp", "mlp_rate", H, 2 * D // H, token_router="token_selection",
                           spans=(Span("up", "out", 0, N), Span("down", "in", 0, N)))
        return BlockSpec(heads=(heads,), groups=(groups,), width_dim=D, token_router="token_selection",
                         token_dim=D, num_tokens=N)

    def forward(self, block, run, x, temb):
        h = block.norm(x + temb[:, None])
        B, N, _ = h.shape
        nh = run.num_heads("attn")
        q, k, v = (run.linear(p, h).view(B, N, nh, -1).transpose(1, 2) for p in ("q", "k", "v"))
        o = run.mask_heads("attn", F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, -1))
        x = x + run.linear("out", o)
        return run.token_update("mlp", x, lambda z, pick: run.linear(
            "down", F.silu(run.mask_groups("mlp", run.linear("up", block.norm(z))))))


class ToyModelAdapter(ModelAdapter):
    def blocks(self, model):
        return list(model.layers)

    def router_input(self, model, args, kwargs):
        t = args[1]
        return t, model.temb(t[:, None].float())

    def timestep_embedding(self, model, t):
        return model.temb(t[:, None].float())

    def router_input_modules(self, model):
        return [model.temb]

    def num_tokens(self, model):
        return model.tokens


register_block_adapter(ToyBlock, ToyBlockAdapter())
register_model_adapter(ToyModel, ToyModelAdapter())


@pytest.mark.parametrize("batch", [1, 3])
def test_adapter_for_a_foreign_block_gives_fast_equal_to_masked(batch):
    torch.manual_seed(0)
    model = ToyModel().eval()
    x = torch.randn(batch, 6, 32)
    t = torch.full((batch,), 0.3)
    static = model(x, t)
    dynamize(model, DynamicConfig(width_bias_init=15.0, token_bias_init=35.0))
    assert rel_err(model(x, t), static) < 1e-5  # routers start fully on: the static function
    scramble_routers(model)
    masked = model(x, t, dyn=DynamicContext("masked"))
    ctx = DynamicContext("fast", record_usage=True)
    fast = model(x, t, dyn=ctx)
    assert rel_err(fast, masked) < 1e-5
    assert rel_err(model(x, t), masked) < 1e-5  # plain call: routed
    assert rel_err(masked, model(x, t, dyn="complete")) > 1e-3  # the routers really dropped compute
    u = ctx.usage[0]
    assert min(u.heads) < 4 or min(u.groups) < 4 or sum(u.tokens_kept) < 2 * batch * 6
    # the FLOPs counter is generic: 4 projections of D² plus 2N²D, 2 MLP linears of 2D², per token
    N, D = 6, 32
    b = flops_spec(model).blocks[0]
    assert b.attn == 4 * N * D * D + 2 * N * N * D and b.mlp == 2 * N * D * 2 * D


def test_one_context_on_two_models_plans_each_model_separately():
    a = scramble_routers(dynamize(randomize(build_model("DiT-Tiny"))), seed=1).eval()
    b = scramble_routers(dynamize(randomize(build_model("DiT-Tiny"))), seed=2).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.full((2,), 400.0), torch.tensor([1, 2])
    ctx = DynamicContext("fast")
    a(x, t, y, dyn=ctx)
    out_b = b(x, t, y, dyn=ctx)
    assert rel_err(out_b, b(x, t, y, dyn="masked")) < 1e-5
    assert [len(w.heads) for w in ctx.plan.steps[400.0]] == [
        int(blk.attn_rate.active(b.t_embedder(t[:1])).sum()) for blk in b.blocks]


def test_plan_follows_routers_changed_in_place():
    model = scramble_routers(dynamize(randomize(build_model("DiT-Tiny")))).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.full((2,), 400.0), torch.tensor([1, 2])
    model(x, t, y)  # the default context plans t = 400
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn_rate.router.bias.neg_()
    assert rel_err(model(x, t, y), model(x, t, y, dyn="masked")) < 1e-5


def test_sampling_a_dynamic_model_uses_the_fast_engine_by_default():
    model = scramble_routers(dynamize(randomize(build_model("DiT-Tiny"), scale=0.1))).eval()
    out = sample(model, [1, 2], "ddim", 4, cfg_scale=4.0)
    assert len(default_context(model).plan.steps) == 4  # the fast engine planned every step
    ref = sample(model, [1, 2], "ddim", 4, cfg_scale=4.0, dyn="masked")
    assert rel_err(out, ref) < 1e-5


def test_shipped_models_sample_bit_for_bit_as_before_the_adapters():
    """tests/data/embedded_samples.safetensors was written by the pre-adapter engine (make_embedded_samples.py)."""
    from dydit.assets import default_model_path

    ref = load_file(Path(__file__).parent / "data" / "embedded_samples.safetensors")
    root = Path(default_model_path()).parent  # the assets folder
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the reference's thread count: matmul blocking, hence rounding, depends on it
    try:
        _compare_embedded(ref, root)
    finally:
        torch.set_num_threads(threads)


def _compare_embedded(ref, root):
    # Control: the static model's numerics were not touched by the refactor. If even it differs, this
    # machine rounds differently from the one that wrote the reference, and only closeness can be asked.
    static = sample(dydit.load(root / "fmnist_dit").eval(), [0, 3, 7], "ddim", 8, cfg_scale=4.0, seed=3)
    same_platform = torch.equal(static, ref["fmnist_dit"])
    # Elsewhere the control's own drift (8 DDIM steps at CFG 4 amplify last-bit differences) sets the
    # tolerance: the dynamic models may drift as much as the untouched static one, not more.
    control = rel_err(static, ref["fmnist_dit"])
    assert control < 1e-3, f"the static model itself changed ({control:.2e}): not a platform difference"
    tol = max(1e-5, 5 * control)

    def check(out, key):
        if same_platform:
            assert torch.equal(out, ref[key]), key
        else:
            assert rel_err(out, ref[key]) < tol, key

    for name in ("fmnist_dydit_0.7", "fmnist_dydit_0.5"):
        model = dydit.load(root / name).eval()
        check(sample(model, [0, 3, 7], "ddim", 8, cfg_scale=4.0, seed=3), name)
        check(sample(model, [0, 3, 7], "ddim", 8, cfg_scale=4.0, seed=3, dyn="masked"), name + ".masked")


def test_python_m_dydit_help():
    r = subprocess.run([sys.executable, "-m", "dydit", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "finetune" in r.stdout


def test_dydit_models_lists_the_registry_that_train_help_points_to():
    from typer.testing import CliRunner

    from dydit.cli import app
    from dydit.models.dit import CONFIGS

    r = CliRunner().invoke(app, ["models"])
    assert r.exit_code == 0 and all(name in r.output for name in CONFIGS)
    assert "dydit models" in CliRunner().invoke(app, ["train", "--help"]).output


@pytest.mark.parametrize("args,fragment", [(["--steps", "0"], "--steps must be >= 1"),
                                           (["--cfg-scale", "nan"], "--cfg-scale must be a finite"),
                                           (["--out", "x.xyz"], "give a .png or .jpg")])
def test_sample_rejects_bad_values_before_sampling(args, fragment, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from dydit.cli import app

    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["sample", *args])
    assert r.exit_code == 2 and fragment in " ".join(r.output.replace("│", " ").split()) and "Traceback" not in r.output
    assert not list(tmp_path.iterdir())  # nothing sampled, nothing written
