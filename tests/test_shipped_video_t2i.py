"""The shipped Moving Fashion-MNIST Latte / DyLatte (issue 17) and Captioned Fashion-MNIST FLUX / DyFLUX
(issue 18) models: they load as their families, route by default, realise their FLOPs targets at the
benchmark's sampling settings, match the masked reference on the fast engine, and follow their conditioning."""
import torch

import dydit
from dydit.assets import ASSETS_DIR
from dydit.dynamic import DynamicContext, flops_spec
from dydit.dynamic.report import summarize


def test_shipped_latte_and_dylattes_realise_their_targets_and_draw_their_classes():
    from dydit.sampling import sample
    from dydit.video_metrics import evaluate_videos

    static = dydit.load(ASSETS_DIR / "mfmnist_latte")
    assert getattr(static, "dynamic_config", None) is None and static.config.num_frames == 8
    for lam in (0.7, 0.5):
        dyn = dydit.load(ASSETS_DIR / f"mfmnist_dylatte_{lam}")
        assert dyn.dynamic_config is not None
        labels = torch.tensor([3, 8])  # the width plan sees t only: the ratio does not depend on the videos
        ctx = DynamicContext("fast", record_usage=True)
        fast = sample(dyn, labels, "ddim", 20, cfg_scale=4.0, seed=0, dyn=ctx)
        assert abs(summarize(ctx.usage, flops_spec(dyn), 2)["flops_ratio"] - lam) <= 0.05
        masked = sample(dyn, labels, "ddim", 20, cfg_scale=4.0, seed=0, dyn=DynamicContext("masked"))
        assert (fast - masked).abs().max() <= 1e-4 * masked.abs().max()
        plain = sample(dyn, labels, "ddim", 20, cfg_scale=4.0, seed=0)  # a plain call routes (fast engine)
        assert torch.equal(plain, fast)
    labels = torch.arange(10)
    videos = sample(dyn, labels, "ddim", 20, cfg_scale=4.0, seed=0, dyn=DynamicContext("fast"))
    scores = evaluate_videos(videos, labels)
    assert scores["frame_acc"] >= 0.5 and scores["consistency"] >= 0.5


def test_shipped_flux_and_dyflux_realise_the_target_and_follow_captions():
    from dydit.data.captioned_fmnist import balanced_caption_ids
    from dydit.t2i import sample_captions, set_t2i_token_geometry
    from dydit.t2i_metrics import score_captioned

    static = dydit.load(ASSETS_DIR / "cfmnist_flux")
    assert getattr(static, "dynamic_config", None) is None
    dyn = dydit.load(ASSETS_DIR / "cfmnist_dyflux_0.5")
    assert dyn.dynamic_config is not None
    set_t2i_token_geometry(dyn)
    ids = balanced_caption_ids(40, seed=0)
    ctx = DynamicContext("fast", record_usage=True)
    fast = sample_captions(dyn, ids, steps=20, cfg_scale=4.0, seed=0, dyn=ctx)
    assert abs(summarize(ctx.usage, flops_spec(dyn), 2, forwards=20)["flops_ratio"] - 0.5) <= 0.05
    masked = sample_captions(dyn, ids[:4], steps=20, cfg_scale=4.0, seed=0, dyn=DynamicContext("masked"))
    assert (fast[:4] - masked).abs().max() <= 1e-4 * masked.abs().max().clamp(min=1)
    scores = score_captioned(fast, ids, fid=False)
    assert scores["position_acc"] >= 0.7 and scores["class_acc"] >= 0.5
