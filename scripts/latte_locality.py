"""How much a Latte training checkpoint uses its attention, and what it samples (issue 17 diagnosis).

    python3 scripts/latte_locality.py runs/mfmnist-latte/checkpoint.pt

Perturbs one 4×4 patch of frame 2 of a noisy video (t = 700) and prints the mean change of the predicted
ε at that patch, elsewhere in frame 2 (spatial attention's reach) and in the other frames (temporal
attention's reach); then samples one video per class (DDIM 25, CFG 4, the raw and the EMA weights) and
scores them with the B4 video metrics. A model that denoises patch by patch changes only the perturbed
patch, and samples scattered patches instead of one coherent item.
"""
import sys

import torch

from dydit.models.latte import Latte, LatteConfig
from dydit.sampling import sample
from dydit.video_metrics import evaluate_videos


def main(path: str):
    torch.manual_seed(0)
    ck = torch.load(path, map_location="cpu", weights_only=True)
    model = Latte(LatteConfig.from_dict(ck["config"]))
    print(f"{path}: step {ck['step']}")
    for key in ("model", "ema"):
        model.load_state_dict(ck[key])
        model.eval()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, model.config.num_frames, 1, model.config.input_size, model.config.input_size, generator=g)
        t, y = torch.tensor([700]), torch.tensor([3])
        with torch.no_grad():
            a = model(x, t, y)
            x2 = x.clone()
            x2[0, 2, 0, 0:4, 0:4] += 3.0
            b = model(x2, t, y)
        d = (a - b).abs()[0, :, 0]
        other = torch.cat([d[:2], d[3:]])
        print(f"  {key}: change at the perturbed patch {d[2, 0:4, 0:4].mean():.4f}, elsewhere in its frame "
              f"{d[2, 8:, 8:].mean():.4f}, other frames {other.mean():.5f}")
        labels = torch.arange(10)
        videos = sample(model, labels, "ddim", 25, cfg_scale=4.0, seed=0)
        scores = evaluate_videos(videos, labels)
        print("  " + key + ": " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items() if isinstance(v, float)))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/mfmnist-latte/checkpoint.pt")
