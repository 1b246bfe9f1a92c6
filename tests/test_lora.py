"""LoRA fine-tuning (finetune/lora.py): which layers are adapted, merging and export, training only the adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import DIT, module_of, randomised
from diffusion_train.train import train
from diffusion_train.training.build import build_module
from diffusion_train.training.export import export_weights
from diffusion_train.training.pretrained import load_pretrained

ROOT = Path(__file__).resolve().parent.parent


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
    from_run = module_of(tiny_cfg)  # the run directory itself (its last.ckpt, adapters unmerged): merged on loading
    report = load_pretrained(from_run, ft, weights="raw")
    assert not report.missing and not report.unexpected
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 3, 16, 16, generator=g), torch.rand(2, generator=g) * 1000
    with torch.no_grad():
        cond = plain.conditioner({"label": torch.tensor([0, 3])})
        adapted = lora_model.backbone(x, t, cond)
        torch.testing.assert_close(plain.backbone.eval()(x, t, cond), adapted, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(from_run.backbone.eval()(x, t, cond), adapted, rtol=1e-4, atol=1e-5)

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


def test_a_lora_fine_tune_of_a_task_trains_its_input_channels_and_exports_what_it_trained(tiny_cfg, tmp_path):
    """LoRA with task=inpainting from a plain model: the input convolution's new channels start at zero, so it
    trains beside the adapters (frozen, the model could never see the mask). lora.safetensors holds it and the
    conditioner trained with train_conditioner, so applying the file to the base model gives the fine-tuned one."""
    from dataclasses import replace

    from safetensors.torch import load_file

    from diffusion_train.finetune.lora import apply_lora_file
    from diffusion_train.training.build import load_module

    base = tmp_path / "base"
    train(tiny_cfg(*DIT, run_dir=base), base)
    ft = tmp_path / "lora"
    train(tiny_cfg(*DIT, *LORA, "task=inpainting", "finetune.train_conditioner=true", f"init.path={base}",
                   "optim.lr=1e-2", run_dir=ft), ft)
    lora = load_file(str(ft / "weights" / "lora.safetensors"))
    assert lora["backbone.x_embedder.weight"][:, 3:].abs().sum() > 0  # the mask and known-image channels learned
    assert any(k.startswith("conditioner.") for k in lora) and not any(".base_layer." in k for k in lora)
    assert "backbone.x_embedder.weight" in load_file(str(ft / "weights" / "lora_ema_0.9999.safetensors"))

    fine_tuned = load_module(ft / "checkpoints" / "last.ckpt", weights="raw")
    start = module_of(tiny_cfg, "task=inpainting")
    load_pretrained(start, base / "weights" / f"{json.loads((ft / 'run.json').read_text())['init']['weights']}"
                                              ".safetensors")
    changed = apply_lora_file(start, ft / "weights" / "lora.safetensors", 1.0)
    assert "backbone.x_embedder.weight" in changed
    g = torch.Generator().manual_seed(2)
    x, t, image = torch.randn(2, 3, 16, 16, generator=g), torch.rand(2, generator=g) * 1000, torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        outs = [m.backbone.eval()(x, t, replace(m.conditioner({"label": torch.tensor([0, 3])}), image=image))
                for m in (start, fine_tuned)]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
