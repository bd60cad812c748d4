"""Gaussian diffusion as in DiT / IDDPM: linear 1000-step schedule, ε prediction with learned-range
variance, training loss ε-MSE + VLB, timestep respacing, DDPM ancestral and DDIM samplers
(DPM-Solver++ lives in :mod:`dydit.diffusion.dpm_solver`).

Timesteps given to the model are always in the original 1000-step units, also after respacing, so a
dynamic model's width plan is indexed by the same t the routers were trained on.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np
import torch

GAUSSIAN_SAMPLERS = ("ddpm", "ddim")


def linear_betas(num_timesteps: int = 1000) -> np.ndarray:
    scale = 1000 / num_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: str | int) -> list[int]:
    """IDDPM respacing: which of the original steps to keep ("250", "ddim50", or "10,15,20")."""
    if isinstance(section_counts, int):
        section_counts = str(section_counts)
    if section_counts.startswith("ddim"):
        desired = int(section_counts[len("ddim"):])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == desired:
                return sorted(range(0, num_timesteps, stride))
        raise ValueError(f"cannot create exactly {desired} steps with an integer stride")
    counts = [int(x) for x in section_counts.split(",")]
    size_per = num_timesteps // len(counts)
    extra = num_timesteps % len(counts)
    start_idx, all_steps = 0, []
    for i, section_count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide section of {size} steps into {section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx, taken = 0.0, []
        for _ in range(section_count):
            taken.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        all_steps += taken
        start_idx += size
    return sorted(set(all_steps))


def ddim_or_even_spacing(num_timesteps: int, num_steps: int) -> str:
    """DDIM's uniform stride ("ddimN": 0, s, 2s, ...) when N divides T, else IDDPM's even spacing ("N")."""
    return f"ddim{num_steps}" if num_timesteps % num_steps == 0 else str(num_steps)


def _randn(x: torch.Tensor, generator) -> torch.Tensor:
    """Standard normal like ``x``, drawn on the generator's device (CPU) so seeds reproduce anywhere."""
    return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)


def _extract(arr: np.ndarray, t: torch.Tensor, shape) -> torch.Tensor:
    out = torch.from_numpy(arr).to(t.device)[t].float()
    return out.view(-1, *([1] * (len(shape) - 1)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of 8-bit data in [-1, 1] under a discretised Gaussian (IDDPM decoder term)."""
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


def mean_flat(x):
    return x.mean(dim=list(range(1, x.ndim)))


class GaussianDiffusion:
    """Discrete-time diffusion with (optionally respaced) betas.

    ``timestep_map[i]`` is the original-schedule timestep of respaced step i; the model always sees it.
    """

    objective = "diffusion"

    def __init__(self, num_timesteps: int = 1000, respacing: str | int | None = None, learn_sigma: bool = True,
                 sampler: str = "ddpm", clip_denoised: bool = False):
        # Pixel-space models clamp the predicted x0 to the data range while sampling (as IDDPM/ADM do);
        # latent models (DiT) do not.
        self.clip_denoised = clip_denoised
        if sampler not in GAUSSIAN_SAMPLERS:
            raise ValueError(f"unknown diffusion sampler {sampler!r}; choose from {GAUSSIAN_SAMPLERS}")
        self.sampler = sampler
        base_betas = linear_betas(num_timesteps)
        self.original_num_steps = num_timesteps
        self.learn_sigma = learn_sigma
        if respacing is None or str(respacing) == str(num_timesteps):
            use = list(range(num_timesteps))
            betas = base_betas
        else:
            use = space_timesteps(num_timesteps, respacing)
            alphas_cumprod = np.cumprod(1.0 - base_betas)
            keep = set(use)
            last, new_betas = 1.0, []
            for i, ac in enumerate(alphas_cumprod):
                if i in keep:
                    new_betas.append(1 - ac / last)
                    last = ac
            betas = np.array(new_betas)
        self.timestep_map = np.array(use, dtype=np.int64)
        self.betas = betas
        self.num_timesteps = len(betas)
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = (
            np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
            if len(self.posterior_variance) > 1
            else np.array([])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    # ---- model time units ----
    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Respaced indices -> original-schedule timesteps (what the network is conditioned on)."""
        return torch.from_numpy(self.timestep_map).to(t.device)[t]

    def sampling_timesteps(self) -> list[int]:
        """The model-unit timesteps a full sampling run visits, in order (for the inference plan)."""
        return [int(v) for v in self.timestep_map[::-1]]

    # ---- forward process ----
    def q_sample(self, x_start, t, noise=None):
        if noise is None:
            noise = torch.randn_like(x_start)
        return _extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start + _extract(
            self.sqrt_one_minus_alphas_cumprod, t, x_start.shape
        ) * noise

    def q_posterior_mean_variance(self, x_start, x_t, t):
        mean = _extract(self.posterior_mean_coef1, t, x_t.shape) * x_start + _extract(
            self.posterior_mean_coef2, t, x_t.shape
        ) * x_t
        var = _extract(self.posterior_variance, t, x_t.shape)
        log_var = _extract(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, var, log_var

    # ---- reverse process ----
    def p_mean_variance(self, model_output, x, t, clip_denoised: bool = False):
        """Turns raw network output (B, 2C or C, ...) into the reverse-step mean and log-variance."""
        C = x.shape[1]
        if self.learn_sigma:
            if model_output.shape[1] != 2 * C:
                raise ValueError(f"learned-sigma diffusion needs {2 * C} output channels, got {model_output.shape[1]}")
            eps, var_values = model_output[:, :C], model_output[:, C:]
            min_log = _extract(self.posterior_log_variance_clipped, t, x.shape)
            max_log = _extract(np.log(self.betas), t, x.shape)
            frac = (var_values + 1) / 2
            log_var = frac * max_log + (1 - frac) * min_log
        else:
            eps = model_output[:, :C]
            log_var = _extract(np.log(np.append(self.posterior_variance[1], self.betas[1:])), t, x.shape)
        pred_x0 = self.predict_x0_from_eps(x, t, eps)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x, t)
        return {"mean": mean, "log_variance": log_var, "pred_xstart": pred_x0, "eps": eps}

    def predict_x0_from_eps(self, x_t, t, eps):
        return _extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - _extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t.shape
        ) * eps

    def predict_eps_from_x0(self, x_t, t, pred_x0):
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_x0) / _extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t.shape
        )

    # ---- training ----
    def sample_t(self, batch_size: int, device, generator=None, stratified: bool = False, strata: int = 4):
        """Uniform timesteps; ``stratified`` splits the batch into ``strata`` groups covering each
        quarter of [0, T) so a batch mean (e.g. the FLOPs ratio) spans the whole trajectory."""
        if not stratified:
            return torch.randint(0, self.num_timesteps, (batch_size,), device=device, generator=generator)
        edges = np.linspace(0, self.num_timesteps, strata + 1).astype(int)
        groups = np.array_split(np.arange(batch_size), strata)
        t = torch.empty(batch_size, dtype=torch.long)
        for g, lo, hi in zip(groups, edges[:-1], edges[1:]):
            t[g] = torch.randint(int(lo), int(hi), (len(g),), generator=generator)
        return t.to(device)

    def training_losses(self, model_fn: Callable, x_start, t, noise=None):
        """ε-MSE + VLB (the VLB only trains the variance: the mean is detached, as in IDDPM).

        ``model_fn(x_t, model_t)`` returns the network output; t are respaced indices.
        Returns per-sample terms: loss, mse, vb.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        out = model_fn(x_t, self.model_timesteps(t))
        C = x_start.shape[1]
        terms = {"mse": mean_flat((noise - out[:, :C].float()) ** 2)}
        if self.learn_sigma:
            frozen = torch.cat([out[:, :C].detach(), out[:, C:]], dim=1).float()
            terms["vb"] = self._vb_terms_bpd(frozen, x_start, x_t, t) * self.num_timesteps / 1000.0
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms

    def _vb_terms_bpd(self, model_output, x_start, x_t, t):
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    # ---- samplers ----
    def sample(self, model_fn, noise, progress=None, generator=None):
        """Runs the sampler chosen at construction (``ddpm`` or ``ddim``)."""
        run = self.ddpm_sample if self.sampler == "ddpm" else self.ddim_sample
        return run(model_fn, noise, progress=progress, generator=generator)

    def ddpm_sample(self, model_fn, noise, progress: Iterable | None = None, generator=None):
        """Ancestral sampling with the learned variance; ``model_fn(x, model_t)`` -> network output."""
        x = noise
        indices = list(range(self.num_timesteps))[::-1]
        for i in progress(indices) if progress else indices:
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            out = self.p_mean_variance(model_fn(x, self.model_timesteps(t)).float(), x, t, self.clip_denoised)
            z = _randn(x, generator) if i > 0 else torch.zeros_like(x)
            x = out["mean"] + torch.exp(0.5 * out["log_variance"]) * z
        return x

    def ddim_sample(self, model_fn, noise, eta: float = 0.0, progress=None, generator=None):
        """DDIM (eta = 0: deterministic); with respacing "ddimN" this is the paper's strided DDIM."""
        x = noise
        indices = list(range(self.num_timesteps))[::-1]
        for i in progress(indices) if progress else indices:
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            out = self.p_mean_variance(model_fn(x, self.model_timesteps(t)).float(), x, t, self.clip_denoised)
            # eps consistent with the (possibly clipped) x0, as IDDPM does
            eps = self.predict_eps_from_x0(x, t, out["pred_xstart"])
            a_bar = _extract(self.alphas_cumprod, t, x.shape)
            a_bar_prev = _extract(self.alphas_cumprod_prev, t, x.shape)
            sigma = eta * torch.sqrt((1 - a_bar_prev) / (1 - a_bar)) * torch.sqrt(1 - a_bar / a_bar_prev)
            mean = out["pred_xstart"] * torch.sqrt(a_bar_prev) + torch.sqrt(1 - a_bar_prev - sigma**2) * eps
            if i > 0 and eta > 0:
                mean = mean + sigma * _randn(x, generator)
            x = mean
        return x
