"""Training end to end: overfitting, logged values, refusals of bad settings, non-finite steps, the CLI and its
artifacts (resume: test_resume.py)."""

from __future__ import annotations

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

from conftest import file_digest, module_of
from diffusion_train.diffusion import GaussianDiffusion
from diffusion_train.train import train
from diffusion_train.training import NonFiniteLossError
from diffusion_train.training.build import build_module, load_module
from diffusion_train.training.checkpointing import load_checkpoint


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
    ("lr_schedule.warmup_steps=abc", "lr_schedule.warmup_steps=abc: give a whole number >= 0"),
    ("training.grad_clip=abc", "training.grad_clip=abc: give a number >= 0"),
    ("training.max_nonfinite_steps=0", "training.max_nonfinite_steps=0: give a whole number >= 1"),
    ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps=0: give a whole number >= 1"),  # was 50, silently
    ("data.val_size=-5", "data.val_size=-5: give a whole number >= 0"),  # validated on all but 5 images
    ("trainer.val_check_interval=0", "trainer.val_check_interval=0: give a number of optimizer steps >= 1, a "
                                     "fraction of an epoch in (0, 1], or a time (DD:HH:MM:SS)"),  # ZeroDivisionError
    ("optim.betas=[1.5,0.999]", "optim: Invalid beta parameter at index 0: 1.5"),  # at the fit, after the run files
    ("+training.grad_clipp=0.5", "training.grad_clipp: not a training option; the options are "),  # a traceback
    ("lr_schedule=cosine lr_schedule.warmup_steps=900",
     "lr_schedule: cosine needs total_steps > warmup_steps, got 4, 900"),  # built once before any work
])
def test_a_bad_number_is_refused_naming_the_key(setting, expected, tiny_cfg, tmp_path):
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}" + ("" if expected.endswith(" ") else "$")):
        train(tiny_cfg("trainer.max_steps=4", *setting.split(" "), run_dir=tmp_path / "run"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_bad_sampling_settings_of_the_callbacks_are_refused_naming_the_key():
    """They failed at the first grid step (ZeroDivisionError, an empty stack), after the steps before it and
    before their checkpoint; a NaN guidance scale made NaN grids, a negative eta shrank DDIM's noise term."""
    from functools import partial

    from diffusion_train.diffusion.samplers import Sampler, ddim
    from diffusion_train.training.samples import SampleGrid

    sampler = Sampler(partial(ddim, eta=0.0))
    for kwargs, error in [({"every_n_steps": 0}, "every_n_steps=0"), ({"per_class": -1}, "per_class=-1"),
                          ({"rows": 0, "per_class": 0}, "per_class=0, rows=0")]:
        with pytest.raises(ValueError, match=rf"^callbacks.sample_grid: {error}: give whole numbers >= 1$"):
            SampleGrid(sampler, "grids", **kwargs)
    for scale in (float("nan"), "abc"):
        with pytest.raises(ValueError, match=r"^callbacks.sample_grid.guidance_scale=(nan|abc): give a finite number"):
            SampleGrid(sampler, "grids", guidance_scale=scale)
    # the interval and rescale were checked only when the first grid's guidance was built, killing the run there
    with pytest.raises(ValueError, match=r"^callbacks.sample_grid.guidance_interval=\[5, 0.3\]: give \[lo, hi\] "
                                         r"with lo < hi"):
        SampleGrid(sampler, "grids", guidance_scale=2.0, guidance_interval=[5, 0.3])
    with pytest.raises(ValueError, match=r"^callbacks.sample_grid.guidance_rescale=1.5: give a number in \[0, 1\]"):
        SampleGrid(sampler, "grids", guidance_scale=2.0, guidance_rescale=1.5)
    with pytest.raises(ValueError, match=r"^sampler.solver.eta=-1: give a number >= 0"):
        Sampler(partial(ddim, eta=-1))


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


def test_guided_sample_grids_of_a_model_without_cfg_dropout_are_warned_of(tiny_cfg, tmp_path, caplog):
    for dropout, warned in ((0.0, True), (0.1, False)):
        caplog.clear()
        run = tmp_path / str(dropout)
        with caplog.at_level(logging.WARNING, logger="diffusion_train"):
            train(tiny_cfg("trainer.max_steps=1", f"conditioning.embedders.label.dropout={dropout}",
                           "callbacks.sample_grid.guidance_scale=2", run_dir=run), run)
        assert any("unconditional prediction is never trained" in r.getMessage() for r in caplog.records) == warned


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
    digest, weights = file_digest(last), load_checkpoint(last)["state_dict"]
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
    assert file_digest(last) == digest or ckpt["global_step"] > 2


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


def test_a_local_sweep_of_the_number_of_processes_is_refused(tmp_path):
    """Lightning starts a job's extra processes by re-running its command line, the whole multirun: jobs with
    different numbers of processes would wait for each other for ever. Refused before any job works."""
    out = _run_cli(["-m", "experiment=smoke", "trainer.max_steps=2", "trainer.accelerator=cpu", "trainer.devices=1,2",
                    "+trainer.strategy=ddp", f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    assert out.returncode == 1 and out.stderr.strip().splitlines()[-1] == (
        "error: this local multirun sweeps trainer.devices: a job's extra processes re-run the whole multirun, so jobs "
        "with different numbers of processes wait for each other for ever; launch one multirun per setting, or sweep "
        "with hydra/launcher=slurm"), out.stderr[-3000:]
    assert not list((tmp_path / "sweep").rglob("checkpoints"))


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


def test_throughput_leaves_out_the_launch_s_first_step(monkeypatch):
    """A launch's first step compiles (100 s here), the others take 1 s: logged every 3 steps, images/s is that of
    the steps after the first (2 steps of 8 images in 2 s at step 3, then 3 in 3 s at step 6), TFLOP/s and MFU
    from it; the last step (7, which took 2 s) logs its own rate, which the end of the fit writes."""
    from types import SimpleNamespace

    import diffusion_train.training.summary as summary
    from diffusion_train.training.throughput import Throughput

    clock = iter([0.0, 100.0, 101.0, 102.0, 103.0, 104.0, 105.0, 107.0])
    monkeypatch.setattr("time.perf_counter", lambda: next(clock))
    monkeypatch.setattr(summary, "run_forward_macs", lambda module: 1e9)
    logged = []
    module = SimpleNamespace(device=torch.device("cpu"), accumulate_grad_batches=1, log_dict=logged.append)
    trainer = SimpleNamespace(callbacks=[], global_step=0, world_size=1, datamodule=SimpleNamespace(batch_size=8),
                              max_steps=7, should_stop=False, log_every_n_steps=3)
    meter = Throughput(every_n_steps=3, peak_tflops=1.0)
    meter.on_train_start(trainer, module)
    for step in range(1, 8):
        trainer.global_step = step
        meter.on_train_batch_end(trainer, module, None, None, step - 1)
    assert [d["perf/images_per_sec"] for d in logged] == [8.0, 8.0, 4.0]
    assert logged[0]["perf/tflops_per_device"] == pytest.approx(8.0 * 6e9 / 1e12)
    assert logged[0]["perf/mfu"] == pytest.approx(8.0 * 6e9 / 1e12)


def test_a_throughput_interval_off_the_logging_grid_is_refused(tiny_cfg, tmp_path):
    """Rates measured every 3 steps while metrics are written every 2 were written at a later step than measured
    (or not at all); now refused before the first step."""
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"^callbacks.throughput.every_n_steps \(3\) must be a multiple of the "
                                         r"logging interval \(2 optimizer steps"):
        train(tiny_cfg("callbacks.throughput.every_n_steps=3", "trainer.log_every_n_steps=2", run_dir=run), run)
    assert not (run / "checkpoints").exists()


def test_a_sampler_the_schedule_cannot_take_is_refused_before_training(tiny_cfg, tmp_path):
    """karras spacing on a zero-terminal-SNR schedule failed at the first sample grid, after the steps before it
    and before their checkpoint; now before the first step, naming the callback."""
    run = tmp_path / "run"
    cfg = tiny_cfg("diffusion=ddpm_linear_v", "diffusion.schedule.rescale_zero_terminal_snr=true", "sampler=dpmpp_2m",
                   run_dir=run)
    with pytest.raises(ValueError, match=r"^callbacks.sample_grid.sampler \(dpmpp_2m, spacing=karras\): karras spacing "
                                         r"needs a finite sigma/alpha; this schedule has zero terminal SNR"):
        train(cfg, run)
    assert not (run / "checkpoints").exists() and not (run / "metrics.csv").exists()
    train(tiny_cfg("diffusion=ddpm_linear_v", "diffusion.schedule.rescale_zero_terminal_snr=true", "sampler=dpmpp_2m",
                   "sampler.spacing=trailing", "trainer.max_steps=2", run_dir=run), run)


@pytest.mark.parametrize("overrides, error", [
    (["diffusion=ddpm_linear_v", "diffusion.schedule.rescale_zero_terminal_snr=true", "sampler=heun",
      "sampler.spacing=trailing"], r"\(heun, spacing=trailing\): heun needs alpha > 0 at every timestep"),
    (["sampler=flow_heun"], r"\(flow_heun, spacing=linspace\): flow_heun needs a flow schedule"),
])
def test_a_solver_the_schedule_cannot_take_is_refused_before_training(tiny_cfg, tmp_path, overrides, error):
    """heun where alpha reaches 0 and flow_heun on a DDPM schedule failed at the first sample grid; now before
    the first step."""
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="^callbacks.sample_grid.sampler " + error):
        train(tiny_cfg(*overrides, run_dir=run), run)
    assert not (run / "checkpoints").exists()
