"""GenEval-style adherence metrics for Captioned Fashion-MNIST, computed by the project (benchmark B5).

For each generated canvas and the caption it was asked for:

- **position**: the quadrant holding most of the image's mass (intensity above the black background)
  must be the captioned one;
- **brightness**: the item's level, the mean of the ``PEAK_PIXELS`` brightest pixels of the quadrant that
  holds the item (wherever it is: the attributes are scored separately), against the midpoint
  ``LEVEL_THRESHOLD`` (a Fashion-MNIST item peaks at ~1.0; the dim level scales it by 0.5);
- **class**: the shipped FMNIST classifier on the crop at the *captioned* quadrant, rescaled to its
  peak (so brightness does not decide the class);
- **crop FID**: the Fréchet distance of the classifier features of those rescaled crops against the
  Fashion-MNIST test images (:func:`dydit.evaluate.reference_statistics`);
- **all**: position, brightness and class all right (GenEval's per-prompt success).

Real captioned images score 100% position and brightness and the classifier's own accuracy on class;
wrong captions score at chance (tests/test_t2i.py).
"""
from __future__ import annotations

import torch

from dydit.data.captioned_fmnist import ITEM, LEVEL_SCALE, QUADRANTS, caption_attributes

PEAK_PIXELS = 2  # a thin item (a sandal) has few bright pixels; 2, not 1, so one hot pixel cannot decide
LEVEL_THRESHOLD = 0.5 * (LEVEL_SCALE[0] + LEVEL_SCALE[1])


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Model-space canvases (N, 1, H, W) in [-1, 1] -> (N, H, W) in [0, 1]."""
    x = images.float()
    if x.ndim == 4:
        x = x[:, 0]
    return ((x + 1) / 2).clamp(0, 1)


def quadrant_crops(canvas01: torch.Tensor, quadrant: torch.Tensor) -> torch.Tensor:
    """(N, H, W) canvases and quadrants (N,) -> the (N, 28, 28) crops."""
    out = torch.empty(len(canvas01), ITEM, ITEM)
    for i, q in enumerate(quadrant.tolist()):
        r, c = divmod(q, 2)
        out[i] = canvas01[i, r * ITEM:(r + 1) * ITEM, c * ITEM:(c + 1) * ITEM]
    return out


def item_quadrant(canvas01: torch.Tensor) -> torch.Tensor:
    """The quadrant (N,) with the largest summed intensity."""
    mass = torch.stack([quadrant_crops(canvas01, torch.full((len(canvas01),), q)).sum(dim=(1, 2))
                        for q in range(len(QUADRANTS))], dim=1)
    return mass.argmax(1)


def item_peak(crops: torch.Tensor) -> torch.Tensor:
    """(N,) mean of the ``PEAK_PIXELS`` brightest pixels of each crop."""
    return crops.flatten(1).topk(PEAK_PIXELS, dim=1).values.mean(1)


def item_level(crops: torch.Tensor) -> torch.Tensor:
    """(N,) 1 = bright, 0 = dim."""
    return (item_peak(crops) > LEVEL_THRESHOLD).long()


def normalised_uint8(crops: torch.Tensor) -> torch.Tensor:
    """Crops rescaled to peak 1 as uint8 (N, 28, 28): what the classifier saw in training."""
    scaled = crops / item_peak(crops).clamp(min=1e-3).view(-1, 1, 1)
    return (scaled.clamp(0, 1) * 255).round().to(torch.uint8)


@torch.no_grad()
def score_captioned(images: torch.Tensor, caption_ids, classifier=None, reference=None, fid: bool = True,
                    data: str | None = None, cache_dir=None) -> dict:
    """Adherence accuracies and crop FID of canvases (N, 1, H, W) in [-1, 1] generated for ``caption_ids``."""
    from dydit.classifier import load_classifier, predict
    from dydit.evaluate import feature_statistics, frechet_distance, reference_statistics

    attrs = caption_attributes(caption_ids)
    if bool((attrs["class"] < 0).any()):
        raise ValueError("the empty caption has no attributes to score; pass captioned ids")
    canvas = to_unit(images)
    crops = quadrant_crops(canvas, attrs["quadrant"])
    classifier = classifier if classifier is not None else load_classifier()
    feats, preds = predict(classifier, normalised_uint8(crops))
    found = item_quadrant(canvas)
    pos_ok = found == attrs["quadrant"]
    level_ok = item_level(quadrant_crops(canvas, found)) == attrs["level"]
    class_ok = preds.cpu() == attrs["class"]
    out = {"class_acc": class_ok.float().mean().item(), "position_acc": pos_ok.float().mean().item(),
           "brightness_acc": level_ok.float().mean().item(),
           "all_acc": (class_ok & pos_ok & level_ok).float().mean().item(), "num_samples": len(canvas)}
    if fid:
        if reference is None:
            reference = reference_statistics(classifier, data=data, cache_dir=cache_dir)
        out["crop_fid"] = frechet_distance(*feature_statistics(feats), *reference)
    return out


def evaluate_t2i(model, num_samples: int = 400, steps: int = 25, cfg_scale: float = 4.0, seed: int = 0,
                 dyn=None, batch_size: int = 100, **score_kwargs) -> dict:
    """Samples ``num_samples`` balanced captions from a text-to-image model and scores them; adds s/image."""
    import time

    from dydit.data.captioned_fmnist import balanced_caption_ids
    from dydit.t2i import sample_captions

    ids = balanced_caption_ids(num_samples, seed)
    start = time.perf_counter()
    images = sample_captions(model, ids, steps=steps, cfg_scale=cfg_scale, seed=seed, dyn=dyn, batch_size=batch_size)
    elapsed = time.perf_counter() - start
    out = score_captioned(images, ids, **score_kwargs)
    out.update(s_per_image=elapsed / num_samples, steps=steps, cfg_scale=cfg_scale)
    return out
