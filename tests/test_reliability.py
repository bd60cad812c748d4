"""Fault injection and bad inputs (issue 20): nothing lost, every mistake answered in one line.

- SIGKILL at seeded points of a tiny train and fine-tune run (between steps and in the middle of a
  checkpoint write), resumed: the same loss trajectory as an uninterrupted run, one log line per step,
  no temp file left behind.
- SIGTERM and --stop-after stop at a checkpoint; a resume with other settings, another model or no
  checkpoint is refused.
- A full disk and a read-only folder (a real small tmpfs where this machine lets the tests mount one, a
  patched write everywhere): one line naming the disk and the folder, the last checkpoint intact.
- One table row per bad input of the issue's probes, CLI and Python: exit status and the one-line message.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dydit.errors import Interrupted, UserError, WriteError
from dydit.train import TrainConfig, load_training_checkpoint, train
from helpers import tiny_dit

SRC = Path(__file__).resolve().parents[1] / "src"
STEPS, CKPT_EVERY = 8, 3


def _config(out, **kw) -> dict:
    return dict(out=str(out), steps=STEPS, batch_size=16, limit_data=64, log_every=1, ckpt_every=CKPT_EVERY,
                sample_every=0, warmup_steps=2, lr_schedule="cosine", threads=1, seed=0, **kw)


def _log(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def _no_temp_files(out) -> bool:
    return not [f for f in Path(out).rglob("*.tmp")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: its log (one entry per step) and EMA weights."""
    out = tmp_path_factory.mktemp("reference")
    ema = train(TrainConfig(**_config(out)), model=tiny_dit(), progress=False)
    return _log(out), ema.state_dict()


def _same_run(out, reference):
    ref_log, ref_ema = reference
    log = _log(out)
    assert [e["step"] for e in log] == list(range(1, STEPS + 1))  # cut back on resume: no step logged twice
    for got, want in zip(log, ref_log):
        for key in ("loss", "mse", "grad_norm", "lr"):
            assert got[key] == want[key], (got["step"], key)
    ckpt = load_training_checkpoint(Path(out) / "checkpoint.pt")
    assert ckpt["step"] == STEPS
    for name, value in ref_ema.items():
        assert torch.equal(ckpt["ema"][name], value), name
    assert _no_temp_files(out)


# ---------------------------------------------------------------------------------------------
# SIGKILL at seeded points, resumed
# ---------------------------------------------------------------------------------------------

# The child kills itself with SIGKILL (no handler can run) either at the start of a step or in the
# middle of writing a checkpoint (the temp file half written, nothing renamed yet).
_CHILD = r"""
import json, os, signal, sys
import torch
spec = json.loads(sys.argv[1])

def die():
    os.kill(os.getpid(), signal.SIGKILL)

real_save = torch.save
def save(obj, f, *a, **k):
    if spec["kind"] == "ckpt" and isinstance(obj, dict) and obj.get("step") == spec["at"]:
        real_save(obj, f, *a, **k)
        size = os.path.getsize(f)
        with open(f, "r+b") as fh:
            fh.truncate(size // 2)
        die()
    return real_save(obj, f, *a, **k)
torch.save = save

if spec["run"] == "train":
    from dydit.models.dit import build_model
    from dydit.train import StaticTask, TrainConfig, train

    class Task(StaticTask):
        def loss(self, model, x, y, step, gen):
            if spec["kind"] == "step" and step == spec["at"]:
                die()
            return super().loss(model, x, y, step, gen)

    torch.manual_seed(0)
    model = build_model("DiT-FMNIST", hidden_size=32, depth=2, num_heads=4)
    train(TrainConfig(**spec["config"]), model=model, task=Task(model), progress=False)
else:
    from dydit.dynamic.finetune import FinetuneTask, finetune
    from dydit.dynamic.recipe import Recipe

    if spec["kind"] == "step":
        loss = FinetuneTask.loss
        def killing_loss(self, model, x, y, step, gen):
            if step == spec["at"]:
                die()
            return loss(self, model, x, y, step, gen)
        FinetuneTask.loss = killing_loss
    finetune(spec["init"], spec["out"], Recipe.from_dict(spec["recipe"]), progress=False, **spec["options"])
"""


def _kill_points(seed: int, steps: int, every: int) -> dict:
    """A seeded kill point: even seeds in the middle of a checkpoint write (the first one too, which leaves
    nothing to resume), odd ones at the start of a step after the first checkpoint."""
    rng = random.Random(seed)
    if seed % 2 == 0:
        return {"kind": "ckpt", "at": rng.choice(list(range(every, steps, every)))}
    return {"kind": "step", "at": rng.randrange(every + 1, steps)}


def _run_killed_child(spec: dict):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]


KILL_SEEDS = (0, 1, 2)


@pytest.mark.parametrize("seed", KILL_SEEDS)
def test_sigkill_at_a_seeded_point_then_resume_gives_the_same_run(seed, tmp_path, reference):
    point = _kill_points(seed, STEPS, CKPT_EVERY)
    out = tmp_path / "run"
    _run_killed_child({"run": "train", "config": _config(out), **point})
    if point["kind"] == "ckpt":  # killed mid-write: the half-written temp file is there, the target untouched
        assert list(out.glob(".checkpoint.pt.*.tmp"))
        expected = point["at"] - CKPT_EVERY
    else:
        expected = (point["at"] // CKPT_EVERY) * CKPT_EVERY
    if expected:
        assert load_training_checkpoint(out / "checkpoint.pt")["step"] == expected
    train(TrainConfig(**_config(out), resume=bool(expected)), model=tiny_dit(), progress=False)
    _same_run(out, reference)


def _finetune_options():
    from dydit.dynamic.recipe import get_recipe

    recipe = get_recipe("default").with_sets(
        ["optim.steps=4", "optim.batch_size=8", "flops.ramp_steps=1", "warmup.steps=1", "feedback.every=0",
         "calibration.enabled=false"])
    return recipe, dict(limit_data=16, ckpt_every=2, threads=1)


def test_finetune_killed_during_a_checkpoint_write_resumes_to_the_same_model(tmp_path):
    from dydit.assets import default_model_path
    from dydit.dynamic.finetune import finetune

    recipe, options = _finetune_options()
    ref = finetune(default_model_path(), tmp_path / "ref", recipe, progress=False, **options)
    out = tmp_path / "killed"
    _run_killed_child({"run": "finetune", "init": str(default_model_path()), "out": str(out),
                       "recipe": recipe.to_dict(), "options": options, "kind": "ckpt", "at": 4})
    assert list(out.glob(".checkpoint.pt.*.tmp")) and load_training_checkpoint(out / "checkpoint.pt")["step"] == 2
    resumed = finetune(default_model_path(), out, recipe, resume=True, progress=False, **options)
    assert resumed.finished and _no_temp_files(out)
    ref_log = _log(tmp_path / "ref")
    assert [e["step"] for e in _log(out)] == [e["step"] for e in ref_log] == [4]  # the killed run's line 4 is cut
    assert [e["loss"] for e in _log(out)] == [e["loss"] for e in ref_log]
    a, b = ref.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# stopping only at a checkpoint
# ---------------------------------------------------------------------------------------------


def test_stop_after_writes_a_checkpoint_and_resume_finishes_the_same_run(tmp_path, reference):
    out = tmp_path / "run"
    train(TrainConfig(**_config(out), stop_after=2), model=tiny_dit(), progress=False)  # not a multiple of 3
    assert load_training_checkpoint(out / "checkpoint.pt")["step"] == 2
    train(TrainConfig(**_config(out), resume=True, stop_after=3), model=tiny_dit(), progress=False)
    assert load_training_checkpoint(out / "checkpoint.pt")["step"] == 5
    train(TrainConfig(**_config(out), resume=True), model=tiny_dit(), progress=False)
    _same_run(out, reference)


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_says_how_to_resume(tmp_path, reference):
    from dydit.train import StaticTask

    class SignalledTask(StaticTask):
        def loss(self, model, x, y, step, gen):
            if step == 4:
                os.kill(os.getpid(), signal.SIGTERM)  # as `kill` or a cluster scheduler would
            return super().loss(model, x, y, step, gen)

    out = tmp_path / "run"
    model = tiny_dit()
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted, match="stopped by SIGTERM at step 5 .* --resume") as e:
        train(TrainConfig(**_config(out)), model=model, task=SignalledTask(model), progress=False)
    assert e.value.exit_code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is gone with the run
    assert load_training_checkpoint(out / "checkpoint.pt")["step"] == 5
    train(TrainConfig(**_config(out), resume=True), model=tiny_dit(), progress=False)
    _same_run(out, reference)


# ---------------------------------------------------------------------------------------------
# a full disk, a read-only folder
# ---------------------------------------------------------------------------------------------


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return res.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (skipped where mounting is not allowed; the patched tests below run everywhere)."""
    mnt = tmp_path / "disk"
    if not _mount_tmpfs(mnt, "3m"):
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _filling_task(out_dir: Path, at_step: int):
    from dydit.train import StaticTask

    class FillDisk(StaticTask):
        def loss(self, model, x, y, step, gen):
            if step == at_step:  # another program fills the disk between two checkpoints
                with open(out_dir.parent / "filler", "wb") as f:
                    try:
                        while True:
                            f.write(b"\0" * 65536)
                            f.flush()
                    except OSError:
                        pass
            return super().loss(model, x, y, step, gen)

    return FillDisk


def _assert_disk_full_message(text: str, out: Path, step: int):
    assert "no space left on the disk holding" in text and str(out) in text, text
    assert f"the last checkpoint {out / 'checkpoint.pt'} (step {step}) is intact" in text, text


def test_real_full_disk_names_the_disk_and_keeps_the_last_checkpoint(small_disk):
    out = small_disk / "run"
    model = tiny_dit()
    with pytest.raises(WriteError) as e:
        train(TrainConfig(**{**_config(out), "log_every": 100}), model=model,
              task=_filling_task(out, 4)(model), progress=False)
    _assert_disk_full_message(str(e.value), out, CKPT_EVERY)
    assert f"(disk {small_disk})" in str(e.value)
    assert load_training_checkpoint(out / "checkpoint.pt")["step"] == CKPT_EVERY and _no_temp_files(out)


def test_patched_full_disk_as_torch_reports_it(tmp_path, monkeypatch):
    """torch.save on a full disk raises RuntimeError('... unexpected pos ...'), not ENOSPC."""
    import shutil
    from collections import namedtuple

    out = tmp_path / "run"
    train(TrainConfig(**_config(out), stop_after=3), model=tiny_dit(), progress=False)
    real_save, real_usage = torch.save, shutil.disk_usage
    usage = namedtuple("usage", "total used free")

    def full_save(obj, f, *a, **k):
        Path(f).write_bytes(b"PK" * 100)  # a partial file, then torch's own error
        monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9, 0))
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed; unexpected pos 1234 vs 5678")

    monkeypatch.setattr(torch, "save", full_save)
    with pytest.raises(WriteError) as e:
        train(TrainConfig(**_config(out), resume=True), model=tiny_dit(), progress=False)
    monkeypatch.setattr(torch, "save", real_save)
    monkeypatch.setattr(shutil, "disk_usage", real_usage)
    _assert_disk_full_message(str(e.value), out, 3)
    assert load_training_checkpoint(out / "checkpoint.pt")["step"] == 3 and _no_temp_files(out)


def test_read_only_folder_is_one_line_before_any_work(tmp_path, monkeypatch):
    import errno
    import tempfile

    from typer.testing import CliRunner

    from dydit.cli import app

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    r = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "ro"), "--steps", "1"])
    lines = _error_lines(r)
    assert r.exit_code == 1 and len(lines) == 1 and "is read-only: cannot write" in lines[0], r.output
    assert str(tmp_path / "ro") in lines[0] and "--out" in lines[0]


def test_real_read_only_mount(small_disk):
    from typer.testing import CliRunner

    from dydit.cli import app

    (small_disk / "runs").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    r = CliRunner().invoke(app, ["sample", "--out", str(small_disk / "runs" / "grid.png"), "--classes", "0"])
    lines = _error_lines(r)
    assert r.exit_code == 1 and len(lines) == 1 and "is read-only" in lines[0], r.output


# ---------------------------------------------------------------------------------------------
# resume that cannot silently diverge
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("stopped") / "run"
    train(TrainConfig(**_config(out), stop_after=1), model=tiny_dit(), progress=False)
    return out


def test_resume_with_other_settings_is_refused_unless_asked(stopped_run, tmp_path):
    with pytest.raises(UserError, match=r"other settings \(batch_size 16 -> 32; lr 0.0003 -> 0.001\)"):
        train(TrainConfig(**{**_config(stopped_run), "lr": 1e-3, "batch_size": 32}, resume=True),
              model=tiny_dit(), progress=False)
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(stopped_run, copy)
    train(TrainConfig(**{**_config(copy), "lr": 1e-3}, resume=True, resume_with_changes=True, stop_after=1),
          model=tiny_dit(), progress=False)
    assert load_training_checkpoint(copy / "checkpoint.pt")["step"] == 2


# ---------------------------------------------------------------------------------------------
# bad inputs: one row per probe, CLI and Python
# ---------------------------------------------------------------------------------------------


def _error_lines(result) -> list[str]:
    text = result.stderr if hasattr(result, "stderr") else result.output
    assert "Traceback" not in result.output, result.output
    return [line for line in text.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def files(tmp_path_factory, stopped_run):
    """Broken inputs: a corrupt data set, a config.json with a string, a truncated model, a pickle with code."""
    import shutil

    from dydit.assets import default_model_path

    root = tmp_path_factory.mktemp("bad")
    data = root / "data"
    data.mkdir()
    for split in ("train", "t10k"):
        (data / f"{split}-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 10, 0, 0, 0, 28, 0, 0, 0, 28])
                                                          + b"\0" * 100)
        (data / f"{split}-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 10]) + b"\0" * 10)
    strcfg = root / "strcfg"
    shutil.copytree(default_model_path(), strcfg)
    cfg = json.loads((strcfg / "config.json").read_text())
    cfg["model"]["hidden_size"] = "128"
    (strcfg / "config.json").write_text(json.dumps(cfg))
    truncated = root / "truncated"
    shutil.copytree(default_model_path(), truncated)
    w = truncated / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    pickled = root / "code.pt"

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"model": Evil()}, pickled)
    folder_png = root / "grid.png"
    folder_png.mkdir()
    return {"data": str(data), "strcfg": str(strcfg), "truncated": str(truncated), "pickled": str(pickled),
            "folder_png": str(folder_png), "run": str(stopped_run), "empty": str(root / "empty"),
            "static": str(default_model_path()), "dynamic": str(default_model_path().parent / "fmnist_dydit_0.5")}


T = ["train", "--steps", "2", "--limit-data", "32", "--batch-size", "16", "--sample-every", "0"]
F = ["finetune", "{static}", "--out", "{empty}/ft", "--limit-data", "16", "--batch-size", "8"]
NO_CUDA = not torch.cuda.is_available()

# (probe id, command line, exit status, fragment of the one-line message)
CLI_PROBES = [
    ("train --batch-size 0", T + ["--batch-size", "0", "--out", "{empty}/a"], 2, "--batch-size must be a whole number >= 1"),
    ("train --ckpt-every 0", T + ["--ckpt-every", "0", "--out", "{empty}/a"], 2, "--ckpt-every must be a whole number >= 1"),
    ("train --limit-data 0", T + ["--limit-data", "0", "--out", "{empty}/a"], 2, "--limit-data must be a whole number >= 1"),
    ("train --steps -5", T + ["--steps", "-5", "--out", "{empty}/a"], 2, "--steps must be a whole number >= 1"),
    ("train --resume, no checkpoint", T + ["--resume", "--out", "{empty}/typo"], 2, "holds no checkpoint.pt to continue from"),
    ("train --resume, other --lr", T + ["--resume", "--out", "{run}", "--lr", "0.01"], 2, "lr 0.0003 -> 0.01"),
    ("train --resume, other --model", T + ["--resume", "--out", "{run}", "--model", "DiT-Tiny"], 2,
     'model "DiT-FMNIST" -> "DiT-Tiny"'),
    ("train --resume-with-changes, other --model", T + ["--resume", "--resume-with-changes", "--out", "{run}", "--model",
                                                       "DiT-Tiny"], 2, "holds a DiT-FMNIST model, not this run's DiT-Tiny"),
    ("train over a run without --resume", T + ["--out", "{run}"], 2, "already holds a run (checkpoint.pt); pass --resume"),
    ("train --init missing", T + ["--init", "{empty}/nope.pt", "--out", "{empty}/b"], 1, "no such file or folder"),
    ("train --data missing", T + ["--data", "{empty}/nodata", "--out", "{empty}/c"], 1, "not found in"),
    ("train --data corrupt", T + ["--data", "{data}", "--out", "{empty}/d"], 1, "truncated"),
    ("train --model for other data", T + ["--model", "DiT-Tiny", "--out", "{empty}/e"], 2, "takes 4x8x8"),
    ("finetune missing init", ["finetune", "{empty}/nope", "--out", "{empty}/f"], 1, "no such file or folder"),
    ("finetune --steps 0", F + ["--steps", "0"], 2, "optim.steps and optim.batch_size must be ≥ 1, got 0"),
    ("finetune --steps -5", F + ["--steps", "-5"], 2, "optim.steps and optim.batch_size must be ≥ 1, got -5"),
    ("finetune feedback.sampler foo", F + ["--set", "feedback.sampler=foo"], 2, "feedback.sampler 'foo' is not a sampler"),
    ("finetune sampler of the other objective", F + ["--set", "feedback.sampler=euler"], 2,
     "cannot sample"),
    ("finetune --ckpt-every 0", F + ["--ckpt-every", "0"], 2, "--ckpt-every must be a whole number >= 1"),
    ("finetune --resume, no checkpoint", F + ["--resume"], 2, "holds no checkpoint.pt"),
    ("plan missing checkpoint", ["plan", "{empty}/nope"], 1, "no such file or folder"),
    ("plan --steps 0", ["plan", "{dynamic}", "--steps", "0"], 2, "--steps must be a whole number >= 1"),
    ("plan --object-threshold 1.5", ["plan", "{dynamic}", "--object-threshold", "1.5"], 2, "leaves no object patch"),
    ("calibrate missing checkpoint", ["calibrate", "{empty}/nope", "--target", "0.5", "--out", "{empty}/g"], 1,
     "no such file or folder"),
    ("calibrate --sampler of the other objective", ["calibrate", "{dynamic}", "--target", "0.5", "--out", "{empty}/g",
                                                    "--sampler", "euler"], 2, "cannot sample"),
    ("sample --steps 0", ["sample", "--steps", "0"], 2, "--steps must be >= 1"),
    ("sample --cfg-scale nan", ["sample", "--cfg-scale", "nan"], 2, "--cfg-scale must be a finite number"),
    ("sample --out x.xyz", ["sample", "--out", "x.xyz"], 2, "give a .png or .jpg path"),
    ("sample --out a folder", ["sample", "--out", "{folder_png}"], 2, "is a folder"),
    ("sample --batch-size 0", ["sample", "--batch-size", "0"], 2, "--batch-size must be >= 1"),
    ("sample --threads 0", ["sample", "--threads", "0"], 2, "--threads must be a whole number >= 1"),
    ("sample --device cuda without a GPU", ["sample", "--device", "cuda"], 2, "no usable CUDA GPU"),
    ("sample a config.json with a string", ["sample", "{strcfg}"], 1, "config key 'hidden_size' must be int"),
    ("sample a truncated model", ["sample", "{truncated}"], 1, "truncated or corrupted"),
    ("sample a pickle with code", ["sample", "{pickled}"], 1, "never runs code from files"),
    ("sample --prompt on a class-conditional model", ["sample", "--prompt", "a shoe", "--out", "{empty}/g.png"], 1,
     "--prompt is for text-to-image models"),
    ("eval --num-samples 0", ["eval", "--num-samples", "0"], 2, "--num-samples must be a whole number >= 1"),
    ("eval --steps 0", ["eval", "--steps", "0"], 2, "--steps must be a whole number >= 1"),
    ("eval --json x.txt", ["eval", "--json", "{empty}/r.txt"], 2, "expected a file ending in .json"),
    ("eval --device cuda without a GPU", ["eval", "--device", "cuda"], 2, "no usable CUDA GPU"),
    ("eval --data missing, before sampling", ["eval", "--num-samples", "10", "--data", "{empty}/nodata"], 1,
     "not found in"),
    ("demo --steps 0", ["demo", "--steps", "0", "--out", "{empty}/demo"], 2, "--steps must be a whole number >= 1"),
    ("bench compare --batch-size 0", ["bench", "compare", "--batch-size", "0"], 2, "--batch-size must be a whole number"),
    ("bench engine --device cuda without a GPU", ["bench", "engine", "--device", "cuda"], 2, "no usable CUDA GPU"),
    ("train-classifier --epochs 0", ["train-classifier", "--epochs", "0"], 2, "--epochs must be a whole number >= 1"),
]


@pytest.mark.parametrize("probe,args,code,fragment", CLI_PROBES, ids=[p[0] for p in CLI_PROBES])
def test_cli_bad_input_is_one_line(probe, args, code, fragment, files, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from dydit import evaluate
    from dydit.cli import app

    if "cuda" in probe and not NO_CUDA:
        pytest.skip("this machine has a GPU")
    monkeypatch.chdir(tmp_path)
    sampled = []
    monkeypatch.setattr(evaluate, "generate_samples", lambda *a, **k: sampled.append(1))  # must not be reached
    r = CliRunner().invoke(app, [a.format(**files) for a in args])
    lines = _error_lines(r)
    assert r.exit_code == code and len(lines) == 1 and fragment in lines[0], (r.exit_code, r.output)
    assert not sampled
    assert not list(tmp_path.iterdir())  # nothing written in the working folder


def _dit(name="DiT-Tiny"):
    from dydit.models.dit import build_model

    return build_model(name).eval()


X = torch.randn(2, 4, 8, 8)
T2 = torch.tensor([10.0, 500.0])
Y2 = torch.tensor([1, 2])


def _call(model, *args):
    def run():
        with torch.no_grad():
            model(*args)
    return run


def _sample(labels, steps=2):
    def run():
        from dydit.sampling import sample

        sample(_dit(), labels, "ddim", steps)
    return run


def _dynamic():
    import dydit

    return dydit.dynamize(_dit()).eval()


def _train_bad():
    train(TrainConfig(batch_size=0), model=_dit(), progress=False)


def _bad_recipe():
    from dydit.dynamic.recipe import get_recipe

    get_recipe("default").with_sets(["feedback.sampler=foo"]).validate()


def _string_config():
    from dydit.models.dit import DiTConfig

    DiTConfig.from_dict({"hidden_size": "128"})


def _load_missing():
    import dydit

    dydit.load("/nonexistent/model")


# (probe id, call, error type, fragment naming the argument)
PYTHON_PROBES = [
    ("float labels", _call(_dit(), X, T2, torch.tensor([1.0, 2.0])), ValueError, "y: class ids must be an integer"),
    ("label out of range", _call(_dit(), X, T2, torch.tensor([1, 11])), ValueError, "y: class ids must be in [0, 10]"),
    ("negative label", _call(_dit(), X, T2, torch.tensor([-1, 1])), ValueError, "y: class ids must be in"),
    ("x/y batch mismatch", _call(_dit(), X, T2, torch.tensor([1, 2, 3])), ValueError, "y: expected one class id per image"),
    ("x/t batch mismatch", _call(_dit(), X, torch.tensor([1.0, 2.0, 3.0]), Y2), ValueError, "t: expected one timestep"),
    ("t beyond the diffusion range", _call(_dit(), X, torch.tensor([10.0, 1500.0]), Y2), ValueError,
     "t: timesteps of a diffusion model must be in [0, 1000]"),
    ("t NaN", _call(_dit(), X, torch.tensor([float("nan"), 1.0]), Y2), ValueError, "t: timesteps"),
    ("t beyond the flow range", _call(_dit("SiT-Tiny"), X, torch.tensor([0.5, 2.0]), Y2), ValueError,
     "t: timesteps of a flow model must be in [0, 1]"),
    ("x of another size", _call(_dit(), torch.randn(2, 4, 16, 16), T2, Y2), ValueError, "x: expected input of shape"),
    ("x not a tensor", _call(_dit(), [[0.0]], T2, Y2), TypeError, "x must be a tensor"),
    ("dynamic model, label out of range", _call(_dynamic(), X, T2, torch.tensor([1, 12])), ValueError,
     "y: class ids must be in"),
    ("sample labels out of range", _sample([3, 12]), ValueError, "class ids must be in [0, 10)"),
    ("sample 0 steps", _sample([1], steps=0), ValueError, "num_steps must be >= 1"),
    ("train batch_size 0", _train_bad, UserError, "--batch-size must be a whole number >= 1"),
    ("recipe sampler foo", _bad_recipe, ValueError, "feedback.sampler 'foo' is not a sampler"),
    ("config.json string", _string_config, ValueError, "config key 'hidden_size' must be int"),
    ("load a missing path", _load_missing, FileNotFoundError, "no such file or folder"),
]


@pytest.mark.parametrize("probe,call,error,fragment", PYTHON_PROBES, ids=[p[0] for p in PYTHON_PROBES])
def test_python_bad_input_names_the_argument(probe, call, error, fragment):
    with pytest.raises(error) as e:
        call()
    assert fragment in str(e.value)


def test_valid_inputs_still_pass_the_checks():
    """The checks accept what the model is for: the null class, t at both ends, a scalar t, int timesteps."""
    model = _dit()
    with torch.no_grad():
        assert model(X, torch.tensor([0, 999]), torch.tensor([10, 0])).shape == (2, 8, 8, 8)
        assert model(X, torch.tensor(1000.0), Y2).shape == (2, 8, 8, 8)
        assert _dit("SiT-Tiny")(X, torch.tensor([0.0, 1.0]), Y2).shape[0] == 2


# ---------------------------------------------------------------------------------------------
# dydit eval keeps finished sample batches
# ---------------------------------------------------------------------------------------------


def test_eval_resumes_from_the_batches_it_kept(tmp_path, monkeypatch):
    import numpy as np

    from dydit import evaluate, sampling
    from dydit.assets import default_model_path
    from dydit.models.dit import build_model

    torch.manual_seed(0)
    model = build_model("DiT-FMNIST", hidden_size=32, depth=1, num_heads=4)
    args = dict(num_samples=10, sampler="ddim", steps=2, cfg_scale=1.5, seed=0, batch_size=3, progress=False)
    want, labels, _ = evaluate.generate_samples(model, **args)

    keep = tmp_path / "batches"
    real, calls = sampling.sample, []

    def dies_after_two_batches(*a, **k):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user pressed Ctrl-C in the third batch
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(sampling, "sample", dies_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        evaluate.generate_samples(model, **args, keep_dir=keep)
    assert sorted(f.name for f in keep.iterdir()) == ["batch_000000.npz", "batch_000001.npz"]

    calls.clear()
    monkeypatch.setattr(sampling, "sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    got, _, _ = evaluate.generate_samples(model, **args, keep_dir=keep)
    assert len(calls) == 2  # batches 2 and 3 of 4; 0 and 1 were read back
    assert np.array_equal(got, want)
    settings = dict(num_samples=10, steps=2, cfg_scale=1.5, seed=0, batch_size=3)
    key = evaluate.batches_dir(default_model_path(), settings, cache_dir=tmp_path)
    assert key == evaluate.batches_dir(default_model_path(), dict(settings), cache_dir=tmp_path)
    assert key != evaluate.batches_dir(default_model_path(), {**settings, "steps": 3}, cache_dir=tmp_path)


def test_a_second_run_into_a_folder_in_use_is_refused_and_the_lock_dies_with_the_run(tmp_path):
    from dydit.errors import UserError
    from dydit.io.runs import hold_run_lock

    out = tmp_path / "run"
    out.mkdir()
    other = hold_run_lock(out)  # another run holds the folder
    with pytest.raises(UserError, match="in use by another dydit run"):
        train(TrainConfig(**_config(out)), model=tiny_dit(), progress=False)
    assert not (out / "checkpoint.pt").exists()  # nothing of the refused run was written
    other.close()  # that run ended (a killed process releases it the same way)
    train(TrainConfig(**_config(out)), model=tiny_dit(), progress=False)
    hold_run_lock(out).close()  # a finished run leaves the folder free
