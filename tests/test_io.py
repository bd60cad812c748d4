"""Checkpoint I/O: official DiT/SiT files, diffusers DiT folders (both ways), the VAE wrapper, and errors
that name the file."""
import argparse
import json

import pytest
import torch

import dydit
from dydit.io.diffusers_dit import export_diffusers
from dydit.models.dit import build_model

X = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
T = torch.tensor([3.0, 500.0, 999.0])
Y = torch.tensor([0, 7, 10])  # 10 is the null (CFG) class


def randomize(module, seed=0, scale=0.3, skip=("pos_embed",)):
    """Random non-zero weights everywhere (adaLN-Zero and the final layer start at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name not in skip:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return module.eval()


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def tiny(name="DiT-Tiny", seed=0, **kw):
    return randomize(build_model(name, **kw), seed)


#################################################################################
#                               Official .pt files                              #
#################################################################################


@pytest.mark.parametrize("model_name", [None, "DiT-Tiny"])
def test_official_state_dict_loads_strictly_with_inferred_architecture(tmp_path, model_name):
    src = tiny()
    path = tmp_path / "DiT-tiny-256.pt"
    torch.save(src.state_dict(), path)
    model = dydit.load(path, model_name=model_name)
    c = model.config
    assert (c.hidden_size, c.depth, c.num_heads, c.patch_size, c.input_size) == (64, 2, 4, 2, 8)
    assert (c.num_classes, c.learn_sigma, c.objective, c.out_channels_used) == (10, True, "diffusion", None)
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(model(X, T, Y), src(X, T, Y))


def test_official_training_dict_with_namespace_args_and_optimizer(tmp_path):
    model_w, ema_w = tiny(seed=1), tiny(seed=2)
    opt = torch.optim.AdamW(model_w.parameters(), lr=1e-4)
    model_w(X, T, Y).square().mean().backward()
    opt.step()
    args = argparse.Namespace(model="DiT-Tiny", image_size=64, num_classes=10, results_dir="results", vae="ema")
    path = tmp_path / "0400000.pt"
    torch.save({"model": model_w.state_dict(), "ema": ema_w.state_dict(), "opt": opt.state_dict(), "args": args},
               path)
    with torch.no_grad():
        assert torch.equal(dydit.load(path)(X, T, Y), ema_w(X, T, Y))
        assert torch.equal(dydit.load(path, which="model")(X, T, Y), model_w(X, T, Y))


def test_official_weights_as_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    src = tiny()
    path = tmp_path / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    with torch.no_grad():
        assert torch.equal(dydit.load(path)(X, T, Y), src(X, T, Y))


@pytest.mark.parametrize("filename,objective", [("SiT-tiny.pt", None), ("last.pt", "flow")])
def test_sit_keeps_2c_head_and_returns_first_c_channels(tmp_path, filename, objective):
    src = tiny("SiT-Tiny")  # learn_sigma: the released SiT's 2C-channel final layer
    assert src.final_layer.linear.out_features == 2 * 2 * 8
    path = tmp_path / filename
    torch.save(src.state_dict(), path)
    model = dydit.load(path, objective=objective)
    assert model.config.objective == "flow" and model.config.out_channels_used == 4
    with torch.no_grad():
        out = model(X, T / 1000, Y)
        assert out.shape == (3, 4, 8, 8)
        assert torch.equal(out, src(X, T / 1000, Y)[:, :4])


def test_unknown_hidden_size_needs_model_name(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save(tiny(hidden_size=96, num_heads=3).state_dict(), path)
    with pytest.raises(ValueError, match=r"odd\.pt.*model_name"):
        dydit.load(path)


#################################################################################
#                              diffusers DiT folders                            #
#################################################################################


def tiny_diffusers(tie=True, seed=0):
    from diffusers import DiTTransformer2DModel

    dm = DiTTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2,
                               num_attention_heads=4, attention_head_dim=16, num_embeds_ada_norm=10,
                               norm_type="ada_norm_zero")
    randomize(dm, seed)
    if tie:  # every block's embedder copies block 0's, as in diffusers' conversion of official DiT
        emb0 = dm.transformer_blocks[0].norm1.emb.state_dict()
        for block in dm.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(emb0)
    return dm.eval()


def diffusers_out(dm, x=X, t=T, y=Y):
    with torch.no_grad():
        return dm(x, timestep=t, class_labels=y).sample


def test_diffusers_folder_matches_diffusers_forward(tmp_path):
    dm = tiny_diffusers()
    dm.save_pretrained(tmp_path / "dit")
    model = dydit.load(tmp_path / "dit")
    c = model.config
    assert (c.hidden_size, c.num_heads, c.depth, c.freq_shift, c.learn_sigma) == (64, 4, 2, 1.0, True)
    assert model.blocks[0].norm2.eps == dm.transformer_blocks[0].norm3.eps == 1e-5
    # diffusers recomputes its position table; ours must be the same numbers.
    assert torch.allclose(model.pos_embed, dm.pos_embed.pos_embed, atol=1e-6)
    with torch.no_grad():
        assert rel_err(model(X, T, Y), diffusers_out(dm)) <= 1e-5


def test_diffusers_export_round_trip_is_exact(tmp_path):
    from diffusers import DiTTransformer2DModel

    dm = tiny_diffusers()
    dm.save_pretrained(tmp_path / "dit")
    model = dydit.load(tmp_path / "dit")
    export_diffusers(model, tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["_class_name"] == "DiTTransformer2DModel"
    dm2 = DiTTransformer2DModel.from_pretrained(tmp_path / "back").eval()
    for k, v in dm.state_dict().items():
        assert torch.equal(dm2.state_dict()[k], v), k
    assert torch.equal(diffusers_out(dm2), diffusers_out(dm))
    again = dydit.load(tmp_path / "back")
    with torch.no_grad():
        assert torch.equal(again(X, T, Y), model(X, T, Y))


def test_diffusers_converted_model_keeps_its_norm_eps_through_dydit_save(tmp_path):
    tiny_diffusers().save_pretrained(tmp_path / "dit")
    model = dydit.load(tmp_path / "dit")
    dydit.save(model, tmp_path / "native")
    again = dydit.load(tmp_path / "native")
    assert again.blocks[1].norm2.eps == 1e-5
    with torch.no_grad():
        assert torch.equal(again(X, T, Y), model(X, T, Y))


def test_export_of_official_dit_to_diffusers(tmp_path):
    from diffusers import DiTTransformer2DModel

    src = tiny(freq_shift=1.0)  # the function diffusers' DiT computes, with official 1e-6 LayerNorms
    export_diffusers(src, tmp_path / "out")
    dm = DiTTransformer2DModel.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert rel_err(diffusers_out(dm), src(X, T, Y)) <= 1e-5
    with pytest.raises(ValueError, match="freq_shift"):
        export_diffusers(tiny(), tmp_path / "official")  # official features (freq_shift 0) differ
    export_diffusers(tiny(), tmp_path / "official", strict=False)


def test_diffusers_with_different_embedders_per_block_is_refused(tmp_path):
    tiny_diffusers(tie=False).save_pretrained(tmp_path / "untied")
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.safetensors.*shares one embedder"):
        dydit.load(tmp_path / "untied")


#################################################################################
#                         Errors name the file and the fix                      #
#################################################################################


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        dydit.load(tmp_path / "nothere.pt")


def test_truncated_pt(tmp_path):
    path = tmp_path / "DiT-cut.pt"
    torch.save(tiny().state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"DiT-cut\.pt.*truncated or corrupted"):
        dydit.load(path)


def test_garbage_safetensors(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ValueError, match=r"junk\.safetensors.*truncated or corrupted"):
        dydit.load(path)


def test_invalid_config_json(tmp_path):
    tiny_diffusers().save_pretrained(tmp_path / "dit")
    (tmp_path / "dit" / "config.json").write_text('{"_class_name": "DiTTransf')
    with pytest.raises(ValueError, match=r"config\.json.*not valid JSON"):
        dydit.load(tmp_path / "dit")


def test_diffusers_folder_without_weights(tmp_path):
    tiny_diffusers().save_pretrained(tmp_path / "dit")
    (tmp_path / "dit" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="dit.*diffusion_pytorch_model.safetensors"):
        dydit.load(tmp_path / "dit")


def test_checkpoint_mismatching_explicit_model_name(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(tiny().state_dict(), path)
    with pytest.raises(ValueError, match=r"tiny\.pt.*model_name='DiT-S/2'.*omit it"):
        dydit.load(path, model_name="DiT-S/2")
    with pytest.raises(ValueError, match=r"tiny\.pt.*unknown model"):
        dydit.load(path, model_name="DiT-Huge/1")


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"ema": tiny().state_dict(), "hook": argparse.ArgumentParser}, path)
    with pytest.raises(ValueError, match=r"evil\.pt.*never runs code from files"):
        dydit.load(path)


def test_not_a_dit_state_dict(tmp_path):
    path = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=r"resnet\.pt.*x_embedder"):
        dydit.load(path)


#################################################################################
#                                       VAE                                     #
#################################################################################


def test_vae_wrapper_scales_with_the_config_factor(tmp_path):
    from diffusers import AutoencoderKL

    from dydit.vae import load_vae

    ae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                       up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                       latent_channels=4, norm_num_groups=8, sample_size=16, scaling_factor=0.5)
    randomize(ae, scale=0.1).save_pretrained(tmp_path / "vae")
    vae = load_vae(tmp_path / "vae")
    assert vae.scaling_factor == 0.5 and vae.downsample == 2
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z = vae.encode(images, sample=False)
        assert z.shape == (2, 4, 8, 8)
        assert torch.allclose(z, ae.encode(images).latent_dist.mode() * 0.5)
        assert torch.allclose(vae.decode(z), ae.decode(z / 0.5).sample)
        g = torch.Generator().manual_seed(3)
        assert not torch.allclose(vae.encode(images, generator=g), z)  # sampling draws from q(z|x)
    with pytest.raises(FileNotFoundError, match="novae"):
        load_vae(tmp_path / "novae")


def test_saved_files_are_atomic_and_get_the_umask_mode(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        dydit.save(dydit.build_model("DiT-Tiny"), tmp_path / "m")
    finally:
        os.umask(old)
    for f in ("model.safetensors", "config.json"):
        assert (tmp_path / "m" / f).stat().st_mode & 0o777 == 0o644
    assert not list((tmp_path / "m").glob("*.tmp"))  # no temporaries left behind


@pytest.mark.parametrize("layout", ["torch.save", "pickle"])
def test_refused_pickle_says_code_is_never_run(tmp_path, layout):
    import os
    import pickle

    import dydit

    ran = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {ran}",))

    path = tmp_path / "evil.pt"
    if layout == "torch.save":
        torch.save({"model": Evil()}, path)
    else:
        path.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ValueError) as e:
        dydit.load(path)
    msg = str(e.value)
    assert "never runs code from files" in msg and "safetensors" in msg
    assert "truncated" not in msg and "will likely succeed" not in msg
    assert not ran.exists()
