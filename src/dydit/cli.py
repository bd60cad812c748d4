"""The `dydit` command."""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import fields
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="DyDiT++: dynamic Diffusion Transformers.")


_DEBUG = {"on": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="show the full traceback of any error (also: "
                                     "DYDIT_DEBUG=1)")):
    """DyDiT++: dynamic Diffusion Transformers that generate faster in wall-clock time."""
    _DEBUG["on"] = debug or os.environ.get("DYDIT_DEBUG", "") not in ("", "0")


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
    resume: bool = typer.Option(False, help="continue from OUT/checkpoint.pt (refused if settings that define "
                                "the trajectory differ from the run's)"),
    resume_with_changes: bool = typer.Option(False, help="with --resume: continue even though such settings "
                                             "changed (deliberately)"),
    init: Optional[str] = typer.Option(None, help="start from this checkpoint's weights"),
    limit_data: Optional[int] = typer.Option(None, help="use only the first N images"),
    stop_after: Optional[int] = typer.Option(None, help="stop after N steps in this run, at a checkpoint "
                                             "(SIGINT/SIGTERM also stop at one)"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
    parallel: str = typer.Option("ddp", help="under torchrun: ddp (replicas), or fsdp (FSDP2: weights, gradients "
                                 "and optimizer sharded; checkpoint.dcp/)"),
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


# ---------------------------------------------------------------------------------------------
# one error path: a user's mistake is one line on stderr and a non-zero exit; a bug keeps its traceback
# ---------------------------------------------------------------------------------------------


def _exit_code_of(error: BaseException) -> int | None:
    """The exit status for an error that is the user's to fix; None for a bug (the traceback is shown)."""
    import errno

    from dydit.errors import DISK_FULL, NOT_WRITABLE, DyditError

    if isinstance(error, DyditError):
        return error.exit_code
    if isinstance(error, typer.BadParameter):
        return 2
    if isinstance(error, KeyboardInterrupt):
        return 130
    if isinstance(error, OSError):
        return 1 if isinstance(error, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)) \
            or error.errno in DISK_FULL + NOT_WRITABLE + (errno.ENOTDIR,) else None
    if isinstance(error, (ValueError, FloatingPointError)):
        return 1
    return None


def _message_of(error: BaseException) -> str:
    from dydit.errors import DISK_FULL, NOT_WRITABLE, DyditError, one_line, write_error

    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    if isinstance(error, typer.BadParameter):
        return one_line(error.format_message().removeprefix("Invalid value: "))
    if isinstance(error, OSError) and error.errno in DISK_FULL + NOT_WRITABLE and error.filename:
        return one_line(write_error(error, error.filename))
    text = one_line(error)
    if not isinstance(error, (DyditError, OSError)):  # a library ValueError: its message, and where to see more
        text += " (dydit --debug shows the traceback)"
    return text


def _guarded(command):
    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except BaseException as e:  # noqa: B036 - KeyboardInterrupt is a user's act too
            code = _exit_code_of(e)
            if code is None or _DEBUG["on"]:
                raise
            typer.echo(f"error: {_message_of(e)}", err=True)
            raise typer.Exit(code) from None

    return run


def _guard_commands(typer_app: typer.Typer):
    for command in typer_app.registered_commands:
        command.callback = _guarded(command.callback)
    for group in typer_app.registered_groups:
        _guard_commands(group.typer_instance)


_guard_commands(app)


def main():
    app()


if __name__ == "__main__":
    main()
