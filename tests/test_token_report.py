"""Spatial selectivity of the token routers and the plan command's per-step files."""
import json

import torch
from typer.testing import CliRunner

from dydit.cli import app
from dydit.dynamic import DynamicContext
from dydit.dynamic.token_report import object_patches, token_keep_maps, token_selectivity


def _two_images():
    # 2 images of 6×6 pixels, patch 3 -> 4 tokens each; the item fills the top-left patch of image 0 and
    # the bottom-right one of image 1 (pixels in [-1, 1]: -1 black background)
    x = -torch.ones(2, 1, 6, 6)
    x[0, :, :3, :3] = 1.0
    x[1, :, 3:, 3:] = 1.0
    return x


def test_object_patches_follow_the_item():
    obj = object_patches(_two_images(), patch=3, threshold=0.1)
    assert obj.tolist() == [[True, False, False, False], [False, False, False, True]]


def test_selectivity_separates_object_from_background_and_counts_per_image_spread():
    images = _two_images()
    obj = object_patches(images, 3)
    # block 0 runs exactly the object tokens at every step; block 1 runs every token
    masks = [(t, b, obj.clone() if b == 0 else torch.ones_like(obj)) for t in (900.0, 500.0, 100.0, 0.0) for b in (0, 1)]
    sel = token_selectivity(masks, images, patch=3, bands=2)
    b0, b1 = sel["per_block"]
    assert all(r["object"] == 1.0 and r["background"] == 0.0 for r in b0["bands"])
    assert all(r["object"] == 1.0 and r["background"] == 1.0 for r in b1["bands"])
    assert sel["object"] == 1.0 and abs(sel["background"] - 0.5) < 1e-6
    assert sel["per_image_share"]["std"] == 0.0  # both images keep the same share
    # an image-dependent router: image 1 keeps nothing in block 0
    masks = [(t, b, m.clone()) for t, b, m in masks]
    for _, b, m in masks:
        if b == 0:
            m[1] = False
    spread = token_selectivity(masks, images, patch=3)["per_image_share"]
    assert (spread["min"], spread["max"]) == (0.5, 0.625) and spread["std"] > 0.05  # 4/8 vs 5/8 tokens


def test_plan_writes_plan_json_selectivity_and_token_maps(tmp_path):
    from dydit.assets import ASSETS_DIR

    out = tmp_path / "plan"
    r = CliRunner().invoke(app, ["plan", str(ASSETS_DIR / "fmnist_dydit_0.7"), "--out", str(out), "--steps", "4",
                                 "--num-images", "4"])
    assert r.exit_code == 0, r.output
    plan = json.loads((out / "plan.json").read_text())
    assert len(plan["steps"]) == 4 and len(plan["steps"][0]["blocks"]) == 6
    first = plan["steps"][0]["blocks"][0]
    assert set(first) == {"block", "heads", "groups", "token_share"} and 0 <= first["token_share"] <= 1
    assert abs(plan["realised_flops_ratio"] - sum(s["flops_ratio"] for s in plan["steps"]) / 4) < 1e-9
    sel = json.loads((out / "selectivity.json").read_text())
    assert sel["images"] == 4 and sel["steps"] == 4 and len(sel["per_block"]) == 6
    assert (out / "token_maps.png").read_bytes()[:4] == b"\x89PNG"


def test_token_masks_are_recorded_on_the_fast_and_masked_paths():
    import dydit
    from dydit.assets import ASSETS_DIR

    model = dydit.load(ASSETS_DIR / "fmnist_dydit_0.7")
    x, t, y = torch.randn(3, 1, 30, 30), torch.full((3,), 300.0), torch.tensor([0, 1, 2])
    fast, masked = DynamicContext("fast", record_tokens=True), DynamicContext("masked", record_tokens=True)
    with torch.no_grad():
        model(x, t, y, dyn=fast)
        model(x, t, y, dyn=masked)
    assert [b for _, b, _ in fast.token_masks] == list(range(6))
    for (_, _, a), (_, _, b) in zip(fast.token_masks, masked.token_masks):
        assert a.shape == (3, 100) and torch.equal(a, b)  # the fast path runs the tokens the masks keep
    assert DynamicContext("fast").token_masks == []  # off by default: nothing kept
