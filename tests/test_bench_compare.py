"""B3 command plumbing: row parsing and the quality-vs-time plot (the benchmark itself is a command)."""
import pytest

from dydit.bench_compare import Row, parse_row, plot


def test_parse_row_reads_every_option_and_rejects_unknown_ones():
    r = parse_row("pruned=runs/pruned/ema,steps=13,fbcache=0.05,adapters=runs/a")
    assert (r.name, r.path, r.steps, r.fbcache, r.adapters) == ("pruned", "runs/pruned/ema", 13, 0.05, "runs/a")
    r = parse_row("DyFLUX λ=0.5 + FBCache rdt=0.1=runs/dyflux/ema,fbcache=0.1")  # "=" inside the name
    assert (r.name, r.path, r.fbcache) == ("DyFLUX λ=0.5 + FBCache rdt=0.1", "runs/dyflux/ema", 0.1)
    with pytest.raises(ValueError, match="name=path"):
        parse_row("just-a-path")
    with pytest.raises(ValueError, match="unknown option 'stpes'"):
        parse_row("x=p,stpes=3")


def test_plot_writes_a_png(tmp_path):
    rows = [Row("static", "a", result={"fid": 10.0, "cond_acc": 0.9, "s_per_image": 0.01}),
            Row("DyDiT λ=0.5", "b", result={"fid": 11.0, "cond_acc": 0.88, "s_per_image": 0.006}),
            Row("FBCache rdt=0.1", "a", result={"fid": 12.0, "cond_acc": 0.85, "s_per_image": 0.007})]
    path = plot(rows, 0.01, tmp_path / "b3.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_engine_bench_plans_realise_the_requested_flops_ratio():
    # the table labels each plan by its target: the measured ratio of what ran must match it
    from dydit.bench import bench_engine

    for target in (0.7, 0.4):
        r = bench_engine("DiT-S/8", target, schedule_steps=50, timed_steps=3, batch=1, repeats=1)
        assert abs(r.realised_ratio - target) < 0.03, (target, r.realised_ratio)
        assert r.ideal_speedup > 1.0 and r.static_gmacs > r.dynamic_gmacs
        assert r.static_peak_mb > 0 and r.dynamic_peak_mb > 0  # CPU: peak RSS, reset per side


def test_compare_resumes_scored_rows_and_times_every_row_in_its_own_pass(tmp_path, monkeypatch):
    import json
    import shutil

    import dydit.evaluate
    from dydit.assets import default_model_path
    from dydit.bench_compare import run_compare

    base = tmp_path / "base"
    shutil.copytree(default_model_path(), base)
    calls = []

    def fake_eval(path, **kw):  # the quality pass itself is covered by test_eval; here: which rows run
        calls.append((str(path), kw["steps"], kw["fbcache"]))
        return {"fid": 10.0 + len(calls), "cond_acc": 0.9, "s_per_image": 1.0, "flops_ratio": 1.0,
                "gmacs_per_image": 1.0, "sampler": "ddim", "device": "cpu", "threads": 1}

    monkeypatch.setattr(dydit.evaluate, "evaluate_checkpoint", fake_eval)
    rows = lambda: [Row("static", str(base)), Row("fewer steps", str(base), steps=3),  # noqa: E731
                    Row("cache", str(base), fbcache=0.1)]
    args = dict(num_samples=4, sampler="ddim", steps=2, cfg_scale=4.0, seed=0, batch_size=3,
                out=str(tmp_path / "b3"), timing_repeats=1)
    first = rows()
    run_compare(first, **args)
    assert len(calls) == 3
    # the timing pass measured real sampling, not the fake's quality-pass time
    assert all(r.result["s_per_image"] != 1.0 and r.result["s_per_image_quality_pass"] == 1.0 for r in first)
    table = json.loads((tmp_path / "b3.json").read_text())
    assert [r["name"] for r in table] == ["static", "fewer steps", "cache"]

    again = rows()
    run_compare(again, **args, resume=True)
    assert len(calls) == 3 and [r.result["fid"] for r in again] == [11.0, 12.0, 13.0]
    # new weights invalidate the kept rows; other settings do too
    (base / "model.safetensors").write_bytes((base / "model.safetensors").read_bytes()[:-4] + b"\0\0\0\0")
    monkeypatch.setattr(dydit.evaluate, "evaluate_checkpoint", fake_eval)
    run_compare(rows(), **{**args, "timing_repeats": 0}, resume=True)
    assert len(calls) == 6


def test_compare_without_a_sampler_runs_each_row_on_its_own(tmp_path, monkeypatch):
    """DiT and SiT rows in one table: no --sampler means DDIM for the diffusion row and Euler for the flow row
    (DDIM on a flow model is an error)."""
    import dydit.evaluate
    from dydit.assets import ASSETS_DIR, default_model_path
    from dydit.bench_compare import run_compare

    seen = []

    def fake_eval(path, **kw):
        seen.append(kw["sampler"])
        return {"fid": 10.0, "cond_acc": 0.9, "s_per_image": 1.0, "flops_ratio": 1.0, "gmacs_per_image": 1.0,
                "sampler": kw["sampler"] or "default", "device": "cpu", "threads": 1}

    monkeypatch.setattr(dydit.evaluate, "evaluate_checkpoint", fake_eval)
    rows = [Row("DiT", str(default_model_path())), Row("SiT", str(ASSETS_DIR / "fmnist_sit"))]
    run_compare(rows, num_samples=4, sampler=None, steps=2, cfg_scale=4.0, seed=0, batch_size=2,
                out=str(tmp_path / "b3"), timing_repeats=1)
    assert seen == [None, None]  # evaluate_checkpoint picks each model's default sampler
    assert all(r.result["s_per_image"] > 0 for r in rows)
