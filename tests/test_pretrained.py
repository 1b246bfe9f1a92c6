"""Starting from pretrained weights (training/pretrained.py): tiny random "pretrained" models are saved
locally (checkpoints, exported safetensors, bare backbones) and loaded through the real loading code."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from conftest import DIT, compose_train, module_of, params, randomised
from diffusion_train.train import train
from diffusion_train.training.build import build_module
from diffusion_train.training.export import export_weights
from diffusion_train.training.pretrained import load_pretrained


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
    (tmp_path / "last.ckpt").rename(tmp_path / "run" / "checkpoints" / "step_0000004.ckpt")
    report = load_pretrained(target, tmp_path / "run", "raw")  # a run saved without last.ckpt: its latest step
    assert report.source.endswith("step_0000004.ckpt")
    torch.testing.assert_close(params(target), params(source))
    (tmp_path / "run" / "checkpoints" / "step_0000004.ckpt").rename(tmp_path / "run" / "checkpoints" / "last.ckpt")
    report = load_pretrained(target, tmp_path / "run", "raw")
    assert report.source.endswith("last.ckpt")

    load_pretrained(target, tmp_path / "run" / "weights" / "ema_0.9999.safetensors")
    torch.testing.assert_close(params(target), {n: p + 2 for n, p in params(source).items()})

    # "ema" of exported files alone: the sampling average that the export's config names (not the last by name)
    config = {"callbacks": {"ema": {"sample_decay": 0.999}}}
    export_weights(state, ema, tmp_path / "exported" / "weights", {"config": config})
    report = load_pretrained(target, tmp_path / "exported", "ema")
    assert report.source.endswith("ema_0.999.safetensors")
    torch.testing.assert_close(params(target), {n: p + 1 for n, p in params(source).items()})


def test_exports_are_readable_as_the_umask_allows(tiny_cfg, tmp_path):
    """safetensors creates files owner-only; exported weights (and every other safetensors file the package writes,
    through the same function) get the permissions of the umask, as checkpoints do, so a team can read them."""
    import os
    import stat

    state, ema = fake_checkpoint(module_of(tiny_cfg), tmp_path / "last.ckpt")
    old = os.umask(0o022)
    try:
        written = export_weights(state, ema, tmp_path / "weights")
    finally:
        os.umask(old)
    assert written and all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in written), written
    assert not list((tmp_path / "weights").glob(".*"))  # no temporary file left


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


def test_errors_name_the_tensors_as_the_file_names_them(tiny_cfg, tmp_path):
    """A bare backbone's keys are read under backbone. (and a LoRA model's as base_layer): the errors still give the
    file's own names, so the user can find them in it."""
    from safetensors.torch import save_file

    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match=r"\(file: model\.diffusion_model\.input_blocks\.0\.0\.weight, model: "):
        load_pretrained(module_of(tiny_cfg), tmp_path / "foreign.safetensors")
    wide = module_of(tiny_cfg, "model.hidden_size=96").backbone.state_dict()
    save_file({k: v.contiguous() for k, v in wide.items()}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(ValueError, match=r"first: x_embedder\.weight \(96, 3, 4, 4\) in the file, \(32, 3, 4, 4\) in "
                                         r"the model \(backbone\.x_embedder\.weight\)"):
        load_pretrained(module_of(tiny_cfg), tmp_path / "wide.safetensors")


def test_a_file_that_is_not_safetensors_is_one_line_naming_the_setting(tiny_cfg, tmp_path):
    """init.path, diffusion-sample's lora= and a TinyVAE's weights each gave safetensors' own traceback (header too
    large), which names no file."""
    from diffusion_train.conditioning.autoencoder import load_tiny_vae_net
    from diffusion_train.finetune.lora import apply_lora_file

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 64)
    module = module_of(tiny_cfg)
    for call, option in ((lambda: load_pretrained(module, bad), "init.path"),
                         (lambda: apply_lora_file(module, bad), "lora"),
                         (lambda: load_tiny_vae_net(bad), "autoencoder.weights")):
        with pytest.raises(ValueError, match=rf"^{option}={bad}: not a readable safetensors file \(\w+: .+\)$"):
            call()


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
    with pytest.raises(ValueError, match="has EMA averages"):
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


def test_a_start_from_weights_of_another_objective_is_warned_of(tiny_cfg, tmp_path, caplog):
    """The weights load the same whatever objective trained them: a v-prediction base fine-tuned as eps is named in
    a warning (the change may be meant), from its checkpoint or its exported weights (whose metadata record the
    config); the same objective gives none, and run.json records the change."""
    import logging

    from omegaconf import OmegaConf

    base = tmp_path / "base"
    train(tiny_cfg("diffusion=ddpm_linear_v", "trainer.max_steps=2", run_dir=base), base)
    v, eps = (OmegaConf.to_container(compose_train([f"diffusion={d}"]).diffusion, resolve=True)
              for d in ("ddpm_linear_v", "ddpm_linear"))
    for source in (base, base / "weights" / "raw.safetensors"):
        assert load_pretrained(build_module(tiny_cfg()), source, "raw", diffusion=v).objective_change is None
        change = load_pretrained(build_module(tiny_cfg()), source, "raw", diffusion=eps).objective_change
        assert change == "prediction v -> eps"
    assert load_pretrained(build_module(tiny_cfg()), base, "raw").objective_change is None  # nothing to compare with
    with caplog.at_level(logging.WARNING, logger="diffusion_train"):
        train(tiny_cfg(f"init.path={base}", "diffusion=ddpm_linear", "trainer.max_steps=2", run_dir=tmp_path / "eps"),
              tmp_path / "eps")
    assert "was trained with another diffusion objective (prediction v -> eps)" in caplog.text
    assert json.loads((tmp_path / "eps" / "run.json").read_text())["init"]["objective_change"] == "prediction v -> eps"


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
