"""The shipped Moving Fashion-MNIST Latte / DyLatte models (issue 17): they load as video models, the DyLattes
route by default, realise their FLOPs targets at the benchmark's sampling settings (Euler 20, CFG 4), match the
masked reference on the fast engine, and draw items of the asked class."""
import pytest
import torch

import dydit
from dydit.assets import ASSETS_DIR
from dydit.dynamic import DynamicContext, flops_spec
from dydit.dynamic.report import summarize
from dydit.sampling import default_sampler, sample


def test_shipped_latte_is_a_flow_matching_video_model():
    static = dydit.load(ASSETS_DIR / "mfmnist_latte")
    assert getattr(static, "dynamic_config", None) is None
    assert static.config.num_frames == 8 and static.config.objective == "flow" and default_sampler(static) == "euler"


@pytest.mark.parametrize("lam", [0.7, 0.5])
def test_shipped_dylatte_realises_its_target_and_fast_equals_masked(lam):
    torch.set_num_threads(1)  # tiny batches run faster on one thread; conftest restores the count
    dyn = dydit.load(ASSETS_DIR / f"mfmnist_dylatte_{lam}")
    assert dyn.dynamic_config is not None
    labels = torch.arange(10)
    ctx = DynamicContext("fast", record_usage=True)
    fast = sample(dyn, labels, "euler", 20, cfg_scale=4.0, seed=0, dyn=ctx)
    assert abs(summarize(ctx.usage, flops_spec(dyn), 2, forwards=20)["flops_ratio"] - lam) <= 0.05
    masked = sample(dyn, labels[:2], "euler", 20, cfg_scale=4.0, seed=0, dyn=DynamicContext("masked"))
    assert (fast[:2] - masked).abs().max() <= 1e-4 * masked.abs().max().clamp(min=1)


def test_shipped_dylatte_draws_items_of_the_asked_class(tmp_path):
    from dydit.classifier import load_classifier
    from dydit.video_metrics import crop_reference_statistics, evaluate_videos

    torch.set_num_threads(1)
    classifier = load_classifier()  # FID is not asserted here: a 500-image crop reference keeps the test short
    reference = crop_reference_statistics(classifier, limit=500, cache_dir=tmp_path)
    dyn = dydit.load(ASSETS_DIR / "mfmnist_dylatte_0.5")
    labels = torch.arange(10).repeat(2)
    videos = sample(dyn, labels, "euler", 20, cfg_scale=4.0, seed=0, dyn=DynamicContext("fast"))
    scores = evaluate_videos(videos, labels, classifier=classifier, reference=reference)
    # chance is 10%; the shipped pair scores far above it at 250 videos (docs/RESULTS.md "Video")
    assert scores["frame_acc"] >= 0.3
