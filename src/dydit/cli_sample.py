"""`dydit sample`: class-conditional images from any supported checkpoint, as a grid and/or an .npz."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer


def _parse_classes(text: str) -> list[int]:
    try:
        classes = [int(c) for c in text.replace(" ", "").split(",") if c != ""]
    except ValueError:
        raise typer.BadParameter(f"--classes must be comma-separated class ids such as 0,1,2; got {text!r}") from None
    if not classes:
        raise typer.BadParameter("--classes is empty")
    return classes


def _default_checkpoint() -> Path:
    try:
        from dydit.assets import default_model_path
    except ImportError as e:
        raise FileNotFoundError(f"no checkpoint given and this dydit has no embedded model ({e})") from None
    return default_model_path()


def _resolve_vae(vae: str, checkpoint: Path) -> Path:
    """A relative VAE path is looked up beside the checkpoint first, then from the working directory."""
    path = Path(vae)
    if not path.is_absolute():
        beside = (checkpoint if checkpoint.is_dir() else checkpoint.parent) / path
        if beside.exists():
            return beside
    return path


def _grid_columns(num_classes_shown: int, num_images: int) -> int:
    # one column per class when that reads well; otherwise a near-square mosaic
    return num_classes_shown if num_classes_shown <= 16 else max(1, math.ceil(math.sqrt(num_images)))


def _sample_captions(model, path, prompts, per_prompt, steps, cfg_scale, seed, batch_size, out, engine):
    """`dydit sample` on a text-to-image model: its captions (given, or a balanced set), one image per caption
    and sample, in a grid with each caption under its image."""
    import difflib

    import torch

    from dydit.data.captioned_fmnist import CAPTIONS, balanced_caption_ids
    from dydit.t2i import sample_captions, save_captioned_grid

    if prompts:
        index = {c: i for i, c in enumerate(CAPTIONS)}
        ids = []
        for text in prompts:
            if text not in index:
                close = difflib.get_close_matches(text, CAPTIONS, n=1, cutoff=0.0)
                raise ValueError(f"--prompt {text!r} is not one of the model's {len(CAPTIONS)} captions (their "
                                 f"embeddings ship with dydit; a new prompt needs the text encoder); closest: "
                                 f"{close[0]!r}")
            ids.append(index[text])
        ids = torch.tensor(ids).repeat_interleave(per_prompt or 1)
    else:
        ids = balanced_caption_ids(16 * (per_prompt or 1), seed=seed)
    dyn = None
    if engine is not None:
        from dydit.dynamic import DynamicContext

        dyn = DynamicContext(engine)
    num_steps = steps or 25
    x = sample_captions(model, ids, steps=num_steps, cfg_scale=cfg_scale, seed=seed, dyn=dyn, batch_size=batch_size)
    if out:
        grid = save_captioned_grid(x, [CAPTIONS[int(i)] for i in ids], out)
        typer.echo(f"wrote a grid of {len(ids)} images, each caption under its image (euler {num_steps} steps, "
                   f"CFG {cfg_scale}), to {grid}")


def sample_command(
    checkpoint: Optional[str] = typer.Argument(None, help="model folder or checkpoint (default: the embedded model)"),
    classes: Optional[str] = typer.Option(None, help="comma-separated class ids, e.g. 0,1,2 (default: every class)"),
    num_per_class: Optional[int] = typer.Option(None, help="images per class (default: 1 with --classes, else 4)"),
    sampler: Optional[str] = typer.Option(
        None, help="diffusion: ddpm, ddim, dpm++2m; flow: euler, heun, em (default: ddim or euler)"),
    steps: Optional[int] = typer.Option(None, help="sampling steps (default: 250 for ddpm, 25 otherwise)"),
    cfg_scale: float = typer.Option(1.5, help="classifier-free guidance scale (1: off). 1.5 is the DiT paper's "
                                    "FID setting (sample, eval); demo, bench and calibration use 4.0, the scale the "
                                    "Fashion-MNIST models are tuned and benchmarked at"),
    guide_all_channels: bool = typer.Option(
        False, help="guide every predicted channel instead of DiT's first three (flow models always guide all)"),
    seed: int = typer.Option(0, help="seed of the noise"),
    batch_size: int = typer.Option(64, help="images per sampling batch"),
    out: Optional[str] = typer.Option("samples.png", help="grid image to write ('' to skip)"),
    npz: Optional[str] = typer.Option(None, help="also write uint8 images (arr_0, N×H×W×3) and labels (arr_1)"),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when available)"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
    model_name: Optional[str] = typer.Option(None, help="registry name (e.g. DiT-XL/2) for official .pt files, "
                                             "which do not record their head count"),
    objective: Optional[str] = typer.Option(None, help="diffusion or flow, for official .pt files (SiT: flow)"),
    engine: str = typer.Option("fast", help="DyDiT checkpoints: fast (the inference engine), masked (the "
                               "masked reference), complete (routers off: the full-width model)"),
    fbcache: Optional[float] = typer.Option(None, help="First-Block-Cache threshold (e.g. 0.1): reuse the "
                                            "other blocks' output while the first block's changes stay below it"),
    compile_: bool = typer.Option(False, "--compile", help="run the blocks under torch.compile (the fast engine's "
                                  "blocks, or the static ones): each block layout compiles on first use"),
    prompt: Optional[list[str]] = typer.Option(
        None, help="text-to-image models: a caption to draw (repeatable; one of the model's captions, whose "
        "embeddings ship with dydit: Captioned Fashion-MNIST). Without it: a balanced set of captions"),
    num_samples: Optional[int] = typer.Option(
        None, help="write exactly this many class-balanced samples (labels cycle through --classes) to --npz, in "
        "shards of --batch-size: under torchrun the processes share the work, the result does not depend on their "
        "number, and a rerun resumes from the finished shards in NPZ.parts/"),
):
    """Sample class-conditional images; write a grid PNG and optionally an ADM-style .npz."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    import dydit
    from dydit.sampling import default_sampler, sample
    from dydit.viz import make_grid, to_uint8_images

    if batch_size < 1:
        raise typer.BadParameter("--batch-size must be >= 1")
    if num_per_class is not None and num_per_class < 1:
        raise typer.BadParameter("--num-per-class must be >= 1")
    if steps is not None and steps < 1:
        raise typer.BadParameter(f"--steps must be >= 1, got {steps}")
    if compile_ and fbcache is not None:
        raise typer.BadParameter("--compile and --fbcache do not combine (the cache hooks the blocks the compiled "
                                 "run replaces); choose one")
    if not math.isfinite(cfg_scale):
        raise typer.BadParameter(f"--cfg-scale must be a finite number, got {cfg_scale}")
    if out and Path(out).suffix.lower() not in (".png", ".jpg", ".jpeg", ".gif"):
        raise typer.BadParameter(f"--out {out}: the grid is written as an image; give a .png or .jpg path "
                                 "(.gif for video models; '' to skip the grid)")
    from dydit.errors import check_count, check_device, check_output_file

    check_count("--threads", threads)
    check_device(device)
    if out:
        check_output_file(out, "--out")
    if npz:
        check_output_file(npz, "--npz")
    if threads:
        torch.set_num_threads(threads)
    if num_samples is not None:
        if num_samples < 1 or not npz or num_per_class is not None:
            raise typer.BadParameter("--num-samples needs a count >= 1 and --npz (where the samples go), and "
                                     "replaces --num-per-class")
        from dydit.sample_shards import init_processes

        rank, world = init_processes()
    try:
        path = Path(checkpoint) if checkpoint else _default_checkpoint()
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = dydit.load(path, model_name=model_name, objective=objective).to(dev).eval()
        from dydit.t2i import is_text_to_image

        if is_text_to_image(model):  # captions, not class ids: a grid with each caption under its image
            if num_samples is not None or npz or classes:
                raise ValueError(f"{path} is a text-to-image model: it takes --prompt (or nothing), not --classes, "
                                 "--num-samples or --npz; score it with `dydit eval`")
            _sample_captions(model, path, prompt, num_per_class, steps, cfg_scale, seed, batch_size, out,
                             engine if getattr(model, "dynamic_config", None) is not None else None)
            return
        if prompt:
            raise ValueError(f"--prompt is for text-to-image models; {path} is class-conditional (use --classes)")
        cfg = model.config
        shown = _parse_classes(classes) if classes else list(range(cfg.num_classes))
        bad = [c for c in shown if not 0 <= c < cfg.num_classes]
        if bad:
            raise typer.BadParameter(f"class ids {bad} are outside [0, {cfg.num_classes})")
        per_class = num_per_class or (1 if classes else 4)
        video = getattr(cfg, "num_frames", None) is not None
        if video:  # one row per class: an animated GIF grid
            labels = torch.tensor(shown).repeat_interleave(per_class)
        else:
            labels = torch.tensor(shown).repeat(per_class)  # row r holds the r-th image of every class
        method = sampler or default_sampler(model)
        num_steps = steps or (250 if method == "ddpm" else 25)
        vae = None
        if cfg.vae:
            from dydit.vae import load_vae

            vae = load_vae(_resolve_vae(cfg.vae, path), device=dev)
        guided = None if guide_all_channels else 3
        dyn = None
        if getattr(model, "dynamic_config", None) is not None:
            from dydit.dynamic import DynamicContext

            dyn = DynamicContext(engine)
        cache = None
        if fbcache is not None:
            from dydit.cache import FirstBlockCache, cached

            cache = FirstBlockCache(rdt=fbcache, num_steps=num_steps)
        image_channels = 3 if vae is not None else cfg.in_channels
        if image_channels not in (1, 3):
            raise ValueError(f"{path}: a pixel-space model with {image_channels} channels and no VAE in its "
                             "config cannot be written as images (expected 1 or 3 channels)")

        batches = range(0, len(labels), batch_size)
        bar = tqdm(total=len(batches) * num_steps, desc=f"sampling ({method}, {num_steps} steps)", unit="step",
                   dynamic_ncols=True, disable=num_samples is not None and rank != 0)

        def progress(step_iter):
            for s in step_iter:
                yield s
                bar.update(1)

        def draw(batch_labels, batch_seed):  # one sampling batch -> uint8 (B, H, W, C)
            kwargs = dict(method=method, num_steps=num_steps, cfg_scale=cfg_scale, guided_channels=guided,
                          seed=batch_seed, progress=progress, dyn=dyn, compile=compile_)
            if cache is not None:
                cache.start()  # a new sampling run: nothing carries over from the last batch
                with cached(model, cache):
                    x = sample(model, batch_labels, **kwargs)
            else:
                x = sample(model, batch_labels, **kwargs)
            if vae is not None:
                x = vae.decode(x)
            if video:  # (B, F, C, H, W) -> uint8 (B, F, H, W, C)
                frames = to_uint8_images(x.flatten(0, 1), pad=cfg.pixel_pad)
                return frames.reshape(x.shape[0], x.shape[1], *frames.shape[1:])
            return to_uint8_images(x, pad=cfg.pixel_pad)  # (B, H, W, C)

        if num_samples is not None:  # sharded over torchrun processes, resumable (dydit.sample_shards)
            from dydit.sample_shards import run_sample_command

            if video:
                raise ValueError("--num-samples writes images in the ADM layout; video models sample with "
                                 "--num-per-class")
            settings = dict(sampler=method, steps=num_steps, cfg_scale=cfg_scale,
                            guided_channels=guided, engine=engine, fbcache=fbcache, vae=cfg.vae)
            bar.reset(total=math.ceil(math.ceil(num_samples / batch_size) / world) * num_steps)  # this process's share
            run_sample_command(model, npz, num_samples, batch_size, shown, seed, draw, settings, out,
                               _grid_columns(len(shown), 4 * len(shown)), typer.echo)
            bar.close()
            return
        images = []
        for b, i in enumerate(batches):
            images.append(draw(labels[i : i + batch_size], seed * 100_003 + b))
        bar.close()
    except (FileNotFoundError, ValueError) as e:
        from dydit.errors import one_line

        typer.echo(f"error: {one_line(e)}", err=True)
        raise typer.Exit(1)

    images = np.concatenate(images)  # (N, H, W, 1 or 3) uint8; videos (N, F, H, W, 1 or 3)
    if out and video:
        from dydit.viz import save_gif, video_grid_frames

        out_path = save_gif(video_grid_frames(images, per_class, scale=3 if images.shape[2] < 64 else 1),
                            Path(out).with_suffix(".gif"))
        typer.echo(f"wrote an animated grid of {len(images)} videos ({images.shape[1]} frames, one row per class) "
                   f"to {out_path}")
    elif out:
        from PIL import Image

        grid = make_grid(images, _grid_columns(len(shown), len(images)), scale=3 if images.shape[1] < 64 else 1)
        out_path = Path(out)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(out_path)
        typer.echo(f"wrote a grid of {len(images)} images to {out_path}")
    if npz:
        rgb = np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images  # the ADM suite wants RGB
        npz_path = Path(npz)
        npz_path.parent.mkdir(parents=True, exist_ok=True)
        with open(npz_path, "wb") as f:  # a file object keeps the name as given (np.savez would append .npz)
            np.savez(f, arr_0=rgb, arr_1=labels.numpy())
        typer.echo(f"wrote {len(rgb)} samples (uint8 {'x'.join(map(str, rgb.shape))}) and their labels to {npz_path}")


def register(app: typer.Typer):
    app.command("sample")(sample_command)
