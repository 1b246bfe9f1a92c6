"""A callback hook at the end of each optimizer step."""

from __future__ import annotations

import lightning as L


class StepEndCallback(L.Callback):
    """Calls :meth:`on_step_end` once per optimizer step, after its last micro-batch. Lightning's
    ``on_train_batch_end`` runs after every micro-batch, with the global step unchanged inside a gradient
    accumulation; and a resumed run's first micro-batch ends at the checkpoint's step, which is no new step.
    Subclasses that override ``on_train_start`` call this one's."""

    def __init__(self) -> None:
        super().__init__()
        self._last_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step  # a resumed (or branched) run's step is restored by now

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step != self._last_step:
            self._last_step = step
            self.on_step_end(trainer, pl_module, step)

    def on_step_end(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        """After optimizer step ``step`` (global, from 1)."""
