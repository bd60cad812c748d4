"""The models shipped inside the package: they load, sample recognisable classes, and the DyDiT ones
realise their FLOPs target on the fast engine with outputs equal to the masked reference."""
import json
from pathlib import Path

import pytest
import torch

import dydit
from dydit.assets import ASSETS_DIR, default_model_path
from dydit.classifier import load_classifier
from dydit.dynamic import DynamicContext
from dydit.dynamic.flops import flops_spec
from dydit.dynamic.report import summarize
from dydit.evaluate import conditional_accuracy
from dydit.sampling import sample
from dydit.viz import to_uint8_images

DYNAMIC = [(lam, ASSETS_DIR / f"fmnist_dydit_{lam}") for lam in ("0.7", "0.5")]


def _class_accuracy(model, dyn=None, n_per_class: int = 3) -> float:
    labels = torch.arange(10).repeat(n_per_class)
    x = sample(model, labels, "ddim", 10, cfg_scale=4.0, seed=1, dyn=dyn)
    images = torch.from_numpy(to_uint8_images(x, pad=model.config.pixel_pad))[..., 0]  # (N, 28, 28)
    with torch.no_grad():
        predicted = load_classifier().eval()(images).argmax(1)
    return conditional_accuracy(predicted, labels)


def test_embedded_model_is_small_documented_and_samples_its_classes():
    path = default_model_path()
    assert (path / "model.safetensors").stat().st_size < 10_000_000
    cfg = json.loads((path / "config.json").read_text())["model"]
    assert cfg["num_heads"] >= 4 and (cfg["input_size"] // cfg["patch_size"]) ** 2 >= 100
    model = dydit.load(path)
    assert getattr(model, "dynamic_config", None) is None
    assert _class_accuracy(model) >= 0.6  # 30 images, 10 DDIM steps: a loose check, B1 is the real figure


@pytest.mark.parametrize("lam,path", DYNAMIC, ids=[d[0] for d in DYNAMIC])
def test_shipped_dydit_realises_its_target_and_fast_equals_masked(lam, path):
    model = dydit.load(path)
    assert model.dynamic_config is not None
    ctx = DynamicContext("fast", record_usage=True)
    labels = torch.arange(10)
    fast = sample(model, labels, "ddim", 25, cfg_scale=4.0, seed=0, dyn=ctx)
    ratio = summarize(ctx.usage, flops_spec(model), 2)["flops_ratio"]
    # the bar: the realised inference FLOPs ratio within 0.05 of λ (docs/RESULTS.md)
    assert abs(ratio - float(lam)) <= 0.05, ratio
    masked = sample(model, labels, "ddim", 25, cfg_scale=4.0, seed=0, dyn=DynamicContext("masked"))
    assert (fast - masked).abs().max() <= 1e-4 * masked.abs().max()
    assert _class_accuracy(model, DynamicContext("fast")) >= 0.5


def test_shipped_sit_pair_is_flow_matching_and_dysit_realises_its_target():
    """The flow-matching pair (issue 16): a static SiT and its DyDiT at λ=0.5, sampled with Euler."""
    static, dyn = dydit.load(ASSETS_DIR / "fmnist_sit"), dydit.load(ASSETS_DIR / "fmnist_dysit_0.5")
    assert static.config.objective == dyn.config.objective == "flow"
    assert getattr(static, "dynamic_config", None) is None and dyn.dynamic_config is not None
    ctx = DynamicContext("fast", record_usage=True)
    labels = torch.arange(10)
    fast = sample(dyn, labels, "euler", 20, cfg_scale=4.0, seed=0, dyn=ctx)
    assert abs(summarize(ctx.usage, flops_spec(dyn), 2)["flops_ratio"] - 0.5) <= 0.05
    masked = sample(dyn, labels, "euler", 20, cfg_scale=4.0, seed=0, dyn=DynamicContext("masked"))
    assert (fast - masked).abs().max() <= 1e-4 * masked.abs().max()
    images = torch.from_numpy(to_uint8_images(fast, pad=dyn.config.pixel_pad))[..., 0]
    with torch.no_grad():
        predicted = load_classifier().eval()(images).argmax(1)
    assert conditional_accuracy(predicted, labels) >= 0.5


def test_demo_shows_dit_and_sit_families_each_against_its_own_static(tmp_path):
    from typer.testing import CliRunner

    from dydit.cli import app

    out = tmp_path / "demo"
    r = CliRunner().invoke(app, ["demo", "--steps", "2", "--per-class", "1", "--repeats", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = {row["model"]: row for row in json.loads((out / "summary.json").read_text())}
    assert rows["static"]["sampler"] == "ddim" and rows["SiT static"]["sampler"] == "euler"
    assert rows["static"]["speedup"] == rows["SiT static"]["speedup"] == 1.0
    assert rows["DyDiT-SiT λ=0.5"]["flops_ratio"] < 0.9  # 2 steps: the plan at two timesteps, not the mean
    for row in rows.values():
        assert (out / Path(row["grid"]).name).exists()
    # the shipped Moving Fashion-MNIST Latte and DyLattes, side by side (one video per class)
    videos = json.loads((out / "video" / "summary.json").read_text())
    assert [v["model"] for v in videos] == ["static", "DyLatte λ=0.7", "DyLatte λ=0.5"]
    assert (out / "video" / "side_by_side.gif").exists()
