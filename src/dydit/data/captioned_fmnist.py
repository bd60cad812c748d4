"""Captioned Fashion-MNIST (benchmark B5's text-to-image set): a real item in one quadrant of a canvas.

Each sample is a 56×56 one-channel canvas (background 0) holding one Fashion-MNIST item (28×28, so it
fills its quadrant exactly) at a brightness level (bright: the item as it is, dim: its intensities
× 0.5), with a caption that composes class, position and brightness through one of a few templates:
"a bright sneaker in the top left", "bottom right: dim bag", ...

The caption set is finite (templates × classes × quadrants × levels, plus the empty caption that
classifier-free guidance drops to), so captions are integer ids into :data:`CAPTIONS`; the shipped
embedding table (:mod:`dydit.text`) holds every one. A caption id decodes back to its attributes, so a
batch's labels *are* its caption ids. Everything is a function of (split, seed): no files are written.
"""
from __future__ import annotations

import torch

from dydit.data.fashion_mnist import load_fashion_mnist

CANVAS = 56  # pixels; the item (28×28) fills one quadrant
ITEM = 28
CLASS_WORDS = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
QUADRANTS = ["top left", "top right", "bottom left", "bottom right"]  # row-major: (row, col) = divmod(q, 2)
LEVELS = ["dim", "bright"]
LEVEL_SCALE = (0.5, 1.0)  # intensity factor per level; Fashion-MNIST items all peak at ~255
TEMPLATES = [
    "a {level} {cls} in the {pos}",
    "{pos}: {level} {cls}",
    "a photo of a {level} {cls}, {pos}",
    "{level} {cls} at the {pos}",
]
NULL_CAPTION = 0  # the empty caption ""


def caption_id(template: int, cls: int, quadrant: int, level: int) -> int:
    return 1 + ((template * len(CLASS_WORDS) + cls) * len(QUADRANTS) + quadrant) * len(LEVELS) + level


def caption_attributes(ids) -> dict[str, torch.Tensor]:
    """Caption ids (N,) -> {"template", "class", "quadrant", "level"} (N,) each; the null caption gives -1s."""
    ids = torch.as_tensor(ids).long()
    k = ids - 1
    level, k = k % len(LEVELS), k // len(LEVELS)
    quadrant, k = k % len(QUADRANTS), k // len(QUADRANTS)
    cls, template = k % len(CLASS_WORDS), k // len(CLASS_WORDS)
    null = ids == NULL_CAPTION
    return {name: v.masked_fill(null, -1) for name, v in
            (("template", template), ("class", cls), ("quadrant", quadrant), ("level", level))}


def _all_captions() -> list[str]:
    out = [""]
    for t, template in enumerate(TEMPLATES):
        for c, cls in enumerate(CLASS_WORDS):
            for q, pos in enumerate(QUADRANTS):
                for b, level in enumerate(LEVELS):
                    assert caption_id(t, c, q, b) == len(out)
                    out.append(template.format(level=level, cls=cls, pos=pos))
    return out


CAPTIONS: list[str] = _all_captions()


def compose(items_uint8: torch.Tensor, quadrant: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """Items (N, 28, 28) uint8 -> canvases (N, 1, 56, 56) float in [0, 1]."""
    n = len(items_uint8)
    canvas = torch.zeros(n, 1, CANVAS, CANVAS)
    scale = torch.tensor(LEVEL_SCALE)[level.long()].view(n, 1, 1)
    items = items_uint8.float() / 255.0 * scale
    for q in range(len(QUADRANTS)):
        sel = (quadrant == q).nonzero().flatten()
        if len(sel):
            r, c = divmod(q, 2)
            canvas[sel, 0, r * ITEM:(r + 1) * ITEM, c * ITEM:(c + 1) * ITEM] = items[sel]
    return canvas


class CaptionedFashionMNIST(torch.utils.data.Dataset):
    """Real Fashion-MNIST items placed by (split, seed): ``batch(idx)`` -> (images (B, 1, 56, 56) in
    [-1, 1], caption ids (B,)). Attributes: ``captions(idx)`` (strings), ``attributes(idx)``."""

    num_classes = len(CLASS_WORDS)

    def __init__(self, split: str = "train", root: str | None = None, seed: int = 0, limit: int | None = None):
        images, labels = load_fashion_mnist(split, root)
        if limit:
            images, labels = images[:limit], labels[:limit]
        self.images = torch.from_numpy(images.copy())
        self.labels = torch.from_numpy(labels.copy()).long()
        # one draw per item, from (split, seed): the same dataset on every rank, run and resume
        g = torch.Generator().manual_seed(seed * 1_000_003 + {"train": 0, "test": 1}.get(split, 2))
        n = len(self.labels)
        self.quadrant = torch.randint(len(QUADRANTS), (n,), generator=g)
        self.level = torch.randint(len(LEVELS), (n,), generator=g)
        self.template = torch.randint(len(TEMPLATES), (n,), generator=g)
        self.caption_ids = caption_id(self.template, self.labels, self.quadrant, self.level)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x, y = self.batch(torch.tensor([i]))
        return x[0], y[0]

    def canvases(self, idx) -> torch.Tensor:
        """(B, 1, 56, 56) in [0, 1]."""
        idx = torch.as_tensor(idx).long()
        return compose(self.images[idx], self.quadrant[idx], self.level[idx])

    def batch(self, idx):
        idx = torch.as_tensor(idx).long()
        return self.canvases(idx) * 2.0 - 1.0, self.caption_ids[idx]

    def captions(self, idx) -> list[str]:
        return [CAPTIONS[int(i)] for i in self.caption_ids[torch.as_tensor(idx).long()]]

    def attributes(self, idx) -> dict[str, torch.Tensor]:
        return caption_attributes(self.caption_ids[torch.as_tensor(idx).long()])


def random_caption_ids(n: int, seed: int = 0) -> torch.Tensor:
    """n caption ids drawn uniformly over templates, classes, quadrants and levels (evaluation prompts)."""
    g = torch.Generator().manual_seed(seed)
    return 1 + torch.randint(len(CAPTIONS) - 1, (n,), generator=g)


def balanced_caption_ids(n: int, seed: int = 0) -> torch.Tensor:
    """n caption ids cycling over class × quadrant × level (80 combinations), templates drawn by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    k = torch.arange(n) % (len(CLASS_WORDS) * len(QUADRANTS) * len(LEVELS))
    level, k = k % len(LEVELS), k // len(LEVELS)
    quadrant, cls = k % len(QUADRANTS), k // len(QUADRANTS)
    return caption_id(torch.randint(len(TEMPLATES), (n,), generator=g), cls, quadrant, level)


__all__ = ["CaptionedFashionMNIST", "CAPTIONS", "CANVAS", "caption_id", "caption_attributes", "compose",
           "random_caption_ids", "balanced_caption_ids", "NULL_CAPTION", "CLASS_WORDS", "QUADRANTS", "LEVELS"]
