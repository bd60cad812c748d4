"""Training survives SIGKILL bit for bit, and 2-process DDP matches a 1-process run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dydit.train import TrainConfig, load_training_checkpoint, train
from helpers import tiny_dit

TESTS = Path(__file__).resolve().parent
STEPS, CKPT_EVERY, HANG_AT = 10, 4, 6  # the killed run checkpoints at step 4 and hangs in step 7

# Same model init and config in the parent and in the subprocess that gets killed.
_CHILD = """
import json, sys, time
import torch
from dydit.models.dit import build_model
from dydit.train import StaticTask, TrainConfig, train

class HangingTask(StaticTask):
    def loss(self, model, x, y, step, gen):
        if step == {hang}:
            time.sleep(300)  # killed here, between two checkpoints
        return super().loss(model, x, y, step, gen)

torch.manual_seed(0)
model = build_model("DiT-FMNIST", hidden_size=32, depth=2, num_heads=4)
train(TrainConfig(**json.loads(sys.argv[1])), model=model, task=HangingTask(model), progress=False)
"""


def _config(out) -> dict:
    return dict(out=str(out), steps=STEPS, batch_size=32, limit_data=256, log_every=1, ckpt_every=CKPT_EVERY,
                sample_every=0, warmup_steps=3, lr_schedule="cosine", threads=1, seed=0)


def _log_by_step(path) -> dict[int, dict]:
    """Last log entry of each step (a resumed run re-logs the steps after its checkpoint)."""
    entries = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return {e["step"]: e for e in entries}


def _wait_for(predicate, proc, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training subprocess exited early ({proc.returncode}): {proc.stderr.read().decode()}")
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("training subprocess made no progress")


def test_sigkill_and_resume_reproduces_uninterrupted_run(tmp_path):
    ref_ema = train(TrainConfig(**_config(tmp_path / "ref")), model=tiny_dit(), progress=False)
    ref_log = _log_by_step(tmp_path / "ref" / "log.jsonl")
    assert sorted(ref_log) == list(range(1, STEPS + 1))

    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD.format(hang=HANG_AT), json.dumps(_config(out))],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        log_file = out / "log.jsonl"
        _wait_for(lambda: (out / "checkpoint.pt").exists() and log_file.exists()
                  and len(log_file.read_text().splitlines()) >= HANG_AT, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert load_training_checkpoint(out / "checkpoint.pt")["step"] == CKPT_EVERY

    resumed_ema = train(TrainConfig(**_config(out), resume=True), model=tiny_dit(), progress=False)
    log = _log_by_step(out / "log.jsonl")
    for step in range(1, STEPS + 1):
        for key in ("loss", "mse", "grad_norm", "lr"):
            assert log[step][key] == ref_log[step][key], (step, key)
    for (name, a), (_, b) in zip(ref_ema.state_dict().items(), resumed_ema.state_dict().items()):
        assert torch.equal(a, b), name

    assert not list(out.rglob(".*.tmp"))
    ckpt = load_training_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == STEPS
    import dydit

    assert isinstance(dydit.load(out / "checkpoint.pt"), torch.nn.Module)
    assert isinstance(dydit.load(out / "ema"), torch.nn.Module)


def test_cosine_schedule_warms_up_then_decays_to_zero():
    from dydit.train import _lr_at

    cfg = TrainConfig(steps=100, lr=1e-3, warmup_steps=10, lr_schedule="cosine")
    lrs = [_lr_at(cfg, s) for s in range(cfg.steps)]
    assert lrs[:10] == pytest.approx([1e-3 * (s + 1) / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(1e-3)
    assert lrs[55] == pytest.approx(5e-4)  # half-way through the decay
    assert all(a > b for a, b in zip(lrs[10:], lrs[11:]))
    assert 0 < lrs[-1] < 1e-6
    assert _lr_at(TrainConfig(steps=100, lr=1e-3, warmup_steps=0), 99) == 1e-3  # constant stays constant
    with pytest.raises(ValueError, match="lr_schedule"):
        train(TrainConfig(lr_schedule="linear", steps=1), model=tiny_dit(), progress=False)


def test_ddp_two_processes_match_one_process(tmp_path):
    out = tmp_path / "ddp"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(TESTS / "ddp_train_worker.py"), "--out", str(out), "--steps", "3", "--batch-size", "32"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]

    rank0 = torch.load(out / "rank0_model.pt", weights_only=True)
    rank1 = torch.load(out / "rank1_model.pt", weights_only=True)
    saved = load_training_checkpoint(out / "checkpoint.pt")
    assert saved["step"] == 3
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
        assert torch.equal(rank0[name], saved["model"][name]), name
    ddp_losses = json.loads((out / "losses.json").read_text())
    assert len(ddp_losses) == 3 and all(torch.isfinite(torch.tensor(ddp_losses)))

    sys.path.insert(0, str(TESTS))
    try:
        import ddp_train_worker
    finally:
        sys.path.remove(str(TESTS))
    single_losses, single_state = ddp_train_worker.run(str(tmp_path / "single"), steps=3, batch_size=32)
    # Each rank gets a contiguous half of the same global batch, and DDP averages the gradients.
    assert ddp_losses == pytest.approx(single_losses, rel=1e-6, abs=1e-7)
    for name in rank0:
        torch.testing.assert_close(rank0[name], single_state[name], rtol=1e-5, atol=1e-6)
