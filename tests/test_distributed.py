"""Scale-out under torchrun on the CPU (gloo): sharded sampling and FSDP training."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dydit import sample_shards
from dydit.cli import app

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
# 10 samples in shards of 4: three shards, the last one short, two of them on one of two ranks
SAMPLE_ARGS = ["--num-samples", "10", "--batch-size", "4", "--steps", "4", "--cfg-scale", "2", "--out", ""]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _torchrun(*args, nproc=2, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res


@pytest.fixture
def one_thread():
    """The 2-process runs use one thread each; the in-process reference does too (same arithmetic)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def reference_npz(tmp_path, one_thread):
    """The embedded model's 10 samples from one process."""
    path = tmp_path / "one.npz"
    res = CliRunner().invoke(app, ["sample", *SAMPLE_ARGS, "--npz", str(path)])
    assert res.exit_code == 0, res.output
    assert "3 shards drawn, 0 reused" in res.output
    return path


def test_two_processes_write_the_bytes_of_one(reference_npz, tmp_path):
    two = tmp_path / "two.npz"
    res = _torchrun("-m", "dydit.cli", "sample", *SAMPLE_ARGS, "--npz", str(two))
    assert "3 shards drawn, 0 reused" in res.stdout
    assert two.read_bytes() == reference_npz.read_bytes()
    assert not sample_shards.parts_dir(two).exists()
    with np.load(two) as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (10, 28, 28, 3)  # ADM layout: NHWC RGB
    assert labels.tolist() == list(range(10))  # class-balanced: one of each of the 10 classes

    # the same images as a plain `dydit sample` of one image per class in batches of 4
    plain = tmp_path / "plain.npz"
    res = CliRunner().invoke(app, ["sample", "--num-per-class", "1", "--batch-size", "4", "--steps", "4",
                                   "--cfg-scale", "2", "--out", "", "--npz", str(plain)])
    assert res.exit_code == 0, res.output
    with np.load(plain) as f:
        assert np.array_equal(f["arr_0"], images) and np.array_equal(f["arr_1"], labels)


def test_a_killed_run_resumes_from_its_finished_shards(reference_npz, tmp_path, monkeypatch, one_thread):
    out = tmp_path / "resumed.npz"
    parts = sample_shards.parts_dir(out)

    def killed(*args, **kwargs):  # every shard drawn, then the process dies before assembling
        raise KeyboardInterrupt

    monkeypatch.setattr(sample_shards, "_assemble", killed)
    res = CliRunner().invoke(app, ["sample", *SAMPLE_ARGS, "--npz", str(out)])
    assert res.exit_code != 0  # typer turns the interrupt into exit status 130
    monkeypatch.undo()
    assert sorted(p.name for p in parts.glob("shard_*.npz")) == [f"shard_{s:06d}.npz" for s in range(3)]

    # The state a killed rank leaves: shard 1 never finished, a write cut short. Shard 0 is marked (its
    # images zeroed) to show that the rerun reuses it instead of drawing it again.
    sample_shards.shard_path(parts, 1).unlink()
    (parts / ".shard_000001.npz.abc.tmp").write_bytes(b"partial")
    with np.load(sample_shards.shard_path(parts, 0)) as f:
        labels = f["labels"]
        marked = np.zeros_like(f["images"])
    sample_shards.write_npz(sample_shards.shard_path(parts, 0), images=marked, labels=labels)

    # other settings do not mix with these shards
    res = CliRunner().invoke(app, ["sample", *SAMPLE_ARGS, "--steps", "5", "--npz", str(out)])
    assert res.exit_code == 1 and "other settings" in res.output and "steps" in res.output

    res = _torchrun("-m", "dydit.cli", "sample", *SAMPLE_ARGS, "--npz", str(out))
    assert "1 shards drawn, 2 reused" in res.stdout
    assert not parts.exists()
    with np.load(out) as f, np.load(reference_npz) as ref:
        assert np.array_equal(f["arr_1"], ref["arr_1"])
        assert (f["arr_0"][:4] == 0).all()  # shard 0 came from disk
        assert np.array_equal(f["arr_0"][4:], ref["arr_0"][4:])  # shards 1 and 2 as in a clean run
        assert f["arr_0"][4:].any()


def test_shard_plan_does_not_depend_on_the_world_size():
    plan = sample_shards.ShardPlan(num_samples=23, shard_size=5, classes=(3, 7, 9), seed=2)
    assert plan.num_shards == 5 and plan.bounds(4) == (20, 23)
    labels = torch.cat([plan.labels(s) for s in range(plan.num_shards)])
    assert labels.tolist() == [(3, 7, 9)[i % 3] for i in range(23)]
    assert [int((labels == c).sum()) for c in (3, 7, 9)] == [8, 8, 7]  # balanced up to one
    assert sample_shards.shard_seed(2, 4) == 2 * 100_003 + 4  # dydit sample's seed of batch 4
    with pytest.raises(ValueError, match="num_samples"):
        sample_shards.ShardPlan(0, 4, (0,))


def test_eval_scores_a_sharded_npz(reference_npz, tmp_path, monkeypatch):
    from dydit import evaluate
    from dydit.classifier import load_classifier

    reference = evaluate.reference_statistics(load_classifier(), cache_dir=tmp_path / "cache", limit=200)
    monkeypatch.setattr(evaluate, "reference_statistics", lambda *a, **k: reference)
    res = CliRunner().invoke(app, ["eval", "--npz", str(reference_npz), "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["num_samples"] == 10 and math.isfinite(result["fid"]) and 0.0 <= result["cond_acc"] <= 1.0
