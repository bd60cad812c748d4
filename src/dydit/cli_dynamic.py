"""CLI commands of the DyDiT machinery: finetune, plan report, demo."""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Optional

import typer

from dydit.peft.td_lora.config import DEFAULT_TARGETS, TDLoRAConfig

_PEFT = ("none", "lora", "td-lora")


def finetune(
    init: str = typer.Argument(..., help="static checkpoint to make dynamic (any format dydit.load reads)"),
    out: str = typer.Option("runs/dydit", help="output folder"),
    target: float = typer.Option(0.5, help="λ: target FLOPs ratio of the routed blocks"),
    flops_weight: float = typer.Option(2.0, help="w in w·(mean r − λ_t)²"),
    flops_balance: float = typer.Option(0.0, help="share of the FLOPs loss applied to each quarter of the "
                                        "trajectory (1: every quarter of t averages λ; 0: the paper's batch mean, "
                                        "which can starve the high-noise steps in short fine-tunes)"),
    ramp_steps: int = typer.Option(100, help="λ_t ramps from 1.0 to λ over these steps"),
    warmup_steps: int = typer.Option(100, help="steps with the complete-model loss added"),
    router_lr: Optional[float] = typer.Option(3e-2, help="router learning rate (routers start from zero weights "
                                              "and must move within a short fine-tune)"),
    noise_anneal: float = typer.Option(0.3, help="gumbel noise decays to 0 over this final share of the steps, "
                                       "so the trained masks are the ones inference uses"),
    tau: float = typer.Option(5.0, help="gumbel-sigmoid temperature"),
    width: bool = typer.Option(True, help="TDW: dynamic heads and MLP groups"),
    tokens: bool = typer.Option(True, help="SDT: dynamic tokens through the MLP"),
    block_skip: bool = typer.Option(False, help="ablation: a timestep gate per block that skips the whole block "
                                    "(use with --no-width --no-tokens for the block-skip baseline)"),
    reorder: bool = typer.Option(True, help="rank heads/channels by magnitude first"),
    width_bias_init: float = typer.Option(2.0, help="initial width-router bias (>0: all on, the static function; "
                                          "the authors' 15 suits their long fine-tunes)"),
    token_bias_init: float = typer.Option(2.0, help="initial token-router bias (>0: all on; the authors use 35)"),
    data: Optional[str] = typer.Option(None, help="folder with the Fashion-MNIST IDX files"),
    steps: int = typer.Option(300, help="optimizer steps"),
    batch_size: int = typer.Option(128, help="global batch size"),
    lr: float = typer.Option(1e-4, help="learning rate of the backbone"),
    lr_schedule: str = typer.Option("constant", help="learning rate after any warm-up: constant, or cosine "
                                    "(decays to ~0 at the last step)"),
    ema_decay: float = typer.Option(0.99, help="EMA decay"),
    grad_skip: float = typer.Option(100.0, help="skip updates whose gradient norm exceeds this"),
    bf16: bool = typer.Option(False, help="bf16 autocast"),
    seed: int = typer.Option(0, help="seed"),
    ckpt_every: int = typer.Option(100, help="checkpoint every N steps"),
    sample_every: int = typer.Option(0, help="sample grid every N steps (0: off)"),
    resume: bool = typer.Option(False, help="continue from OUT/checkpoint.pt"),
    limit_data: Optional[int] = typer.Option(None, help="use only the first N images"),
    stop_after: Optional[int] = typer.Option(None, help="stop after N steps in this run"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
    prune_static: bool = typer.Option(False, help="baseline instead of DyDiT: magnitude-prune every block to the "
                                      "same width at every timestep (FLOPs ≈ λ), then fine-tune it the same way"),
    calibrate: bool = typer.Option(True, help="after training, shift the router thresholds of the output until "
                                   "the realised inference FLOPs ratio is within 0.005 of λ (dydit calibrate)"),
    feedback_every: int = typer.Option(25, help="after the λ ramp, every N steps: sample a few images on the fast "
                                       "engine and correct the FLOPs target by (inference − training) ratio; 0: off"),
    feedback_images: int = typer.Option(20, help="images per feedback measurement (labels cycle through the "
                                        "classes: use a multiple of the class count)"),
    calib_sampler: Optional[str] = typer.Option(None, help="sampler of the feedback and calibration runs (the one "
                                                "you will serve; default ddim, or euler for flow models)"),
    calib_steps: int = typer.Option(20, help="sampling steps of the feedback and calibration runs"),
    calib_cfg: float = typer.Option(4.0, help="guidance scale of the feedback and calibration runs"),
    feedback_gain: float = typer.Option(1.0, help="share of each measured inference-training gap applied to the "
                                        "target correction (< 1 damps it)"),
    freeze_routers: float = typer.Option(0.0, help="fix the plan for this final share of the steps: the routers stop, "
                                         "the masks are the inference ones and the backbone adapts to them"),
    freeze_time_embed: bool = typer.Option(False, help="with --freeze-routers: fix the timestep embedder too, in the "
                                           "live and the EMA model, so the width plan cannot drift while frozen"),
    calibrate_at_freeze: bool = typer.Option(False, help="with --freeze-routers: calibrate the plan to λ at the freeze "
                                             "(as the final calibration does), so the backbone trains on the plan "
                                             "that ships"),
    distill: float = typer.Option(0.0, help="weight of an output-distillation loss toward the frozen static INIT "
                                  "(not in the paper; costs one extra forward of the static model per step)"),
    data_weight: float = typer.Option(1.0, help="weight of the backbone's own diffusion or flow loss (0 with "
                                      "--distill: learn from the static model only)"),
    calib_images: int = typer.Option(100, help="images sampled per calibration measurement (class-balanced)"),
    peft: str = typer.Option("none", help="none: train all weights; td-lora: frozen backbone, routers + "
                             "timestep-mixed LoRA experts train; lora: the same with one expert"),
    lora_rank: Optional[int] = typer.Option(None, help=TDLoRAConfig.help("r")),
    lora_experts: int = typer.Option(4, help=TDLoRAConfig.help("num_experts") + " (--peft td-lora)"),
    lora_alpha: Optional[float] = typer.Option(None, help=TDLoRAConfig.help("lora_alpha")),
    lora_targets: str = typer.Option(",".join(DEFAULT_TARGETS), help=TDLoRAConfig.help("target_modules")
                                     + " (comma-separated)"),
):
    """Fine-tune a static DiT/SiT into a DyDiT under a FLOPs target (runs under torchrun for DDP)."""
    args = dict(locals())
    import dydit
    from dydit.dynamic import DynamicConfig, dynamize
    from dydit.dynamic.convert import copy_routers
    from dydit.dynamic.finetune import FinetuneConfig, FinetuneTask
    from dydit.train import LR_SCHEDULES, TrainConfig, dist_info, train

    if not 0.0 < target <= 1.0:
        raise typer.BadParameter(f"--target must be in (0, 1], got {target}; it is a share of the static FLOPs")
    if lr_schedule not in LR_SCHEDULES:
        raise typer.BadParameter(f"--lr-schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
    if peft not in _PEFT:
        raise typer.BadParameter(f"--peft must be one of {_PEFT}, got {peft!r}")
    model = dydit.load(init)
    if getattr(model, "dynamic_config", None) is not None:
        raise typer.BadParameter(f"{init} is already a dynamic model; pass its static base")
    if prune_static:
        from dydit.dynamic.prune import static_width_prune

        if peft != "none":
            raise typer.BadParameter("--prune-static fine-tunes all weights; drop --peft")
        model, info = static_width_prune(model, target, reorder=reorder)
        typer.echo(f"static pruning: {info['heads_kept']} heads and {info['groups_kept']} MLP groups kept per block "
                   f"(FLOPs ratio {info['flops_ratio']:.3f}); no complete-model warm-up, no FLOPs loss")
        args.update(warmup_steps=0, flops_weight=0.0, ramp_steps=0, feedback_every=0)
        calibrate = False
    else:
        if not (width or tokens or block_skip):
            raise typer.BadParameter("nothing to route: keep --width or --tokens, or add --block-skip")
        dyn_cfg = DynamicConfig(width=width, tokens=tokens, block_skip=block_skip, tau=tau,
                                width_bias_init=width_bias_init, token_bias_init=token_bias_init)
        model = dynamize(model, dyn_cfg, reorder=reorder)
    lora_cfg = None
    if peft != "none":
        from dydit.peft import apply_td_lora, trainable_report

        lora_cfg = TDLoRAConfig(r=lora_rank, num_experts=1 if peft == "lora" else lora_experts, lora_alpha=lora_alpha,
                                target_modules=[t.strip() for t in lora_targets.split(",") if t.strip()])
        model = apply_td_lora(model, lora_cfg)
        lora_cfg = model.td_lora_config["default"]
        n, total, share = trainable_report(model)
        typer.echo(f"{peft}: {n:,} trainable parameters ({100 * share:.2f}% of the {total:,}-parameter backbone)")
    ft = FinetuneConfig(**{f.name: args[f.name] for f in fields(FinetuneConfig) if f.name in args},
                        total_steps=steps, feedback_sampler=calib_sampler, feedback_steps=calib_steps,
                        feedback_cfg=calib_cfg)
    # --warmup-steps is the complete-model warm-up (FinetuneConfig), not the LR warm-up of TrainConfig
    own = {f.name: args[f.name] for f in fields(TrainConfig)
           if f.name in args and f.name not in ("init", "warmup_steps")}
    tc = TrainConfig(**own, warmup_steps=0, extra={"finetune": ft.to_dict(), "init": init})
    Path(out).mkdir(parents=True, exist_ok=True)
    peft_info = {"peft": peft, "td_lora": lora_cfg.to_dict()} if lora_cfg is not None else {}
    summary = {"finetune": ft.to_dict(), "init": init, **peft_info, **({"prune_static": info} if prune_static else {})}
    (Path(out) / "finetune.json").write_text(json.dumps(summary, indent=2))
    teacher = dydit.load(init) if distill > 0 else None  # the static function, before pruning or routing
    try:
        task = FinetuneTask(model, ft, teacher=teacher)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if lora_cfg is not None:
        from dydit.peft import save_adapters, td_lora_fast_context

        task.sampling_context = td_lora_fast_context  # sample grids with the adapters merged per timestep
        task.feedback_context = td_lora_fast_context
    ema = train(tc, model=model, task=task)
    copy_routers(model, ema)  # backbone averaged, routers live
    finished = (Path(out) / "ema").exists() and dist_info()[0] == 0  # train() writes ema/ at the last step
    if calibrate and target < 1.0 and finished:
        from dydit.dynamic.calibrate import calibrate as run_calibration
        from dydit.sampling import default_sampler

        ema.eval()
        try:
            result = run_calibration(ema, target, calib_sampler or default_sampler(ema), calib_steps, calib_cfg,
                                     calib_images, context_factory=task.feedback_context, log=typer.echo)
        except ValueError as e:  # keep the trained model; say why it is not calibrated
            typer.echo(f"calibration skipped: {e}", err=True)
        else:
            summary["calibration"] = result.to_dict()
            (Path(out) / "finetune.json").write_text(json.dumps(summary, indent=2))
            _report_calibration(result)
    if lora_cfg is None and (Path(out) / "ema").exists():
        dydit.save(ema, Path(out) / "ema")
    if lora_cfg is not None:
        save_adapters(ema, Path(out) / "adapters", base_reordered=reorder)
        typer.echo(f"adapters + routers: {Path(out) / 'adapters'} (apply to {init} with dydit.peft.load_adapters)")
        return
    typer.echo(f"DyDiT EMA weights: {Path(out) / 'ema'}")


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
    cfg_scale: float = typer.Option(4.0, help="guidance scale"),
    num_images: int = typer.Option(100, help="images sampled per measurement (class-balanced)"),
    tol: float = typer.Option(0.005, help="stop when |realised − λ| ≤ tol"),
    knob: Optional[str] = typer.Option(None, help="tokens or width (default: tokens when the model has them)"),
    seed: int = typer.Option(0, help="seed of the calibration noise"),
):
    """Shift a DyDiT's router thresholds so that it realises λ on your sampler (run by finetune already)."""
    import dydit
    from dydit.dynamic.calibrate import calibrate as run_calibration
    from dydit.sampling import default_sampler

    model = dydit.load(checkpoint)
    factory = None
    if adapters:
        from dydit.peft.td_lora import load_adapters, read_adapter_config, save_adapters
        from dydit.peft import td_lora_fast_context as factory

        model = load_adapters(model, adapters)
    if Path(out).resolve() == Path(checkpoint).resolve():
        raise typer.BadParameter("--out must differ from CHECKPOINT: the input is kept as it is")
    try:
        result = run_calibration(model, target, sampler or default_sampler(model), steps, cfg_scale, num_images,
                                 tol=tol, seed=seed, knob=knob, context_factory=factory, log=typer.echo)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    _report_calibration(result)
    if adapters:
        save_adapters(model, Path(out), base_reordered=read_adapter_config(adapters)["base_reordered"])
    else:
        dydit.save(model, Path(out))
    (Path(out) / "calibration.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    typer.echo(f"calibrated checkpoint: {out}")


def _time_sampling(model, labels, steps, cfg_scale, seed, dyn=None, repeats=1):
    """Median wall-clock seconds of one full sampling run, after a short warm-up run."""
    import statistics
    import time

    from dydit.sampling import sample

    sample(model, labels[:2], "ddim", 2, cfg_scale=cfg_scale, seed=seed, dyn=dyn)  # warm-up
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = sample(model, labels, "ddim", steps, cfg_scale=cfg_scale, seed=seed, dyn=dyn)
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def demo(
    out: str = typer.Option("demo", help="folder for the grids and the summary"),
    steps: int = typer.Option(25, help="DDIM steps"),
    cfg_scale: float = typer.Option(4.0, help="classifier-free guidance scale"),
    per_class: int = typer.Option(8, help="samples per class in each grid"),
    seed: int = typer.Option(0, help="seed (same noise for every model)"),
    repeats: int = typer.Option(3, help="timed repeats (median)"),
):
    """Sample the embedded Fashion-MNIST models: static vs DyDiT side by side (grids, GMACs, s/image)."""
    import torch
    from rich.console import Console
    from rich.table import Table

    import dydit
    from dydit.assets import ASSETS_DIR, default_model_path
    from dydit.dynamic import DynamicContext
    from dydit.dynamic.flops import flops_spec
    from dydit.dynamic.report import summarize
    from dydit.viz import save_grid

    console = Console()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    models = [("static", default_model_path())]
    for lam in ("0.7", "0.5"):
        p = ASSETS_DIR / f"fmnist_dydit_{lam}"
        if p.exists():
            models.append((f"DyDiT λ={lam}", p))
    labels = torch.arange(10).repeat(per_class)
    cfg_batches = 2 if cfg_scale != 1.0 else 1
    table = Table(title=f"Fashion-MNIST, DDIM {steps} steps, CFG {cfg_scale}, {len(labels)} images, "
                        f"{torch.get_num_threads()} CPU threads")
    for col in ("model", "FLOPs ratio", "GMACs/forward", "GMACs/image", "s/image", "speedup", "grid"):
        table.add_column(col)
    base_time = None
    summary = []
    with console.status("sampling..."):
        for name, path in models:
            model = dydit.load(path)
            spec = flops_spec(model)
            dynamic = getattr(model, "dynamic_config", None) is not None
            dyn = DynamicContext("fast", record_usage=True) if dynamic else None
            x, seconds = _time_sampling(model, labels, steps, cfg_scale, seed, dyn, repeats)
            if dynamic:
                # usage of the last timed run only
                s = summarize(dyn.usage[-steps:], spec, cfg_batches)
            else:
                g = spec.static_macs / 1e9
                s = {"flops_ratio": 1.0, "gmacs_per_forward": g, "gmacs_per_image": g * steps * cfg_batches}
            per_image = seconds / len(labels)
            base_time = base_time or per_image
            grid = save_grid(x, out_dir / f"{name.split()[0].lower()}{'_' + name.split('=')[1] if '=' in name else ''}.png",
                             nrow=10, pad=model.config.pixel_pad)
            row = dict(model=name, flops_ratio=s["flops_ratio"], gmacs_per_forward=s["gmacs_per_forward"],
                       gmacs_per_image=s["gmacs_per_image"], s_per_image=per_image, speedup=base_time / per_image,
                       grid=str(grid))
            summary.append(row)
            table.add_row(name, f"{row['flops_ratio']:.3f}", f"{row['gmacs_per_forward']:.4f}",
                          f"{row['gmacs_per_image']:.3f}", f"{per_image * 1e3:.1f} ms", f"{row['speedup']:.2f}×", str(grid))
    console.print(table)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"grids written to [bold]{out_dir.resolve()}[/bold] (one row per class index 0-9, columns = samples)")


def plan(
    checkpoint: str = typer.Argument(..., help="a dynamic (DyDiT) checkpoint"),
    out: str = typer.Option("plan", help="folder for plan.md and plan.png"),
    sampler: str = typer.Option("ddim", help="sampler whose timesteps define the plan"),
    steps: int = typer.Option(25, help="sampling steps"),
    cfg_scale: float = typer.Option(4.0, help="guidance scale"),
    num_images: int = typer.Option(20, help="images sampled to measure token shares"),
    seed: int = typer.Option(0, help="seed"),
):
    """Report a DyDiT's inference plan: per-step active heads, groups, token share, GMACs (table + heat map)."""
    import torch

    import dydit
    from dydit.dynamic import DynamicContext
    from dydit.dynamic.flops import flops_spec
    from dydit.dynamic.report import plan_heatmap, plan_table, summarize
    from dydit.sampling import sample

    model = dydit.load(checkpoint)
    if getattr(model, "dynamic_config", None) is None:
        raise typer.BadParameter(f"{checkpoint} is a static model; a plan report needs a DyDiT checkpoint")
    ctx = DynamicContext("fast", record_usage=True)
    labels = torch.arange(num_images) % model.config.num_classes
    sample(model, labels, sampler, steps, cfg_scale=cfg_scale, seed=seed, dyn=ctx)
    spec = flops_spec(model)
    s = summarize(ctx.usage, spec, 2 if cfg_scale != 1.0 else 1)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = (f"# Inference plan of {checkpoint}\n\nsampler {sampler}, {steps} steps, CFG {cfg_scale}, "
            f"{num_images} images\n\nrealised FLOPs ratio {s['flops_ratio']:.3f}; GMACs per forward "
            f"{s['gmacs_per_forward']:.4f} (static {s['static_gmacs_per_forward']:.4f}); GMACs per image "
            f"{s['gmacs_per_image']:.3f} (static {s['static_gmacs_per_image']:.3f})\n\n" + plan_table(ctx.usage, spec))
    (out_dir / "plan.md").write_text(text)
    png = plan_heatmap(ctx.usage, spec, out_dir / "plan.png")
    typer.echo(text[: text.index("| step")])
    typer.echo(f"table: {out_dir / 'plan.md'}\nheat map: {png}")


bench_app = typer.Typer(help="Benchmarks (BENCHMARKS.md).", no_args_is_help=True)


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

    combos = [(m, float(t), int(s), int(b)) for m in models.split(",") for t in targets.split(",")
              for s in schedules.split(",") for b in batches.split(",")]
    results = []
    for m, t, s, b in tqdm(combos, desc="bench engine"):
        results.append(bench_engine(m, t, s, timed_steps, b, repeats, dtype, device))
        typer.echo(results_table(results[-1:]).splitlines()[-1])
    from datetime import date

    from dydit.cli_eval import _cpu_name

    machine = (torch.cuda.get_device_name() if device.startswith("cuda") else
               f"{_cpu_name()} ({platform.machine()}), {torch.get_num_threads()} threads")
    md = (f"Machine: {machine}; torch {torch.__version__}; dtype {dtype}; {date.today().isoformat()}\n\n"
          + results_table(results))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".md").write_text(md)
    Path(out + ".json").write_text(json.dumps(result_dicts(results), indent=2))
    typer.echo(md)


@bench_app.command("compare")
def bench_compare_cmd(
    num_samples: int = typer.Option(5000, help="samples per row (class-balanced)"),
    sampler: str = typer.Option("ddim", help="sampler of every row"),
    steps: int = typer.Option(25, help="sampling steps (rows may override)"),
    cfg_scale: float = typer.Option(4.0, help="classifier-free guidance scale"),
    seed: int = typer.Option(0, help="seed of the noise (same for every row)"),
    batch_size: int = typer.Option(500, help="sampling batch size"),
    fbcache: float = typer.Option(0.1, help="First-Block-Cache threshold of the caching rows"),
    row: Optional[list[str]] = typer.Option(None, help="extra row name=path[,steps=N][,fbcache=R][,adapters=DIR] "
                                            "(ablations, pruning, fine-tuned static...); repeatable"),
    defaults: bool = typer.Option(True, help="include the rows the shipped models support"),
    out: str = typer.Option("docs/results/b3_compare", help="output prefix (.md, .json, .png)"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
    resume: bool = typer.Option(False, help="keep the rows OUT.rows.jsonl already scored with the same "
                                "settings and weights; score only the others (timing always reruns)"),
    timing_repeats: int = typer.Option(3, help="interleaved timing rounds (median); 0: time the quality pass"),
):
    """B3: static vs DyDiT vs fewer steps vs caching (and any extra rows): FID, accuracy, GMACs, s/image."""
    import logging

    import torch

    from dydit.bench_compare import default_rows, parse_row, run_compare

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if threads:
        torch.set_num_threads(threads)
    try:
        rows = (default_rows(steps, fbcache) if defaults else []) + [parse_row(r) for r in row or []]
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if not rows:
        raise typer.BadParameter("no rows: keep --defaults or pass --row")
    typer.echo(run_compare(rows, num_samples, sampler, steps, cfg_scale, seed, batch_size, out, resume=resume,
                           timing_repeats=timing_repeats))


def register(app: typer.Typer):
    app.command()(finetune)
    app.command()(calibrate)
    app.command()(demo)
    app.command()(plan)
    app.add_typer(bench_app, name="bench")
