"""The shipped Captioned Fashion-MNIST FLUX / DyFLUX pair (issue 18): they load as their family, the DyFLUX
routes by default, realises its FLOPs target at the benchmark's sampling settings, matches the masked reference
on the fast engine, routes image tokens spatially, and follows its captions."""
import torch

import dydit
from dydit.assets import ASSETS_DIR
from dydit.dynamic import DynamicContext, flops_spec
from dydit.dynamic.report import summarize
from dydit.dynamic.token_report import token_selectivity


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
    ctx = DynamicContext("fast", record_usage=True, record_tokens=True)
    fast = sample_captions(dyn, ids, steps=20, cfg_scale=4.0, seed=0, dyn=ctx)
    assert abs(summarize(ctx.usage, flops_spec(dyn), 2, forwards=20)["flops_ratio"] - 0.5) <= 0.05
    sel = token_selectivity(ctx.token_masks, fast, 4)  # spatial routing: the item's patches run, background skips
    assert sel["object"] > sel["background"] + 0.2 and sel["overall"] < 0.9
    masked = sample_captions(dyn, ids[:4], steps=20, cfg_scale=4.0, seed=0, dyn=DynamicContext("masked"))
    assert (fast[:4] - masked).abs().max() <= 1e-4 * masked.abs().max().clamp(min=1)
    scores = score_captioned(fast, ids, fid=False)
    assert scores["position_acc"] >= 0.7 and scores["class_acc"] >= 0.5
