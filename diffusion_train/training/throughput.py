"""Images per second, measured between logging intervals (no per-step device sync)."""

from __future__ import annotations

import time

import lightning as L

from diffusion_train.training.parallel import trainer_global_batch


class Throughput(L.Callback):
    """Logs ``perf/images_per_sec`` (global, all ranks) every ``every_n_steps`` (images and FLOPs seen:
    ``RunSummary``)."""

    def __init__(self, every_n_steps: int = 50):
        super().__init__()
        self.every_n_steps = int(every_n_steps)
        self._t0: float | None = None
        self._step0 = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0, self._step0 = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self._t0 is None or step == self._step0 or step % self.every_n_steps:
            return
        now = time.perf_counter()
        images = (step - self._step0) * trainer_global_batch(trainer, pl_module)
        pl_module.log("perf/images_per_sec", images / (now - self._t0))
        self._t0, self._step0 = now, step
