"""Training end to end: overfitting, exact resume, refusals, non-finite steps, the CLI and its artifacts."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import module_of
from diffusion_train.diffusion import GaussianDiffusion
from diffusion_train.train import train
from diffusion_train.training import NonFiniteLossError
from diffusion_train.training.build import build_module, load_module
from diffusion_train.training.checkpointing import load_checkpoint
from diffusion_train.training.run_dir import ResumeMismatchError


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fp16_with_a_gradient_scaler_is_refused(tiny_cfg):
    """A gradient scaler's step would set the fused optimizer's grad_scale and found_inf, replacing the step's own
    clipping and non-finite skip: the fit refuses it at its start, naming the setting."""
    from types import SimpleNamespace

    module = build_module(tiny_cfg("model=dit_tiny"))
    module._trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=torch.amp.GradScaler("cpu")),
                                      precision="16-mixed")
    with pytest.raises(ValueError, match="trainer.precision=16-mixed: fp16 with a gradient scaler is not supported"):
        module.on_fit_start()
    module._trainer = SimpleNamespace(precision_plugin=SimpleNamespace(), precision="bf16-mixed")
    module.on_fit_start()


@pytest.mark.parametrize("setting,expected", [
    ("data.batch_size=0", "data.batch_size=0: give a whole number >= 1"),
    ("data.batch_size=-1", "data.batch_size=-1: give a whole number >= 1"),
    ("+data.val_batch_size=0", "data.val_batch_size=0: give a whole number >= 1"),
    ("optim.lr=abc", "optim.lr=abc: give a number >= 0"),
    ("trainer.max_steps=2.5", "trainer.max_steps=2.5: give a whole number >= 1"),
    ("data.batch_size=2.0", "data.batch_size=2.0: give a whole number >= 1"),
    ("optim.lr=nan", "optim.lr=nan: give a number >= 0"),
    ("seed=abc", "seed=abc: give a whole number >= 0"),
])
def test_a_bad_number_is_refused_naming_the_key(setting, expected, tiny_cfg, tmp_path):
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        train(tiny_cfg(setting, run_dir=tmp_path / "run"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_loss_falls_when_overfitting_a_tiny_batch(tiny_cfg):
    torch.manual_seed(0)
    module = build_module(tiny_cfg("model=dit_tiny", "optim.lr=3e-3"))
    opt = module.optimizer_factory(module.trainable_parameters())
    from diffusion_train.data.synthetic import make_synthetic

    images, labels = make_synthetic(8, 4, 3, 16, seed=0)
    batch = {"image": images.float() / 127.5 - 1, "label": labels}
    g = torch.Generator()
    t, noise = torch.linspace(50, 950, 8).long(), torch.randn(8, 3, 16, 16, generator=g.manual_seed(1))
    losses = []
    for _ in range(150):
        loss = module.objective.loss(module.backbone, batch["image"], module.conditioner(batch), t=t, noise=noise).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses[::15]


def _compare_checkpoints(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    for decay in a["ema"]["weights"]:
        for k, v in a["ema"]["weights"][decay].items():
            assert torch.equal(v, b["ema"]["weights"][decay][k]), (decay, k)
    assert a["ema"]["num_updates"] == b["ema"]["num_updates"]
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for i in sa:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa[i][key], sb[i][key]), (i, key)
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_metrics_are_logged_by_optimizer_step_across_a_resume(accumulate, tiny_cfg, tmp_path):
    """metrics.csv's step is the optimizer step (as in checkpoints and summary.json), and logging and validation
    intervals count optimizer steps, with gradient accumulation too; a resumed run continues the file with no
    gap and no repeated step."""
    import csv

    common = [f"training.accumulate_grad_batches={accumulate}", "trainer.log_every_n_steps=1",
              "trainer.val_check_interval=2"]
    run = tmp_path / "run"
    for steps in (4, 8):
        train(tiny_cfg(*common, f"trainer.max_steps={steps}", run_dir=run), run)
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["step"]) for r in rows if r.get("train/loss")] == list(range(1, 9))
    assert [int(r["step"]) for r in rows if r.get("perf/images_seen")] == list(range(1, 9))
    assert [int(r["step"]) for r in rows if r.get("val/loss")] == [2, 4, 6, 8]


def test_a_run_ends_with_a_validation_and_its_training_values(tiny_cfg, tmp_path):
    """max_steps=5 with validation every 2 and logging every 3 steps: the last step is validated and logged too
    (its val/loss is the run's final one, e.g. for an IsoFLOP fit)."""
    import csv

    run = tmp_path / "run"
    train(tiny_cfg("trainer.max_steps=5", "trainer.log_every_n_steps=3", run_dir=run), run)
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["step"]) for r in rows if r.get("val/loss")] == [2, 4, 5]
    assert [int(r["step"]) for r in rows if r.get("train/loss")] == [3, 5]


@pytest.mark.parametrize("accumulate", [1, 3])
def test_logged_training_values_are_those_of_their_step(accumulate, tiny_cfg, tmp_path):
    """Training values are logged only at the batches whose logs Lightning writes: every
    ``log_every_n_steps``-th step, and the step at which a callback stops the fit (here 7). Each row holds the
    loss of its own step (the mean of its micro-batches') and the learning rate the step was taken with."""
    import csv

    from conftest import LossRecorder

    LossRecorder.losses.clear()
    LossRecorder.lrs.clear()
    run = tmp_path / "run"
    train(tiny_cfg("trainer.log_every_n_steps=3", "trainer.max_steps=20",
                   "+callbacks.recorder._target_=conftest.LossRecorder", "+callbacks.recorder.stop_at=7",
                   "callbacks.throughput.peak_tflops=1e-6", f"training.accumulate_grad_batches={accumulate}",
                   "lr_schedule.warmup_steps=10", run_dir=run), run)
    rows = [r for r in csv.DictReader(open(run / "metrics.csv")) if r.get("train/loss")]
    assert [int(r["step"]) for r in rows] == [3, 6, 7]
    for r in rows:
        step = int(r["step"])
        assert float(r["train/loss"]) == pytest.approx(LossRecorder.losses[step], rel=1e-6)
        assert float(r["train/lr"]) == pytest.approx(LossRecorder.lrs[step], rel=1e-6)
        assert float(r["train/lr"]) == pytest.approx(step * LossRecorder.lrs[1], rel=1e-6)  # warm-up: lr step / 10
        assert r["train/grad_norm"] and float(r["train/nonfinite_steps"]) == 0
    # throughput at the logging interval: model FLOP/s per device from the run's FLOPs accounting, MFU against a
    # given peak (1 MFLOP/s here)
    flops_per_image = json.loads((run / "summary.json").read_text())["flops_per_image"]
    perf = [r for r in csv.DictReader(open(run / "metrics.csv")) if r.get("perf/images_per_sec")]
    assert [int(r["step"]) for r in perf][:2] == [3, 6]  # (the stop at 7 writes the step-6 values again)
    for r in perf:
        tflops = float(r["perf/images_per_sec"]) * flops_per_image / 1e12
        assert float(r["perf/tflops_per_device"]) == pytest.approx(tflops, rel=1e-5)
        assert float(r["perf/mfu"]) == pytest.approx(tflops / 1e-6, rel=1e-5)


@pytest.mark.parametrize("model", ["unet_tiny", "dit_tiny", "unet_tiny model.dropout=0.1"])
def test_resume_is_exact(model, tiny_cfg, tmp_path):
    """N steps + resume + N steps == 2N steps straight: weights, EMA, optimizer, schedule, step; with dropout too
    (its generators are seeded for each micro-batch, not restored from the checkpoint)."""
    common = [f"model={model.split()[0]}", *model.split()[1:], "lr_schedule=cosine", "lr_schedule.warmup_steps=2",
              "lr_schedule.total_steps=8"]
    straight = tiny_cfg(*common, "trainer.max_steps=8", run_dir=tmp_path / "straight")
    train(straight, tmp_path / "straight")

    first = tiny_cfg(*common, "trainer.max_steps=4", run_dir=tmp_path / "resumed")
    train(first, tmp_path / "resumed")
    assert load_checkpoint(tmp_path / "resumed/checkpoints/last.ckpt")["global_step"] == 4
    second = tiny_cfg(*common, "trainer.max_steps=8", run_dir=tmp_path / "resumed")
    train(second, tmp_path / "resumed")

    _compare_checkpoints(load_checkpoint(tmp_path / "straight/checkpoints/last.ckpt"),
                         load_checkpoint(tmp_path / "resumed/checkpoints/last.ckpt"))
    csv = (tmp_path / "resumed/metrics.csv").read_text().splitlines()
    steps = [int(r.split(",")[csv[0].split(",").index("step")]) for r in csv[1:]]
    train_rows = [s for s, r in zip(steps, csv[1:]) if r.split(",")[csv[0].split(",").index("train/loss")]]
    assert sorted(train_rows) == sorted(set(train_rows)), "a resumed run must not log a step twice"


def test_a_resume_with_accumulation_saves_nothing_in_the_middle_of_its_first_step(tiny_cfg, tmp_path, monkeypatch):
    """Resumed at a checkpoint step with 2 micro-batches per step: the end of the first micro-batch is not the end of
    the step, so no checkpoint is written there (it would hold half a step and resume wrongly). Step 4, both a
    periodic checkpoint and a step_checkpoints one, is written once."""
    from diffusion_train.training import checkpointing

    written, save = [], checkpointing.atomic_torch_save
    monkeypatch.setattr(checkpointing, "atomic_torch_save", lambda obj, path: (written.append(Path(path).name),
                                                                               save(obj, path)))
    common = ["training.accumulate_grad_batches=2", "callbacks.checkpoint.every_n_train_steps=2",
              "callbacks.step_checkpoints.steps=[4]", "trainer.val_check_interval=50"]
    run = tmp_path / "run"
    train(tiny_cfg(*common, "trainer.max_steps=4", run_dir=run), run)
    saved = {p.name: _digest(p) for p in (run / "checkpoints").glob("*.ckpt")}
    assert sorted(saved) == ["last.ckpt", "step_0000002.ckpt", "step_0000004.ckpt"]
    assert sorted(written) == ["last.ckpt", "last.ckpt", "step_0000002.ckpt", "step_0000004.ckpt"], written
    train(tiny_cfg(*common, "trainer.max_steps=6", run_dir=run), run)
    assert _digest(run / "checkpoints/step_0000004.ckpt") == saved["step_0000004.ckpt"]
    train(tiny_cfg(*common, "trainer.max_steps=6", run_dir=tmp_path / "straight"), tmp_path / "straight")
    _compare_checkpoints(load_checkpoint(tmp_path / "straight/checkpoints/last.ckpt"),
                         load_checkpoint(run / "checkpoints/last.ckpt"))


def test_a_resume_takes_the_new_configs_rates_and_schedule(tiny_cfg, tmp_path, caplog):
    """4 steps of a cosine schedule at lr 4e-4, relaunched with max_steps=8, optim.lr=1e-3 and weight decay 0.05:
    steps 5-8 take the learning rates of an 8-step cosine at 1e-3, as a run with that config from the start, and
    the new weight decay; the moments and the step count are the checkpoint's."""
    from conftest import LossRecorder

    cosine = ["lr_schedule=cosine", "lr_schedule.warmup_steps=1", "+callbacks.recorder._target_=conftest.LossRecorder"]
    new = ["trainer.max_steps=8", "optim.lr=1e-3", "optim.weight_decay=0.05"]
    LossRecorder.lrs.clear()
    train(tiny_cfg(*cosine, *new, run_dir=tmp_path / "new"), tmp_path / "new")
    want = dict(LossRecorder.lrs)
    LossRecorder.lrs.clear()
    run = tmp_path / "run"
    train(tiny_cfg(*cosine, "trainer.max_steps=4", "optim.lr=4e-4", run_dir=run), run)
    assert LossRecorder.lrs[4] != pytest.approx(want[4])
    with caplog.at_level(logging.INFO, logger="diffusion_train"):
        train(tiny_cfg(*cosine, *new, run_dir=run), run)
    assert f"resumed at step 4: learning rate {4e-4 * 0.1:.4g} (checkpoint) -> {want[5]:.4g}" in caplog.text
    assert [LossRecorder.lrs[n] for n in range(5, 9)] == pytest.approx([want[n] for n in range(5, 9)], rel=1e-6)
    ckpt = load_checkpoint(run / "checkpoints/last.ckpt")
    group = ckpt["optimizer_states"][0]["param_groups"][0]
    assert group["weight_decay"] == 0.05 and group["initial_lr"] == pytest.approx(1e-3)
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 8


def test_a_cool_down_branched_from_a_longer_wsd_run_equals_the_short_run_trained_straight(tiny_cfg, tmp_path,
                                                                                           caplog):
    """A 10-step WSD run decaying over its last 4 steps, trained straight, against a 40-step WSD run whose step-6
    checkpoint (still in its stable phase; a step_checkpoints step) a new run branches from with the short run's
    schedule: the same weights, EMA, optimizer and schedule at step 10. The branch keeps its own checkpoints and
    records where it came from."""
    wsd = ["lr_schedule=wsd", "lr_schedule.warmup_steps=2", "callbacks.checkpoint.every_n_train_steps=4",
           "trainer.val_check_interval=50"]
    short = [*wsd, "trainer.max_steps=10", "lr_schedule.decay_steps=4"]
    train(tiny_cfg(*short, run_dir=tmp_path / "straight"), tmp_path / "straight")

    trunk = tmp_path / "trunk"
    train(tiny_cfg(*wsd, "trainer.max_steps=7", "lr_schedule.total_steps=40", "callbacks.step_checkpoints.steps=[6]",
                   run_dir=trunk), trunk)
    assert sorted(p.name for p in (trunk / "checkpoints").iterdir()) == ["last.ckpt", "step_0000004.ckpt",
                                                                        "step_0000006.ckpt"]
    branch = tmp_path / "branch"
    with caplog.at_level(logging.INFO, logger="diffusion_train"):
        train(tiny_cfg(*short, f"init.branch_from={trunk}/checkpoints/step_0000006.ckpt", run_dir=branch), branch)
    assert f"branching from {trunk}/checkpoints/step_0000006.ckpt" in caplog.text
    # the checkpoint holds the rate of the trunk's next step; the branch's decay starts there (1 - sqrt(1/4))
    assert "resumed at step 6: learning rate 0.0004 (checkpoint) -> 0.0002 (this config's schedule)" in caplog.text
    _compare_checkpoints(load_checkpoint(tmp_path / "straight/checkpoints/last.ckpt"),
                         load_checkpoint(branch / "checkpoints/last.ckpt"))
    want = {"checkpoint": f"{trunk}/checkpoints/step_0000006.ckpt", "step": 6}
    assert json.loads((branch / "run.json").read_text())["branched_from"] == want
    assert load_checkpoint(branch / "checkpoints/last.ckpt")["diffusion_train"]["branched_from"] == want
    assert sorted(p.name for p in (branch / "checkpoints").iterdir()) == ["last.ckpt", "step_0000008.ckpt"]
    assert load_checkpoint(trunk / "checkpoints/last.ckpt")["global_step"] == 7  # the trunk is left as it was

    # A relaunch resumes the branch's own checkpoint, not the trunk's; the lineage stays in its files
    train(tiny_cfg(*short[:-2], "trainer.max_steps=12", "lr_schedule.total_steps=10", "lr_schedule.decay_steps=4",
                   f"init.branch_from={trunk}", run_dir=branch), branch)
    assert load_checkpoint(branch / "checkpoints/last.ckpt")["global_step"] == 12
    assert json.loads((branch / "run.json").read_text())["branched_from"] == want

    with pytest.raises(ValueError, match="at step 7, and trainer.max_steps=7 leaves nothing to train"):
        train(tiny_cfg(*short[:-2], "trainer.max_steps=7", f"init.branch_from={trunk}", run_dir=tmp_path / "b2"),
              tmp_path / "b2")
    with pytest.raises(ValueError, match="give one of them"):
        train(tiny_cfg(*short, f"init.branch_from={trunk}", f"init.path={trunk}", run_dir=tmp_path / "b3"),
              tmp_path / "b3")
    with pytest.raises(FileNotFoundError, match=f"init.branch_from={tmp_path}/none: no such checkpoint"):
        train(tiny_cfg(*short, f"init.branch_from={tmp_path}/none", run_dir=tmp_path / "b4"), tmp_path / "b4")
    with pytest.raises(ResumeMismatchError, match="refusing to branch from .*model.model_channels: checkpoint has 8"):
        train(tiny_cfg(*short, f"init.branch_from={trunk}", "model.model_channels=16", run_dir=tmp_path / "b5"),
              tmp_path / "b5")
    assert not (tmp_path / "b2").exists() and not (tmp_path / "b5").exists()


def test_a_signal_at_a_checkpoint_step_keeps_its_periodic_checkpoint(tiny_cfg, tmp_path, monkeypatch):
    """SIGUSR1 during step 2, a step with a periodic checkpoint: the run stops there with last.ckpt and
    step_0000002.ckpt, and the relaunch ends as an uninterrupted run, with the same files."""
    from diffusion_train.training.preemption import find_preemption

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    straight, run = tmp_path / "straight", tmp_path / "run"
    train(tiny_cfg(run_dir=straight), straight)
    signal = ["+callbacks.signal._target_=conftest.signal_at_step", "+callbacks.signal.step=2"]
    trainer = train(tiny_cfg(*signal, run_dir=run), run)
    assert find_preemption(trainer).stopped_by == "SIGUSR1" and trainer.global_step == 2

    def files(r):
        return sorted(p.name for p in (r / "checkpoints").glob("*.ckpt"))

    assert files(run) == ["last.ckpt", "step_0000002.ckpt"]
    train(tiny_cfg(run_dir=run), run)
    assert files(run) == files(straight) == ["last.ckpt", "step_0000002.ckpt", "step_0000004.ckpt"]
    _compare_checkpoints(load_checkpoint(straight / "checkpoints/last.ckpt"),
                         load_checkpoint(run / "checkpoints/last.ckpt"))


def test_a_checkpoint_from_before_a_new_null_option_resumes(tiny_cfg, tmp_path):
    """A model option added later with a null default (the behaviour before it) does not block resuming a
    checkpoint whose config lacks it; a real value the checkpoint lacks still does."""
    from diffusion_train.training.run_dir import check_resumable, resolved

    run = tmp_path / "run"
    train(tiny_cfg("trainer.max_steps=2", run_dir=run), run)
    ckpt = run / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    del state["diffusion_train"]["config"]["model"]["num_head_channels"]  # as written before the option existed
    torch.save(state, ckpt)
    config = resolved(tiny_cfg("trainer.max_steps=4", run_dir=run))
    assert check_resumable(run, config)[:3] == (ckpt, 2, 16)  # the checkpoint, its step and its global batch
    config["model"]["num_head_channels"] = 4
    with pytest.raises(ResumeMismatchError, match=r"model.num_head_channels: checkpoint has None, config has 4"):
        check_resumable(run, config)


def test_resume_of_another_model_is_refused_and_nothing_changes(tiny_cfg, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg("trainer.max_steps=2", run_dir=run), run)
    before = {p: _digest(p) for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ResumeMismatchError, match=r"model.model_channels: checkpoint has 8, config has 16"):
        train(tiny_cfg("trainer.max_steps=4", "model.model_channels=16", run_dir=run), run)
    assert {p: _digest(p) for p in run.rglob("*") if p.is_file()} == before


def test_resume_with_another_global_batch_is_refused_and_the_same_one_on_other_terms_resumes(tiny_cfg, tmp_path):
    """The data position and the images seen count the checkpoint's batches: another global batch is refused and
    nothing changes; the same one made of half the batch accumulated twice resumes."""
    run = tmp_path / "run"
    train(tiny_cfg("trainer.max_steps=2", "data.batch_size=8", run_dir=run), run)
    before = {p: _digest(p) for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ResumeMismatchError, match=r"global batch of 8, this launch has 16 \(16 per device x 1 dev"):
        train(tiny_cfg("trainer.max_steps=4", "data.batch_size=16", run_dir=run), run)
    assert {p: _digest(p) for p in run.rglob("*") if p.is_file()} == before
    train(tiny_cfg("trainer.max_steps=4", "data.batch_size=4", "training.accumulate_grad_batches=2", run_dir=run),
          run)
    assert load_checkpoint(run / "checkpoints/last.ckpt")["global_step"] == 4


def test_no_weight_decay_spares_the_parameters_it_names(tiny_cfg):
    """With zero gradients AdamW only decays: the parameters of 1 dimension and those the pattern names keep
    their values, every other one shrinks by lr x weight_decay."""
    module = module_of(tiny_cfg, "optim.weight_decay=0.5", "optim.lr=0.1", "optim.fused=false",
                       "training.no_weight_decay=[1d,'*label*']")
    opt = module.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    for p in module.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    spared = {n for n, p in module.named_parameters() if p.requires_grad and (p.ndim < 2 or "label" in n)}
    assert "conditioner.embedders.label.embedding.weight" in spared and any(n.endswith(".bias") for n in spared)
    for n, p in module.named_parameters():
        if n in before:
            expected = before[n] if n in spared else before[n] * (1 - 0.1 * 0.5)
            torch.testing.assert_close(p.detach(), expected, msg=n)
    with pytest.raises(ValueError, match=r"training.no_weight_decay: \['\*pos_embed\*'\] match no trainable param"):
        module_of(tiny_cfg, "training.no_weight_decay=['*pos_embed*']").configure_optimizers()


def test_resume_with_other_parameter_groups_is_refused_before_anything_is_written(tiny_cfg, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg("trainer.max_steps=2", run_dir=run), run)
    before = {p: _digest(p) for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ResumeMismatchError, match=r"parameter groups of \[\d+\] tensors, this config makes \[\d+, "
                                                  r"\d+\] \(training.no_weight_decay=\['1d'\]\)"):
        train(tiny_cfg("trainer.max_steps=4", "training.no_weight_decay=[1d]", run_dir=run), run)
    assert {p: _digest(p) for p in run.rglob("*") if p.is_file()} == before


def test_guided_sample_grids_of_a_model_without_cfg_dropout_are_warned_of(tiny_cfg, tmp_path, caplog):
    for dropout, warned in ((0.0, True), (0.1, False)):
        caplog.clear()
        run = tmp_path / str(dropout)
        with caplog.at_level(logging.WARNING, logger="diffusion_train"):
            train(tiny_cfg("trainer.max_steps=1", f"conditioning.embedders.label.dropout={dropout}",
                           "callbacks.sample_grid.guidance_scale=2", run_dir=run), run)
        assert any("unconditional prediction is never trained" in r.getMessage() for r in caplog.records) == warned


def test_a_schedule_that_is_not_lambda_lr_resumes_with_the_checkpoint_rate(tiny_cfg, tmp_path):
    """ExponentialLR moves the rate itself: a resume keeps the checkpoint's rate (and schedule) rather than the
    config's starting one."""
    from conftest import LossRecorder

    LossRecorder.lrs.clear()
    run = tmp_path / "run"
    schedule = ["lr_schedule._target_=torch.optim.lr_scheduler.ExponentialLR", "~lr_schedule.warmup_steps",
                "+lr_schedule.gamma=0.5", "+callbacks.recorder._target_=conftest.LossRecorder", "optim.lr=1e-3"]
    train(tiny_cfg("trainer.max_steps=2", *schedule, run_dir=run), run)
    train(tiny_cfg("trainer.max_steps=4", *schedule, run_dir=run), run)
    assert [LossRecorder.lrs[step] for step in (1, 2, 3, 4)] == pytest.approx([1e-3, 5e-4, 2.5e-4, 1.25e-4])


def test_a_relaunch_before_the_first_checkpoint_starts_metrics_csv_afresh(tiny_cfg, tmp_path):
    """A launch killed before its first checkpoint leaves rows in metrics.csv; the relaunch starts from step 0
    and logs those steps again, once."""
    import csv
    import shutil

    run = tmp_path / "run"
    train(tiny_cfg("trainer.max_steps=3", run_dir=run), run)
    shutil.rmtree(run / "checkpoints")  # as if killed before any checkpoint was written
    train(tiny_cfg("trainer.max_steps=3", run_dir=run), run)
    assert [int(r["step"]) for r in csv.DictReader(open(run / "metrics.csv")) if r.get("train/loss")] == [1, 2, 3]


class _NaNAfter(GaussianDiffusion):
    """The real objective, whose loss turns NaN on the listed optimizer steps."""

    nan_steps: set = set()
    current_step = 0

    def loss(self, net, x0, cond, generator=None, t=None, noise=None):
        loss = super().loss(net, x0, cond, generator, t, noise)
        return loss * float("nan") if _NaNAfter.current_step in self.nan_steps else loss


@pytest.fixture
def nan_objective(monkeypatch):
    from diffusion_train.training import module as module_mod

    original = module_mod.DiffusionModule.training_step

    def step(self, batch, batch_idx):
        _NaNAfter.current_step = self.global_step
        return original(self, batch, batch_idx)

    monkeypatch.setattr(module_mod.DiffusionModule, "training_step", step)
    return "diffusion._target_=test_train._NaNAfter"


def test_a_non_finite_step_is_skipped_and_counted(tiny_cfg, tmp_path, nan_objective):
    _NaNAfter.nan_steps = {2}
    trainer = train(tiny_cfg(nan_objective, "trainer.max_steps=4"), tmp_path / "run")
    module = trainer.lightning_module
    assert trainer.global_step == 4
    assert int(module.nonfinite_steps) == 1
    assert all(torch.isfinite(p).all() for p in module.parameters())
    header, *rows = (tmp_path / "run/metrics.csv").read_text().splitlines()
    col = header.split(",").index("train/nonfinite_steps")
    assert max(float(r.split(",")[col]) for r in rows if r.split(",")[col]) == 1.0


def test_repeated_non_finite_steps_stop_the_run_with_the_checkpoint_intact(tiny_cfg, tmp_path, nan_objective,
                                                                           monkeypatch):
    import diffusion_train.train as entry

    ends = []  # the exit codes the run's W&B runs are ended with: a failure must not look like a finished run
    monkeypatch.setattr(entry, "finish_wandb", lambda loggers, exit_code=0: ends.append(exit_code))
    run = tmp_path / "run"
    _NaNAfter.nan_steps = set()
    train(tiny_cfg(nan_objective, "trainer.max_steps=2"), run)
    last = run / "checkpoints/last.ckpt"
    digest, weights = _digest(last), load_checkpoint(last)["state_dict"]
    _NaNAfter.nan_steps = set(range(2, 100))
    with pytest.raises(NonFiniteLossError, match="3 optimizer steps in a row"):
        train(tiny_cfg(nan_objective, "trainer.max_steps=50", "training.max_nonfinite_steps=3",
                       "callbacks.checkpoint.every_n_train_steps=1"), run)
    assert ends == [0, 1]
    ckpt = load_checkpoint(last)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert int(ckpt["state_dict"]["nonfinite_steps"]) == ckpt["global_step"] - 2  # every later step was skipped
    for k, v in weights.items():  # skipped steps never touched the weights, whatever was saved since
        assert k == "nonfinite_steps" or torch.equal(v, ckpt["state_dict"][k]), k
    assert _digest(last) == digest or ckpt["global_step"] > 2


def _run_cli(args: list[str], cwd: Path, module: str = "diffusion_train.train") -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=str(Path(__file__).parent))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)


def test_missing_dataset_files_name_the_path_and_the_fix(tmp_path):
    empty = tmp_path / "no_data"
    empty.mkdir()
    out = _run_cli(["experiment=smoke", f"data.root={empty}", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert out.returncode == 1
    line = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and str(empty) in line[0] and "apt-get install dataset-fashion-mnist" in line[0]


@pytest.mark.slow
def test_smoke_cli_leaves_its_artifacts_and_relaunch_resumes(tmp_path):
    run = tmp_path / "smoke"
    out = _run_cli(["experiment=smoke", f"hydra.run.dir={run}"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    config = (run / "config.yaml").read_text()
    assert "${" not in config and "unet_tiny" not in config and "model_channels: 8" in config
    assert (run / "overrides.yaml").read_text().strip() == "- experiment=smoke"
    assert (run / "checkpoints/last.ckpt").is_file()
    pngs = sorted((run / "samples").glob("*.png"))
    assert [p.name for p in pngs] == ["step_0000003.png", "step_0000006.png"]
    assert "train/loss" in (run / "metrics.csv").read_text().splitlines()[0]
    assert {p.name for p in (run / "weights").iterdir()} == {"raw.safetensors", "ema_0.999.safetensors",
                                                              "ema_0.9999.safetensors"}
    wandb_id = (run / "wandb_id.txt").read_text().strip()
    offline = list((run / "wandb").glob(f"offline-run-*-{wandb_id}/run-{wandb_id}.wandb"))
    assert len(offline) == 1

    # The same command again: the run directory and W&B run are reused and training continues.
    out = _run_cli(["experiment=smoke", f"hydra.run.dir={run}", "trainer.max_steps=9"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming" in out.stdout + out.stderr
    assert load_checkpoint(run / "checkpoints/last.ckpt")["global_step"] == 9
    assert (run / "wandb_id.txt").read_text().strip() == wandb_id
    assert len(list((run / "wandb").glob(f"offline-run-*-{wandb_id}/run-{wandb_id}.wandb"))) == 2
    assert (run / "samples/step_0000009.png").is_file()

    # Samples from the checkpoint's EMA weights through diffusion-sample.
    out = _run_cli([f"ckpt={run / 'checkpoints/last.ckpt'}", f"out_dir={tmp_path / 'gen'}", "num_images=5",
                    "sampler.steps=3", "batch_size=2"], tmp_path, module="diffusion_train.sample")
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(list((tmp_path / "gen/images").glob("*.png"))) == 5 and (tmp_path / "gen/grid.png").is_file()


@pytest.mark.slow
def test_local_sweep_runs_each_job_in_its_own_dir(tmp_path):
    """Jobs of a local sweep run one after another in one process: each gets its own run directory and its own
    (offline) W&B run; a job whose overrides make a name too long for a directory gets a shortened one."""
    from diffusion_train import short_dirname

    many = [f"callbacks.ema.decays=[{','.join(['0.99'] * 40)}]", "callbacks.ema.sample_decay=0.99"]
    out = _run_cli(["-m", "experiment=smoke", "model=unet_tiny,dit_tiny", "trainer.max_steps=2", *many,
                    f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = {load_module(job / "checkpoints/last.ckpt").backbone.__class__.__name__: job
            for job in (tmp_path / "sweep").iterdir() if job.is_dir()}
    assert sorted(jobs) == ["DiT", "UNet"]
    for model, job in (("dit_tiny", jobs["DiT"]), ("unet_tiny", jobs["UNet"])):
        assert len(job.name.encode()) == 173  # 160 bytes, "-" and 12 hex digits
        assert job.name == short_dirname(",".join(sorted([*many, f"model={model}", "experiment=smoke",
                                                          "trainer.max_steps=2"])))
        wandb_id = (job / "wandb_id.txt").read_text().strip()
        records = b"".join(p.read_bytes() for p in (job / "wandb").glob(f"offline-run-*-{wandb_id}/run-*.wandb"))
        own, other = {"dit_tiny": (b"models.DiT", b"models.UNet"),
                      "unet_tiny": (b"models.UNet", b"models.DiT")}[model]
        assert own in records and other not in records  # the job's resolved config, in its own W&B run
        assert b"global_batch" in records and b"git_sha" in records


@pytest.mark.slow
def test_killed_run_resumes_when_relaunched(tmp_path):
    """SIGKILL mid-training (possibly mid-save), then the same command: it resumes and finishes."""
    run = tmp_path / "run"
    args = ["experiment=smoke", f"hydra.run.dir={run}", "logger=csv", "trainer.max_steps=60",
            "callbacks.checkpoint.every_n_train_steps=1", "callbacks.sample_grid.every_n_steps=1000"]
    env = dict(os.environ, WANDB_MODE="offline")
    proc = subprocess.Popen([sys.executable, "-m", "diffusion_train.train", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run / "checkpoints/last.ckpt"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if last.is_file() and load_checkpoint(last)["global_step"] >= 5:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    killed_at = load_checkpoint(last)["global_step"]  # loads: the kill never leaves a broken file
    assert 5 <= killed_at < 60

    out = _run_cli(args, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resuming {last}" in out.stdout + out.stderr
    assert load_checkpoint(last)["global_step"] == 60
    assert not list((run / "checkpoints").glob(".*.tmp-*")), "temp files of an interrupted save are cleaned up"
