"""Text-to-image training end to end: captions, frozen text encoders, cross-attention, prompts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import TINY, compose_train
from diffusion_train.conditioning import ClassEmbedder, Conditioner
from diffusion_train.train import train
from diffusion_train.training.build import build_module, load_module
from diffusion_train.training.checkpointing import load_checkpoint

TEXT = TINY + ["data=fashion_mnist_captions", "data.batch_size=4", "data.val_size=8", "conditioning=text_minilm",
               "callbacks.sample_grid.prompts=[a photo of a sneaker,a bag]", "callbacks.sample_grid.per_class=2"]


def test_cfg_dropout_rate_is_right():
    cond = Conditioner({"label": ClassEmbedder(10, 8, dropout=0.3)}).train()
    g = torch.Generator().manual_seed(0)
    n = 20000
    vec = cond({"label": torch.zeros(n, dtype=torch.long)}, generator=g).vector
    null = cond.embedders["label"].embedding.weight[10]
    rate = (vec == null).all(dim=1).float().mean().item()
    assert abs(rate - 0.3) < 4 * (0.3 * 0.7 / n) ** 0.5


def test_text_cfg_dropout_rate_is_right_and_gives_the_empty_caption(tmp_path):
    cfg = compose_train(TEXT + ["conditioning=t5_tiny", "conditioning.embedders.caption.dropout=0.2"], tmp_path)
    cond = build_module(cfg).conditioner.train()
    emb = cond.embedders["caption"]
    n = 4000
    out = cond({"caption": ["a photo of a bag"] * n}, generator=torch.Generator().manual_seed(0))
    empty = emb.encode([""])["context"][0]
    dropped = (out.context == empty).flatten(1).all(dim=1)
    kept = (out.context == emb.encode(["a photo of a bag"])["context"][0]).flatten(1).all(dim=1)
    assert bool((dropped ^ kept).all()), "every row is either the caption's or the empty caption's encoding"
    rate = dropped.float().mean().item()
    assert abs(rate - 0.2) < 4 * (0.2 * 0.8 / n) ** 0.5
    assert torch.equal(out.mask[dropped], emb.encode([""])["mask"].expand(int(dropped.sum()), -1))


@pytest.mark.parametrize("model", ["dit_tiny", "unet_tiny", "mmdit_tiny"])
def test_text_conditioned_training_and_prompts(model, tmp_path):
    run = tmp_path / "run"
    trainer = train(compose_train(TEXT + [f"model={model}", "trainer.max_steps=2"], run), run)
    module = trainer.lightning_module
    assert module.conditioner.context_dim == 384 and module.backbone.context_dim == 384
    ckpt = load_checkpoint(run / "checkpoints/last.ckpt")
    text_keys = [k for k in ckpt["state_dict"] if k.startswith("conditioner.embedders.caption.")]
    assert all(k.endswith("_extra_state") for k in text_keys), "a frozen text encoder is not copied into checkpoints"
    assert any(k.endswith("_extra_state") for k in text_keys), "the checkpoint records which encoder it used"
    assert all(not n.startswith("conditioner.embedders.caption") for n in ckpt["ema"]["weights"]["0.999"])
    assert (run / "samples/step_0000002.png").is_file()
    assert "data/truncated_captions" in (run / "metrics.csv").read_text().splitlines()[0]
    # The model reads the text: different prompts give different denoised estimates.
    module = load_module(run / "checkpoints/last.ckpt", weights="raw")
    with torch.no_grad():
        for p in module.backbone.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        x = torch.randn(2, 1, 32, 32)
        t = torch.full((2,), 500.0)
        a = module.backbone(x, t, module.conditioner({"caption": ["a photo of a sneaker"] * 2}))
        b = module.backbone(x, t, module.conditioner({"caption": ["a photo of a trouser"] * 2}))
    assert not torch.allclose(a, b)


def test_a_batch_without_the_caption_key_names_the_key_and_sample(tmp_path):
    cfg = compose_train(TINY + ["data=fashion_mnist", "data.batch_size=4", "conditioning=text_minilm",
                                "callbacks.sample_grid.prompts=[a bag]"], tmp_path / "run")
    with pytest.raises(KeyError, match=r"needs batch key 'caption', missing in the batch of sample 'train/\d+'"):
        train(cfg, tmp_path / "run")


@pytest.mark.slow
def test_smoke_t2i_cli_and_sampling_with_prompts(tmp_path):
    env = dict(os.environ, WANDB_MODE="offline")
    run = tmp_path / "t2i"
    out = subprocess.run([sys.executable, "-m", "diffusion_train.train", "experiment=smoke_t2i",
                          f"hydra.run.dir={run}"], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (run / "checkpoints/last.ckpt").is_file() and list((run / "samples").glob("*.png"))
    out = subprocess.run([sys.executable, "-m", "diffusion_train.sample", f"ckpt={run / 'checkpoints/last.ckpt'}",
                          f"out_dir={tmp_path / 'gen'}", "prompts=[a photo of a sneaker,a bag]", "num_images=4",
                          "sampler=dpmpp_2m", "sampler.steps=3", "progress=false"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(list((tmp_path / "gen/images").glob("*.png"))) == 4
    assert "a bag" in (tmp_path / "gen/samples.json").read_text()
    out = subprocess.run([sys.executable, "-m", "diffusion_train.sample", f"ckpt={run / 'checkpoints/last.ckpt'}",
                          f"out_dir={tmp_path / 'gen2'}", "num_images=2", "progress=false"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 1 and "give prompts=[...]" in out.stderr


def test_build_passes_the_context_width_to_the_backbone(tmp_path):
    module = build_module(compose_train(TEXT + ["model=dit_tiny"], tmp_path))
    assert module.backbone.context_dim == module.conditioner.context_dim == 384
    assert not any(p.requires_grad for p in module.conditioner.embedders["caption"].parameters())
