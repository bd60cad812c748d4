"""DyDiT core: routers start as the static function, fast path equals the masked reference,
official checkpoints load, FLOPs accounting matches the DiT paper."""
import pytest
import torch

import dydit
from dydit.dynamic import DynamicConfig, DynamicContext, dynamize, flops_spec, reorder_by_importance
from dydit.dynamic.flops import dynamic_ratio
from dydit.models.dit import build_model
from dydit.sampling import sample
from helpers import randomize, scramble_routers


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


@pytest.mark.parametrize("name", ["DiT-Tiny", "SiT-Tiny"])
def test_dynamized_model_starts_as_static_function(name):
    torch.manual_seed(0)
    model = randomize(build_model(name)).eval()
    x, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 2, 3])
    t = torch.tensor([10.0, 500.0, 999.0]) if name.startswith("DiT") else torch.tensor([0.1, 0.5, 0.9])
    ref = model(x, t, y)
    dynamize(model, reorder=True)
    for mode in ("masked", "train"):
        out = model(x, t, y, dyn=DynamicContext(mode))
        assert rel_err(out, ref) < 1e-5, mode


def test_reorder_keeps_static_function():
    model = randomize(build_model("DiT-Tiny")).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 700.0]), torch.tensor([0, 9])
    ref = model(x, t, y)
    reorder_by_importance(model)
    assert rel_err(model(x, t, y), ref) < 1e-5
    w = model.blocks[0].attn.qkv.weight.view(3, 4, 16, 64).abs().sum(dim=(0, 2, 3))
    assert w[0] >= w[-1]  # most important head first (its proj columns count too, so compare ends)


@pytest.mark.parametrize("name", ["DiT-Tiny", "SiT-Tiny"])
@pytest.mark.parametrize("batch", [1, 3, 5])
@pytest.mark.parametrize("layout", [dict(), dict(width=False), dict(tokens=False), dict(always_on=False),
                                    dict(width=False, tokens=False, block_skip=True), dict(block_skip=True),
                                    dict(token_center=True), dict(token_center=True, token_count=True)])
def test_fast_path_equals_masked_reference(name, batch, layout):
    model = scramble_routers(dynamize(randomize(build_model(name)), DynamicConfig(**layout))).eval()
    x, y = torch.randn(batch, 4, 8, 8), torch.arange(batch) % 10
    ts = [0.0, 250.0, 999.0] if name.startswith("DiT") else [0.0, 0.4, 0.95]
    differs = False
    for tv in ts:
        t = torch.full((batch,), tv)
        ref_ctx = DynamicContext("masked")
        ref = model(x, t, y, dyn=ref_ctx)
        fast = model(x, t, y, dyn=DynamicContext("fast"))
        assert rel_err(fast, ref) < 1e-5
        differs |= rel_err(ref, model(x, t, y, dyn="complete")) > 1e-3
    assert differs, "routers must actually drop compute in this test"


@pytest.mark.parametrize("name,cfg", [("DiT-Tiny", 4.0), ("SiT-Tiny", 4.0), ("DiT-Tiny", 1.0)])
def test_fast_sampling_equals_masked_sampling(name, cfg):
    model = scramble_routers(dynamize(randomize(build_model(name), scale=0.1))).eval()
    labels = [1, 2, 3]
    method = "ddim" if name.startswith("DiT") else "euler"
    a = sample(model, labels, method, 6, cfg_scale=cfg, seed=0, dyn=DynamicContext("masked"))
    b = sample(model, labels, method, 6, cfg_scale=cfg, seed=0, dyn=DynamicContext("fast"))
    assert rel_err(b, a) < 1e-5


def test_centred_token_router_leaves_which_tokens_to_the_denoising_loss():
    """Centred logits: the FLOPs loss (the same push on every token) moves only the output bias, so it cannot
    turn the router into a per-timestep switch of the whole MLP; uncentred, it moves the head's weights."""
    from dydit.dynamic.routers import TokenRouter

    torch.manual_seed(0)
    x = torch.randn(3, 10, 32)
    for center in (False, True):
        r = TokenRouter(32, 4, bias_init=2.0, center=center)
        r.mlp_head[2].weight.data.normal_()
        mask = r(x, tau=5.0, training=True)  # straight-through: the gradient of the soft gate
        (mask.mean() ** 2).backward()  # a FLOPs-style loss on the kept share
        grads = [r.mlp_head[0].weight.grad, r.mlp_head[0].bias.grad, r.mlp_head[2].weight.grad]
        if center:
            # the soft-gate slopes differ per token, so not exactly 0: compare with the uncentred push
            assert max(g.abs().max().item() for g in grads) < 0.2 * uncentred
            logits = r.logits(x)
            assert torch.allclose(logits.mean(-1), r.mlp_head[2].bias.expand(3), atol=1e-6)
            assert logits.std(-1).min() > 0.1  # per-token: the spread survives the centring
        else:
            uncentred = max(g.abs().max().item() for g in grads)
        assert r.mlp_head[2].bias.grad.abs() > 0


def test_centred_token_routers_save_and_load(tmp_path):
    model = scramble_routers(dynamize(randomize(build_model("DiT-Tiny")), DynamicConfig(token_center=True,
                                                                                         token_count=True))).eval()
    dydit.save(model, tmp_path / "m")
    back = dydit.load(tmp_path / "m")
    assert back.dynamic_config.token_center and back.blocks[0].token_selection.center
    assert back.blocks[0].token_selection.count.weight.abs().sum() > 0  # scrambled, saved and loaded
    x, t, y = torch.randn(2, 4, 8, 8), torch.full((2,), 400.0), torch.tensor([1, 2])
    assert rel_err(back(x, t, y), model(x, t, y)) < 1e-6


def test_token_count_is_refused_where_the_block_does_not_pass_its_conditioning():
    dynamize(build_model("Latte-Tiny"), DynamicConfig(token_center=True, token_count=True))  # official Latte: DiT's forward
    with pytest.raises(ValueError, match="DyFLUX's text-aware router has no such form"):
        dynamize(build_model("FLUX-Tiny"), DynamicConfig(token_center=True, token_count=True))
    dynamize(build_model("FLUX-Tiny"), DynamicConfig(token_center=True))  # centring: DyFLUX's router takes it


def test_plan_precomputed_for_sampler_timesteps():
    model = scramble_routers(dynamize(randomize(build_model("DiT-Tiny")))).eval()
    ctx = DynamicContext("fast", record_usage=True)
    sample(model, [0, 1], "ddim", 5, cfg_scale=1.0, dyn=ctx)
    assert len(ctx.plan.steps) == 5 and len(ctx.usage) == 5
    # every step ran with the planned widths
    for u in ctx.usage:
        planned = ctx.plan.steps[round(u.t, 6)]
        assert u.heads == [len(b.heads) for b in planned]


def _official_dydit_state(model, always_on=True, seed=0):
    """An authors'-format DyDiT state dict: static keys plus per-block router keys."""
    g = torch.Generator().manual_seed(seed)
    state = dict(model.state_dict())
    D, H = model.config.hidden_size, model.config.num_heads
    rows = H - 1 if always_on else H
    for i in range(model.config.depth):
        for r in ("attn_rate", "mlp_rate"):
            state[f"blocks.{i}.{r}.router.weight"] = torch.randn(rows, D, generator=g)
            state[f"blocks.{i}.{r}.router.bias"] = torch.randn(rows, generator=g)
        state[f"blocks.{i}.token_selection.mlp_head.0.weight"] = torch.randn(D // 16, D, generator=g)
        state[f"blocks.{i}.token_selection.mlp_head.0.bias"] = torch.randn(D // 16, generator=g)
        state[f"blocks.{i}.token_selection.mlp_head.2.weight"] = torch.randn(1, D // 16, generator=g)
        state[f"blocks.{i}.token_selection.mlp_head.2.bias"] = torch.randn(1, generator=g) * 0.1
    return state


def _reference_masked_forward(state, model_cfg, x, t, y, always_on):
    """Independent re-implementation of the authors' masked DyDiT block, from raw tensors."""
    import torch.nn.functional as F
    from dydit.models.dit import DiT

    static = DiT(model_cfg)
    static.load_state_dict({k: v for k, v in state.items() if "rate" not in k and "token_selection" not in k})
    static.eval()
    tokens, c, t_emb = static.embed(x, t, y)
    H = model_cfg.num_heads
    for i, blk in enumerate(static.blocks):
        s = lambda k: state[f"blocks.{i}.{k}"]  # noqa: E731
        hm = (F.linear(t_emb, s("attn_rate.router.weight"), s("attn_rate.router.bias")) > 0).float()
        gm = (F.linear(t_emb, s("mlp_rate.router.weight"), s("mlp_rate.router.bias")) > 0).float()
        if always_on:
            hm = torch.cat([torch.ones_like(hm[:, :1]), hm], 1)
            gm = torch.cat([torch.ones_like(gm[:, :1]), gm], 1)
        sm, cm, gmsa, sp, cp, gmlp = blk.adaLN_modulation(c).chunk(6, 1)
        h = blk.norm1(tokens) * (1 + cm[:, None]) + sm[:, None]
        heads = blk.attn.heads(h)
        B, N, D = heads.shape
        heads = (heads.view(B, N, H, D // H) * hm[:, None, :, None]).reshape(B, N, D)
        tokens = tokens + gmsa[:, None] * blk.attn.proj(heads)
        hid = F.relu(F.linear(tokens, s("token_selection.mlp_head.0.weight"), s("token_selection.mlp_head.0.bias")))
        tm = (F.linear(hid, s("token_selection.mlp_head.2.weight"), s("token_selection.mlp_head.2.bias")) > 0).float()
        h2 = blk.norm2(tokens) * (1 + cp[:, None]) + sp[:, None]
        a = blk.mlp.fc1(h2)
        a = (a.view(B, N, H, -1) * gm[:, None, :, None]).reshape(B, N, -1)
        tokens = tokens + tm * gmlp[:, None] * blk.mlp.fc2(blk.mlp.act(a))
    return static.unpatchify(static.final_layer(tokens, c))


@pytest.mark.parametrize("always_on", [True, False])
def test_official_dydit_checkpoint_loads_strictly_and_matches(tmp_path, always_on):
    base = randomize(build_model("DiT-Tiny"))
    state = _official_dydit_state(base, always_on)
    path = tmp_path / "dydit.pt"
    torch.save({"model": state, "ema": state, "args": None}, path)
    model = dydit.load(path, model_name="DiT-Tiny")
    assert model.dynamic_config.always_on == always_on
    x, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 4, 7])
    dydit.save(model, tmp_path / "ours")
    ours = dydit.load(tmp_path / "ours").eval()
    model.eval()
    for t in (torch.full((3,), 5.0), torch.full((3,), 600.0), torch.tensor([5.0, 300.0, 600.0])):
        ref = _reference_masked_forward(state, model.config, x, t, y, always_on)
        assert rel_err(model(x, t, y, dyn=DynamicContext("masked")), ref) < 1e-5
        # called plainly, as the authors' users call it: routers applied (fast engine for a shared t)
        assert rel_err(model(x, t, y), ref) < 1e-5
        assert rel_err(ours(x, t, y), ref) < 1e-5  # the same through our own format
        if bool((t == t[0]).all()):
            assert rel_err(model(x, t, y, dyn=DynamicContext("fast")), ref) < 1e-5
        # the complete network runs only when asked for, and it is not what the checkpoint computes
        assert rel_err(model(x, t, y, dyn="complete"), ref) > 1e-3


@pytest.mark.parametrize(
    "name,params_m,gflops",
    [("DiT-S/2", 33, 6.06), ("DiT-B/2", 130, 23.01), ("DiT-L/2", 458, 80.71), ("DiT-XL/2", 675, 118.64)],
)
def test_params_and_gmacs_match_dit_paper(name, params_m, gflops):
    with torch.device("meta"):
        model = build_model(name)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - params_m) / params_m < 0.01, n
    g = flops_spec(model).static_macs / 1e9
    assert abs(g - gflops) / gflops < 0.005, g


def test_flops_ratio_counts_active_fraction():
    model = dynamize(build_model("DiT-Tiny"))
    spec = flops_spec(model)
    from dydit.dynamic.context import BlockUsage

    from dydit.dynamic.adapters import block_adapter

    bspec = block_adapter(model.blocks[0]).spec(model.blocks[0], model)
    H, N = 4, model.config.num_tokens
    full = [BlockUsage(bspec, {"attn": torch.ones(2, H), "mlp": torch.ones(2, H)}, torch.ones(2, N))] * 2
    assert torch.allclose(dynamic_ratio(spec, full), torch.ones(2))
    half = [BlockUsage(bspec, {"attn": torch.tensor([[1, 1, 0, 0.0]] * 2), "mlp": torch.tensor([[1, 1, 1, 1.0]] * 2)},
                       torch.cat([torch.ones(2, N // 2), torch.zeros(2, N - N // 2)], 1))] * 2
    b = spec.blocks[0]
    expect = (0.5 * b.attn + 0.5 * b.mlp) / (b.attn + b.mlp)
    assert torch.allclose(dynamic_ratio(spec, half), torch.full((2,), expect))


def test_balanced_flops_loss_penalises_each_trajectory_quarter():
    from dydit.assets import default_model_path
    from dydit.dynamic.finetune import FinetuneConfig, FinetuneTask
    from dydit.dynamic.loss import flops_loss

    # quarters at 0.2, 0.4, 0.6, 0.8: the batch mean meets λ=0.5, the quarters do not
    r = torch.tensor([0.2, 0.2, 0.4, 0.4, 0.6, 0.6, 0.8, 0.8], requires_grad=True)
    assert flops_loss(r, 0.5).item() == 0.0
    q = torch.rand(12, generator=torch.Generator().manual_seed(0))
    assert torch.equal(flops_loss(q, 0.3), 2.0 * (q.mean() - 0.3) ** 2)  # balance 0: the paper's loss
    assert flops_loss(r, 0.5, balance=1.0).item() == pytest.approx(2.0 * (0.09 + 0.01 + 0.01 + 0.09) / 4)
    assert flops_loss(r, 0.5, balance=0.5).item() == pytest.approx(0.05)
    flops_loss(r, 0.5, balance=1.0).backward()  # pushes the starved quarter up and the rich one down
    assert r.grad[0] < 0 < r.grad[-1]
    model = dynamize(dydit.load(default_model_path()))
    with pytest.raises(ValueError, match="stratified"):
        FinetuneTask(model, FinetuneConfig(flops_balance=1.0, stratified=False))


def test_gumbel_noise_zero_gives_the_eval_masks_and_the_anneal_reaches_zero():
    from dydit.dynamic.finetune import FinetuneConfig, FinetuneTask
    from dydit.dynamic.routers import gumbel_sigmoid_ste

    logits = torch.randn(64, 7, requires_grad=True)
    hard = gumbel_sigmoid_ste(logits, tau=5.0, training=True, noise=0.0)
    assert torch.equal(hard.detach(), gumbel_sigmoid_ste(logits, 5.0, training=False))
    hard.sum().backward()  # straight-through: gradients flow through the soft sigmoid
    assert logits.grad.abs().sum() > 0
    noisy = gumbel_sigmoid_ste(logits.detach(), 5.0, True, noise=1.0)
    assert not torch.equal(noisy, hard.detach())  # 448 draws: the noise flips some near-zero logits

    task = FinetuneTask.__new__(FinetuneTask)
    task.cfg = FinetuneConfig(total_steps=100, noise_anneal=0.3)
    scales = [task.noise_at(s) for s in range(100)]
    assert scales[0] == 1.0 and scales[69] == 1.0 and scales[-1] == 0.0
    assert all(a >= b for a, b in zip(scales, scales[1:]))
    task.cfg = FinetuneConfig(total_steps=None)
    assert task.noise_at(50) == 1.0


def test_token_noise_zero_trains_on_the_eval_token_masks_while_the_width_routers_stay_noisy():
    """routing.token_noise=0: the backbone never trains under random token dropout (the token masks in training
    are the inference ones), the width routers still explore, and the recipe reaches the training context."""
    from dydit.dynamic.finetune import finetune_config
    from dydit.dynamic.recipe import resolve_recipe

    torch.manual_seed(0)
    model = scramble_routers(dynamize(randomize(build_model("DiT-Tiny")), DynamicConfig(token_center=True)))
    for blk in model.blocks:  # token logits near the threshold (|logit| ~ 1), so gumbel noise flips many
        blk.token_selection.mlp_head[2].weight.data.mul_(0.01)
        blk.token_selection.mlp_head[2].bias.data.fill_(0.0)
    x, t, y = torch.randn(4, 4, 8, 8), torch.tensor([0.0, 300.0, 600.0, 999.0]), torch.arange(4)

    def masks(ctx):
        torch.manual_seed(1)
        with torch.no_grad():
            model.train()(x, t, y, dyn=ctx)
        return [m for _, _, m in ctx.token_masks], ctx.records

    ref, _ = masks(DynamicContext("masked", record_tokens=True))
    det, det_rec = masks(DynamicContext("train", tau=5.0, noise=1.0, token_noise=0.0, record_tokens=True))
    noisy, _ = masks(DynamicContext("train", tau=5.0, noise=1.0, record_tokens=True))
    assert all(torch.equal(a, b) for a, b in zip(det, ref))
    assert not all(torch.equal(a, b) for a, b in zip(noisy, ref))
    ratio = lambda recs: dynamic_ratio(flops_spec(model), recs)
    eval_masks = DynamicContext("masked")
    assert not torch.equal(ratio(det_rec), ratio(masks(eval_masks)[1]))  # width masks still drawn with noise
    cfg = finetune_config(resolve_recipe("fmnist-0.5-sdt", ["routing.token_noise=0"]))
    assert cfg.token_noise == 0.0 and finetune_config(resolve_recipe("fmnist-0.5-sdt")).token_noise == 1.0
    with pytest.raises(ValueError, match="routing.token_noise"):
        resolve_recipe(None, ["routing.token_noise=-1"])


def test_flops_width_target_holds_the_width_only_ratio_so_the_tokens_carry_the_rest():
    """flops.width_target: a second FLOPs term on the ratio with every token counted; its gradient reaches the
    width routers only, and the joint term still holds the whole ratio at λ."""
    import dataclasses

    from dydit.dynamic.finetune import FinetuneConfig, FinetuneTask
    from dydit.dynamic.loss import flops_loss

    torch.manual_seed(0)
    model = scramble_routers(dynamize(randomize(build_model("DiT-Tiny")), DynamicConfig(token_center=True)))
    x, t, y = torch.randn(4, 4, 8, 8), torch.tensor([0.0, 300.0, 600.0, 999.0]), torch.arange(4)
    common = dict(target=0.5, ramp_steps=0, warmup_steps=0, feedback_every=0, total_steps=10)

    task = FinetuneTask(model, FinetuneConfig(**common))

    def term(cfg):
        model.zero_grad()
        ctx = DynamicContext("train", tau=5.0, noise=0.0)
        torch.manual_seed(1)  # the same label dropout
        model.train()(x, t, y, dyn=ctx)
        task.cfg = FinetuneConfig(**cfg)
        ratio, lam, loss = task._flops_term(ctx, x, step=5, frozen=False)
        loss.backward()
        wide = dynamic_ratio(flops_spec(model), [dataclasses.replace(r, token_mask=None) for r in ctx.records])
        assert torch.equal(wide, dynamic_ratio(flops_spec(model), ctx.records, count_tokens=False))
        return ratio.detach(), wide.detach(), loss.item()

    ratio, wide, joint = term(common)
    assert joint == pytest.approx(flops_loss(ratio, 0.5).item())
    token_grad = model.blocks[0].token_selection.mlp_head[2].bias.grad.clone()
    width_grad = model.blocks[0].mlp_rate.router.bias.grad.clone()
    ratio, wide, split = term({**common, "flops_width_target": 0.8})
    assert (wide > ratio).all()  # the tokens skip something, so the width-only ratio is the larger one
    assert split == pytest.approx(flops_loss(ratio, 0.5).item() + flops_loss(wide, 0.8).item(), rel=1e-5)
    # the width-only term does not see the token masks: the token routers' gradient is the joint term's alone
    assert torch.allclose(model.blocks[0].token_selection.mlp_head[2].bias.grad, token_grad)
    assert not torch.allclose(model.blocks[0].mlp_rate.router.bias.grad, width_grad)  # ... the width routers' does
    with pytest.raises(ValueError, match="flops.width_target"):
        from dydit.dynamic.recipe import resolve_recipe
        resolve_recipe("fmnist-0.5", ["flops.width_target=0.6"])  # width only: no tokens to carry the rest


def test_finetune_cli_writes_live_routers_and_averaged_backbone(tmp_path):
    # thresholded routers must not be EMA-averaged: that shifted the realised FLOPs ratio by 0.1
    from typer.testing import CliRunner

    import dydit
    from dydit.assets import default_model_path
    from dydit.cli import app

    out = tmp_path / "ft"
    res = CliRunner().invoke(app, ["finetune", str(default_model_path()), "--out", str(out), "--steps", "3",
                                   "--batch-size", "8", "--limit-data", "64", "--set", "flops.ramp_steps=1",
                                   "--set", "warmup.steps=1", "--ckpt-every", "3", "--set", "calibration.enabled=false"])
    assert res.exit_code == 0, res.output
    ema = dydit.load(out / "ema").state_dict()
    live = dydit.load(out / "checkpoint.pt", which="model").state_dict()
    routers = [k for k in ema if "attn_rate" in k or "mlp_rate" in k or "token_selection" in k]
    assert routers and all(torch.equal(ema[k], live[k]) for k in routers)
    assert not torch.equal(ema["blocks.0.mlp.fc1.weight"], live["blocks.0.mlp.fc1.weight"])
