"""sample(): every sampler on DiT-Tiny and SiT-Tiny, the plan timesteps, classifier-free guidance, and
the `dydit sample` command."""
import numpy as np
import pytest
import torch

from dydit.dynamic import DynamicContext, dynamize
from PIL import Image
from typer.testing import CliRunner

import dydit
from dydit.cli import app
from dydit.models.dit import build_model
from dydit.sampling import DIFFUSION_SAMPLERS, FLOW_SAMPLERS, guided_model_fn, make_process, sample
from helpers import randomize as shared_randomize

torch.set_num_threads(1)

ALL = [("DiT-Tiny", m) for m in DIFFUSION_SAMPLERS] + [("SiT-Tiny", m) for m in FLOW_SAMPLERS]


def randomize(model, seed=0, scale=0.1):
    return shared_randomize(model, seed, scale).eval()


def tiny(name, **kw):
    return randomize(build_model(name, **kw))


class RecordingContext(DynamicContext):
    """A fast DynamicContext that records what the sampler planned and what the network was asked."""

    def __init__(self):
        super().__init__("fast")
        self.planned, self.queried = None, []

    def prepare(self, model, process):
        self.planned = process.sampling_timesteps()
        super().prepare(model, process)

    def begin_forward(self, model, t, t_emb):
        assert bool((t == t[0]).all())  # one timestep per forward, both CFG halves included
        self.queried.append(float(t[0]))
        super().begin_forward(model, t, t_emb)


@pytest.mark.parametrize("name,method", ALL)
@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_plan_timesteps_are_exactly_the_queried_ones(name, method, cfg_scale):
    ctx = RecordingContext()
    sample(dynamize(tiny(name)), [1, 2], method, 4, cfg_scale=cfg_scale, dyn=ctx)
    assert set(ctx.plan.steps) == {round(t, 6) for t in ctx.planned}  # the plan covers exactly those
    assert len(ctx.queried) == (8 if method == "heun" else 4)
    assert ctx.queried == pytest.approx(ctx.planned, abs=1e-6)
    if name == "DiT-Tiny":  # original 1000-step units, from high noise down
        assert all(float(t).is_integer() and 0 <= t <= 999 for t in ctx.planned)
        assert ctx.planned == sorted(ctx.planned, reverse=True) and ctx.planned[0] >= 750
    else:  # flow time in [0, 1], from noise (0) up
        assert ctx.planned[0] == 0.0 and ctx.planned == sorted(ctx.planned) and max(ctx.planned) <= 1.0


def test_make_process_respacing_and_errors():
    dit, sit = build_model("DiT-Tiny"), build_model("SiT-Tiny")
    assert make_process(dit, "ddim", 25).sampling_timesteps() == list(range(960, -1, -40))  # DDIM stride
    ddpm = make_process(dit, "ddpm", 250).sampling_timesteps()
    assert len(ddpm) == 250 and ddpm[0] == 999 and ddpm[-1] == 0
    with pytest.raises(ValueError, match="not for diffusion"):
        make_process(dit, "euler", 10)
    with pytest.raises(ValueError, match="not for flow"):
        make_process(sit, "ddim", 10)


@pytest.mark.parametrize("name,method", ALL)
@pytest.mark.parametrize("batch", [3, 5])
def test_sample_shapes_with_and_without_guidance(name, method, batch):
    model = tiny(name)
    labels = list(range(batch))
    plain = sample(model, labels, method, 3, cfg_scale=1.0, seed=1)
    guided = sample(model, labels, method, 3, cfg_scale=4.0, seed=1)
    for x in (plain, guided):
        assert x.shape == (batch, 4, 8, 8) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert not torch.allclose(plain, guided)


@pytest.mark.parametrize("name,method", [("DiT-Tiny", "ddim"), ("DiT-Tiny", "dpm++2m"), ("SiT-Tiny", "heun")])
def test_guided_batch_rows_do_not_depend_on_batch_size(name, method):
    # the conditional and unconditional halves must pair up row by row for any (odd) batch size
    model = tiny(name)
    noise = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    five = sample(model, [3, 1, 4, 1, 5], method, 3, cfg_scale=3.0, noise=noise)
    three = sample(model, [3, 1, 4], method, 3, cfg_scale=3.0, noise=noise[:3])
    torch.testing.assert_close(five[:3], three, atol=1e-5, rtol=1e-5)


def test_guided_channels_semantics():
    model = tiny("DiT-Tiny")  # 4 input channels, 8 output channels (ε and variance)
    labels = torch.tensor([0, 7, 3])
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.full((3,), 500)
    cond = model(x, t, labels)
    uncond = model(x, t, torch.full_like(labels, 10))
    for gc, n in ((3, 3), (None, 4)):
        out = guided_model_fn(model, labels, 4.0, gc)(x, t)
        expected = uncond[:, :n] + 4.0 * (cond[:, :n] - uncond[:, :n])
        torch.testing.assert_close(out[:, :n], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[:, n:], cond[:, n:])  # unguided channels come from the conditional half
        assert not torch.allclose(out[:, :n], cond[:, :n])
    # scale 1: one plain conditional batch
    torch.testing.assert_close(guided_model_fn(model, labels, 1.0, 3)(x, t), cond)
    # flow models guide the whole velocity, whatever guided_channels says
    sit = tiny("SiT-Tiny")
    tf = torch.full((3,), 0.3)
    v_cond, v_uncond = sit(x, tf, labels)[:, :4], sit(x, tf, torch.full_like(labels, 10))[:, :4]
    v = guided_model_fn(sit, labels, 4.0, 3)(x, tf)[:, :4]
    torch.testing.assert_close(v, v_uncond + 4.0 * (v_cond - v_uncond), atol=1e-5, rtol=1e-5)


def test_guidance_needs_a_null_class():
    model = tiny("DiT-Tiny", class_dropout_prob=0.0)
    sample(model, [0, 1], "ddim", 2, cfg_scale=1.0)
    with pytest.raises(ValueError, match="class dropout"):
        sample(model, [0, 1], "ddim", 2, cfg_scale=2.0)


@pytest.mark.parametrize("name,method", [("SiT-Tiny", "em"), ("DiT-Tiny", "ddpm")])
def test_stochastic_samplers_are_seeded(name, method):
    model = tiny(name)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    a = sample(model, [0, 1], method, 3, seed=5, noise=noise)
    assert torch.equal(a, sample(model, [0, 1], method, 3, seed=5, noise=noise))
    assert not torch.allclose(a, sample(model, [0, 1], method, 3, seed=6, noise=noise))  # the step noise moves


def test_sample_runs_in_eval_mode_and_restores_the_mode():
    model = tiny("DiT-Tiny")
    ref = sample(model, [0, 1, 2], "ddim", 3, cfg_scale=2.0)
    model.train()  # would drop labels at random
    torch.testing.assert_close(sample(model, [0, 1, 2], "ddim", 3, cfg_scale=2.0), ref)
    assert model.training


# ---- the CLI ----
@pytest.mark.parametrize("name,channels,extra", [("DiT-Tiny", 1, ["--sampler", "dpm++2m", "--guide-all-channels"]),
                                                 ("SiT-Tiny", 3, ["--sampler", "heun"])])
def test_cli_sample_writes_png_and_npz(tmp_path, name, channels, extra):
    folder = dydit.save(tiny(name, in_channels=channels, pixel_pad=1), tmp_path / "model")
    grid, npz = tmp_path / "grid.png", tmp_path / "out" / "samples.npz"
    args = ["sample", str(folder), "--classes", "0,1,2", "--num-per-class", "2", "--steps", "2", "--batch-size", "4",
            "--cfg-scale", "2", "--out", str(grid), "--npz", str(npz), *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert str(grid) in result.output and str(npz) in result.output
    with Image.open(grid) as im:
        assert im.size[0] > 3 * 6 and im.size[1] > 2 * 6
    with np.load(npz) as f:
        assert f["arr_0"].shape == (6, 6, 6, 3) and f["arr_0"].dtype == np.uint8  # 8 px - 2·pad, RGB
        assert f["arr_1"].tolist() == [0, 1, 2, 0, 1, 2]
        if channels == 1:  # grayscale replicated
            assert (f["arr_0"][..., 0] == f["arr_0"][..., 2]).all()


def test_cli_sample_reports_bad_input(tmp_path):
    folder = str(dydit.save(tiny("DiT-Tiny", in_channels=1), tmp_path / "model"))
    runner = CliRunner()
    result = runner.invoke(app, ["sample", folder, "--sampler", "euler", "--out", str(tmp_path / "g.png")])
    assert result.exit_code == 1 and "not for diffusion" in result.output
    result = runner.invoke(app, ["sample", folder, "--classes", "0,12"])
    assert result.exit_code != 0 and "outside" in result.output
    result = runner.invoke(app, ["sample", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "error" in result.output


def test_bf16_sampling_runs_the_network_in_bf16_and_the_sampler_in_fp32():
    from helpers import scramble_routers

    model = scramble_routers(dynamize(randomize(build_model("DiT-Tiny")))).eval()
    seen = []
    hook = model.final_layer.linear.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    ref = sample(model, [1, 2, 3], "ddim", 4, cfg_scale=4.0, seed=0)
    half = sample(model, [1, 2, 3], "ddim", 4, cfg_scale=4.0, seed=0, dtype="bf16")
    hook.remove()
    assert seen[0] == torch.float32 and seen[-1] == torch.bfloat16  # the network really ran in bf16
    assert half.dtype == torch.float32 and not torch.equal(half, ref)
    assert ((half - ref).norm() / ref.norm()).item() < 0.05  # same samples up to bf16 rounding
    masked = sample(model, [1, 2, 3], "ddim", 4, cfg_scale=4.0, seed=0, dtype="bf16", dyn="masked")
    assert ((half - masked).norm() / masked.norm()).item() < 0.05  # the fast path routes as in fp32
    with pytest.raises(ValueError, match="dtype must be one of"):
        sample(model, [1], "ddim", 2, dtype="int8")
