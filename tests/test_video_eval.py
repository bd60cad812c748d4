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
def one_thread():
    """Tiny models run far faster on one thread on a shared CPU; the suite's thread count is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def small_reference(monkeypatch, tmp_path):
    """The crop reference of 500 test images instead of 10k (speed); the statistics code is the real one."""
    from dydit import video_metrics

    real = video_metrics.crop_reference_statistics
    monkeypatch.setattr(video_metrics, "crop_reference_statistics",
                        lambda *a, **k: real(*a, **{**k, "limit": 500, "cache_dir": tmp_path}))


def test_eval_on_a_video_model_reports_b4_metrics_and_exports_npz(video_models, small_reference, tmp_path, one_thread):
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


def test_bench_compare_takes_video_rows(video_models, small_reference, tmp_path, monkeypatch, one_thread):
    from dydit import bench_compare

    out = tmp_path / "b3_video"
    args = ["bench", "compare", "--video", f"static={video_models / 'static'}", "--video",
            f"0.5={video_models / 'dynamic'}", "--num-samples", "2", "--steps", "4", "--batch-size", "2",
            "--cfg-scale", "2", "--threads", "1", "--timing-repeats", "1", "--out", str(out)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    table = (tmp_path / "b3_video.md").read_text()
    assert "per-frame FID" in table and "motion error (px)" in table and "s/video" in table and "FVD" in table
    rows = json.loads((tmp_path / "b3_video.json").read_text())
    assert [x["name"] for x in rows] == ["static", "DyLatte λ=0.5", "static, 3 steps", "static, 2 steps",
                                         "FBCache rdt=0.1", "DyLatte λ=0.5 + FBCache rdt=0.1"]
    for x in rows:
        assert {"frame_fid", "frame_acc", "consistency", "motion_error_px", "s_per_video", "gmacs_per_video"} <= set(x)
    assert rows[0]["flops_ratio"] == 1.0 and rows[1]["flops_ratio"] < 1.0
    assert rows[2]["gmacs_per_video"] < rows[0]["gmacs_per_video"]  # fewer steps: less compute per video
    assert (tmp_path / "b3_video.png").stat().st_size > 0
    # resumable: the scored rows are kept, only the timing reruns
    import dydit.evaluate as ev

    monkeypatch.setattr(ev, "evaluate_checkpoint", lambda *a, **k: (_ for _ in ()).throw(AssertionError("rescored")))
    r = CliRunner().invoke(app, args[:-4] + ["--timing-repeats", "0", "--out", str(out), "--resume"])
    assert r.exit_code == 0, r.output
    # image and video rows do not share a table
    mixed = [bench_compare.Row("a", "x", result={"s_per_image": 1.0}), bench_compare.Row("b", "y", result=rows[0])]
    with pytest.raises(ValueError, match="models of one kind"):
        bench_compare._kind(mixed)


def test_video_rows_need_the_static_model():
    from dydit.bench_compare import parse_video_models, video_rows

    with pytest.raises(ValueError, match="static"):
        video_rows(parse_video_models(["0.5=a"]), 10, 0.1)
    with pytest.raises(ValueError, match="FLOPs target"):
        parse_video_models(["dylatte=a"])


def test_engine_bench_on_latte_shapes_plans_over_spatial_and_temporal_blocks(one_thread):
    # B2 for video at a tiny size (Latte-S/8 narrowed to 4 blocks of 96, 4 frames of 32x32x4 latents: 64 tokens
    # per sample); the paper-scale
    # run is `dydit bench engine --models Latte-B/2` (16 frames at 256²), a separate command
    from dydit.bench import bench_engine, results_table

    r = bench_engine("Latte-S/8", 0.5, schedule_steps=50, timed_steps=2, batch=1, repeats=1,
                     model_overrides={"num_frames": 4, "depth": 4, "hidden_size": 96})
    assert r.frames == 4 and abs(r.realised_ratio - 0.5) < 0.03
    assert set(r.ratio_by_kind) == {"spatial", "temporal"} and all(v < 0.95 for v in r.ratio_by_kind.values())
    assert r.ideal_speedup > 1.5 and r.static_peak_mb > 0 and r.dynamic_peak_mb > 0
    assert r.static_s_per_step > 0 and r.dynamic_s_per_step > 0
    table = results_table([r])
    assert "Latte-S/8 (4 frames)" in table and "spatial" in table and "temporal" in table


def test_demo_shows_static_and_dylatte_side_by_side(video_models, tmp_path, one_thread):
    from PIL import Image

    out = tmp_path / "demo"
    r = CliRunner().invoke(app, ["demo", "--video", f"static={video_models / 'static'}", "--video",
                                 f"0.5={video_models / 'dynamic'}", "--steps", "2", "--per-class", "1",
                                 "--repeats", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert [s["model"] for s in summary] == ["static", "DyLatte λ=0.5"]
    assert summary[0]["flops_ratio"] == 1.0 and summary[1]["flops_ratio"] < 1.0
    single, both = Image.open(out / "static.gif"), Image.open(out / "side_by_side.gif")
    assert single.n_frames == both.n_frames == 3  # one GIF frame per video frame
    assert both.size == (2 * single.size[0] + 12, single.size[1])
    r = CliRunner().invoke(app, ["demo", "--video", "dylatte=x", "--out", str(out)])
    assert r.exit_code != 0 and "FLOPs target" in r.output


def test_demo_samples_flow_matching_video_models_with_euler(tmp_path, one_thread):
    # the B4 base is a flow-matching Latte (Latte-MFMNIST-Flow): the demo samples each model with its own sampler
    flow = randomize(build_model("Latte-MFMNIST-Flow", input_size=16, hidden_size=32, depth=2, num_heads=2,
                                 num_frames=3), seed=0, scale=0.1)
    dydit.save(flow, tmp_path / "static")
    dydit.save(scramble_routers(dynamize(flow)), tmp_path / "dynamic")
    out = tmp_path / "demo"
    r = CliRunner().invoke(app, ["demo", "--video", f"static={tmp_path / 'static'}", "--video",
                                 f"0.5={tmp_path / 'dynamic'}", "--steps", "2", "--per-class", "1",
                                 "--repeats", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "Euler 2 steps" in r.output and "DDIM" not in r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary[1]["flops_ratio"] < 1.0 and (out / "side_by_side.gif").exists()


def test_plan_report_on_a_video_model_maps_token_masks_to_frames(video_models, tmp_path, one_thread):
    from dydit.dynamic.token_report import frames_as_images

    per_frame = torch.tensor([[[1, 0, 1], [0, 0, 1]]], dtype=torch.bool)  # (B=1, F=2, N=3)
    spatial = per_frame.reshape(1, 6)  # a spatial block records frame-major
    temporal = per_frame.transpose(1, 2).reshape(1, 6)  # a temporal block position-major
    videos = torch.zeros(1, 2, 1, 4, 4)
    frames, masks = frames_as_images(videos, [(999.0, 0, spatial), (999.0, 1, temporal)], ["spatial", "temporal"])
    assert frames.shape == (2, 1, 4, 4)
    assert torch.equal(masks[0][2], per_frame[0]) and torch.equal(masks[1][2], per_frame[0])
    r = CliRunner().invoke(app, ["plan", str(video_models / "dynamic"), "--steps", "3", "--num-images", "2",
                                 "--out", str(tmp_path / "plan")])
    assert r.exit_code == 0, r.output
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert len(plan["steps"]) == 3 and (tmp_path / "plan" / "token_maps.png").exists()
    assert json.loads((tmp_path / "plan" / "selectivity.json").read_text())["images"] == 2 * 3  # frames
    assert "spatial" in (tmp_path / "plan" / "plan.md").read_text()
