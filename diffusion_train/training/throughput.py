"""Images per second, model TFLOP/s per device and MFU, measured between logging intervals (no per-step
device sync)."""

from __future__ import annotations

import time

import lightning as L
import torch

from diffusion_train.training.parallel import is_last_step, log_every_steps, trainer_global_batch


class Throughput(L.Callback):
    """Logs every ``every_n_steps`` (a multiple of the logging interval, as metrics are written only then; all
    ranks together): ``perf/images_per_sec``; ``perf/tflops_per_device``,
    the model FLOPs each device does per second (images/s x training FLOPs per image / devices, the accounting
    of ``scaling/flops.py`` that ``RunSummary`` uses); and ``perf/mfu``, that against the device's dense bf16
    peak (``peak_tflops``, else known GPUs' by name; none on a CPU or an unknown card). A launch's first optimizer
    step (compilation, allocation, autotuning) is not timed: the first interval runs from its end. The fit's last
    step (``max_steps``) logs too, with the rate since the previous logging step (a stop that a later callback
    decides, e.g. for a signal, writes the previous interval's)."""

    def __init__(self, every_n_steps: int = 50, peak_tflops: float | None = None):
        super().__init__()
        self.every_n_steps = int(every_n_steps)
        if self.every_n_steps < 1:
            raise ValueError(f"callbacks.throughput.every_n_steps must be >= 1, got {every_n_steps}")
        if peak_tflops is not None and not float(peak_tflops) > 0:
            raise ValueError(f"callbacks.throughput.peak_tflops must be positive (TFLOP/s), got {peak_tflops}")
        self.peak_tflops = peak_tflops
        self.flops_per_image = 0
        self.peak: float | None = None
        self._t0: float | None = None
        self._step0 = 0
        self._warm = False

    def on_train_start(self, trainer, pl_module) -> None:
        from diffusion_train.scaling.flops import TRAINING_FLOPS_PER_MAC, peak_flops
        from diffusion_train.training.summary import RunSummary, run_forward_macs

        summary = next((c for c in trainer.callbacks if isinstance(c, RunSummary) and c.flops_per_image), None)
        self.flops_per_image = summary.flops_per_image if summary is not None else \
            TRAINING_FLOPS_PER_MAC * run_forward_macs(pl_module)
        device = pl_module.device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        self.peak = peak_flops(name, self.peak_tflops)[0]
        self._t0, self._step0, self._warm = time.perf_counter(), trainer.global_step, False
        logging = log_every_steps(trainer, pl_module)
        if self.every_n_steps % logging:
            raise ValueError(f"callbacks.throughput.every_n_steps ({self.every_n_steps}) must be a multiple of the "
                             f"logging interval ({logging} optimizer steps, trainer.log_every_n_steps): its rates are "
                             "written only at logging steps")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self._t0 is None or step == self._step0:
            return
        now = time.perf_counter()
        if not self._warm:  # a launch's first step compiles and allocates (tens of seconds): time from its end
            self._t0, self._step0, self._warm = now, step, True
            return
        if step % self.every_n_steps and not (is_last_step(trainer, step) or trainer.should_stop):
            return  # the fit's end writes a row of metrics: with this interval's rate, not the previous one's
        images_per_sec = (step - self._step0) * trainer_global_batch(trainer, pl_module) / (now - self._t0)
        per_device = images_per_sec * self.flops_per_image / trainer.world_size
        logs = {"perf/images_per_sec": images_per_sec, "perf/tflops_per_device": per_device / 1e12}
        if self.peak:
            logs["perf/mfu"] = per_device / self.peak
        pl_module.log_dict(logs)
        self._t0, self._step0 = now, step
