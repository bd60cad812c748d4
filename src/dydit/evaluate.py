"""Benchmark B1 quality metrics: "FID (FMNIST classifier)" and conditional accuracy.

FID is the Fréchet distance between Gaussians fitted to the penultimate-layer features of the shipped
Fashion-MNIST classifier (:mod:`dydit.classifier`), generated samples against the 10k test images. It
is not comparable with Inception FID. Conditional accuracy is the share of generated samples that the
same classifier assigns to the class they were generated for.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

from dydit.sampling import default_sampler

log = logging.getLogger(__name__)

FID_NAME = "FID (FMNIST classifier)"


# ---------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of features (N, D), in float64."""
    f = np.asarray(features.cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need at least 2 feature vectors of shape (N, D), got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||² + tr(S1 + S2 - 2 (S1 S2)^½) between two Gaussians."""
    # tr((S1 S2)^½) = tr((A S2 A)^½) with A = S1^½; A S2 A is symmetric PSD, so unlike sqrtm(S1 S2) the
    # root stays real even for rank-deficient covariances (fewer samples than feature dimensions).
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different dimensions: {mu1.shape} vs {mu2.shape}")
    sqrt_s1 = _psd_sqrt(sigma1)
    middle = sqrt_s1 @ sigma2 @ sqrt_s1
    tr_covmean = np.sqrt(np.clip(scipy.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    w, v = scipy.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def fid_from_features(features_a, features_b) -> float:
    return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b))


def conditional_accuracy(predicted, requested) -> float:
    """Share of samples whose predicted class equals the class they were generated for."""
    p, r = torch.as_tensor(np.asarray(predicted)).long(), torch.as_tensor(np.asarray(requested)).long()
    if p.shape != r.shape or p.ndim != 1:
        raise ValueError(f"predicted {tuple(p.shape)} and requested {tuple(r.shape)} must be equal 1-D shapes")
    if len(p) == 0:
        raise ValueError("no samples")
    return (p == r).double().mean().item()


# ---------------------------------------------------------------------------------------------
# reference statistics of the real images, cached per classifier and data
# ---------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    if os.environ.get("DYDIT_CACHE_DIR"):
        return Path(os.environ["DYDIT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dydit"


def reference_statistics(classifier=None, split: str = "test", data: str | None = None, cache_dir=None,
                         limit: int | None = None, transform=None, tag: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the classifier features of the real ``split`` images, computed once and cached.

    ``transform`` (uint8 images (N, 28, 28) -> the classifier's input tensor) prepares the images as the
    scored samples are prepared (video: item crops); ``tag`` names that preparation in the cache key."""
    # The cache key hashes the classifier weights and the images: a retrained classifier or other data
    # never reuses stale statistics.
    from dydit.classifier import classifier_hash, load_classifier, predict
    from dydit.data.fashion_mnist import load_fashion_mnist

    classifier = classifier if classifier is not None else load_classifier()
    images, _ = load_fashion_mnist(split, data)
    if limit:
        images = images[:limit]
    data_key = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()[:16]
    path = (Path(cache_dir or default_cache_dir())
            / f"fid_ref_{tag + '_' if tag else ''}{split}_{classifier_hash(classifier)[:16]}_{data_key}.npz")
    if path.exists():
        try:
            with np.load(path) as f:
                return f["mu"], f["sigma"]
        except Exception as e:  # a damaged cache is recomputed rather than trusted
            log.warning("ignoring unreadable FID cache %s (%s)", path, e)
    feats, _ = predict(classifier, transform(images) if transform is not None else torch.from_numpy(images.copy()))
    mu, sigma = feature_statistics(feats)
    from dydit.io.atomic import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma)
    log.info("cached %s %sreference statistics of %d images in %s", split, tag + " " if tag else "", len(images), path)
    return mu, sigma


# ---------------------------------------------------------------------------------------------
# scoring images
# ---------------------------------------------------------------------------------------------


def as_gray_uint8(images) -> torch.Tensor:
    """uint8 (N, H, W), (N, H, W, 1|3) or (N, 1, H, W) (numpy or torch) -> torch uint8 (N, H, W)."""
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images))  # a writable copy
    if x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {x.dtype}")
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    elif x.ndim == 4 and x.shape[-1] in (1, 3):
        # `dydit sample` writes grayscale replicated to RGB; averaging also handles real RGB sensibly.
        x = x.float().mean(-1).round().to(torch.uint8) if x.shape[-1] == 3 else x[..., 0]
    if x.ndim != 3:
        raise ValueError(f"expected images (N, H, W), (N, H, W, C) or (N, 1, H, W), got {tuple(x.shape)}")
    return x


def evaluate_images(images, labels=None, classifier=None, reference=None, cache_dir=None,
                    data: str | None = None) -> dict:
    """FID and conditional accuracy of uint8 samples; ``labels`` are the requested classes (optional)."""
    from dydit.classifier import load_classifier, predict

    classifier = classifier if classifier is not None else load_classifier()
    x = as_gray_uint8(images)
    if reference is None:
        reference = reference_statistics(classifier, data=data, cache_dir=cache_dir)
    feats, preds = predict(classifier, x)
    out = {"fid": frechet_distance(*feature_statistics(feats), *reference), "cond_acc": None, "num_samples": len(x)}
    if labels is not None:
        out["cond_acc"] = conditional_accuracy(preds, torch.as_tensor(np.asarray(labels)))
    return out


def load_npz_samples(path) -> tuple[np.ndarray, np.ndarray | None]:
    """Images (``arr_0``, uint8 (N, H, W, C)) and requested labels (``arr_1``, if present) of an .npz."""
    with np.load(path) as f:
        if "arr_0" not in f:
            raise ValueError(f"{path}: expected the images under key 'arr_0', found {sorted(f.keys())}")
        images = f["arr_0"]
        labels = f["arr_1"] if "arr_1" in f else None
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{path}: {len(images)} images but {len(labels)} labels")
    return images, labels


# ---------------------------------------------------------------------------------------------
# generating and scoring a model
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_samples(model, num_samples: int, sampler: str | None = None, steps: int = 25, cfg_scale: float = 1.5,
                     seed: int = 0, batch_size: int = 250, dyn=None, progress: bool = True, keep_dir=None):
    """Class-balanced samples: returns (uint8 (N, H, W, C), labels (N,), sampling seconds); a video model's
    samples are uint8 (N, F, H, W, C).

    ``keep_dir``: each finished batch is written there (atomically) and read back instead of resampled
    when it exists, so an interrupted run resumes; the caller keys the folder by model and settings. The
    last batch is always sampled, so that usage records (GMACs) come from this run.
    """
    # Labels cycle through the classes (num_samples / num_classes each when divisible). All initial
    # noise comes from one generator, so deterministic samplers give the same images for any batch size.
    from dydit.sampling import sample, video_frames
    from dydit.viz import to_uint8_images

    cfg = model.config
    sampler = sampler or default_sampler(model)
    device = next(model.parameters()).device
    labels = torch.arange(num_samples) % cfg.num_classes
    frames = video_frames(model)
    noise = torch.randn(num_samples, *((frames,) if frames else ()), cfg.in_channels, cfg.input_size,
                        cfg.input_size, generator=torch.Generator().manual_seed(seed))
    was_training = model.training
    model.eval()
    batches = range(0, num_samples, batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"sampling ({sampler}, {steps} steps)", unit="batch", dynamic_ncols=True)
    images, seconds = [], 0.0
    last = len(range(0, num_samples, batch_size)) - 1
    for b, i in enumerate(batches):
        kept = Path(keep_dir) / f"batch_{b:06d}.npz" if keep_dir is not None else None
        if kept is not None and b != last and kept.exists():
            try:
                with np.load(kept) as f:
                    images.append(f["images"])
                    seconds += float(f["seconds"])
                continue
            except Exception as e:  # a damaged batch is sampled again
                log.warning("resampling batch %d: %s is unreadable (%s)", b, kept, e)
        t0 = time.perf_counter()
        x = sample(model, labels[i : i + batch_size], method=sampler, num_steps=steps, cfg_scale=cfg_scale,
                   seed=seed * 100_003 + b, dyn=dyn, noise=noise[i : i + batch_size].to(device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - t0
        if frames:  # (B, F, C, H, W) -> uint8 (B, F, H, W, C)
            u8 = to_uint8_images(x.flatten(0, 1), pad=cfg.pixel_pad)
            images.append(u8.reshape(x.shape[0], x.shape[1], *u8.shape[1:]))
        else:
            images.append(to_uint8_images(x, pad=cfg.pixel_pad))
        if kept is not None and b != last:
            from dydit.io.atomic import atomic_path

            with atomic_path(kept) as tmp, open(tmp, "wb") as f:
                np.savez(f, images=images[-1], seconds=np.float64(time.perf_counter() - t0))
    model.train(was_training)
    return np.concatenate(images), labels.numpy(), seconds


def evaluate_model(model, num_samples: int = 5000, sampler: str | None = None, steps: int = 25,
                   cfg_scale: float = 1.5, seed: int = 0, batch_size: int = 250, dyn=None, progress: bool = True,
                   classifier=None, reference=None, cache_dir=None, data: str | None = None,
                   save_npz=None, keep_dir=None) -> dict:
    """Samples ``num_samples`` class-balanced images and scores them (B1); see :func:`generate_samples`.

    A video model's samples are scored by :func:`dydit.video_metrics.evaluate_videos` (B4: per-frame FID
    and accuracy, frame consistency, motion error) and timed per video. ``save_npz`` also writes the
    samples (uint8 RGB ``arr_0``, labels ``arr_1``: the input of users' own FID or FVD)."""
    sampler = sampler or default_sampler(model)
    if reference is None:  # the real images first: missing data fails before any sample is drawn
        from dydit.classifier import load_classifier

        classifier = classifier if classifier is not None else load_classifier()
        reference = reference_statistics(classifier, data=data, cache_dir=cache_dir)
    images, labels, seconds = generate_samples(model, num_samples, sampler, steps, cfg_scale, seed, batch_size,
                                               dyn=dyn, progress=progress, keep_dir=keep_dir)
    video = images.ndim == 5
    if save_npz:
        from dydit.video_metrics import save_videos_npz

        if video:
            save_videos_npz(save_npz, images, labels)
        else:
            save_images_npz(save_npz, images, labels)
    settings = {"num_samples": num_samples, "sampler": sampler, "steps": steps, "cfg_scale": cfg_scale,
                "seed": seed, "seconds": seconds}
    if video:
        from dydit.video_metrics import evaluate_videos

        scores = evaluate_videos(images, labels, classifier=classifier, reference=reference, data=data,
                                 cache_dir=cache_dir)
        return {**{k: scores[k] for k in ("frame_fid", "frame_acc", "consistency", "motion_error_px",
                                          "num_frames")}, **settings, "s_per_video": seconds / max(num_samples, 1)}
    scores = evaluate_images(images, labels, classifier=classifier, reference=reference, cache_dir=cache_dir,
                             data=data)
    return {"fid": scores["fid"], "cond_acc": scores["cond_acc"], **settings,
            "s_per_image": seconds / max(num_samples, 1)}


def save_images_npz(path, images: np.ndarray, labels=None) -> Path:
    """uint8 images (N, H, W, C) as ``arr_0`` (grayscale replicated to RGB, as the ADM suite wants) and
    labels as ``arr_1``."""
    rgb = np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"arr_0": rgb} if labels is None else {"arr_0": rgb, "arr_1": np.asarray(labels)}
    with open(path, "wb") as f:  # a file object keeps the name as given (np.savez would append .npz)
        np.savez(f, **arrays)
    return path


# ---------------------------------------------------------------------------------------------
# a checkpoint as B1 and B3 score it
# ---------------------------------------------------------------------------------------------


def evaluate_checkpoint(path, num_samples: int = 5000, sampler=None, steps: int = 25, cfg_scale: float = 1.5,
                        seed: int = 0, batch_size: int = 250, fbcache: float | None = None, adapters=None,
                        model_name=None, objective=None, data=None, cache_dir=None, device=None,
                        progress: bool = True, save_npz=None, keep_dir=None) -> dict:
    """B1 for one checkpoint: FID (FMNIST classifier), conditional accuracy, s/image, realised GMACs; for a
    video model B4's metrics (:func:`evaluate_model`), s/video and GMACs per video.

    Dynamic checkpoints run on the fast engine; ``adapters`` applies TD-LoRA/LoRA adapters to the base
    ``path`` (merged per timestep); ``fbcache`` stacks First-Block-Cache on either.
    """
    from dydit.dynamic.flops import flops_spec
    from dydit.dynamic.report import sampling_forwards, summarize

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, make_dyn, wrap = prepare_sampling(path, fbcache=fbcache, adapters=adapters, steps=steps,
                                             model_name=model_name, objective=objective, device=dev)
    dyn = make_dyn()
    from dydit.t2i import is_text_to_image

    if is_text_to_image(model):  # B5: GenEval-style adherence on Captioned Fashion-MNIST
        return _evaluate_t2i_checkpoint(path, model, dyn, wrap, num_samples, steps, cfg_scale, seed, batch_size,
                                        fbcache, adapters, data, cache_dir, dev)
    with wrap() as cache:
        result = evaluate_model(model, num_samples, sampler, steps, cfg_scale, seed, batch_size, dyn=dyn,
                                data=data, cache_dir=cache_dir, progress=progress, save_npz=save_npz,
                                keep_dir=keep_dir)
    spec, cfg_batches = flops_spec(model), 2 if cfg_scale != 1.0 else 1
    if cache is not None:
        from dydit.cache import cached_macs

        m = cached_macs(spec, cache, dyn.usage if dyn is not None else None, cfg_batches)
        result.update(fbcache_rdt=fbcache, block_share=cache.block_share(), flops_ratio=m["block_ratio"],
                      gmacs_per_image=m["per_image"] / 1e9, gmacs_per_forward=m["per_forward"] / 1e9)
    else:
        s = summarize(dyn.usage if dyn is not None else None, spec, cfg_batches,
                      forwards=sampling_forwards(model, result["sampler"], steps))
        result.update(flops_ratio=s["flops_ratio"], gmacs_per_forward=s["gmacs_per_forward"],
                      gmacs_per_image=s["gmacs_per_image"])
    if "s_per_video" in result:  # a video model: the FLOPs counter counts one video sample
        result["gmacs_per_video"] = result.pop("gmacs_per_image")
    result["source"] = f"{path} + {adapters}" if adapters else str(path)
    result["device"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name()
    result["threads"] = torch.get_num_threads()
    result["batch_size"] = batch_size
    return result


def _evaluate_t2i_checkpoint(path, model, dyn, wrap, num_samples, steps, cfg_scale, seed, batch_size, fbcache,
                             adapters, data, cache_dir, dev) -> dict:
    """A text-to-image (FLUX-style) model: class/position/brightness accuracy, crop FID, s/image, FLOPs;
    under First-Block-Cache (``fbcache``) too, alone or stacked on DyFLUX."""
    from dydit.dynamic.flops import flops_spec
    from dydit.dynamic.report import summarize
    from dydit.t2i import set_t2i_token_geometry
    from dydit.t2i_metrics import evaluate_t2i

    if adapters:
        raise ValueError("--adapters is not available for text-to-image models")
    set_t2i_token_geometry(model)  # the FLOPs counter's (image, text) tokens on the canvas
    with wrap() as cache:
        result = evaluate_t2i(model.eval(), num_samples, steps=steps, cfg_scale=cfg_scale, seed=seed, dyn=dyn,
                              batch_size=batch_size, data=data, cache_dir=cache_dir)
    cfg_batches = 2 if cfg_scale != 1.0 else 1
    if cache is not None:
        from dydit.cache import cached_macs

        m = cached_macs(flops_spec(model), cache, dyn.usage if dyn is not None else None, cfg_batches)
        result.update(fbcache_rdt=fbcache, block_share=cache.block_share(), flops_ratio=m["block_ratio"],
                      gmacs_per_image=m["per_image"] / 1e9, gmacs_per_forward=m["per_forward"] / 1e9)
    else:
        s = summarize(dyn.usage if dyn is not None else None, flops_spec(model), cfg_batches, forwards=steps)
        result.update(flops_ratio=s["flops_ratio"], gmacs_per_forward=s["gmacs_per_forward"],
                      gmacs_per_image=s["gmacs_per_image"])
    result["source"] = str(path)
    result["device"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name()
    result["threads"] = torch.get_num_threads()
    result["batch_size"] = batch_size
    return result


def batches_dir(path, settings: dict, adapters=None, cache_dir=None) -> Path:
    """Where `dydit eval` keeps the finished sample batches of one model and settings (see generate_samples):
    keyed like `bench compare`'s rows, by what the weights hold and every setting that changes a sample."""
    from dydit.bench_compare import Row, row_key

    key = row_key(Row("eval", str(path), fbcache=settings.get("fbcache"), adapters=adapters), settings)
    return Path(cache_dir or default_cache_dir()) / "eval_batches" / hashlib.sha256(key.encode()).hexdigest()[:20]


def prepare_sampling(path, fbcache: float | None = None, adapters=None, steps: int = 25, model_name=None,
                     objective=None, device=None):
    """Loads a row of B1/B3 for sampling: ``(model, make_dyn, wrap)``.

    ``make_dyn()`` gives the DynamicContext to sample with (the fast engine for dynamic checkpoints, with
    TD-LoRA/LoRA ``adapters`` merged per timestep; None for static ones); ``wrap()`` is a context manager
    that yields the First-Block-Cache in use (``fbcache``), or None.
    """
    import contextlib

    import dydit

    model = dydit.load(path, model_name=model_name, objective=objective).to(device or "cpu")
    if adapters:
        from dydit.peft import load_adapters, td_lora_fast_context

        model = load_adapters(model, adapters)

        def make_dyn():
            return td_lora_fast_context(model, record_usage=True)
    elif getattr(model, "dynamic_config", None) is not None:
        from dydit.dynamic import DynamicContext

        def make_dyn():
            return DynamicContext("fast", record_usage=True)  # the inference engine, not the masked reference
    else:
        def make_dyn():
            return None

    if fbcache is None:
        return model, make_dyn, lambda: contextlib.nullcontext(None)
    from dydit.cache import FirstBlockCache, cached

    return model, make_dyn, lambda: cached(model, FirstBlockCache(rdt=fbcache, num_steps=steps))


def cpu_name() -> str:
    """The CPU model (Linux /proc/cpuinfo), for result tables."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
