"""Host-device synchronisations of the training step: where the host waits for the GPU, by source line.

A step that never waits for the device lets the host queue the next kernels while the GPU runs the current
ones; each ``.item()``, ``if tensor:``, boolean-mask index or blocking copy drains that queue. On a GPU,
:class:`SyncWatch` counts them with ``torch.cuda.set_sync_debug_mode`` (the ground truth). A CPU has no
device to wait for, but the operations that would wait on a GPU are the same, so on a CPU it counts, through
the dispatcher (:class:`HostSyncAudit`):

* reading a value to the host: ``.item()``, ``float(t)``, ``int(t)``, ``bool(t)``, ``if t:``
  (``aten._local_scalar_dense``), ``torch.equal``;
* operations whose output size depends on the values: ``nonzero``, ``masked_select``, ``unique``, boolean-mask
  indexing and index assignment, ``repeat_interleave`` without ``output_size``;
* tensors made from host data (``torch.tensor(...)``, ``torch.as_tensor`` of Python numbers; on a GPU a
  blocking copy to the device);
* copies between devices.

Code that works on host tensors on purpose (a CPU process group's flag) runs inside :func:`host_side`, which
the audit skips. The CPU count cannot see ``.tolist()`` and ``.numpy()`` (no operation is dispatched on a CPU)
and attributes every ``torch.tensor(...)`` to the device; the tests hold the training step to zero of these
between logging steps (``tests/test_syncs.py``), and :class:`HostSyncReport` finds them in a real run.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Iterator

import lightning as L
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from diffusion_train.files import write_json
from diffusion_train.training.parallel import log_every_steps, logs_at

log = logging.getLogger("diffusion_train")

aten = torch.ops.aten
_READS = {aten._local_scalar_dense: "value read", aten.equal: "value read", aten.is_nonzero: "value read",
          aten.nonzero: "data-dependent size", aten.masked_select: "data-dependent size",
          aten._unique2: "data-dependent size", aten.unique_dim: "data-dependent size",
          aten.unique_consecutive: "data-dependent size", aten.lift_fresh: "host data"}
_SKIP_DIRS = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(__file__) + os.sep + "syncs.py",
              warnings.__file__)
_DATA_LOADING = os.path.join(os.path.dirname(torch.__file__), "utils", "data") + os.sep
_state = threading.local()
CUDA_MESSAGE = "called a synchronizing CUDA operation"


@contextlib.contextmanager
def host_side() -> Iterator[None]:
    """Code that reads host tensors on purpose (no device is involved): the CPU audit does not count it."""
    depth = getattr(_state, "host_side", 0)
    _state.host_side = depth + 1
    try:
        yield
    finally:
        _state.host_side = depth


def source_line(depth: int = 3, data_loading: bool = False) -> str | None:
    """``path:line`` of the innermost caller outside torch and this module, then up to ``depth - 1`` of its
    callers (``a < b``), paths relative to site-packages or the working directory. Inside a DataLoader's fetch
    None unless ``data_loading``: batches are made on the host by design (in worker processes, usually), and
    their copy to the device is counted where it happens."""
    frame, lines = sys._getframe(1), []
    outer = frame
    while outer is not None and not data_loading:
        if outer.f_code.co_filename.startswith(_DATA_LOADING):
            return None
        outer = outer.f_back
    while frame is not None and frame.f_code.co_filename.startswith(_SKIP_DIRS):
        frame = frame.f_back
    while frame is not None and len(lines) < depth:
        lines.append(f"{_short(frame.f_code.co_filename)}:{frame.f_lineno}")
        frame = frame.f_back
    return " < ".join(lines) or "?"


def _short(path: str) -> str:
    if "site-packages" + os.sep in path:
        return path.rsplit("site-packages" + os.sep, 1)[1]
    try:
        return os.path.relpath(path)
    except ValueError:
        return path


def _is_mask(index) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


def would_sync(func, args: tuple, kwargs: dict) -> str | None:
    """Why ``func(*args, **kwargs)`` makes the host wait for a GPU, or None."""
    packet = func.overloadpacket
    if packet in _READS:
        return _READS[packet]
    if packet in (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_) and len(args) > 1 \
            and any(_is_mask(i) for i in args[1] or ()):
        return "data-dependent size"
    if packet is aten.repeat_interleave and func._overloadname in ("Tensor", "self_Tensor") \
            and kwargs.get("output_size") is None:
        return "data-dependent size"
    if packet in (aten._to_copy, aten.copy_) and len(args) >= 1 and isinstance(args[0], torch.Tensor):
        src = args[1] if packet is aten.copy_ else args[0]
        dst = args[0].device if packet is aten.copy_ else kwargs.get("device") or args[0].device
        if isinstance(src, torch.Tensor) and torch.device(dst).type != src.device.type \
                and "meta" not in (src.device.type, torch.device(dst).type) and not kwargs.get("non_blocking"):
            return "blocking copy"
    return None


class HostSyncAudit(TorchDispatchMode):
    """Counts, by (reason, source line), the operations run inside it that would synchronise on a GPU.
    ``active``: counting is on (it can be switched while the mode stays entered)."""

    def __init__(self, depth: int = 3):
        super().__init__()
        self.depth, self.active = depth, True
        self.sites: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.active and not getattr(_state, "host_side", 0):
            reason = would_sync(func, args, kwargs)
            site = source_line(self.depth) if reason is not None else None
            if site is not None:
                self.sites[(reason, site)] += 1
        return func(*args, **kwargs)


class SyncWatch:
    """Counts host-device synchronisations between :meth:`start` and :meth:`stop`, by source line: on a GPU
    with ``torch.cuda.set_sync_debug_mode`` (reason ``"cuda sync"``), elsewhere with :class:`HostSyncAudit`."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        self.sites: collections.Counter = collections.Counter()
        self._audit: HostSyncAudit | None = None
        self._warnings = None
        self.running = False

    def start(self) -> None:
        if self.running:
            return
        self.running = True
        if self.cuda:  # each warning is taken as it is raised, so the Python stack of the op is still there
            self._warnings = warnings.catch_warnings()
            self._warnings.__enter__()
            warnings.filterwarnings("always", message=f".*{CUDA_MESSAGE}.*")
            show = warnings.showwarning

            def record(message, category, filename, lineno, file=None, line=None):
                if CUDA_MESSAGE not in str(message):
                    return show(message, category, filename, lineno, file, line)
                site = source_line(data_loading=True)
                self.sites[("cuda sync", f"{_short(filename)}:{lineno}" if site in (None, "?") else site)] += 1

            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode(1)
        else:
            self._audit = HostSyncAudit()
            self._audit.__enter__()

    def stop(self) -> None:
        if not self.running:
            return
        self.running = False
        if self.cuda:
            torch.cuda.set_sync_debug_mode(0)
            self._warnings.__exit__(None, None, None)
        else:
            self._audit.__exit__(None, None, None)
            self.sites.update(self._audit.sites)
            self._audit = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Stops counting inside (a synchronisation of the measuring code itself)."""
        if not self.running:
            yield
            return
        if self.cuda:
            mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode(0)
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode(mode)
        else:
            self._audit.active = False
            try:
                yield
            finally:
                self._audit.active = True

    @property
    def total(self) -> int:
        return sum(self.sites.values())

    def table(self, steps: int, top: int | None = None) -> list[dict]:
        """Sites, most first: ``{"reason", "site", "count", "per_step"}``."""
        return [{"reason": r, "site": s, "count": n, "per_step": n / max(1, steps)}
                for (r, s), n in self.sites.most_common(top)]


class HostSyncReport(L.Callback):
    """Finds the host-device synchronisations of a real run: watches ``steps`` optimizer steps after the first
    ``start`` steps of this launch (past warm-up, compilation and Lightning's registration of each logged
    value; a resumed run counts from its resumed step) and writes ``path`` (JSON) and one log line: synchronisations per
    optimizer step and their source lines, split between logging batches (where Lightning logs, or where an
    optimizer step ends whose number is a multiple of the logging interval: both read logged values on
    purpose) and the others. ``steps=0``: off. Rank 0 only.

    A batch's window runs from its ``on_train_batch_start`` to the next one's, so it holds every callback, the
    logging at the batch's end and the fetch of the next batch."""

    KINDS = ("other_steps", "logging_steps")

    def __init__(self, steps: int = 0, start: int = 10, path: str | None = None):
        super().__init__()
        self.steps, self.start, self.path = int(steps), int(start), Path(path) if path else None
        self.watches: dict[str, SyncWatch] = {}
        self.batches: dict[str, int] = {}
        self.result: dict | None = None
        self._current: SyncWatch | None = None
        self._accumulate = 1
        self._first = 0  # the step this launch started from

    def on_train_start(self, trainer, pl_module) -> None:
        self._first = trainer.global_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._current is not None:
            self._current.stop()
            self._current = None
        if not self.steps or self.result is not None or not trainer.is_global_zero:
            return
        step = trainer.global_step + 1  # the optimizer step this batch is part of
        start = self._first + self.start
        if step > start + self.steps:
            self.finish(trainer)
        elif step > start:
            self._accumulate = int(getattr(pl_module, "accumulate_grad_batches", 1))
            ends_step = getattr(pl_module, "_micro", 0) == self._accumulate - 1
            logs = getattr(trainer._logger_connector, "should_update_logs", False) or \
                (ends_step and logs_at(trainer, pl_module, step))  # the run's last step writes a row too
            kind = self.KINDS[bool(logs)]
            self.batches[kind] = self.batches.get(kind, 0) + 1
            self._current = self.watches.setdefault(kind, SyncWatch(pl_module.device))
            self._current.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        last = trainer.max_steps is not None and 0 <= trainer.max_steps <= trainer.global_step
        if self._current is not None and (last or trainer.should_stop):  # not the fit's end (samples, saving)
            self._current.stop()
            self._current = None

    def on_train_end(self, trainer, pl_module) -> None:
        if self.batches and self.result is None:
            self.finish(trainer)

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self._current is not None:
            self._current.stop()
            self._current = None

    def finish(self, trainer) -> dict:
        if self._current is not None:
            self._current.stop()
            self._current = None
        cuda = any(w.cuda for w in self.watches.values())
        steps = {k: n / self._accumulate for k, n in self.batches.items()}
        self.result = {
            "device": "cuda" if cuda else "cpu",
            "counted_by": "torch.cuda.set_sync_debug_mode" if cuda
            else "operations that would synchronise on a GPU (diffusion_train.training.syncs)",
            "watched": {"from_step": self._first + self.start + 1, "batches": self.batches, "accumulate_grad_batches": self._accumulate,
                        "log_every_n_steps": log_every_steps(trainer, trainer.lightning_module)},
            "syncs_per_step": {k: self.watches[k].total / steps[k] for k in steps},
            "sites": {k: self.watches[k].table(steps[k]) for k in steps},
        }
        if self.path is not None:
            write_json(self.path, self.result)
        words = ", ".join(f"{v:.2f} per step in {k.replace('_', ' ')} ({self.batches[k]} batches)"
                          for k, v in self.result["syncs_per_step"].items())
        log.info("host-device synchronisations: %s%s", words, f"; sites in {self.path}" if self.path else "")
        return self.result
