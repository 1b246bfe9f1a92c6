"""Evaluations every N optimizer steps and at the end of the fit, and what makes them survive preemption.

A run can be stopped by a signal at any point of that work (:mod:`~diffusion_train.training.preemption`), and
it must resume with nothing missing and nothing done twice. :class:`PeriodicEvaluation` (the base of the sample
grids and the Fréchet distances):

- asks :func:`~diffusion_train.training.preemption.stopping` before each evaluation (the evaluation itself can
  ask again between its batches): after a signal the step is checkpointed and no evaluation starts;
- at the end of the fit, checkpoints the last step before evaluating;
- at the start of a launch, looks for its own output of the step the run resumes from: an evaluation that was
  due there and is missing (the last launch was stopped before or during it) is made then, one that is there
  is not made again. A branch (``init.branch_from``) does not make the evaluation of its branch step: that is
  the trunk's, which has it.

Lightning ends a fit that resumes at ``max_steps`` before it starts, without calling ``on_train_start`` and
``on_train_end``, so a run stopped during its end-of-fit evaluations would never make them.
:func:`finish_resumed_runs` gives the trainer a fit loop that calls those two hooks in that case.

Validation (``val/loss``) is Lightning's own, after the step's checkpoint: a run killed hard during it (out of
memory, a lost node) resumes from that checkpoint, and Lightning takes the validation as done. The same fit loop
makes it first when the run's summary lacks it (:func:`_validate_if_missing`).
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loops.fit_loop import _FitLoop

from diffusion_train.training.parallel import is_last_step
from diffusion_train.training.preemption import checkpoint_step, stopping


class PeriodicEvaluation(L.Callback):
    """Calls :meth:`evaluate` every ``every_n_steps`` optimizer steps and at the end of the fit, once per step
    (see the module docstring). Subclasses give :meth:`evaluate` and :meth:`done_at`."""

    def __init__(self, every_n_steps: int) -> None:
        super().__init__()
        self.every_n_steps = int(every_n_steps)
        self._last_step = -1

    def evaluate(self, trainer: L.Trainer, pl_module) -> object:  # every rank calls it
        raise NotImplementedError

    def done_at(self, step: int) -> bool:
        """Whether this evaluation's output of ``step`` exists (asked on rank 0 only)."""
        raise NotImplementedError

    def due(self, step: int) -> bool:
        return step > 0 and step % self.every_n_steps == 0

    def _evaluate_once(self, trainer: L.Trainer, pl_module) -> None:
        step = trainer.global_step
        if step == self._last_step or stopping(trainer):
            return
        self._last_step = step
        self.evaluate(trainer, pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        step = trainer.global_step
        origin = (getattr(pl_module, "run_info", None) or {}).get("branched_from")
        if origin is not None and origin.get("step") == step:  # a branch at its branch step: the trunk's evaluation
            self._last_step = step
        elif trainer.strategy.broadcast(self.done_at(step) if trainer.is_global_zero else None):
            self._last_step = step
        elif self.due(step):  # due at the step the run resumes from, and missing
            self._evaluate_once(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.due(trainer.global_step):
            self._evaluate_once(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.global_step != self._last_step:
            checkpoint_step(trainer)
            self._evaluate_once(trainer, pl_module)


class _ResumedEndOfFitLoop(_FitLoop):
    """Lightning's fit loop, except that a fit resumed at ``max_steps`` still calls ``on_train_start`` and
    ``on_train_end`` (with no step in between), where Lightning calls neither; and a resumed fit first makes the
    validation of its step when it was due and is missing."""

    def on_run_start(self) -> None:
        super().on_run_start()
        _validate_if_missing(self)

    def run(self) -> None:
        self.setup_data()
        if self.trainer.limit_train_batches != 0 and 0 <= self.max_steps <= self.epoch_loop.global_step:
            self.on_run_start()
            self.on_run_end()
            return
        super().run()


def _validate_if_missing(loop: _FitLoop) -> None:
    """The validation of the step a run resumes from, when it was due there (the validation interval, or the last
    step) and the run's summary has no ``val/loss`` of that step; not at a branch's first step (the trunk's)."""
    from diffusion_train.training.summary import RunSummary

    trainer, module = loop.trainer, loop.trainer.lightning_module
    step, every = trainer.global_step, trainer.val_check_batch
    accumulate = int(getattr(module, "accumulate_grad_batches", 1))
    origin = (getattr(module, "run_info", None) or {}).get("branched_from") or {}
    summary = next((c for c in trainer.callbacks if isinstance(c, RunSummary)), None)
    due = is_last_step(trainer, step) or (isinstance(every, int) and every > 0 and step * accumulate % every == 0)
    if step == 0 or not due or origin.get("step") == step or summary is None:
        return
    if not trainer.strategy.broadcast(summary.recorded("val/loss", step) if trainer.is_global_zero else None):
        epoch_loop = loop.epoch_loop
        epoch_loop._batches_that_stepped = step * accumulate  # the step its logs are written at
        epoch_loop.val_loop.restarting = False  # a whole validation, not the rest of one restored from the checkpoint
        trainer.validating = True
        epoch_loop.val_loop.run()
        trainer.training = True


def finish_resumed_runs(trainer: L.Trainer) -> None:
    """Gives ``trainer`` (before its fit) the fit loop of :class:`_ResumedEndOfFitLoop`."""
    old = trainer.fit_loop
    loop = _ResumedEndOfFitLoop(trainer, min_epochs=old.min_epochs, max_epochs=old.max_epochs)
    loop.epoch_loop = old.epoch_loop
    trainer.fit_loop = loop
