"""Scale-out under torchrun on the CPU (gloo): sharded sampling and FSDP training."""
from __future__ import annotations

import json
import math
import os
import signal
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
    # its own session, so that a hung run is killed with its workers (torchrun alone would leave them)
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stdout[-2000:] + stderr[-4000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


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


# ---------------------------------------------------------------------------------------------
# FSDP
# ---------------------------------------------------------------------------------------------


def _log_by_step(path) -> dict[int, dict]:
    """Last log entry of each step (a resumed run re-logs the steps after its checkpoint)."""
    return {e["step"]: e for e in map(json.loads, Path(path).read_text().splitlines())}


def _ema_state(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "ema" / "model.safetensors"))


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """tests/fsdp_train_worker.py under torchrun, 2 gloo processes: every FSDP run the tests below read."""
    import dydit

    sys.path.insert(0, str(TESTS))
    try:
        import ddp_train_worker
    finally:
        sys.path.remove(str(TESTS))
    out = tmp_path_factory.mktemp("fsdp")
    dydit.save(ddp_train_worker.tiny_model(), out / "init")
    _torchrun(str(TESTS / "fsdp_train_worker.py"), "--out", str(out), "--init", str(out / "init"), timeout=500)
    return out


def test_fsdp_two_processes_follow_the_one_process_trajectory(fsdp_runs, one_thread):
    sys.path.insert(0, str(TESTS))
    try:
        import ddp_train_worker
        from fsdp_train_worker import STATIC
    finally:
        sys.path.remove(str(TESTS))
    single_losses, single_state = ddp_train_worker.run(str(fsdp_runs / "single"), **STATIC)
    fsdp_losses = json.loads((fsdp_runs / "static_losses.json").read_text())
    # The same global batch, noise and t; FSDP reduce-scatters the gradients of two half-batches where one
    # process sums one batch, so the sums differ in rounding only: float32's 1e-7, grown over 4 AdamW steps.
    assert fsdp_losses == pytest.approx(single_losses, rel=1e-5, abs=1e-6)
    gathered = torch.load(fsdp_runs / "static_model.pt", weights_only=True)
    assert gathered.keys() == single_state.keys()
    for name, p in single_state.items():
        torch.testing.assert_close(gathered[name], p, rtol=1e-5, atol=1e-6)
    ema = _ema_state(fsdp_runs / "static")  # saved from the gathered (full) EMA
    ref = _ema_state(fsdp_runs / "single")
    for name in ref:
        torch.testing.assert_close(ema[name], ref[name], rtol=1e-5, atol=1e-6)
    assert (fsdp_runs / "static" / "checkpoint.dcp" / "meta.json").exists()
    assert len(list((fsdp_runs / "static" / "checkpoint.dcp").glob("*.distcp"))) == 2  # one shard file per rank


def test_fsdp_stop_and_resume_continues_the_same_trajectory(fsdp_runs):
    for run in ("static", "ft_fsdp", "ft_ddp"):
        ref, resumed = _log_by_step(fsdp_runs / run / "log.jsonl"), _log_by_step(fsdp_runs / f"{run}_resumed" / "log.jsonl")
        assert sorted(ref) == sorted(resumed) == [1, 2, 3, 4]
        for step in ref:
            for key in ("loss", "grad_norm", "lr", "flops_ratio", "target", "inference_ratio", "target_offset"):
                assert ref[step].get(key) == resumed[step].get(key), (run, step, key)  # bit for bit
        a, b = _ema_state(fsdp_runs / run), _ema_state(fsdp_runs / f"{run}_resumed")
        assert all(torch.equal(a[k], b[k]) for k in a), run
    meta = json.loads((fsdp_runs / "ft_fsdp_resumed" / "checkpoint.dcp" / "meta.json").read_text())
    assert meta["step"] == 4 and meta["world_size"] == 2 and meta["task"]["acc"] is not None


def test_fsdp_finetune_of_a_dydit_matches_ddp(fsdp_runs):
    ddp, fsdp = _log_by_step(fsdp_runs / "ft_ddp" / "log.jsonl"), _log_by_step(fsdp_runs / "ft_fsdp" / "log.jsonl")
    assert sorted(ddp) == sorted(fsdp) == [1, 2, 3, 4]
    assert any(e["flops_ratio"] < 1.0 for e in ddp.values())  # the routers really mask
    assert all("inference_ratio" in ddp[s] for s in (2, 3, 4))  # the feedback ran on the EMA's fast engine
    for step in ddp:
        # each rank draws the same t, noise, dropout and gumbel noise under both; only the gradient
        # reduction differs (all-reduce vs reduce-scatter), by float32 rounding
        for key in ("loss", "grad_norm", "flops_ratio", "inference_ratio", "target"):
            if key in ddp[step]:
                assert fsdp[step][key] == pytest.approx(ddp[step][key], rel=1e-5, abs=1e-6), (step, key)
    a, b = _ema_state(fsdp_runs / "ft_ddp"), _ema_state(fsdp_runs / "ft_fsdp")
    assert a.keys() == b.keys() and any("attn_rate" in k for k in a)  # routers saved with the EMA backbone
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    import dydit

    model = dydit.load(fsdp_runs / "ft_fsdp" / "ema")  # a plain, full model
    assert model.dynamic_config is not None


def test_a_sharded_dydit_runs_masked_and_refuses_the_fast_engine(fsdp_runs):
    result = json.loads((fsdp_runs / "sharded_inference.json").read_text())
    assert result["max_diff"] == 0.0
    assert result["fast_refused"] and "FSDP-sharded" in result["fast_refused"]


def test_sharded_checkpoint_metadata_cannot_run_code(fsdp_runs, tmp_path):
    import pickle

    from dydit import fsdp

    metadata = fsdp._SafeReader(fsdp.checkpoint_path(fsdp_runs / "static")).read_metadata()
    assert any(k.startswith("model.") for k in metadata.state_dict_metadata)
    assert any(k.startswith("ema.") for k in metadata.state_dict_metadata)

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    evil = tmp_path / "evil.dcp"
    evil.mkdir()
    (evil / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(pickle.UnpicklingError, match="system"):
        fsdp._SafeReader(evil).read_metadata()
    assert not (tmp_path / "ran").exists()
