"""Benchmark B3: DyDiT against the alternatives on B1 (Fashion-MNIST), one table and one plot; and the same
for video models on B4 (Moving Fashion-MNIST: static Latte, DyLatte, fewer steps, First-Block-Cache, stacked;
:func:`video_rows`), with the video metrics of :mod:`dydit.video_metrics` as the quality columns.

Every row is sampled and scored the same way (sampler, steps, guidance, seed, sample count). Quality
and time are measured in separate passes: the quality pass samples and scores every row once (its
results are kept per row in ``OUT.rows.jsonl``, keyed by the row, its settings and a hash of its
weights, so ``--resume`` skips rows already scored); the timing pass then samples one batch per row,
rows interleaved round-robin for ``timing_repeats`` rounds after one warm-up round, and takes each
row's median, as B2 does, so machine drift hits every row alike. Speedup is the static (first) row's
s/image over the row's s/image.
"""
from __future__ import annotations

import hashlib
import json
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class Row:
    """One configuration: a checkpoint plus how it is sampled."""

    name: str
    path: str
    steps: int | None = None  # None: the benchmark's step count
    fbcache: float | None = None
    adapters: str | None = None
    note: str = ""
    result: dict = field(default_factory=dict)


def parse_row(text: str) -> Row:
    """``name=path[,steps=N][,fbcache=R][,adapters=DIR]`` (the CLI's --row)."""
    if "=" not in text:
        raise ValueError(f"--row {text!r}: expected name=path[,steps=N][,fbcache=R][,adapters=DIR]")
    head, *parts = text.split(",")
    if "=" not in head:
        raise ValueError(f"--row {text!r}: expected name=path[,steps=N][,fbcache=R][,adapters=DIR]")
    name, path = head.rsplit("=", 1)  # the name may hold "=" (e.g. "DyDiT λ=0.5"), the path may not
    row = Row(name=name.strip(), path=path.strip())
    for p in parts:
        k, _, v = p.partition("=")
        k = k.strip()
        if k == "steps":
            row.steps = int(v)
        elif k == "fbcache":
            row.fbcache = float(v)
        elif k == "adapters":
            row.adapters = v.strip()
        else:
            raise ValueError(f"--row {text!r}: unknown option {k!r} (steps, fbcache, adapters)")
    return row


def _routing_note(path) -> str:
    """What a shipped DyDiT routes, from its config: "TDW + SDT", "TDW only" or "SDT only"."""
    dyn = json.loads((Path(path) / "config.json").read_text()).get("dynamic") or {}
    parts = [name for key, name in (("width", "TDW"), ("tokens", "SDT")) if dyn.get(key)]
    if not parts:
        return "block skip" if dyn.get("block_skip") else "dynamic"
    return " + ".join(parts) if len(parts) != 1 else f"{parts[0]} only"


def default_rows(steps: int, fbcache: float) -> list[Row]:
    """The rows that the shipped models support: static, fewer steps, DyDiT, caching alone and stacked."""
    from dydit.assets import ASSETS_DIR, default_model_path

    base = str(default_model_path())
    rows = [Row("static", base, note="full compute")]
    for lam in ("0.7", "0.5"):
        p = ASSETS_DIR / f"fmnist_dydit_{lam}"
        if p.exists():
            rows.append(Row(f"DyDiT λ={lam}", str(p), note=_routing_note(p)))
    for frac in (0.7, 0.5):
        n = max(1, round(steps * frac))
        rows.append(Row(f"static, {n} steps", base, steps=n, note=f"fewer sampling steps (~{frac:.0%} compute)"))
    rows.append(Row(f"FBCache rdt={fbcache}", base, fbcache=fbcache, note="training-free caching"))
    p = ASSETS_DIR / "fmnist_dydit_0.5"
    if p.exists():
        rows.append(Row(f"DyDiT λ=0.5 + FBCache rdt={fbcache}", str(p), fbcache=fbcache, note="stacked"))
    return rows


def video_rows(models: dict, steps: int, fbcache: float) -> list[Row]:
    """B3 rows for video models (B4): ``models`` maps ``"static"`` to the static Latte and each λ (``"0.7"``,
    ``"0.5"``, ...) to its DyLatte. Static, DyLatte per λ, fewer steps, First-Block-Cache alone and stacked
    on the smallest λ."""
    if "static" not in models:
        raise ValueError("video rows need the static model: static=PATH")
    base = str(models["static"])
    lams = sorted((k for k in models if k != "static"), key=float, reverse=True)
    rows = [Row("static", base, note="full compute")]
    rows += [Row(f"DyLatte λ={lam}", str(models[lam]), note=_routing_note(models[lam])) for lam in lams]
    for frac in (0.7, 0.5):
        n = max(1, round(steps * frac))
        rows.append(Row(f"static, {n} steps", base, steps=n, note=f"fewer sampling steps (~{frac:.0%} compute)"))
    rows.append(Row(f"FBCache rdt={fbcache}", base, fbcache=fbcache, note="training-free caching"))
    if lams:
        rows.append(Row(f"DyLatte λ={lams[-1]} + FBCache rdt={fbcache}", str(models[lams[-1]]), fbcache=fbcache,
                        note="stacked"))
    return rows


def parse_video_models(items) -> dict:
    """``["static=PATH", "0.7=PATH", ...]`` (the CLI's --video) as :func:`video_rows` takes them."""
    models = {}
    for text in items:
        key, sep, path = text.partition("=")
        key = key.strip()
        if not sep or not path.strip():
            raise ValueError(f"--video {text!r}: expected static=PATH or LAMBDA=PATH (e.g. 0.5=runs/dylatte_0.5/ema)")
        if key != "static":
            try:
                float(key)
            except ValueError:
                raise ValueError(f"--video {text!r}: the key is 'static' or a FLOPs target such as 0.5") from None
        models[key] = path.strip()
    return models


# quality columns of the table and plot: (header, result key, format, plot label)
IMAGE_METRICS = (("FID (FMNIST classifier) ↓", "fid", "{:.2f}"), ("cond. accuracy ↑", "cond_acc", "pct"))
VIDEO_METRICS = (("per-frame FID (FMNIST classifier, frame crops) ↓", "frame_fid", "{:.2f}"),
                 ("per-frame accuracy ↑", "frame_acc", "pct"), ("consistency ↑", "consistency", "pct"),
                 ("motion error (px) ↓", "motion_error_px", "{:.2f}"))


# B5 (FLUX-style models on Captioned Fashion-MNIST)
T2I_METRICS = (("crop FID ↓", "crop_fid", "{:.2f}"), ("class ↑", "class_acc", "pct"),
               ("position ↑", "position_acc", "pct"), ("brightness ↑", "brightness_acc", "pct"),
               ("all ↑", "all_acc", "pct"))
METRICS = {"image": IMAGE_METRICS, "video": VIDEO_METRICS, "t2i": T2I_METRICS}
_DATA = {"image": "Fashion-MNIST", "video": "Moving Fashion-MNIST (B4)", "t2i": "Captioned Fashion-MNIST (B5)"}


def _row_kind(result: dict) -> str:
    return "video" if "s_per_video" in result else ("t2i" if "crop_fid" in result else "image")


def _kind(rows: list[Row]) -> str:
    """What every row's result is: "image" (B1/B3), "video" (s/video, B4) or "t2i" (B5); mixing fails."""
    kinds = {_row_kind(r.result) for r in rows}
    if len(kinds) > 1:
        raise ValueError("one table compares models of one kind (image, video or text-to-image): "
                         + ", ".join(f"{r.name} ({_row_kind(r.result)})" for r in rows))
    return kinds.pop()


def _fmt(value, fmt: str) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}%" if fmt == "pct" else fmt.format(value)


def row_key(row: Row, settings: dict) -> str:
    """What a row's quality result depends on: its options, the benchmark settings, its weights."""
    digest = hashlib.sha256()
    for folder in (row.path, row.adapters):
        if not folder:
            continue
        folder = Path(folder)
        files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.json")) if folder.is_dir() else [folder]
        for f in files:
            digest.update(f.name.encode())
            digest.update(_quality_bytes(f))
    # where the files live does not matter, what they hold does
    return json.dumps({"steps": row.steps, "fbcache": row.fbcache, "adapters": bool(row.adapters),
                       "weights": digest.hexdigest()[:16], **settings}, sort_keys=True)


def _quality_bytes(f: Path) -> bytes:
    """The bytes of a row's file that its samples depend on: a model's config.json without the recipe that
    made it (metadata; a file that gained it keeps its scored rows)."""
    data = f.read_bytes()
    if f.name != "config.json":
        return data
    try:
        cfg = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return data
    if not isinstance(cfg, dict) or "recipe" not in cfg:
        return data
    cfg.pop("recipe")
    return json.dumps(cfg, indent=2, sort_keys=True).encode()


def run_compare(rows: list[Row], num_samples: int, sampler: str | None, steps: int, cfg_scale: float, seed: int,
                batch_size: int, out: str, data=None, cache_dir=None, resume: bool = False,
                timing_repeats: int = 3) -> str:
    import torch
    from tqdm.auto import tqdm

    from dydit.evaluate import evaluate_checkpoint

    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_suffix(".rows.jsonl")  # one line per scored row: an interrupted run keeps its rows
    settings = {"num_samples": num_samples, "sampler": sampler, "default_steps": steps, "cfg_scale": cfg_scale,
                "seed": seed, "batch_size": batch_size}
    done = {}
    if resume and partial.exists():
        for line in partial.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                done[rec.get("key")] = rec
    elif partial.exists():
        partial.write_text("")
    for row in tqdm(rows, desc="bench compare: quality", unit="row"):
        key = row_key(row, settings)
        if key in done:
            row.result = {k: v for k, v in done[key].items() if k not in ("key", "name", "note")}
            log.info("%s: kept from %s", row.name, partial)
            continue
        row.result = evaluate_checkpoint(row.path, num_samples=num_samples, sampler=sampler,
                                         steps=row.steps or steps, cfg_scale=cfg_scale, seed=seed,
                                         batch_size=batch_size, fbcache=row.fbcache, adapters=row.adapters,
                                         data=data, cache_dir=cache_dir, progress=False)
        log.info("%s: %s", row.name, {k: v for k, v in row.result.items()
                                      if k in ("fid", "cond_acc", "s_per_image", "frame_fid", "frame_acc",
                                               "consistency", "motion_error_px", "s_per_video")})
        with partial.open("a") as f:
            f.write(json.dumps({"key": key, "name": row.name, "note": row.note, **row.result}) + "\n")
    kind = _kind(rows)
    unit = "video" if kind == "video" else "image"
    tkey, gkey = f"s_per_{unit}", f"gmacs_per_{unit}"
    if timing_repeats > 0:
        timings = time_rows(rows, sampler, steps, cfg_scale, seed, batch_size, timing_repeats)
        for row, t in zip(rows, timings):
            row.result[f"{tkey}_quality_pass"] = row.result[tkey]
            row.result[tkey] = t
    base = rows[0].result[tkey]
    metrics = METRICS[kind]
    head = ["configuration", *[m[0] for m in metrics], f"GMACs/{unit}", "FLOPs ratio", f"s/{unit}", "speedup", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        res = r.result
        cells = [r.name, *[_fmt(res.get(key), fmt) for _, key, fmt in metrics], _fmt(res.get(gkey), "{:.2f}"),
                 f"{res['flops_ratio']:.3f}", f"{1e3 * res[tkey]:.2f} ms", f"{base / res[tkey]:.2f}×", r.note]
        lines.append("| " + " | ".join(cells) + " |")
    first = rows[0].result
    header = (f"Samples: {num_samples}{' videos' if kind == 'video' else ''} per row, {first.get('sampler', 'euler')} {steps} steps (unless the row says "
              f"otherwise), CFG {cfg_scale}, seed {seed}, batch {batch_size}; {first['device']}, "
              f"{torch.get_num_threads()} threads, fp32. s/{unit}: median of {timing_repeats} interleaved timing "
              f"rounds of one {batch_size}-{unit} batch per row (quality pass times in the .json).\n\n")
    if kind == "video":
        from dydit.video_metrics import FVD_NOTE

        header += FVD_NOTE + "\n\n"
    table = header + "\n".join(lines) + "\n"
    out_path.with_suffix(".md").write_text(table)
    out_path.with_suffix(".json").write_text(json.dumps(
        [{"name": r.name, "path": r.path, "steps": r.steps or steps, "fbcache": r.fbcache, "adapters": r.adapters,
          "note": r.note, **r.result} for r in rows], indent=2) + "\n")
    plot(rows, base, out_path.with_suffix(".png"), kind)
    return table


def time_rows(rows: list[Row], sampler: str | None, steps: int, cfg_scale: float, seed: int, batch_size: int,
              repeats: int = 3) -> list[float]:
    """Median s/image of one ``batch_size`` sampling call per row, rows interleaved round-robin."""
    import torch

    from dydit.data.captioned_fmnist import balanced_caption_ids
    from dydit.evaluate import prepare_sampling
    from dydit.sampling import default_sampler, sample
    from dydit.t2i import is_text_to_image, sample_captions

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    runners = []
    for row in rows:
        model, make_dyn, wrap = prepare_sampling(row.path, fbcache=row.fbcache, adapters=row.adapters,
                                                 steps=row.steps or steps, device=dev)
        dyn = make_dyn()  # one context per row, reused like the quality pass reuses it across batches
        if is_text_to_image(model):  # balanced captions, Euler over σ
            ids = balanced_caption_ids(batch_size, seed)

            def run(model=model, dyn=dyn, wrap=wrap, ids=ids, n=row.steps or steps):
                with torch.no_grad(), wrap():
                    sample_captions(model, ids, n, cfg_scale=cfg_scale, seed=seed, dyn=dyn)
            runners.append(run)
            continue
        labels = torch.arange(batch_size, device=dev) % model.config.num_classes
        method = sampler or default_sampler(model)

        def run(model=model, dyn=dyn, wrap=wrap, labels=labels, n=row.steps or steps, method=method):
            with torch.no_grad(), wrap():
                sample(model, labels, method, n, cfg_scale=cfg_scale, seed=seed, dyn=dyn)
        runners.append(run)
    times = [[] for _ in rows]
    for rnd in range(repeats + 1):  # round 0 warms up (plans, sliced weights, allocator)
        for i, run in enumerate(runners):
            sync()
            t0 = time.perf_counter()
            run()
            sync()
            if rnd > 0:
                times[i].append((time.perf_counter() - t0) / batch_size)
        log.info("timing round %d of %d done", rnd, repeats)
    return [statistics.median(t) for t in times]


def plot(rows: list[Row], base_s: float, path: Path, kind: str = "image") -> Path:
    """Quality vs measured time: each quality metric against speedup over the static model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = METRICS[kind]
    tkey = "s_per_video" if kind == "video" else "s_per_image"
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2))
    for ax, (label, key, fmt) in zip(axes, metrics):
        for r in rows:
            if r.result.get(key) is None:
                continue
            x = base_s / r.result[tkey]
            y = r.result[key] * (100 if fmt == "pct" else 1)
            marker = "o" if "Dy" in r.name else ("s" if "FBCache" in r.name else "^")
            ax.scatter([x], [y], marker=marker, s=45)
            ax.annotate(r.name, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.set_xlabel(f"measured speedup over static (s/{'video' if kind == 'video' else 'image'} ratio)")
        ax.set_ylabel(label + (" (%)" if fmt == "pct" else ""))
        ax.grid(alpha=0.3)
    fig.suptitle(f"{'B5' if kind == 't2i' else 'B3'}: quality vs measured sampling time ({_DATA[kind]})")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
