"""ImageFolder (DiT's preprocessing, deterministic flips) and the VAE latent cache, on a tiny tree."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dydit.data import ImageFolder, LatentCache, is_image_folder

SIZE = 16
# class folder -> image sizes (W, H); created out of order to check that labels follow sorted names
TREE = {"b_cat": [(37, 23), (70, 45), (16, 16)], "a_dog": [(23, 37), (40, 40)], "c_fox": [(19, 33), (64, 20)]}
CLASSES = sorted(TREE)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    rng = np.random.default_rng(0)
    for name, sizes in TREE.items():
        (root / name).mkdir()
        for k, (w, h) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name / f"{k}.png")
    (root / "b_cat" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    ae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                       up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                       norm_num_groups=8, sample_size=SIZE)
    folder = tmp_path_factory.mktemp("vae")
    ae.save_pretrained(folder)
    return folder


def test_labels_shapes_and_range(tree):
    ds = ImageFolder(tree, SIZE)
    assert ds.classes == CLASSES and ds.num_classes == 3 and len(ds) == 7
    expect = [CLASSES.index(c) for c in CLASSES for _ in TREE[c]]
    assert ds.labels.tolist() == expect
    x, y = ds.batch(torch.arange(len(ds)))
    assert x.shape == (7, 3, SIZE, SIZE) and x.dtype == torch.float32  # (N, C, H, W)
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.9 and x.max() > 0.9
    assert y.tolist() == expect
    x0, y0 = ds[3]
    assert torch.equal(x0, x[3]) and y0 == y[3]

    gray = ImageFolder(tree, SIZE, pad=2, channels=1, limit=4)
    xg, _ = gray.batch(torch.arange(4))
    assert len(gray) == 4 and xg.shape == (4, 1, SIZE + 4, SIZE + 4)
    assert (xg[..., :2, :] == -1).all() and (xg[..., :, -2:] == -1).all()  # background padding


def test_center_crop_matches_pil(tree):
    ds = ImageFolder(tree, SIZE)
    i = ds.files.index("b_cat/1.png")  # 70x45: one box halving to 35x22, bicubic to 25x16, crop x from 4
    with Image.open(tree / "b_cat" / "1.png") as im:
        im = im.convert("RGB").resize((35, 22), Image.Resampling.BOX).resize((25, 16), Image.Resampling.BICUBIC)
    ref = np.array(im)[:, 4:20]  # (16, 16, 3)
    assert np.array_equal(ds.load_uint8(i), ref)
    ref_x = torch.from_numpy(ref).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(ds[i][0], ref_x, rtol=0, atol=1e-6)


def test_flip_is_deterministic_per_step_and_index(tree):
    ds = ImageFolder(tree, SIZE, seed=3)
    idx = torch.arange(len(ds))
    plain, _ = ds.batch(idx)

    def flips(step, order=idx):
        x, _ = ds.batch(order, step=step)
        ref = plain[order]
        is_flip = torch.tensor([torch.equal(a, b.flip(-1)) for a, b in zip(x, ref)])
        assert all(torch.equal(a, b) or f for a, b, f in zip(x, ref, is_flip))  # each image: as is or mirrored
        return is_flip

    assert torch.equal(ds.batch(idx, step=5)[0], ImageFolder(tree, SIZE, seed=3).batch(idx, step=5)[0])
    masks = [flips(s) for s in range(6)]
    assert any(not torch.equal(masks[0], m) for m in masks[1:])
    assert 0 < torch.stack(masks).float().mean() < 1
    # a function of the index, not of the position in the batch (batches split across ranks agree)
    perm = torch.tensor([4, 0, 6, 2])
    assert torch.equal(flips(2, perm), masks[2][perm])
    assert not ImageFolder(tree, SIZE, flip=False).batch(idx, step=1)[0].ne(plain).any()
    assert torch.equal(ds.batch(idx)[0], plain)  # no step, no flip


def test_clear_errors_on_bad_roots(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        ImageFolder(tmp_path / "missing", SIZE)
    with pytest.raises(ValueError, match=r"no class subfolders.*<class_name>"):
        ImageFolder(tmp_path, SIZE)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "loose.png")  # images but no class folders
    with pytest.raises(ValueError, match="no class subfolders"):
        ImageFolder(tmp_path, SIZE)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match=f"{tmp_path}.*hold no images"):
        ImageFolder(tmp_path, SIZE)
    assert not is_image_folder(tmp_path) and not is_image_folder(None)


def test_latent_cache_matches_direct_encoding(tree, vae_dir, tmp_path):
    from dydit.vae import load_vae

    vae = load_vae(vae_dir)
    ds = ImageFolder(tree, SIZE, seed=1)
    path = tmp_path / "latents.safetensors"
    built = LatentCache.build(ds, vae, path, batch_size=32, progress=False)
    assert not list(tmp_path.glob(".*.tmp"))
    cache = LatentCache.load(path, dataset=ds, vae=vae)
    assert len(cache) == len(ds) and cache.num_classes == 3 and cache.classes == CLASSES

    idx = torch.arange(len(ds))
    x, y = ds.batch(idx)
    direct, direct_flip = vae.encode(x, sample=False), vae.encode(x.flip(-1), sample=False)
    assert direct.shape == (7, 4, SIZE // 2, SIZE // 2)
    for c in (built, cache):
        torch.testing.assert_close(c.latents, direct, rtol=0, atol=1e-6)
        torch.testing.assert_close(c.latents_flip, direct_flip, rtol=0, atol=1e-6)
        assert torch.equal(c.labels, y)

    # the flipped latent is served exactly where ImageFolder flips the image
    n_flipped = 0
    for step in range(4):
        z, yz = cache.batch(idx, step=step)
        xs, _ = ds.batch(idx, step=step)
        flipped = torch.tensor([not torch.equal(a, b) for a, b in zip(xs, x)])
        assert torch.equal(z[flipped], cache.latents_flip[flipped])
        assert torch.equal(z[~flipped], cache.latents[~flipped])
        assert torch.equal(yz, y)
        n_flipped += int(flipped.sum())
    assert 0 < n_flipped < 4 * len(ds)
    assert torch.equal(cache.batch(idx)[0], cache.latents)  # no step, no flip

    with pytest.raises(ValueError, match=r"image_size.*rebuild"):
        LatentCache.load(path, dataset=ImageFolder(tree, 8), vae=vae)
    with pytest.raises(ValueError, match=r"different dataset.*rebuild"):
        LatentCache.load(path, dataset=ImageFolder(tree, SIZE, limit=5))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="rebuild"):
        LatentCache.load(path)


def test_train_on_latent_cache_and_default_dataset_choice(tree, vae_dir, tmp_path):
    from dydit.models.dit import build_model
    from dydit.train import TrainConfig, train
    from dydit.vae import load_vae

    cfg = dict(steps=2, batch_size=4, log_every=1, ckpt_every=2, sample_every=0, warmup_steps=1, threads=1)
    cache = LatentCache.build(ImageFolder(tree, SIZE), load_vae(vae_dir), tmp_path / "z.safetensors", progress=False)
    torch.manual_seed(0)
    model = build_model("DiT-Tiny", input_size=SIZE // 2, in_channels=4, hidden_size=32, depth=1)
    ema = train(TrainConfig(out=str(tmp_path / "cached"), **cfg), model=model, dataset=cache, progress=False)
    assert all(torch.isfinite(p).all() for p in ema.parameters())

    # no dataset given: an image tree plus a VAE model builds OUT/latents.safetensors and trains on it
    torch.manual_seed(0)
    model = build_model("DiT-Tiny", input_size=SIZE // 2, in_channels=4, hidden_size=32, depth=1, vae=str(vae_dir))
    out = tmp_path / "auto"
    train(TrainConfig(out=str(out), data=str(tree), **cfg), model=model, progress=False)
    auto = LatentCache.load(out / "latents.safetensors")
    torch.testing.assert_close(auto.latents, cache.latents, rtol=0, atol=1e-6)
    # ... and a pixel-space model trains on the images themselves
    torch.manual_seed(0)
    model = build_model("DiT-Tiny", input_size=SIZE, in_channels=3, patch_size=4, hidden_size=32, depth=1)
    train(TrainConfig(out=str(tmp_path / "pixels"), data=str(tree), **cfg), model=model, progress=False)
    assert (tmp_path / "pixels" / "checkpoint.pt").exists()
