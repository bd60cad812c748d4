"""ε-MSE of an ε-prediction Latte checkpoint on real noised Moving Fashion-MNIST clips at t = 200, 500, 800, beside
the MSE of the trivial answer ε ≈ x_t / √(1−ᾱ_t) (issue 17: why session 25's base did not learn placement).

    python3 scripts/latte_eps_mse.py runs/mfmnist-latte/checkpoint.pt
"""
import sys

import torch

from dydit.data import MovingFashionMNIST
from dydit.diffusion.gaussian import GaussianDiffusion
from dydit.models.latte import Latte, LatteConfig
from dydit.sampling import channels_first


def main(path: str):
    torch.manual_seed(0)
    ck = torch.load(path, map_location="cpu", weights_only=True)
    model = Latte(LatteConfig.from_dict(ck["config"]))
    model.load_state_dict(ck["ema"])
    model.eval()
    c = model.config
    x, y, _ = MovingFashionMNIST("test", num_frames=c.num_frames, canvas=c.input_size).batch_with_positions(torch.arange(16))
    diff = GaussianDiffusion()
    x = x.transpose(1, 2)  # channels first, as the diffusion process takes videos
    for tt in (200, 500, 800):
        t = torch.full((len(x),), tt)
        noise = torch.randn_like(x)
        xt = diff.q_sample(x, t, noise)
        with torch.no_grad():
            eps = channels_first(lambda a, b: model(a, b, y))(xt, t)[:, : c.in_channels]
        ab = float(diff.alphas_cumprod[tt])
        trivial = xt / (1 - ab) ** 0.5
        print(f"t={tt}: model ε-MSE {((eps - noise) ** 2).mean():.4f}, trivial ε-MSE {((trivial - noise) ** 2).mean():.4f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/mfmnist-latte/checkpoint.pt")
