"""Autoencoders for latent diffusion: the identity, TinyVAE (random and from a file), diffusers
AutoencoderKL from a save_pretrained directory, fp32 encoding under autocast, and the config presets
training a diffusion model on latents (a TinyVAE trained on real images: test_train_vae.py).

Everything runs offline on CPU; the diffusers VAE is tiny and random, saved to a tmp dir.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import TINY, compose_train
from diffusion_train.conditioning.autoencoder import (
    Autoencoder,
    DiffusersAutoencoderKL,
    TinyVAE,
    TinyVAENet,
    load_tiny_vae_net,
)
from diffusion_train.conditioning.weights import tensors_sha256

SMALL = [8, 16, 16]  # TinyVAE levels for the fast tests: 4x downsampling like the preset


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _holder(ae: nn.Module) -> nn.Module:
    """A module holding the autoencoder as DiffusionModule does (``.autoencoder``)."""
    m = nn.Module()
    m.autoencoder = ae
    return m


@pytest.fixture(scope="module")
def images():
    return torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.fixture(scope="module")
def saved_net(tmp_path_factory):
    """A random TinyVAENet saved with scale/shift metadata, and the path."""
    torch.manual_seed(0)
    net = TinyVAENet(1, 4, SMALL).eval()
    path = net.save(tmp_path_factory.mktemp("tinyvae") / "vae.safetensors",
                    extra={"scale_factor": 0.5, "shift_factor": 0.25, "steps": 0})
    return net, path


# ---------------------------------------------------------------------------------------------- identity


def test_identity_autoencoder_passes_everything_through():
    ae = Autoencoder()
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(ae.encode_moments(x), x) and torch.equal(ae.encode(x), x)
    assert torch.equal(ae.latents_from_moments(x, torch.Generator().manual_seed(0)), x)
    assert torch.equal(ae.decode(x), x)
    assert ae.encode(x.to(torch.bfloat16)).dtype == torch.float32
    assert ae.latent_shape(3, 16) == (3, 16) and ae.latent_shape(1, 30) == (1, 30)
    assert ae.downsample == 1 and not ae.weights_external
    assert ae.state_dict() == {} and _holder(ae).state_dict() == {}
    assert ae.provenance["class"] == "Autoencoder"


# ---------------------------------------------------------------------------------------------- TinyVAE, random


def test_random_tiny_vae_shapes_and_checkpointed_weights(images):
    torch.manual_seed(0)
    ae = TinyVAE(channels=SMALL)
    assert ae.latent_shape(1, 32) == (4, 8)
    moments = ae.encode_moments(images)
    assert moments.shape == (3, 8, 8, 8) and moments.dtype == torch.float32
    latents = ae.latents_from_moments(moments, torch.Generator().manual_seed(0))
    assert latents.shape == (3, 4, 8, 8)
    assert ae.decode(latents).shape == (3, 1, 32, 32)
    assert ae.scale.item() == 1.0 and ae.shift.item() == 0.0  # random weights: no measured factors
    # frozen and always in eval mode, but its random weights go into checkpoints (no file to rebuild from)
    assert not any(p.requires_grad for p in ae.parameters())
    ae.train()
    assert not ae.model.training
    assert not ae.weights_external and ae.provenance["sha256"] == tensors_sha256(ae.model)  # random: by content
    sd = _holder(ae).state_dict()
    model_keys = {k for k in sd if k.startswith("autoencoder.model.")}
    assert model_keys == {f"autoencoder.model.{k}" for k in ae.model.state_dict()}
    assert sd["autoencoder._extra_state"]["name"] == "random TinyVAE [8, 16, 16]"
    torch.manual_seed(1)  # another init: loading the checkpoint restores the first one's weights
    other = _holder(TinyVAE(channels=SMALL))
    assert not torch.equal(other.autoencoder.encode_moments(images), moments)
    assert other.autoencoder.provenance["sha256"] != ae.provenance["sha256"]
    other.load_state_dict(sd, strict=True)
    assert torch.equal(other.autoencoder.encode_moments(images), moments)
    assert other.autoencoder.provenance == ae.provenance  # the checkpoint's weights and their identity


def test_posterior_sampling_uses_the_generator():
    ae = TinyVAE(channels=SMALL, scale_factor=0.5, shift_factor=0.25)
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g) - 1
    moments = torch.cat([mean, logvar], dim=1)
    a = ae.latents_from_moments(moments, torch.Generator().manual_seed(7))
    b = ae.latents_from_moments(moments, torch.Generator().manual_seed(7))
    c = ae.latents_from_moments(moments, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # the sample is mean + std * N(0, 1), then scaled: the standardised noise is standard normal
    noise = (a / 0.5 + 0.25 - mean) / torch.exp(0.5 * logvar)
    assert abs(noise.mean().item()) < 0.1 and abs(noise.std().item() - 1) < 0.1
    assert torch.equal(ae.latents_from_moments(moments.double(), torch.Generator().manual_seed(7)), a)  # fp32
    # the mean without sampling: (mean - shift) * scale exactly, whatever the generator
    ae.sample_posterior = False
    exact = (mean - torch.tensor(0.25)) * torch.tensor(0.5)
    assert torch.equal(ae.latents_from_moments(moments, torch.Generator().manual_seed(7)), exact)
    assert torch.equal(ae.latents_from_moments(moments), exact)
    with pytest.raises(ValueError, match="moments have 4 channels, expected 8"):
        ae.latents_from_moments(moments[:, :4])


def test_per_channel_factors_broadcast_and_a_wrong_length_is_refused(images):
    scale, shift = [1.0, 2.0, 0.5, 4.0], [0.0, 0.1, -0.2, 0.3]
    ae = TinyVAE(channels=SMALL, scale_factor=scale, shift_factor=shift, sample_posterior=False)
    assert ae.scale.shape == (4, 1, 1)
    moments = ae.encode_moments(images)
    latents = ae.encode(images)
    for c in range(4):
        expected = (moments[:, c] - torch.tensor(shift[c])) * torch.tensor(scale[c])
        assert torch.equal(latents[:, c], expected), c
    z = latents / ae.scale + ae.shift  # decode inverts the scaling per channel
    torch.testing.assert_close(z, moments[:, :4])
    assert torch.equal(ae.decode(latents), ae.model.decode(z))
    with pytest.raises(ValueError, match="scale_factor has 3 values for 4 latent channels"):
        TinyVAE(channels=SMALL, scale_factor=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="shift_factor has 2 values for 4 latent channels"):
        TinyVAE(channels=SMALL, shift_factor=[0.0, 1.0])


def test_latent_shape_refuses_other_channels_or_resolutions_with_the_numbers():
    ae = TinyVAE(channels=SMALL)
    assert ae.latent_shape(1, 28) == (4, 7)
    with pytest.raises(ValueError) as e:
        ae.latent_shape(3, 32)
    assert "1-channel" in str(e.value) and "3 channels" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError) as e:
        ae.latent_shape(1, 30)
    assert "data.resolution=30" in str(e.value) and "factor 4" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------- TinyVAE, file


def test_tiny_vae_from_file_matches_the_saved_net_and_takes_its_factors(saved_net, images):
    net, path = saved_net
    ae = TinyVAE(weights=path, sample_posterior=False)  # scale/shift None: from the file
    assert ae.scale.item() == 0.5 and ae.shift.item() == 0.25
    assert ae.model.config == {"in_channels": 1, "latent_channels": 4, "channels": SMALL}
    assert ae.latent_shape(1, 32) == (4, 8)
    with torch.no_grad():
        moments = net.moments(images)
        assert torch.equal(ae.encode_moments(images), moments)
        latents = ae.encode(images)
        assert torch.equal(latents, (moments[:, :4] - torch.tensor(0.25)) * torch.tensor(0.5))
        assert torch.equal(ae.decode(latents), net.decode(latents / torch.tensor(0.5) + torch.tensor(0.25)))
    explicit = TinyVAE(weights=path, scale_factor=2.0, shift_factor=0.0)  # explicit values win
    assert explicit.scale.item() == 2.0 and explicit.shift.item() == 0.0
    loaded, meta = load_tiny_vae_net(path)
    assert json.loads(meta["steps"]) == 0 and loaded.config == net.config
    with pytest.raises(ValueError, match=r"^autoencoder.weights=.* encodes 1-channel images, the data has 3 "
                                         r"\(autoencoder.in_channels, data.channels\)$"):
        TinyVAE(weights=path, in_channels=3)


def test_file_weights_stay_out_of_the_state_dict_which_records_their_sha256(saved_net, images, tmp_path):
    _, path = saved_net
    holder = _holder(TinyVAE(weights=path))
    sd = holder.state_dict()
    assert not [k for k in sd if k.startswith("autoencoder.model.")]
    prov = sd["autoencoder._extra_state"]
    assert prov["sha256"] == _sha256(path) and prov["path"] == str(path.resolve()) and prov["name"] == path.name
    assert prov["class"] == "TinyVAE" and prov["latent_channels"] == "4" and prov["downsample"] == "4"
    fresh = _holder(TinyVAE(weights=path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same weights: no warning
        fresh.load_state_dict(sd, strict=True)
    assert fresh.autoencoder.loaded_provenance == prov
    # a checkpoint made with other weights loads, with a warning naming both hashes
    torch.manual_seed(5)
    other = TinyVAENet(1, 4, SMALL).save(tmp_path / "other.safetensors")
    with pytest.warns(UserWarning, match=f"sha256={_sha256(path)[:12]}.*sha256={_sha256(other)[:12]}"):
        _holder(TinyVAE(weights=other)).load_state_dict(sd, strict=True)


def test_missing_or_foreign_weight_files_are_refused_with_a_hint(tmp_path):
    from safetensors.torch import save_file

    missing = tmp_path / "none.safetensors"
    with pytest.raises(FileNotFoundError, match="scripts/train_vae.py out=") as e:
        TinyVAE(weights=missing)
    assert str(missing) in str(e.value) and "autoencoder.weights=null" in str(e.value)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, str(foreign))
    with pytest.raises(ValueError, match="is not a TinyVAE file"):
        TinyVAE(weights=foreign)


def test_encoding_is_fp32_without_gradients_under_bf16_autocast(saved_net, images):
    _, path = saved_net
    ae = TinyVAE(weights=path, sample_posterior=False)
    ref_m, ref_l = ae.encode_moments(images), ae.encode(images)
    ref_d = ae.decode(ref_l)
    x = images.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m, lat = ae.encode_moments(x), ae.encode(x.to(torch.bfloat16))
        dec = ae.decode(lat.to(torch.bfloat16))
    for out in (m, lat, dec):
        assert out.dtype == torch.float32 and not out.requires_grad
    assert torch.equal(m, ref_m)  # autocast really was off: bit-identical to the fp32 result
    torch.testing.assert_close(lat, ref_l, rtol=2e-2, atol=2e-2)  # only the bf16 input rounding differs
    assert torch.equal(ae.decode(lat.to(torch.bfloat16).float()), dec)
    assert ref_d.dtype == torch.float32


# ---------------------------------------------------------------------------------------------- diffusers


@pytest.fixture(scope="module")
def diffusers_vae(tmp_path_factory):
    """A tiny random diffusers AutoencoderKL, saved flat and as a pipeline's vae/ subfolder."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    model = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                          up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
                          latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=0.5,
                          shift_factor=0.25).eval()
    root = tmp_path_factory.mktemp("sdvae")
    model.save_pretrained(root / "flat")
    model.save_pretrained(root / "pipe" / "vae")
    return model, root


def test_diffusers_vae_from_a_local_dir_matches_the_in_memory_model(diffusers_vae):
    model, root = diffusers_vae
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        dist = model.encode(x).latent_dist
        expected = torch.cat([dist.mean, dist.logvar], dim=1)
    for kwargs, folder, name in [({"name_or_path": str(root / "flat")}, root / "flat", str(root / "flat")),
                                 ({"name_or_path": str(root / "pipe"), "subfolder": "vae"}, root / "pipe" / "vae",
                                  f"{root / 'pipe'}/vae")]:
        ae = DiffusersAutoencoderKL(**kwargs, sample_posterior=False)
        assert ae.scale.item() == 0.5 and ae.shift.item() == 0.25  # from the VAE's config
        assert ae.latent_shape(3, 16) == (4, 8) and ae.downsample == 2
        moments = ae.encode_moments(x)
        assert moments.shape == (2, 8, 8, 8)
        torch.testing.assert_close(moments, expected, rtol=0, atol=1e-6)
        latents = ae.encode(x)
        torch.testing.assert_close(latents, (dist.mean - 0.25) * 0.5, rtol=0, atol=1e-6)
        with torch.no_grad():
            torch.testing.assert_close(ae.decode(latents), model.decode(latents / 0.5 + 0.25).sample, rtol=0, atol=1e-5)
        prov = ae.provenance
        assert prov["sha256"] == _sha256(folder / "diffusion_pytorch_model.safetensors")
        assert prov["path"] == str(folder.resolve()) and prov["name"] == name
        sd = _holder(ae).state_dict()
        assert not [k for k in sd if k.startswith("autoencoder.model.")]
        assert sd["autoencoder._extra_state"]["sha256"] == prov["sha256"]
        _holder(DiffusersAutoencoderKL(**kwargs)).load_state_dict(sd, strict=True)
    assert DiffusersAutoencoderKL(name_or_path=str(root / "flat"), scale_factor=1.0).scale.item() == 1.0


def test_the_recorded_sha256_is_of_the_weights_from_pretrained_reads(diffusers_vae, tmp_path):
    """A variant (fp16) or another checkpoint beside the standard file is not what from_pretrained loads, so it
    is not hashed; sharded weights are the shards their index names."""
    import json
    import shutil

    from diffusion_train.conditioning.weights import hf_provenance

    _, root = diffusers_vae
    folder = tmp_path / "vae"
    shutil.copytree(root / "flat", folder)
    (folder / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"half")
    (folder / "sdxl_vae.safetensors").write_bytes(b"another checkpoint")
    assert DiffusersAutoencoderKL(name_or_path=str(folder)).provenance["sha256"] == \
        _sha256(folder / "diffusion_pytorch_model.safetensors")
    sharded = tmp_path / "t5"
    sharded.mkdir()
    for name, data in (("model-00001-of-00002.safetensors", b"one"), ("model-00002-of-00002.safetensors", b"two"),
                       ("model.fp16-00001-of-00001.safetensors", b"half")):
        (sharded / name).write_bytes(data)
    index = {"weight_map": {"b": "model-00002-of-00002.safetensors", "a": "model-00001-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert hf_provenance(str(sharded))["sha256"] == hashlib.sha256(b"onetwo").hexdigest()


def test_diffusers_vae_missing_dir_or_unknown_hub_name_is_a_clear_error(tmp_path):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(FileNotFoundError, match="save_pretrained") as e:
        DiffusersAutoencoderKL(name_or_path=str(tmp_path / "no_vae"))
    assert str(tmp_path / "no_vae") in str(e.value)
    with pytest.raises(ValueError, match="local directory") as e:
        DiffusersAutoencoderKL(name_or_path="dt-test-org/no-such-vae")
    assert "no-such-vae" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------- presets


@pytest.mark.parametrize("preset,latent", [("tiny_vae", (4, 4)), ("kl_tiny", (4, 8))])
def test_preset_sizes_the_backbone_by_the_latent_shape(preset, latent, tmp_path):
    from diffusion_train.training.build import build_module

    cfg = compose_train(TINY + [f"autoencoder={preset}"], tmp_path)  # synthetic data: 3 x 16 x 16
    module = build_module(cfg)
    assert module.autoencoder.latent_shape(3, 16) == latent
    assert (module.backbone.in_channels, module.backbone.input_size) == latent
    assert module.backbone.out_channels == latent[0]
    assert not any(p.requires_grad for p in module.autoencoder.parameters())
    trainable = {id(p) for p in module.trainable_parameters()}
    assert not trainable & {id(p) for p in module.autoencoder.parameters()}


@pytest.fixture(scope="module")
def rgb_vae_file(tmp_path_factory):
    torch.manual_seed(0)
    return TinyVAENet(3, 4, [8, 16]).save(tmp_path_factory.mktemp("rgbvae") / "rgb.safetensors",
                                          extra={"scale_factor": 2.0, "shift_factor": 0.0})


@pytest.mark.parametrize("preset,overrides,external", [
    ("tiny_vae", ["autoencoder.channels=[8,16]"], False),  # random weights
    ("tiny_vae", [], True),                                # + autoencoder.weights=<file>
    ("kl_tiny", [], False),
], ids=["tiny_vae-random", "tiny_vae-file", "kl_tiny"])
def test_one_training_step_on_latents_checkpoints_only_non_file_weights(preset, overrides, external, rgb_vae_file,
                                                                        tmp_path):
    from diffusion_train.train import train
    from diffusion_train.training.checkpointing import load_checkpoint

    if external:
        overrides = overrides + [f"autoencoder.weights={rgb_vae_file}"]
    run = tmp_path / "run"
    cfg = compose_train(TINY + [f"autoencoder={preset}", "trainer.max_steps=1", *overrides], run)
    trainer = train(cfg, run)
    assert trainer.global_step == 1
    sd = load_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]
    model_keys = [k for k in sd if k.startswith("autoencoder.model.")]
    prov = sd["autoencoder._extra_state"]
    if external:
        assert model_keys == [] and prov["sha256"] == _sha256(rgb_vae_file)
        assert trainer.lightning_module.autoencoder.scale.item() == 2.0
        # a run whose config names the weights file relative to where it was launched loads from anywhere: the
        # checkpoint recorded the file's absolute path
        from diffusion_train.training.build import load_module, with_recorded_autoencoder

        ckpt = load_checkpoint(run / "checkpoints" / "last.ckpt")
        config = {**ckpt["diffusion_train"]["config"], "autoencoder": {
            **ckpt["diffusion_train"]["config"]["autoencoder"], "weights": "vae/rgb.safetensors"}}
        assert with_recorded_autoencoder(config, sd)["autoencoder"]["weights"] == str(rgb_vae_file.resolve())
        ckpt["diffusion_train"]["config"] = config
        torch.save(ckpt, tmp_path / "relative.ckpt")
        assert load_module(tmp_path / "relative.ckpt").autoencoder.scale.item() == 2.0
        assert config["autoencoder"]["weights"] == "vae/rgb.safetensors"  # the run's config itself is not changed
    else:  # random weights travel in the checkpoint, identified by a hash of their values
        assert model_keys and prov["sha256"] == tensors_sha256(trainer.lightning_module.autoencoder.model)
    assert torch.isfinite(torch.stack([v.float().sum() for k, v in sd.items()
                                       if k.startswith("backbone.") and v.is_floating_point()])).all()
