"""Video models through `dydit eval` (B4 metrics, s/video, GMACs per video, .npz export) and the video B3 table."""
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import dydit
from dydit.cli import app
from dydit.dynamic import dynamize
from dydit.models.dit import build_model
from helpers import randomize, scramble_routers


def tiny_latte(**kw):
    # 3 frames of 16x16 pixels, 1 channel: Moving Fashion-MNIST's item (14 pixels) fits the canvas
    return build_model("Latte-MFMNIST", input_size=16, hidden_size=32, depth=2, num_heads=2, num_frames=3, **kw)


@pytest.fixture(scope="module")
def video_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("video_models")
    static = randomize(tiny_latte(), seed=0, scale=0.1)
    dydit.save(static, root / "static")
    dydit.save(scramble_routers(dynamize(static)), root / "dynamic")
    return root


@pytest.fixture()
def small_reference(monkeypatch, tmp_path):
    """The crop reference of 500 test images instead of 10k (speed); the statistics code is the real one."""
    from dydit import video_metrics

    real = video_metrics.crop_reference_statistics
    monkeypatch.setattr(video_metrics, "crop_reference_statistics",
                        lambda *a, **k: real(*a, **{**k, "limit": 500, "cache_dir": tmp_path}))


def test_eval_on_a_video_model_reports_b4_metrics_and_exports_npz(video_models, small_reference, tmp_path):
    out, npz = tmp_path / "eval.json", tmp_path / "videos.npz"
    r = CliRunner().invoke(app, ["eval", str(video_models / "dynamic"), "--num-samples", "4", "--steps", "2",
                                 "--batch-size", "4", "--cfg-scale", "2", "--json", str(out), "--save-npz", str(npz)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    for key in ("frame_fid", "frame_acc", "consistency", "motion_error_px", "s_per_video", "gmacs_per_video"):
        assert res[key] is not None and res[key] >= 0, key
    assert res["num_frames"] == 3 and 0 < res["flops_ratio"] < 1  # the scrambled routers prune on the fast engine
    assert "s / video" in r.output and "motion error" in r.output
    with np.load(npz) as f:
        assert f["arr_0"].shape == (4, 3, 16, 16, 3) and f["arr_0"].dtype == np.uint8
        assert f["arr_1"].tolist() == [0, 1, 2, 3]
    # the exported videos score the same through --npz
    again = tmp_path / "again.json"
    r = CliRunner().invoke(app, ["eval", "--npz", str(npz), "--json", str(again)])
    assert r.exit_code == 0, r.output
    res2 = json.loads(again.read_text())
    assert res2["frame_acc"] == res["frame_acc"] and res2["motion_error_px"] == pytest.approx(res["motion_error_px"])
