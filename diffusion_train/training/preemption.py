"""Preemption: a signal only sets a flag; the run checkpoints at the next step boundary, then stops.

Slurm warns a job before its time limit with a signal (``--signal=B:USR1@90`` in ``slurm/train.sbatch``,
forwarded to every task; ``USR2`` from Hydra's submitit launcher) and preempts or cancels it with
SIGTERM. Saving inside a signal handler is unsafe (the handler interrupts whatever the step was doing,
and every rank must join the save), so the handler only records the signal. After each optimizer step
the ranks agree whether any of them was signalled (one all-reduce of one integer on a CPU process
group: no device sync), and if so all of them save ``last.ckpt`` together and the fit stops. A
checkpoint taken there holds everything up to that step, so the resumed run repeats nothing and loses
only the step in flight.

Work at a step boundary that can take minutes (sample grids and Fréchet distances, during training and at the
end of the fit) asks :func:`stopping` before it starts and between its batches, so a signal that comes during
it checkpoints that step and stops the run too. At the end of the fit the last step is checkpointed before that
work starts (:func:`checkpoint_step`), and the handler stays installed until the run's final export is written:
a signal there loses no training. A run resumed at its last step does the end-of-fit work that is missing
(``training.periodic``).

After the stop a requeue signal requeues the Slurm job: through submitit's own handler when submitit launched
the job (:func:`hand_over`, once the run is over), else with ``scontrol requeue`` from rank 0 while the other ranks
wait for it (:func:`requeue`); SIGTERM just exits, since Slurm requeues a preempted job itself and a cancelled one
must stay cancelled.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist

from diffusion_train.training.ema import find_ema
from diffusion_train.training.parallel import is_last_step
from diffusion_train.training.step_end import StepEndCallback
from diffusion_train.training.syncs import host_side

log = logging.getLogger("diffusion_train")

_NONE, _EXIT, _REQUEUE = 0, 1, 2  # agreed across ranks with a MAX all-reduce: a requeue wins


class Preemption(StepEndCallback):
    """Checkpoints ``<dirpath>/last.ckpt`` at the first step boundary after one of ``requeue_signals``
    or ``exit_signals`` reached any rank, then stops the fit (see the module docstring).

    After the fit, ``stopped_by`` names the signal (None: not stopped), ``requeue`` says whether the
    job should be requeued and ``previous_handlers`` holds the handlers this callback replaced.
    """

    def __init__(self, dirpath: str, requeue_signals: tuple[str, ...] = ("SIGUSR1", "SIGUSR2"),
                 exit_signals: tuple[str, ...] = ("SIGTERM",)):
        super().__init__()
        self.dirpath = Path(dirpath)
        self.requeue_signals = [_signum(s, "requeue_signals") for s in requeue_signals]
        self.exit_signals = [_signum(s, "exit_signals") for s in exit_signals]
        self.received: int | None = None  # set by the handler, in this process
        self.signum: int | None = None  # the signal the ranks stopped for
        self.stopped_by: str | None = None
        self.requeue = False
        self.previous_handlers: dict[int, Any] = {}
        self._group = None
        self._saved_step: int | None = None  # the step last.ckpt holds, when this launch knows it
        self.start_step: int | None = None  # the optimizer step this launch's fit started at

    # -- the handler: a flag, nothing else --------------------------------------------------------
    def _handle(self, signum: int, frame) -> None:
        if self.received is None or signum in self.requeue_signals:
            self.received = signum

    def install(self) -> None:
        """Points the signals at this callback (main thread only); remembers what was there before."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (*self.requeue_signals, *self.exit_signals):
            self.previous_handlers.setdefault(signum, signal.getsignal(signum))
            signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self.previous_handlers.items():
            if signal.getsignal(signum) == self._handle:
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    # -- Lightning hooks -----------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._group is None and trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            self._group = dist.new_group(backend="gloo")  # every rank calls setup: a collective call

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Before the data loaders fork their workers, which then inherit a handler that only sets a flag
        # (their own DataLoader worker_init_fn may also ignore the signals).
        if self.stopped_by is not None:  # a stop of an earlier fit; a signal received since install() is kept
            self.received, self.signum, self.stopped_by, self.requeue = None, None, None, False
        self.install()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning put its own SIGTERM handler in after on_fit_start: this one goes back in after it.
        super().on_train_start(trainer, pl_module)
        own = trainer.ckpt_path and Path(trainer.ckpt_path).resolve() == (self.dirpath / "last.ckpt").resolve()
        self._saved_step = trainer.global_step if own else None  # resumed from last.ckpt (a branch: another run's)
        self.start_step = trainer.global_step
        self.install()
        if signal.SIGTERM in self.previous_handlers and signal.getsignal(signal.SIGTERM) == self._handle:
            _lightning_sigterm_broadcast(trainer, enabled=False)
            # a SIGTERM since Lightning's handler went in (the fit's set-up) reached this handler too, through it:
            # this flag stops the run at the first step boundary, with its checkpoint; Lightning's would raise
            connector = getattr(trainer, "_signal_connector", None)
            if self.received is not None and getattr(connector, "received_sigterm", False):
                connector.received_sigterm = False

    def on_step_end(self, trainer: L.Trainer, pl_module, step: int) -> None:
        self.stop_if_signalled(trainer)

    def stop_if_signalled(self, trainer: L.Trainer) -> bool:
        """At a step boundary: whether any rank was signalled (every rank calls this, as often as the others).
        The first time one was, this step is checkpointed and the fit told to stop."""
        if self.stopped_by is not None:
            return True
        decision = self._agree(_NONE if self.received is None else
                               _REQUEUE if self.received in self.requeue_signals else _EXIT)
        if decision == _NONE:
            return False
        name = self._stop(decision)
        self.save(trainer)
        trainer.should_stop = True
        _no_validation_for_the_stop(trainer)
        if trainer.is_global_zero:
            log.warning("%s: saved %s at step %d and stopping%s", name, self.dirpath / "last.ckpt",
                        trainer.global_step, "; the job will be requeued" if self.requeue else "")
        return True

    def signalled_before_fit(self) -> bool:
        """Before the fit (work that has no checkpoint to save and no process group to agree on, e.g. DreamBooth's
        class images): whether this process was signalled. If so the run stops there, as after a fit stopped by it."""
        if self.stopped_by is None and self.received is not None:
            self._stop(_REQUEUE if self.received in self.requeue_signals else _EXIT)
        return self.stopped_by is not None

    def _stop(self, decision: int) -> str:
        self.requeue = decision == _REQUEUE
        self.signum = self.received if self.received is not None else \
            (self.requeue_signals if self.requeue else self.exit_signals)[0]  # only another rank was signalled
        self.stopped_by = signal.Signals(self.signum).name
        return self.stopped_by

    def save(self, trainer: L.Trainer) -> None:
        """``last.ckpt`` at this step, unless it holds this step already. Every rank calls it: sharded states
        gather here."""
        step, last = trainer.global_step, self.dirpath / "last.ckpt"
        if not (step == self._saved_step or any(getattr(cb, "_last_global_step_saved", None) == step and cb.save_last
                                                for cb in trainer.checkpoint_callbacks)):
            ema = find_ema(trainer)
            with ema.unswapped() if ema is not None else contextlib.nullcontext():  # an evaluation may be sampling
                trainer.save_checkpoint(last, weights_only=False)
            self._saved_step = step
            for cb in trainer.checkpoint_callbacks:  # this step is saved: no second save as the epoch ends ...
                every = getattr(cb, "_every_n_train_steps", 0)
                if hasattr(cb, "_last_global_step_saved") and not (every and step % every == 0):
                    cb._last_global_step_saved = step  # ... unless a periodic file is due: its callback writes it
        for cb in trainer.checkpoint_callbacks:  # nor as the fit ends (ModelCheckpoint.on_train_end writes last.ckpt
            if getattr(cb, "save_last", False) and not getattr(cb, "_last_checkpoint_saved", True):  # once a launch)
                cb._last_checkpoint_saved = str(last)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The handler stays: the end-of-fit work (evaluations, the export) is still to come, and a signal during
        # it must neither kill the process nor be dropped. ``train`` uninstalls it when the run is over. The last
        # step is saved by the first evaluation that ends the fit (``checkpoint_step``), else by ``train``.
        _lightning_sigterm_broadcast(trainer, enabled=True)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.uninstall()
        _lightning_sigterm_broadcast(trainer, enabled=True)

    def _agree(self, local: int) -> int:
        if self._group is None:
            return local
        with host_side():  # a CPU tensor on a CPU process group: no device involved
            flag = torch.tensor([local], dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
            return int(flag.item())


def _no_validation_for_the_stop(trainer: L.Trainer) -> None:
    """Lightning validates after a step that sets ``should_stop`` even when no validation is due. A stop for a signal
    skips that one: the job's last seconds go to the requeue, and the logs stay those of an uninterrupted run. A
    validation due at this step still runs (the resumed run takes it as done), the fit's last step's too: a run
    resumed at ``max_steps`` validates nothing more."""
    loop, fetcher = trainer.fit_loop.epoch_loop, getattr(trainer.fit_loop, "_data_fetcher", None)
    if fetcher is None or not hasattr(loop, "_skip_next_val") or not trainer.training:
        return
    trainer.should_stop = False
    try:
        due = loop._should_check_val_fx(fetcher) or is_last_step(trainer, trainer.global_step)
    finally:
        trainer.should_stop = True
    if not due:
        loop._skip_next_val = True


def _lightning_sigterm_broadcast(trainer: L.Trainer, enabled: bool) -> None:
    """Lightning (2.5 and later) broadcasts a SIGTERM flag from rank 0 before every batch of a multi-process
    run. That is a tensor made on the device, a broadcast and an ``.item()``, so the host waits for the GPU
    at every step. While this callback's handler holds SIGTERM, Lightning's handler is not installed and its
    flag is never set, so the broadcast is switched off; this callback agrees on signals itself, at step
    boundaries, on a CPU process group."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    if loop is None or not hasattr(type(loop), "_broadcast_sigterm_tensor"):
        return
    if enabled:
        loop.__dict__.pop("_broadcast_sigterm_tensor", None)
    else:
        loop._broadcast_sigterm_tensor = lambda: None


def _signum(name: str, key: str) -> int:
    sig = getattr(signal, str(name), None)
    if not isinstance(sig, signal.Signals):
        raise ValueError(f"callbacks.preemption.{key}: {name!r} is not a signal name (e.g. SIGUSR1, SIGTERM)")
    return int(sig)


def find_preemption(trainer: L.Trainer) -> Preemption | None:
    return next((c for c in trainer.callbacks if isinstance(c, Preemption)), None)


def stopping(trainer: L.Trainer) -> bool:
    """For long work at a step boundary (evaluations): whether the run is stopping for a signal. Ask before the
    work and between its batches; every rank must ask as often as the others (the ranks agree). The first yes
    checkpoints this step and stops the fit."""
    preemption = find_preemption(trainer)
    return preemption is not None and preemption.stop_if_signalled(trainer)


def checkpoint_step(trainer: L.Trainer) -> None:
    """``last.ckpt`` at this step (every rank calls it), unless it holds it already: before the end-of-fit work,
    so that a signal during that work loses no training. Without a ``Preemption`` callback, nothing."""
    preemption = find_preemption(trainer)
    if preemption is not None:
        preemption.save(trainer)


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` for an array task, else the job id."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def slurm_identity() -> dict | None:
    """The Slurm job this process runs in (recorded in run.json), or None outside Slurm."""
    if not os.environ.get("SLURM_JOB_ID"):
        return None
    keys = {"job_id": "SLURM_JOB_ID", "array_job_id": "SLURM_ARRAY_JOB_ID", "array_task_id": "SLURM_ARRAY_TASK_ID",
            "restart_count": "SLURM_RESTART_COUNT", "nodes": "SLURM_JOB_NODELIST", "partition": "SLURM_JOB_PARTITION"}
    return {k: os.environ[v] for k, v in keys.items() if os.environ.get(v)}


def hand_over(callback: Preemption, is_global_zero: bool) -> None:
    """After a requeue signal, at the end of the run on rank 0: a handler that was there before training
    (submitit's: it requeues the job and exits the process) gets the signal, now that the checkpoint is safe."""
    previous = callback.previous_handlers.get(callback.signum)
    if callback.requeue and is_global_zero and callable(previous):
        log.info("handing %s to the handler that was installed before training (e.g. submitit's requeue)",
                 callback.stopped_by)
        previous(callback.signum, None)


def requeue(callback: Preemption, is_global_zero: bool, step: int) -> None:
    """After a requeue signal without a handler from before training (:func:`hand_over`), rank 0 requeues the
    Slurm job with ``scontrol requeue``, which ends the job's processes and queues it again; the caller keeps
    the other ranks waiting meanwhile. Outside Slurm there is nothing to requeue and relaunching the same
    command resumes. A requeued launch whose fit stopped at ``step``, the step it started at, made no training
    step in its whole allocation (e.g. an end-of-fit evaluation longer than the job's time limit, which starts
    again each time): it is not requeued again, which would repeat that for ever."""
    if not (callback.requeue and is_global_zero) or callable(callback.previous_handlers.get(callback.signum)):
        return
    job = slurm_job_id()
    if job is None:
        log.warning("not running under Slurm: nothing to requeue; relaunch the same command to resume")
        return
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    if restarts and callback.start_step is not None and step == callback.start_step:
        log.error("not requeueing Slurm job %s: this launch (restart %d) made no training step from step %d before "
                  "its time ran out, so another would do the same; give the job more time (sbatch --time) or less "
                  "work at a step (fewer FID samples), then submit the same command to resume", job, restarts, step)
        return
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    if result.returncode == 0:
        log.warning("requeued Slurm job %s", job)
    else:
        log.error("scontrol requeue %s failed (%d): %s", job, result.returncode, result.stderr.strip())
