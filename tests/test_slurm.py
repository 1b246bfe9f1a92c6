"""Slurm integration: a real single-node cluster (slurm/local_cluster.sh) runs sweeps through the Hydra
submitit launcher (conf/hydra/launcher/slurm.yaml) and the sbatch template (slurm/train.sbatch); signalled
jobs checkpoint, are requeued and finish."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffusion_train.training.checkpointing import load_checkpoint

REPO = Path(__file__).resolve().parent.parent
CLUSTER_SCRIPT = REPO / "slurm" / "local_cluster.sh"
SBATCH_TEMPLATE = REPO / "slurm" / "train.sbatch"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE"}
# Small CPU jobs: no GPU request, one CPU, little memory, a short time limit (signal_delay_s below it).
LAUNCHER = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=5", "hydra.launcher.signal_delay_s=30",
            "hydra.launcher.max_num_timeout=0", "hydra.launcher.setup=['export OMP_NUM_THREADS=1']"]

pytestmark = pytest.mark.slow


def _cluster_usable() -> bool:
    """A Slurm whose default partition is up and whose accounting answers (submitit polls sacct)."""
    if not (shutil.which("sbatch") and shutil.which("sinfo") and shutil.which("sacct")):
        return False
    sinfo = subprocess.run(["sinfo", "-h", "-o", "%a"], capture_output=True, text=True, timeout=60)
    sacct = subprocess.run(["sacct", "-n", "-X", "-S", "now-1minutes"], capture_output=True, timeout=60)
    return sinfo.returncode == 0 and "up" in sinfo.stdout.split() and sacct.returncode == 0


@pytest.fixture(scope="module")
def slurm_cluster():
    """Starts the local cluster (idempotent: a no-op when it runs). Fails, never skips, when there is no
    usable cluster: CI installs and starts it (.ci/run)."""
    try:
        out = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start"], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"`bash {CLUSTER_SCRIPT} start` did not finish in {e.timeout:.0f}s")
    if out.returncode != 0 and not _cluster_usable():  # e.g. not root, but a cluster runs already: use it
        pytest.fail(f"no Slurm cluster: `bash slurm/local_cluster.sh start` exited {out.returncode} "
                    f"(it needs root and apt-get on Debian/Ubuntu)\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def _env() -> dict[str, str]:
    """The job environment: sbatch exports the submitter's environment to the job."""
    return dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1",
                PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


def _multirun(args: list[str], cwd: Path, timeout: float = 420) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffusion_train.train", "-m", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=_env())


def _job_state(job_id: str) -> str:
    out = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State"], capture_output=True, text=True)
    words = out.stdout.split() if out.returncode == 0 else []  # e.g. "COMPLETED" or "CANCELLED by 0"
    return words[0] if words else "UNKNOWN"


def _wait_for_job(job_id: str, timeout: float) -> str:
    """Polls sacct until the job reached a final state; cancels it and fails on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _job_state(job_id)
        if state in TERMINAL:
            return state
        time.sleep(1)
    subprocess.run(["scancel", job_id])
    pytest.fail(f"Slurm job {job_id} did not finish within {timeout:.0f}s (last state {_job_state(job_id)})")


def test_cluster_is_up(slurm_cluster):
    assert _cluster_usable(), subprocess.run(["sinfo"], capture_output=True, text=True).stdout


def test_hydra_slurm_launcher_trains_two_models(slurm_cluster, tmp_path):
    sweep = tmp_path / "sweep"
    t0 = time.monotonic()
    out = _multirun(["experiment=smoke", "model=unet_tiny,dit_tiny", "logger=csv", "trainer.max_steps=4",
                     "callbacks.sample_grid.every_n_steps=1000", f"hydra.sweep.dir={sweep}", *LAUNCHER], tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "Submitit 'slurm' sweep output dir" in out.stdout + out.stderr
    for model in ("unet_tiny", "dit_tiny"):
        run = next(sweep.glob(f"*model={model}*"))
        assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 4
    # Both jobs ran under Slurm (submitit wrote their logs in the sweep dir), as one array of two tasks.
    logs = sorted(p.name for p in (sweep / ".submitit").glob("*_*/*_log.out"))
    assert len(logs) == 2, logs
    print(f"two-job Slurm sweep: {time.monotonic() - t0:.0f}s")


def test_a_job_that_crashes_fails_the_multirun_with_its_error(slurm_cluster, tmp_path):
    """A bad data root composes fine, then the job raises inside Slurm: the launcher sees the failed job
    through sacct and the multirun exits non-zero with the job's error, instead of waiting for ever."""
    empty = tmp_path / "no_data"
    empty.mkdir()
    t0 = time.monotonic()
    out = _multirun(["experiment=smoke", "logger=csv", f"data.root={empty}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                     *LAUNCHER], tmp_path, timeout=300)
    elapsed = time.monotonic() - t0
    text = out.stdout + out.stderr
    assert out.returncode != 0, text[-3000:]
    assert "state: FAILED" in text and f"not found in {empty}" in text, text[-3000:]
    assert elapsed < 240, f"the failure took {elapsed:.0f}s to be reported"


def test_sbatch_template_trains_with_ddp_over_two_tasks(slurm_cluster, tmp_path):
    """slurm/train.sbatch on CPU: no GPU request, 2 srun tasks on one node = DDP with gloo across them."""
    run = tmp_path / "run"
    env = dict(_env(), PYTHON=sys.executable)
    out = subprocess.run(
        ["sbatch", "--parsable", "--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=10",
         "--job-name=dt-sbatch-test", f"--output={tmp_path / 'slurm-%j.log'}", f"--chdir={tmp_path}",
         str(SBATCH_TEMPLATE), "experiment=smoke", "trainer.accelerator=cpu", "logger=csv", "trainer.max_steps=4",
         "callbacks.sample_grid.every_n_steps=1000", f"hydra.run.dir={run}"],
        capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip().split(";")[0]
    state = _wait_for_job(job_id, timeout=300)
    log = (tmp_path / f"slurm-{job_id}.log").read_text()
    assert state == "COMPLETED", log[-4000:]
    assert "1 node(s) x 2 task(s)" in log and "srun exited with status 0" in log, log[-4000:]
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 4
    info = (run / "run.json").read_text()
    assert '"world_size": 2' in info, info


# Preemption: a signalled job checkpoints, is requeued, resumes in the same run directory and finishes.
TRAIN = ["experiment=smoke", "logger=csv", "trainer.accelerator=cpu", "trainer.max_steps=80", "data.batch_size=4",
         "callbacks.sample_grid.every_n_steps=1000", "trainer.val_check_interval=1000",
         "callbacks.checkpoint.every_n_train_steps=10"]


def _wait_for(path: Path, timeout: float, alive=lambda: True) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert alive(), f"the job ended before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout:.0f}s"
        time.sleep(0.2)


def _check_resumed(run: Path, log: str, signal_name: str) -> None:
    last = load_checkpoint(run / "checkpoints/last.ckpt")
    assert last["global_step"] == 80, log[-3000:]  # the configured total, not more, not less
    assert f"{signal_name}: saved {run / 'checkpoints/last.ckpt'} at step" in log, log[-3000:]
    stopped_at = int(log.split(f"{signal_name}: saved {run / 'checkpoints/last.ckpt'} at step ")[1].split()[0])
    assert 10 <= stopped_at < 80
    assert f"resuming {run / 'checkpoints/last.ckpt'}" in log  # the same run directory, from that step
    assert json.loads((run / "run.json").read_text())["slurm"]["restart_count"] == "1"
    assert (run / "weights/raw.safetensors").is_file()


@pytest.mark.parametrize("tasks", [1, 2])
def test_sbatch_job_signalled_before_its_time_limit_checkpoints_requeues_and_finishes(slurm_cluster, tmp_path, tasks):
    """SIGUSR1 to the batch shell (as --signal=B:USR1@N does) -> forwarded to the tasks -> checkpoint at
    the next step -> scontrol requeue -> the same job id runs again and resumes to the configured end. With 2
    tasks (DDP, and a W&B offline run that rank 0 finishes first) rank 1 waits for rank 0's requeue, which a slow
    `scontrol` (a busy controller) makes take seconds here: had rank 1 exited first, srun (--kill-on-bad-exit) would
    have ended rank 0 before the requeue."""
    run, log = tmp_path / "run", tmp_path / "job.log"
    train_args = TRAIN if tasks == 1 else [a for a in TRAIN if a != "logger=csv"] + ["logger=default"]
    slow = tmp_path / "bin" / "scontrol"
    slow.parent.mkdir()
    slow.write_text(f"#!/bin/bash\nsleep 3\nexec {shutil.which('scontrol')} \"$@\"\n")
    slow.chmod(0o755)
    env = dict(_env(), PYTHON=sys.executable, PATH=f"{slow.parent}{os.pathsep}{os.environ['PATH']}")
    out = subprocess.run(["sbatch", "--parsable", "--gpus-per-node=0", f"--ntasks-per-node={tasks}",
                          "--cpus-per-task=1", "--time=10", f"--output={log}", f"--chdir={tmp_path}",
                          str(SBATCH_TEMPLATE), *train_args, f"hydra.run.dir={run}"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip().split(";")[0]
    _wait_for(run / "checkpoints/step_0000010.ckpt", 180)
    assert subprocess.run(["scancel", "--batch", "--signal=USR1", job]).returncode == 0
    state = _wait_for_job(job, 300)
    text = log.read_text()
    assert state == "COMPLETED", text[-3000:]
    assert "requeued Slurm job" in text
    _check_resumed(run, text, "SIGUSR1")
    assert json.loads((run / "run.json").read_text())["world_size"] == tasks
    if tasks == 2:  # one W&B run, continued by the requeued job
        wandb_id = (run / "wandb_id.txt").read_text().strip()
        assert len(list((run / "wandb").glob(f"offline-run-*-{wandb_id}/run-{wandb_id}.wandb"))) == 2


def test_submitit_job_signalled_checkpoints_is_requeued_by_submitit_and_the_sweep_returns(slurm_cluster, tmp_path):
    """Hydra's Slurm launcher: submitit's own signal (USR2) -> checkpoint at the next step -> submitit's
    handler requeues the job -> the requeued job resumes; the multirun waits for it and succeeds."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "diffusion_train.train", "-m", *LAUNCHER, *TRAIN, "seed=0",
           f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=job", "hydra.launcher.max_num_timeout=3"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = sweep / "job"
    try:
        _wait_for(run / "checkpoints/step_0000010.ckpt", 240, alive=lambda: proc.poll() is None)
        jobs = [p.name for p in (sweep / ".submitit").iterdir() if p.name[0].isdigit()]
        assert len(jobs) == 1, jobs
        assert subprocess.run(["scancel", "--signal=USR2", jobs[0]]).returncode == 0
        out, err = proc.communicate(timeout=360)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, (out + err)[-3000:]
    logs = "".join(p.read_text() for p in sorted((sweep / ".submitit" / jobs[0]).glob("*.out")))
    logs += (run / "train.log").read_text() if (run / "train.log").exists() else ""
    _check_resumed(run, logs, "SIGUSR2")
