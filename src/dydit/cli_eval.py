"""`dydit eval` and `dydit train-classifier`: the B1 quality metrics and the classifier behind them."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import typer


def eval_command(
    checkpoint: Optional[str] = typer.Argument(None, help="model folder or training checkpoint (default: the embedded model)"),
    num_samples: int = typer.Option(5000, help="samples to generate (class-balanced)"),
    sampler: Optional[str] = typer.Option(None, help="ddim/ddpm (diffusion) or euler (flow); default ddim or euler"),
    steps: int = typer.Option(25, help="sampling steps"),
    cfg_scale: float = typer.Option(1.5, help="classifier-free guidance scale (1: off); 1.5 as in `dydit "
                                    "sample` (the DiT paper's FID setting); the shipped results use 4.0"),
    seed: int = typer.Option(0, help="seed of the initial noise"),
    batch_size: int = typer.Option(250, help="sampling batch size"),
    json_out: Optional[str] = typer.Option(None, "--json", help="also write the results to this JSON file"),
    npz: Optional[str] = typer.Option(None, help="score these samples (arr_0 images, or videos (N, F, H, W, C), "
                                      "arr_1 labels) instead of sampling"),
    save_npz: Optional[str] = typer.Option(None, help="also write the generated samples here (uint8 RGB arr_0, "
                                           "labels arr_1): videos for your own FVD, which needs I3D weights that "
                                           "dydit cannot fetch offline"),
    data: Optional[str] = typer.Option(None, help="folder with the Fashion-MNIST IDX files"),
    cache_dir: Optional[str] = typer.Option(None, help="where reference statistics are cached (default ~/.cache/dydit)"),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when available)"),
    model_name: Optional[str] = typer.Option(None, help="registry name (e.g. DiT-XL/2) for official .pt files, "
                                             "which do not record their head count"),
    objective: Optional[str] = typer.Option(None, help="diffusion or flow, for official .pt files (SiT: flow)"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
    fbcache: Optional[float] = typer.Option(None, help="First-Block-Cache threshold (e.g. 0.1): the "
                                            "training-free caching baseline, on a static or dynamic model"),
    adapters: Optional[str] = typer.Option(None, help="TD-LoRA / LoRA adapter folder (from `dydit finetune "
                                           "--peft`) to apply to CHECKPOINT, its base; merged per timestep"),
    resume: bool = typer.Option(True, help="keep each finished sample batch (in the cache folder, keyed by the "
                                "weights and every setting) so that an interrupted eval resumes where it stopped; "
                                "removed once the eval completes"),
):
    """FID (FMNIST classifier) against the 10k test images and conditional accuracy (benchmark B1); on a video
    model (Latte), per-frame FID and accuracy on item crops, frame consistency, motion error and s/video (B4)."""
    import torch

    from dydit import evaluate

    from dydit.errors import check_count, check_device, check_finite, check_output_file

    for option, value in (("--num-samples", num_samples), ("--steps", steps), ("--batch-size", batch_size),
                          ("--threads", threads)):
        check_count(option, value)
    check_finite("--cfg-scale", cfg_scale)
    check_finite("--fbcache", fbcache, minimum=0.0)
    check_device(device)
    if json_out:
        check_output_file(json_out, "--json", (".json",))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if threads:
        torch.set_num_threads(threads)
    try:
        if npz is not None:
            images, labels = evaluate.load_npz_samples(npz)
            if images.ndim == 5:  # videos (N, F, H, W, C)
                from dydit.video_metrics import evaluate_videos

                result = evaluate_videos(images, labels, data=data, cache_dir=cache_dir)
            else:
                result = evaluate.evaluate_images(images, labels, data=data, cache_dir=cache_dir)
            result["source"] = str(npz)
        else:
            from dydit.assets import default_model_path

            path = checkpoint or default_model_path()
            keep = None
            if resume and Path(path).exists():
                keep = evaluate.batches_dir(path, dict(num_samples=num_samples, sampler=sampler, steps=steps,
                                                       cfg_scale=cfg_scale, seed=seed, batch_size=batch_size,
                                                       fbcache=fbcache, model_name=model_name, objective=objective),
                                            adapters=adapters, cache_dir=cache_dir)
            result = evaluate.evaluate_checkpoint(
                path, num_samples=num_samples, sampler=sampler, steps=steps,
                cfg_scale=cfg_scale, seed=seed, batch_size=batch_size, fbcache=fbcache, adapters=adapters,
                model_name=model_name, objective=objective, data=data, cache_dir=cache_dir, device=device,
                save_npz=save_npz, keep_dir=keep)
            if keep is not None:
                import shutil

                shutil.rmtree(keep, ignore_errors=True)
    except (FileNotFoundError, ValueError) as e:
        from dydit.errors import one_line

        typer.echo(f"error: {one_line(e)}", err=True)
        raise typer.Exit(1)
    _print_table(result)
    if json_out:
        from dydit.io.atomic import atomic_write_text

        atomic_write_text(json.dumps(result, indent=2) + "\n", json_out)


def _print_table(result: dict):
    from rich.console import Console
    from rich.table import Table

    from dydit.evaluate import FID_NAME
    from dydit.video_metrics import VIDEO_FID_NAME

    table = Table(title="dydit eval")
    table.add_column("metric")
    table.add_column("value", justify="right")
    names = {"fid": FID_NAME, "cond_acc": "conditional accuracy", "s_per_image": "s / image",
             "frame_fid": VIDEO_FID_NAME, "frame_acc": "per-frame class accuracy",
             "consistency": "frame consistency (one class in every frame)",
             "motion_error_px": "motion error (px, vs constant-velocity bouncing)", "s_per_video": "s / video"}
    for key, value in result.items():
        if value is None:
            continue
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        table.add_row(names.get(key, key), text)
    Console().print(table)


def train_classifier_command(
    out: str = typer.Option("runs/fmnist_classifier", help="output folder (config.json + model.safetensors)"),
    epochs: int = typer.Option(6, help="training epochs over the 60k images"),
    batch_size: int = typer.Option(128, help="batch size"),
    lr: float = typer.Option(2e-3, help="peak AdamW learning rate (one-cycle schedule)"),
    seed: int = typer.Option(0, help="seed"),
    data: Optional[str] = typer.Option(None, help="folder with the Fashion-MNIST IDX files"),
    threads: Optional[int] = typer.Option(1, help="torch CPU threads (the shipped classifier used 1)"),
):
    """Train the Fashion-MNIST classifier that defines FID (FMNIST classifier); the shipped one used the defaults."""
    import torch

    from dydit.classifier import save_classifier, train_classifier
    from dydit.errors import check_count, check_writable_folder

    for option, value in (("--epochs", epochs), ("--batch-size", batch_size), ("--threads", threads)):
        check_count(option, value)
    check_writable_folder(out)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if threads:
        torch.set_num_threads(threads)
    model, metrics = train_classifier(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, data=data)
    metrics["command"] = (f"dydit train-classifier --out {out} --epochs {epochs} --batch-size {batch_size} "
                          f"--lr {lr} --seed {seed} --threads {threads}")
    save_classifier(model, out, extra=metrics)
    typer.echo(f"test accuracy {metrics['test_accuracy']:.4f}; saved to {out}")


def register(app: typer.Typer):
    """Adds `eval` and `train-classifier` to the `dydit` app."""
    app.command("eval")(eval_command)
    app.command("train-classifier")(train_classifier_command)
