"""Router threshold calibration: the calibrated model realises λ at inference, on its own sampler."""
import json

import pytest
import torch

import dydit
from dydit.assets import default_model_path
from dydit.dynamic import dynamize
from dydit.dynamic.calibrate import calibrate, measure_ratio
from helpers import scramble_routers

FAST = dict(sampler="ddim", steps=5, cfg_scale=4.0, num_images=6)


def _dynamic_embedded(seed=1):
    model = dynamize(dydit.load(default_model_path()))
    return scramble_routers(model, seed=seed).eval()


def test_calibration_moves_the_realised_ratio_to_the_target():
    model = _dynamic_embedded()
    before = measure_ratio(model, **FAST)
    target = round(before - 0.1, 2)
    result = calibrate(model, target, tol=0.01, max_evals=20, **FAST)
    assert result.knob == "tokens" and result.ratio_before == pytest.approx(before)
    assert abs(result.ratio_after - target) <= 0.01, result
    # the shift is folded into the router biases: the saved model realises it without the calibrator
    assert measure_ratio(model, **FAST) == pytest.approx(result.ratio_after)


def test_calibration_keeps_the_width_plan_when_shifting_tokens():
    model = _dynamic_embedded()
    widths = {k: v.clone() for k, v in model.state_dict().items() if "attn_rate" in k or "mlp_rate" in k}
    calibrate(model, 0.5, tol=0.02, max_evals=12, **FAST)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in widths.items())


def test_impossible_target_names_the_problem_and_leaves_the_model_unchanged():
    model = _dynamic_embedded()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="cannot reach FLOPs ratio 0.010"):
        calibrate(model, 0.01, max_evals=20, **FAST)  # every MLP token off still leaves attention running
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    with pytest.raises(ValueError, match="dynamic"):
        calibrate(dydit.load(default_model_path()), 0.5, **FAST)


def test_finetune_cli_calibrates_its_output(tmp_path):
    from typer.testing import CliRunner

    from dydit.cli import app

    out = tmp_path / "ft"
    res = CliRunner().invoke(app, ["finetune", str(default_model_path()), "--out", str(out), "--steps", "2",
                                   "--batch-size", "8", "--limit-data", "32", "--set", "flops.ramp_steps=1",
                                   "--set", "warmup.steps=1", "--ckpt-every", "2", "--target", "0.8",
                                   "--set", "feedback.steps=4", "--set", "calibration.images=4"])
    assert res.exit_code == 0, res.output
    cal = json.loads((out / "finetune.json").read_text())["calibration"]
    assert cal["target"] == 0.8 and cal["steps"] == 4
    model = dydit.load(out / "ema")
    got = measure_ratio(model, "ddim", 4, 4.0, 4)
    assert got == pytest.approx(cal["ratio_after"], abs=1e-6)


def test_feedback_moves_the_training_target_by_the_measured_inference_gap():
    import copy

    from dydit.dynamic.finetune import FinetuneConfig, FinetuneTask

    model = _dynamic_embedded()
    ema = copy.deepcopy(model)
    task = FinetuneTask(model, FinetuneConfig(target=0.5, ramp_steps=4, feedback_every=2, feedback_images=2,
                                              feedback_steps=3))
    logs = {}
    task.after_step(2, model, ema, logs)  # still in the ramp: nothing measured
    assert logs == {} and task.offset == 0.0
    task._acc = [0.9, 2]  # training ratio 0.45 over the window
    task.after_step(4, model, ema, logs)
    assert logs["inference_ratio"] == pytest.approx(measure_ratio(ema, "ddim", 3, 4.0, 2))
    assert task.offset == pytest.approx(logs["inference_ratio"] - 0.45)
    assert task.target_at(5) == pytest.approx(max(0.02, 0.5 - task.offset))
    state = task.state_dict()
    other = FinetuneTask(model, FinetuneConfig(target=0.5))
    other.load_state_dict(state)
    assert other.state_dict() == state


def test_finetune_with_feedback_resumes_exactly(tmp_path):
    from typer.testing import CliRunner

    from dydit.cli import app

    def run(out, *extra):
        # no torch.manual_seed here: finetune() seeds the token routers' random init from the recipe
        res = CliRunner().invoke(app, ["finetune", str(default_model_path()), "--out", str(out), "--steps", "4",
                                       "--batch-size", "8", "--limit-data", "32", "--set", "flops.ramp_steps=1",
                                       "--set", "warmup.steps=1", "--ckpt-every", "2", "--set", "feedback.every=2",
                                       "--set", "feedback.images=2", "--set", "feedback.steps=3",
                                       "--set", "calibration.enabled=false", *extra])
        assert res.exit_code == 0, res.output

    run(tmp_path / "a")
    run(tmp_path / "b", "--stop-after", "2")
    run(tmp_path / "b", "--resume")
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert a["task"] == b["task"] and a["task"]["inference_ratio"] is not None
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])


def test_calibration_falls_back_to_width_when_tokens_cannot_reach():
    model = _dynamic_embedded()
    with torch.no_grad():  # every token kept whatever the shift: only the width can move the ratio
        for b in model.blocks:
            b.token_selection.mlp_head[2].weight.zero_()
            b.token_selection.mlp_head[2].bias.fill_(500.0)
            b.attn_rate.router.bias.sub_(3.0)  # and the width well below λ
            b.mlp_rate.router.bias.sub_(3.0)
    before = measure_ratio(model, **FAST)
    result = calibrate(model, min(0.95, before + 0.2), tol=0.05, max_evals=20, **FAST)
    assert result.knob == "width" and result.ratio_after > before


def test_frozen_plan_phase_trains_the_backbone_on_the_inference_masks():
    from dydit.dynamic.convert import router_parameters
    from dydit.dynamic.finetune import FinetuneConfig, FinetuneTask

    model = _dynamic_embedded().train()
    cfg = FinetuneConfig(target=0.5, total_steps=10, ramp_steps=2, warmup_steps=0, freeze_routers=0.4, noise_anneal=0.3)
    task = FinetuneTask(model, cfg)
    assert task.freeze_step() == 6 and not task.frozen(5) and task.frozen(6)
    assert task.noise_at(3) == 1.0 and task.noise_at(5) == 0.0  # the noise is gone before the plan freezes
    c = model.config
    x = torch.randn(4, c.in_channels, c.input_size, c.input_size)
    y = torch.arange(4)
    for step, frozen in ((4, False), (6, True)):
        model.zero_grad(set_to_none=True)
        loss, logs = task.loss(model, x, y, step, torch.Generator().manual_seed(0))
        loss.backward()
        router_grads = [p.grad for p in router_parameters(model)]
        if frozen:  # the eval masks: no gradient reaches any router, the FLOPs term is off
            assert all(g is None or not g.any() for g in router_grads) and logs["flops_loss"] == 0.0
        else:
            assert any(g is not None and g.any() for g in router_grads)
        assert model.final_layer.linear.weight.grad.abs().sum() > 0
    task._acc = [0.9, 2]
    logs = {}
    task.after_step(6, model, model, logs)  # no feedback once the plan is fixed
    assert logs == {} and task.offset == 0.0


def test_damped_feedback_moves_the_correction_part_of_the_way():
    import copy

    from dydit.dynamic.finetune import FinetuneConfig, FinetuneTask

    model = _dynamic_embedded()
    ema = copy.deepcopy(model)
    task = FinetuneTask(model, FinetuneConfig(target=0.5, ramp_steps=2, feedback_every=2, feedback_images=2,
                                              feedback_steps=3, feedback_gain=0.5))
    task.offset, task._acc = 0.2, [0.9, 2]
    logs = {}
    task.after_step(2, model, ema, logs)
    gap = logs["inference_ratio"] - 0.45
    assert task.offset == pytest.approx(max(-0.25, min(0.25, 0.1 + 0.5 * gap)))


def test_distillation_regresses_the_static_model_on_the_same_inputs_and_dropped_labels():
    import copy

    from dydit.dynamic.finetune import FinetuneConfig, FinetuneTask

    static = dydit.load(default_model_path())
    static.y_embedder.dropout_prob = 0.5  # many dropped labels: a teacher that saw other labels would differ
    teacher = copy.deepcopy(static)
    model = dynamize(static).train()  # reordered heads and channels, all on: the static function
    # a frozen plan from step 0 runs the eval masks, so student and teacher compute the same function
    cfg = FinetuneConfig(target=0.5, total_steps=4, ramp_steps=0, warmup_steps=0, freeze_routers=1.0,
                         distill=1.0, data_weight=0.0)
    task = FinetuneTask(model, cfg, teacher=teacher)
    assert not any(p.requires_grad for p in task.teacher.parameters()) and not task.teacher.training
    c = model.config
    x = torch.randn(32, c.in_channels, c.input_size, c.input_size)
    y = torch.arange(32) % c.num_classes
    torch.manual_seed(0)
    loss, logs = task.loss(model, x, y, 0, torch.Generator().manual_seed(0))
    assert logs["distill_loss"] < 1e-10 and loss.item() < 1e-10  # data_weight 0: nothing else counts
    with torch.no_grad():  # a student that moved away is pulled back, on every output channel
        model.final_layer.linear.bias.add_(0.1)
    loss, logs = task.loss(model, x, y, 0, torch.Generator().manual_seed(0))
    assert logs["distill_loss"] == pytest.approx(0.01, rel=1e-4)
    loss.backward()
    assert model.final_layer.linear.bias.grad.abs().min() > 0
    with pytest.raises(ValueError, match="teacher"):
        FinetuneTask(model, FinetuneConfig(distill=1.0))
    with pytest.raises(ValueError, match="data_weight=0"):
        FinetuneTask(model, FinetuneConfig(data_weight=0.0))


def test_finetune_cli_distills_from_its_init(tmp_path):
    from typer.testing import CliRunner

    from dydit.cli import app

    out = tmp_path / "kd"
    args = ["finetune", str(default_model_path()), "--out", str(out), "--steps", "2", "--batch-size", "8",
            "--limit-data", "32", "--set", "flops.ramp_steps=1", "--set", "warmup.steps=0", "--ckpt-every", "2",
            "--set", "calibration.enabled=false", "--set", "feedback.every=0"]
    res = CliRunner().invoke(app, args + ["--set", "distill.weight=1", "--set", "distill.data_weight=0"])
    assert res.exit_code == 0, res.output
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert logs and all(r["distill_loss"] > 0 for r in logs)
    assert json.loads((out / "finetune.json").read_text())["finetune"]["distill"] == 1.0
    res = CliRunner().invoke(app, args + ["--set", "distill.data_weight=0"])
    assert res.exit_code != 0 and "distill.data_weight=0" in res.output


def test_frozen_time_embedder_fixes_the_width_plan_in_the_live_and_the_ema_model():
    import copy
    from types import SimpleNamespace

    from dydit.dynamic.finetune import FinetuneConfig, FinetuneTask

    model = _dynamic_embedded().train()
    ema = copy.deepcopy(model)
    with torch.no_grad():
        ema.t_embedder.mlp[0].bias.add_(1.0)  # the EMA lags the live embedder
    cfg = FinetuneConfig(target=0.5, total_steps=10, ramp_steps=2, warmup_steps=0, freeze_routers=0.4,
                         freeze_time_embed=True, feedback_every=0)
    task = FinetuneTask(model, cfg)
    opt = task.configure_optimizer(model, SimpleNamespace(lr=1e-3, weight_decay=0.01))
    group = next(g for g in opt.param_groups if g.get("name") == "time_embed")
    task.after_step(5, model, ema, {})
    assert group["lr_scale"] == 1.0 and not torch.equal(ema.t_embedder.mlp[0].bias, model.t_embedder.mlp[0].bias)
    task.after_step(6, model, ema, {})  # the freeze: the EMA takes the live embedder, both stop
    assert group["lr_scale"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(ema.t_embedder.parameters(), model.t_embedder.parameters()))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for g in opt.param_groups:  # what the training loop does each step
        g["lr"] = 1e-3 * g["lr_scale"]
    c = model.config
    x, y = torch.randn(4, c.in_channels, c.input_size, c.input_size), torch.arange(4)
    loss, _ = task.loss(model, x, y, 6, torch.Generator().manual_seed(0))
    loss.backward()
    opt.step()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("t_embedder."))
    assert not torch.equal(before["final_layer.linear.weight"], after["final_layer.linear.weight"])
    resumed = FinetuneTask(model, cfg)  # a resume restores the stopped group from the optimizer state
    opt2 = resumed.configure_optimizer(model, SimpleNamespace(lr=1e-3, weight_decay=0.01))
    opt2.load_state_dict(opt.state_dict())
    assert next(g for g in opt2.param_groups if g.get("name") == "time_embed")["lr_scale"] == 0.0
    with pytest.raises(ValueError, match="freeze_routers"):
        FinetuneTask(model, FinetuneConfig(freeze_time_embed=True))


def test_calibration_at_the_freeze_sets_the_plan_the_backbone_then_trains_on():
    import copy

    from dydit.dynamic.convert import router_parameters
    from dydit.dynamic.finetune import FinetuneConfig, FinetuneTask

    model = _dynamic_embedded().train()
    ema = copy.deepcopy(model).eval()
    target = round(measure_ratio(ema, **FAST) - 0.1, 2)
    cfg = FinetuneConfig(target=target, total_steps=10, ramp_steps=2, warmup_steps=0, freeze_routers=0.4,
                         calibrate_at_freeze=True, feedback_every=0, feedback_steps=FAST["steps"],
                         calib_images=FAST["num_images"])
    task = FinetuneTask(model, cfg)
    routers = [p.clone() for p in router_parameters(model)]
    task.after_step(5, model, ema, {})  # before the freeze: nothing moves
    assert all(torch.equal(a, b) for a, b in zip(routers, router_parameters(model)))
    logs = {}
    task.after_step(6, model, ema, logs)  # the first frozen step is next: calibrate now
    assert abs(logs["calibrated_ratio"] - target) <= 0.01, logs
    assert logs["calibration_shift"] != 0.0
    assert all(torch.equal(a, b) for a, b in zip(router_parameters(model), router_parameters(ema)))
    assert measure_ratio(ema, **FAST) == pytest.approx(logs["calibrated_ratio"])
    shifted = [p.clone() for p in router_parameters(model)]
    task.after_step(7, model, ema, {})  # once only
    assert all(torch.equal(a, b) for a, b in zip(shifted, router_parameters(model)))
    with pytest.raises(ValueError, match="freeze_routers"):
        FinetuneTask(model, FinetuneConfig(calibrate_at_freeze=True))


def test_width_target_at_the_freeze_widens_the_plan_and_skips_tokens_for_the_rest():
    """freeze.width_target: width thresholds to that ratio first, then the token thresholds to λ, so the frozen
    plan is wider than the plain calibration's and skips more tokens, at the same realised ratio."""
    import copy

    from dydit.dynamic.finetune import FinetuneConfig, FinetuneTask

    model = _dynamic_embedded().train()
    ema = copy.deepcopy(model).eval()
    before = measure_ratio(ema, **FAST)
    target, wide = round(before - 0.05, 2), round(min(before + 0.15, 0.95), 2)
    common = dict(target=target, total_steps=10, ramp_steps=2, warmup_steps=0, freeze_routers=0.4,
                  calibrate_at_freeze=True, feedback_every=0, feedback_steps=FAST["steps"],
                  calib_images=FAST["num_images"])
    plain, split = {}, {}
    FinetuneTask(model, FinetuneConfig(**common)).after_step(6, model, copy.deepcopy(ema), plain)
    model = _dynamic_embedded().train()
    FinetuneTask(model, FinetuneConfig(**common, width_target=wide)).after_step(6, model, ema, split)
    assert abs(split["width_calibrated_ratio"] - wide) <= 0.01, split
    assert split["width_calibration_shift"] > 0  # the widths grew ...
    assert abs(split["calibrated_ratio"] - target) <= 0.01, split
    assert split["calibration_shift"] < plain["calibration_shift"] < 0  # ... and the tokens pay for it
    assert measure_ratio(ema, **FAST) == pytest.approx(split["calibrated_ratio"])
    with pytest.raises(ValueError, match="calibrate_at_freeze"):
        FinetuneTask(model, FinetuneConfig(freeze_routers=0.4, width_target=0.6))


def test_ema_restart_at_the_freeze_makes_the_ema_the_live_backbone_once():
    import copy

    from dydit.dynamic.finetune import FinetuneConfig, FinetuneTask

    model = _dynamic_embedded().train()
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.01)  # the EMA lags the live weights
    cfg = FinetuneConfig(target=0.5, total_steps=10, ramp_steps=2, warmup_steps=0, freeze_routers=0.4,
                         ema_restart=True, feedback_every=0)
    task = FinetuneTask(model, cfg)
    logs = {}
    task.after_step(5, model, ema, logs)  # before the freeze: the EMA is left alone
    assert "ema_restart" not in logs
    assert not torch.equal(ema.final_layer.linear.weight, model.final_layer.linear.weight)
    task.after_step(6, model, ema, logs)  # the freeze: the EMA restarts from the live weights
    assert logs["ema_restart"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), model.parameters()) if b.requires_grad)
    with torch.no_grad():
        model.final_layer.linear.weight.add_(1.0)
    task.after_step(7, model, ema, {})  # once only
    assert not torch.equal(ema.final_layer.linear.weight, model.final_layer.linear.weight)
    with pytest.raises(ValueError, match="freeze_routers"):
        FinetuneTask(model, FinetuneConfig(ema_restart=True))
