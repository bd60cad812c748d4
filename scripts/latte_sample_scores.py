"""Scores a Latte training checkpoint's samples with the B4 video metrics, and saves frames 0, 4, 7 of ten videos
(issue 17: the ε-prediction vs flow-matching bases compared at 1,500 steps, docs/RESULTS.md "Video").

    python3 scripts/latte_sample_scores.py CHECKPOINT.pt OUT.png [ema|model]

20 videos (two per class), each model's own sampler (DDIM for ε-prediction, Euler for flow), at CFG 1 and 4.
DDIM used 25 steps and Euler 20 in the session-26 figures: pass STEPS=25 in the environment for DDIM.
"""
import os
import sys

import numpy as np
import torch
from PIL import Image

from dydit.models.latte import Latte, LatteConfig
from dydit.sampling import default_sampler, sample
from dydit.video_metrics import evaluate_videos


def main(path: str, out: str, weights: str = "ema"):
    torch.set_num_threads(1)
    ck = torch.load(path, map_location="cpu", weights_only=True)
    model = Latte(LatteConfig.from_dict(ck["config"]))
    model.load_state_dict(ck[weights])
    model.eval()
    steps = int(os.environ.get("STEPS", 20))
    labels = torch.arange(10).repeat(2)
    rows = []
    for cfg in (1.0, 4.0):
        v = sample(model, labels, default_sampler(model), steps, cfg_scale=cfg, seed=0)
        s = evaluate_videos(v, labels)
        print(f"step {ck['step']} {weights} {default_sampler(model)} {steps} CFG {cfg}:",
              {k: round(x, 3) for k, x in s.items() if isinstance(x, float)})
        f = ((v[:10, [0, 4, 7], 0].clamp(-1, 1) + 1) * 127.5).byte().numpy()  # (10, 3, H, W)
        rows.append(np.concatenate([np.concatenate(list(fr), 0) for fr in f], 1))
    img = np.concatenate(rows, 0)
    Image.fromarray(img).resize((img.shape[1] * 3, img.shape[0] * 3), Image.NEAREST).save(out)


if __name__ == "__main__":
    main(*sys.argv[1:])
