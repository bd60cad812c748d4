"""Diffusion and flow processes: respacing, the forward process, the VLB, and every sampler recovering
the data from an oracle network (so a wrong schedule, time unit or update rule fails)."""
import numpy as np
import pytest
import torch

from dydit.diffusion.dpm_solver import DPMSolverPlusPlus
from dydit.diffusion.flow import FlowMatching
from dydit.diffusion.gaussian import GaussianDiffusion, linear_betas, space_timesteps

torch.set_num_threads(1)

ALPHAS_CUMPROD = torch.from_numpy(np.cumprod(1.0 - linear_betas(1000)))  # original 1000-step schedule


def eps_oracle(x0, learn_sigma=True, var_value=0.0):
    """The perfect ε-network for data concentrated at x0; t must be in original 1000-step units."""

    def fn(x, t):
        a = ALPHAS_CUMPROD[t.long().cpu()].view(-1, 1, 1, 1)
        eps = ((x.double() - a.sqrt() * x0) / (1 - a).sqrt()).float()
        return torch.cat([eps, torch.full_like(eps, var_value)], 1) if learn_sigma else eps

    return fn


def gaussian_velocity_oracle(mu, s):
    """The exact SiT velocity for data ~ N(mu, s² I); its ODE maps noise z to mu + s·z."""

    def fn(x, t):
        t = t.view(-1, 1, 1, 1).double()
        return (mu + (t * s * s - (1 - t)) / (t * t * s * s + (1 - t) ** 2) * (x - t * mu)).float()

    return fn


# ---- respacing ----
def test_ddim_stride_spacing():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    with pytest.raises(ValueError, match="integer stride"):
        space_timesteps(1000, "ddim999")


def test_even_spacing_per_section():
    steps = space_timesteps(1000, "250")
    assert len(steps) == 250 and steps[0] == 0 and steps[-1] == 999 and steps == sorted(set(steps))
    steps = space_timesteps(300, "10,15,20")
    counts = [sum(lo <= s < lo + 100 for s in steps) for lo in (0, 100, 200)]
    assert counts == [10, 15, 20]
    with pytest.raises(ValueError, match="cannot divide"):
        space_timesteps(300, "101,1,1")


def test_respaced_process_keeps_the_original_noise_levels():
    d = GaussianDiffusion(respacing="ddim50")
    assert d.num_timesteps == 50
    np.testing.assert_array_equal(d.timestep_map, np.arange(0, 1000, 20))
    np.testing.assert_allclose(d.alphas_cumprod, ALPHAS_CUMPROD.numpy()[d.timestep_map], rtol=1e-12)
    assert d.sampling_timesteps() == list(range(980, -1, -20))
    t = torch.tensor([0, 49])
    assert d.model_timesteps(t).tolist() == [0, 980]


# ---- forward process and VLB ----
def test_q_sample_statistics():
    d = GaussianDiffusion()
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([10, 300, 600, 999])
    x0 = torch.full((4, 1, 200, 200), 0.6)
    x_t = d.q_sample(x0, t, noise=torch.randn(x0.shape, generator=g))
    a = ALPHAS_CUMPROD[t].float()
    torch.testing.assert_close(x_t.mean(dim=(1, 2, 3)), a.sqrt() * 0.6, atol=0.025, rtol=0)  # 5 s.e.
    torch.testing.assert_close(x_t.std(dim=(1, 2, 3)), (1 - a).sqrt(), atol=0.02, rtol=0.02)
    # unit-variance data stays unit variance at every t (variance preserving)
    x0 = torch.randn((4, 1, 100, 100), generator=g)
    x_t = d.q_sample(x0, t, noise=torch.randn(x0.shape, generator=g))
    torch.testing.assert_close(x_t.var(dim=(1, 2, 3)), torch.ones(4), atol=0.05, rtol=0)


def test_vlb_of_a_perfect_eps_model():
    d = GaussianDiffusion()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 256, (4, 2, 4, 4), generator=g) / 127.5 - 1  # 8-bit data in [-1, 1]
    t = torch.tensor([0, 1, 500, 999])
    noise = torch.randn(x0.shape, generator=g)
    # var = -1 selects the true posterior variance: the KL terms vanish, the t = 0 decoder NLL is finite
    exact = d.training_losses(eps_oracle(x0, var_value=-1.0), x0, t, noise)
    assert exact["mse"].max() < 1e-8
    assert torch.isfinite(exact["vb"]).all() and exact["vb"][0] > 0
    assert exact["vb"][1:].abs().max() < 1e-4
    # an interpolation halfway to beta: finite and non-negative; it costs bits where the two ends differ
    # (small t; at large t the posterior variance is already ~beta)
    mid = d.training_losses(eps_oracle(x0, var_value=0.0), x0, t, noise)
    assert torch.isfinite(mid["vb"]).all() and torch.isfinite(mid["loss"]).all()
    assert (mid["vb"][1:] > -1e-6).all() and mid["vb"][1] > 1e-2


# ---- diffusion samplers with an oracle ----
@pytest.mark.parametrize("sampler,respacing", [("ddim", "ddim10"), ("ddim", "7"), ("ddpm", "10")])
def test_gaussian_samplers_recover_x0_with_the_oracle(sampler, respacing):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand((2, 3, 4, 4), generator=g) * 2 - 1
    d = GaussianDiffusion(respacing=respacing, sampler=sampler)
    out = d.sample(eps_oracle(x0), torch.randn(x0.shape, generator=g), generator=g)
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)


def test_dpm_solver_recovers_x0_with_the_oracle():
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand((2, 3, 4, 4), generator=g) * 2 - 1
    solver = DPMSolverPlusPlus(10)
    assert solver.sampling_timesteps()[0] == 999
    for learn_sigma in (True, False):  # the variance channels are ignored
        out = solver.sample(eps_oracle(x0, learn_sigma), torch.randn(x0.shape, generator=g))
        torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)


def test_dpm_solver_converges_faster_than_ddim_on_gaussian_data():
    # data ~ N(mu, s²): the exact ε-model is linear in x and the probability-flow map is known
    mu, s = 0.5, 0.3
    z = torch.randn((64, 1, 1, 1), generator=torch.Generator().manual_seed(0))

    def eps(x, t):
        a = ALPHAS_CUMPROD[t.long()].view(-1, 1, 1, 1)
        var = a * s * s + 1 - a
        out = (((1 - a).sqrt() / var) * (x.double() - a.sqrt() * mu)).float()
        return torch.cat([out, torch.zeros_like(out)], 1)

    a_T = ALPHAS_CUMPROD[999]
    exact = mu + s * (z - a_T.sqrt() * mu) / (a_T * s * s + 1 - a_T).sqrt()
    err = {}
    for n in (40, 80):
        err["dpm", n] = (DPMSolverPlusPlus(n).sample(eps, z) - exact).abs().max().item()
        ddim = GaussianDiffusion(respacing=str(n), sampler="ddim")
        err["ddim", n] = (ddim.sample(eps, z) - exact).abs().max().item()
    assert err["dpm", 80] < 0.01 and err["dpm", 40] < err["ddim", 40] / 2
    assert err["dpm", 40] / err["dpm", 80] > 3  # higher order: at least ~4x per doubling
    assert err["ddim", 40] / err["ddim", 80] < 2.5  # DDIM is first order: ~2x


# ---- flow samplers ----
def test_euler_recovers_a_single_data_point():
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn((2, 2, 3, 3), generator=g)
    oracle = lambda x, t: (x1 - x) / (1 - t.view(-1, 1, 1, 1))  # noqa: E731 - never queried at t = 1
    out = FlowMatching(7, sampler="euler").sample(oracle, torch.randn(x1.shape, generator=g))
    torch.testing.assert_close(out, x1, atol=1e-5, rtol=0)


def test_heun_is_second_order_and_beats_euler():
    g = torch.Generator().manual_seed(0)
    mu, s = torch.randn((1, 2, 3, 3), generator=g), 0.5
    z = torch.randn((4, 2, 3, 3), generator=g)
    exact = mu + s * z
    oracle = gaussian_velocity_oracle(mu, s)
    err = {}
    for sampler in ("euler", "heun"):
        for n in (10, 20):
            out = FlowMatching(n, sampler=sampler).sample(oracle, z)
            err[sampler, n] = (out - exact).abs().max().item()
    assert err["heun", 10] < 0.01 and err["heun", 10] < err["euler", 10] / 10
    assert err["heun", 10] / err["heun", 20] > 2.5  # ~4 for a 2nd-order method
    assert err["euler", 10] / err["euler", 20] < 2.5  # ~2 for a 1st-order method


def test_euler_maruyama_samples_the_data_distribution_and_is_seeded():
    mu, s = torch.full((1, 1, 1, 1), 0.7), 0.5
    z = torch.randn((4000, 1, 1, 1), generator=torch.Generator().manual_seed(0))
    process = FlowMatching(100, sampler="em")
    x = process.sample(gaussian_velocity_oracle(mu, s), z, generator=torch.Generator().manual_seed(1))
    assert abs(x.mean().item() - 0.7) < 0.03 and abs(x.std().item() - 0.5) < 0.03
    small, oracle = FlowMatching(5, sampler="em"), gaussian_velocity_oracle(mu, s)
    run = lambda seed: small.sample(oracle, z[:8], generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(run(3), run(3))
    assert not torch.allclose(run(3), run(4))


def test_em_last_step_adds_no_noise():
    # one step: x = noise + h·drift(noise, t=0), whatever the generator
    z = torch.randn((2, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    v = lambda x, t: torch.ones_like(x)  # noqa: E731
    out = FlowMatching(1, sampler="em").sample(v, z, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(out, z + 1.0 + 0.5 * (0 * 1.0 - z))


def test_flow_sampling_timesteps():
    assert FlowMatching(4, sampler="euler").sampling_timesteps() == [0.0, 0.25, 0.5, 0.75]
    assert FlowMatching(4, sampler="em").sampling_timesteps() == [0.0, 0.25, 0.5, 0.75]
    assert FlowMatching(2, sampler="heun").sampling_timesteps() == [0.0, 0.5, 0.5, 1.0]
    with pytest.raises(ValueError, match="unknown flow sampler"):
        FlowMatching(4, sampler="rk4")


def test_eps_from_x0_inverts_x0_from_eps_so_clipped_ddim_steps_stay_consistent():
    # DDIM with clip_denoised must move along the eps implied by the *clipped* x0 (as IDDPM does);
    # mixing the raw eps with a clipped x0 produced noise-like samples from a working model.
    from dydit.diffusion.gaussian import GaussianDiffusion

    gd = GaussianDiffusion(respacing="ddim25", sampler="ddim", clip_denoised=True)
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(4, 1, 6, 6, generator=g) * 2
    t = torch.tensor([2, 5, 12, 24])
    x0 = torch.rand(4, 1, 6, 6, generator=g) * 2 - 1
    eps = gd.predict_eps_from_x0(x_t, t, x0)
    torch.testing.assert_close(gd.predict_x0_from_eps(x_t, t, eps), x0, rtol=1e-4, atol=1e-4)
