"""The run directory: its files, its identity and whether a checkpoint in it may be resumed."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from diffusion_train.cli import UserError
from diffusion_train.training.checkpointing import last_checkpoint, load_checkpoint

log = logging.getLogger(__name__)

# Config groups that define the network's weights: a checkpoint only resumes under the same values.
MODEL_KEYS = ("model", "conditioning", "autoencoder", "diffusion")


class ResumeMismatchError(ValueError):
    """The run directory holds a checkpoint of a different model."""


def git_sha(path: str | os.PathLike | None = None) -> str | None:
    cwd = Path(path or __file__).resolve()
    cwd = cwd if cwd.is_dir() else cwd.parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def resolved(cfg: DictConfig) -> dict:
    """The fully resolved config as plain containers; a missing value fails here, naming its key."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def model_signature(config: dict) -> dict:
    """The config groups that define the network, and a fine-tune's settings but its training-only ones (a LoRA's
    alpha scales every trained update: another one is another function of the same weights)."""
    signature = {k: config.get(k) for k in MODEL_KEYS}
    finetune = config.get("finetune") or {}
    if finetune.get("method", "none") != "none":
        signature["finetune"] = {k: v for k, v in finetune.items() if k not in ("dropout", "train_conditioner")}
    return signature


def differences(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """The differing values of two configs, ``(dotted key, a's, b's)`` in key order. A key that one side lacks
    counts as null there: an option added to a config later, whose null default is the behaviour from before it
    existed, does not stop a resume."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += differences(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if a == b else [(prefix, a, b)]


class Resumable(NamedTuple):
    """The checkpoint a run resumes from (None: a fresh run), its step, the global batch it was trained with, the
    sizes of its optimizer's parameter groups, whether it is another run's (this launch branches; see
    ``check_resumable``), the checkpoint and step the run branched from, in this launch or an earlier one, the
    shapes of its weights and the names of its EMA averages."""
    ckpt: Path | None = None
    step: int | None = None
    global_batch: int | None = None
    param_groups: list[int] | None = None
    branched: bool = False
    branched_from: dict | None = None
    shapes: dict[str, tuple[int, ...]] | None = None  # the checkpoint's weights: name -> shape
    ema_averages: list[str] | None = None  # None: the checkpoint has no EMA


def branch_checkpoint(spec: str | os.PathLike) -> Path:
    """The checkpoint ``init.branch_from`` names: a checkpoint file, or a run directory (its ``last.ckpt``)."""
    path = Path(os.path.normpath(Path(spec).expanduser()))  # a sweep's ${run_dir}/../<trunk>/... made plain
    if path.is_dir():
        found = last_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"init.branch_from={spec}: the run directory has no checkpoints (last.ckpt or "
                                    f"step_*.ckpt); train it first")
        return found
    if not path.is_file():
        raise FileNotFoundError(f"init.branch_from={spec}: no such checkpoint or run directory")
    return path


def check_resumable(run_dir: str | os.PathLike, config: dict, branch_from: str | os.PathLike | None = None
                    ) -> Resumable:
    """What the run directory resumes from (all None for a fresh run); refuses a checkpoint of another model.

    Without a checkpoint of its own, a run with ``branch_from`` (another run's checkpoint, or its run directory)
    starts from that checkpoint's whole training state, as a resumed run would: a branch. Once the branch has
    saved, its own checkpoints come first."""
    ckpt = last_checkpoint(run_dir)
    branched = ckpt is None and bool(branch_from)
    if branched:
        ckpt = branch_checkpoint(branch_from)
    if ckpt is None:
        return Resumable()
    state = load_checkpoint(ckpt)
    saved = state.get("diffusion_train", {}).get("config")
    if saved is None:
        raise ResumeMismatchError(f"{ckpt} was not written by diffusion_train (no run metadata); refusing to resume")
    diffs = [f"{key}: checkpoint has {old!r}, config has {new!r}"
             for key, old, new in differences(model_signature(saved), model_signature(config))]
    if diffs:
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        fix = ("init.branch_from names another model's checkpoint" if branched else
               "choose another run_name (or hydra.run.dir) for a new run")
        raise ResumeMismatchError(
            f"refusing to {'branch from' if branched else 'resume'} {ckpt}: it belongs to a different model config "
            f"({shown}). Nothing was changed; {fix}")
    if not branched and saved.get("seed") != config.get("seed"):  # a branch may take another seed on purpose
        raise ResumeMismatchError(
            f"refusing to resume {ckpt}: it was trained with seed={saved.get('seed')}, this config has "
            f"seed={config.get('seed')} (the data order and every noise draw follow it). Nothing was changed; keep "
            f"the run's seed, or choose another run_name (or hydra.run.dir) for a new run")
    batch = state["diffusion_train"].get("global_batch")
    groups = [len(g["params"]) for g in (state.get("optimizer_states") or [{}])[0].get("param_groups", [])]
    step = int(state["global_step"])
    origin = {"checkpoint": str(ckpt), "step": step} if branched else state["diffusion_train"].get("branched_from")
    shapes = {k: tuple(v.shape) for k, v in state.get("state_dict", {}).items() if isinstance(v, torch.Tensor)}
    ema = (state.get("ema") or {}).get("weights")
    return Resumable(ckpt, step, None if batch is None else int(batch), groups or None, branched, origin, shapes,
                     None if ema is None else list(ema))


def check_weights(resume: Resumable, module: torch.nn.Module) -> None:
    """Refuses a checkpoint whose weights do not fit the module this config builds: a task, a fine-tune or the
    data's channels change the network outside the config groups :func:`check_resumable` compares. Called before
    anything is written."""
    if resume.shapes is None:
        return
    own = {k: tuple(v.shape) for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}
    differ = [f"{k} missing" for k in sorted(own.keys() - resume.shapes.keys())]
    differ += [f"{k} not in the model" for k in sorted(resume.shapes.keys() - own.keys())]
    differ += [f"{k} {list(resume.shapes[k])} in the checkpoint, {list(own[k])} in the model"
               for k in sorted(own.keys() & resume.shapes.keys()) if own[k] != resume.shapes[k]]
    if differ:
        shown = "; ".join(differ[:3]) + (f"; and {len(differ) - 3} more" if len(differ) > 3 else "")
        raise ResumeMismatchError(
            f"refusing to {'branch from' if resume.branched else 'resume'} {resume.ckpt}: its weights do not fit "
            f"the model this config builds ({shown}). Nothing was changed; task, finetune and the data's channels "
            f"change the network: keep the run's own, or choose another run_name for a new run")


def check_global_batch(ckpt: Path | None, trained_with: int | None, batch: int, how: str) -> None:
    """Refuses to resume ``ckpt`` with another global batch: the data position and the images seen count the
    batches of the one it was trained with. ``how``: this launch's batch, in words."""
    if ckpt is not None and trained_with is not None and trained_with != batch:
        raise ResumeMismatchError(
            f"refusing to resume {ckpt}: it was trained with a global batch of {trained_with}, this launch has "
            f"{batch} ({how}); the data position and the images seen count its batches. Keep it "
            f"(scale.global_batch={trained_with} holds it on any number of devices) or choose another run_name")


def check_param_groups(resume: Resumable, groups: list[int], setting: str) -> None:
    """Refuses to resume a checkpoint whose optimizer groups its parameters otherwise (``groups``: this config's
    group sizes, ``setting`` what makes them); its moments would not fit."""
    if resume.param_groups is not None and resume.param_groups != groups:
        raise ResumeMismatchError(
            f"refusing to resume {resume.ckpt}: its optimizer has parameter groups of {resume.param_groups} tensors, "
            f"this config makes {groups} ({setting}); resume with the run's own setting or choose another run_name")


def check_ema_averages(resume: Resumable, averages: list[str] | None) -> None:
    """Refuses a checkpoint whose EMA averages are not those the config's EMA callback keeps (``averages``; None:
    no EMA callback): they are restored into it, and another set cannot be."""
    if resume.ema_averages is not None and averages is not None and set(resume.ema_averages) != set(averages):
        raise ResumeMismatchError(
            f"refusing to {'branch from' if resume.branched else 'resume'} {resume.ckpt}: it holds the EMA averages "
            f"{resume.ema_averages}, this config keeps {averages} (callbacks.ema.decays, callbacks.ema.sigma_rels). "
            f"Nothing was changed; keep the run's averages or choose another run_name")


class RunDirBusyError(UserError):
    """Another live launch holds the run directory."""


def hold_run_dir(run_dir: str | os.PathLike):
    """Rank 0's exclusive hold on ``run_dir`` for one launch (an ``flock`` on ``run_dir/.lock``, which the system
    drops when the process ends, however it ends): a second live launch in the same directory (two jobs with one
    run_name, a relaunch while the first job still runs) is refused, naming the holder, before it touches anything
    (it would delete the first's checkpoint being written, cut its metrics.csv and log into its W&B run). Returns
    the open lock file (close it to let go), or None where the file system has no locks (a warning)."""
    import fcntl
    import socket

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunDirBusyError(f"run directory {run_dir} is in use by {holder}; wait for it to end, or give this "
                              f"launch another run_name") from None
    except OSError as e:  # a file system without locks
        handle.close()
        log.warning("cannot lock run directory %s (%s): nothing stops a second launch from using it", run_dir, e)
        return None
    job = os.environ.get("SLURM_JOB_ID")
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()} on {socket.gethostname()}" + (f" (Slurm job {job})" if job else ""))
    handle.flush()
    return handle


# Settings that decide how many processes a job runs: swept in a local multirun, each process that Lightning adds
# re-runs the whole multirun (its command line), in step with the first one only while every job runs as many.
PROCESS_KEYS = ("trainer", "trainer.devices", "trainer.num_nodes", "trainer.strategy", "trainer.accelerator")


def check_multirun(cfg: DictConfig) -> None:
    """Refuses, before any work, a multirun whose jobs would get in each other's way, naming what it sweeps (read
    from its ``multirun.yaml``): one whose job directories are named by ``scaling.point`` alone (an IsoFLOP sweep's
    ``hydra.sweep.subdir: ${scaling.point}``) and that sweeps something else too (two jobs would share a directory,
    the second resuming the first's run; on Slurm both writing it at once); and a local one (Hydra's basic
    launcher) that sweeps the number of processes (a job with more processes than the one before would wait for
    ever for peers that are still in the other job)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return
    hydra = HydraConfig.get()
    file = Path(hydra.sweep.dir) / "multirun.yaml"
    if hydra.mode != RunMode.MULTIRUN or not file.is_file():
        return
    multirun = OmegaConf.load(file).hydra
    overrides = [*multirun.overrides.task, *(f"{k}={v}" for k, v in (multirun.sweeper.params or {}).items())]
    swept = sorted({o.get_key_element().lstrip("+~") for o in OverridesParser.create().parse_overrides(overrides)
                    if o.is_sweep_override()})
    point = OmegaConf.select(cfg, "scaling.point", default=None)
    others = [k for k in swept if k != "scaling.point"]
    if point is not None and str(hydra.sweep.subdir) == str(point) and others:
        raise ValueError(f"this multirun sweeps {', '.join(others)} besides scaling.point, but its job directories are "
                         f"named by the point alone (hydra.sweep.subdir={point}): jobs would share one; sweep the "
                         f"other settings in separate multiruns with their own run_name (e.g. run_name=<name>_seed1 "
                         f"seed=1)")
    processes = [k for k in swept if k in PROCESS_KEYS]
    if processes and hydra.launcher.get("_target_", "").endswith("BasicLauncher"):
        raise ValueError(f"this local multirun sweeps {', '.join(processes)}: a job's extra processes re-run the "
                         f"whole multirun, so jobs with different numbers of processes wait for each other for ever; "
                         f"launch one multirun per setting, or sweep with hydra/launcher=slurm")


def run_info(config: dict, overrides: list[str], world_size: int, global_batch: int,
             slurm: dict | None = None, **extra: Any) -> dict:
    """What run.json and every checkpoint record: the config, the overrides, the code and the scale
    (world size, global batch and ``extra`` such as the per-device batch and the scaled learning rate)."""
    info = {"config": config, "overrides": list(overrides), "git_sha": git_sha(), "world_size": int(world_size),
            "global_batch": int(global_batch), **extra, "torch": str(torch.__version__),
            "python": sys.version.split()[0]}
    if slurm:
        info["slurm"] = slurm
    return info


def write_run_files(run_dir: str | os.PathLike, info: dict) -> None:
    """config.yaml (resolved), overrides.yaml and run.json, each written atomically."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    files = {"config.yaml": yaml.safe_dump(info["config"], sort_keys=False),
             "overrides.yaml": yaml.safe_dump(info["overrides"]),
             "run.json": json.dumps({k: v for k, v in info.items() if k != "config"}, indent=2)}
    for name, text in files.items():
        tmp = run_dir / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(run_dir / name)
