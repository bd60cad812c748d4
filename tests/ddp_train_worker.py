"""A few steps of dydit.train.train on a tiny DiT; run by tests/test_train.py under torchrun or in-process."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from dydit.models.dit import build_model
from dydit.train import StaticTask, TrainConfig, dist_info, step_generator, train


def tiny_model(**overrides):
    torch.manual_seed(0)
    return build_model("DiT-FMNIST", hidden_size=32, depth=2, num_heads=4, **overrides)


class GlobalNoiseTask(StaticTask):
    """Draws t and noise for the whole global batch and keeps this rank's share.

    train() seeds each rank's generator separately, so per-sample noise depends on the world size;
    drawing it globally makes a 2-process run comparable with a 1-process run sample for sample.
    """

    def __init__(self, model, global_batch: int, seed: int):
        super().__init__(model)
        self.global_batch, self.seed, self.losses = global_batch, seed, []

    def loss(self, model, x, y, step, gen):
        rank, _ = dist_info()
        g = torch.Generator().manual_seed(step_generator(self.seed, step, 0))
        t = self.process.sample_t(self.global_batch, x.device, generator=g)
        noise = torch.randn((self.global_batch, *x.shape[1:]), generator=g)
        share = slice(rank * len(x), (rank + 1) * len(x))
        terms = self.process.training_losses(lambda xt, mt: model(xt, mt, y), x, t[share], noise[share].to(x.device))
        loss = terms["loss"].mean()
        self.losses.append(loss.item())
        return loss, {"loss": loss.item(), "mse": terms["mse"].mean().item()}


def run(out: str, steps: int, batch_size: int, **config) -> tuple[list[float], dict]:
    """Trains (``config``: more TrainConfig fields); returns (per-step loss averaged over ranks, final model state)."""
    # No label dropout: it draws from the global RNG, which train() seeds per rank.
    model = tiny_model(class_dropout_prob=0.0)
    cfg = TrainConfig(**{**dict(out=out, steps=steps, batch_size=batch_size, limit_data=256, log_every=1,
                                ckpt_every=steps, sample_every=0, warmup_steps=0, threads=1, seed=0), **config})
    task = GlobalNoiseTask(model, batch_size, cfg.seed)
    train(cfg, model=model, task=task, progress=False)
    losses = torch.tensor(task.losses, dtype=torch.float64)
    rank, world = dist_info()
    if world > 1:
        dist.all_reduce(losses)
        losses /= world
    return losses.tolist(), {k: v.detach().clone() for k, v in model.state_dict().items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    losses, state = run(args.out, args.steps, args.batch_size)
    rank, _ = dist_info()
    torch.save(state, Path(args.out) / f"rank{rank}_model.pt")
    if rank == 0:
        (Path(args.out) / "losses.json").write_text(json.dumps(losses))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
