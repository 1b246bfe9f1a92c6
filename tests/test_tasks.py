"""Inpainting and instruction editing (finetune/inpainting.py, finetune/editing.py, finetune/masks.py): masks,
known pixels kept exactly, dual guidance, and training on edit pairs."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from conftest import DIT, instantiate_data, load_script, module_of, randomised
from diffusion_train.train import train
from diffusion_train.training.build import build_module
from diffusion_train.training.pretrained import load_pretrained


# -- inpainting ------------------------------------------------------------------------------------
def masks_of(kind: str, n: int = 64, size: int = 32, seed: int = 0) -> torch.Tensor:
    from diffusion_train.finetune.masks import random_masks

    return random_masks(n, size, size, {kind: 1.0}, torch.Generator().manual_seed(seed))


def test_mask_kinds():
    box, stroke, border, full = (masks_of(k) for k in ("box", "stroke", "border", "full"))
    for m in (box, stroke, border, full):
        assert m.shape == (64, 1, 32, 32) and set(m.unique().tolist()) <= {0.0, 1.0}
    rows, cols = box.amax(dim=3), box.amax(dim=2)  # a box is the product of its row and column extents
    assert torch.equal(box, rows[..., :, None] * cols[..., None, :])
    area = box.mean(dim=(1, 2, 3))
    assert area.min() >= 0.2 ** 2 and area.max() <= 0.65 ** 2
    assert (stroke.mean(dim=(1, 2, 3)) > 0).all() and (stroke.mean(dim=(1, 2, 3)) < 0.9).all()
    edges = torch.cat([border[..., 0, :], border[..., -1, :], border[..., :, 0], border[..., :, -1]], dim=-1)
    assert (edges.amax(dim=(1, 2)) == 1).all() and (border.mean(dim=(1, 2, 3)) <= 0.6).all()
    assert full.all()
    assert torch.equal(masks_of("stroke", seed=3), masks_of("stroke", seed=3))
    assert not torch.equal(masks_of("stroke", seed=3), masks_of("stroke", seed=4))


def test_inpainting_inputs_follow_stable_diffusion_s_channel_order():
    """cond.image is the mask, then the latents zeroed under it: with the noisy latents before them, the layout of
    Stable Diffusion's 9-channel inpainting U-Net (latents, mask, masked latents)."""
    from diffusion_train.finetune.inpainting import Inpainting

    x0, mask = torch.randn(2, 4, 8, 8), masks_of("box", 2, 8)
    image = Inpainting().image(x0, mask)
    assert image.shape == (2, 5, 8, 8) and torch.equal(image[:, :1], mask)
    assert torch.equal(image[:, 1:], torch.where(mask > 0.5, 0.0, x0))


def test_mask_weights_are_checked():
    from diffusion_train.finetune.masks import random_masks

    for bad in ({"circle": 1.0}, {"box": 0.0}, {"box": -1.0, "full": 2.0}, {}):
        with pytest.raises(ValueError, match="task.masks"):
            random_masks(2, 8, 8, bad)


VAE = ["autoencoder=tiny_vae", "autoencoder.weights=null"]


def test_encoded_masked_latents_are_the_encoding_of_the_image_gray_where_unknown(tiny_cfg):
    """task.masked_image=encoded (Stable Diffusion's inpainting input): the masked latents are the autoencoder's
    encoding of the image with the pixels of unknown latents set to 0 (gray), drawn from the step's generator;
    all masked gives the encoding of a gray image, the same for every image; a batch of latents is refused."""
    from diffusion_train.finetune.inpainting import Inpainting

    module = randomised(module_of(tiny_cfg, "task=inpainting", "task.masked_image=encoded", *VAE), seed=3)
    task, vae = module.task, module.autoencoder
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    x0 = vae.encode(images, torch.Generator().manual_seed(0))
    mask = masks_of("box", 2, x0.shape[-1], seed=5)
    cond = task.image(x0, mask, images, lambda p: vae.encode(p, torch.Generator().manual_seed(9)))
    gray = images * (1 - torch.nn.functional.interpolate(mask, size=(16, 16), mode="nearest"))
    assert ((gray == 0) == (mask.repeat_interleave(4, 2).repeat_interleave(4, 3) > 0).expand_as(images)).all()
    assert torch.equal(cond[:, :1], mask)
    torch.testing.assert_close(cond[:, 1:], vae.encode(gray, torch.Generator().manual_seed(9)))
    zeroed = Inpainting(masked_image="zeroed").image(x0, mask)
    assert (cond[:, 1:] - zeroed[:, 1:]).abs().mean() > 0.01  # a VAE's encoding of gray is not zero latents

    null = module._null_image(torch.zeros(3, *x0.shape[1:]))
    from diffusion_train.data.samplers import mix_seed

    expected = vae.latents_from_moments(vae.encode_moments(torch.zeros(1, 3, 16, 16)),
                                        torch.Generator().manual_seed(mix_seed(0, 1)))
    assert null.shape == (3, 5, 4, 4) and (null[:, :1] == 1).all()
    torch.testing.assert_close(null[:, 1:], expected.expand(3, -1, -1, -1))

    batch = {"image": images, "label": torch.tensor([0, 1])}
    seen = []
    drawn = task.training_image(x0, torch.Generator().manual_seed(4), batch, lambda b: seen.append(b["image"]) or x0)
    pixel_mask = torch.nn.functional.interpolate(drawn[:, :1], size=(16, 16), mode="nearest")
    assert drawn[:, :1].sum() > 0 and torch.equal(seen[0], images * (1 - pixel_mask))
    losses = [module.loss(batch, torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert torch.equal(losses[0], losses[1]) and not torch.equal(losses[0], losses[2])
    with pytest.raises(KeyError, match="masked_image=zeroed"):
        module.loss({"latent": vae.encode_moments(images), "label": torch.tensor([0, 1])})
    with pytest.raises(ValueError, match="task.masked_image must be one of zeroed, encoded, got 'vae'"):
        Inpainting(masked_image="vae")


def test_encoded_and_zeroed_masked_latents_agree_in_pixel_space():
    from diffusion_train.finetune.inpainting import Inpainting

    x0, mask = torch.randn(2, 3, 8, 8), masks_of("stroke", 2, 8)
    encoded = Inpainting(masked_image="encoded").image(x0, mask, x0, lambda pixels: pixels)
    assert torch.equal(encoded, Inpainting().image(x0, mask))


@pytest.mark.parametrize("extra", [[], VAE, [*VAE, "task.masked_image=encoded"]],
                         ids=["pixels", "latents", "encoded"])
def test_inpainting_keeps_known_pixels_exactly(tiny_cfg, extra):
    """An (untrained, random) inpainting model: every known pixel comes back bit for bit, the rest is new."""
    from hydra.utils import instantiate

    cfg = tiny_cfg("task=inpainting", *extra)
    module = randomised(build_module(cfg), seed=6).eval()
    assert module.backbone.in_channels == 2 * module.backbone.out_channels + 1
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    masks = torch.cat([masks_of("box", 1, 16, 1), masks_of("stroke", 1, 16, 2), masks_of("border", 1, 16, 3)])
    out = module.inpaint(images, masks, {"label": torch.tensor([0, 1, 2])}, instantiate(cfg.sampler),
                         guidance_scale=2.0)
    known = (masks < 0.5).expand_as(images)
    assert torch.equal(out[known], images[known])
    assert (out[~known] - images[~known]).abs().mean() > 0.1
    assert torch.equal(out, module.inpaint(images, masks, {"label": torch.tensor([0, 1, 2])},
                                           instantiate(cfg.sampler), guidance_scale=2.0))


def test_an_inpainted_image_is_the_same_whatever_its_batch(tiny_cfg):
    """Image i of a call with seed s is the image of a call with seed s + i alone: its starting noise and the
    posterior sample of its known latents come from its own generators (the known latents were drawn for the whole
    batch from one, so a latent model's image i depended on the others)."""
    from hydra.utils import instantiate

    cfg = tiny_cfg("task=inpainting", *VAE, "task.masked_image=encoded")
    module = randomised(build_module(cfg), seed=6).eval()
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    masks = torch.cat([masks_of("box", 1, 16, 1), masks_of("stroke", 1, 16, 2), masks_of("border", 1, 16, 3)])
    sampler = instantiate(cfg.sampler)
    batch = module.inpaint(images, masks, {"label": torch.tensor([0, 1, 2])}, sampler, seed=5)
    alone = module.inpaint(images[1:2], masks[1:2], {"label": torch.tensor([1])}, sampler, seed=6)
    torch.testing.assert_close(alone[0], batch[1], rtol=1e-4, atol=1e-5)


def test_inpainting_model_from_a_plain_one_starts_as_it(tiny_cfg, tmp_path):
    """init.path of a plain model: the input convolution takes its weights for the first channels and zeros for
    the masked image and mask, so the inpainting model's output ignores them at the start."""
    plain = randomised(module_of(tiny_cfg), seed=7)
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(tmp_path / "plain.safetensors"))
    inpaint = module_of(tiny_cfg, "task=inpainting")
    report = load_pretrained(inpaint, tmp_path / "plain.safetensors")
    assert report.expanded == ["backbone.x_embedder.weight"] and not report.missing
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 16, 16, generator=g), torch.rand(2, generator=g) * 1000
    cond = plain.conditioner({"label": torch.tensor([3, 4])})
    with torch.no_grad():
        reference = plain.backbone(x, t, cond)
        for image in (torch.zeros(2, 4, 16, 16), torch.randn(2, 4, 16, 16, generator=g)):
            torch.testing.assert_close(inpaint.backbone(x, t, replace(cond, image=image)), reference)


def test_inpainting_trains_and_draws_its_masks_from_the_step_generator(tiny_cfg, tmp_path):
    module = module_of(tiny_cfg, "task=inpainting")
    batch = {"image": torch.rand(4, 3, 16, 16) * 2 - 1, "label": torch.arange(4)}
    losses = [module.loss(batch, torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert torch.equal(losses[0], losses[1]) and not torch.equal(losses[0], losses[2])
    run = tmp_path / "inpaint"
    train(tiny_cfg(*DIT, "task=inpainting", "callbacks.sample_grid.every_n_steps=2", run_dir=run), run)
    assert (run / "weights" / "raw.safetensors").exists() and list((run / "samples").glob("*.png"))
    script = load_script("inpaint")
    out = tmp_path / "grid"
    assert script.main([f"ckpt={run / 'checkpoints' / 'last.ckpt'}", f"out={out}", "num=3", "steps=2",
                        "device=cpu"]) == 0
    report = json.loads((out / "inpaint.json").read_text())
    assert set(report["kinds"]) == {"box", "stroke", "border"} and (out / "grid.png").exists()
    assert all(k["known_max_abs_change"] == 0.0 and 0 < k["unknown_fraction"] < 1 for k in report["kinds"].values())
    assert script.main([f"ckpt={run / 'checkpoints' / 'last.ckpt'}", f"out={out}", "masks=circle"]) == 1


# -- instruction editing ---------------------------------------------------------------------------
def editing_denoiser(tiny_cfg):
    module = randomised(module_of(tiny_cfg, "task=editing"), seed=8).eval()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 16, 16, generator=g), torch.full((2,), 500.0)
    source = torch.randn(2, 3, 16, 16, generator=g)
    cond = replace(module.conditioner({"label": torch.tensor([1, 2])}), image=source)
    no_text = replace(module.conditioner.uncond(2), image=source)
    neither = replace(no_text, image=torch.zeros_like(source))
    return module, module.objective.denoiser(module.backbone), x, t, cond, no_text, neither


def test_dual_guidance_reduces_to_single_guidance_at_image_scale_1(tiny_cfg):
    from diffusion_train.diffusion.guidance import CFGDenoiser, DualGuidance

    module, denoiser, x, t, cond, no_text, neither = editing_denoiser(tiny_cfg)
    with torch.no_grad():
        dual = DualGuidance(denoiser, no_text, neither, text_scale=4.0, image_scale=1.0)(x, t, cond)
        single = CFGDenoiser(denoiser, no_text, 4.0)(x, t, cond)
        torch.testing.assert_close(dual, single, rtol=1e-5, atol=1e-6)
        plain = DualGuidance(denoiser, no_text, neither, text_scale=1.0, image_scale=1.0)(x, t, cond)
        torch.testing.assert_close(plain, denoiser(x, t, cond), rtol=1e-5, atol=1e-6)
        full, txt, none = (denoiser.estimate(x, t, c) for c in (cond, no_text, neither))  # before clip_x0
        both = DualGuidance(denoiser, no_text, neither, text_scale=3.0, image_scale=1.5)(x, t, cond)
        guided = none + 1.5 * (txt - none) + 3.0 * (full - txt)
        torch.testing.assert_close(both, denoiser.clip(guided), rtol=1e-5, atol=1e-5)
        assert denoiser.clip_x0 and float(guided.abs().max()) > 1  # the clipping is exercised
        assert not torch.allclose(both, single)


def test_editing_trains_on_a_source_and_drops_it_at_its_rate(tiny_cfg, monkeypatch):
    from diffusion_train.finetune.editing import InstructionEditing

    module = module_of(tiny_cfg, "task=editing")
    assert module.backbone.in_channels == 2 * module.backbone.out_channels
    batch = {"image": torch.rand(4, 3, 16, 16) * 2 - 1, "source": torch.rand(4, 3, 16, 16) * 2 - 1,
             "label": torch.arange(4)}
    loss = module.loss(batch, torch.Generator().manual_seed(0)).mean()
    loss.backward()
    assert torch.isfinite(loss)
    with pytest.raises(KeyError, match="'source'"):
        module.loss({"image": batch["image"], "label": batch["label"]}, torch.Generator().manual_seed(0))
    # InstructPix2Pix's scheme: 5% lose the source only, 5% the text (here the label) only, 5% both; the text
    # embedders' own dropout (10% here) is replaced. Independent draws gave "both" 0.5%.
    seen = []
    monkeypatch.setattr(module.objective, "loss", lambda net, x0, cond, **kw: seen.append(cond) or x0.new_zeros(1))
    n = 8000
    module.train().loss({"image": torch.zeros(n, 3, 16, 16), "source": torch.ones(n, 3, 16, 16),
                         "label": torch.zeros(n, dtype=torch.long)}, torch.Generator().manual_seed(0))
    cond = seen[-1]
    null = module.conditioner.uncond(1).vector
    text_dropped = (cond.vector == null).all(dim=1)
    image_dropped = (cond.image == 0).flatten(1).all(dim=1)
    shares = [float((text_dropped & ~image_dropped).float().mean()), float((~text_dropped & image_dropped).float()
              .mean()), float((text_dropped & image_dropped).float().mean())]
    assert all(abs(s - 0.05) < 0.012 for s in shares), shares
    module.eval().loss({"image": torch.zeros(64, 3, 16, 16), "source": torch.ones(64, 3, 16, 16),
                        "label": torch.zeros(64, dtype=torch.long)}, torch.Generator().manual_seed(0))
    assert not (seen[-1].image == 0).flatten(1).all(dim=1).any()  # validation keeps every source
    with pytest.raises(ValueError, match=r"task.image_dropout must be in \[0, 1/3\)"):
        InstructionEditing(image_dropout=0.4)


def test_edit_runs_with_both_scales(tiny_cfg):
    from hydra.utils import instantiate

    cfg = tiny_cfg("task=editing")
    module = randomised(build_module(cfg), seed=9)
    sources = torch.rand(2, 3, 16, 16) * 2 - 1
    a = module.edit(sources, {"label": torch.tensor([0, 1])}, instantiate(cfg.sampler), text_scale=3.0, image_scale=1.5)
    b = module.edit(sources, {"label": torch.tensor([0, 1])}, instantiate(cfg.sampler), text_scale=3.0, image_scale=1.0)
    assert a.shape == sources.shape and a.abs().max() <= 1 and not torch.equal(a, b)
    c = module.edit(sources, {"label": torch.tensor([0, 1])}, instantiate(cfg.sampler), text_scale=1.0, image_scale=0.0)
    assert c.shape == sources.shape  # image scale 0 with no text guidance: a point of a scale sweep, not a crash
    for option in ({"guidance_interval": [0.3, 5.0]}, {"guidance_rescale": 0.7}):  # were dropped without a word
        with pytest.raises(ValueError, match="^image_guidance .* takes no guidance_interval or guidance_rescale$"):
            module.sample(torch.randn(2, 3, 16, 16), {"label": torch.tensor([0, 1])}, instantiate(cfg.sampler), 3.0,
                          image=sources, image_guidance=1.5, **option)
    with pytest.raises(ValueError, match="task=editing"):
        module_of(tiny_cfg).edit(sources, {"label": torch.tensor([0, 1])}, instantiate(cfg.sampler))


def test_fashion_mnist_edit_pairs_are_exact():
    from diffusion_train.data.fashion_mnist import EDITS, FashionMNISTEditsDataModule

    dm = FashionMNISTEditsDataModule(batch_size=8, val_size=8)
    dm.setup()
    batch = dm.val_set[list(range(8))]
    assert batch["caption"] == list(EDITS) * 2
    src, out = batch["source"], batch["image"]
    assert torch.equal(out[0], src[0].flip(-1)) and torch.equal(out[1], src[1].flip(-2))
    assert torch.equal(out[2], -src[2]) and torch.equal(out[3], src[3].rot90(1, dims=(-2, -1)))
    assert not torch.equal(out, src)


def test_the_editing_preset_trains_a_step(tmp_path):
    """experiment=fmnist_edit (with the tiny T5 and U-Net): a batch of edit pairs trains, and edit() samples."""
    from hydra.utils import instantiate

    from conftest import TINY, compose_train

    cfg = compose_train([o for o in TINY if not o.startswith("data=")] + [
        "experiment=fmnist_edit", "conditioning=t5_tiny", "data.batch_size=4", "data.val_size=4"], tmp_path)
    module = build_module(cfg)
    dm = instantiate_data(cfg)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    loss = module.loss(batch, torch.Generator().manual_seed(0)).mean()
    loss.backward()
    assert torch.isfinite(loss) and module.backbone.in_channels == 2
    edited = module.edit(batch["source"][:2], {"caption": batch["caption"][:2]}, instantiate(cfg.sampler))
    assert edited.shape == (2, 1, 32, 32)
