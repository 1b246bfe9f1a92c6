"""Compute accounting in training runs: summary.json, images and FLOPs logged, resume, config hash."""

from __future__ import annotations

import csv
import json

import pytest

from diffusion_train.scaling.flops import forward_macs
from diffusion_train.train import train
from diffusion_train.training.summary import FORMAT, config_hash


def _summary(run) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.mark.parametrize("model", ["unet_tiny", "dit_tiny"])
def test_a_run_accounts_its_flops_and_indexes_evaluations_by_them(tiny_cfg, tmp_path, model):
    run = tmp_path / "run"
    trainer = train(tiny_cfg(f"model={model}", "trainer.max_steps=4", "scaling.budget=1e9", "scaling.size=XS"), run)
    s = _summary(run)
    backbone = trainer.lightning_module.backbone
    assert s["format"] == FORMAT and s["finished"] and s["steps"] == 4
    assert s["model"] == type(backbone).__name__
    assert s["params"] == sum(p.numel() for p in backbone.parameters())
    assert s["forward_macs_per_image"] == forward_macs(backbone)
    assert s["flops_per_image"] == 6 * s["forward_macs_per_image"]
    batch = trainer.datamodule.batch_size
    assert s["global_batch"] == batch and s["images_seen"] == 4 * batch
    assert s["total_flops"] == pytest.approx(s["images_seen"] * s["flops_per_image"])
    assert s["scaling"] == {"budget": 1e9, "size": "XS", "family": None}
    val = s["metrics"]["val/loss"]
    assert [h["step"] for h in val["history"]] == [2, 4]  # val_check_interval=2
    assert all(h["flops"] == pytest.approx(h["images"] * s["flops_per_image"]) for h in val["history"])
    assert val["final"] == val["history"][-1]["value"] and val["best"] == min(h["value"] for h in val["history"])
    assert s["wall_time_s"] > 0 and s["device"] == "cpu" and s["world_size"] == 1

    with open(run / "metrics.csv", newline="") as f:  # any metric can be plotted against them
        rows = [r for r in csv.DictReader(f) if r.get("perf/train_flops")]
    assert rows and all(float(r["perf/train_flops"]) == pytest.approx(float(r["perf/images_seen"]) * s["flops_per_image"])
                        for r in rows)


def test_a_resumed_run_continues_its_summary(tiny_cfg, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg("trainer.max_steps=4", "trainer.val_check_interval=2"), run)
    first = _summary(run)
    train(tiny_cfg("trainer.max_steps=8", "trainer.val_check_interval=2"), run)
    s = _summary(run)
    steps = [h["step"] for h in s["metrics"]["val/loss"]["history"]]
    assert steps == [2, 4, 6, 8]
    assert s["metrics"]["val/loss"]["history"][:1] == first["metrics"]["val/loss"]["history"][:1]
    assert s["wall_time_s"] > first["wall_time_s"] and s["steps"] == 8


def test_the_config_hash_ignores_names_and_paths_but_not_training_settings(tiny_cfg, tmp_path):
    from diffusion_train.training.run_dir import resolved

    a = resolved(tiny_cfg("run_name=a", run_dir=tmp_path / "a"))
    b = resolved(tiny_cfg("run_name=b", run_dir=tmp_path / "b"))
    c = resolved(tiny_cfg("optim.lr=1e-3", run_dir=tmp_path / "a"))
    assert config_hash(a) == config_hash(b) != config_hash(c)
    assert len(config_hash(a)) == 12
