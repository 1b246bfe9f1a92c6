"""scripts/train_vae.py: a TinyVAE trained with its loop on real Fashion-MNIST images (held-out reconstruction, a
latent scale factor giving unit variance), its arguments, and its command line writing a loadable file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import load_script
from diffusion_train.conditioning.autoencoder import TinyVAE, TinyVAENet, load_tiny_vae_net

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "train_vae.py"


@pytest.fixture(scope="module")
def train_vae_script():
    return load_script("train_vae")




TRAIN_STEPS = 200


@pytest.fixture(scope="module")
def fmnist():
    """512 training and 256 held-out (test split) Fashion-MNIST images, 32x32 in [-1, 1]."""
    from diffusion_train.data.fashion_mnist import load_split, to_resolution

    train, _ = load_split("train")
    test, _ = load_split("test")
    prep = lambda x: to_resolution(x, 32, "pad").float() / 127.5 - 1  # noqa: E731
    return prep(train[:512]), prep(test[:256])


@pytest.fixture(scope="module")
def trained_vae(train_vae_script, fmnist, tmp_path_factory):
    """A TinyVAENet trained with scripts/train_vae.py's loop (200 steps of 16 images, about 10 s on 2
    idle cores), saved with the latent statistics measured as the script does; also the untrained
    net's held-out MSE."""
    tv = train_vae_script
    train, held_out = fmnist

    def stream(seed: int, batch_size: int = 16):
        g = torch.Generator().manual_seed(seed)
        while True:
            for idx in torch.randperm(len(train), generator=g).split(batch_size):
                yield {"image": train[idx]}

    torch.manual_seed(0)
    net = TinyVAENet(1, 4, [16, 32, 32])
    untrained = tv.recon_mse(net, held_out)
    history = tv.train_vae(net, stream(0), TRAIN_STEPS, lr=2e-3, kl_weight=1e-4,
                           generator=torch.Generator().manual_seed(0), log_every=50, log=None)
    shift, std = tv.latent_stats(net, stream(1, 64), 4)
    mse = tv.recon_mse(net, held_out)
    path = net.save(tmp_path_factory.mktemp("trained") / "fmnist.safetensors",
                    extra={"scale_factor": 1.0 / std, "shift_factor": shift, "steps": TRAIN_STEPS, "recon_mse": mse})
    return {"path": path, "untrained": untrained, "mse": mse, "history": history, "std": std}


def test_trained_tiny_vae_reconstructs_held_out_images(trained_vae, fmnist):
    _, held_out = fmnist
    h = trained_vae["history"]
    assert [r["step"] for r in h] == [50, 100, 150, 200]
    assert h[-1]["recon"] < 0.5 * h[0]["recon"] and h[-1]["kl"] > 0
    ae = TinyVAE(weights=trained_vae["path"], sample_posterior=False)
    recon = ae.decode(ae.encode(held_out))
    mse = F.mse_loss(recon, held_out).item()
    assert mse == pytest.approx(trained_vae["mse"], rel=1e-4)  # the file reproduces the trained net
    # Measured: untrained about 0.8, trained 0.028-0.030 (seeds 0 and 1; batch 32: 0.026-0.031).
    assert mse < trained_vae["untrained"] / 4
    # The latents are 8x8: the VAE must beat keeping an 8x8 thumbnail (area-average, bilinear upsampling),
    # about 0.10 on these images, and blurring at 16x16 (about 0.045); 0.06 leaves room for seeds and BLAS.
    thumb = F.interpolate(F.adaptive_avg_pool2d(held_out, 8), size=32, mode="bilinear", align_corners=False)
    assert mse < F.mse_loss(thumb, held_out).item() / 2
    assert mse < 0.06
    assert recon.abs().max() < 1.5  # decodes into about [-1, 1]


def test_trained_tiny_vae_scale_factor_gives_unit_variance_latents(trained_vae, fmnist):
    _, held_out = fmnist
    meta = load_tiny_vae_net(trained_vae["path"])[1]
    assert json.loads(meta["scale_factor"]) == pytest.approx(1.0 / trained_vae["std"])
    for sample in (False, True):  # the posterior is narrow: sampling barely changes the variance
        ae = TinyVAE(weights=trained_vae["path"], sample_posterior=sample)
        latents = ae.encode(held_out, torch.Generator().manual_seed(0))
        assert 0.7 < latents.std().item() < 1.3 and abs(latents.mean().item()) < 0.3, sample
    raw = TinyVAE(weights=trained_vae["path"], scale_factor=1.0, shift_factor=0.0, sample_posterior=False)
    assert raw.encode(held_out).std().item() == pytest.approx(trained_vae["std"], rel=0.3)


# ---------------------------------------------------------------------------------------------- the script


def test_train_vae_arguments_split_into_options_and_hydra_overrides(train_vae_script):
    opts, overrides = train_vae_script.parse_args(
        ["out=v.safetensors", "steps=10", "lr=1e-3", "channels=[8,16]", "batch_size=8", "data.resolution=16"])
    assert opts["out"] == "v.safetensors" and opts["steps"] == 10 and opts["lr"] == 1e-3
    assert opts["channels"] == [8, 16] and opts["kl_weight"] == 1e-4
    assert overrides == ["data.resolution=16", "data.batch_size=8", "seed=0"]
    assert train_vae_script.parse_args(["out=x", "data=synthetic", "seed=3"])[1] == ["data=synthetic", "seed=3"]
    cfg = train_vae_script.compose_config(overrides)  # the training config's data: Fashion-MNIST
    assert cfg.data._target_.endswith("FashionMNISTDataModule") and cfg.data.resolution == 16
    assert cfg.data.batch_size == 8 and cfg.seed == 0
    for bad, msg in [(["steps=3"], "out=PATH"), (["out=x", "steps=three"], "steps="), (["out=x", "oops"], "key=value"),
                     (["out=x", "batch_size=0"], "batch_size must be positive")]:
        with pytest.raises(ValueError, match=msg):
            train_vae_script.parse_args(bad)


def _run_script(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.mark.slow
def test_train_vae_cli_writes_a_loadable_file_and_prints_the_override(tmp_path):
    out = tmp_path / "vae" / "fm.safetensors"
    res = _run_script([f"out={out}", "steps=4", "batch_size=8", "channels=[8,16,16]", "log_every=2",
                       "stat_batches=2", "data=fashion_mnist", "data.val_size=64"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert lines[-1] == f"autoencoder=tiny_vae autoencoder.weights={out.resolve()}"
    assert sum(ln.startswith("step ") for ln in lines) == 2
    _, meta = load_tiny_vae_net(out)
    assert json.loads(meta["steps"]) == 4 and json.loads(meta["scale_factor"]) > 0
    architecture = {"in_channels": 1, "latent_channels": 4, "channels": [8, 16, 16]}
    assert json.loads(meta["diffusion_train.tiny_vae"]) == architecture
    ae = TinyVAE(weights=out)
    assert ae.scale.item() == pytest.approx(json.loads(meta["scale_factor"]))
    assert ae.shift.item() == pytest.approx(json.loads(meta["shift_factor"]))
    assert f"validation reconstruction MSE {json.loads(meta['recon_mse']):.5f}" in res.stdout
    # a misspelt option is a Hydra override Hydra refuses: exit 2, the script's options listed
    res = _run_script([f"out={out}", "stpes=3"], tmp_path)
    assert res.returncode == 2 and "stpes" in res.stderr and "kl_weight=" in res.stderr
