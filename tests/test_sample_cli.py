"""diffusion-sample: images from a checkpoint's EMA weights, seeded per image, and its one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import warnings
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, compose_train
from diffusion_train.conditioning.autoencoder import Autoencoder, TinyVAE
from diffusion_train.models import DiT, UNet
from diffusion_train.sample import backbone_size, sampling_autocast
from diffusion_train.train import train


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    train(compose_train(TINY + ["trainer.max_steps=2"], run), run)
    return run / "checkpoints/last.ckpt"


def _sample(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffusion_train.sample", *args, "progress=false"], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, WANDB_MODE="offline"))


def _images(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


@pytest.mark.slow
def test_same_seeds_give_the_same_images_for_any_batch_size(ckpt, tmp_path):
    outs = {}
    for bs in (1, 4, 16):
        out = _sample(f"ckpt={ckpt}", f"out_dir={tmp_path / str(bs)}", "num_images=16", f"batch_size={bs}",
                      "sampler=ddpm", "sampler.steps=4", "guidance_scale=3", cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]
        outs[bs] = _images(tmp_path / str(bs) / "images")
    assert len(outs[1]) == 16
    for name, img in outs[1].items():
        assert np.array_equal(img, outs[4][name]) and np.array_equal(img, outs[16][name]), name
    meta = json.loads((tmp_path / "16/samples.json").read_text())
    assert meta["label"] == [i % 4 for i in range(16)] and meta["sampler"]["solver"] == "ddpm"
    assert (tmp_path / "16/grid.png").is_file()


@pytest.mark.parametrize("args,expected", [
    (["ckpt={missing}"], "does not exist"),
    (["ckpt={foreign}"], "holds no diffusion_train run metadata"),
    (["ckpt={ckpt}", "sampler.steps=0"], "sampler.steps=0: give a whole number >= 1"),
    (["ckpt={ckpt}", "num_images=0"], "num_images=0: give a whole number >= 1"),
    (["ckpt={ckpt}", "guidance_scale=abc"], "guidance_scale=abc: give a number"),
    (["ckpt={ckpt}", "batch_size=2.5"], "batch_size=2.5: give a whole number >= 1"),
    (["ckpt={ckpt}", "device=gpu1"], "device=gpu1: not a device"),
    (["ckpt={ckpt}", "labels=[7]"], "outside the model's 4 classes"),
    (["ckpt={ckpt}", "height=15"], "height=15 is not a positive multiple of 2 = 1 (autoencoder downsampling) x 2"),
    (["ckpt={ckpt}", "device=cuda:7"], "device=cuda:7: this machine has"),
    (["ckpt={ckpt}", "labels=3"], "labels=3: give a list of class indices"),
    (["ckpt={ckpt}", "labels=[]"], "labels=[]: give at least one class index"),
    (["ckpt={ckpt}", "guidance_interval=0.5"], "guidance_interval=0.5: give [lo, hi]"),
    (["ckpt={empty_dir}"], "is a directory without checkpoints"),
])
def test_bad_input_gets_a_one_line_error(args, expected, ckpt, tmp_path):
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    args = [a.format(missing=tmp_path / "nope.ckpt", foreign=foreign, ckpt=ckpt, empty_dir=tmp_path) for a in args]
    out = _sample(*args, f"out_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert out.returncode == 1
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], out.stderr[-2000:]


def test_a_run_directory_samples_with_its_last_checkpoint_and_an_out_dir_is_not_mixed(ckpt, tmp_path):
    """ckpt=<run dir> reads its last.ckpt; the images are written per batch, the grid shows the first grid_images,
    samples.json records the settings; a second call into the same out_dir is refused, its images kept."""
    out = _sample(f"ckpt={ckpt.parent.parent}", f"out_dir={tmp_path / 'out'}", "num_images=3", "batch_size=2",
                  "sampler.steps=2", "grid_images=2", "ncol=2", "sampler.solver.eta=0.5", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    meta = json.loads((tmp_path / "out/samples.json").read_text())
    assert meta["ckpt"] == str(ckpt) and meta["num_images"] == 3 and meta["device"] == "cpu"
    assert meta["weights"] == "ema" and meta["loaded_weights"] == "ema_0.999"  # the run's sampling decay
    assert meta["sampler"]["config"]["solver"]["eta"] == 0.5
    assert sorted(p.name for p in (tmp_path / "out/images").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    assert Image.open(tmp_path / "out/grid.png").size == (2 * 16 + 2 * 3, 16 + 2 * 2)  # two images, padded
    before = _images(tmp_path / "out/images")
    again = _sample(f"ckpt={ckpt}", f"out_dir={tmp_path / 'out'}", "num_images=2", "seed=100", cwd=tmp_path)
    assert again.returncode == 1 and again.stderr.strip().splitlines()[-1] == (
        f"error: out_dir={tmp_path / 'out'} holds 3 images of other settings (label: [0, 1, 2] -> [0, 1]; "
        f"num_images: 3 -> 2; sampler.config.solver.eta: 0.5 -> 0.0; sampler.config.steps: 2 -> 50; sampler.steps: "
        f"2 -> 50; seed: 0 -> 100); give another out_dir, or remove them")
    after = _images(tmp_path / "out/images")
    assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in after)
    (tmp_path / "out/samples.json").unlink()
    again = _sample(f"ckpt={ckpt}", f"out_dir={tmp_path / 'out'}", "num_images=2", cwd=tmp_path)
    assert again.returncode == 1 and again.stderr.strip().splitlines()[-1] == (
        f"error: out_dir={tmp_path / 'out'}: images/ holds 3 images already (000000.png, ...) and no samples.json to "
        f"continue from; give another out_dir, or remove them")


def test_a_stopped_call_is_continued_by_the_same_command(ckpt, tmp_path):
    """A call stopped part way (preempted: samples.json says complete false) is continued by the same command: the
    images made are kept as they are, the missing ones made, and the set is the one an uninterrupted call makes.
    Heun's s_tmax is inf, which samples.json records as null: it compares as such (every heun call was refused)."""
    args = (f"ckpt={ckpt}", "num_images=5", "batch_size=2", "sampler=heun", "sampler.steps=3", "grid_images=4")
    full = _sample(*args, f"out_dir={tmp_path / 'full'}", cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-2000:]
    assert json.loads((tmp_path / "full/samples.json").read_text())["complete"] is True
    stopped = tmp_path / "stopped"
    shutil.copytree(tmp_path / "full", stopped)
    for name in ("000001.png", "000004.png", "../grid.png"):
        (stopped / "images" / name).unlink()
    meta = json.loads((stopped / "samples.json").read_text())
    (stopped / "samples.json").write_text(json.dumps({**meta, "complete": False}))
    kept = (stopped / "images/000002.png").stat().st_mtime_ns
    again = _sample(*args, f"out_dir={stopped}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (stopped / "images/000002.png").stat().st_mtime_ns == kept  # not made again
    made, want = _images(stopped / "images"), _images(tmp_path / "full/images")
    assert made.keys() == want.keys() and all(np.array_equal(made[k], want[k]) for k in want)
    assert np.array_equal(np.asarray(Image.open(stopped / "grid.png")), np.asarray(Image.open(tmp_path / "full/grid.png")))
    assert json.loads((stopped / "samples.json").read_text()) == {**meta, "complete": True}


def test_a_missing_out_dir_is_one_line_and_writes_nothing_here(ckpt, tmp_path):
    out = _sample(f"ckpt={ckpt}", cwd=tmp_path)
    assert out.returncode == 1 and out.stderr.strip().splitlines()[-1] == (
        "error: missing mandatory value out_dir: give it on the command line, e.g. out_dir=..."), out.stderr[-2000:]
    assert not list(tmp_path.iterdir())


def test_sampling_autocasts_to_bf16_on_any_cuda_device():
    for device in ("cuda", "cuda:1"):  # constructed only: this machine may have no GPU
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "CUDA is not available. Disabling"
            ctx = sampling_autocast(torch.device(device))
        assert (ctx.device, ctx.fast_dtype) == ("cuda", torch.bfloat16), device
    with sampling_autocast(torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")


def test_unknown_sampler_lists_the_choices(ckpt, tmp_path):
    out = _sample(f"ckpt={ckpt}", f"out_dir={tmp_path}", "sampler=dpm_fast", cwd=tmp_path)
    assert out.returncode != 0
    assert "Could not find 'sampler/dpm_fast'" in out.stderr and "dpmpp_2m" in out.stderr


@pytest.mark.slow
def test_height_and_width_give_images_of_that_size(ckpt, tmp_path):
    out = _sample(f"ckpt={ckpt}", f"out_dir={tmp_path}", "num_images=2", "batch_size=2", "sampler.steps=2",
                  "height=8", "width=24", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    images = _images(tmp_path / "images")
    assert len(images) == 2 and all(img.shape == (8, 24, 3) for img in images.values())
    meta = json.loads((tmp_path / "samples.json").read_text())
    assert (meta["height"], meta["width"]) == (8, 24)


def test_backbone_size_converts_pixels_through_the_autoencoder():
    dit = DiT(input_size=8, in_channels=4, size=None, hidden_size=32, depth=1, num_heads=2, patch_size=2)
    vae = TinyVAE(in_channels=3, latent_channels=4, channels=(8, 8, 8))  # downsampling 4
    latent = SimpleNamespace(backbone=dit, autoencoder=vae)
    assert backbone_size(latent, None, None) == (8, 8)
    assert backbone_size(latent, 32, 48) == (8, 12)
    assert backbone_size(latent, None, 16) == (8, 4)
    with pytest.raises(ValueError, match=r"height=36 is not a positive multiple of 8 = 4 \(autoencoder downsampling\) "
                                         r"x 2 \(DiT input multiple\)"):
        backbone_size(latent, 36, 32)
    unet = UNet(input_size=16, in_channels=3, model_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1)
    pixel = SimpleNamespace(backbone=unet, autoencoder=Autoencoder())
    assert backbone_size(pixel, 12, 20) == (12, 20)
    with pytest.raises(ValueError, match=r"height=0 is not a positive multiple of 4"):
        backbone_size(pixel, 0, 16)
    with pytest.raises(ValueError, match=r"width=18 is not a positive multiple of 4 .* x 4 \(UNet input multiple\)"):
        backbone_size(pixel, 12, 18)
