"""B1 metrics: Fréchet distance, conditional accuracy, the shipped classifier and the end-to-end evaluation."""
from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch

from dydit import evaluate
from dydit.classifier import load_classifier


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


@pytest.fixture(scope="module")
def small_reference(classifier, tmp_path_factory):
    """Statistics of 200 test images (the full 10k reference is too slow for unit tests)."""
    return evaluate.reference_statistics(classifier, cache_dir=tmp_path_factory.mktemp("cache"), limit=200)


def test_fid_is_zero_against_itself_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 8)) @ rng.normal(size=(8, 8))
    assert evaluate.fid_from_features(a, a) == pytest.approx(0.0, abs=1e-8)
    # Same covariance, mean moved by 0.5 in each of 8 dimensions: FID = |shift|² = 2.
    assert evaluate.fid_from_features(a, a + 0.5) == pytest.approx(2.0, rel=1e-6)
    assert evaluate.fid_from_features(a, a + 1.0) > evaluate.fid_from_features(a, a + 0.5)
    assert evaluate.fid_from_features(a, 1.5 * a) > 0.1  # a different covariance counts too


def test_frechet_distance_matches_the_sqrtm_formula():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    x, y = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = x @ x.T + np.eye(6), y @ y.T + 0.5 * np.eye(6)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2 - 2 * covmean)
    assert evaluate.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


class _BrightnessClassifier(torch.nn.Module):
    """Fake classifier: an image whose pixels all equal k is of class k."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward_with_features(self, images):
        k = images.reshape(len(images), -1)[:, 0].long()
        feats = torch.stack([k.float(), k.float() ** 2], 1)
        return feats, torch.nn.functional.one_hot(k, 10).float()


def test_conditional_accuracy_counts_requested_class_hits():
    assert evaluate.conditional_accuracy([0, 1, 2, 3], [0, 1, 0, 3]) == 0.75
    classes = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    requested = np.array([0, 1, 2, 3, 4, 5, 6, 0, 0, 0])  # the last three are generated for class 0
    images = np.repeat(classes, 28 * 28).reshape(10, 28, 28, 1).astype(np.uint8)
    out = evaluate.evaluate_images(images, requested, classifier=_BrightnessClassifier(),
                                   reference=(np.zeros(2), np.eye(2)))
    assert out["cond_acc"] == pytest.approx(0.7)
    assert out["num_samples"] == 10


def test_gray_conversion_of_rgb_and_channel_first_images():
    gray = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    rgb = gray[..., None].expand(4, 28, 28, 3).numpy()
    assert torch.equal(evaluate.as_gray_uint8(rgb), gray)
    assert torch.equal(evaluate.as_gray_uint8(gray[:, None]), gray)
    with pytest.raises(ValueError, match="uint8"):
        evaluate.as_gray_uint8(gray.float())


def test_shipped_classifier_is_accurate_and_small(classifier):
    from dydit.assets import classifier_path
    from dydit.data.fashion_mnist import load_fashion_mnist

    images, labels = load_fashion_mnist("test")
    acc = evaluate.conditional_accuracy(
        load_classifier().eval()(torch.from_numpy(images[:1000].copy())).argmax(1), labels[:1000])
    assert acc >= 0.9
    cfg = json.loads((classifier_path() / "config.json").read_text())
    assert cfg["test_accuracy"] >= 0.91
    assert (classifier_path() / "model.safetensors").stat().st_size < 2_000_000


def test_reference_statistics_are_cached(classifier, small_reference, tmp_path, monkeypatch):
    first = evaluate.reference_statistics(classifier, cache_dir=tmp_path, limit=200)
    np.testing.assert_array_equal(first[0], small_reference[0])
    assert len(list(tmp_path.glob("fid_ref_test_*.npz"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("recomputed despite the cache")

    monkeypatch.setattr("dydit.classifier.predict", fail)
    second = evaluate.reference_statistics(classifier, cache_dir=tmp_path, limit=200)
    np.testing.assert_array_equal(first[1], second[1])


def test_real_images_score_better_than_noise(classifier, small_reference):
    from dydit.data.fashion_mnist import load_fashion_mnist

    images, labels = load_fashion_mnist("test")
    real = evaluate.evaluate_images(images[200:400], labels[200:400], classifier, small_reference)
    noise = np.random.default_rng(0).integers(0, 256, size=(200, 28, 28), dtype=np.uint8)
    fake = evaluate.evaluate_images(noise, labels[200:400], classifier, small_reference)
    assert real["fid"] < fake["fid"]
    assert real["cond_acc"] > 0.85 > fake["cond_acc"]


def test_evaluate_model_end_to_end(classifier, small_reference):
    from dydit.models.dit import build_model

    torch.manual_seed(0)
    model = build_model("DiT-FMNIST", hidden_size=32, depth=1, num_heads=4)
    out = evaluate.evaluate_model(model, num_samples=20, sampler="ddim", steps=2, cfg_scale=1.5, seed=0,
                                  batch_size=8, progress=False, classifier=classifier, reference=small_reference)
    assert set(out) >= {"fid", "cond_acc", "num_samples", "sampler", "steps", "cfg_scale", "seed", "seconds",
                        "s_per_image"}
    assert np.isfinite(out["fid"]) and 0.0 <= out["cond_acc"] <= 1.0
    assert (out["num_samples"], out["sampler"], out["steps"]) == (20, "ddim", 2)

    images, labels, _ = evaluate.generate_samples(model, 20, "ddim", 2, 1.5, seed=0, batch_size=20, progress=False)
    assert images.shape == (20, 28, 28, 1) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [2] * 10
    again, _, _ = evaluate.generate_samples(model, 20, "ddim", 2, 1.5, seed=0, batch_size=8, progress=False)
    assert np.abs(images.astype(int) - again.astype(int)).max() <= 1  # the noise does not depend on batching


def test_eval_cli_scores_an_npz(classifier, small_reference, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from dydit.cli import app
    from dydit.data.fashion_mnist import load_fashion_mnist

    images, labels = load_fashion_mnist("test")
    rgb = np.repeat(images[200:300, :, :, None], 3, axis=-1)
    np.savez(tmp_path / "samples.npz", rgb, labels[200:300])
    monkeypatch.setattr(evaluate, "reference_statistics", lambda *a, **k: small_reference)
    res = CliRunner().invoke(app, ["eval", "--npz", str(tmp_path / "samples.npz"), "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["num_samples"] == 100 and result["cond_acc"] > 0.85


def test_gmacs_per_image_counts_every_network_call_of_a_run():
    from dydit.dynamic import DynamicContext, dynamize, flops_spec
    from dydit.dynamic.report import sampling_forwards, summarize
    from dydit.models.dit import build_model
    from dydit.sampling import sample

    torch.manual_seed(0)
    model = dynamize(build_model("SiT-Tiny")).eval()
    spec = flops_spec(model)
    calls = sampling_forwards(model, "heun", 3)
    assert calls > 3  # Heun calls the network twice per step
    static = summarize(None, spec, cfg_batches=2, forwards=calls)
    assert static["flops_ratio"] == 1.0
    assert static["gmacs_per_image"] == pytest.approx(spec.static_macs / 1e9 * calls * 2)
    with pytest.raises(ValueError, match="forwards"):
        summarize([], spec)
    ctx = DynamicContext("fast", record_usage=True)
    for _ in range(2):  # two batches of one evaluation: the usage of both runs
        sample(model, torch.arange(2), "heun", 3, seed=0, dyn=ctx)
    assert len(ctx.usage) == 2 * calls
    one_run = summarize(ctx.usage[:calls], spec)
    assert summarize(ctx.usage, spec, forwards=calls)["gmacs_per_image"] == pytest.approx(one_run["gmacs_per_image"])
    assert one_run["gmacs_per_image"] == pytest.approx(one_run["gmacs_per_forward"] * calls)
