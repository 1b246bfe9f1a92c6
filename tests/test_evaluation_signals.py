"""Preemption signals during the evaluations of generated images in training: the run stops at a step boundary
with its checkpoint, and the relaunch evaluates and trains on as an uninterrupted run would."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from conftest import FMNIST, compose_train
from diffusion_train.train import train
from diffusion_train.training.checkpointing import load_checkpoint


def _fid_run(extractor_files, run, *extra):
    weights, reference = extractor_files
    return compose_train(FMNIST + ["+callbacks/fid=fmnist_net", f"callbacks.fid.weights={weights}",
                                   f"callbacks.fid.reference={reference}", "callbacks.fid.num_samples=10",
                                   "callbacks.fid.every_n_steps=2", "callbacks.fid.batch_size=4",
                                   "trainer.max_steps=5", "callbacks.sample_grid.every_n_steps=1000", *extra], run)


class _SignalAtSample:
    """Counts ``sample_seeded`` calls (a FID batch, or a sample grid) and sends the process ``signum`` at call
    ``at`` (1-based), as Slurm does in the middle of an evaluation."""

    def __init__(self, monkeypatch, at: int | None = None, signum=signal.SIGUSR1):
        from diffusion_train.training.module import DiffusionModule

        self.calls, self.at, real = 0, at, DiffusionModule.sample_seeded

        def sample_seeded(module, *args, **kw):
            self.calls += 1
            if self.calls == at:
                os.kill(os.getpid(), signum)
            return real(module, *args, **kw)

        monkeypatch.setattr(DiffusionModule, "sample_seeded", sample_seeded)


def _fid_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "eval/metrics.jsonl").read_text().splitlines()]


def test_a_signal_during_the_end_of_fit_evaluation_checkpoints_the_last_step_and_the_relaunch_finishes(
        extractor_files, tmp_path, monkeypatch):
    """SIGUSR1 during the Fréchet distance at the end of the fit (step 5; evaluations at 2 and 4 before it, 3
    batches each, then the step-5 grid): the evaluation stops between two batches, last.ckpt holds step 5, the
    process survives and nothing is exported. The relaunch runs no step, makes only the missing evaluation and
    exports; one more relaunch makes nothing again."""
    from diffusion_train.training.preemption import find_preemption

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    run = tmp_path / "run"
    handler = signal.getsignal(signal.SIGUSR1)
    signalled = _SignalAtSample(monkeypatch, at=8)  # 1-3: FID at 2, 4-6: at 4, 7: the grid, 8-10: FID at 5
    trainer = train(_fid_run(extractor_files, run), run)
    assert find_preemption(trainer).stopped_by == "SIGUSR1" and signalled.calls == 8
    assert signal.getsignal(signal.SIGUSR1) == handler  # the run's handler is gone once it returns
    assert load_checkpoint(run / "checkpoints/last.ckpt")["global_step"] == 5
    assert _fid_steps(run) == [2, 4] and not (run / "weights").exists()
    grid = run / "samples/step_0000005.png"
    made = grid.stat().st_mtime_ns

    relaunched = _SignalAtSample(monkeypatch)
    trainer = train(_fid_run(extractor_files, run), run)
    assert find_preemption(trainer).stopped_by is None and trainer.global_step == 5
    assert relaunched.calls == 3 and grid.stat().st_mtime_ns == made  # the FID's batches, not the grid
    assert _fid_steps(run) == [2, 4, 5] and (run / "weights/raw.safetensors").is_file()

    again = _SignalAtSample(monkeypatch)
    train(_fid_run(extractor_files, run), run)
    assert again.calls == 0 and _fid_steps(run) == [2, 4, 5]


def test_a_signal_during_an_evaluation_in_training_resumes_as_if_uninterrupted(extractor_files, tmp_path, monkeypatch):
    """SIGTERM during the evaluation at step 4 (the second of the launch, after a checkpoint at step 3; the EMA weights
    are swapped in): it stops there, with last.ckpt holding step 4's trained weights, not the EMA's, and no
    end-of-fit grid or evaluation of step 4. The relaunch makes the step-4 evaluation first, then trains on;
    metrics and weights equal an uninterrupted run's."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    every_3 = "callbacks.checkpoint.every_n_train_steps=3"  # saved at step 3 in the launch, not at 4
    straight = tmp_path / "straight"
    train(_fid_run(extractor_files, straight, every_3), straight)

    run = tmp_path / "run"
    _SignalAtSample(monkeypatch, at=5, signum=signal.SIGTERM)  # 1-3: the FID's batches at step 2, 4-6: at step 4
    train(_fid_run(extractor_files, run, every_3), run)
    last = load_checkpoint(run / "checkpoints/last.ckpt")
    assert last["global_step"] == 4 and _fid_steps(run) == [2] and not (run / "samples").exists()
    ema = last["ema"]["weights"][str(last["ema"]["decays"][0])]
    assert not all(torch.equal(last["state_dict"][k], v) for k, v in ema.items())
    train(_fid_run(extractor_files, run, every_3), run)

    def records(r):
        return [json.loads(line) for line in (r / "eval/metrics.jsonl").read_text().splitlines()]

    assert records(run) == records(straight) and [r["step"] for r in records(run)] == [2, 4, 5]

    def summary(r):  # the step-4 evaluation, made as the relaunch starts, was filed under step 5
        return {k: v["history"] for k, v in json.loads((r / "summary.json").read_text())["metrics"].items()
                if k.startswith("fd/")}

    assert summary(run) == summary(straight) and [h["step"] for h in next(iter(summary(run).values()))] == [2, 4, 5]
    a, b = (load_checkpoint(r / "checkpoints/last.ckpt") for r in (straight, run))
    assert a["global_step"] == b["global_step"] == 5
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


@pytest.mark.slow
def test_fsdp_rank0_signalled_at_the_end_stops_both_and_the_relaunch_evaluates_uneven_shares(extractor_files, tmp_path):
    """FSDP on 2 processes; rank 0 alone gets SIGUSR1 at the end of the last step (step 2), before the
    end-of-fit grid and Fréchet distance. Both ranks agree, stop with last.ckpt at step 2 and make neither; exit
    128+10. The relaunch makes both. Its 5 images in batches of 2 give rank 0 two batches and rank 1 one. Each
    FSDP forward pass is collective, so rank 1 samples an unused image to join rank 0's second batch; without
    it both waited for ever. The distance equals diffusion-eval's of the final checkpoint in one process. A third
    launch, of the finished run, keeps the EMA in last.ckpt."""
    import subprocess
    import sys

    from hydra import compose, initialize_config_dir

    from conftest import CONFIG_DIR
    from diffusion_train.evaluate import evaluate

    weights, reference = extractor_files
    run = tmp_path / "run"
    fid = ["num_samples=5", "batch_size=2", "guidance_scale=2.0"]
    args = ["experiment=smoke", "logger=csv", "trainer=fsdp", "trainer.precision=32-true", "trainer.accelerator=cpu",
            "trainer.devices=2", "data.batch_size=4", "trainer.max_steps=2", "sampler.steps=2",
            "callbacks.sample_grid.every_n_steps=100", "+callbacks/fid=fmnist_net", "callbacks.fid.every_n_steps=100",
            f"callbacks.fid.weights={weights}", f"callbacks.fid.reference={reference}",
            *(f"callbacks.fid.{o}" for o in fid), f"hydra.run.dir={run}"]
    env = dict({k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
               PYTHONPATH=str(Path(__file__).parent))

    def launch(*extra: str) -> subprocess.CompletedProcess:
        proc = subprocess.Popen([sys.executable, "-m", "diffusion_train.train", *args, *extra], cwd=tmp_path, env=env,
                                text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    stopped = launch("+callbacks.signal._target_=conftest.signal_rank0_at_last_step")
    assert stopped.returncode == 128 + signal.SIGUSR1, stopped.stderr[-3000:]
    assert "SIGUSR1: saved" in stopped.stdout and "at step 2 and stopping" in stopped.stdout
    assert load_checkpoint(run / "checkpoints/last.ckpt")["global_step"] == 2
    assert not (run / "samples").exists() and not (run / "eval").exists() and not (run / "weights").exists()

    done = launch()
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run / "samples/step_0000002.png").is_file() and (run / "weights/raw.safetensors").is_file()
    [record] = [json.loads(line) for line in (run / "eval/metrics.jsonl").read_text().splitlines()]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):  # diffusion-eval, in one process
        cfg = compose("evaluate", overrides=[f"ckpt={run / 'checkpoints/last.ckpt'}", f"out_dir={tmp_path / 'eval'}",
                                             "extractor=fmnist_net", f"extractor_weights={weights}",
                                             f"reference={reference}", "sampler.steps=2", "device=cpu", *fid])
    alone = evaluate(cfg)
    assert record["step"] == 2 and record["fd/fmnist_net_5"] == pytest.approx(alone["fd/fmnist_net_5"], rel=1e-5)

    # A relaunch of the finished run rewrites last.ckpt before any EMA update or swap (FSDP restores the checkpoint
    # after on_fit_start): the restored averages are saved, and exported again.
    ema = load_checkpoint(run / "checkpoints/last.ckpt")["ema"]
    again = launch()
    assert again.returncode == 0, again.stderr[-3000:]
    kept = load_checkpoint(run / "checkpoints/last.ckpt")["ema"]
    assert kept["num_updates"] == ema["num_updates"] == 2
    assert all(torch.equal(kept["weights"][k][n], w) for k in ema["weights"] for n, w in ema["weights"][k].items())
    assert (run / "weights/ema_0.999.safetensors").is_file()

