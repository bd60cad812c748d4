"""CLI commands of the DyDiT machinery: finetune, recipes, calibrate, plan report, demo, bench."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def _recipe_help(key: str, extra: str = "") -> str:
    from dydit.dynamic.recipe import Recipe

    return f"{Recipe.help(key)} (recipe key {key}{extra})"


def finetune(
    init: str = typer.Argument(..., help="static checkpoint to make dynamic (any format dydit.load reads)"),
    out: str = typer.Option("runs/dydit", help="output folder"),
    recipe: Optional[str] = typer.Option(None, help="recipe name (dydit recipes lists them), recipe JSON file, or "
                                         "a model folder saved with one; default: the default recipe"),
    set_: Optional[list[str]] = typer.Option(None, "--set", metavar="KEY=VALUE", help="override one recipe field, key=value (dotted: "
                                             "flops.weight=2, feedback.every=0, routing.tokens=false); repeatable; "
                                             "dydit recipes --keys lists every key"),
    show_recipe: bool = typer.Option(False, help="print the resolved recipe as JSON and exit (start a recipe file "
                                     "from it)"),
    target: Optional[float] = typer.Option(None, help=_recipe_help("target")),
    steps: Optional[int] = typer.Option(None, help=_recipe_help("optim.steps")),
    batch_size: Optional[int] = typer.Option(None, help=_recipe_help("optim.batch_size")),
    lr: Optional[float] = typer.Option(None, help=_recipe_help("optim.lr")),
    seed: Optional[int] = typer.Option(None, help=_recipe_help("optim.seed")),
    peft: Optional[str] = typer.Option(None, help=_recipe_help("peft.method")),
    data: Optional[str] = typer.Option(None, help="Fashion-MNIST IDX folder (default: Debian's; video models move its items: "
                                                     "Moving Fashion-MNIST) or an image tree"),
    resume: bool = typer.Option(False, help="continue from OUT/checkpoint.pt (refused if the recipe or data "
                                "differ from the run's)"),
    resume_with_changes: bool = typer.Option(False, help="with --resume: continue even though settings that "
                                             "define the trajectory changed (deliberately)"),
    stop_after: Optional[int] = typer.Option(None, help="stop after N steps in this run, at a checkpoint "
                                             "(SIGINT/SIGTERM also stop at one)"),
    ckpt_every: int = typer.Option(100, help="checkpoint every N steps"),
    sample_every: int = typer.Option(0, help="sample grid every N steps (0: off)"),
    limit_data: Optional[int] = typer.Option(None, help="use only the first N images"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
    bf16: bool = typer.Option(False, help="bf16 autocast"),
    parallel: str = typer.Option("ddp", help="under torchrun: ddp (replicas), or fsdp (FSDP2: weights, gradients "
                                 "and optimizer sharded; checkpoint.dcp/)"),
):
    """Fine-tune a static DiT/SiT/Latte into a DyDiT (DyLatte on video) under a FLOPs target (runs under torchrun for DDP).

    What it trains is a recipe: --recipe picks one, --set and the options that name a recipe key change single fields. The other options say where the data is and how this machine runs it.
    """
    import logging

    from dydit.dynamic.finetune import finetune as run_finetune
    from dydit.dynamic.recipe import resolve_recipe

    try:
        resolved = resolve_recipe(recipe, set_ or [], **{
            "target": target, "optim.steps": steps, "optim.batch_size": batch_size, "optim.lr": lr,
            "optim.seed": seed, "peft.method": peft})
    except ValueError as e:
        _fail(e)
    if show_recipe:
        typer.echo(resolved.to_json(), nl=False)
        return
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = run_finetune(init, out, resolved, data=data, resume=resume, stop_after=stop_after,
                              ckpt_every=ckpt_every, sample_every=sample_every, limit_data=limit_data,
                              threads=threads, bf16=bf16, resume_with_changes=resume_with_changes,
                              parallel=parallel)
    except ValueError as e:
        _fail(e)
    if result.calibration is not None:
        _report_calibration(result.calibration)
    if "calibration_skipped" in result.summary:
        typer.echo(f"calibration skipped: {result.summary['calibration_skipped']}", err=True)
    if not result.finished:
        from dydit.train import dist_info

        if dist_info()[0] == 0:  # the other DDP ranks never finish: rank 0 saves
            ckpt = "checkpoint.dcp" if parallel == "fsdp" else "checkpoint.pt"
            typer.echo(f"stopped before the last step; {out}/{ckpt} continues with --resume")
        return
    if resolved.peft.method != "none":
        typer.echo(f"adapters + routers: {result.weights} (apply to {init} with dydit.peft.load_adapters)")
    else:
        typer.echo(f"DyDiT EMA weights: {result.weights}")


def _fail(error):
    """One line on stderr and exit status 2 (a bad option), without a traceback."""
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(2)


def recipes(
    name: Optional[str] = typer.Argument(None, help="recipe name, recipe JSON file, or model folder to print"),
    set_: Optional[list[str]] = typer.Option(None, "--set", metavar="KEY=VALUE", help="override one field, key=value; repeatable"),
    keys: bool = typer.Option(False, help="list every recipe key with its type, default and help"),
):
    """List the named fine-tune recipes, or print one (resolved, as JSON) to start a recipe file from."""
    import typing

    from dydit.dynamic.recipe import RECIPES, Recipe, get_recipe

    if keys:
        default = Recipe()
        for key in Recipe.keys():
            tp = Recipe.field_type(key)
            kind = " | ".join(getattr(a, "__name__", str(a)) for a in typing.get_args(tp)) if typing.get_args(tp) \
                and typing.get_origin(tp) is not list else getattr(tp, "__name__", str(tp))
            typer.echo(f"{key} ({kind.replace('NoneType', 'None')}, default {json.dumps(default.get(key))}): "
                       f"{Recipe.help(key)}")
        return
    if name is None and not set_:
        width = max(map(len, RECIPES))
        for n, (description, _) in RECIPES.items():
            typer.echo(f"{n:<{width}}  {description}")
        typer.echo("\ndydit recipes NAME prints one as JSON; dydit finetune --recipe NAME|FILE --set key=value uses it")
        return
    try:
        typer.echo(get_recipe(name).with_sets(set_ or []).validate().to_json(), nl=False)
    except ValueError as e:
        _fail(e)


def _report_calibration(result):
    typer.echo(f"calibrated: realised FLOPs ratio {result.ratio_before:.3f} -> {result.ratio_after:.3f} "
               f"(λ={result.target}, {result.knob} thresholds shifted by {result.shift:+.3f}, "
               f"{result.sampler} {result.steps} steps, CFG {result.cfg_scale})")
    if abs(result.ratio_after - result.target) > 0.02:
        typer.echo(f"warning: the closest realisable ratio is {result.ratio_after:.3f}, not λ={result.target}: the "
                   f"routers switch many tokens at once (near-constant logits); fine-tune longer", err=True)


def calibrate(
    checkpoint: str = typer.Argument(..., help="a dynamic (DyDiT) checkpoint folder"),
    target: float = typer.Option(..., help="λ: the FLOPs ratio the model should realise at inference"),
    out: str = typer.Option(..., help="folder for the calibrated checkpoint (the input is left as it is)"),
    adapters: Optional[str] = typer.Option(None, help="TD-LoRA / LoRA adapter folder on CHECKPOINT; the "
                                           "calibrated adapters (routers included) are written to OUT"),
    sampler: Optional[str] = typer.Option(None, help="sampler you will run (its timesteps and trajectory "
                                          "matter; default ddim, or euler for flow models)"),
    steps: int = typer.Option(20, help="sampling steps"),
    cfg_scale: float = typer.Option(4.0, help="guidance scale you will sample with (4.0, as the shipped models "
                                    "were calibrated; sample and eval default to the DiT paper's 1.5)"),
    num_images: int = typer.Option(100, help="images sampled per measurement (class-balanced)"),
    tol: float = typer.Option(0.005, help="stop when |realised − λ| ≤ tol"),
    knob: Optional[str] = typer.Option(None, help="tokens or width (default: tokens when the model has them)"),
    seed: int = typer.Option(0, help="seed of the calibration noise"),
):
    """Shift a DyDiT's router thresholds so that it realises λ on your sampler (run by finetune already)."""
    import dydit
    from dydit.dynamic.calibrate import calibrate as run_calibration
    from dydit.errors import UserError, check_count, check_finite
    from dydit.sampling import SAMPLERS, default_sampler

    for option, value in (("--steps", steps), ("--num-images", num_images)):
        check_count(option, value, allow_none=False)
    check_finite("--cfg-scale", cfg_scale)
    check_finite("--target", target)
    check_finite("--tol", tol)
    if Path(out).resolve() == Path(checkpoint).resolve():
        raise typer.BadParameter("--out must differ from CHECKPOINT: the input is kept as it is")
    model = dydit.load(checkpoint)
    if sampler is not None and sampler not in SAMPLERS.get(model.config.objective, (sampler,)):
        raise UserError(f"--sampler {sampler!r} cannot sample {checkpoint}, a {model.config.objective} model; "
                        f"choose one of {', '.join(SAMPLERS[model.config.objective])}")
    factory = None
    if adapters:
        from dydit.peft.td_lora import load_adapters, read_adapter_config, save_adapters
        from dydit.peft import td_lora_fast_context as factory

        model = load_adapters(model, adapters)
    try:
        result = run_calibration(model, target, sampler or default_sampler(model), steps, cfg_scale, num_images,
                                 tol=tol, seed=seed, knob=knob, context_factory=factory, log=typer.echo)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    _report_calibration(result)
    if adapters:
        save_adapters(model, Path(out), base_reordered=read_adapter_config(adapters)["base_reordered"])
    else:
        dydit.save(model, Path(out), extra_config=_recipe_metadata(checkpoint))
    (Path(out) / "calibration.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    typer.echo(f"calibrated checkpoint: {out}")


def _recipe_metadata(checkpoint) -> dict:
    """The fine-tune recipe saved with a model folder, to keep in a copy of it (calibrated: same training)."""
    from dydit.io.native import is_native_folder, read_native_config

    if not is_native_folder(checkpoint):
        return {}
    cfg = read_native_config(checkpoint)
    return {"recipe": cfg["recipe"]} if "recipe" in cfg else {}


def _time_interleaved(runs: dict, repeats: int) -> dict:
    """Median wall-clock seconds of each named run ``fn()``, timed in interleaved rounds after one warm-up
    each (as B2 does: drifts in machine load hit every run alike; timing one model after the other
    favours whichever runs first)."""
    import statistics
    import time

    for fn in runs.values():
        fn()  # warm-up
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def demo(
    out: str = typer.Option("demo", help="folder for the grids and the summary"),
    steps: int = typer.Option(25, help="sampling steps (DDIM for the DiTs, Euler for the SiTs)"),
    cfg_scale: float = typer.Option(4.0, help="classifier-free guidance scale (4.0: the scale the shipped "
                                    "models are tuned and benchmarked at; sample and eval default to the DiT "
                                    "paper's 1.5)"),
    per_class: int = typer.Option(8, help="samples per class in each grid"),
    seed: int = typer.Option(0, help="seed (same noise for every model)"),
    repeats: int = typer.Option(3, help="timed repeats (median)"),
    video: Optional[list[str]] = typer.Option(None, help="video models instead: static=PATH and LAMBDA=PATH per "
                                              "DyLatte (repeatable); static and DyLatte side by side as animated "
                                              "GIFs (without it: the shipped video models, when there are any)"),
):
    """Sample the embedded Fashion-MNIST models: static vs DyDiT side by side (grids, GMACs, s/image); video
    models (Latte) static vs DyLatte as GIFs."""
    import torch
    from rich.console import Console
    from rich.table import Table

    import dydit
    from dydit.assets import ASSETS_DIR, default_model_path
    from dydit.dynamic import DynamicContext
    from dydit.dynamic.flops import flops_spec
    from dydit.dynamic.report import summarize
    from dydit.sampling import default_sampler, sample
    from dydit.errors import check_count, check_finite, check_writable_folder
    from dydit.viz import save_grid
    from tqdm.auto import tqdm

    for option, value in (("--steps", steps), ("--per-class", per_class), ("--repeats", repeats)):
        check_count(option, value, allow_none=False)
    check_finite("--cfg-scale", cfg_scale)
    console = Console()
    out_dir = Path(out)
    check_writable_folder(out_dir)
    if video:
        from dydit.bench_compare import parse_video_models

        try:
            video_models = parse_video_models(video)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
        return _video_demo(video_models, out_dir, steps, cfg_scale, per_class, seed, repeats, console)
    # (name, path, family, grid file): the DiT family, and the flow-matching SiT family when shipped; each
    # family's speedup is against its own static model, each samples with its own sampler (DDIM / Euler)
    models = [("static", default_model_path(), "DiT", "static")]
    for lam in ("0.7", "0.5"):
        p = ASSETS_DIR / f"fmnist_dydit_{lam}"
        if p.exists():
            models.append((f"DyDiT λ={lam}", p, "DiT", f"dydit_{lam}"))
    if (ASSETS_DIR / "fmnist_sit").exists():
        models.append(("SiT static", ASSETS_DIR / "fmnist_sit", "SiT", "sit_static"))
        if (ASSETS_DIR / "fmnist_dysit_0.5").exists():
            models.append(("DyDiT-SiT λ=0.5", ASSETS_DIR / "fmnist_dysit_0.5", "SiT", "dysit_0.5"))
    labels = torch.arange(10).repeat(per_class)
    cfg_batches = 2 if cfg_scale != 1.0 else 1
    table = Table(title=f"Fashion-MNIST, {steps} steps (DDIM for DiT, Euler for SiT), CFG {cfg_scale}, "
                        f"{len(labels)} images, {torch.get_num_threads()} CPU threads")
    for col in ("model", "sampler", "FLOPs ratio", "GMACs/forward", "GMACs/image", "s/image", "speedup", "grid"):
        table.add_column(col)
    summary = []
    # every model: a warm-up run, `repeats` timed runs and the run whose grid is kept
    with tqdm(total=len(models) * (repeats + 2) * steps, desc=f"sampling {len(models)} models, {repeats} timed "
              "rounds", unit="step", dynamic_ncols=True) as bar:
        loaded = {name: dydit.load(path) for name, path, _, _ in models}

        def progress(step_iter):
            for step in step_iter:
                yield step
                bar.update(1)

        def run(model):  # one full sampling run on the model's inference engine
            ctx = DynamicContext("fast", record_usage=True) if getattr(model, "dynamic_config", None) is not None else None
            return sample(model, labels, default_sampler(model), steps, cfg_scale=cfg_scale, seed=seed, dyn=ctx,
                          progress=progress), ctx

        seconds = _time_interleaved({name: (lambda m=m: run(m)) for name, m in loaded.items()}, repeats)
        base_time = {family: seconds[name] / len(labels) for name, _, family, _ in models
                     if name.endswith("static")}
        for name, _, family, stem in models:
            model = loaded[name]
            spec = flops_spec(model)
            x, dyn = run(model)
            s = summarize(dyn.usage if dyn is not None else None, spec, cfg_batches, forwards=steps)
            per_image = seconds[name] / len(labels)
            grid = save_grid(x, out_dir / f"{stem}.png", nrow=10, pad=model.config.pixel_pad)
            row = dict(model=name, family=family, sampler=default_sampler(model), flops_ratio=s["flops_ratio"],
                       gmacs_per_forward=s["gmacs_per_forward"], gmacs_per_image=s["gmacs_per_image"],
                       s_per_image=per_image, speedup=base_time[family] / per_image, grid=str(grid))
            summary.append(row)
            table.add_row(name, row["sampler"], f"{row['flops_ratio']:.3f}", f"{row['gmacs_per_forward']:.4f}",
                          f"{row['gmacs_per_image']:.3f}", f"{per_image * 1e3:.1f} ms", f"{row['speedup']:.2f}×", str(grid))
    console.print(table)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"grids written to [bold]{out_dir.resolve()}[/bold] (one row per class index 0-9, columns = samples)")
    shipped = {("static" if name == "mfmnist_latte" else name.rsplit("_", 1)[1]): ASSETS_DIR / name
               for name in ("mfmnist_latte", "mfmnist_dylatte_0.7", "mfmnist_dylatte_0.5") if (ASSETS_DIR / name).exists()}
    if "static" in shipped:  # one video per class and one timed round: a video costs ~64 images' compute
        console.print("[bold]Moving Fashion-MNIST video (shipped Latte and DyLatte)[/bold]: one video per class, one "
                      "timed round (--video static=... --video 0.5=... for more)")
        _video_demo(shipped, out_dir / "video", steps, cfg_scale, 1, seed, 1, console)


def _video_demo(models: dict, out_dir: Path, steps: int, cfg_scale: float, per_class: int, seed: int,
                repeats: int, console):
    """Static Latte and DyLatte side by side: one GIF grid per model and one with all of them, left to right
    (same noise and labels), with FLOPs ratio, GMACs and measured s/video."""
    import numpy as np
    import torch
    from rich.table import Table

    import dydit
    from dydit.dynamic import DynamicContext
    from dydit.dynamic.flops import flops_spec
    from dydit.dynamic.report import summarize
    from dydit.sampling import default_sampler, sample
    from dydit.viz import save_gif, to_uint8_images, video_grid_frames

    out_dir.mkdir(parents=True, exist_ok=True)
    names = {k: ("static" if k == "static" else f"DyLatte λ={k}") for k in models}
    loaded = {names[k]: dydit.load(p) for k, p in models.items()}
    if any(getattr(m.config, "num_frames", None) is None for m in loaded.values()):
        raise typer.BadParameter("--video takes video models (Latte); image models run without --video")
    n_cls = min(10, next(iter(loaded.values())).config.num_classes)
    labels = torch.arange(n_cls).repeat_interleave(per_class)  # one row per class

    def run(model):
        ctx = DynamicContext("fast", record_usage=True) if getattr(model, "dynamic_config", None) is not None else None
        return sample(model, labels, default_sampler(model), steps, cfg_scale=cfg_scale, seed=seed, dyn=ctx), ctx

    samplers = sorted({default_sampler(m).upper() if default_sampler(m) == "ddim" else default_sampler(m).capitalize()
                       for m in loaded.values()})
    seconds = _time_interleaved({name: (lambda m=m: run(m)) for name, m in loaded.items()}, repeats)
    first = next(iter(loaded))
    table = Table(title=f"Moving Fashion-MNIST videos, {'/'.join(samplers)} {steps} steps, CFG {cfg_scale}, {len(labels)} videos, "
                        f"{torch.get_num_threads()} CPU threads")
    for col in ("model", "FLOPs ratio", "GMACs/video", "s/video", "speedup", "GIF"):
        table.add_column(col)
    grids, summary = [], []
    for name, model in loaded.items():
        x, dyn = run(model)
        s = summarize(dyn.usage if dyn is not None else None, flops_spec(model), 2 if cfg_scale != 1.0 else 1,
                      forwards=steps)
        u8 = to_uint8_images(x.flatten(0, 1), pad=model.config.pixel_pad)
        frames = video_grid_frames(u8.reshape(x.shape[0], x.shape[1], *u8.shape[1:]), per_class, scale=3)
        gif = save_gif(frames, out_dir / f"{name.split()[0].lower()}{'_' + name.split('=')[1] if '=' in name else ''}.gif")
        grids.append(frames)
        per_video = seconds[name] / len(labels)
        row = dict(model=name, flops_ratio=s["flops_ratio"], gmacs_per_video=s["gmacs_per_image"],
                   s_per_video=per_video, speedup=seconds[first] / seconds[name], gif=str(gif))
        summary.append(row)
        table.add_row(name, f"{row['flops_ratio']:.3f}", f"{row['gmacs_per_video']:.3f}", f"{per_video:.3f}",
                      f"{row['speedup']:.2f}×", str(gif))
    first_grid = grids[0][0]
    spacer = np.full((first_grid.shape[0], 12, first_grid.shape[2]), 255, np.uint8)  # white between the models
    side = []
    for mosaics in zip(*grids):  # one GIF frame: every model's mosaic of that video frame, left to right
        parts = [mosaics[0]]
        for m in mosaics[1:]:
            parts += [spacer, m]
        side.append(np.concatenate(parts, axis=1))
    both = save_gif(side, out_dir / "side_by_side.gif")
    console.print(table)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"side by side ({', '.join(loaded)}, left to right; one row per class): [bold]{both}[/bold]")


def plan(
    checkpoint: str = typer.Argument(..., help="a dynamic (DyDiT) checkpoint"),
    out: str = typer.Option("plan", help="folder for plan.md and plan.png"),
    sampler: Optional[str] = typer.Option(None, help="sampler whose timesteps define the plan (default: ddim, or "
                                                    "euler for flow models)"),
    steps: int = typer.Option(25, help="sampling steps"),
    cfg_scale: float = typer.Option(4.0, help="guidance scale (4.0, as demo and bench; sample and eval default to "
                                    "the DiT paper's 1.5)"),
    num_images: int = typer.Option(20, help="images sampled to measure token shares"),
    seed: int = typer.Option(0, help="seed"),
    object_threshold: float = typer.Option(0.1, help="a patch of the final image is 'object' when its mean "
                                                     "intensity in [0, 1] is above this (spatial selectivity)"),
):
    """Report a DyDiT's inference plan: per-step active heads, groups, token share, GMACs (table, heat map,
    plan.json); with token routers also their spatial selectivity and token-keep maps over the images."""
    import torch

    import dydit
    from dydit.dynamic import DynamicContext
    from dydit.dynamic.flops import flops_spec
    from dydit.dynamic.report import plan_heatmap, plan_json, plan_table, summarize
    from dydit.dynamic.token_report import selectivity_table, token_keep_maps, token_selectivity
    from dydit.errors import UserError, check_count, check_finite
    from dydit.sampling import default_sampler, sample

    for option, value in (("--steps", steps), ("--num-images", num_images)):
        check_count(option, value, allow_none=False)
    check_finite("--cfg-scale", cfg_scale)
    check_finite("--object-threshold", object_threshold, minimum=0.0)
    if object_threshold >= 1.0:
        raise UserError(f"--object-threshold is a patch's mean intensity in [0, 1): {object_threshold} leaves no "
                        "object patch; try 0.1")
    model = dydit.load(checkpoint)
    if getattr(model, "dynamic_config", None) is None:
        raise typer.BadParameter(f"{checkpoint} is a static model; a plan report needs a DyDiT checkpoint")
    ctx = DynamicContext("fast", record_usage=True, record_tokens=True)
    labels = torch.arange(num_images) % model.config.num_classes
    sampler = sampler or default_sampler(model)
    images = sample(model, labels, sampler, steps, cfg_scale=cfg_scale, seed=seed, dyn=ctx)
    spec = flops_spec(model)
    s = summarize(ctx.usage, spec, 2 if cfg_scale != 1.0 else 1)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "plan.json").write_text(json.dumps(plan_json(ctx.usage, spec, s), indent=1))
    if ctx.token_masks and model.config.vae is None:  # token maps are drawn over pixel-space images
        patch, masks = model.config.patch_size, ctx.token_masks
        if images.ndim == 5:  # a video model: every frame is an image of the report (videos in order)
            from dydit.dynamic.token_report import frames_as_images

            images, masks = frames_as_images(images, masks, [b.kind for b in spec.blocks])
        sel = token_selectivity(masks, images, patch, threshold=object_threshold)
        (out_dir / "selectivity.json").write_text(json.dumps(sel, indent=1))
        (out_dir / "selectivity.md").write_text(selectivity_table(sel))
        token_keep_maps(masks, images, patch, out_dir / "token_maps.png")
    text = (f"# Inference plan of {checkpoint}\n\nsampler {sampler}, {steps} steps, CFG {cfg_scale}, "
            f"{num_images} images\n\nrealised FLOPs ratio {s['flops_ratio']:.3f}; GMACs per forward "
            f"{s['gmacs_per_forward']:.4f} (static {s['static_gmacs_per_forward']:.4f}); GMACs per image "
            f"{s['gmacs_per_image']:.3f} (static {s['static_gmacs_per_image']:.3f})\n\n" + plan_table(ctx.usage, spec))
    (out_dir / "plan.md").write_text(text)
    png = plan_heatmap(ctx.usage, spec, out_dir / "plan.png")
    typer.echo(text[: text.index("| step")])
    typer.echo(f"table: {out_dir / 'plan.md'}\nheat map: {png}\nper step and block: {out_dir / 'plan.json'}")
    if (out_dir / "selectivity.md").exists():
        typer.echo(f"token selectivity: {out_dir / 'selectivity.md'}\ntoken-keep maps: {out_dir / 'token_maps.png'}")


bench_app = typer.Typer(help="Benchmarks: B2 engine speed at paper scale, B3 quality against speed, B5 FLUX blocks.",
                        no_args_is_help=True)


@bench_app.command("engine")
def bench_engine_cmd(
    models: str = typer.Option("DiT-B/2,DiT-XL/2", help="comma-separated registry names"),
    targets: str = typer.Option("0.7,0.5,0.3", help="FLOPs ratios of the shaped plans"),
    schedules: str = typer.Option("50,250", help="schedule lengths the plans span"),
    batches: str = typer.Option("1,8", help="batch sizes"),
    timed_steps: int = typer.Option(10, help="evenly spaced schedule steps timed per run"),
    repeats: int = typer.Option(3, help="repeats (median)"),
    dtype: str = typer.Option("fp32", help="fp32 or bf16"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    out: str = typer.Option("docs/bench_engine", help="output prefix (.md and .json)"),
):
    """B2: static vs dynamic step time at paper scale with trained-like plans; speedup vs FLOPs-ideal."""
    import platform

    import torch
    from tqdm.auto import tqdm

    from dydit.bench import bench_engine, result_dicts, results_table
    from dydit.errors import UserError, check_count, check_device

    check_count("--timed-steps", timed_steps, allow_none=False)
    check_count("--repeats", repeats, allow_none=False)
    check_device(device)
    if dtype not in ("fp32", "bf16"):
        raise UserError(f"--dtype must be fp32 or bf16, got {dtype!r}")

    combos = [(m, float(t), int(s), int(b)) for m in models.split(",") for t in targets.split(",")
              for s in schedules.split(",") for b in batches.split(",")]
    results = []
    for m, t, s, b in tqdm(combos, desc="bench engine"):
        results.append(bench_engine(m, t, s, timed_steps, b, repeats, dtype, device))
        typer.echo(results_table(results[-1:]).splitlines()[-1])
    from datetime import date

    from dydit.evaluate import cpu_name

    machine = (torch.cuda.get_device_name() if device.startswith("cuda") else
               f"{cpu_name()} ({platform.machine()}), {torch.get_num_threads()} threads")
    md = (f"Machine: {machine}; torch {torch.__version__}; dtype {dtype}; {date.today().isoformat()}\n\n"
          + results_table(results))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".md").write_text(md)
    Path(out + ".json").write_text(json.dumps(result_dicts(results), indent=2))
    typer.echo(md)


@bench_app.command("flux")
def bench_flux_cmd(
    kinds: str = typer.Option("double,single", help="block kinds, comma-separated"),
    blocks: int = typer.Option(2, help="blocks of each kind"),
    heads: int = typer.Option(24, help="attention heads (FLUX.1: 24)"),
    head_dim: int = typer.Option(128, help="head width (FLUX.1: 128)"),
    image_tokens: int = typer.Option(4096, help="image tokens per sample (1024²: 4096)"),
    text_tokens: int = typer.Option(512, help="text tokens per sample (T5: 512)"),
    targets: str = typer.Option("0.5", help="FLOPs ratios of the shaped plans"),
    keep: float = typer.Option(0.7, help="share of image tokens each token router keeps"),
    batch: int = typer.Option(1, help="batch size"),
    repeats: int = typer.Option(3, help="repeats (median)"),
    dtype: str = typer.Option("bf16", help="fp32 or bf16"),
    device: str = typer.Option("cuda", help="cpu or cuda"),
    out: str = typer.Option("docs/bench_flux", help="output prefix (.md and .json)"),
):
    """B5 engine: random-weight FLUX double and single blocks at FLUX.1 width, static vs dynamic, per block kind."""
    from dydit.bench_flux import bench_flux_blocks, flux_result_dicts, flux_results_table

    results = []
    for kind in kinds.split(","):
        for t in targets.split(","):
            results.append(bench_flux_blocks(kind, blocks, heads, head_dim, image_tokens, text_tokens, float(t), keep,
                                             batch, repeats=repeats, dtype=dtype, device=device))
            typer.echo(flux_results_table(results[-1:]).splitlines()[-1])
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".md").write_text(flux_results_table(results))
    Path(out + ".json").write_text(json.dumps(flux_result_dicts(results), indent=2))
    typer.echo(flux_results_table(results))


@bench_app.command("compare")
def bench_compare_cmd(
    num_samples: int = typer.Option(5000, help="samples per row (class-balanced)"),
    sampler: Optional[str] = typer.Option(None, help="sampler of every row (default: each row's own, ddim for "
                                                    "diffusion models and euler for flow models)"),
    steps: int = typer.Option(25, help="sampling steps (rows may override)"),
    cfg_scale: float = typer.Option(4.0, help="classifier-free guidance scale (4.0: the shipped results' setting; "
                                    "sample and eval default to the DiT paper's 1.5)"),
    seed: int = typer.Option(0, help="seed of the noise (same for every row)"),
    batch_size: int = typer.Option(500, help="sampling batch size"),
    fbcache: float = typer.Option(0.1, help="First-Block-Cache threshold of the caching rows"),
    row: Optional[list[str]] = typer.Option(None, help="extra row name=path[,steps=N][,fbcache=R][,adapters=DIR] "
                                            "(ablations, pruning, fine-tuned static...); repeatable"),
    defaults: bool = typer.Option(True, help="include the rows the shipped models support"),
    video: Optional[list[str]] = typer.Option(None, help="video models instead (B4): static=PATH and LAMBDA=PATH "
                                              "per DyLatte (e.g. --video static=S --video 0.5=D); gives the video "
                                              "rows (static, DyLatte, fewer steps, FBCache, stacked) and metrics"),
    out: str = typer.Option("docs/results/b3_compare", help="output prefix (.md, .json, .png)"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
    resume: bool = typer.Option(False, help="keep the rows OUT.rows.jsonl already scored with the same "
                                "settings and weights; score only the others (timing always reruns)"),
    timing_repeats: int = typer.Option(3, help="interleaved timing rounds (median); 0: time the quality pass"),
):
    """B3: static vs DyDiT vs fewer steps vs caching (and any extra rows): FID, accuracy, GMACs, s/image; with
    --video the same for Latte/DyLatte on Moving Fashion-MNIST with the video metrics (B4)."""
    import logging

    import torch

    from dydit.bench_compare import default_rows, parse_row, parse_video_models, run_compare, video_rows

    from dydit.errors import check_count, check_finite

    for option, value in (("--num-samples", num_samples), ("--steps", steps), ("--batch-size", batch_size),
                          ("--threads", threads)):
        check_count(option, value)
    check_finite("--cfg-scale", cfg_scale)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if threads:
        torch.set_num_threads(threads)
    try:
        if video:  # the shipped image models' rows do not mix with video rows
            base = video_rows(parse_video_models(video), steps, fbcache)
        else:
            base = default_rows(steps, fbcache) if defaults else []
        rows = base + [parse_row(r) for r in row or []]
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if not rows:
        raise typer.BadParameter("no rows: keep --defaults or pass --row")
    try:
        table = run_compare(rows, num_samples, sampler, steps, cfg_scale, seed, batch_size, out, resume=resume,
                            timing_repeats=timing_repeats)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    typer.echo(table)


def register(app: typer.Typer):
    app.command()(finetune)
    app.command()(recipes)
    app.command()(calibrate)
    app.command()(demo)
    app.command()(plan)
    app.add_typer(bench_app, name="bench")
