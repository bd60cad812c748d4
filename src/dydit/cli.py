"""The `dydit` command."""
from __future__ import annotations

import logging
from dataclasses import fields
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="DyDiT++: dynamic Diffusion Transformers.")


@app.callback()
def _root():
    """DyDiT++: dynamic Diffusion Transformers that generate faster in wall-clock time."""


@app.command()
def train(
    model: str = typer.Option("DiT-FMNIST", help="architecture from the registry (see `dydit models`)"),
    out: str = typer.Option("runs/fmnist", help="output folder"),
    data: Optional[str] = typer.Option(None, help="Fashion-MNIST IDX folder (default: Debian's), or an ImageNet-layout image tree (root/class/*.png; VAE models cache latents in OUT)"),
    steps: int = typer.Option(3000, help="optimizer steps"),
    batch_size: int = typer.Option(128, help="global batch size"),
    lr: float = typer.Option(3e-4, help="AdamW learning rate"),
    warmup_steps: int = typer.Option(200, help="linear lr warm-up steps"),
    lr_schedule: str = typer.Option("constant", help="learning rate after any warm-up: constant, or cosine "
                                    "(decays to ~0 at the last step)"),
    ema_decay: float = typer.Option(0.999, help="EMA decay"),
    grad_clip: float = typer.Option(1.0, help="gradient-norm clip (0: off)"),
    bf16: bool = typer.Option(False, help="bf16 autocast"),
    seed: int = typer.Option(0, help="seed"),
    ckpt_every: int = typer.Option(500, help="checkpoint every N steps"),
    sample_every: int = typer.Option(500, help="EMA sample grid every N steps (0: off)"),
    resume: bool = typer.Option(False, help="continue from OUT/checkpoint.pt"),
    init: Optional[str] = typer.Option(None, help="start from this checkpoint's weights"),
    limit_data: Optional[int] = typer.Option(None, help="use only the first N images"),
    stop_after: Optional[int] = typer.Option(None, help="stop after N steps in this run"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
):
    """Train a static DiT or SiT (Fashion-MNIST by default); runs under torchrun for DDP."""
    args = dict(locals())
    from dydit.train import LR_SCHEDULES, TrainConfig, train as run_train

    if lr_schedule not in LR_SCHEDULES:
        raise typer.BadParameter(f"--lr-schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")

    _setup_logging()
    run_train(TrainConfig(**{f.name: args[f.name] for f in fields(TrainConfig) if f.name in args}))


@app.command()
def models():
    """List the architectures of the registry (the names --model and --model-name take)."""
    from dydit.models.registry import all_model_names

    names = all_model_names()  # every backbone's registry (DiT/SiT, Latte, ...)
    typer.echo(f"{'name':<14} {'depth':>5} {'width':>5} {'heads':>5} {'tokens':>6}  objective")
    for name in sorted(names):
        c = names[name]()
        typer.echo(f"{name:<14} {c.depth:>5} {c.hidden_size:>5} {c.num_heads:>5} {c.num_tokens:>6}  {c.objective}")


from dydit.cli_dynamic import register as _register_dynamic  # noqa: E402

_register_dynamic(app)


def _setup_logging():
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


# `dydit eval` and `dydit train-classifier` (benchmark B1 metrics) live in cli_eval.py.
from dydit.cli_eval import register as _register_eval  # noqa: E402

_register_eval(app)

# `dydit sample` (grids and ADM-style .npz samples) lives in cli_sample.py.
from dydit.cli_sample import register as _register_sample  # noqa: E402

_register_sample(app)


def main():
    app()


if __name__ == "__main__":
    main()
