"""Scale-out: global batch and LR rule, device checks, preemption by signal, DDP and FSDP training on CPU (gloo)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import gloo_group
from diffusion_train.training.checkpointing import load_checkpoint
from diffusion_train.training.loggers import persistent_run_id
from diffusion_train.training.parallel import check_devices, lr_scale, per_device_batch, sum_over_ranks
from diffusion_train.training.preemption import Preemption, requeue, slurm_job_id

QUICK = ["experiment=smoke", "logger=csv", "callbacks.sample_grid.every_n_steps=1000",
         "trainer.val_check_interval=1000", "trainer.precision=32-true"]
TWO_CPUS = ["trainer.accelerator=cpu", "trainer.devices=2"]


def _cli(args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffusion_train.train", *args], capture_output=True, text=True,
                          timeout=400, cwd=cwd, **kw)


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


# -- the global batch, the LR rule, the devices ------------------------------------------------------
def test_global_batch_is_split_over_devices_and_accumulation():
    assert per_device_batch(64, None, 8, 2) == 64  # no global batch: data.batch_size is per device
    assert per_device_batch(64, 256, 8, 2) == 16
    with pytest.raises(ValueError, match=r"global_batch=100 is not divisible by the world size 8 x .* = 8"):
        per_device_batch(64, 100, 8, 1)


def test_lr_scaling_rules():
    assert lr_scale("none", 1024, 256) == 1.0
    assert lr_scale("linear", 1024, 256) == 4.0
    assert lr_scale("sqrt", 1024, 256) == 2.0
    with pytest.raises(ValueError, match="lr_scaling must be one of"):
        lr_scale("cubic", 1024, 256)


def _sum_worker(rank: int, world: int, init: str, out: str) -> None:
    with gloo_group(rank, world, init):
        mine = [{"data/skipped_bad_label": 2, "data/skipped_missing_image": 1}, {"data/skipped_bad_label": 3}][rank]
        Path(out, f"{rank}.json").write_text(json.dumps(sum_over_ranks(mine)))


def _close_worker(rank: int, init: str, out: str) -> None:
    import time
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy

    from diffusion_train.train import close_process_groups

    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    torch.distributed.new_group(backend="gloo")  # as the Preemption callback's
    if rank == 0:  # rank 0 still busy (e.g. writing the last checkpoint) when the other rank is done
        time.sleep(0.5)
        Path(out, "written").touch()
    trainer = SimpleNamespace(strategy=DDPStrategy(process_group_backend="gloo"))
    close_process_groups(trainer)
    close_process_groups(trainer)  # again: nothing
    Path(out, f"{rank}.json").write_text(json.dumps({"waited": Path(out, "written").exists(),
                                                     "initialized": torch.distributed.is_initialized()}))


def test_a_run_ends_by_waiting_for_every_rank_then_destroying_its_process_groups(tmp_path):
    """At the end of an orderly multi-process run every rank waits for the others, then the gloo groups are destroyed
    (left alive, they can crash a process at exit once its peers are gone)."""
    torch.multiprocessing.spawn(_close_worker, args=(f"file://{tmp_path / 'init'}", str(tmp_path)), nprocs=2)
    for rank in range(2):
        assert json.loads((tmp_path / f"{rank}.json").read_text()) == {"waited": True, "initialized": False}


def test_counts_are_summed_over_ranks_whatever_names_each_rank_has(tmp_path):
    """The data/skipped_* counts a multi-GPU run logs are those of every rank, not rank 0's."""
    assert sum_over_ranks({"a": 1}) == {"a": 1}  # one process
    init = f"file://{tmp_path / 'init'}"
    torch.multiprocessing.spawn(_sum_worker, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got == {"data/skipped_bad_label": 5, "data/skipped_missing_image": 1}, rank


def test_more_devices_than_the_machine_shows_is_refused():
    with pytest.raises(ValueError, match=r"trainer.devices=4096 but this machine shows \d+ CPU core"):
        check_devices("cpu", 4096)
    check_devices("cpu", 1)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no GPU is visible"):
            check_devices("gpu", 1)


def test_scale_errors_are_one_line_before_training(tmp_path):
    out = _cli([*QUICK, "trainer.accelerator=cpu", "trainer.devices=4096", f"hydra.run.dir={tmp_path / 'a'}"], tmp_path)
    assert out.returncode == 1 and out.stderr.strip().splitlines()[-1].startswith("error: trainer.devices=4096")
    out = _cli([*QUICK, "scale.global_batch=30", "training.accumulate_grad_batches=4", f"hydra.run.dir={tmp_path / 'b'}"],
               tmp_path)
    assert out.returncode == 1
    assert "error: scale.global_batch=30 is not divisible" in out.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "a" / "checkpoints").exists() and not (tmp_path / "b" / "checkpoints").exists()


def test_ranks_started_as_child_processes_are_refused_before_training(tiny_cfg, tmp_path):
    """With ddp_spawn the launching process is no rank: the run's end (last checkpoint, exports, requeue) ran there
    without the fit's state. Refused before anything is written."""
    from diffusion_train.train import train

    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"^trainer.strategy: ranks started by spawn \(DDPStrategy\) are not "):
        train(tiny_cfg("+trainer.strategy=ddp_spawn", "trainer.devices=2", run_dir=run), run)
    assert not (run / "run.json").exists() and not (run / "checkpoints").exists()


def test_global_batch_and_scaled_lr_are_recorded(tiny_cfg, tmp_path):
    from diffusion_train.train import train

    run = tmp_path / "run"
    trainer = train(tiny_cfg("trainer.max_steps=1", "scale.global_batch=8", "training.accumulate_grad_batches=2",
                             "scale.lr_scaling=linear", "scale.lr_base_batch=4", "optim.lr=1e-3", run_dir=run), run)
    info = load_checkpoint(run / "checkpoints/last.ckpt")["diffusion_train"]
    assert (info["global_batch"], info["per_device_batch"], info["world_size"]) == (8, 4, 1)
    assert info["lr"] == pytest.approx(2e-3)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(2e-3)


def test_wandb_id_is_created_once_even_by_racing_processes(tmp_path):
    ids: list[str] = []
    threads = [threading.Thread(target=lambda: ids.append(persistent_run_id(tmp_path))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 1 and len(ids[0]) == 8
    assert persistent_run_id(tmp_path) == ids[0]
    assert [p.name for p in tmp_path.iterdir()] == ["wandb_id.txt"]


# -- the preemption callback -------------------------------------------------------------------------
def test_a_signal_only_sets_a_flag_and_requeue_signals_win(tmp_path):
    cb = Preemption(str(tmp_path))
    before = signal.getsignal(signal.SIGUSR1)
    cb.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert cb.received == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGUSR1)
        assert cb.received == signal.SIGUSR1  # a requeue signal outranks a plain exit
        os.kill(os.getpid(), signal.SIGTERM)
        assert cb.received == signal.SIGUSR1
    finally:
        cb.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == before
    with pytest.raises(ValueError, match="'SIGFOO' is not a signal name"):
        Preemption(str(tmp_path), requeue_signals=("SIGFOO",))


def test_slurm_job_id_names_the_array_task(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    assert slurm_job_id() == "42"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "40")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    assert slurm_job_id() == "40_2"


def test_a_requeued_launch_that_made_no_step_is_not_requeued_again(tmp_path, monkeypatch, caplog):
    """A requeue signal: rank 0 runs scontrol requeue, except in a launch that was itself requeued and stopped at
    the step it started at (a whole allocation without a training step, e.g. an evaluation longer than the time
    limit): requeued again, it would do the same for ever."""
    from diffusion_train.training import preemption

    calls = []
    monkeypatch.setattr(preemption.subprocess, "run",
                        lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0, "", ""))
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    cb = Preemption(str(tmp_path))
    cb.requeue, cb.signum, cb.start_step = True, int(signal.SIGUSR1), 100
    for restarts, step, requeued in (("", 100, True), ("0", 100, True), ("1", 130, True), ("1", 100, False)):
        monkeypatch.setenv("SLURM_RESTART_COUNT", restarts)
        calls.clear()
        requeue(cb, True, step)
        assert calls == ([["scontrol", "requeue", "42"]] if requeued else []), (restarts, step)
    assert "not requeueing Slurm job 42: this launch (restart 1) made no training step from step 100" in caplog.text
    calls.clear()
    requeue(cb, False, 130)  # only rank 0 requeues
    assert calls == []


def _signal_when(proc: subprocess.Popen, ready: Path, signum: int, timeout: float = 240,
                 whole_group: bool = False) -> None:
    """Sends ``signum`` to ``proc`` (``whole_group``: and every process it started) once ``ready``
    exists (a periodic checkpoint: training is under way)."""
    deadline = time.monotonic() + timeout
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{ready} never appeared"
        time.sleep(0.05)
    if whole_group:
        assert len(subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()) > 1
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 2], ids=["one_process_with_workers_all_signalled", "ddp_rank0_signalled"])
def test_signal_checkpoints_at_a_step_boundary_and_the_relaunch_ends_as_if_uninterrupted(tmp_path, devices):
    """SIGUSR1 mid-run, to every process as Slurm sends it (the trainer and its 2 DataLoader workers), or
    to rank 0 of 2 only (the ranks agree): every rank stops at the same step boundary with last.ckpt
    saved there, exit status 128+10, no weights exported; relaunching finishes the run with the weights
    of an uninterrupted one."""
    args = [*QUICK, "trainer.max_steps=60", "callbacks.checkpoint.every_n_train_steps=10", "data.batch_size=4"]
    args += [*TWO_CPUS, "+trainer.strategy=ddp"] if devices == 2 else ["data.num_workers=2"]
    straight = _cli([*args, f"hydra.run.dir={tmp_path / 'straight'}"], tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]

    run = tmp_path / "signalled"
    cmd = [sys.executable, "-m", "diffusion_train.train", *args, f"hydra.run.dir={run}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    _signal_when(proc, run / "checkpoints/step_0000010.ckpt", signal.SIGUSR1, whole_group=devices == 1)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGUSR1, err[-3000:]
    stopped = load_checkpoint(run / "checkpoints/last.ckpt")
    assert 10 <= stopped["global_step"] < 60
    assert f"SIGUSR1: saved {run / 'checkpoints/last.ckpt'} at step {stopped['global_step']}" in out
    assert not (run / "weights").exists()  # the run is not over

    resumed = _cli([*args, f"hydra.run.dir={run}"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_checkpoint(tmp_path / "straight/checkpoints/last.ckpt")
    b = load_checkpoint(run / "checkpoints/last.ckpt")
    assert a["global_step"] == b["global_step"] == 60
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert all(torch.equal(a["ema"]["weights"]["0.999"][k], w) for k, w in b["ema"]["weights"]["0.999"].items())
    assert (run / "weights/raw.safetensors").is_file()
    with open(run / "metrics.csv", newline="") as f:  # written by rank 0 alone, continued on resume
        rows = list(csv.DictReader(f))
    assert all(None not in r for r in rows) and max(int(r["step"]) for r in rows if r["step"]) >= 50


@pytest.mark.slow
def test_ddp_and_fsdp_train_like_one_process_accumulating_the_same_global_batch(tmp_path):
    """2 processes x batch 4 (DDP; FSDP full shard, stopped at step 3 and resumed; FSDP with the backbone
    compiled) = 1 process x batch 4 x 2 accumulation steps: the same samples and the same noise per micro-batch,
    so the same weights, EMA and logged loss up to float summation order; likewise 2 DDP processes accumulating 2
    micro-batches of 2 (their gradients all-reduced once a step) = 1 process x batch 2 x 4. FSDP's checkpoint is
    whole: it loads in a single process."""
    from diffusion_train.training.build import load_module

    args = [*QUICK, "callbacks.checkpoint.every_n_train_steps=2"]
    # host syncs of steps 2 and 3 (FSDP: of its first launch); logging and checkpoints at step 4 only
    watch = ["trainer.log_every_n_steps=4", "callbacks.checkpoint.every_n_train_steps=4", "callbacks.host_syncs.start=1",
             "callbacks.host_syncs.steps=2"]
    # post-hoc EMA's snapshots (syncs: at 4), and validation with an average too (swapped in on every rank's shards)
    snapshots = ["callbacks.ema.sigma_rels=[0.1]", "callbacks.ema.snapshot_every=4", "callbacks.ema.validate=[0.999]"]
    runs = {"one": ["data.batch_size=4", "training.accumulate_grad_batches=2", *snapshots],
            "ddp": [*TWO_CPUS, "+trainer.strategy=ddp", "data.batch_size=4", *watch, *snapshots],
            "one_by_4": ["data.batch_size=2", "training.accumulate_grad_batches=4"],
            "ddp_accumulating": [*TWO_CPUS, "+trainer.strategy=ddp", "data.batch_size=2",
                                 "training.accumulate_grad_batches=2"],
            # one reduce-scatter per step, in the last micro-batch's backward pass
            "fsdp_accumulating": ["trainer=fsdp", *TWO_CPUS, "trainer.precision=32-true", "data.batch_size=2",
                                  "training.accumulate_grad_batches=2",
                                  "trainer.strategy.reduce_every_micro_batch=false"],
            "fsdp": ["trainer=fsdp", *TWO_CPUS, "trainer.precision=32-true", "data.batch_size=4", *watch, *snapshots],
            # the GPU default for a U-Net (compile=auto: true), traced here with the aot_eager backend
            "fsdp_compiled": ["trainer=fsdp", *TWO_CPUS, "trainer.precision=32-true", "data.batch_size=4",
                              "training.compile=true", "+training.compile_options.backend=aot_eager"]}
    ckpts = {}
    for name, extra in runs.items():
        for steps in (3, 4) if name == "fsdp" else (4,):  # FSDP resumes its sharded weights, optimizer and EMA
            out = _cli([*args, *extra, f"trainer.max_steps={steps}", f"hydra.run.dir={tmp_path / name}"], tmp_path)
            assert out.returncode == 0, out.stderr[-6000:]
            assert "recompile_limit" not in out.stderr  # every sharded stage stays compiled
        ckpts[name] = load_checkpoint(tmp_path / name / "checkpoints/last.ckpt")
        assert ckpts[name]["global_step"] == 4 and ckpts[name]["diffusion_train"]["global_batch"] == 8

    for name in ("ddp", "fsdp"):  # no host-device sync in steps 2 and 3 (e.g. Lightning's per-step SIGTERM broadcast)
        syncs = json.loads((tmp_path / name / "host_syncs.json").read_text())
        # FSDP's first launch ends at step 3, which writes a row of metrics like a logging step
        kinds = {"other_steps": 2} if name == "ddp" else {"other_steps": 1, "logging_steps": 1}
        assert syncs["watched"]["batches"] == kinds, syncs["watched"]
        assert syncs["syncs_per_step"]["other_steps"] == 0, syncs["sites"]["other_steps"]

    def logged_loss(name: str, key: str = "train/loss") -> float:  # of step 4, rank 0's metrics.csv
        rows = csv.DictReader(open(tmp_path / name / "metrics.csv", newline=""))
        return next(float(r[key]) for r in rows if r.get(key) and int(r["step"]) == 4)

    for name in ("ddp", "fsdp"):  # the step's loss over both ranks' micro-batches, as one process accumulating them
        assert logged_loss(name) == pytest.approx(logged_loss("one"), rel=1e-5), name
        # the validation set's fixed batches split over two ranks: the same loss as one process's
        assert logged_loss(name, "val/loss") == pytest.approx(logged_loss("one", "val/loss"), rel=1e-5), name
        ema_loss = logged_loss(name, "val/loss_ema_0.999")
        assert ema_loss == pytest.approx(logged_loss("one", "val/loss_ema_0.999"), rel=1e-5), name
        raw = logged_loss(name, "val/loss")  # 4 steps in, the average is near the weights, but not within tolerance
        assert abs(ema_loss - raw) > 2e-5 * raw, name
    for run in ("ddp_accumulating", "fsdp_accumulating"):
        assert logged_loss(run) == pytest.approx(logged_loss("one_by_4"), rel=1e-5), run
        for name in ("state_dict", "ema"):
            one, other = (ckpts[r][name] if name == "state_dict" else ckpts[r]["ema"]["weights"]["0.999"]
                          for r in ("one_by_4", run))
            assert _max_diff(one, other) < 1e-6, (run, name)

    moved = _max_diff(ckpts["one"]["state_dict"], load_checkpoint(tmp_path / "one/checkpoints/step_0000002.ckpt")["state_dict"])
    assert moved > 1e-5  # two steps change the weights far more than the tolerance below
    for name in ("ddp", "fsdp", "fsdp_compiled"):
        assert _max_diff(ckpts["one"]["state_dict"], ckpts[name]["state_dict"]) < 1e-6, name
        assert _max_diff(ckpts["one"]["ema"]["weights"]["0.999"], ckpts[name]["ema"]["weights"]["0.999"]) < 1e-6, name
        assert ckpts[name]["ema"]["weights"]["0.999"].keys() == ckpts["one"]["ema"]["weights"]["0.999"].keys()

    # FSDP's snapshots are whole (rank 0 writes the gathered averages), also the one at the end of its first launch;
    # DDP's rank 0 writes its own whole averages
    names = sorted(p.name for p in (tmp_path / "fsdp/ema_snapshots").iterdir())
    assert names == ["step_0000003.safetensors", "step_0000004.safetensors"], names
    assert sorted(p.name for p in (tmp_path / "ddp/ema_snapshots").iterdir()) == ["step_0000004.safetensors"]
    one = load_file(tmp_path / "one/ema_snapshots/step_0000004.safetensors")
    for name in ("ddp", "fsdp"):
        other = load_file(tmp_path / name / "ema_snapshots/step_0000004.safetensors")
        assert one.keys() == other.keys() and _max_diff(one, other) < 1e-6, name

    module = load_module(tmp_path / "fsdp/checkpoints/last.ckpt")  # one process, no strategy
    ema = ckpts["fsdp"]["ema"]["weights"]["0.999"]
    assert all(torch.equal(p.detach(), ema[n]) for n, p in module.named_parameters() if n in ema)
