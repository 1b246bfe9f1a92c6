"""Resume: exact (weights, EMA, optimizer, schedule, data, logs), with accumulation and new settings, branches
(cool-downs), and the resumes that are refused before anything is written."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from conftest import compare_checkpoints, file_digest, validated_steps
from diffusion_train.train import train
from diffusion_train.training.checkpointing import load_checkpoint
from diffusion_train.training.run_dir import ResumeMismatchError


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


@pytest.mark.parametrize("second", [["training.accumulate_grad_batches=2"], []],
                         ids=["another_split", "extending_a_finished_run"])
def test_intervals_stay_on_the_configured_steps_after_a_resume_on_other_terms(second, tiny_cfg, tmp_path):
    """A run resumed with the same global batch in more micro-batches, or extended past its finished end: Lightning
    counts batches, so its counters from the checkpoint must become this run's batches by the same step, or
    validation and logging leave the configured steps (they fell on 4, 5, 8, 11 or 7, 9, 11)."""
    import csv

    common = ["scale.global_batch=16", "trainer.val_check_interval=3", "trainer.log_every_n_steps=2",
              "callbacks.checkpoint.every_n_train_steps=4"]
    run = tmp_path / "run"
    first = 4 if second else 6  # the split changes at step 4; the finished run ends on a validation
    train(tiny_cfg(*common, f"trainer.max_steps={first}", run_dir=run), run)
    train(tiny_cfg(*common, *second, "trainer.max_steps=12", run_dir=run), run)
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["step"]) for r in rows if r.get("val/loss") and int(r["step"]) > first] == [6, 9, 12][first // 6:]
    assert [int(r["step"]) for r in rows if r.get("train/loss")] == [2, 4, 6, 8, 10, 12]
    assert all(float(r["perf/images_seen"]) == 16 * int(r["step"]) for r in rows if r.get("train/loss"))


def test_the_last_step_s_row_holds_its_own_counters(tiny_cfg, tmp_path):
    """Lightning writes a row at the step a fit ends even off the logging grid, from the last values logged: the
    counters must be that step's (they were the last logging step's)."""
    import csv

    run = tmp_path / "run"
    train(tiny_cfg("trainer.max_steps=3", "trainer.log_every_n_steps=2", run_dir=run), run)
    rows = [r for r in csv.DictReader(open(run / "metrics.csv")) if r.get("train/loss")]
    flops = [float(r["perf/train_flops"]) for r in rows]
    assert [(int(r["step"]), float(r["perf/images_seen"])) for r in rows] == [(2, 32.0), (3, 48.0)]
    assert flops[1] == pytest.approx(flops[0] * 1.5)


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

    compare_checkpoints(load_checkpoint(tmp_path / "straight/checkpoints/last.ckpt"),
                         load_checkpoint(tmp_path / "resumed/checkpoints/last.ckpt"))
    csv = (tmp_path / "resumed/metrics.csv").read_text().splitlines()
    steps = [int(r.split(",")[csv[0].split(",").index("step")]) for r in csv[1:]]
    train_rows = [s for s, r in zip(steps, csv[1:]) if r.split(",")[csv[0].split(",").index("train/loss")]]
    assert sorted(train_rows) == sorted(set(train_rows)), "a resumed run must not log a step twice"


def test_a_time_based_validation_in_the_middle_of_an_accumulated_step_keeps_its_gradients(tiny_cfg, tmp_path):
    """A time-based val_check_interval validates after any batch, between two micro-batches of a step too, and
    Lightning freed the gradients before it: the step lost its first micro-batch's."""
    common = ["training.accumulate_grad_batches=2", "trainer.max_steps=3", "callbacks.checkpoint.every_n_train_steps=9"]
    runs = {}
    for name, interval in (("steps", "1000"), ("time", "'00:00:00:00'")):
        runs[name] = tmp_path / name
        train(tiny_cfg(*common, f"trainer.val_check_interval={interval}", run_dir=runs[name]), runs[name])
    assert len(validated_steps(runs["time"])) > len(validated_steps(runs["steps"]))
    compare_checkpoints(*(load_checkpoint(r / "checkpoints/last.ckpt") for r in runs.values()))


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
    saved = {p.name: file_digest(p) for p in (run / "checkpoints").glob("*.ckpt")}
    assert sorted(saved) == ["last.ckpt", "step_0000002.ckpt", "step_0000004.ckpt"]
    assert sorted(written) == ["last.ckpt", "last.ckpt", "step_0000002.ckpt", "step_0000004.ckpt"], written
    train(tiny_cfg(*common, "trainer.max_steps=6", run_dir=run), run)
    assert file_digest(run / "checkpoints/step_0000004.ckpt") == saved["step_0000004.ckpt"]
    train(tiny_cfg(*common, "trainer.max_steps=6", run_dir=tmp_path / "straight"), tmp_path / "straight")
    compare_checkpoints(load_checkpoint(tmp_path / "straight/checkpoints/last.ckpt"),
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
    records where it came from; its sample grids start after the branch step (the trunk has that one)."""
    wsd = ["lr_schedule=wsd", "lr_schedule.warmup_steps=2", "callbacks.checkpoint.every_n_train_steps=4",
           "trainer.val_check_interval=50", "callbacks.sample_grid.every_n_steps=2"]
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
    compare_checkpoints(load_checkpoint(tmp_path / "straight/checkpoints/last.ckpt"),
                         load_checkpoint(branch / "checkpoints/last.ckpt"))
    want = {"checkpoint": f"{trunk}/checkpoints/step_0000006.ckpt", "step": 6}
    assert json.loads((branch / "run.json").read_text())["branched_from"] == want
    assert load_checkpoint(branch / "checkpoints/last.ckpt")["diffusion_train"]["branched_from"] == want
    assert sorted(p.name for p in (branch / "checkpoints").iterdir()) == ["last.ckpt", "step_0000008.ckpt"]
    grids = {r: sorted(p.name for p in (r / "samples").glob("step_*.png")) for r in (trunk, branch)}
    assert grids == {trunk: ["step_0000002.png", "step_0000004.png", "step_0000006.png", "step_0000007.png"],
                     branch: ["step_0000008.png", "step_0000010.png"]}  # the trunk's end of fit at 7
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
    before = {p: file_digest(p) for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ResumeMismatchError, match=r"model.model_channels: checkpoint has 8, config has 16"):
        train(tiny_cfg("trainer.max_steps=4", "model.model_channels=16", run_dir=run), run)
    # a task or a fine-tune changes the network outside the model's config: its weights are compared
    with pytest.raises(ResumeMismatchError, match=r"its weights do not fit the model this config builds \(backbone\."
                                                   r"conv_in\.weight \[8, 3, 3, 3\] in the checkpoint, "
                                                   r"\[8, 7, 3, 3\] in the model\)\. Nothing was changed"):
        train(tiny_cfg("trainer.max_steps=4", "task=inpainting", run_dir=run), run)
    with pytest.raises(ResumeMismatchError, match=r"finetune: checkpoint has None, config has \{'method': 'lora'"):
        train(tiny_cfg("trainer.max_steps=4", "finetune=lora", run_dir=run), run)
    assert {p: file_digest(p) for p in run.rglob("*") if p.is_file()} == before
    # a LoRA's alpha scales every trained update (the weights fit, the function does not): refused; its dropout, a
    # training setting, may change
    lora = tmp_path / "lora"
    train(tiny_cfg("trainer.max_steps=2", "finetune=lora", "finetune.rank=4", "finetune.alpha=4", run_dir=lora), lora)
    with pytest.raises(ResumeMismatchError, match=r"finetune.alpha: checkpoint has 4, config has 64"):
        train(tiny_cfg("trainer.max_steps=3", "finetune=lora", "finetune.rank=4", "finetune.alpha=64", run_dir=lora),
              lora)
    train(tiny_cfg("trainer.max_steps=3", "finetune=lora", "finetune.rank=4", "finetune.alpha=4",
                   "finetune.dropout=0.1", run_dir=lora), lora)


def test_a_second_live_launch_in_the_run_directory_is_refused_and_changes_nothing(tiny_cfg, tmp_path):
    """While a launch holds its run directory (here a hold taken as another launch's rank 0 takes it), a second
    launch there is refused, naming the holder, and leaves the first's files alone: the checkpoint it is writing,
    its metrics. The hold ends with its launch."""
    import os
    import re

    from diffusion_train.training.run_dir import RunDirBusyError, hold_run_dir

    run = tmp_path / "run"
    train(tiny_cfg("trainer.max_steps=2", run_dir=run), run)
    writing = run / "checkpoints" / ".last.ckpt.tmp-4242"
    writing.write_bytes(b"half written")
    before = {p: file_digest(p) for p in run.rglob("*") if p.is_file()}
    held = hold_run_dir(run)
    try:
        with pytest.raises(RunDirBusyError, match=rf"^run directory {re.escape(str(run))} is in use by process "
                                                  rf"{os.getpid()} on .*; wait for it to end, or give this launch"):
            train(tiny_cfg("trainer.max_steps=4", run_dir=run), run)
        assert {p: file_digest(p) for p in run.rglob("*") if p.is_file()} == before
    finally:
        held.close()
    train(tiny_cfg("trainer.max_steps=4", run_dir=run), run)
    assert load_checkpoint(run / "checkpoints/last.ckpt")["global_step"] == 4 and not writing.exists()
    train(tiny_cfg("trainer.max_steps=6", run_dir=run), run)  # the launch before let go of it
    assert load_checkpoint(run / "checkpoints/last.ckpt")["global_step"] == 6


def test_resume_with_another_global_batch_is_refused_and_the_same_one_on_other_terms_resumes(tiny_cfg, tmp_path):
    """The data position and the images seen count the checkpoint's batches: another global batch is refused and
    nothing changes; the same one made of half the batch accumulated twice resumes."""
    run = tmp_path / "run"
    train(tiny_cfg("trainer.max_steps=2", "data.batch_size=8", run_dir=run), run)
    before = {p: file_digest(p) for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ResumeMismatchError, match=r"global batch of 8, this launch has 16 \(16 per device x 1 dev"):
        train(tiny_cfg("trainer.max_steps=4", "data.batch_size=16", run_dir=run), run)
    assert {p: file_digest(p) for p in run.rglob("*") if p.is_file()} == before
    train(tiny_cfg("trainer.max_steps=4", "data.batch_size=4", "training.accumulate_grad_batches=2", run_dir=run),
          run)
    assert load_checkpoint(run / "checkpoints/last.ckpt")["global_step"] == 4


@pytest.mark.parametrize("change, error", [
    ("training.no_weight_decay=[1d]", r"parameter groups of \[\d+\] tensors, this config makes \[\d+, \d+\] "
                                      r"\(training.no_weight_decay=\['1d'\]\)"),
    # the EMA's were refused only at its first update, after config.yaml had been rewritten
    ("callbacks.ema.decays=[0.999]", r"it holds the EMA averages \['0.999', '0.9999'\], this config keeps "
                                     r"\['0.999'\]"),
    # `diffusion-train seed=1` meant as a new run went on with the seed-0 run's checkpoint, its data order reshuffled
    ("seed=1", r"it was trained with seed=0, this config has seed=1 \(the data order"),
])
def test_resume_with_other_training_state_is_refused_before_anything_is_written(tiny_cfg, tmp_path, change, error):
    run = tmp_path / "run"
    train(tiny_cfg("trainer.max_steps=2", run_dir=run), run)
    before = {p: file_digest(p) for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ResumeMismatchError, match=r"^refusing to resume .*" + error):
        train(tiny_cfg("trainer.max_steps=4", change, run_dir=run), run)
    assert {p: file_digest(p) for p in run.rglob("*") if p.is_file()} == before


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


def test_metrics_csv_is_cut_to_the_resumed_step_in_one_rename(tmp_path, monkeypatch):
    """On resume the rows after the resumed step are dropped by writing a new file and renaming it over the old:
    a kill before the rename leaves the whole history."""
    from diffusion_train.training.loggers import _AppendingWriter

    path = tmp_path / "metrics.csv"
    path.write_text("step,train/loss\n" + "".join(f"{s},{s / 10}\n" for s in range(1, 5)))
    before = path.read_text()

    def killed(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr("os.replace", killed)
        with pytest.raises(KeyboardInterrupt):
            _AppendingWriter(str(tmp_path), resume_step=2)
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]
    _AppendingWriter(str(tmp_path), resume_step=2)
    assert path.read_text().splitlines() == ["step,train/loss", "1,0.1", "2,0.2"]
