"""Where a training step's device time goes: the kernels of a few steps under ``torch.profiler``, by category.

On a GPU the device's kernels, copies and fills are recorded (CUPTI), with the host's operators (without them
some versions record no kernels); the ranges that ``record_function`` marks on the device's timeline (the
optimizer's ``Optimizer.step#AdamW.step``) are not kernels and are left out. Busy time is the union of the
kernels' intervals. The profiler slows the host but not the kernels, so the idle share is taken against the step
time measured without it when one is given: a step whose busy time is well under it waits for the host
(launches, Python, synchronisations), not for the GPU.
On a CPU the operators' own times stand in for kernels.

Categories come from kernel (or operator) names, the first match in :data:`CATEGORIES` winning; a name that
matches none is ``other``. Names are cuBLAS's, cuDNN's, FlashAttention's, PyTorch's own and Inductor's
(``triton_*``), so the split is a guide: a fused Triton kernel holding a norm and an activation counts as
``compiled fusions``.
"""

from __future__ import annotations

import collections
import logging
import time
from pathlib import Path

import lightning as L
import torch

from diffusion_train.files import write_json

log = logging.getLogger("diffusion_train")

CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "softmax",
                   "compute_dot_do_o", "convert_dq_to_16bits")),  # cuDNN's attention backward helpers
    ("convolution", ("conv", "fprop", "dgrad", "wgrad", "winograd")),
    ("matmul", ("gemm", "matmul", "cutlass", "xmma", "nvjet", "triton_tem", "aten::mm", "aten::addmm", "aten::bmm",
                "aten::baddbmm")),
    ("compiled fusions", ("triton",)),
    ("optimizer, clipping, EMA", ("adam", "multi_tensor", "foreach", "lerp")),
    ("normalization", ("norm",)),
    ("copies and fills", ("memcpy", "memset", "copy", "fill", "aten::cat", "nchwtonhwc", "nhwctonchw")),
    ("elementwise and reductions", ("elementwise", "reduce", "vectorized", "aten::")),
)


def category(name: str) -> str:
    low = name.lower()
    return next((cat for cat, keys in CATEGORIES if any(k in low for k in keys)), "other")


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals: time with at least one kernel running."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


class KernelProfile:
    """``start()``, run ``steps`` steps, ``stop()`` (each after the device is synchronised), then
    :meth:`summary`."""

    def __init__(self, device: torch.device | str, steps: int):
        self.cuda = torch.device(device).type == "cuda"
        self.steps = int(steps)
        activities = [torch.profiler.ProfilerActivity.CPU] + [torch.profiler.ProfilerActivity.CUDA] * self.cuda
        self._profiler = torch.profiler.profile(activities=activities)
        self._t0 = self.wall_s = None

    @property
    def running(self) -> bool:
        return self._t0 is not None and self.wall_s is None

    def start(self) -> None:
        self._profiler.start()
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        self.wall_s = time.perf_counter() - self._t0
        self._profiler.stop()

    def records(self) -> list[tuple[str, float, float]]:
        """``(name, start_us, end_us)`` of each kernel (on a CPU: operator self time, as a pseudo-interval)."""
        if self.cuda:  # the device's kernels, not the ranges that record_function marks on its timeline
            return [(e.name, e.time_range.start, e.time_range.end) for e in self._profiler.events()
                    if e.device_type == torch.autograd.DeviceType.CUDA
                    and not getattr(e, "is_user_annotation", False)]
        out, clock = [], 0.0
        for e in self._profiler.events():
            if e.name.startswith("aten::") and e.self_cpu_time_total > 0:
                out.append((e.name, clock, clock + e.self_cpu_time_total))
                clock += e.self_cpu_time_total
        return out

    def summary(self, step_ms: float | None = None, top: int = 8) -> dict:
        """Per step: wall (``step_ms``, else the profiled steps') and busy milliseconds, the idle share, kernels
        launched, and each category's and the ``top`` kernels' milliseconds and share of the busy time."""
        recs, n = self.records(), max(1, self.steps)
        busy = busy_us([(s, e) for _, s, e in recs])
        by_cat, by_name, calls = collections.Counter(), collections.Counter(), collections.Counter()
        for name, s, e in recs:
            by_cat[category(name)] += e - s
            by_name[name] += e - s
            calls[name] += 1
        total = sum(by_cat.values()) or 1.0
        wall_ms = step_ms if step_ms is not None else self.wall_s * 1e3 / n
        return {
            "steps": self.steps, "device": "cuda" if self.cuda else "cpu",
            "wall_ms_per_step": wall_ms, "profiled_wall_ms_per_step": self.wall_s * 1e3 / n,
            "busy_ms_per_step": busy / 1e3 / n,
            "idle_pct": max(0.0, 100 * (1 - busy / 1e3 / n / wall_ms)) if wall_ms > 0 else None,
            "kernels_per_step": len(recs) / n,
            "categories": {cat: {"ms_per_step": us / 1e3 / n, "pct": 100 * us / total}
                           for cat, us in by_cat.most_common()},
            "top": [{"name": name, "category": category(name), "ms_per_step": us / 1e3 / n,
                     "calls_per_step": calls[name] / n, "pct": 100 * us / total}
                    for name, us in by_name.most_common(top)],
        }


def describe(summary: dict, label: str = "") -> str:
    """Two markdown lines: busy against wall time with the categories, then the top kernels."""
    cats = ", ".join(f"{c} {v['ms_per_step']:.2f} ms ({v['pct']:.0f}%)" for c, v in summary["categories"].items())
    tops = "; ".join(f"`{k['name'][:70]}` {k['ms_per_step']:.2f} ms x{k['calls_per_step']:g}"
                     for k in summary["top"][:5])
    what, units = ("device", "kernels") if summary["device"] == "cuda" else ("CPU operator", "operators")
    idle = f", idle {summary['idle_pct']:.0f}%" if summary["idle_pct"] is not None else ""
    steps = f"{summary['steps']} step" + "s" * (summary["steps"] != 1)
    return (f"Profile{f' ({label})' if label else ''}, {steps}: {what} time "
            f"{summary['busy_ms_per_step']:.2f} of {summary['wall_ms_per_step']:.2f} ms per step{idle}, "
            f"{summary['kernels_per_step']:.0f} {units} per step: {cats}.\n\nLongest {units} per step: {tops}.")


class KernelProfileReport(L.Callback):
    """Where a real run's step time goes (rank 0): ``steps`` optimizer steps after the first ``start`` of this
    launch run under a :class:`KernelProfile`; ``path`` (JSON) and one log line get its summary. The window
    holds everything between the steps too (data loading, callbacks, logging), so a data loader that cannot keep
    up shows as idle device time. The idle share is taken against the same number of steps just before the
    window, timed without the profiler (when ``start`` > ``steps``). ``steps=0``: off."""

    def __init__(self, steps: int = 0, start: int = 10, path: str | None = None):
        super().__init__()
        self.steps, self.start, self.path = int(steps), int(start), Path(path) if path else None
        if self.steps < 0 or self.start < 0:
            raise ValueError(f"callbacks.kernel_profile: steps and start must be >= 0, got steps={steps}, start={start}")
        self.result: dict | None = None
        self._profile: KernelProfile | None = None
        self._first = 0
        self._timed: tuple[int, float] | None = None  # (step, time) where the unprofiled timing began
        self._step_ms: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._first = trainer.global_step

    def _sync(self, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.steps or self.result is not None or not trainer.is_global_zero:
            return
        done = trainer.global_step - self._first  # optimizer steps of this launch
        if done == self.start - self.steps and self._timed is None:
            self._sync(pl_module)
            self._timed = (done, time.perf_counter())
        elif done == self.start and self._profile is None:
            self._sync(pl_module)
            if self._timed is not None:
                self._step_ms = (time.perf_counter() - self._timed[1]) * 1e3 / (done - self._timed[0])
            self._profile = KernelProfile(pl_module.device, self.steps)
            self._profile.start()
        elif done == self.start + self.steps and self._profile is not None and self._profile.running:
            self.finish(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._profile is not None and self._profile.running:
            self._profile.steps = trainer.global_step - self._first - self.start  # the fit ended inside the window
            self.finish(pl_module)

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self._profile is not None and self._profile.running:
            self._profile.stop()

    def finish(self, pl_module) -> dict:
        self._sync(pl_module)
        self._profile.stop()
        self.result = {"from_step": self._first + self.start + 1, **self._profile.summary(step_ms=self._step_ms)}
        if self.path is not None:
            write_json(self.path, self.result)
        log.info("%s", describe(self.result).replace("\n\n", " ") + (f" ({self.path})" if self.path else ""))
        return self.result
