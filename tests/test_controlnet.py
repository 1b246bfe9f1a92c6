"""ControlNet fine-tuning (finetune/controlnet.py): a zero-initialised copy leaves the base output unchanged, its
control images change it once trained, and a run with its grid script."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from conftest import load_script, randomised
from diffusion_train.train import train
from diffusion_train.training.build import build_module
from diffusion_train.training.pretrained import load_pretrained


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
    with pytest.raises(ValueError, match="finetune.control_channels=3, but finetune.detector=sobel makes 1-channel"):
        ControlSource(channels=3)  # refused when built, not at the first step with a convolution's shape error
    assert ControlSource(key="depth", channels=3).key == "depth"


def test_controlnet_run_and_its_grid_script(tiny_cfg, tmp_path):
    """A ControlNet run from a base run (its copies start as the base's), then scripts/control.py on it."""
    base, run = tmp_path / "base.safetensors", tmp_path / "control"
    plain = randomised(build_module(tiny_cfg()), seed=12)
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(base))
    train(tiny_cfg(*CONTROL, f"init.path={base}", run_dir=run), run)
    assert json.loads((run / "run.json").read_text())["init"]["controlnet_from_base"] is True
    # FLOPs: the ControlNet's copy runs next to the base (its MACs counted by hooks here, by flop_counter there)
    from diffusion_train.scaling import counted_macs, forward_macs
    from diffusion_train.scaling.registry import load_summary

    module = build_module(tiny_cfg(*CONTROL))
    control_macs = counted_macs(module.controlnet, module.backbone.input_size)
    summary = json.loads((run / "summary.json").read_text())
    assert control_macs > 0
    assert summary["forward_macs_per_image"] == forward_macs(module.backbone) + control_macs
    # N: what trains, the ControlNet's copy (the base is frozen), so that the run is a valid registry entry
    assert summary["params"] == sum(p.numel() for p in module.controlnet.parameters() if p.requires_grad) > 0
    assert load_summary(run / "summary.json").params == summary["params"]
    script = load_script("control")
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
