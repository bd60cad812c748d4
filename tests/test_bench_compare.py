"""B3 command plumbing: row parsing and the quality-vs-time plot (the benchmark itself is a command)."""
import pytest

from dydit.bench_compare import Row, parse_row, plot


def test_parse_row_reads_every_option_and_rejects_unknown_ones():
    r = parse_row("pruned=runs/pruned/ema,steps=13,fbcache=0.05,adapters=runs/a")
    assert (r.name, r.path, r.steps, r.fbcache, r.adapters) == ("pruned", "runs/pruned/ema", 13, 0.05, "runs/a")
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
