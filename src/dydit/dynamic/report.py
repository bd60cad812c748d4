"""Plan reports: what a dynamic model actually ran at each sampling step, as a table and a heat map."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dydit.dynamic.flops import FlopsSpec, realised_macs


def _realised(spec: FlopsSpec, u) -> dict:
    """realised_macs of one recorded fast forward, every routed unit at its own width."""
    return realised_macs(spec, u.heads, u.groups, [k / u.batch for k in u.tokens_kept], u.units or None)


def usage_arrays(usage, spec: FlopsSpec):
    """(steps, blocks) arrays of head share, group share, token share, and per-step GMACs per sample."""
    heads = np.array([[h / b.num_heads for h, b in zip(u.heads, spec.blocks)] for u in usage])
    groups = np.array([[g / b.num_groups for g, b in zip(u.groups, spec.blocks)] for u in usage])
    tokens = np.array([[k / (u.batch * u.tokens_total) for k in u.tokens_kept] for u in usage])
    gmacs = np.array([
        _realised(spec, u)["total"] / 1e9 for u in usage
    ])
    ratio = np.array([
        _realised(spec, u)["blocks"] / spec.block_total
        for u in usage
    ])
    return heads, groups, tokens, gmacs, ratio


def summarize(usage, spec: FlopsSpec, cfg_batches: int = 1, forwards: int | None = None) -> dict:
    """Realised FLOPs ratio and GMACs per forward and per image of sampling runs: the one place that
    turns a run into "GMACs per image".

    ``usage``: a fast DynamicContext's records, one per forward, of one or several runs; None or empty for
    a static model (ratio 1). ``forwards``: network calls per image in one run (a sampler's steps, two per
    Heun step; :func:`sampling_forwards`); by default ``len(usage)``, usage of exactly one run.
    ``cfg_batches`` = 2 when guidance runs every image twice per call.
    """
    static = spec.static_macs / 1e9
    if usage:
        _, _, _, gmacs, ratio = usage_arrays(usage, spec)
        per_forward, flops_ratio = float(gmacs.mean()), float(ratio.mean())
        forwards = len(usage) if forwards is None else forwards
    elif forwards is None:
        raise ValueError("no usage recorded (a static model): pass forwards, the network calls per image")
    else:
        per_forward, flops_ratio = static, 1.0
    return {
        "flops_ratio": flops_ratio,
        "gmacs_per_forward": per_forward,
        "gmacs_per_image": per_forward * forwards * cfg_batches,
        "static_gmacs_per_forward": static,
        "static_gmacs_per_image": static * forwards * cfg_batches,
        "forwards": forwards,
    }


def sampling_forwards(model, sampler: str, steps: int) -> int:
    """Network calls per image of one ``sampler`` run of ``steps`` steps (guidance halves not counted)."""
    from dydit.sampling import make_process

    return len(make_process(model, sampler, steps).sampling_timesteps())


def plan_json(usage, spec: FlopsSpec, summary: dict | None = None) -> dict:
    """Per step and block: active heads, MLP groups and token share, with the step's FLOPs ratio and the
    run's realised ratio (``summary`` from :func:`summarize`)."""
    heads, groups, tokens, gmacs, ratio = usage_arrays(usage, spec)
    steps = [{"step": i, "t": u.t, "flops_ratio": float(ratio[i]), "gmacs_per_forward": float(gmacs[i]),
              "blocks": [{"block": b, "heads": u.heads[b], "groups": u.groups[b], "token_share": float(tokens[i, b])}
                         for b in range(len(u.heads))]}
             for i, u in enumerate(usage)]
    out = {"realised_flops_ratio": float(ratio.mean()), "num_heads": [b.num_heads for b in spec.blocks],
           "num_groups": [b.num_groups for b in spec.blocks], "steps": steps}
    if summary is not None:
        out["summary"] = summary
    return out


def usage_by_kind(usage, spec: FlopsSpec) -> dict:
    """Per block kind (DiT: "block"; Latte: "spatial"/"temporal"), over all steps of ``usage``: mean head,
    group and token shares, and the realised block-MACs ratio of that kind (its dynamic / static MACs)."""
    heads, groups, tokens, _, _ = usage_arrays(usage, spec)
    out = {}
    for kind in dict.fromkeys(b.kind for b in spec.blocks):
        cols = [i for i, b in enumerate(spec.blocks) if b.kind == kind]
        static = sum(spec.blocks[i].attn + spec.blocks[i].mlp for i in cols)
        dynamic = np.array([sum(heads[s, i] * spec.blocks[i].attn + groups[s, i] * tokens[s, i] * spec.blocks[i].mlp
                                for i in cols) for s in range(len(usage))])
        out[kind] = {"blocks": len(cols), "heads": float(heads[:, cols].mean()), "groups": float(groups[:, cols].mean()),
                     "tokens": float(tokens[:, cols].mean()), "flops_ratio": float((dynamic / static).mean())}
    return out


def _key(t) -> str:
    """A plan key as text: the timestep, or (t, guidance, …) for routers that see more than t."""
    return ", ".join(f"{v:g}" for v in t) if isinstance(t, tuple) else f"{t:g}"


def plan_table(usage, spec: FlopsSpec) -> str:
    """Markdown table: one row per step with per-block heads/groups/token share and GMACs; a second table
    per block kind when the model has several (Latte's spatial and temporal blocks)."""
    heads, groups, tokens, gmacs, ratio = usage_arrays(usage, spec)
    H = spec.blocks[0].num_heads
    lines = ["| step | t | heads per block | groups per block | token share per block | ratio | GMACs |",
             "|---|---|---|---|---|---|---|"]
    for i, u in enumerate(usage):
        lines.append(
            f"| {i} | {_key(u.t)} | {' '.join(str(h) for h in u.heads)} /{H} | {' '.join(str(g) for g in u.groups)} /{H} | "
            f"{' '.join(f'{v:.2f}' for v in tokens[i])} | {ratio[i]:.3f} | {gmacs[i]:.4f} |"
        )
    kinds = usage_by_kind(usage, spec)
    if len(kinds) > 1:
        lines += ["", "| block kind | blocks | head share | group share | token share | FLOPs ratio |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {k} | {v['blocks']} | {v['heads']:.3f} | {v['groups']:.3f} | {v['tokens']:.3f} | "
                  f"{v['flops_ratio']:.3f} |" for k, v in kinds.items()]
    return "\n".join(lines) + "\n"


def plan_heatmap(usage, spec: FlopsSpec, path, title: str = "") -> Path:
    """Three heat maps (blocks × steps): active head share, MLP group share, token share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads, groups, tokens, gmacs, ratio = usage_arrays(usage, spec)
    fig, axes = plt.subplots(4, 1, figsize=(max(6, len(usage) * 0.25), 9), sharex=True,
                             gridspec_kw={"height_ratios": [3, 3, 3, 1.5]})
    for ax, data, name in zip(axes, (heads, groups, tokens), ("heads", "MLP groups", "tokens")):
        im = ax.imshow(data.T, aspect="auto", vmin=0, vmax=1, cmap="viridis", origin="lower")
        ax.set_ylabel(f"block\n({name})")
        fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01)
    axes[3].plot(ratio, marker=".")
    axes[3].set_ylabel("FLOPs ratio")
    axes[3].set_ylim(0, 1.05)
    axes[3].set_xlabel("sampling step (high noise → data)")
    fig.suptitle(title or f"DyDiT plan: mean FLOPs ratio {ratio.mean():.3f}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
