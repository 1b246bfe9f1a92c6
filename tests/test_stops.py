"""Stops and relaunches: a signal (at a checkpoint step, between validations, at the last step, while the fit
sets up) or a hard kill (during a validation, before last.ckpt), and the relaunch that ends as an uninterrupted
run: the same weights, checkpoints, validations and rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import LossRecorder, compare_checkpoints, validated_steps
from diffusion_train.train import train
from diffusion_train.training.checkpointing import load_checkpoint


def test_the_row_of_a_step_stopped_by_a_signal_holds_its_own_counters(tiny_cfg, tmp_path, monkeypatch):
    """A signal's stop writes a row too (off the logging grid): its images, FLOPs and data counts (here captions cut
    to the text encoder's length) were the last logging step's, and the row stays after the resume."""
    import csv

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    run = tmp_path / "run"
    text = ["data=fashion_mnist_captions", "data.batch_size=8", "data.val_size=8", "conditioning=t5_tiny",
            "conditioning.embedders.caption.max_length=4", "callbacks.sample_grid.prompts=[a bag]",
            "trainer.log_every_n_steps=2", "trainer.val_check_interval=100"]
    train(tiny_cfg(*text, "+callbacks.signal._target_=conftest.signal_at_step", "+callbacks.signal.step=3",
                   run_dir=run), run)
    train(tiny_cfg(*text, run_dir=run), run)
    rows = {int(r["step"]): r for r in csv.DictReader(open(run / "metrics.csv")) if r.get("train/loss")}
    assert sorted(rows) == [2, 3, 4] and [float(rows[s]["perf/images_seen"]) for s in rows] == [16.0, 24.0, 32.0]
    cut = [float(rows[s]["data/truncated_captions"]) for s in sorted(rows)]
    assert 0 < cut[0] < cut[1] < cut[2]


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
    assert validated_steps(run) == [2]  # due at step 2 (val_check_interval=2): made before the stop
    train(tiny_cfg(run_dir=run), run)
    assert files(run) == files(straight) == ["last.ckpt", "step_0000002.ckpt", "step_0000004.ckpt"]
    compare_checkpoints(load_checkpoint(straight / "checkpoints/last.ckpt"),
                         load_checkpoint(run / "checkpoints/last.ckpt"))
    assert validated_steps(run) == validated_steps(straight) == [2, 4]


def test_a_sigterm_while_the_fit_sets_up_stops_at_the_first_step_with_a_checkpoint(tiny_cfg, tmp_path, monkeypatch):
    """SIGTERM after Lightning has put its own handler in and before this package's goes back (here while the
    training data loader is made): the run still stops as for any SIGTERM, at the first step boundary with its
    checkpoint, instead of Lightning's exception at the first batch."""
    import os
    import signal

    from diffusion_train.data.base import InMemoryDataModule
    from diffusion_train.training.preemption import find_preemption

    make_loader = InMemoryDataModule.train_dataloader

    def signalled(self):
        os.kill(os.getpid(), signal.SIGTERM)
        return make_loader(self)

    monkeypatch.setattr(InMemoryDataModule, "train_dataloader", signalled)
    run = tmp_path / "run"
    trainer = train(tiny_cfg(run_dir=run), run)
    assert find_preemption(trainer).stopped_by == "SIGTERM" and trainer.global_step == 1
    assert load_checkpoint(run / "checkpoints/last.ckpt")["global_step"] == 1


def test_a_signal_between_validations_saves_once_and_validates_nothing_more(tiny_cfg, tmp_path, monkeypatch):
    """SIGUSR1 during step 1 (no checkpoint or validation due): last.ckpt is written once (not again as the fit
    ends), with no validation before the stop (Lightning validates after a step that stops the fit), and the
    relaunch's logs and weights are an uninterrupted run's."""
    import lightning as L

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    straight, run = tmp_path / "straight", tmp_path / "run"
    train(tiny_cfg(run_dir=straight), straight)
    saved, save = [], L.Trainer.save_checkpoint
    monkeypatch.setattr(L.Trainer, "save_checkpoint",
                        lambda trainer, path, *a, **k: saved.append((trainer.global_step, Path(path).name))
                        or save(trainer, path, *a, **k))
    train(tiny_cfg("+callbacks.signal._target_=conftest.signal_at_step", "+callbacks.signal.step=1", run_dir=run), run)
    assert saved == [(1, "last.ckpt")] and not validated_steps(run)
    train(tiny_cfg(run_dir=run), run)
    assert validated_steps(run) == validated_steps(straight) == [2, 4]
    compare_checkpoints(load_checkpoint(straight / "checkpoints/last.ckpt"),
                         load_checkpoint(run / "checkpoints/last.ckpt"))


def test_a_signal_at_the_last_step_still_validates_it(tiny_cfg, tmp_path, monkeypatch):
    """SIGUSR1 during step 5, the last, off the validation grid (every 2): the last step is always validated, and
    the run resumed at max_steps validates nothing, so the stop must (it skipped that validation)."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    straight, run = tmp_path / "straight", tmp_path / "run"
    train(tiny_cfg("trainer.max_steps=5", run_dir=straight), straight)
    train(tiny_cfg("trainer.max_steps=5", "+callbacks.signal._target_=conftest.signal_at_step",
                   "+callbacks.signal.step=5", run_dir=run), run)
    assert validated_steps(run) == [2, 4, 5]
    train(tiny_cfg("trainer.max_steps=5", run_dir=run), run)
    assert validated_steps(run) == validated_steps(straight) == [2, 4, 5]


@pytest.mark.parametrize("step", [4, 6])
def test_a_run_killed_during_a_validation_makes_it_when_it_resumes(tiny_cfg, tmp_path, step):
    """Killed during the validation of a checkpointed step (its checkpoint is saved before it): Lightning's restart
    took the validation as done, so val/loss of that step was missing for good (at step 6, the run's last, the
    final one). The relaunch makes it first."""
    common = ["trainer.max_steps=6", "callbacks.checkpoint.every_n_train_steps=2"]
    straight, run = tmp_path / "straight", tmp_path / "run"
    train(tiny_cfg(*common, run_dir=straight), straight)
    with pytest.raises(RuntimeError, match=f"killed in the validation of step {step}"):
        train(tiny_cfg(*common, "+callbacks.fail._target_=conftest.fail_in_validation",
                       f"+callbacks.fail.step={step}", run_dir=run), run)
    assert load_checkpoint(run / "checkpoints/last.ckpt")["global_step"] == step
    train(tiny_cfg(*common, run_dir=run), run)
    assert validated_steps(run) == validated_steps(straight) == [2, 4, 6]
    history = json.loads((run / "summary.json").read_text())["metrics"]["val/loss"]["history"]
    assert history == json.loads((straight / "summary.json").read_text())["metrics"]["val/loss"]["history"]
    compare_checkpoints(load_checkpoint(straight / "checkpoints/last.ckpt"),
                         load_checkpoint(run / "checkpoints/last.ckpt"))


def test_a_run_without_last_ckpt_resumes_from_its_latest_step_checkpoint(tiny_cfg, tmp_path):
    """With callbacks.checkpoint.save_last=false, a run stopped hard has step checkpoints but no last.ckpt: the
    relaunch started afresh over them (overwriting them, its metrics from step 1); now it resumes from the latest."""
    import csv

    straight, run = tmp_path / "straight", tmp_path / "run"
    common = ["callbacks.checkpoint.save_last=false", "trainer.max_steps=6"]
    train(tiny_cfg(*common, run_dir=straight), straight)
    train(tiny_cfg(*common, "+callbacks.signal._target_=conftest.signal_at_step", "+callbacks.signal.step=5",
                   run_dir=run), run)
    (run / "checkpoints" / "last.ckpt").unlink()  # as a hard kill after step 5 leaves it: steps 2 and 4
    LossRecorder.losses.clear()
    train(tiny_cfg(*common, "+callbacks.recorder._target_=conftest.LossRecorder", run_dir=run), run)
    assert sorted(LossRecorder.losses) == [5, 6]  # trained from step 4's checkpoint
    compare_checkpoints(load_checkpoint(straight / "checkpoints/last.ckpt"),
                         load_checkpoint(run / "checkpoints/last.ckpt"))
    rows = [int(r["step"]) for r in csv.DictReader(open(run / "metrics.csv")) if r.get("train/loss")]
    assert rows == list(range(1, 7))
