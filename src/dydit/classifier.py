"""A small Fashion-MNIST CNN whose penultimate layer is the feature space of "FID (FMNIST classifier)".

The network is trained once by `dydit train-classifier` and shipped under ``dydit/assets``; its
features are only meaningful for 28x28 grayscale clothing images, so the FID it defines is not
comparable with Inception FID.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_TAG = "dydit-fmnist-classifier"
# Mean and std of the Fashion-MNIST training pixels in [0, 1].
PIXEL_MEAN, PIXEL_STD = 0.2860, 0.3530


@dataclass
class ClassifierConfig:
    """Architecture of :class:`FMNISTClassifier`; saved in config.json beside the weights."""

    channels: tuple[int, int, int] = (32, 64, 128)
    feature_dim: int = 128  # width of the penultimate layer = FID feature dimension
    num_classes: int = 10
    dropout: float = 0.3
    image_size: int = 28

    @classmethod
    def from_dict(cls, d: dict) -> "ClassifierConfig":
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if "channels" in kw:
            kw["channels"] = tuple(kw["channels"])
        return cls(**kw)


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class FMNISTClassifier(nn.Module):
    """uint8 (N, 28, 28) or (N, 1, 28, 28) images -> logits (N, 10); normalisation happens inside."""

    def __init__(self, config: ClassifierConfig | None = None):
        super().__init__()
        self.config = c = config or ClassifierConfig()
        c1, c2, c3 = c.channels
        self.body = nn.Sequential(
            _conv_bn(1, c1), nn.MaxPool2d(2),  # (N, c1, 14, 14)
            _conv_bn(c1, c2), nn.MaxPool2d(2),  # (N, c2, 7, 7)
            _conv_bn(c2, c3), nn.MaxPool2d(2),  # (N, c3, 3, 3)
        )
        self.feature = nn.Sequential(nn.Flatten(), nn.Linear(c3 * 9, c.feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(c.dropout), nn.Linear(c.feature_dim, c.num_classes))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or float in [0, 255]) images -> standardised float (N, 1, 28, 28)."""
        x = images.float()
        if x.ndim == 3:
            x = x.unsqueeze(1)
        if x.ndim != 4 or x.shape[1] != 1 or tuple(x.shape[-2:]) != (self.config.image_size,) * 2:
            s = self.config.image_size
            raise ValueError(f"expected grayscale images (N, {s}, {s}) or (N, 1, {s}, {s}), got {tuple(images.shape)}")
        return (x / 255.0 - PIXEL_MEAN) / PIXEL_STD

    def forward_with_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (features (N, feature_dim), logits (N, num_classes))."""
        feats = self.feature(self.body(self.normalize(images)))
        return feats, self.head(feats)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(images)[0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(images)[1]


# ---------------------------------------------------------------------------------------------
# save / load (safetensors only: loading never executes code)
# ---------------------------------------------------------------------------------------------


def save_classifier(model: FMNISTClassifier, folder, extra: dict | None = None) -> Path:
    """Writes ``folder/config.json`` and ``folder/model.safetensors`` atomically."""
    from safetensors.torch import save_file

    from dydit.io.atomic import atomic_path, atomic_write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(folder / WEIGHTS_NAME) as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
    cfg = {"_format": FORMAT_TAG, "model": asdict(model.config), **(extra or {})}
    atomic_write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", folder / CONFIG_NAME)
    return folder


def load_classifier(path=None, map_location="cpu") -> FMNISTClassifier:
    """Loads a classifier folder (default: the one shipped with dydit) in eval mode."""
    from safetensors.torch import load_file

    if path is None:
        from dydit.assets import classifier_path

        path = classifier_path()
    folder = Path(path)
    cfg_file, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not (cfg_file.exists() and weights.exists()):
        raise FileNotFoundError(
            f"{folder}: expected {CONFIG_NAME} and {WEIGHTS_NAME}; train one with `dydit train-classifier --out {folder}`"
        )
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("_format") != FORMAT_TAG:
        raise ValueError(f"{cfg_file}: not a dydit Fashion-MNIST classifier (_format {cfg.get('_format')!r})")
    model = FMNISTClassifier(ClassifierConfig.from_dict(cfg["model"]))
    model.load_state_dict(load_file(str(weights), device=str(map_location)), strict=True)
    return model.eval()


def classifier_hash(model: FMNISTClassifier) -> str:
    """SHA-256 of the weights (names, shapes, bytes): keys caches of statistics in its feature space."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@torch.no_grad()
def predict(model: FMNISTClassifier, images: torch.Tensor, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, D) and predicted classes (N,) for uint8 images, in batches, on the model's device."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    feats, preds = [], []
    for i in range(0, len(images), batch_size):
        f, logits = model.forward_with_features(images[i : i + batch_size].to(device))
        feats.append(f.double().cpu())
        preds.append(logits.argmax(1).cpu())
    model.train(was_training)
    if not feats:
        return torch.zeros(0, model.config.feature_dim, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(preds)


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------


def _augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and shifts of up to 2 pixels (uint8 (N, 28, 28) -> same)."""
    n = len(images)
    flip = torch.rand(n, generator=gen) < 0.5
    images = torch.where(flip[:, None, None], images.flip(-1), images)
    padded = F.pad(images, (2, 2, 2, 2))
    dx, dy = torch.randint(0, 5, (2,), generator=gen).tolist()  # one shift per batch keeps this cheap
    return padded[:, dy : dy + 28, dx : dx + 28]


def evaluate_accuracy(model: FMNISTClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    _, preds = predict(model, images)
    return (preds == labels).double().mean().item()


def train_classifier(epochs: int = 6, batch_size: int = 128, lr: float = 2e-3, weight_decay: float = 0.05,
                     seed: int = 0, data: str | None = None, config: ClassifierConfig | None = None,
                     progress: bool = True, limit: int | None = None) -> tuple[FMNISTClassifier, dict]:
    """Trains on the 60k training images (AdamW, cosine schedule, flips and shifts); returns (model, metrics)."""
    from dydit.data.fashion_mnist import load_fashion_mnist

    torch.manual_seed(seed)
    tr_x, tr_y = (torch.from_numpy(a.copy()) for a in load_fashion_mnist("train", data))
    te_x, te_y = (torch.from_numpy(a.copy()) for a in load_fashion_mnist("test", data))
    if limit:
        tr_x, tr_y = tr_x[:limit], tr_y[:limit]
    model = FMNISTClassifier(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = len(tr_x) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs * steps_per_epoch, desc="classifier", dynamic_ncols=True)
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(tr_x), generator=gen)
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            x = _augment(tr_x[idx], gen)
            loss = F.cross_entropy(model(x), tr_y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
        acc = evaluate_accuracy(model, te_x, te_y)
        log.info("epoch %d: test accuracy %.4f", epoch + 1, acc)
    if bar is not None:
        bar.close()
    model.eval()
    metrics = {
        "test_accuracy": evaluate_accuracy(model, te_x, te_y),
        "train_accuracy": evaluate_accuracy(model, tr_x, tr_y),
        "train_seconds": round(time.time() - t0, 1),
        "train_args": dict(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed,
                           limit=limit),
        "torch_version": torch.__version__,
    }
    return model, metrics
