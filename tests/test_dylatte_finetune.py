"""DyLatte fine-tuning: `finetune` on a Latte checkpoint trains on Moving Fashion-MNIST videos, its FLOPs loss
covers the spatial and temporal blocks, the feedback and the final calibration sample videos, and it resumes
exactly."""
import json

import pytest
import torch

import dydit
from dydit.dynamic.finetune import finetune
from dydit.dynamic.recipe import get_recipe
from dydit.models.dit import build_model
from helpers import randomize

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def tiny_latte_base(folder, name="Latte-MFMNIST"):
    torch.manual_seed(0)
    # 3 frames of 16x16 pixels (patch 4: 16 tokens per frame), one spatial and one temporal block
    model = build_model(name, input_size=16, hidden_size=32, depth=2, num_heads=2, num_frames=3)
    dydit.save(model, folder)
    return folder


RECIPE = ["optim.steps=12", "optim.batch_size=4", "optim.router_lr=0.1", "flops.weight=20", "flops.ramp_steps=1",
          "warmup.steps=1", "router_init.width_bias=0.5", "router_init.token_bias=0.5", "feedback.every=4",
          "feedback.images=2", "feedback.steps=3", "calibration.images=2", "target=0.5"]


def _run(base, out, **kw):
    return finetune(base, out, get_recipe().with_sets(RECIPE), limit_data=16, ckpt_every=4, progress=False,
                    threads=1, log_every=1, **kw)


@pytest.mark.parametrize("name", ["Latte-MFMNIST", "Latte-MFMNIST-Flow"])  # ε-prediction (DDIM) and flow (Euler)
def test_dylatte_finetune_trains_on_video_resumes_exactly_and_moves_toward_target(tmp_path, name):
    base = tiny_latte_base(tmp_path / "base", name)
    a = _run(base, tmp_path / "a")
    assert a.finished and type(a.model).__name__ == "Latte" and a.model.dynamic_config is not None
    assert a.model.config.objective == ("flow" if name.endswith("Flow") else "diffusion")
    assert a.summary["calibration"]["sampler"] == ("euler" if name.endswith("Flow") else "ddim")
    logs = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert all(0 < r["flops_ratio"] <= 1 for r in logs)
    # the feedback samples videos on the fast engine (EMA backbone, live routers): the realised inference
    # ratio starts at the open routers' 1.0 and moves toward λ (this toy recipe's strong FLOPs weight can
    # overshoot it; the calibration below brings it back)
    inference = [r["inference_ratio"] for r in logs if "inference_ratio" in r]
    assert inference[0] == pytest.approx(1.0, abs=0.05)
    assert inference[-1] < inference[0] - 0.2
    if not name.endswith("Flow"):  # the ε-prediction toy run lands near λ itself
        assert abs(inference[-1] - 0.5) < abs(inference[0] - 0.5) - 0.2
    cal = a.summary["calibration"]
    assert abs(cal["ratio_after"] - 0.5) <= abs(cal["ratio_before"] - 0.5)
    assert cal["ratio_after"] == pytest.approx(0.5, abs=0.2)
    reloaded = dydit.load(tmp_path / "a" / "ema")  # the DyLatte folder loads as a video model
    assert reloaded.config.num_frames == 3 and reloaded.dynamic_config is not None

    b = _run(base, tmp_path / "b", stop_after=4)
    assert not b.finished
    _run(base, tmp_path / "b", resume=True)
    ca = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    cb = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert ca["task"] == cb["task"] and ca["task"]["inference_ratio"] is not None
    assert all(torch.equal(ca["ema"][k], cb["ema"][k]) for k in ca["ema"])
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])


def test_finetune_task_counts_spatial_and_temporal_blocks_on_video_batches():
    from dydit.dynamic import DynamicConfig, dynamize
    from dydit.dynamic.finetune import FinetuneConfig, FinetuneTask

    torch.manual_seed(0)
    model = dynamize(build_model("Latte-MFMNIST", input_size=16, hidden_size=32, depth=4, num_heads=2,
                                 num_frames=3), DynamicConfig(width_bias_init=0.0, token_bias_init=0.0)).train()
    task = FinetuneTask(model, FinetuneConfig(target=0.5, warmup_steps=1, ramp_steps=0, distill=1.0),
                        teacher=build_model("Latte-MFMNIST", input_size=16, hidden_size=32, depth=4, num_heads=2,
                                            num_frames=3))
    assert [b.kind for b in task.spec.blocks] == ["spatial", "temporal"] * 2
    x = torch.rand(4, 3, 1, 16, 16) * 2 - 1
    loss, logs = task.loss(model, x, torch.tensor([0, 1, 2, 3]), 0, torch.Generator().manual_seed(0))
    loss.backward()
    assert {"diff_loss", "flops_loss", "complete_loss", "distill_loss"} <= set(logs)
    # the FLOPs loss reaches the width and token routers of both block kinds
    for block in model.blocks:
        assert block.attn_rate.router.weight.grad.abs().sum() > 0
        assert block.token_selection.mlp_head[2].weight.grad.abs().sum() > 0


def test_video_results_script_fine_tunes_resolve_within_15_percent_of_the_base():
    from test_recipe import _script_recipes_within_budget

    assert len(_script_recipes_within_budget("video_results.sh", "dydit train --model Latte-MFMNIST")) == 2


def test_td_lora_on_latte_mixes_experts_per_video_sample():
    # Latte folds frames (spatial blocks) or positions (temporal blocks) into the batch: each folded row must
    # mix the LoRA experts with its own sample's E_t, so a sample's output does not depend on its batch mates
    from dydit.dynamic import dynamize
    from dydit.peft import TDLoRAConfig, apply_td_lora

    torch.manual_seed(0)
    model = apply_td_lora(dynamize(build_model("Latte-MFMNIST", input_size=16, hidden_size=32, depth=2, num_heads=2,
                                               num_frames=3)), TDLoRAConfig(r=2, num_experts=3)).eval()
    randomize(model, scale=0.2)  # LoRA B and adaLN-Zero start at zero: make every path count
    x, y = torch.randn(2, 3, 1, 16, 16), torch.tensor([1, 2])
    t = torch.tensor([50, 900])
    with torch.no_grad():
        both = model(x, t, y, dyn="complete")
        alone = torch.cat([model(x[i : i + 1], t[i : i + 1], y[i : i + 1], dyn="complete") for i in range(2)])
    assert torch.allclose(both, alone, atol=1e-5)
    with torch.no_grad():  # and the experts matter: another sample's timestep changes the output
        swapped = model(x[:1], t[1:], y[:1], dyn="complete")
    assert not torch.allclose(swapped, alone[:1], atol=1e-3)


@pytest.mark.parametrize("sets", [["prune_static=true"], ["peft.method=td-lora"], ["distill.weight=1.0"],
                                  ["freeze.routers=0.5", "freeze.time_embed=true", "freeze.calibrate=true"]],
                         ids=["prune-static", "td-lora", "distill", "frozen-plan"])
def test_every_recipe_variant_runs_on_latte(tmp_path, sets):
    base = tiny_latte_base(tmp_path / "base")
    recipe = get_recipe().with_sets(RECIPE + sets + ["optim.steps=8"])
    r = finetune(base, tmp_path / "out", recipe, limit_data=16, ckpt_every=8, progress=False, threads=1)
    assert r.finished and r.weights.exists()
