"""Every option of every config group composes; every preset builds; each backbone x conditioning trains."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from conftest import CONFIG_DIR, compose_train
from diffusion_train.data.precomputed import FORMAT
from diffusion_train.training.build import build_module
from diffusion_train.train import train

GROUPS = sorted(p.name for p in Path(CONFIG_DIR).iterdir() if p.is_dir())
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((Path(CONFIG_DIR) / g).glob("*.yaml"))]


def test_groups_are_the_documented_ones():
    assert {"data", "model", "conditioning", "diffusion", "sampler", "optim", "lr_schedule", "trainer",
            "logger", "callbacks", "experiment"} <= set(GROUPS)


# Options that point at the user's data: they must name the missing key until it is given.
NEEDS_DATA = {"data=image_folder": "data.root", "data=precomputed": "data.path", "data=webdataset": "data.sources",
              "experiment=sd": "data.root",
              "experiment=pixart": "data.root",
              "data=dreambooth": ("data.instance_dir", "data.instance_prompt"),
              "experiment=dreambooth": ("data.instance_dir", "data.instance_prompt"),
              "model=diffusers_unet": "model.name_or_path", "model=diffusers_pixart": "model.name_or_path"}


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_resolves(group, option, tmp_path):
    adds = group == "sweep"  # sweeps are not in train.yaml's defaults: +sweep=NAME adds one
    cfg = compose_train([f"{'+' if adds else ''}{group}={option}"], tmp_path)
    needed = NEEDS_DATA.get(f"{group}={option}") or ()
    for required in (needed,) if isinstance(needed, str) else needed:
        with pytest.raises(MissingMandatoryValue, match=rf"full_key: {required}"):
            OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        OmegaConf.update(cfg, required, str(tmp_path))
        if required == "data.path":  # the source shape comes from the set's manifest
            (tmp_path / "manifest.json").write_text(json.dumps(
                {"format": FORMAT, "data": {"channels": 1, "resolution": 32, "num_classes": 10}}))
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert container["run_dir"] == str(tmp_path)
    if group not in ("experiment", "callbacks", "logger", "trainer", "sweep"):
        assert container[group] is not None


@pytest.mark.parametrize("option", sorted(f.stem for f in (Path(CONFIG_DIR) / "model").glob("*.yaml")))
def test_every_model_preset_builds(option, tmp_path):
    """Presets are built on the meta device: every constructor argument is checked, no memory is used. The
    diffusers wrappers, which load weights, are built from a tiny config instead."""
    cfg = compose_train([f"model={option}"], tmp_path)
    dims = {"input_size": 32, "in_channels": 1, "cond_dim": 256}
    if option.startswith("diffusers_"):
        tiny = (dict(sample_size=32, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64),
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                     attention_head_dim=8, norm_num_groups=8) if option == "diffusers_unet"
                else dict(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=2, num_layers=1,
                          sample_size=32, caption_channels=16, cross_attention_dim=16))
        OmegaConf.update(cfg, "model.name_or_path", None)
        OmegaConf.update(cfg, "model.config", tiny, force_add=True)
        dims.update(cond_dim=0, context_dim=16)
    with torch.device("meta"):
        net = instantiate(cfg.model, **dims, _convert_="all")
    assert sum(p.numel() for p in net.parameters()) > 0


def test_dit_ladder_sizes(tmp_path):
    widths = {}
    for size, expected in {"s": (384, 12), "b": (768, 12), "l": (1024, 24), "xl": (1152, 28)}.items():
        cfg = compose_train([f"model=dit_{size}4"], tmp_path)
        with torch.device("meta"):
            net = instantiate(cfg.model, input_size=32, in_channels=1, _convert_="all")
        widths[size] = (net.pos_embed.shape[-1], len(net.blocks))
        assert widths[size] == expected


def test_cli_overrides_reach_the_parts(tmp_path):
    cfg = compose_train(["model=dit_b2", "trainer.max_steps=2000", "data.batch_size=64", "optim.lr=2e-4"], tmp_path)
    assert (cfg.model.size, cfg.model.patch_size) == ("B", 2)
    assert cfg.trainer.max_steps == 2000 and cfg.data.batch_size == 64 and cfg.optim.lr == 2e-4
    module = build_module(compose_train(["model=unet_tiny", "optim.lr=3e-3"], tmp_path))
    (opt,) = [module.optimizer_factory(module.trainable_parameters())]
    assert opt.param_groups[0]["lr"] == 3e-3


@pytest.mark.parametrize("model", ["unet_tiny", "dit_tiny", "mmdit_tiny"])
@pytest.mark.parametrize("conditioning", ["class", "none"])
def test_one_training_step_per_backbone_and_conditioning(model, conditioning, tiny_cfg, tmp_path):
    cfg = tiny_cfg(f"model={model}", f"conditioning={conditioning}", "trainer.max_steps=1",
                   "trainer.val_check_interval=1", "trainer.limit_val_batches=1")
    trainer = train(cfg, tmp_path / "run")
    assert trainer.global_step == 1
    before = build_module(cfg).state_dict()
    after = trainer.lightning_module.state_dict()
    changed = [k for k in before if before[k].dtype.is_floating_point and not torch.equal(before[k], after[k])]
    assert changed, "one optimizer step must change the weights"
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffusion_train.train", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_unknown_group_option_lists_the_valid_choices(tmp_path):
    out = _cli("model=dit_huge", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert out.returncode != 0
    assert "Could not find 'model/dit_huge'" in out.stderr
    assert "dit_b2" in out.stderr and "unet_small" in out.stderr  # the valid choices are listed


def test_unknown_key_is_named(tmp_path):
    out = _cli("optim.lrr=1", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert out.returncode != 0
    assert "lrr" in out.stderr and "optim" in out.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_config_and_data_errors_are_one_line(tmp_path):
    out = _cli("data=image_folder", "logger=csv", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == ("error: missing mandatory value data.root: give it on the "
                                                   "command line, e.g. data.root=...")
    assert "Traceback" not in out.stderr
    out = _cli("data=image_folder", f"data.root={tmp_path / 'nope'}", "logger=csv", f"hydra.run.dir={tmp_path}",
               cwd=tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"{tmp_path / 'nope'}" in out.stderr.splitlines()[-1] and "(config: data)" in out.stderr


@pytest.mark.parametrize("override, message", [
    ("training.activation_checkpointing=abc",
     "training.activation_checkpointing must be true, false or a number of blocks, got 'abc'"),
    ("training.activation_checkpointing=9", "training.activation_checkpointing=9: the backbone has 7 repeated blocks"),
    ("callbacks.throughput.peak_tflops=-1", "callbacks.throughput.peak_tflops must be positive (TFLOP/s), got -1"),
    ("callbacks.kernel_profile.steps=-2", "callbacks.kernel_profile: steps and start must be >= 0"),
    ("+callbacks.ema.decay=0.9", "unexpected keyword argument 'decay' (config: callbacks.ema)"),  # was a traceback
])
def test_speed_and_profiling_options_are_checked_before_training(override, message, tiny_cfg, tmp_path):
    from diffusion_train.cli import one_line_error

    with pytest.raises(Exception) as e:
        train(tiny_cfg(override), tmp_path / "run")
    assert message in one_line_error(e.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


DIFFUSIONS = sorted(f.stem for f in (Path(CONFIG_DIR) / "diffusion").glob("*.yaml"))
SAMPLERS = sorted(f.stem for f in (Path(CONFIG_DIR) / "sampler").glob("*.yaml"))


@pytest.mark.parametrize("diffusion", DIFFUSIONS)
def test_one_training_step_per_objective(diffusion, tiny_cfg, tmp_path):
    cfg = tiny_cfg(f"diffusion={diffusion}", "trainer.max_steps=1", "trainer.limit_val_batches=1",
                   "trainer.val_check_interval=1")
    trainer = train(cfg, tmp_path / "run")
    assert trainer.global_step == 1
    assert torch.isfinite(torch.tensor(trainer.callback_metrics["val/loss"].item()))
    assert (tmp_path / "run/samples/step_0000001.png").is_file()  # the final grid, sampled with DDIM


@pytest.mark.parametrize("diffusion", DIFFUSIONS)
def test_every_sampler_preset_samples_every_objective(diffusion, tmp_path):
    """Predictions are converted, so every sampler runs on every trained objective (a random-init
    model here); the two that need a particular schedule refuse the others with a clear error."""
    module = build_module(compose_train([f"diffusion={diffusion}", "model=dit_tiny", "data=synthetic"], tmp_path))
    labels = torch.arange(4)
    for name in SAMPLERS:
        sampler = instantiate(compose_train([f"sampler={name}", f"diffusion={diffusion}"], tmp_path).sampler,
                              _convert_="all")
        sampler.steps = 3
        noise = torch.randn(4, 3, 16, 16)
        flow = diffusion == "flow"
        if name == "flow_heun" and not flow:
            with pytest.raises(ValueError, match="flow"):
                module.sample(noise, {"label": labels}, sampler, guidance_scale=2.0)
            continue
        if name == "heun" and flow:  # from t = 1 (alpha = 0) Heun in sigma/alpha is undefined
            sampler.spacing = "linspace"
            with pytest.raises(ValueError, match="flow_heun"):
                module.sample(noise, {"label": labels}, sampler, guidance_scale=2.0)
            sampler.spacing = "karras"  # starts just below t = 1: fine
        images = module.sample(noise, {"label": labels}, sampler, guidance_scale=2.0, guidance_rescale=0.5)
        assert images.shape == (4, 3, 16, 16) and torch.isfinite(images).all(), name
