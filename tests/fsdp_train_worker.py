"""FSDP runs for tests/test_distributed.py, under torchrun: the static loop (compared with one process by
the test), a DyDiT fine-tune under DDP and under FSDP, and both stopped after 2 steps and resumed."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ddp_train_worker  # noqa: E402

import dydit.train  # noqa: E402
from dydit.fsdp import full_tensor  # noqa: E402
from dydit.train import dist_info  # noqa: E402

STATIC = dict(steps=4, batch_size=16)
FINETUNE_SETS = ["optim.steps=4", "optim.batch_size=16", "flops.ramp_steps=1", "warmup.steps=2",
                 "feedback.every=2", "feedback.images=10", "feedback.steps=2", "calibration.enabled=false"]


def _log_every_step():
    """finetune() keeps TrainConfig's log_every; the tests compare every step."""
    real = dydit.train.train

    def train(cfg, **kwargs):
        cfg.log_every = 1
        return real(cfg, **kwargs)

    dydit.train.train = train


def static_runs(out: Path):
    losses, state = ddp_train_worker.run(str(out / "static"), **STATIC, parallel="fsdp")
    full = {k: full_tensor(v) for k, v in state.items()}  # every rank gathers
    ddp_train_worker.run(str(out / "static_resumed"), **STATIC, parallel="fsdp", stop_after=2, ckpt_every=2)
    dist.barrier()
    ddp_train_worker.run(str(out / "static_resumed"), **STATIC, parallel="fsdp", resume=True, ckpt_every=2)
    if dist_info()[0] == 0:
        torch.save(full, out / "static_model.pt")
        (out / "static_losses.json").write_text(json.dumps(losses))


def finetune_runs(out: Path, init: str):
    from dydit.dynamic.finetune import finetune
    from dydit.dynamic.recipe import get_recipe

    recipe = get_recipe("default").with_sets(FINETUNE_SETS)
    common = dict(ckpt_every=2, limit_data=256, threads=1, progress=False)
    for parallel in ("ddp", "fsdp"):
        finetune(init, out / f"ft_{parallel}", recipe, parallel=parallel, **common)
        finetune(init, out / f"ft_{parallel}_resumed", recipe, parallel=parallel, stop_after=2, **common)
        # Under DDP only rank 0 writes the checkpoint, and the other ranks leave train() without waiting for
        # it: in one process (not so under torchrun, which starts the resume as a new launch) they must wait.
        dist.barrier()
        finetune(init, out / f"ft_{parallel}_resumed", recipe, parallel=parallel, resume=True, **common)
        dist.barrier()


def sharded_inference(out: Path):
    """A sharded DyDiT runs its masked forward as the full model does; the fast engine refuses it."""
    import copy

    from helpers import randomize, scramble_routers

    from dydit.dynamic import DynamicContext
    from dydit.dynamic.convert import dynamize
    from dydit.fsdp import shard_model
    from dydit.sampling import sample

    full = scramble_routers(randomize(dynamize(ddp_train_worker.tiny_model())))
    sharded = shard_model(copy.deepcopy(full))
    labels = torch.arange(6)
    # no guidance: forward_with_cfg calls forward() directly, past FSDP's hooks
    a = sample(full, labels, "ddim", 3, seed=3, dyn=DynamicContext("masked"))
    b = sample(sharded, labels, "ddim", 3, seed=3, dyn=DynamicContext("masked"))
    try:
        sample(sharded, labels, "ddim", 3, seed=3, dyn=DynamicContext("fast"))
        refused = None
    except ValueError as e:
        refused = str(e)
    if dist_info()[0] == 0:
        (out / "sharded_inference.json").write_text(json.dumps({"max_diff": (a - b).abs().max().item(),
                                                                "fast_refused": refused}))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--init", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    _log_every_step()
    static_runs(out)
    sharded_inference(out)
    finetune_runs(out, args.init)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
