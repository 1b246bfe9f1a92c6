"""Compute accounting and the run's ``summary.json``: every evaluation indexed by images and FLOPs.

``RunSummary`` counts the training FLOPs of the run (``6 x forward multiply-adds per image x images
seen``, see ``diffusion_train/scaling/flops.py``), logs ``perf/images_seen`` and ``perf/train_flops``
with every logged step (so any metric can be plotted against them, in metrics.csv or W&B), records each
evaluation (validation loss, Fréchet distances, class accuracy, ...) with the step, images and FLOPs it
was taken at, and writes ``<run dir>/summary.json`` (format ``diffusion_train.summary/1``, documented in
docs/scaling.md) after every validation, at the first logging step after any other evaluation, and when
the fit ends; ``scripts/scaling_report.py`` reads it.
A resumed run continues the summary: entries after the resumed step are dropped and logged again.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

from diffusion_train.files import write_json
from diffusion_train.scaling.registry import FORMAT  # the reader's: one string for both sides
from diffusion_train.training.parallel import logs_at, trainer_global_batch
from diffusion_train.training.step_end import StepEndCallback

# Metrics recorded in the history: evaluations, not the per-step training values.
EVAL_PREFIXES = ("val/", "fd/", "fid/", "class_accuracy/", "clip_score/")
# Config keys that do not change what is trained: left out of the config hash.
UNHASHED = ("run_dir", "run_name", "callbacks", "logger", "scaling")
# Of the callbacks, the EMA settings that make its averages (whose metrics, val/loss_ema_*, a report may fit).
EMA_HASHED = ("decays", "sigma_rels", "warmup", "update_every")


def config_hash(config: dict) -> str:
    """12 hex digits of the SHA-256 of the resolved config without run names, paths of this run, loggers
    and callbacks but the EMA averages' settings: two runs with the same hash trained the same thing and the
    same averages."""
    kept = {k: v for k, v in config.items() if k not in UNHASHED}
    ema = (config.get("callbacks") or {}).get("ema")
    if ema:
        kept["ema"] = {k: ema.get(k) for k in EMA_HASHED}
    trainer = dict(kept.get("trainer") or {})
    trainer.pop("default_root_dir", None)
    kept["trainer"] = trainer
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:12]


def context_len(conditioner) -> int:
    """Text tokens the backbone cross-attends to (the embedders' ``max_length``, summed), 0 without text."""
    return sum(int(getattr(e, "max_length", 0) or 0) for e in getattr(conditioner, "embedders", {}).values()
               if getattr(e, "context_dim", 0))


def run_forward_macs(pl_module) -> int:
    """Forward multiply-adds per image of what a training step runs: the backbone (with its text context), and
    a ControlNet fine-tune's copy too (``scaling/flops.py``)."""
    from diffusion_train.scaling.flops import flop_counter_macs, forward_macs

    backbone, controlnet = pl_module.backbone, getattr(pl_module, "controlnet", None)
    length = context_len(pl_module.conditioner) if getattr(backbone, "context_dim", 0) else None
    macs = int(forward_macs(backbone, context_len=length))
    if controlnet is not None:
        macs += int(flop_counter_macs(controlnet, backbone.input_size, length or 0))
    return macs


def _lowest(entries: list[dict]) -> float | None:
    """The lowest finite value of a metric's history (None when it has none)."""
    return min((e["value"] for e in entries if e["value"] is not None), default=None)


class RunSummary(StepEndCallback):
    """See the module docstring. ``path``: where summary.json goes (the run directory's)."""

    def __init__(self, path: str):
        super().__init__()
        self.path = Path(path)
        self.flops_per_image = 0
        self.forward_macs = 0
        self.global_batch = 0
        self.history: dict[str, list[dict]] = {}
        self._seen_objects: dict[str, object] = {}  # the last value object of each metric, read or not
        self._pending: list[tuple[str, object, int]] = []  # (name, value, step) noted, not read yet
        self._wall0 = 0.0
        self._wall_before = 0.0

    # -- accounting ------------------------------------------------------------------------------
    def images(self, step: int) -> int:
        return int(step) * self.global_batch

    def flops(self, step: int) -> float:
        return float(self.images(step)) * self.flops_per_image

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        from diffusion_train.scaling.flops import TRAINING_FLOPS_PER_MAC

        self.global_batch = trainer_global_batch(trainer, pl_module)
        if not self.forward_macs:
            self.forward_macs = run_forward_macs(pl_module)
        self.flops_per_image = TRAINING_FLOPS_PER_MAC * self.forward_macs

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:  # the resumed step is known by now
        super().on_train_start(trainer, pl_module)
        self._wall0 = time.monotonic()
        self._resume(trainer.global_step)
        self._note(trainer)  # a resumed run's missing evaluation of its start step, made by the callbacks before this
        self._record()

    def recorded(self, name: str, step: int) -> bool:
        """Whether ``name`` has a value of ``step`` (after ``on_train_start``: the earlier launches' too)."""
        return any(entry["step"] == step for entry in self.history.get(name, []))

    def _resume(self, step: int) -> None:
        """Keeps what an earlier launch recorded up to ``step``, the checkpoint's (later ones come again)."""
        self.history, self._wall_before = {}, 0.0
        if step == 0 or not self.path.is_file():
            return
        try:
            old = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return  # an unreadable summary is rewritten from here on
        self._wall_before = float(old.get("wall_time_s") or 0.0)
        for name, metric in (old.get("metrics") or {}).items():
            kept = [h for h in metric.get("history", []) if int(h["step"]) <= step]  # taken on the resumed weights
            if kept:
                self.history[name] = kept

    def on_step_end(self, trainer: L.Trainer, pl_module, step: int) -> None:
        logging_step = logs_at(trainer, pl_module, step) or trainer.should_stop  # a stop writes a row too
        if logging_step:
            pl_module.log_dict({"perf/images_seen": float(self.images(step)), "perf/train_flops": self.flops(step)})
        self._note(trainer)  # evaluations logged at this step by the callbacks that ran before this one
        if logging_step and self._record():
            self.write(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._note(trainer, validation=True)
            if self._record():
                self.write(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        self._note(trainer)
        self._record()
        self.write(trainer, pl_module)

    def _note(self, trainer: L.Trainer, validation: bool = False) -> None:
        """Keeps, unread, each evaluation metric logged since last seen with its step: reading a device tensor
        after every step would make the host wait for the device each time. At the end of a validation, its
        ``val/`` metrics (Lightning gives their values as new objects at every step, so only the validation says
        when there is a new one); otherwise the callbacks' evaluations, new when their value object is."""
        for name, value in trainer.callback_metrics.items():
            if not isinstance(value, (torch.Tensor, float, int)) or not name.startswith(EVAL_PREFIXES):
                continue
            if name.startswith("val/") != validation or (not validation and self._seen_objects.get(name) is value):
                continue
            self._seen_objects[name] = value
            self._pending.append((name, value, trainer.global_step))

    def _record(self) -> bool:
        """Adds the noted metrics (a value noted again at its step replaces the first); True if any."""
        added, pending, self._pending = False, self._pending, []
        for name, value, step in pending:
            value = float(value)
            value = value if math.isfinite(value) else None  # a diverged evaluation: null, so fits leave the run out
            entries = self.history.setdefault(name, [])
            entries[:] = [e for e in entries if e["step"] != step]
            entries.append({"step": step, "images": self.images(step), "flops": self.flops(step), "value": value})
            added = True
        return added

    # -- the file ----------------------------------------------------------------------------------
    def summary(self, trainer: L.Trainer, pl_module) -> dict[str, Any]:
        info = getattr(pl_module, "run_info", {}) or {}
        config = info.get("config") or {}
        step = trainer.global_step
        trained = [pl_module.backbone, *([pl_module.controlnet] if getattr(pl_module, "controlnet", None) else [])]
        params = sum(p.numel() for net in trained for p in net.parameters() if p.requires_grad)
        device = (torch.cuda.get_device_name(pl_module.device) if pl_module.device.type == "cuda"
                  else pl_module.device.type)
        metrics = {name: {"final": entries[-1]["value"], "best": _lowest(entries), "history": entries}
                   for name, entries in sorted(self.history.items()) if entries}
        max_steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        return {
            "format": FORMAT,
            "run_dir": str(config.get("run_dir", self.path.parent)),
            "run_name": config.get("run_name"),
            "config_hash": config_hash(config) if config else None,
            "model": type(pl_module.backbone).__name__,
            "params": int(params),
            "forward_macs_per_image": self.forward_macs,
            "flops_per_image": self.flops_per_image,
            "global_batch": self.global_batch,
            "steps": int(step),
            "images_seen": self.images(step),
            "total_flops": self.flops(step),
            "scaling": dict(config.get("scaling") or {}),
            "metrics": metrics,
            "wall_time_s": round(self._wall_before + time.monotonic() - self._wall0, 3),
            "device": device,
            "world_size": int(trainer.world_size),
            "finished": bool(max_steps is not None and step >= max_steps),
        }

    def write(self, trainer: L.Trainer, pl_module) -> None:
        """summary.json (atomically), and its scalar fields into the W&B run's summary and its ``scaling``
        section into the W&B config, where ``scripts/scaling_report.py wandb:...`` reads them."""
        if not trainer.is_global_zero:
            return
        summary = self.summary(trainer, pl_module)
        write_json(self.path, summary, indent=1)
        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger):
                lg.experiment.summary.update({k: v for k, v in summary.items() if k not in ("metrics", "scaling")})
                lg.experiment.config.update({"scaling": summary["scaling"]}, allow_val_change=True)
