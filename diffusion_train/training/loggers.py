"""Loggers that continue, rather than restart, when a run resumes; the console progress bar."""

from __future__ import annotations

import csv
import os
import secrets
from pathlib import Path

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from diffusion_train.files import atomic_write


class _AppendingWriter(ExperimentWriter):
    """Keeps an existing metrics.csv, dropping rows after ``resume_step`` (they will be logged again): all of
    them when the run starts afresh (``None``: a launch stopped before its first checkpoint)."""

    def __init__(self, log_dir: str, resume_step: int | None):
        self._resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # the parent deletes metrics.csv here; we keep it
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            keys, rows = list(reader.fieldnames or []), list(reader)
        rows = [r for r in rows if r.get("step") not in (None, "") and int(r["step"]) <= (self._resume_step or 0)]

        def write(tmp: Path) -> None:  # a kill while it is rewritten leaves the whole history, never a part
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=keys)
                writer.writeheader()
                writer.writerows(rows)

        atomic_write(path, write)
        self.metrics_keys = sorted(keys)


class OptimizerStepAxis:
    """Loggers whose ``step`` is the run's optimizer step (``trainer.global_step``), as in checkpoints,
    summary.json, sample grids and evaluations. Lightning would pass its count of batches minus one: with
    the module's own gradient accumulation that is several batches per step, and without it one step behind.
    ``train.py`` points the logger at the trainer (:meth:`follow`); before that, the given step is kept."""

    _trainer = None

    def follow(self, trainer) -> None:
        self._trainer = trainer

    def log_metrics(self, metrics, step=None) -> None:
        if self._trainer is not None:
            step = self._trainer.global_step
        super().log_metrics(metrics, step=step)


class ResumableCSVLogger(OptimizerStepAxis, CSVLogger):
    """``<save_dir>/metrics.csv``; on resume, rows up to the resumed step are kept."""

    def __init__(self, save_dir: str, resume_step: int | None = None, flush_logs_every_n_steps: int = 100):
        super().__init__(save_dir=save_dir, name="", version="", flush_logs_every_n_steps=flush_logs_every_n_steps)
        self._resume_step = resume_step

    def resume_from(self, step: int | None) -> None:
        """Rows logged after ``step`` are dropped when the file is opened (they are logged again)."""
        if self._experiment is not None:
            raise RuntimeError("ResumableCSVLogger.resume_from must be called before anything is logged")
        self._resume_step = step

    @property
    @rank_zero_experiment  # other ranks get a stand-in: only rank 0 reads and writes metrics.csv
    def experiment(self):
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(self.log_dir, self._resume_step)
        return self._experiment


def wandb_mode(mode: str) -> str:
    """``auto`` is online when W&B credentials are configured and WANDB_MODE does not say otherwise."""
    if mode != "auto":
        if mode not in ("online", "offline", "disabled"):
            raise ValueError(f"logger.wandb.mode must be auto, online, offline or disabled, got {mode!r}")
        return mode
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled"):
        return env
    netrc = Path.home() / ".netrc"
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())
    return "online" if has_key else "offline"


def persistent_run_id(run_dir: str | os.PathLike, filename: str = "wandb_id.txt") -> str:
    """The W&B run id stored in the run directory: created once, never changed, so a resumed or
    requeued run continues the same W&B run. Several processes may ask at once (the ranks of a job):
    the id is written to a temp file and linked into place, so every reader sees the whole id."""
    path = Path(run_dir) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file():
        tmp = path.with_name(f".{filename}.{os.getpid()}.{secrets.token_hex(4)}")
        tmp.write_text(secrets.token_hex(4) + "\n")
        try:
            os.link(tmp, path)  # atomic; fails if another process got there first
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return path.read_text().strip()


class RunWandbLogger(OptimizerStepAxis, WandbLogger):
    """Lightning's W&B logger on the optimizer-step axis (``trainer/global_step``)."""


def wandb_logger(save_dir: str, name: str, project: str = "diffusion_train", mode: str = "auto",
                 entity: str | None = None, tags: list[str] | None = None, group: str | None = None) -> WandbLogger:
    """A W&B logger that always continues the run directory's own W&B run (``resume="allow"``)."""
    mode = wandb_mode(mode)
    os.environ.setdefault("WANDB_SILENT", "true")
    return RunWandbLogger(save_dir=save_dir, name=name, project=project, id=persistent_run_id(save_dir),
                       resume="allow", offline=mode == "offline", mode=mode, entity=entity,
                       tags=list(tags or []), group=group)


def log_run_config(loggers: list, run_info: dict) -> None:
    """The run's resolved config, and under ``run`` what run.json adds (global batch, world size, learning rate,
    git SHA, Slurm job, ...), as the W&B runs' config: W&B's filters, tables and sweeps read it."""
    if not run_info:
        return
    params = {**run_info["config"], "run": {k: v for k, v in run_info.items() if k != "config"}}
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            lg.log_hyperparams(params)


def finish_wandb(loggers: list, exit_code: int = 0) -> None:
    """Ends the W&B runs of ``loggers`` (those this process started) with ``exit_code`` (W&B marks a run that ends
    with another code than 0 as failed). W&B keeps one run per process: a run left open would take the logging of
    the next job of a local sweep, which runs in the same process."""
    for lg in loggers:
        if isinstance(lg, WandbLogger) and getattr(lg, "_experiment", None) is not None:
            lg._experiment.finish(exit_code=exit_code)
            lg._experiment = None


class LossProgressBar(TQDMProgressBar):
    """Lightning's progress bar, showing ``train/loss`` read from the device at each refresh only. Logging the
    loss with ``prog_bar=True`` instead would make Lightning read it to the host after every batch (a device
    sync per step), whatever the refresh rate."""

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            metrics["train/loss"] = f"{float(loss):.4g}"
        return metrics
