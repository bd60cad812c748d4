"""Latte and DyLatte: official and diffusers checkpoints, the dynamic engine on video, FLOPs per block
kind, First-Block-Cache on alternating blocks, Moving Fashion-MNIST, video sampling and training."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange, repeat

import dydit
from dydit.dynamic import DynamicConfig, DynamicContext, dynamize, flops_spec
from dydit.models.dit import build_model
from dydit.sampling import sample
from helpers import randomize, scramble_routers


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def tiny(seed=0, **kw):
    # scale 0.2: at DiT's 0.3, four random blocks amplify fp32 rounding of the (exact) fast path to ~1e-5
    return randomize(build_model("Latte-Tiny", **kw), seed=seed, scale=0.2).eval()


def video(batch, seed=0, model=None):
    c = (model.config if model is not None else build_model("Latte-Tiny").config)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, c.num_frames, c.in_channels, c.input_size, c.input_size, generator=g)


# ---------------------------------------------------------------------------------------------
# An independent implementation of the official Latte forward (models/latte.py of the Latte
# repository), from raw state-dict tensors: einops rearranges, timm's math attention.
# ---------------------------------------------------------------------------------------------


def _official_forward(sd, x, t, y, heads, patch):
    def lin(v, name):
        return F.linear(v, sd[name + ".weight"], sd[name + ".bias"])

    def ln(v):
        return F.layer_norm(v, v.shape[-1:], eps=1e-6)

    def mod(v, shift, scale):
        return v * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

    def block(i, v, c):
        p = f"blocks.{i}."
        sm, cm, gm, sp, cp, gp = lin(F.silu(c), p + "adaLN_modulation.1").chunk(6, dim=1)
        h = mod(ln(v), sm, cm)
        B, N, C = h.shape
        qkv = lin(h, p + "attn.qkv").reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        q, k, vv = qkv.unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(dim=-1)
        a = (attn @ vv).transpose(1, 2).reshape(B, N, C)
        v = v + gm.unsqueeze(1) * lin(a, p + "attn.proj")
        h = mod(ln(v), sp, cp)
        return v + gp.unsqueeze(1) * lin(F.gelu(lin(h, p + "mlp.fc1"), approximate="tanh"), p + "mlp.fc2")

    b, f = x.shape[:2]
    v = rearrange(x, "b f c h w -> (b f) c h w")
    v = F.conv2d(v, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    v = v + sd["pos_embed"]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    temb = lin(F.silu(lin(torch.cat([torch.cos(args), torch.sin(args)], -1), "t_embedder.mlp.0")), "t_embedder.mlp.2")
    n = sd["pos_embed"].shape[1]
    c = temb
    if "y_embedder.embedding_table.weight" in sd:
        c = c + sd["y_embedder.embedding_table.weight"][y]
    c_sp, c_tm = repeat(c, "n d -> (n c) d", c=f), repeat(c, "n d -> (n c) d", c=n)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(0, depth, 2):
        v = block(i, v, c_sp)
        v = rearrange(v, "(b f) t d -> (b t) f d", b=b)
        if i == 0:
            v = v + sd["temp_embed"]
        v = block(i + 1, v, c_tm)
        v = rearrange(v, "(b t) f d -> (b f) t d", b=b)
    shift, scale = lin(F.silu(c_sp), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    v = lin(mod(ln(v), shift, scale), "final_layer.linear")
    cout = sd["final_layer.linear.weight"].shape[0] // patch**2
    hh = int(v.shape[1] ** 0.5)
    v = torch.einsum("nhwpqc->nchpwq", v.reshape(v.shape[0], hh, hh, patch, patch, cout))
    v = v.reshape(v.shape[0], cout, hh * patch, hh * patch)
    return rearrange(v, "(b f) c h w -> b f c h w", b=b)


def _official_state(model):
    """What an official Latte user's checkpoint holds: the model's state dict, with their key names."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("conditional", [True, False])
@pytest.mark.parametrize("wrapped", [True, False])
def test_official_pt_loads_strictly_and_matches_the_official_forward(tmp_path, conditional, wrapped):
    ref_model = tiny(extras=2 if conditional else 1)
    sd = _official_state(ref_model)
    assert ("y_embedder.embedding_table.weight" in sd) == conditional
    if conditional:
        assert sd["y_embedder.embedding_table.weight"].shape[0] == 11  # num_classes + the null class
    assert sd["pos_embed"].shape == (1, 4, 64) and sd["temp_embed"].shape == (1, 3, 64)
    path = tmp_path / "latte.pt"
    torch.save({"ema": sd, "model": sd, "opt": {}} if wrapped else sd, path)  # as the Latte train script saves
    # the head count is not in the file: a non-published size needs model_name, said in one line
    with pytest.raises(ValueError, match="model_name"):
        dydit.load(path)
    model = dydit.load(path, model_name="Latte-Tiny")
    assert type(model).__name__ == "Latte" and model.config.num_heads == 4
    x, y = video(3), torch.tensor([1, 5, 9])
    for t in (torch.tensor([3.0, 500.0, 999.0]), torch.full((3,), 250.0)):
        ref = _official_forward(sd, x, t, y if conditional else None, heads=4, patch=4)
        out = model(x, t, y if conditional else None)
        assert out.shape == (3, 3, 4, 8, 8)
        assert rel_err(out, ref) < 1e-5


def test_official_sizes_need_no_model_name_and_wrong_files_say_why(tmp_path):
    with torch.device("meta"):
        xl = build_model("Latte-XL/2")
    assert sum(p.numel() for p in xl.parameters() if p.requires_grad) > 6.7e8  # 28 blocks of 1152
    cfg = xl.config
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.num_frames, cfg.num_classes) == (28, 1152, 16, 16, 101)
    small = build_model("Latte-S/8", input_size=16, num_frames=2)
    sd = _official_state(small)
    torch.save({"ema": sd}, tmp_path / "s8.pt")
    model = dydit.load(tmp_path / "s8.pt")
    assert model.config.name == "Latte-S/8" and model.config.num_heads == 6
    sd["blocks.0.extra.weight"] = torch.zeros(1)
    torch.save({"ema": sd}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="unexpected keys"):
        dydit.load(tmp_path / "bad.pt")
    del sd["blocks.0.extra.weight"]
    with pytest.raises(ValueError, match="depth 12, width 384, patch 8"):
        dydit.load(tmp_path / "s8.pt", model_name="Latte-B/8")


def test_unconditional_latte_samples_without_guidance_and_refuses_it_in_one_line():
    model = tiny(extras=1)
    assert sample(model, [0, 0], "ddim", 2).shape == (2, 3, 2, 8, 8)
    with pytest.raises(ValueError, match="class-conditional model"):
        sample(model, [0, 0], "ddim", 2, cfg_scale=4.0)


def test_forward_with_cfg_is_the_official_guidance():
    model = tiny()
    x, t = video(2), torch.full((4,), 300.0)
    xx, y = torch.cat([x, x]), torch.tensor([3, 7, 10, 10])
    out = model.forward_with_cfg(xx, t, y, 4.0)
    raw = model(xx, t, y)
    eps, rest = raw[:, :, :4], raw[:, :, 4:]  # official: the first four channels of every frame
    guided = eps[2:] + 4.0 * (eps[:2] - eps[2:])
    assert torch.allclose(out, torch.cat([torch.cat([guided, guided]), rest], dim=2))


# ---------------------------------------------------------------------------------------------
# diffusers LatteTransformer3DModel folders
# ---------------------------------------------------------------------------------------------


def _diffusers_latte(seed=0, **kw):
    from diffusers import LatteTransformer3DModel

    torch.manual_seed(seed)
    cfg = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
               cross_attention_dim=16, attention_bias=True, sample_size=8, patch_size=2,
               activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
               norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=12, video_length=3)
    cfg.update(kw)
    model = LatteTransformer3DModel(**cfg).eval()
    with torch.no_grad():  # diffusers zero-initialises some projections; random weights test every path
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("temporal", [True, False])
def test_diffusers_latte_folder_gives_diffusers_output(tmp_path, temporal):
    ref = _diffusers_latte()
    ref.save_pretrained(tmp_path / "latte")  # diffusers' own writer: config.json + safetensors
    model = dydit.load(tmp_path / "latte")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, 8, 8, generator=g)  # diffusers' layout (B, C, F, H, W)
    kw = dict(timestep=torch.tensor([10, 700]), encoder_hidden_states=torch.randn(2, 5, 12, generator=g),
              encoder_attention_mask=None, enable_temporal_attentions=temporal)
    with torch.no_grad():
        expect = ref(x, **kw).sample
        out = model(hidden_states=x, return_dict=False, **kw)[0]
    assert rel_err(out, expect) <= 1e-5
    # a pipeline folder (transformer/ subfolder) loads too
    ref.save_pretrained(tmp_path / "pipe" / "transformer")
    assert rel_err(dydit.load(tmp_path / "pipe")(x, **kw).sample.detach(), expect) <= 1e-5


@pytest.mark.parametrize("batch", [1, 3])
def test_dylatte_on_a_diffusers_folder(tmp_path, batch):
    ref = _diffusers_latte()
    ref.save_pretrained(tmp_path / "latte")
    model = dydit.load(tmp_path / "latte")
    g = torch.Generator().manual_seed(2)
    x, e = torch.randn(batch, 4, 3, 8, 8, generator=g), torch.randn(batch, 5, 12, generator=g)
    with torch.no_grad():
        dynamize(model)
        t = torch.full((batch,), 300)
        assert rel_err(model(x, t, e).sample, ref(x, t, e).sample) < 1e-6  # routers start fully on
        scramble_routers(model)
        differs = False
        for tv in (10, 300, 900):
            t = torch.full((batch,), tv)
            masked = model(x, t, e, dyn="masked").sample
            assert rel_err(model(x, t, e, dyn="fast").sample, masked) < 1e-5
            assert rel_err(model(x, t, e).sample, masked) < 1e-5  # a plain call routes
            complete = model(x, t, e, dyn="complete").sample
            assert torch.equal(complete, ref(x, t, e).sample)
            differs |= rel_err(masked, complete) > 1e-3
        assert differs
    spec = flops_spec(model)
    D, F_, N = 16, 3, 16
    assert [b.kind for b in spec.blocks] == ["spatial", "temporal"] * 2
    assert spec.blocks[0].attn == 4 * F_ * N * D * D + F_ * 2 * N * N * D
    assert spec.blocks[1].attn == 4 * F_ * N * D * D + N * 2 * F_ * F_ * D
    assert spec.blocks[1].modulation == 0 < spec.blocks[0].modulation  # dense cross-attention: spatial only


def test_the_basic_transformer_block_adapter_claims_only_latte_blocks():
    from diffusers import DiTTransformer2DModel
    from diffusers.models.attention import BasicTransformerBlock

    from dydit.dynamic.adapters import block_adapter
    from dydit.dynamic.backbones.latte import register_diffusers_latte

    register_diffusers_latte()
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1,
                                sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    x, t, y = torch.randn(1, 4, 8, 8), torch.tensor([5]), torch.tensor([1])
    before = dit(x, t, class_labels=y).sample
    blk = dit.transformer_blocks[0]
    assert isinstance(blk, BasicTransformerBlock) and type(blk) is BasicTransformerBlock
    with pytest.raises(ValueError, match="norm_type 'ada_norm_zero'"):
        block_adapter(blk).spec(blk, dit)
    with pytest.raises(TypeError, match="no registered dydit model adapter"):
        dynamize(dit)
    assert torch.equal(dit(x, t, class_labels=y).sample, before)  # diffusers' other models are untouched


# ---------------------------------------------------------------------------------------------
# DyLatte: the dynamic engine on video
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("layout", [dict(), dict(width=False), dict(tokens=False), dict(block_skip=True)])
def test_dylatte_fast_equals_masked_and_plain_call_routes(batch, layout):
    model = tiny()
    x, y = video(batch), torch.arange(batch) % 10
    static = model(x, torch.full((batch,), 100.0), y)
    dynamize(model, DynamicConfig(**layout))
    assert rel_err(model(x, torch.full((batch,), 100.0), y), static) < 1e-5  # starts as the static function
    scramble_routers(model)
    differs = False
    for tv in (0.0, 300.0, 999.0):
        t = torch.full((batch,), tv)
        masked = model(x, t, y, dyn=DynamicContext("masked"))
        assert rel_err(model(x, t, y, dyn=DynamicContext("fast")), masked) < 1e-5
        assert rel_err(model(x, t, y), masked) < 1e-5  # a plain call routes
        differs |= rel_err(masked, model(x, t, y, dyn="complete")) > 1e-3
    assert differs, "the routers must really drop compute in this test"
    model64 = model.double()  # in float64 the two computations agree to rounding, not just within 1e-5
    t = torch.full((batch,), 300.0, dtype=torch.float64)
    assert rel_err(model64(x.double(), t, y, dyn="fast"), model64(x.double(), t, y, dyn="masked")) < 1e-12
    model.float()
    if batch > 1:  # mixed timesteps: the masked computation
        mixed = torch.tensor([5.0, 400.0, 900.0])[:batch]
        assert torch.equal(model(x, mixed, y), model(x, mixed, y, dyn="masked"))


@pytest.mark.parametrize("cfg_scale,labels", [(4.0, [1]), (4.0, [1, 2, 3]), (1.0, [0, 4, 8])])
def test_dylatte_fast_sampling_equals_masked(cfg_scale, labels):
    model = scramble_routers(dynamize(tiny())).eval()
    ctx = DynamicContext("fast", record_usage=True)
    a = sample(model, labels, "ddim", 5, cfg_scale=cfg_scale, dyn=DynamicContext("masked"))
    b = sample(model, labels, "ddim", 5, cfg_scale=cfg_scale, dyn=ctx)
    assert b.shape == (len(labels), 3, 2, 8, 8)
    assert rel_err(b, a) < 1e-5
    assert len(ctx.usage) == 5 and ctx.usage[0].batch == len(labels) * (2 if cfg_scale != 1.0 else 1)


def test_training_masks_are_per_sample_and_ratio_is_differentiable():
    from dydit.dynamic.flops import dynamic_ratio

    model = scramble_routers(dynamize(tiny())).train()
    x, t, y = video(3), torch.tensor([5.0, 500.0, 990.0]), torch.tensor([1, 2, 3])
    ctx = DynamicContext("train")
    model(x, t, y, dyn=ctx)
    assert [r.token_mask.shape for r in ctx.records] == [(3, 12)] * 4  # F·N = 3·4 tokens per sample
    r = dynamic_ratio(flops_spec(model), ctx.records)
    assert r.shape == (3,) and r.requires_grad
    r.sum().backward()
    assert model.blocks[1].attn_rate.router.weight.grad is not None


def test_flops_counter_per_block_kind_is_the_hand_count():
    model = dynamize(build_model("Latte-Tiny"))
    F_, N, D, hidden = 3, 4, 64, 256
    spec = flops_spec(model)
    assert [b.kind for b in spec.blocks] == ["spatial", "temporal"] * 2
    spatial, temporal = spec.blocks[0], spec.blocks[1]
    assert spatial.attn == 4 * F_ * N * D * D + F_ * 2 * N * N * D  # F attentions of length N
    assert temporal.attn == 4 * F_ * N * D * D + N * 2 * F_ * F_ * D  # N attentions of length F
    assert spatial.mlp == temporal.mlp == 2 * F_ * N * D * hidden
    assert spatial.num_tokens == temporal.num_tokens == F_ * N
    assert spatial.modulation == F_ * 6 * D * D and temporal.modulation == N * 6 * D * D
    # at paper scale: Latte-XL/2, 16 frames at 256² (32² latent, 256 tokens per frame)
    with torch.device("meta"):
        xl = build_model("Latte-XL/2")
    b = flops_spec(xl).blocks
    assert b[0].attn == 4 * 16 * 256 * 1152**2 + 16 * 2 * 256**2 * 1152
    assert b[1].attn == 4 * 16 * 256 * 1152**2 + 256 * 2 * 16**2 * 1152


def test_plan_reports_per_block_kind():
    from dydit.dynamic.report import plan_table, usage_by_kind

    model = scramble_routers(dynamize(tiny())).eval()
    ctx = DynamicContext("fast", record_usage=True)
    sample(model, [1, 2], "ddim", 4, cfg_scale=1.0, dyn=ctx)
    spec = flops_spec(model)
    kinds = usage_by_kind(ctx.usage, spec)
    assert set(kinds) == {"spatial", "temporal"} and kinds["spatial"]["blocks"] == 2
    for kind, cols in (("spatial", [0, 2]), ("temporal", [1, 3])):
        num = den = 0.0
        for u in ctx.usage:
            for i in cols:
                b = spec.blocks[i]
                tok = u.tokens_kept[i] / (u.batch * b.num_tokens)
                num += u.heads[i] / 4 * b.attn + u.groups[i] / 4 * tok * b.mlp
                den += b.attn + b.mlp
        assert kinds[kind]["flops_ratio"] == pytest.approx(num / den)
    table = plan_table(ctx.usage, spec)
    assert "| spatial | 2 |" in table and "| temporal | 2 |" in table
    assert kinds["spatial"]["flops_ratio"] != kinds["temporal"]["flops_ratio"]


def test_dynamized_latte_saves_and_loads_routed(tmp_path):
    model = scramble_routers(dynamize(tiny())).eval()
    dydit.save(model, tmp_path / "dylatte")
    loaded = dydit.load(tmp_path / "dylatte")
    assert type(loaded).__name__ == "Latte" and loaded.dynamic_config is not None
    x, t, y = video(2), torch.full((2,), 600.0), torch.tensor([3, 4])
    out = loaded(x, t, y)
    assert torch.allclose(out, model(x, t, y), atol=1e-6)
    assert rel_err(out, loaded(x, t, y, dyn="masked")) < 1e-5
    assert rel_err(out, loaded(x, t, y, dyn="complete")) > 1e-3
    # the same weights in the official layout ({"ema": state dict} with the authors' router names)
    torch.save({"ema": model.state_dict()}, tmp_path / "dylatte.pt")
    official = dydit.load(tmp_path / "dylatte.pt", model_name="Latte-Tiny")
    assert official.dynamic_config is not None and torch.allclose(official(x, t, y), out, atol=1e-6)


def test_importance_reordering_keeps_the_latte_function():
    model = tiny()
    x, t, y = video(2), torch.tensor([30.0, 800.0]), torch.tensor([1, 2])
    ref = model(x, t, y)
    dynamize(model, reorder=True)
    assert rel_err(model(x, t, y, dyn="masked"), ref) < 1e-5
    qkv = model.blocks[1].attn.qkv.weight.view(3, 4, 16, 64).abs().sum(dim=(0, 2, 3))
    proj = model.blocks[1].attn.proj.weight.view(64, 4, 16).abs().sum(dim=(0, 2))
    score = qkv + proj
    assert torch.equal(score, score.sort(descending=True).values)  # temporal heads ranked too


# ---------------------------------------------------------------------------------------------
# First-Block-Cache on alternating blocks
# ---------------------------------------------------------------------------------------------


def test_first_block_cache_on_latte():
    from dydit.cache import FirstBlockCache, cached

    model = randomize(build_model("Latte-Tiny"), scale=0.1).eval()
    cache = FirstBlockCache(rdt=0.0)
    with cached(model, cache):
        a = sample(model, [1, 2], "ddim", 4, cfg_scale=3.0)
    assert cache.skipped_steps == 0 and torch.equal(a, sample(model, [1, 2], "ddim", 4, cfg_scale=3.0))
    # a skipped step: block 0 runs, block 1 adds the residual cached from its input to the last block's output
    x1, x2 = video(2, seed=1), video(2, seed=2)
    t1, t2, y = torch.full((2,), 500.0), torch.full((2,), 480.0), torch.tensor([1, 2])
    cache = FirstBlockCache(rdt=1e9, warmup=0)
    with torch.no_grad():
        with cached(model, cache):
            full1 = model(x1, t1, y)
            out2 = model(x2, t2, y)
        assert torch.equal(full1, model(x1, t1, y))
        captured = []
        hooks = [b.register_forward_hook(lambda m, i, o: captured.append((i[0], o))) for b in model.blocks]
        model(x1, t1, y)
        rest = captured[-1][1] - captured[1][0]  # last block's output - block 1's input, (B·N, F, D)
        captured.clear()
        hooks.append(model.blocks[1].register_forward_hook(lambda m, i, o: i[0] + rest))
        for b in model.blocks[2:]:
            hooks.append(b.register_forward_hook(lambda m, i, o: i[0]))
        expect = model(x2, t2, y)
        for h in hooks:
            h.remove()
    assert torch.equal(out2, expect)
    assert not torch.allclose(out2, model(x2, t2, y))
    assert [s.skipped for s in cache.history] == [False, True]


def test_first_block_cache_on_dylatte_and_diffusers_latte(tmp_path):
    from dydit.cache import FirstBlockCache, cached

    model = scramble_routers(dynamize(randomize(build_model("Latte-Tiny"), scale=0.1))).eval()
    cache = FirstBlockCache(rdt=1e9, warmup=1, num_steps=5)
    with cached(model, cache):
        out = sample(model, [1, 2], "ddim", 5, cfg_scale=3.0)
    assert torch.isfinite(out).all() and [s.skipped for s in cache.history] == [False, True, True, True, False]
    # diffusers' Latte: its two block lists interleaved in execution order
    ref = _diffusers_latte()
    ref.save_pretrained(tmp_path / "latte")
    dl = dydit.load(tmp_path / "latte")
    x = torch.randn(2, 4, 3, 8, 8)
    kw = dict(encoder_hidden_states=torch.randn(2, 5, 12))
    cache = FirstBlockCache(rdt=0.0)
    with torch.no_grad():
        with cached(dl, cache):
            a = dl(x, torch.tensor([500, 500]), **kw).sample
        assert torch.equal(a, dl(x, torch.tensor([500, 500]), **kw).sample)
        cache = FirstBlockCache(rdt=1e9, warmup=0)
        with cached(dl, cache):
            dl(x, torch.tensor([500, 500]), **kw)
            b = dl(x * 0.9, torch.tensor([480, 480]), **kw).sample
    assert cache.history[1].skipped and torch.isfinite(b).all()


# ---------------------------------------------------------------------------------------------
# Moving Fashion-MNIST
# ---------------------------------------------------------------------------------------------


def test_moving_fmnist_is_real_items_bouncing_deterministically():
    from dydit.data import MovingFashionMNIST, load_fashion_mnist

    data = MovingFashionMNIST("test", num_frames=12, canvas=32, item_size=14, step_length=0.3, seed=5, limit=40)
    x, y, pos = data.batch_with_positions(torch.arange(40))
    images, labels = load_fashion_mnist("test")
    assert x.shape == (40, 12, 1, 32, 32) and x.min() == -1 and torch.equal(y, torch.from_numpy(labels[:40]))
    item = F.interpolate(torch.from_numpy(images[7].copy()).float()[None, None] / 255, size=(14, 14), mode="area")[0, 0]
    for f in range(12):  # the frame holds the real item at its position, and nothing else
        py, px = pos[7, f].tolist()
        frame = (x[7, f, 0] + 1) / 2
        assert torch.allclose(frame[py : py + 14, px : px + 14], item, atol=1e-6)
        assert frame.sum() == pytest.approx(item.sum().item(), rel=1e-5)
    assert pos.min() >= 0 and pos.max() <= 32 - 14
    # constant velocity between bounces: the second difference vanishes except at walls
    v = pos[:, 1:] - pos[:, :-1]
    assert (v.abs() > 0).any(dim=(1, 2)).all()  # everything moves
    bounced = ((pos == 0) | (pos == 18)).any()
    assert bounced, "with this speed some items must reach a wall within 12 frames"
    x2, _, pos2 = MovingFashionMNIST("test", num_frames=12, step_length=0.3, seed=5, limit=40).batch_with_positions(
        torch.tensor([7, 3]))
    assert torch.equal(x2[0], x[7]) and torch.equal(pos2[1], pos[3])  # deterministic, order-independent
    _, _, other = MovingFashionMNIST("test", num_frames=12, step_length=0.3, seed=6, limit=40).batch_with_positions(
        torch.tensor([7]))
    assert not torch.equal(other[0], pos[7])


def test_bouncing_trajectory_reflects_velocity_at_walls():
    from dydit.data.moving_fmnist import bouncing_trajectory

    traj = bouncing_trajectory(np.random.default_rng(0), 200, 0.15)
    assert traj.min() >= 0 and traj.max() <= 1
    step = np.diff(traj, axis=0)
    inner = ((traj[:-1] > 0) & (traj[:-1] < 1) & (traj[1:] > 0) & (traj[1:] < 1)).all(axis=1)
    speeds = np.abs(step[inner])
    assert np.allclose(speeds, speeds[0], atol=1e-9)  # |v_y|, |v_x| constant away from the walls
    assert (np.sign(step[1:, 0]) != np.sign(step[:-1, 0])).any()  # and it does turn around


# ---------------------------------------------------------------------------------------------
# training and sampling commands on video
# ---------------------------------------------------------------------------------------------


def test_train_latte_on_moving_fmnist_and_sample_a_gif(tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from dydit.cli import app
    from dydit.train import TrainConfig, train

    cfg = TrainConfig(model="Latte-MFMNIST", out=str(tmp_path / "run"), steps=2, batch_size=4, limit_data=16,
                      warmup_steps=1, sample_every=0, ckpt_every=2, log_every=1, threads=1)
    ema = train(cfg, progress=False)
    assert type(ema).__name__ == "Latte" and (tmp_path / "run" / "ema" / "config.json").exists()
    small = randomize(build_model("Latte-Tiny", in_channels=1), scale=0.1)
    dydit.save(dynamize(small), tmp_path / "tiny")
    r = CliRunner().invoke(app, ["sample", str(tmp_path / "tiny"), "--classes", "0,1,2", "--num-per-class", "2",
                                 "--steps", "2", "--out", str(tmp_path / "grid.png"), "--cfg-scale", "2",
                                 "--fbcache", "0.1"])
    assert r.exit_code == 0, r.output
    gif = Image.open(tmp_path / "grid.gif")
    assert gif.n_frames == 3  # one GIF frame per video frame
    # 3 rows (one per class) of 2 videos of 8x8 pixels, scaled ×3, with 2-pixel borders
    assert gif.size == ((2 * 10 + 2) * 3, (3 * 10 + 2) * 3)
    listing = CliRunner().invoke(app, ["models"]).output
    assert "Latte-MFMNIST" in listing and "Latte-XL/2" in listing and "DiT-XL/2" in listing
