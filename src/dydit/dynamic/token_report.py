"""Where the token routers (SDT) send compute: spatial selectivity and token-keep maps.

A sampling run with ``DynamicContext(record_tokens=True)`` keeps every routed block's token mask at every
step. Against the final images, a patch is *object* when its mean intensity (in [0, 1]) is above a stated
threshold and *background* otherwise (Fashion-MNIST: the item on a black canvas). Spatial routing shows
as a higher kept share on object patches than on background ones, and as a spread of the per-image token
share (an image-independent router keeps the same share of every image).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def _masks_by_step(token_masks, num_images: int):
    """{t: (blocks, images, N) bool} from a context's records (the first ``num_images`` rows: the
    conditional half of a guided batch)."""
    steps: dict[float, dict[int, torch.Tensor]] = {}
    for t, block, keep in token_masks:
        steps.setdefault(t, {})[block] = keep[:num_images]
    ts = list(steps)  # in sampling order
    blocks = sorted(steps[ts[0]]) if ts else []
    return ts, blocks, {t: torch.stack([steps[t][b] for b in blocks]) for t in ts}


def frames_as_images(videos: torch.Tensor, token_masks, kinds: list[str]):
    """A video run as an image run of its frames: videos (B, F, C, H, W) -> (B·F, C, H, W), and every token
    mask (B', F·N) -> (B'·F, N), frame by frame. Spatial blocks record a sample's tokens frame-major (its rows
    are frames), temporal blocks position-major (its rows are patch positions): ``kinds`` (the block kind of
    each routed block, :func:`dydit.dynamic.flops.flops_spec`) says which to reorder."""
    B, F = videos.shape[:2]
    out = []
    for t, block, keep in token_masks:
        rows, n = keep.shape[0], keep.shape[1] // F
        per_frame = keep.view(rows, n, F).transpose(1, 2) if kinds[block] == "temporal" else keep.view(rows, F, n)
        out.append((t, block, per_frame.reshape(rows * F, n)))
    return videos.flatten(0, 1), out


def object_patches(images: torch.Tensor, patch: int, threshold: float = 0.1) -> torch.Tensor:
    """(B, N) bool: patches whose mean intensity (images in [-1, 1], mapped to [0, 1]) exceeds ``threshold``.

    ``images`` are in the model's frame (a pixel model's padding included), so patches align with tokens."""
    x = (images.float().clamp(-1, 1) + 1) / 2  # (B, C, H, W) in [0, 1]
    x = x.mean(1, keepdim=True)
    cells = torch.nn.functional.avg_pool2d(x, patch)  # (B, 1, H/p, W/p)
    return (cells.flatten(1) > threshold)


def token_selectivity(token_masks, images: torch.Tensor, patch: int, threshold: float = 0.1,
                      bands: int = 4) -> dict:
    """Kept-token share on object vs background patches, per block and per step band, and the spread of
    the per-image token share. ``images``: the run's final images (B, C, H, W) in [-1, 1], in the model's
    frame (as :func:`dydit.sampling.sample` returns them)."""
    B = len(images)
    ts, blocks, masks = _masks_by_step(token_masks, B)
    if not ts:
        raise ValueError("no token masks recorded: sample with DynamicContext(record_tokens=True) on a model "
                         "with token routers")
    obj = object_patches(images, patch, threshold)  # (B, N)
    keep = torch.stack([masks[t] for t in ts]).float()  # (steps, blocks, B, N)
    band_of = np.minimum(np.arange(len(ts)) * bands // len(ts), bands - 1)
    objf, bgf = obj.float(), (~obj).float()

    def share(k, m):  # kept share over the patches selected by m (k: (..., B, N))
        return float((k * m).sum() / m.sum().clamp(min=1) / (k.numel() / m.numel()))

    per_block = []
    for bi, b in enumerate(blocks):
        rows = []
        for band in range(bands):
            k = keep[band_of == band][:, bi]  # (steps in band, B, N)
            rows.append({"band": band, "object": share(k, objf), "background": share(k, bgf)})
        per_block.append({"block": b, "bands": rows})
    per_image = keep.mean(dim=(0, 1, 3))  # (B,) token share of each image, over steps and blocks
    return {
        "threshold": threshold, "images": B, "steps": len(ts), "bands": bands,
        "object_patch_share": float(objf.mean()),
        "object": share(keep, objf), "background": share(keep, bgf), "overall": float(keep.mean()),
        "per_block": per_block,
        "per_image_share": {"mean": float(per_image.mean()), "std": float(per_image.std()),
                            "min": float(per_image.min()), "max": float(per_image.max())},
    }


def selectivity_table(sel: dict) -> str:
    """Markdown: kept share on object / background patches per block (rows) and step band (columns)."""
    bands = sel["bands"]
    head = "| block | " + " | ".join(f"band {b} obj / bg" for b in range(bands)) + " |"
    lines = [f"Object patches: mean intensity > {sel['threshold']} ({sel['object_patch_share']:.0%} of patches); "
             f"{sel['images']} images, {sel['steps']} steps in {bands} bands (band 0 = high noise). Kept share "
             f"overall {sel['overall']:.3f}: object {sel['object']:.3f}, background {sel['background']:.3f}. "
             f"Per-image token share: mean {sel['per_image_share']['mean']:.3f}, std "
             f"{sel['per_image_share']['std']:.3f} (min {sel['per_image_share']['min']:.3f}, max "
             f"{sel['per_image_share']['max']:.3f}).", "", head, "|---|" + "---|" * bands]
    for row in sel["per_block"]:
        cells = [f"{r['object']:.2f} / {r['background']:.2f}" for r in row["bands"]]
        lines.append(f"| {row['block']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def token_keep_maps(token_masks, images: torch.Tensor, patch: int, path, num_images: int = 6,
                    num_steps: int = 5) -> Path:
    """PNG: for a few images (rows) at a few steps (columns), the final image with the share of routed
    blocks that ran each token's MLP overlaid (bright = computed in every block, dark = skipped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(num_images, len(images))
    ts, blocks, masks = _masks_by_step(token_masks, len(images))
    if not ts:
        raise ValueError("no token masks recorded: sample with DynamicContext(record_tokens=True)")
    cols = [ts[i] for i in np.linspace(0, len(ts) - 1, min(num_steps, len(ts))).round().astype(int)]
    side = images.shape[-1] // patch
    img = ((images[:n].float().clamp(-1, 1) + 1) / 2).mean(1).numpy()  # (n, H, W)
    fig, axes = plt.subplots(n, len(cols) + 1, figsize=(1.6 * (len(cols) + 1), 1.6 * n), squeeze=False)
    for r in range(n):
        axes[r, 0].imshow(img[r], cmap="gray", vmin=0, vmax=1)
        for c, t in enumerate(cols):
            share = masks[t][:, r].float().mean(0).view(side, side).numpy()  # over blocks
            up = np.kron(share, np.ones((patch, patch)))
            ax = axes[r, c + 1]
            ax.imshow(up, cmap="magma", vmin=0, vmax=1, interpolation="nearest")
            ax.contour(img[r], levels=[0.3], colors="cyan", linewidths=0.6)  # the item's outline
            if r == 0:
                ax.set_title(f"t={t:g}", fontsize=8)
    axes[0, 0].set_title("final image", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("share of routed blocks whose MLP ran each token (black 0 → white 1); cyan: the item's outline; "
                 "high noise → data", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
