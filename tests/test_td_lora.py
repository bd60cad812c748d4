"""TD-LoRA: starts as the base function, merged fast path equals the unmerged masked reference,
K = 1 is plain LoRA, small trainable share, adapter files round-trip, training touches only adapters."""
import json
from copy import deepcopy

import pytest
import torch

from dydit.dynamic import DynamicContext, dynamize
from dydit.dynamic.convert import _is_router_name
from dydit.dynamic.finetune import FinetuneConfig, FinetuneTask
from dydit.models.dit import build_model
from dydit.peft import (
    TDLoRAConfig,
    TDLoRALinear,
    apply_td_lora,
    load_adapters,
    save_adapters,
    td_lora_fast_context,
    trainable_report,
)
from dydit.peft.td_lora import td_lora_layers
from dydit.sampling import sample
from helpers import randomize, scramble_routers

torch.set_num_threads(1)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def randomize_adapters(model, seed=2, scale=0.3, router_scale=0.02):
    """Non-zero B and mixing routers that give each timestep its own expert mixture."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n or ".lora_router." in n:
                p.copy_(torch.randn(p.shape, generator=g) * (scale if ".lora_B." in n else router_scale))
    return model


def dyn_tiny(name="DiT-Tiny", seed=0, scale=0.3):
    return scramble_routers(dynamize(randomize(build_model(name), seed=seed, scale=scale))).eval()


def timesteps(name):
    return [0.0, 250.0, 999.0] if name.startswith("DiT") else [0.0, 0.4, 0.95]


def test_zero_init_b_equals_base_exactly():
    model = dyn_tiny()
    x, y, t = torch.randn(3, 4, 8, 8), torch.tensor([1, 2, 3]), torch.tensor([5.0, 400.0, 900.0])
    ref_static, ref_masked = model(x, t, y), model(x, t, y, dyn=DynamicContext("masked"))
    apply_td_lora(model)
    assert torch.equal(model(x, t, y), ref_static)
    assert torch.equal(model(x, t, y, dyn=DynamicContext("masked")), ref_masked)


@pytest.mark.parametrize("name", ["DiT-Tiny", "SiT-Tiny"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_fast_merged_equals_unmerged_masked_reference(name, batch, dtype, tol):
    # weights at scale 0.1 keep the random network well conditioned enough for an fp32 comparison;
    # float64 shows the merged and unmerged computations are the same function
    model = randomize_adapters(apply_td_lora(dyn_tiny(name, scale=0.1)), router_scale=0.2).to(dtype)
    a = model.blocks[0].mlp.fc1.mixing_weights("default", model.t_embedder(torch.tensor(timesteps(name), dtype=dtype)))
    assert (a - a[:1]).abs().max() > 0.05, "the expert mixture must change with t in this test"
    base = deepcopy(model)
    for layer in td_lora_layers(base).values():
        layer.set_adapter([])  # the same DyDiT without adapters
    calls = []
    for layer in td_lora_layers(model).values():
        layer.register_forward_hook(lambda *a: calls.append(1))
    g = torch.Generator().manual_seed(batch)
    x, y = torch.randn(batch, 4, 8, 8, generator=g).to(dtype), torch.arange(batch) % 10
    ctx = td_lora_fast_context(model)
    for tv in timesteps(name):
        t = torch.full((batch,), tv, dtype=dtype)
        calls.clear()
        masked = DynamicContext("masked")
        ref = model(x, t, y, dyn=masked)
        assert calls, "the masked reference runs the unmerged adapter layers"
        calls.clear()
        fast = model(x, t, y, dyn=ctx)
        assert not calls, "fast mode must use merged weights, never the adapter matmuls"
        assert rel_err(fast, ref) <= tol
        assert rel_err(ref, base(x, t, y, dyn=DynamicContext("masked"))) > 1e-3, "adapters must matter here"
    assert not ctx.weights.cache.entries, "by default no per-step merged copy is kept (memory = static)"
    cached = td_lora_fast_context(model, max_cache_bytes=2**30)
    t = torch.full((batch,), timesteps(name)[0], dtype=dtype)
    assert rel_err(model(x, t, y, dyn=cached), model(x, t, y, dyn=DynamicContext("masked"))) <= tol
    assert cached.weights.cache.entries, "with a budget, merged weights are cached per (block, t, active set)"


def test_mixing_depends_on_timestep():
    model = randomize_adapters(apply_td_lora(dyn_tiny()))
    layer = model.blocks[0].attn.qkv
    e = model.t_embedder(torch.tensor([0.0, 999.0]))
    a = layer.mixing_weights("default", e)  # (2, K)
    assert a.shape == (2, 4) and torch.allclose(a.sum(1), torch.ones(2))
    assert (a[0] - a[1]).abs().max() > 1e-3
    assert rel_err(layer.merged_weight(e[0]), layer.merged_weight(e[1])) > 1e-3


def test_plain_fast_context_folds_unmerged_adapters():
    """The generic fast path folds timestep-mixed adapters too: a plain call of a TD-LoRA DyDiT routes
    on the fast engine and equals the masked computation (nothing is silently dropped)."""
    # float64: this random network amplifies fp32 rounding to ~1.5e-5 (the masked fp32 output's own
    # distance from its float64 value), so only float64 can show the two are the same function
    model = randomize_adapters(apply_td_lora(scramble_routers(dyn_tiny())), scale=0.1, router_scale=0.2).eval()
    model = model.double()
    x, t, y = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.tensor([10.0, 10.0], dtype=torch.float64), torch.tensor([1, 2])
    masked = model(x, t, y, dyn=DynamicContext("masked"))
    for out in (model(x, t, y), model(x, t, y, dyn=DynamicContext("fast"))):
        assert rel_err(out, masked) <= 1e-12
    base = model(x, t, y, dyn="complete")
    for layer in td_lora_layers(model).values():
        layer.set_adapter([])  # adapters off: the output must change, so they were really applied
    assert rel_err(model(x, t, y, dyn="complete"), base) > 1e-4


@pytest.mark.parametrize("name,cfg", [("DiT-Tiny", 4.0), ("SiT-Tiny", 4.0), ("DiT-Tiny", 1.0)])
def test_fast_sampling_equals_masked_sampling(name, cfg):
    model = dynamize(randomize(build_model(name), scale=0.1))
    model = randomize_adapters(apply_td_lora(scramble_routers(model)), scale=0.1, router_scale=0.2).eval()
    method = "ddim" if name.startswith("DiT") else "euler"
    a = sample(model, [1, 2, 3], method, 5, cfg_scale=cfg, seed=0, dyn=DynamicContext("masked"))
    b = sample(model, [1, 2, 3], method, 5, cfg_scale=cfg, seed=0, dyn=td_lora_fast_context(model))
    assert rel_err(b, a) <= 1e-5


def test_single_expert_is_plain_lora_and_merges():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = randomize_adapters(apply_td_lora(dyn_tiny(), TDLoRAConfig(r=3, num_experts=1, lora_alpha=6.0)))
    layer = model.blocks[1].mlp.fc1
    assert "default" not in layer.lora_router  # K = 1: mixing weight is the constant 1, no router
    # the reference: peft's own LoRA on a copy of the base linear, with the same A and B
    ref = torch.nn.Sequential(deepcopy(layer.base_layer))
    ref = peft.inject_adapter_in_model(peft.LoraConfig(r=3, lora_alpha=6, target_modules=["0"]), ref)
    with torch.no_grad():
        ref[0].lora_A["default"].weight.copy_(layer.lora_A["default"].weight)
        ref[0].lora_B["default"].weight.copy_(layer.lora_B["default"].weight)
    x = torch.randn(2, 5, 64)
    model.t_embedder(torch.tensor([3.0, 7.0]))  # any E_t: K = 1 ignores it
    out = layer(x)
    assert rel_err(out, ref(x)) < 1e-6
    w0 = layer.weight.clone()
    layer.merge()
    assert layer.merged_adapters == ["default"] and not torch.equal(layer.weight, w0)
    assert rel_err(layer(x), out) < 1e-6
    assert rel_err(layer.weight, ref[0].get_delta_weight("default") + w0) < 1e-6
    layer.unmerge()
    assert torch.allclose(layer.weight, w0, atol=1e-6) and not layer.merged_adapters
    # merged single-expert layers need no per-timestep weights: the plain fast path is then correct
    x, t, y = torch.randn(2, 4, 8, 8), torch.full((2,), 300.0), torch.tensor([0, 1])
    ref_out = model(x, t, y, dyn=DynamicContext("masked"))
    for lay in td_lora_layers(model).values():
        lay.merge()
    assert rel_err(model(x, t, y, dyn=DynamicContext("fast")), ref_out) < 1e-5


def test_multi_expert_merge_is_per_timestep():
    model = randomize_adapters(apply_td_lora(dyn_tiny()))
    layer = model.blocks[0].attn.proj
    with pytest.raises(ValueError, match="merged_weight"):
        layer.merge()
    t = torch.tensor([123.0, 123.0])
    e = model.t_embedder(t)  # also records E_t for the layer's forward
    x = torch.randn(2, 16, 64)
    merged = torch.nn.functional.linear(x, layer.merged_weight(e[0]), layer.bias)
    assert rel_err(merged, layer(x)) < 1e-5


def test_trainable_share_at_defaults():
    model = apply_td_lora(dynamize(build_model("DiT-FMNIST")))
    trainable, backbone, share = trainable_report(model)
    assert 0 < share <= 0.05 and trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert backbone == sum(p.numel() for p in build_model("DiT-FMNIST").parameters())
    with torch.device("meta"):
        xl = apply_td_lora(dynamize(build_model("DiT-XL/2")))
    trainable, backbone, share = trainable_report(xl)
    assert 0.005 < share <= 0.05, share
    assert abs(backbone / 1e6 - 675) / 675 < 0.01


def test_adapters_save_load_round_trip(tmp_path):
    static = randomize(build_model("DiT-Tiny"))
    base_state = deepcopy(static.state_dict())
    model = scramble_routers(dynamize(static, reorder=True))
    model = randomize_adapters(apply_td_lora(model)).eval()
    save_adapters(model, tmp_path / "ad", base_reordered=True)
    meta = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert meta["peft_type"] == "TD_LORA" and meta["config"]["num_experts"] == 4

    fresh = build_model("DiT-Tiny")
    fresh.load_state_dict(base_state)
    fresh = load_adapters(fresh, tmp_path / "ad").eval()
    x, y, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 4]), torch.full((2,), 640.0)
    assert torch.equal(fresh(x, t, y, dyn=DynamicContext("masked")), model(x, t, y, dyn=DynamicContext("masked")))
    trained = {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n or _is_router_name(n) for n in trained)

    with pytest.raises(ValueError, match="base weights differ"):
        load_adapters(randomize(build_model("DiT-Tiny"), seed=5), tmp_path / "ad")
    with pytest.raises(ValueError, match="hidden_size"):
        load_adapters(build_model("DiT-Tiny", hidden_size=32), tmp_path / "ad")
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    state.pop("blocks.1.mlp.fc2.lora_B.weight")
    save_file(state, str(tmp_path / "ad" / "adapter_model.safetensors"))
    broken = build_model("DiT-Tiny")
    broken.load_state_dict(base_state)
    with pytest.raises(ValueError, match="missing .*blocks.1.mlp.fc2.lora_B.weight"):
        load_adapters(broken, tmp_path / "ad")


def test_training_updates_only_routers_and_adapters(tmp_path):
    from dydit.train import TrainConfig, train

    torch.manual_seed(0)
    pretrained = randomize(build_model("DiT-FMNIST", hidden_size=32, depth=1, num_heads=4), scale=0.1)  # not adaLN-Zero
    model = apply_td_lora(dynamize(pretrained))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(out=str(tmp_path), steps=2, batch_size=8, limit_data=16, warmup_steps=0, lr=1e-2,
                      sample_every=0, ckpt_every=100, log_every=1, threads=1, data="/usr/share/datasets/fashion-mnist")
    task = FinetuneTask(model, FinetuneConfig(warmup_steps=1, ramp_steps=2, target=0.5))
    train(cfg, model=model, task=task, progress=False)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "nothing trained"
    assert all(".lora_" in n or _is_router_name(n) for n in changed), sorted(changed)
    assert any(".lora_B." in n for n in changed) and any(_is_router_name(n) for n in changed), sorted(changed)
    assert isinstance(model.blocks[0].mlp.fc1, TDLoRALinear)
