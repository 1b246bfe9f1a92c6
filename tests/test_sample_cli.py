"""diffusion-sample: images from a checkpoint's EMA weights, seeded per image, and its one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, compose_train
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
    (["ckpt={ckpt}", "sampler.steps=0"], "sampler.steps must be >= 1, got 0"),
    (["ckpt={ckpt}", "labels=[7]"], "outside the model's 4 classes"),
])
def test_bad_input_gets_a_one_line_error(args, expected, ckpt, tmp_path):
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    args = [a.format(missing=tmp_path / "nope.ckpt", foreign=foreign, ckpt=ckpt) for a in args]
    out = _sample(*args, f"out_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert out.returncode == 1
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], out.stderr[-2000:]


def test_unknown_sampler_lists_the_choices(ckpt, tmp_path):
    out = _sample(f"ckpt={ckpt}", f"out_dir={tmp_path}", "sampler=dpm_fast", cwd=tmp_path)
    assert out.returncode != 0
    assert "Could not find 'sampler/dpm_fast'" in out.stderr and "dpmpp_2m" in out.stderr
