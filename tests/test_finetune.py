"""Fine-tuning: starting from pretrained weights (training/pretrained.py). Tiny random "pretrained" models are
saved locally (checkpoints, exported safetensors, bare backbones) and loaded through the real loading code."""

from __future__ import annotations

import json
import os
import shutil
import signal
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from diffusion_train.train import train
from diffusion_train.training.build import build_module
from diffusion_train.training.export import export_weights
from diffusion_train.training.preemption import find_preemption
from diffusion_train.training.pretrained import load_pretrained

DIT = ["model=dit_tiny"]
ROOT = Path(__file__).resolve().parent.parent


def module_of(tiny_cfg, *overrides: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_module(tiny_cfg(*DIT, *overrides))


def randomised(module, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return module


def fake_checkpoint(module, path, decays=("0.999", "0.9999"), sample_decay=0.9999):
    """A checkpoint as the trainer writes it: state dict, EMA of two decays (raw weights + decay-specific
    offsets, so each choice is recognisable) and the run's config."""
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in module.state_dict().items()}
    ema = {"decays": [float(d) for d in decays], "num_updates": 10,
           "weights": {d: {n: p.detach() + i + 1 for n, p in module.named_parameters()}
                       for i, d in enumerate(decays)}}
    config = {"callbacks": {"ema": {"sample_decay": sample_decay}}}
    torch.save({"state_dict": state, "ema": ema, "global_step": 10, "diffusion_train": {"config": config}}, path)
    return state, ema


def params(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("weights, offset", [("raw", 0), ("ema", 2), ("ema_0.999", 1), ("ema_0.9999", 2)])
def test_checkpoint_weights_of_choice(tiny_cfg, tmp_path, weights, offset):
    """raw, the sampling EMA (the run's sample_decay) or a named decay, into a freshly built module."""
    source = randomised(module_of(tiny_cfg), seed=1)
    fake_checkpoint(source, tmp_path / "a.ckpt")
    target = module_of(tiny_cfg)
    report = load_pretrained(target, tmp_path / "a.ckpt", weights)
    expected = params(source)
    for name, value in params(target).items():
        torch.testing.assert_close(value, expected[name] + offset, rtol=0, atol=1e-6)
    assert report.weights == (weights if weights != "ema" else "ema_0.9999")
    assert report.loaded > 0 and not report.missing and not report.unexpected and report.prefix == ""


def test_run_directory_and_exported_safetensors(tiny_cfg, tmp_path):
    """A run directory reads its last.ckpt; without one, its exported weights; a .safetensors file directly."""
    source = randomised(module_of(tiny_cfg), seed=2)
    state, ema = fake_checkpoint(source, tmp_path / "last.ckpt")
    export_weights(state, ema, tmp_path / "run" / "weights")
    target = module_of(tiny_cfg)
    report = load_pretrained(target, tmp_path / "run", "ema_0.999")  # no checkpoints/: the exported file
    assert report.source.endswith("ema_0.999.safetensors") and report.weights == "ema_0.999"
    torch.testing.assert_close(params(target), {n: p + 1 for n, p in params(source).items()})

    (tmp_path / "run" / "checkpoints").mkdir()
    (tmp_path / "last.ckpt").rename(tmp_path / "run" / "checkpoints" / "last.ckpt")
    report = load_pretrained(target, tmp_path / "run", "raw")
    assert report.source.endswith("last.ckpt")
    torch.testing.assert_close(params(target), params(source))

    load_pretrained(target, tmp_path / "run" / "weights" / "ema_0.9999.safetensors")
    torch.testing.assert_close(params(target), {n: p + 2 for n, p in params(source).items()})


def test_bare_backbone_file_is_read_under_backbone(tiny_cfg, tmp_path):
    """A safetensors file of the backbone alone (keys without 'backbone.'): partial by nature, so non-strict."""
    source = randomised(module_of(tiny_cfg), seed=3)
    save_file({k: v.contiguous() for k, v in source.backbone.state_dict().items()}, str(tmp_path / "dit.safetensors"))
    target = module_of(tiny_cfg)
    with pytest.raises(ValueError, match="init.strict=false"):
        load_pretrained(target, tmp_path / "dit.safetensors")
    report = load_pretrained(target, tmp_path / "dit.safetensors", strict=False)
    assert report.prefix == "backbone." and report.loaded == len(source.backbone.state_dict())
    assert report.missing and all(not k.startswith("backbone.") for k in report.missing)
    torch.testing.assert_close(target.backbone.state_dict(), source.backbone.state_dict())


def test_partial_load_reports_missing_and_unexpected(tiny_cfg, tmp_path):
    source = randomised(module_of(tiny_cfg), seed=4)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    dropped = sorted(k for k in state if k.startswith("backbone.final_layer"))
    for k in dropped:
        del state[k]
    state["backbone.extra_head.weight"] = torch.zeros(3)
    save_file(state, str(tmp_path / "partial.safetensors"))
    target = module_of(tiny_cfg)
    built = params(target)
    with pytest.raises(ValueError) as e:
        load_pretrained(target, tmp_path / "partial.safetensors")
    assert "missing (first: backbone.final_layer" in str(e.value) and "backbone.extra_head.weight" in str(e.value)
    torch.testing.assert_close(params(target), built)  # an error loads nothing
    report = load_pretrained(target, tmp_path / "partial.safetensors", strict=False)
    assert sorted(report.missing) == dropped and report.unexpected == ["backbone.extra_head.weight"]
    after, expected = params(target), params(source)
    for name in after:
        torch.testing.assert_close(after[name], built[name] if name in dropped else expected[name])


def test_mismatching_backbone_lists_keys_and_shapes(tiny_cfg, tmp_path):
    source = module_of(tiny_cfg, "model.hidden_size=96")
    fake_checkpoint(source, tmp_path / "wide.ckpt")
    target = module_of(tiny_cfg)
    built = params(target)
    with pytest.raises(ValueError) as e:
        load_pretrained(target, tmp_path / "wide.ckpt", strict=False)
    msg = str(e.value)
    assert "does not match the configured model" in msg and "differ in shape" in msg
    assert "backbone." in msg and "(96," in msg and "in the file" in msg and "in the model" in msg
    assert "\n" not in msg
    torch.testing.assert_close(params(target), built)


@pytest.mark.parametrize("bad, match", [("missing.ckpt", "does not exist"), ("empty_dir", "neither")])
def test_bad_paths_name_the_path(tiny_cfg, tmp_path, bad, match):
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match=match):
        load_pretrained(module_of(tiny_cfg), tmp_path / bad)


def test_ema_asked_of_a_checkpoint_without_one(tiny_cfg, tmp_path):
    source = module_of(tiny_cfg)
    torch.save({"state_dict": source.state_dict(), "global_step": 1}, tmp_path / "noema.ckpt")
    with pytest.raises(ValueError, match="init.weights=raw"):
        load_pretrained(module_of(tiny_cfg), tmp_path / "noema.ckpt")
    with pytest.raises(ValueError, match="has EMA decays"):
        fake_checkpoint(source, tmp_path / "a.ckpt")
        load_pretrained(module_of(tiny_cfg), tmp_path / "a.ckpt", "ema_0.5")


def test_a_run_starts_from_another_runs_weights(tiny_cfg, tmp_path):
    """train() with init.path: a fresh run starts from the first run's sampling EMA (lr 0 keeps it there), records
    what it loaded in run.json, and a relaunch resumes from its own checkpoint without reading init again."""
    first = tmp_path / "first"
    train(tiny_cfg(*DIT, run_dir=first), first)
    ema = torch.load(first / "checkpoints" / "last.ckpt", weights_only=True)["ema"]
    second = tmp_path / "second"
    cfg = tiny_cfg(*DIT, f"init.path={first}", "optim.lr=0", "optim.weight_decay=0", run_dir=second)
    train(cfg, second)
    info = json.loads((second / "run.json").read_text())["init"]
    assert info["source"] == str(first / "checkpoints" / "last.ckpt") and info["loaded"] > 0
    assert info["weights"].startswith("ema_") and not info["missing"] and not info["unexpected"]
    state = torch.load(second / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    chosen = ema["weights"][info["weights"].removeprefix("ema_")]
    for name, value in chosen.items():
        torch.testing.assert_close(state[name], value.to(state[name].dtype))

    shutil.rmtree(first)  # a resumed run does not read the init source any more
    cfg = tiny_cfg(*DIT, f"init.path={first}", "optim.lr=0", "optim.weight_decay=0", "trainer.max_steps=6",
                   run_dir=second)
    train(cfg, second)
    assert torch.load(second / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6


# -- LoRA ------------------------------------------------------------------------------------------
LORA = ["finetune=lora", "finetune.rank=4", "finetune.alpha=8"]


def test_lora_adapts_the_attention_and_mlp_layers_only(tiny_cfg):
    from diffusion_train.finetune.lora import lora_layers

    module = module_of(tiny_cfg, *LORA)
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    adapted = {n.split(".lora_")[0] for n in names}
    assert adapted == {f"backbone.blocks.{i}.{layer}" for i in range(len(module.backbone.blocks))
                       for layer in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")}
    assert len(lora_layers(module)) == len(adapted)
    assert not any(p.requires_grad for p in module.conditioner.parameters())  # train_conditioner=false


@pytest.mark.parametrize("model, extra, layers", [
    ("unet_small", [], {"attn.qkv", "attn.proj", "emb_proj.1"}),
    ("unet_tiny", ["conditioning=t5_tiny"], {"attn.qkv", "attn.proj", "cross_attn.q", "cross_attn.kv",
                                              "cross_attn.proj", "ff.0.proj", "ff.1", "emb_proj.1"}),
    ("mmdit_tiny", [], {"image.qkv", "image.proj", "mlp.0", "mlp.2"}),
])
def test_the_default_targets_fit_every_backbone(tiny_cfg, model, extra, layers):
    """One default expression: attention, MLP / feed-forward and embedding projections of each backbone."""
    module = build_module(tiny_cfg(f"model={model}", "finetune=lora", *extra))
    adapted = {n.split(".lora_")[0] for n, p in module.named_parameters() if p.requires_grad}
    assert all(any(a.endswith("." + layer) for layer in layers) for a in adapted)
    assert all(any(a.endswith("." + layer) for a in adapted) for layer in layers)


@pytest.mark.parametrize("pattern, match", [(r"['attn\.qkv$','attn\.nonexistent$']", r"'attn\\.nonexistent\$' matches no"),
                                            (r"['(unclosed']", "not a regular expression")])
def test_lora_pattern_matching_nothing_is_named(tiny_cfg, pattern, match):
    with pytest.raises(ValueError, match=match) as e:
        module_of(tiny_cfg, *LORA, f"finetune.target_modules={pattern}")
    assert "finetune.target_modules" in str(e.value)


def test_lora_merge_and_export_give_the_adapted_outputs(tiny_cfg, tmp_path):
    """Random adapters: merged into the base weights (in place, or in the exported plain state dict loaded into a
    plain model) they give the unmerged model's outputs; unmerging restores the base weights."""
    from safetensors.torch import load_file

    from diffusion_train.finetune.lora import merge_lora, unmerge_lora

    module = randomised(module_of(tiny_cfg, *LORA), seed=5)  # non-zero lora_B: the adapters change the output
    net = module.backbone.eval()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 16, 16, generator=g), torch.rand(2, generator=g) * 1000
    cond = module.conditioner({"label": torch.tensor([1, 2])})
    with torch.no_grad():
        adapted = net(x, t, cond)
        base = {k: v.clone() for k, v in net.state_dict().items() if ".base_layer.weight" in k}
        merge_lora(net)
        torch.testing.assert_close(net(x, t, cond), adapted, rtol=1e-4, atol=1e-5)
        assert any(not torch.equal(net.state_dict()[k], v) for k, v in base.items())
        unmerge_lora(net)
        for k, v in base.items():
            torch.testing.assert_close(net.state_dict()[k], v, rtol=0, atol=1e-6)

    written = export_weights(module.state_dict(), None, tmp_path, lora_scaling=8 / 4)
    assert sorted(p.name for p in written) == ["lora.safetensors", "raw.safetensors"]
    adapters = load_file(str(tmp_path / "lora.safetensors"))
    assert adapters and all(".lora_" in k for k in adapters)
    plain = module_of(tiny_cfg)
    assert load_pretrained(plain, tmp_path / "raw.safetensors").missing == []
    with torch.no_grad():
        torch.testing.assert_close(plain.backbone.eval()(x, t, cond), adapted, rtol=1e-4, atol=1e-5)


def test_lora_fine_tune_trains_only_the_adapters(tiny_cfg, tmp_path):
    """A base run, then a LoRA run from its weights: the checkpoint's base weights are the base run's sampling
    EMA exactly, the adapters moved, the EMA holds adapters only, and the exports load without peft."""
    from safetensors.torch import load_file

    from diffusion_train.finetune.lora import apply_lora_file
    from diffusion_train.training.build import load_module

    base = tmp_path / "base"
    train(tiny_cfg(*DIT, run_dir=base), base)
    ft = tmp_path / "lora"
    train(tiny_cfg(*DIT, *LORA, f"init.path={base}", "optim.lr=1e-2", run_dir=ft), ft)
    info = json.loads((ft / "run.json").read_text())["init"]
    assert info["adapters"] > 0 and not info["missing"] and not info["unexpected"]

    start = load_file(str(base / "weights" / f"{info['weights']}.safetensors"))
    ckpt = torch.load(ft / "checkpoints" / "last.ckpt", weights_only=True)
    state = ckpt["state_dict"]
    for key, value in state.items():
        plain = key.replace(".base_layer.", ".")
        if ".lora_" not in key and plain in start:
            torch.testing.assert_close(value, start[plain], rtol=0, atol=0)
    assert any(state[k].abs().sum() > 0 for k in state if ".lora_B." in k)  # lora_B starts at 0 and trained
    assert set(next(iter(ckpt["ema"]["weights"].values()))) == {k for k in state if ".lora_" in k}

    exported = sorted(p.name for p in (ft / "weights").iterdir())
    assert exported == ["ema_0.999.safetensors", "ema_0.9999.safetensors", "lora.safetensors",
                        "lora_ema_0.999.safetensors", "lora_ema_0.9999.safetensors", "raw.safetensors"]
    lora_model = load_module(ft / "checkpoints" / "last.ckpt", weights="raw")
    plain = module_of(tiny_cfg)
    load_pretrained(plain, ft / "weights" / "raw.safetensors")
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 3, 16, 16, generator=g), torch.rand(2, generator=g) * 1000
    with torch.no_grad():
        cond = plain.conditioner({"label": torch.tensor([0, 3])})
        adapted = lora_model.backbone(x, t, cond)
        torch.testing.assert_close(plain.backbone.eval()(x, t, cond), adapted, rtol=1e-4, atol=1e-5)

    # the adapters alone, added to the base run's model at sampling time (diffusion-sample lora=... lora_scale=...)
    from hydra import compose, initialize_config_dir

    from diffusion_train.sample import load_for_sampling

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        sample_cfg = compose("sample", overrides=[f"ckpt={base / 'checkpoints' / 'last.ckpt'}", "out_dir=unused",
                                                  f"lora={ft / 'weights' / 'lora.safetensors'}", "device=cpu"])
    base_model = load_module(base / "checkpoints" / "last.ckpt")
    with torch.no_grad():
        torch.testing.assert_close(load_for_sampling(sample_cfg)[1].backbone(x, t, cond), adapted, rtol=1e-4,
                                   atol=1e-5)
        half = load_module(base / "checkpoints" / "last.ckpt")
        apply_lora_file(half, ft / "weights" / "lora.safetensors", scale=0.5)
        expected = {n: (p + q) / 2 for (n, p), q in zip(base_model.named_parameters(),
                                                         load_for_sampling(sample_cfg)[1].parameters())}
        for name, value in half.named_parameters():
            torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(half.backbone(x, t, cond), adapted)
    with pytest.raises(ValueError, match="not a LoRA export"):
        apply_lora_file(base_model, ft / "weights" / "raw.safetensors")


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


def test_mask_weights_are_checked():
    from diffusion_train.finetune.masks import random_masks

    for bad in ({"circle": 1.0}, {"box": 0.0}, {"box": -1.0, "full": 2.0}, {}):
        with pytest.raises(ValueError, match="task.masks"):
            random_masks(2, 8, 8, bad)


@pytest.mark.parametrize("extra", [[], ["autoencoder=tiny_vae", "autoencoder.weights=null"]],
                         ids=["pixels", "latents"])
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

    import importlib.util

    spec = importlib.util.spec_from_file_location("inpaint_script", ROOT / "scripts" / "inpaint.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
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
        full, txt, none = denoiser(x, t, cond), denoiser(x, t, no_text), denoiser(x, t, neither)
        both = DualGuidance(denoiser, no_text, neither, text_scale=3.0, image_scale=1.5)(x, t, cond)
        torch.testing.assert_close(both, none + 1.5 * (txt - none) + 3.0 * (full - txt), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(both, single)


def test_editing_trains_on_a_source_and_drops_it_at_its_rate(tiny_cfg):
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
    task = InstructionEditing(image_dropout=0.5)
    x0 = torch.randn(4000, 1, 2, 2)
    source = task.training_image(x0, torch.Generator().manual_seed(0), batch={"source_latent": x0},
                                 encode=lambda b: b["latent"])
    dropped = (source == 0).flatten(1).all(dim=1)
    assert 0.45 < dropped.float().mean() < 0.55 and torch.equal(source[~dropped], x0[~dropped])


def test_edit_runs_with_both_scales(tiny_cfg):
    from hydra.utils import instantiate

    cfg = tiny_cfg("task=editing")
    module = randomised(build_module(cfg), seed=9)
    sources = torch.rand(2, 3, 16, 16) * 2 - 1
    a = module.edit(sources, {"label": torch.tensor([0, 1])}, instantiate(cfg.sampler), text_scale=3.0, image_scale=1.5)
    b = module.edit(sources, {"label": torch.tensor([0, 1])}, instantiate(cfg.sampler), text_scale=3.0, image_scale=1.0)
    assert a.shape == sources.shape and a.abs().max() <= 1 and not torch.equal(a, b)
    with pytest.raises(ValueError, match="task=editing"):
        module_of(tiny_cfg).edit(sources, {"label": torch.tensor([0, 1])}, instantiate(cfg.sampler))


# -- ControlNet ------------------------------------------------------------------------------------
CONTROL = ["finetune=controlnet"]


@pytest.mark.parametrize("model", ["dit_tiny", "unet_tiny"])
def test_zero_initialised_controlnet_leaves_the_base_output_unchanged(tiny_cfg, tmp_path, model):
    """A ControlNet fine-tune started from a plain model: its copies take the base weights, only the ControlNet
    trains, and at step 0 the controlled model's output is exactly the base model's, whatever the control."""
    plain = randomised(build_module(tiny_cfg(f"model={model}")), seed=10)
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(tmp_path / "plain.safetensors"))
    module = build_module(tiny_cfg(f"model={model}", *CONTROL))
    report = load_pretrained(module, tmp_path / "plain.safetensors")
    assert report.controlnet_from_base and report.adapters == 0 and not report.missing and not report.unexpected
    trainable = {n.split(".")[0] for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {"controlnet"}
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 16, 16, generator=g), torch.rand(2, generator=g) * 1000
    cond = plain.conditioner({"label": torch.tensor([1, 2])})
    control = torch.rand(2, 1, 16, 16, generator=g) * 2 - 1
    with torch.no_grad():
        reference = plain.backbone(x, t, cond)
        residuals = module.controlnet(x, t, replace(cond, control=control))
        assert residuals and all(not r.any() for r in residuals)
        assert torch.equal(module.net(x, t, replace(cond, control=control)), reference)
        copied = module.controlnet.down if model == "unet_tiny" else module.controlnet.blocks
        source = plain.backbone.down if model == "unet_tiny" else plain.backbone.blocks
        for a, b in zip(copied.state_dict().values(), source.state_dict().values()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("model", ["dit_tiny", "unet_tiny"])
def test_controlnet_trains_and_its_control_changes_the_output(tiny_cfg, model):
    """After some steps on Sobel edges the ControlNet's residuals are non-zero: the control image and its scale
    change the samples; the base weights stay as they were."""
    from hydra.utils import instantiate

    cfg = tiny_cfg(f"model={model}", *CONTROL)
    module = build_module(cfg)
    randomised(module.backbone, seed=11)  # a "pretrained" base: an untrained one's zero output layer hides all
    module.controlnet.copy_base(module.backbone)
    base = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    opt = torch.optim.Adam(module.trainable_parameters(), lr=1e-2)
    batch = {"image": torch.rand(4, 3, 16, 16) * 2 - 1, "label": torch.arange(4)}
    for step in range(3):
        module.loss(batch, torch.Generator().manual_seed(step)).mean().backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(v, module.backbone.state_dict()[k]) for k, v in base.items())
    sampler = instantiate(cfg.sampler)
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    edges = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    inputs = {"label": torch.tensor([0, 1])}
    plain = module.sample(noise, inputs, sampler)
    controlled = module.sample(noise, inputs, sampler, control=edges)
    half = module.sample(noise, inputs, sampler, control=edges, control_scale=0.5)
    zero = module.sample(noise, inputs, sampler, control=edges, control_scale=0.0)
    assert not torch.equal(controlled, plain) and not torch.equal(half, controlled)
    torch.testing.assert_close(zero, plain)


def test_sobel_edges_and_control_sources():
    from diffusion_train.finetune.controlnet import ControlSource, sobel_edges

    image = -torch.ones(1, 3, 8, 8)
    image[..., :, 4:] = 1.0  # one vertical edge
    edges = sobel_edges(image)
    assert edges.shape == (1, 1, 8, 8) and edges.max() == 1 and edges.min() == -1
    assert (edges[..., :, 3:5] == 1).all() and (edges[..., :, :2] == -1).all() and (edges[..., :, 6:] == -1).all()
    assert torch.equal(ControlSource(key="depth")({"depth": image}), image)
    with pytest.raises(KeyError, match="'depth'"):
        ControlSource(key="depth")({"image": image})
    with pytest.raises(KeyError, match="control_key"):
        ControlSource()({"latent": image})
    with pytest.raises(ValueError, match="finetune.detector"):
        ControlSource(detector="canny")


def test_controlnet_run_and_its_grid_script(tiny_cfg, tmp_path):
    """A ControlNet run from a base run (its copies start as the base's), then scripts/control.py on it."""
    import importlib.util

    base, run = tmp_path / "base.safetensors", tmp_path / "control"
    plain = randomised(build_module(tiny_cfg()), seed=12)
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(base))
    train(tiny_cfg(*CONTROL, f"init.path={base}", run_dir=run), run)
    assert json.loads((run / "run.json").read_text())["init"]["controlnet_from_base"] is True
    # FLOPs: the ControlNet's copy runs next to the base (its MACs counted by hooks here, by flop_counter there)
    from diffusion_train.scaling import counted_macs, forward_macs

    module = build_module(tiny_cfg(*CONTROL))
    control_macs = counted_macs(module.controlnet, module.backbone.input_size)
    summary = json.loads((run / "summary.json").read_text())
    assert control_macs > 0
    assert summary["forward_macs_per_image"] == forward_macs(module.backbone) + control_macs
    spec = importlib.util.spec_from_file_location("control_script", ROOT / "scripts" / "control.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "grid"
    ckpt = run / "checkpoints" / "last.ckpt"
    assert script.main([f"ckpt={ckpt}", f"out={out}", "num=3", "steps=2", "device=cpu"]) == 0
    report = json.loads((out / "control.json").read_text())
    assert set(report["edge_agreement"]) == {"validation_images", "without_control", "with_control"}
    assert report["edge_agreement"]["validation_images"] > 0.5 and (out / "grid.png").exists()
    plain_run = tmp_path / "plain"
    torch.save({"state_dict": plain.state_dict(), "global_step": 0,
                "diffusion_train": {"config": OmegaConf.to_container(tiny_cfg(), resolve=True)}}, plain_run)
    assert script.main([f"ckpt={plain_run}", f"out={out}"]) == 1  # not a ControlNet run


# -- DreamBooth ------------------------------------------------------------------------------------
def write_images(folder: Path, n: int, seed: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"img{i}.png")


def dreambooth_overrides(tmp_path, *extra: str) -> list[str]:
    return ["data=dreambooth", f"data.instance_dir={tmp_path / 'subject'}", "data.instance_prompt=a photo of sks thing",
            "data.class_prompt=a photo of a thing", "data.num_class_images=5", "data.batch_size=2",
            "data.resolution=16", "conditioning=t5_tiny", "data.prior_loss_weight=0.5",
            "callbacks.sample_grid.prompts=[a photo of sks thing]", *extra]


def test_dreambooth_batches_pair_instance_and_class_images(tmp_path):
    from diffusion_train.finetune.dreambooth import DreamBoothBatches

    instance = torch.zeros(3, 1, 4, 4, dtype=torch.uint8)
    klass = torch.full((5, 1, 4, 4), 255, dtype=torch.uint8)
    batches = DreamBoothBatches(instance, "a sks dog", klass, "a dog", 0.25, "train")
    assert len(batches) == 5
    batch = batches[[1, 4]]
    assert batch["caption"] == ["a sks dog"] * 2 + ["a dog"] * 2
    assert batch["__key__"] == ["train/instance/1", "train/instance/1", "train/class/1", "train/class/4"]
    assert batch["loss_weight"].tolist() == [1.0, 1.0, 0.25, 0.25]
    assert (batch["image"][:2] == -1).all() and (batch["image"][2:] == 1).all()


def test_dreambooth_makes_its_class_images_then_trains(tiny_cfg, tmp_path, monkeypatch):
    """Prior preservation: the model makes the missing class images with the class prompt before training (a
    relaunch finds them all), then batches hold the subject and the class images with their weights. A requeue
    signal while they are made (the handler is installed before) stops the run between two batches of images,
    before training; the relaunch makes the rest."""
    from diffusion_train.training.module import DiffusionModule

    write_images(tmp_path / "subject", 3, seed=0)
    run = tmp_path / "db"
    sample_seeded, calls = DiffusionModule.sample_seeded, []

    def signalled_during_first_batch(self, *args, **kwargs):
        calls.append(args[0])
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return sample_seeded(self, *args, **kwargs)

    monkeypatch.setattr(DiffusionModule, "sample_seeded", signalled_during_first_batch)
    cfg = tiny_cfg(*dreambooth_overrides(tmp_path, "data.class_batch_size=2"), run_dir=run)
    handler = signal.getsignal(signal.SIGUSR1)
    trainer = train(cfg, run)
    assert find_preemption(trainer).stopped_by == "SIGUSR1" and trainer.global_step == 0 and calls == [[0, 1]]
    assert sorted(p.name for p in (run / "class_images").glob("*.png")) == ["class_00000.png", "class_00001.png"]
    assert not (run / "checkpoints").exists() and not (run / "weights").exists()
    assert signal.getsignal(signal.SIGUSR1) == handler  # the callback's handler is gone with the run

    monkeypatch.undo()
    train(cfg, run)
    made = sorted((run / "class_images").glob("*.png"))
    assert [p.name for p in made] == [f"class_{i:05d}.png" for i in range(5)]
    dm = instantiate_data(tiny_cfg(*dreambooth_overrides(tmp_path), run_dir=run))
    assert dm.class_images_missing() == 0  # a relaunch makes none
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["loss_weight"].tolist() == [1.0, 1.0, 0.5, 0.5]
    summary = json.loads((run / "summary.json").read_text())  # the class images count in throughput and FLOPs
    assert summary["global_batch"] == 4 and summary["images_seen"] == 4 * summary["steps"] > 0


def test_a_process_waiting_for_the_class_images_stops_when_signalled(tmp_path, monkeypatch):
    """Processes other than 0 wait for its class images; a signal stops the wait (no time-out) and the run."""
    from diffusion_train.train import make_class_images
    from diffusion_train.training.preemption import Preemption

    class Waiting:
        num_class_images = 4

        def class_images_missing(self):
            return 4

    monkeypatch.setenv("RANK", "1")
    preemption = Preemption(str(tmp_path))
    preemption.received = signal.SIGTERM
    try:
        make_class_images(Waiting(), None, None, preemption, timeout_s=30)
    finally:
        preemption.uninstall()
    assert preemption.stopped_by == "SIGTERM" and not preemption.requeue
    preemption = Preemption(str(tmp_path))  # not signalled: it waits until its time-out
    try:
        with pytest.raises(TimeoutError, match="process 0 did not make the class images"):
            make_class_images(Waiting(), None, None, preemption, timeout_s=0)
    finally:
        preemption.uninstall()
    assert preemption.stopped_by is None


def test_dreambooth_needs_its_images(tiny_cfg, tmp_path):
    (tmp_path / "subject").mkdir()
    dm = instantiate_data(tiny_cfg(*dreambooth_overrides(tmp_path, "data.class_prompt=null")))
    with pytest.raises(FileNotFoundError, match="data.instance_dir"):
        dm.setup()


def instantiate_data(cfg):
    from hydra.utils import instantiate

    return instantiate(cfg.data, _convert_="all")


# -- diffusers backbones ---------------------------------------------------------------------------
TINY_UNET = dict(sample_size=32, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D",
                                                                                          "CrossAttnUpBlock2D"),
                 cross_attention_dim=64, attention_head_dim=8, norm_num_groups=8)


def test_a_diffusers_unet_from_a_pipeline_folder_learns_here(tiny_cfg, tmp_path):
    """A random tiny UNet2DConditionModel saved as a pipeline's unet/ loads with its weights, takes gradients from our
    objective with t5_tiny's 64-wide context, counts its FLOPs with the attention, and takes LoRA's default targets."""
    from diffusers import UNet2DConditionModel

    from diffusion_train.scaling.flops import counted_macs, flop_counter_macs, forward_macs

    torch.manual_seed(0)
    UNet2DConditionModel(**TINY_UNET).save_pretrained(tmp_path / "pipe" / "unet")
    saved = UNet2DConditionModel.from_pretrained(tmp_path / "pipe", subfolder="unet").state_dict()
    overrides = ["model=diffusers_unet", f"model.name_or_path={tmp_path / 'pipe'}", "conditioning=t5_tiny",
                 "data=fashion_mnist_captions", "data.batch_size=4", "data.val_size=8"]
    module = build_module(tiny_cfg(*overrides))
    assert all(torch.equal(module.backbone.unet.state_dict()[k], v) for k, v in saved.items())
    batch = {"image": torch.rand(2, 1, 32, 32) * 2 - 1, "caption": ["a red square", "a blue circle"]}
    loss = module.loss(batch, torch.Generator().manual_seed(0)).mean()
    loss.backward()
    assert torch.isfinite(loss) and module.backbone.unet.conv_in.weight.grad.abs().sum() > 0
    macs = forward_macs(module.backbone, context_len=7)
    assert macs == flop_counter_macs(module.backbone, context_len=7) > counted_macs(module.backbone, context_len=7)

    lora = build_module(tiny_cfg(*overrides, "finetune=lora"))
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in lora.named_parameters() if p.requires_grad}
    assert {"to_q", "to_k", "to_v", "0"} <= adapted


def test_diffusers_unet_config_mismatches_are_named(tiny_cfg, tmp_path):
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel(**TINY_UNET).save_pretrained(tmp_path / "unet_only")
    fmnist = ["model=diffusers_unet", f"model.name_or_path={tmp_path / 'unet_only'}", "data=fashion_mnist"]
    from hydra.errors import InstantiationException

    with pytest.raises(InstantiationException, match="cross-attends to width 64, the conditioner gives 384"):
        build_module(tiny_cfg(*fmnist, "conditioning=text_minilm", "conditioning.embedders.caption.output=context"))
    with pytest.raises(InstantiationException, match="takes 1 input channels, the data, autoencoder and task give 3"):
        build_module(tiny_cfg(*fmnist, "conditioning=t5_tiny", "task=inpainting"))


def test_a_diffusers_pixart_transformer_learns_here(tiny_cfg, tmp_path):
    """A random tiny PixArtTransformer2DModel saved as a pipeline's transformer/: loaded with its weights, the
    learned-variance half of its output dropped, gradients from our objective, LoRA's default targets."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    config = dict(num_attention_heads=2, attention_head_dim=16, in_channels=1, out_channels=2, num_layers=2,
                  sample_size=32, patch_size=2, cross_attention_dim=32, caption_channels=64, norm_num_groups=8)
    PixArtTransformer2DModel(**config).save_pretrained(tmp_path / "pipe" / "transformer")
    overrides = ["model=diffusers_pixart", f"model.name_or_path={tmp_path / 'pipe'}", "conditioning=t5_tiny",
                 "data=fashion_mnist_captions"]
    module = build_module(tiny_cfg(*overrides))
    saved = PixArtTransformer2DModel.from_pretrained(tmp_path / "pipe", subfolder="transformer").state_dict()
    assert all(torch.equal(module.backbone.transformer.state_dict()[k], v) for k, v in saved.items())
    assert module.backbone.out_channels == 1
    batch = {"image": torch.rand(2, 1, 32, 32) * 2 - 1, "caption": ["a red square", "a blue circle"]}
    cond = module.conditioner(batch)
    with torch.no_grad():
        full = module.backbone.transformer(batch["image"], encoder_hidden_states=cond.context, timestep=torch.ones(2),
                                           added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                                           encoder_attention_mask=cond.mask).sample
        torch.testing.assert_close(module.backbone(batch["image"], torch.ones(2), cond), full[:, :1])
    loss = module.loss(batch, torch.Generator().manual_seed(0)).mean()
    loss.backward()
    assert torch.isfinite(loss) and module.backbone.transformer.pos_embed.proj.weight.grad.abs().sum() > 0
    lora = build_module(tiny_cfg(*overrides, "finetune=lora"))
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in lora.named_parameters() if p.requires_grad}
    assert {"to_q", "to_k", "to_v"} <= adapted


def test_controlnet_of_a_diffusers_unet(tiny_cfg, tmp_path):
    """diffusers' ControlNetModel made from the wrapped U-Net: the base output exactly at the start, the control
    reaching it after a few steps of the ControlNet alone."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    UNet2DConditionModel(**TINY_UNET).save_pretrained(tmp_path / "unet")
    module = build_module(tiny_cfg("model=diffusers_unet", f"model.name_or_path={tmp_path / 'unet'}",
                                   "conditioning=t5_tiny", "data=fashion_mnist_captions", *CONTROL))
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(2, 1, 32, 32, generator=g) * 2 - 1, "caption": ["a square", "a circle"]}
    x, t = torch.randn(2, 1, 32, 32, generator=g), torch.full((2,), 300.0)
    cond = replace(module.conditioner(batch), control=torch.rand(2, 1, 32, 32, generator=g) * 2 - 1)
    with torch.no_grad():
        base = module.backbone(x, t, replace(cond, control=None))
        assert torch.equal(module.net(x, t, cond), base)
    from diffusion_train.scaling import flop_counter_macs

    assert flop_counter_macs(module.controlnet, module.backbone.input_size, 64) > 0  # counted in the run's FLOPs
    opt = torch.optim.Adam(module.trainable_parameters(), lr=1e-2)
    assert {n.split(".")[0] for n, p in module.named_parameters() if p.requires_grad} == {"controlnet"}
    for step in range(2):
        module.loss(batch, torch.Generator().manual_seed(step)).mean().backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        assert not torch.allclose(module.net(x, t, cond), module.backbone(x, t, replace(cond, control=None)))


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


def test_dreambooth_eval_script(tmp_path):
    """scripts/dreambooth_eval.py on a tiny text-conditioned Fashion-MNIST run and a stand-in classifier file."""
    import importlib.util

    from conftest import TINY, compose_train
    from diffusion_train.metrics.fmnist_net import FMNISTNet

    run = tmp_path / "text"
    cfg = compose_train([o for o in TINY if not o.startswith("data=")] + [
        "data=fashion_mnist_captions", "conditioning=t5_tiny", "data.batch_size=4", "data.val_size=4",
        "trainer.max_steps=2", "callbacks.sample_grid.prompts=[a photo of a bag]"], run)
    train(cfg, run)
    write_images(tmp_path / "subject", 2, seed=1)
    FMNISTNet(channels=(8, 16), feature_dim=16).save(tmp_path / "net.safetensors")
    spec = importlib.util.spec_from_file_location("db_eval", ROOT / "scripts" / "dreambooth_eval.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "eval"
    args = [f"ckpt={run / 'checkpoints' / 'last.ckpt'}", f"out={out}", f"instance_dir={tmp_path / 'subject'}",
            "instance_prompt=a photo of sks thing", f"classifier={tmp_path / 'net.safetensors'}", "num=3",
            "per_class=1", "steps=2", "device=cpu"]
    assert script.main(args) == 0
    report = json.loads((out / "dreambooth.json").read_text())
    assert report["subject_distance"] > 0 and 0 <= report["class_accuracy"] <= 1 and (out / "grid.png").exists()
    assert script.main(args[:2]) == 1  # instance_dir, instance_prompt and classifier missing


def test_a_frozen_text_encoders_extra_state_is_not_a_missing_weight(tiny_cfg, tmp_path):
    """A text model's checkpoint (the frozen MiniLM keeps its provenance as extra state, not as weights) loads
    strictly into the same model."""
    from conftest import TINY, compose_train

    cfg = compose_train([o for o in TINY if not o.startswith("data=")] + ["data=fashion_mnist_captions",
                                                                         "conditioning=text_minilm"], tmp_path)
    source = build_module(cfg)
    assert any(not isinstance(v, torch.Tensor) for v in source.state_dict().values())
    fake_checkpoint(source, tmp_path / "text.ckpt")
    report = load_pretrained(build_module(cfg), tmp_path / "text.ckpt", "raw")
    assert report.loaded > 0 and not report.missing and not report.unexpected
