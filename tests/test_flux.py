"""DyFLUX: diffusers' FluxTransformer2DModel as a dydit backbone — loading, TDW, SDT, the authors' checkpoints,
FLOPs per block kind, and the dynamic transformer inside diffusers' FluxPipeline."""
import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel

import dydit
from dydit.dynamic import DynamicConfig, DynamicContext, dynamic_ratio, dynamize, flops_spec, realised_macs
from dydit.dynamic.backbones.flux import set_token_geometry
from dydit.dynamic.context import default_context

D, H, HD, NI, NT, C_IN, JOINT, POOLED = 32, 4, 8, 16, 5, 4, 12, 10
ROUTERS = ("attn_rate.", "mlp_rate.", "mlp_context_rate.", "token_selection.")


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def tiny_flux(guidance=False, seed=0, double=2, single=2):
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(patch_size=1, in_channels=C_IN, num_layers=double, num_single_layers=single,
                                   attention_head_dim=HD, num_attention_heads=H, joint_attention_dim=JOINT,
                                   pooled_projection_dim=POOLED, guidance_embeds=guidance, axes_dims_rope=(2, 2, 4))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random everywhere (diffusers' init leaves biases and norms trivial)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def flux_inputs(batch=2, guidance=False, t=0.7, g=3.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
    return dict(hidden_states=torch.randn(batch, NI, C_IN, generator=gen),
                encoder_hidden_states=torch.randn(batch, NT, JOINT, generator=gen),
                pooled_projections=torch.randn(batch, POOLED, generator=gen),
                timestep=torch.full((batch,), t), img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(NT, 3),
                guidance=torch.full((batch,), g) if guidance else None)


def scramble(model, seed=1):
    """Router weights that switch heads, groups and tokens on and off (roughly half of each)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(r in name for r in ROUTERS):
                scale = 0.1 if name.endswith("token_selection.router.bias") else 1.0
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model


def run(model, kw, dyn=None):
    with torch.no_grad():
        return model(**kw, dyn=dyn).sample if dyn is not None else model(**kw).sample


# ---- 1. diffusers folders load as diffusers' model; the dynamic forward at full width is diffusers' ----


@pytest.mark.parametrize("guidance", [False, True])
def test_diffusers_folder_loads_and_full_width_dynamic_forward_equals_diffusers(guidance, tmp_path):
    ref_model = tiny_flux(guidance)
    kw = flux_inputs(3, guidance)
    ref = run(ref_model, kw)
    ref_model.save_pretrained(tmp_path / "pipe" / "transformer")
    for folder in (tmp_path / "pipe" / "transformer", tmp_path / "pipe"):  # transformer and pipeline folders
        model = dydit.load(folder)
        assert type(model) is FluxTransformer2DModel and not model.training
        assert rel_err(run(model, kw), ref) < 1e-5
    dynamize(model, DynamicConfig(optional_units=["mlp_context"]))  # routers all on: the static function
    for mode in ("fast", "masked"):
        ctx = DynamicContext(mode, record_usage=True)
        assert rel_err(run(model, kw, ctx), ref) < 1e-5
    assert len(ctx.records) == 4  # the adapters' forward ran every double and single block
    assert rel_err(run(scramble(model), kw), ref) > 1e-3  # and what they run is what the routers say


# ---- 2. TDW + SDT: the fast engine equals the masked reference ----


@pytest.mark.parametrize("guidance", [False, True])
@pytest.mark.parametrize("batch,cfg", [(1, False), (3, False), (3, True)])
def test_fast_equals_masked_both_block_kinds(guidance, batch, cfg):
    model = scramble(dynamize(tiny_flux(guidance), DynamicConfig(optional_units=["mlp_context"])))
    kw = flux_inputs(batch, guidance)
    if cfg:  # both CFG halves in one batch: the second half with an empty (zero) prompt, same t and guidance
        kw = {k: (torch.cat([v, torch.zeros_like(v) if k in ("encoder_hidden_states", "pooled_projections") else v])
                  if k in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance")
                  and v is not None else v) for k, v in kw.items()}
    masked = run(model, kw, "masked")
    ctx = DynamicContext("fast", record_usage=True)
    assert rel_err(run(model, kw, ctx), masked) < 1e-5
    assert rel_err(run(model, kw), masked) < 1e-5  # a plain call routes on the fast engine
    assert rel_err(masked, run(model, kw, "complete")) > 1e-3
    u = ctx.usage[0]
    assert min(u.heads) < H and min(u.groups) < H and sum(u.tokens_kept) < len(u.heads) * kw["hidden_states"].shape[0] * NI
    assert any(units["mlp_context"] < H for units in u.units[:2])  # ff_context narrowed too (the option)
    assert [k for k in u.units[2]] == ["attn", "mlp"]  # single blocks: heads and MLP groups
    assert ctx.weights.cache.used == 0 and not ctx.weights.cache.entries  # no sliced copies kept between steps


def test_width_plan_ignores_the_prompt_and_is_keyed_by_t_and_guidance():
    model = scramble(dynamize(tiny_flux(guidance=True)))
    ctx = DynamicContext("fast")
    for g in (3.5, 3.5, 5.0):
        for seed in (0, 1):  # another prompt (text tokens and pooled projection): the same plan entry
            kw = flux_inputs(2, True, g=g, seed=seed)
            assert rel_err(run(model, kw, ctx), run(model, kw, "masked")) < 1e-5
    assert sorted(ctx.plan.steps) == [(0.7, 3.5), (0.7, 5.0)]
    # the plan's widths are the width routers on E_t = timestep + guidance embeddings, without the pooled text
    tte = model.time_text_embed
    with torch.no_grad():
        e = (tte.timestep_embedder(tte.time_proj(torch.tensor([700.0]))) +
             tte.guidance_embedder(tte.time_proj(torch.tensor([5000.0]))))
        widths = ctx.plan.steps[(0.7, 5.0)]
        for block, w in zip([*model.transformer_blocks, *model.single_transformer_blocks], widths):
            assert w.heads.tolist() == block.attn_rate.active(e)[0].nonzero().squeeze(1).tolist()
            assert w.groups.tolist() == block.mlp_rate.active(e)[0].nonzero().squeeze(1).tolist()
    with pytest.raises(ValueError, match="pass guidance="):
        run(model, flux_inputs(2, False))


def test_ff_context_is_routed_only_when_asked():
    plain = dynamize(tiny_flux())
    assert all(b.mlp_context_rate is None and b.mlp_rate is not None for b in plain.transformer_blocks)
    routed = dynamize(tiny_flux(), DynamicConfig(optional_units=["mlp_context"]))
    assert all(b.mlp_context_rate is not None for b in routed.transformer_blocks)
    with pytest.raises(ValueError, match=r"\['mlp_ctx'\] name no optional unit of this model; it has \['mlp_context'\]"):
        dynamize(tiny_flux(), DynamicConfig(optional_units=["mlp_ctx"]))


def test_plan_report_shows_t_and_guidance_keys():
    from dydit.dynamic.report import plan_table

    model = scramble(dynamize(tiny_flux(True)))
    ctx = DynamicContext("fast", record_usage=True)
    run(model, flux_inputs(2, True, g=4.0), ctx)
    assert "| 0 | 0.7, 4 |" in plan_table(ctx.usage, flops_spec(model))


# ---- FLOPs: per block kind, joint attention length, per-unit usage ----


def test_flops_hand_count_per_block_kind():
    model = dynamize(tiny_flux(guidance=True))
    S = NI + NT
    spec = flops_spec(set_token_geometry(model, NI, NT))
    kinds = spec.by_kind()
    double_attn = 3 * NI * D * D + 3 * NT * D * D + NI * D * D + NT * D * D + 2 * S * S * D  # q/k/v, added, outs
    assert kinds["double"]["attn"] == 2 * double_attn == 2 * (4 * S * D * D + 2 * S * S * D)
    assert kinds["double"]["mlp"] == 2 * (8 * NI * D * D + 8 * NT * D * D)  # ff on image, ff_context on text
    assert kinds["single"]["attn"] == 2 * (4 * S * D * D + 2 * S * S * D)  # q/k/v + proj_out's attention columns
    assert kinds["single"]["mlp"] == 2 * 8 * S * D * D  # proj_mlp + proj_out's MLP columns
    assert kinds["double"]["modulation"] == 2 * 12 * D * D and kinds["single"]["modulation"] == 2 * 3 * D * D
    # the token-gated share: the image ff (double), the image rows of proj_mlp and proj_out (single)
    double, single = spec.blocks[0], spec.blocks[2]
    assert double.gated == {"attn": 0, "mlp": 8 * NI * D * D, "mlp_context": 0}
    assert single.gated == {"attn": NI * D * D, "mlp": 8 * NI * D * D}
    embed = NI * C_IN * D + NT * JOINT * D + 2 * (256 * D + D * D) + POOLED * D + D * D
    assert spec.embed == embed and spec.final == 2 * D * D + NI * D * C_IN
    # the text-aware token router: linear_t once per sample on temb (D -> 4D), its router (D -> 1) per image token
    assert double.token_router == single.token_router == D * 4 * D + NI * D
    # realised MACs: each unit with its own width (ff_context at 1 of 4 groups, ff at 2), tokens half kept
    m = realised_macs(spec, [H] * 4, [H] * 4, [NI / 2] * 4,
                      units=[{"attn": 2, "mlp": 2, "mlp_context": 1}, {}, {"attn": 1, "mlp": 4}, {}])
    expect = (0.5 * double_attn + 0.5 * 0.5 * 8 * NI * D * D + 0.25 * 8 * NT * D * D  # block 0
              + double_attn + 0.5 * 8 * NI * D * D + 8 * NT * D * D  # block 1: full width, half the tokens
              + 0.25 * (4 * S * D * D + 2 * S * S * D - NI * D * D) + 0.25 * 0.5 * NI * D * D  # block 2 heads
              + 8 * NT * D * D + 0.5 * 8 * NI * D * D  # block 2 MLP: text all, image half
              + 4 * S * D * D + 2 * S * S * D - 0.5 * NI * D * D + 8 * NT * D * D + 0.5 * 8 * NI * D * D)  # block 3
    assert m["blocks"] == pytest.approx(expect)


def test_fast_usage_realises_the_masked_ratio_unit_by_unit():
    model = scramble(dynamize(tiny_flux(), DynamicConfig(optional_units=["mlp_context"])), seed=3)
    kw = flux_inputs(3)
    masked = DynamicContext("masked")
    run(model, kw, masked)
    fast = DynamicContext("fast", record_usage=True)
    run(model, kw, fast)
    spec = flops_spec(model)
    u = fast.usage[0]
    assert any(units["mlp_context"] != units["mlp"] for units in u.units[:2])  # per-unit usage matters here
    realised = realised_macs(spec, u.heads, u.groups, [k / u.batch for k in u.tokens_kept], u.units)["blocks"]
    assert realised / spec.block_total == pytest.approx(dynamic_ratio(spec, masked.records).mean().item(), rel=1e-5)
    assert realised / spec.block_total < 0.9


# ---- 3. the authors' DyFLUX checkpoints ----


def _authors_router(sd, prefix, x, temb, text):
    """The authors' TokenSelect_baesd_on_x_t_text in eval: keep where sigmoid(logit) > 0.5."""
    p = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    shift, scale, shift_t, scale_t = F.linear(F.silu(temb), p["linear_t.weight"], p["linear_t.bias"]).chunk(4, dim=1)
    norm = lambda z: F.layer_norm(z, (z.shape[-1],), p["norm.weight"], p["norm.bias"], 1e-5)  # noqa: E731
    h = norm(x) * (1 + scale[:, None]) + shift[:, None]
    ht = (norm(text) * (1 + scale_t[:, None]) + shift_t[:, None]).mean(dim=1, keepdim=True)
    logits = F.linear(h + ht, p["router.weight"], p["router.bias"])  # (B, N, 1)
    return (torch.sigmoid(logits) > 0.5).to(x.dtype)


@torch.no_grad()
def authors_eval_forward(static, sd, kw, route=True):
    """The released DyFLUX eval forward, on diffusers' static modules, with token masks from ``sd``."""
    x = static.x_embedder(kw["hidden_states"])
    t = kw["timestep"] * 1000
    tte = static.time_text_embed
    temb = (tte(t, kw["guidance"] * 1000, kw["pooled_projections"]) if kw["guidance"] is not None
            else tte(t, kw["pooled_projections"]))
    c = static.context_embedder(kw["encoder_hidden_states"])
    rope = static.pos_embed(torch.cat([kw["txt_ids"], kw["img_ids"]]))
    Nt = c.shape[1]
    for i, blk in enumerate(static.transformer_blocks):
        nx, g_msa, sh, sc, g_mlp = blk.norm1(x, emb=temb)
        nc, cg_msa, csh, csc, cg_mlp = blk.norm1_context(c, emb=temb)
        a, ca = blk.attn(hidden_states=nx, encoder_hidden_states=nc, image_rotary_emb=rope)
        x, c = x + g_msa[:, None] * a, c + cg_msa[:, None] * ca
        keep = _authors_router(sd, f"transformer_blocks.{i}.token_selection.", x, temb, c) if route else 1.0
        x = x + g_mlp[:, None] * blk.ff(blk.norm2(x) * (1 + sc[:, None]) + sh[:, None]) * keep
        c = c + cg_mlp[:, None] * blk.ff_context(blk.norm2_context(c) * (1 + csc[:, None]) + csh[:, None])
    for i, blk in enumerate(static.single_transformer_blocks):
        keep = _authors_router(sd, f"single_transformer_blocks.{i}.token_selection.", x, temb, c) if route else 1.0
        s = torch.cat([c, x], dim=1)
        n, gate = blk.norm(s, emb=temb)
        a = blk.attn(hidden_states=n, image_rotary_emb=rope)  # every token attends and is attended
        upd = gate[:, None] * blk.proj_out(torch.cat([a, blk.act_mlp(blk.proj_mlp(n))], dim=-1))
        c, x = c + upd[:, :Nt], x + upd[:, Nt:] * keep  # a skipped image token: no update at all
    return static.proj_out(static.norm_out(x, temb))


def _authors_file(tmp_path, guidance):
    base = tiny_flux(guidance)
    base.save_config(tmp_path / "base")  # the base model's transformer folder (config.json)
    dy = dynamize(copy.deepcopy(base), DynamicConfig(width=False, tokens=True))
    with torch.no_grad():  # trained-looking token routers: roughly half the image tokens kept
        g = torch.Generator().manual_seed(5)
        for name, p in dy.named_parameters():
            if "token_selection." in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.1 if name.endswith("router.bias") else 0.5))
    sd = {k: v.clone() for k, v in dy.state_dict().items()}
    assert any(k.endswith("single_transformer_blocks.1.token_selection.linear_t.weight") for k in sd)
    torch.save({"module": sd, "step": 1000}, tmp_path / "dyflux.pt")
    return base, sd


@pytest.mark.parametrize("guidance", [False, True])
def test_authors_dyflux_checkpoint_reproduces_their_eval_forward(guidance, tmp_path):
    base, sd = _authors_file(tmp_path, guidance)
    for config in (tmp_path / "base", tmp_path / "base" / "config.json"):
        model = dydit.load(tmp_path / "dyflux.pt", config=config)
        assert model.dynamic_config.tokens and not model.dynamic_config.width
    kw = flux_inputs(3, guidance)
    ref = authors_eval_forward(base, sd, kw)
    assert rel_err(ref, authors_eval_forward(base, sd, kw, route=False)) > 1e-3  # the routers matter here
    ctx = DynamicContext("fast", record_usage=True)
    assert rel_err(run(model, kw), ref) < 1e-5  # a plain call: gathered tokens
    assert rel_err(run(model, kw, ctx), ref) < 1e-5
    assert rel_err(run(model, kw, "masked"), ref) < 1e-5
    kept = ctx.usage[0].tokens_kept
    assert 0 < sum(kept) < 4 * 3 * NI and min(kept) < 3 * NI


def test_dyflux_checkpoint_needs_the_matching_config(tmp_path):
    _authors_file(tmp_path, guidance=False)
    with pytest.raises(ValueError, match=r"config=") as e:
        dydit.load(tmp_path / "dyflux.pt")
    assert "\n" not in str(e.value)
    tiny_flux(False, double=1).save_config(tmp_path / "other")
    with pytest.raises(ValueError, match="has num_layers=2 but the config describes num_layers=1;") as e:
        dydit.load(tmp_path / "dyflux.pt", config=tmp_path / "other")
    assert "\n" not in str(e.value)
    tiny_flux(True).save_config(tmp_path / "guided")
    with pytest.raises(ValueError, match="has guidance_embeds=False but the config describes guidance_embeds=True"):
        dydit.load(tmp_path / "dyflux.pt", config=tmp_path / "guided")
    # same width, other head split: only the per-head qk-norm shape tells them apart
    FluxTransformer2DModel(patch_size=1, in_channels=C_IN, num_layers=2, num_single_layers=2, attention_head_dim=16,
                           num_attention_heads=2, joint_attention_dim=JOINT, pooled_projection_dim=POOLED,
                           axes_dims_rope=(4, 4, 8)).save_config(tmp_path / "heads")
    with pytest.raises(ValueError, match="attention_head_dim=8 but the config describes attention_head_dim=16"):
        dydit.load(tmp_path / "dyflux.pt", config=tmp_path / "heads")


# ---- 4. in users' pipelines ----


def _tiny_pipeline(transformer):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035).eval()
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)


@pytest.mark.parametrize("guidance", [False, True])
def test_dyflux_transformer_in_diffusers_flux_pipeline(guidance):
    model = scramble(dynamize(tiny_flux(guidance)), seed=2)
    pipe = _tiny_pipeline(model)
    gen = torch.Generator().manual_seed(0)
    emb = dict(prompt_embeds=torch.randn(2, NT, JOINT, generator=gen), pooled_prompt_embeds=torch.randn(2, POOLED, generator=gen),
               negative_prompt_embeds=torch.zeros(2, NT, JOINT), negative_pooled_prompt_embeds=torch.zeros(2, POOLED))

    def generate():
        return pipe(**emb, true_cfg_scale=2.0, guidance_scale=3.5, height=8, width=8, num_inference_steps=3,
                    output_type="latent", generator=torch.Generator().manual_seed(1)).images

    ctx = default_context(model)  # what the pipeline's plain calls run: the fast engine
    ctx.record_usage = True
    fast = generate()
    assert len(ctx.usage) == 6 and len(ctx.plan.steps) == 3  # cond and uncond calls share each step's plan
    from dydit.dynamic.report import summarize

    assert summarize(ctx.usage, flops_spec(model))["flops_ratio"] < 0.9  # the pipeline ran the narrower network
    ctx.mode = "masked"
    assert rel_err(fast, generate()) < 1e-5  # the masked reference gives the same images
    ctx.mode = "complete"
    assert rel_err(fast, generate()) > 1e-3  # and they are not the static model's


# ---- 5. the engine at FLUX scale (the benchmark's code path, at a tiny size) ----


def test_flux_block_benchmark_runs_lambda_shaped_plans_per_block_kind(tmp_path):
    from typer.testing import CliRunner

    from dydit.cli import app

    out = tmp_path / "bench_flux"
    r = CliRunner().invoke(app, ["bench", "flux", "--blocks", "2", "--heads", "4", "--head-dim", "16", "--image-tokens",
                                 "64", "--text-tokens", "8", "--repeats", "1", "--dtype", "fp32", "--device", "cpu",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    import json

    rows = json.loads(out.with_suffix(".json").read_text())
    assert [row["kind"] for row in rows] == ["double", "single"]
    for row in rows:
        assert abs(row["realised_ratio"] - 0.5) < 0.05  # the plan that ran is λ = 0.5-shaped
        assert row["ideal_speedup"] > 1 and row["speedup"] > 0 and row["width"] == 64
    assert "| double | 2 | 64 | 64 + 8 |" in out.with_suffix(".md").read_text()


def test_lora_adapters_run_exactly_on_the_fast_path_unmerged_and_merged(caplog, monkeypatch):
    import dydit.dynamic.engine as engine

    from peft import LoraConfig

    model = tiny_flux()
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v", "add_k_proj", "to_out.0",
                                                                      "ff.net.2", "proj_mlp", "proj_out"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # zero-initialised: make the adapters change the function
                p.copy_(torch.randn_like(p) * 0.3)
    kw = flux_inputs(3)
    static = run(model, kw)
    model = scramble(dynamize(model))
    with caplog.at_level("WARNING", logger="dydit.dynamic.engine"):
        unmerged = run(model, kw, "fast")
    assert rel_err(unmerged, run(model, kw, "masked")) < 1e-5
    assert "merge the adapter" in caplog.text  # full width: exact, and the user is told why it is not faster
    assert rel_err(run(model, kw, "complete"), static) < 1e-5
    model.fuse_lora()
    monkeypatch.setattr(engine, "_wrapped_linear", None)  # merged adapters never take the full-width fallback
    ctx = DynamicContext("fast")
    assert rel_err(run(model, kw, ctx), unmerged) < 1e-5  # merged: the plain narrowed base layers
    assert rel_err(run(model, kw, "masked"), unmerged) < 1e-5


def test_a_dyflux_saved_by_diffusers_or_as_a_state_dict_loads_dynamic_again(tmp_path):
    from safetensors.torch import save_file

    model = scramble(dynamize(tiny_flux(True), DynamicConfig(optional_units=["mlp_context"])))
    kw = flux_inputs(2, True)
    ref = run(model, kw)
    with pytest.raises(TypeError, match="save it with model.save_pretrained"):
        dydit.save(model, tmp_path / "native")
    model.save_pretrained(tmp_path / "dyflux")  # diffusers' own save: config.json + router tensors
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "dyflux.safetensors")
    for loaded in (dydit.load(tmp_path / "dyflux"), dydit.load(tmp_path / "dyflux.safetensors", config=tmp_path / "dyflux")):
        c = loaded.dynamic_config
        assert c.width and c.tokens and c.optional_units == ["mlp_context"]
        assert rel_err(run(loaded, kw), ref) < 1e-5


# ---- hardening: other resolutions, mixed timesteps, training masks, importance reordering ----


def test_another_resolution_and_prompt_length_are_counted_as_they_run():
    model = scramble(dynamize(tiny_flux()))
    ctx = DynamicContext("fast", record_usage=True)
    run(model, flux_inputs(2), ctx)
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(8.0), torch.arange(8.0), indexing="ij"), -1)
    kw = dict(flux_inputs(2), hidden_states=torch.randn(2, 64, C_IN), img_ids=ids.reshape(-1, 3),
              encoder_hidden_states=torch.randn(2, 3, JOINT), txt_ids=torch.zeros(3, 3))
    assert rel_err(run(model, kw, ctx), run(model, kw, "masked")) < 1e-5
    assert [u.tokens_total for u in ctx.usage] == [NI, 64]
    double = flops_spec(model).blocks[0]
    assert double.num_tokens == 64 and double.units["attn"] == 4 * 67 * D * D + 2 * 67 * 67 * D


def test_mixed_timesteps_route_masked_and_training_masks_reach_every_router():
    model = scramble(dynamize(tiny_flux(True), DynamicConfig(optional_units=["mlp_context"])))
    kw = dict(flux_inputs(3, True), timestep=torch.tensor([0.2, 0.5, 0.9]))
    assert rel_err(run(model, kw), run(model, kw, "masked")) < 1e-5  # one call, three plans' worth of masks
    assert not default_context(model).plan.steps
    model.train()
    out = model(**kw).sample
    ratio = dynamic_ratio(flops_spec(model), default_context(model).records)  # (B,), differentiable
    (out.square().mean() + ratio.mean()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if any(r in n for r in ROUTERS)}
    assert all(g is not None for g in grads.values())  # every router is in the graph
    for kind in ("attn_rate.", "mlp_rate.", "mlp_context_rate.", "token_selection.router.", "token_selection.linear_t."):
        for stream in ("transformer_blocks.", "single_transformer_blocks."):  # (scrambled logits saturate some)
            if kind != "mlp_context_rate." or stream == "transformer_blocks.":
                assert any(g.abs().sum() > 0 for n, g in grads.items() if n.startswith(stream) and kind in n), (stream, kind)


def test_importance_reordering_keeps_the_flux_function():
    model = tiny_flux(True)
    kw = flux_inputs(2, True)
    ref = run(model, kw)
    w0 = model.single_transformer_blocks[0].proj_out.weight.clone()
    dynamize(model, DynamicConfig(optional_units=["mlp_context"]), reorder=True)
    assert not torch.equal(model.single_transformer_blocks[0].proj_out.weight, w0)  # slots really moved
    assert rel_err(run(model, kw), ref) < 1e-5


def test_first_block_cache_on_flux_both_streams_and_both_block_kinds():
    """First-Block-Cache on diffusers' FLUX blocks (keyword calls, (text, image) returns): rdt=0 is exact,
    static and DyFLUX; a skipped step is block 0 plus the last full step's rest residual on both streams."""
    from dydit.cache import FirstBlockCache, cached

    base = tiny_flux()
    dyn_model = scramble(dynamize(tiny_flux()))
    for model in (base, dyn_model):
        plain = [run(model, flux_inputs(2, t=t)) for t in (0.9, 0.6)]
        with cached(model, FirstBlockCache(rdt=0.0, warmup=0)) as cache:
            got = [run(model, flux_inputs(2, t=t)) for t in (0.9, 0.6)]
        assert cache.skipped_steps == 0 and all(rel_err(g, p) < 1e-6 for g, p in zip(got, plain))
    # a skip with a huge threshold, against a hand-made reference from plain forward hooks
    blocks = [*base.transformer_blocks, *base.single_transformer_blocks]
    seen = {}

    def note(m, a, kw, out):  # returns None: the block's output stands
        if m is blocks[1]:
            seen["in"] = (kw["hidden_states"], kw["encoder_hidden_states"])
        if m is blocks[-1]:
            seen["out"] = (out[1], out[0])
    hooks = [b.register_forward_hook(note, with_kwargs=True) for b in (blocks[1], blocks[-1])]
    run(base, flux_inputs(2, t=0.9))
    for h in hooks:
        h.remove()
    r_img, r_txt = (o - i for o, i in zip(seen["out"], seen["in"]))

    def rest(m, a, kw, out):  # block 1 adds the cached residuals, the others pass their inputs on
        img, txt = kw["hidden_states"], kw["encoder_hidden_states"]
        return (txt + r_txt, img + r_img) if m is blocks[1] else (txt, img)
    hooks = [b.register_forward_hook(rest, with_kwargs=True) for b in blocks[1:]]
    want = run(base, flux_inputs(2, t=0.6, seed=3))
    for h in hooks:
        h.remove()
    with cached(base, FirstBlockCache(rdt=1e9, warmup=0)) as cache:
        full = run(base, flux_inputs(2, t=0.9))
        skipped = run(base, flux_inputs(2, t=0.6, seed=3))
    assert [s.skipped for s in cache.history] == [False, True]
    assert rel_err(full, run(base, flux_inputs(2, t=0.9))) < 1e-6 and rel_err(skipped, want) < 1e-5
    assert rel_err(skipped, run(base, flux_inputs(2, t=0.6, seed=3))) > 1e-3  # it really skipped
    assert "forward" not in blocks[1].__dict__  # the hooks are gone




def test_centred_text_aware_token_routers_route_per_token_and_save(tmp_path):
    """DyFLUX with token_center: each sample's image-token logits average to the router bias (the text term
    cancels), the fast engine equals the masked reference with tokens really skipped, and the option is
    saved and restored with the model."""
    model = scramble(dynamize(tiny_flux(), DynamicConfig(token_center=True)))
    r = model.transformer_blocks[0].token_selection
    assert r.center
    x, temb, text = torch.randn(3, NI, D), torch.randn(3, D), torch.randn(3, NT, D)
    logits = r.logits(x, temb, text)
    assert torch.allclose(logits.mean(-1), r.router.bias.expand(3), atol=1e-5) and logits.std(-1).min() > 0.05
    assert torch.equal(r.logits(x, temb, torch.randn(3, NT, D)), logits)  # the text term cancels
    kw = flux_inputs(2)
    ctx = DynamicContext("fast", record_usage=True)
    fast = run(model, kw, ctx)
    assert 0 < sum(ctx.usage[0].tokens_kept) < 2 * NI * len(ctx.usage[0].tokens_kept)  # some tokens skipped
    assert rel_err(fast, run(model, kw, DynamicContext("masked"))) < 1e-5
    model.save_pretrained(tmp_path / "m")
    back = dydit.load(tmp_path / "m")
    assert back.dynamic_config.token_center and back.transformer_blocks[0].token_selection.center
    assert rel_err(run(back, kw, DynamicContext("fast")), fast) < 1e-6
    (tmp_path / "m" / "dydit_dynamic.json").write_text("{broken")
    with pytest.raises(ValueError, match="dydit_dynamic.json: not a dydit dynamic config"):
        dydit.load(tmp_path / "m")
