"""B4 video metrics, validated on real Moving Fashion-MNIST clips: real clips score high per-frame accuracy and
consistency and a small motion error; shuffled frames, a static item and noise score clearly worse."""
import numpy as np
import pytest
import torch

from dydit.data import MovingFashionMNIST
from dydit.data.moving_fmnist import bouncing_trajectory
from dydit.video_metrics import (as_video_frames, crop_reference_statistics, evaluate_real_clips, evaluate_videos,
                                 item_crops, locate_items, motion_error, reference_crops, save_videos_npz)

N = 48


@pytest.fixture(scope="module")
def real():
    data = MovingFashionMNIST("test", num_frames=8, canvas=32, seed=0, limit=N)
    return data.batch_with_positions(torch.arange(N))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return crop_reference_statistics(cache_dir=tmp_path_factory.mktemp("cache"), limit=2000)


def test_the_located_track_is_the_true_one_and_the_crops_are_the_items(real):
    x, y, pos = real
    track, windows = locate_items(as_video_frames(x))
    offset = track - pos  # the centroid's offset from the box centre: one constant per clip
    assert torch.allclose(offset, offset[:, :1].expand_as(offset), atol=1e-9)
    assert offset.abs().max() < 14 / 2  # inside the item's box
    crops = item_crops(as_video_frames(x), pos)  # at the true positions: exactly the reference's crops
    from dydit.data import load_fashion_mnist

    images, _ = load_fashion_mnist("test")
    expected = reference_crops(images[:N]).repeat_interleave(8, 0)
    assert (crops.int() - expected.int()).abs().max() <= 1  # float rounding of the area resize
    assert (windows - pos).abs().float().mean() < 1.0


def test_motion_error_is_zero_for_the_data_procedure_and_large_otherwise():
    rng = np.random.default_rng(0)
    tracks = np.stack([bouncing_trajectory(rng, 8, 0.2) * 18 + 1.3 for _ in range(20)])  # + a centroid offset
    assert ((tracks <= 1.3 + 1e-9) | (tracks >= 19.3 - 1e-9)).any(), "some of them must bounce"
    assert motion_error(tracks, 32).max() < 0.15
    assert motion_error(tracks, 32, speed=None).max() < 0.15
    static = np.full((20, 8, 2), 9.0)
    assert motion_error(static, 32).min() > 1.5  # the data never stands still
    assert motion_error(static, 32, speed=None).max() < 0.15  # …but a free velocity of 0 fits it
    jitter = tracks + rng.normal(0, 2.0, tracks.shape)
    assert motion_error(jitter, 32).mean() > 1.0


def _motion(videos):
    return motion_error(locate_items(as_video_frames(videos))[0], 32).mean()


def test_real_clips_score_high_and_shuffled_frames_or_noise_clearly_worse(real, reference):
    x, y, _ = real
    ok = evaluate_videos(x, y, reference=reference)
    assert ok["frame_acc"] > 0.7 and ok["consistency"] > 0.95 and ok["motion_error_px"] < 0.4
    assert evaluate_real_clips(N, reference=reference) == ok  # the real-data ceiling is these clips' scores
    g = torch.Generator().manual_seed(0)
    shuffled = torch.stack([v[torch.randperm(8, generator=g)] for v in x])  # the same frames, out of order
    assert _motion(shuffled) > 5 * ok["motion_error_px"] and _motion(shuffled) > 1.5
    assert _motion(x[:, :1].expand_as(x)) > 1.5  # one frame repeated: the data never stands still
    noise = torch.rand((16, *x.shape[1:]), generator=g) * 2 - 1
    moving_noise = evaluate_videos(noise, y[:16], reference=reference)
    static_noise = evaluate_videos(noise[:, :1].expand_as(noise), y[:16], reference=reference)
    for v in (moving_noise, static_noise):
        assert v["frame_acc"] < 0.3 and v["frame_fid"] > 5 * ok["frame_fid"] and v["motion_error_px"] > 1.5
    assert moving_noise["consistency"] < 0.5
    # the same clips as uint8 (N, F, H, W, 3), as `dydit sample --npz` writes them, are the same frames
    u8 = ((x[:, :, 0] + 1) * 127.5).round().to(torch.uint8)[..., None].repeat(1, 1, 1, 1, 3).numpy()
    assert torch.allclose(as_video_frames(u8), as_video_frames(x), atol=0.5 / 255 + 1e-6)


def test_video_npz_export_for_fvd(tmp_path, real):
    x, y, _ = real
    u8 = ((x[:4, :, 0] + 1) * 127.5).round().to(torch.uint8)[..., None].numpy()
    path = save_videos_npz(tmp_path / "videos.npz", u8, y[:4].numpy())
    with np.load(path) as f:
        assert f["arr_0"].shape == (4, 8, 32, 32, 3) and f["arr_0"].dtype == np.uint8
        assert np.array_equal(f["arr_1"], y[:4].numpy())
    with pytest.raises(ValueError, match="uint8 videos"):
        save_videos_npz(tmp_path / "bad.npz", u8.astype(np.float32))
