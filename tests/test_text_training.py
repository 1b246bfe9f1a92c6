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


def test_truncated_captions_count_the_training_batches_and_go_on_after_a_resume(tmp_path):
    """Every caption is longer than 3 tokens, so each one encoded for training counts: 4 captions a step. The
    validation captions (encoded twice at each validation: the encoder is trained, so the EMA's validation encodes
    them again) and the sample grid's prompts do not count, and a resumed run goes on from the checkpoint's count."""
    import csv

    caption = "conditioning.embedders.caption."
    text = TEXT + [f"{caption}max_length=3", f"{caption}dropout=0", f"{caption}cache_size=0",
                   f"{caption}trainable=true", "callbacks.ema.validate=[0.999]",
                   "callbacks.sample_grid.every_n_steps=2"]
    run = tmp_path / "run"
    train(compose_train(text + ["trainer.max_steps=3"], run), run)  # validates and samples at step 2
    train(compose_train(text + ["trainer.max_steps=4"], run), run)
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    counts = [(int(r["step"]), float(r["data/truncated_captions"])) for r in rows if r["data/truncated_captions"]]
    assert counts == [(s, 4.0 * s) for s in (1, 2, 3, 4)]
    assert any(r["val/loss_ema_0.999"] for r in rows) and (run / "samples/step_0000002.png").is_file()
    assert load_checkpoint(run / "checkpoints/last.ckpt")["truncated_captions"] == {"caption": 16}


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
    assert out.returncode == 1 and "give prompts=[...]" in out.stderr  # diffusion-sample's option


def test_build_passes_the_context_width_to_the_backbone(tmp_path):
    module = build_module(compose_train(TEXT + ["model=dit_tiny"], tmp_path))
    assert module.backbone.context_dim == module.conditioner.context_dim == 384
    assert not any(p.requires_grad for p in module.conditioner.embedders["caption"].parameters())


@pytest.mark.parametrize("experiment, text", [("sd_tiny", "CLIPTextEmbedder"), ("pixart_tiny", "T5Embedder")])
def test_tiny_latent_text_presets_train_and_sample_prompts(experiment, text, tmp_path):
    """The offline miniatures of the SD / PixArt presets: random text tower and VAE, kept in the
    checkpoint, so diffusion-sample rebuilds exactly the trained model and decodes its latents."""
    from omegaconf import OmegaConf

    from diffusion_train.sample import generate

    run = tmp_path / "run"
    cfg = compose_train([f"experiment={experiment}", "logger=csv", "trainer.max_steps=2",
                         "callbacks.sample_grid.every_n_steps=2"], run)
    trainer = train(cfg, run)
    module = trainer.lightning_module
    assert type(module.conditioner.embedders["caption"]).__name__ == text
    assert module.autoencoder.latent_shape(3, 32) == (4, 16) and module.backbone.in_channels == 4
    state = load_checkpoint(run / "checkpoints/last.ckpt")["state_dict"]
    assert any(k.startswith("autoencoder.model.") for k in state), "random VAE weights are kept"
    assert any(k.startswith("conditioner.embedders.caption.encoder.") for k in state), "random text tower kept"
    assert (run / "samples/step_0000002.png").is_file()
    sample_cfg = OmegaConf.create({
        "ckpt": str(run / "checkpoints/last.ckpt"), "out_dir": str(tmp_path / "gen"), "weights": "ema",
        "num_images": 2, "labels": None, "prompts": ["a photo of a bag", "a sneaker"], "guidance_scale": 3.0,
        "guidance_interval": None, "guidance_rescale": 0.0, "progress": False, "seed": 0, "batch_size": 2,
        "device": "cpu", "ncol": 2, "grid_images": 2, "height": None, "width": None,
        "sampler": OmegaConf.to_container(cfg.sampler)})
    paths = generate(sample_cfg)
    assert len(paths) == 2 and all(p.is_file() for p in paths)
    from PIL import Image

    image = Image.open(paths[0])
    assert image.size == (32, 32) and image.mode == "RGB"  # decoded back to the data's resolution and channels


@pytest.mark.parametrize("conditioning, output", [("clip_tiny", "both"), ("clip_tiny", "context"),
                                                  ("clip_tiny", "vector"), ("text_minilm", "both"),
                                                  ("t5_tiny", "both")])
def test_a_trainable_text_encoder_has_no_parameter_without_a_gradient(tmp_path, conditioning, output):
    """DDP (find_unused_parameters=false) stops at the second step on a trainable parameter that gets no gradient:
    CLIP's logit_scale (and with output=context its projection and the blocks after `layer`), MiniLM's pooler.
    Those are frozen; every other encoder parameter trains."""
    cfg = compose_train(TEXT + [f"conditioning={conditioning}", "conditioning.embedders.caption.trainable=true",
                                f"conditioning.embedders.caption.output={output}"], tmp_path)
    emb = build_module(cfg).conditioner.embedders["caption"].train()
    out = emb(["a photo of a sneaker", "a bag"])
    sum(out[k].float().square().mean() for k in ("context", "vector") if k in out).backward()
    trainable = {n: p for n, p in emb.encoder.named_parameters() if p.requires_grad}
    assert trainable and [n for n, p in trainable.items() if p.grad is None] == []
    frozen = {n for n, p in emb.encoder.named_parameters() if not p.requires_grad}
    if conditioning == "clip_tiny":
        assert "logit_scale" in frozen
        assert ("text_projection" in frozen) == (output == "context")
