"""Exponential moving averages of the trainable weights, several at once, in fp32: constant decays and
power-function averages (snapshotted for post-hoc EMA)."""

from __future__ import annotations

import contextlib
import functools
import math
import weakref
from pathlib import Path
from typing import Iterator, Sequence

import lightning as L
import torch
from torch import Tensor, nn

from diffusion_train.training.parallel import full_tensor, is_dtensor, like, local, reshard
from diffusion_train.training.posthoc_ema import check_sigma_rel, label, sigma_rel_to_gamma, write_snapshot
from diffusion_train.training.step_end import StepEndCallback


class EMA(StepEndCallback):
    """Keeps fp32 EMA copies of every trainable parameter of the LightningModule.

    After each optimizer step n (counting from 1), for each average:
        ema <- ema + (1 - d_n) * (param - ema)
    For a constant decay d of ``decays``, d_n = min(d, (1 + n) / (10 + n)) with ``warmup`` (the warm-up keeps
    early averages from being dominated by the random init), else d_n = d. For a power-function average of
    ``sigma_rels`` (its relative width: a fixed fraction of the run, see :mod:`posthoc_ema`),
    d_n = (1 - 1/n)^(gamma + 1). Updates use ``torch._foreach_lerp_`` over all tensors at once. With
    ``update_every`` = k > 1 they run after every k-th optimizer step only, and one update stands for the k steps
    since the last: the old average keeps the product of their k decays and the current weights stand in for the
    k - 1 skipped ones. The decays stay per optimizer step (the same horizon for any k) while the EMA's memory
    traffic falls k-fold; the steps after the last multiple of k are not averaged in.

    The averages live in ``checkpoint["ema"]`` = {"decays", "sigma_rels", "num_updates" (optimizer steps averaged
    in), "step" (the global step they cover through), "weights": {name of the average: {name: tensor}}}, next to
    (never instead of) the raw weights in ``checkpoint["state_dict"]``. An average's name is ``str(decay)``
    ("0.9999") or ``sigma_rel_<s>``. ``sample_decay`` (default: the first average) is the average used for sample
    grids and export; the averages of ``validate`` are validated too, next to the raw weights
    (``val/loss_ema_<name>``, with the same noise and timesteps as ``val/loss``). With ``snapshot_every`` = m, the
    power-function averages are written to ``snapshot_dir`` after every m-th step and at the end of training, for
    averages of any width after training (``scripts/posthoc_ema.py``).
    """

    def __init__(self, decays: Sequence[float] = (0.9999,), warmup: bool = True, update_every: int = 1,
                 sample_decay: float | str | None = None, sigma_rels: Sequence[float] = (), snapshot_every: int = 0,
                 snapshot_dir: str | None = None, snapshot_dtype: str = "float32", validate: Sequence = ()):
        super().__init__()
        self.decays = [float(d) for d in decays or ()]
        if not all(0.0 < d < 1.0 for d in self.decays):
            raise ValueError(f"callbacks.ema.decays must be values in (0, 1), got {decays}")
        self.sigma_rels = [check_sigma_rel(s, "callbacks.ema.sigma_rels") for s in sigma_rels or ()]
        self._gammas = {label(s): sigma_rel_to_gamma(s) for s in self.sigma_rels}
        self.labels = [str(d) for d in self.decays] + list(self._gammas)
        if not self.labels:
            raise ValueError("callbacks.ema: give at least one of decays and sigma_rels")
        self.sample_decay = (self.first_average(self.decays, self.sigma_rels) if sample_decay is None
                             else self.key(sample_decay))
        if self.sample_decay not in self.labels:
            raise ValueError(f"callbacks.ema.sample_decay {sample_decay} is not one of the averages {self.labels}")
        self.validate = [self.key(a) for a in validate or ()]
        if not set(self.validate) <= set(self.labels):
            raise ValueError(f"callbacks.ema.validate {list(validate)}: each must be one of the averages {self.labels}")
        self.warmup, self.update_every = warmup, int(update_every)
        if self.update_every < 1:
            raise ValueError(f"callbacks.ema.update_every must be >= 1, got {update_every}")
        self.snapshot_every, self.snapshot_dir = int(snapshot_every), snapshot_dir
        self.snapshot_dtype = getattr(torch, str(snapshot_dtype), None)
        if self.snapshot_every:
            if not self.sigma_rels or not snapshot_dir:
                raise ValueError("callbacks.ema.snapshot_every needs callbacks.ema.sigma_rels (the averages it "
                                 "saves) and callbacks.ema.snapshot_dir")
            if self.snapshot_every < 0 or self.snapshot_every % self.update_every:
                raise ValueError(f"callbacks.ema.snapshot_every={snapshot_every} must be a positive multiple of "
                                 f"update_every={self.update_every}")
            if self.snapshot_dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise ValueError(f"callbacks.ema.snapshot_dtype={snapshot_dtype}: use float32, bfloat16 or float16")
        self.num_updates = 0
        self.covered_step: int | None = None  # the global step the averages cover through (None: not known)
        self.names: list[str] = []
        self.weights: dict[str, list[Tensor]] = {}
        self._loaded: dict | None = None
        self._snapshot_updates = -1  # num_updates of the last snapshot written
        # the module the averages follow, its averaged parameters, and whether they are sharded (_params_of)
        self._averaged: tuple[weakref.ref, list[nn.Parameter], bool] | None = None
        # inside swapped(): the module, its parameters (this rank's shards), the raw weights, the average's name
        self._swap: tuple[nn.Module, list[Tensor], list[Tensor], str] | None = None

    @staticmethod
    def first_average(decays: Sequence[float], sigma_rels: Sequence[float]) -> str | None:
        """The name of a run's first average, its first decay, else its first sigma_rel: what it samples with when
        ``sample_decay`` is null (None without any)."""
        if decays:
            return EMA.key(decays[0])
        return EMA.key(f"sigma_rel_{sigma_rels[0]}") if sigma_rels else None

    @staticmethod
    def key(average: float | str) -> str:
        """The name of an average given as a decay (0.9999, "0.9999") or ``sigma_rel_<s>``."""
        text = str(average)
        try:
            return label(float(text.removeprefix("sigma_rel_"))) if text.startswith("sigma_rel_") else str(float(text))
        except ValueError:
            raise ValueError(f"{average!r} names no EMA average: give a decay (0.9999) or sigma_rel_<s>") from None

    @staticmethod
    def _named_params(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in module.named_parameters() if p.requires_grad]

    def _params_of(self, module: nn.Module) -> tuple[list[nn.Parameter], bool]:
        """The parameters the averages follow, in the order of ``names``, and whether they are sharded (DTensors):
        found once per module, not in every update (a walk of the module tree is host time a small model's step
        waits for). Training updates them in place; moving or sharding a model happens before the averages
        start."""
        if self._averaged is None or self._averaged[0]() is not module:
            named = self._named_params(module)
            if [n for n, _ in named] != self.names:
                raise ValueError(f"EMA: {type(module).__name__} has other trainable parameters than the averages "
                                 f"({len(named)} against {len(self.names)})")
            params = [p for _, p in named]
            self._averaged = (weakref.ref(module), params, any(is_dtensor(p) for p in params))
        return self._averaged[1], self._averaged[2]

    def decay_at(self, average: float | str, n: int) -> float:
        """The decay of optimizer step ``n`` (from 1) for ``average``."""
        key = self.key(average)
        if key in self._gammas:
            return (1.0 - 1.0 / n) ** (self._gammas[key] + 1.0)
        decay = float(key)
        return min(decay, (1 + n) / (10 + n)) if self.warmup else decay

    def _init(self, module: nn.Module) -> None:
        named = self._named_params(module)
        self.names = [n for n, _ in named]
        if self._loaded is not None:
            state, self._loaded = self._loaded, None
            missing = [n for n in self.names if n not in state["weights"].get(self.labels[0], {})]
            if missing or set(state["weights"]) != set(self.labels):
                raise ValueError(f"checkpoint EMA (averages {list(state['weights'])}) does not match this run "
                                 f"(averages {self.labels}, missing {missing[:3]})")
            self.num_updates = int(state["num_updates"])
            self.weights = {k: [like(state["weights"][k][n].float(), p) for n, p in named] for k in self.labels}
        else:
            self.weights = {k: [p.detach().float().clone() for _, p in named] for k in self.labels}

    @torch.no_grad()
    def update(self, module: nn.Module, steps: int = 1) -> None:
        """Averages in ``module``'s weights as the last ``steps`` optimizer steps' (see the class docstring)."""
        if not self.weights:
            self._init(module)
        params, sharded = self._params_of(module)
        weights = self.weights
        if sharded:  # this rank's shards
            params = [local(p.detach()) for p in params]
            weights = {key: [local(w) for w in ema] for key, ema in weights.items()}
        if any(p.dtype != torch.float32 for p in params):
            params = [p.float() if p.dtype != torch.float32 else p for p in params]
        first, self.num_updates = self.num_updates + 1, self.num_updates + steps
        for key, ema in weights.items():
            keep = math.prod(self.decay_at(key, n) for n in range(first, self.num_updates + 1))
            torch._foreach_lerp_(ema, params, 1.0 - keep)

    def step_done(self, module: nn.Module, step: int) -> None:
        """After optimizer step ``step`` (global, from 1): the update, when ``step`` is a multiple of
        ``update_every``, for the steps since the last (since the multiple before when that is not known)."""
        if step % self.update_every == 0:
            covered = self.covered_step if self.covered_step is not None else step - self.update_every
            if step > covered:
                self.update(module, steps=step - covered)
            self.covered_step = step

    def snapshot(self, write: bool) -> Path | None:
        """Writes the power-function averages to ``snapshot_dir/step_<covered step>.safetensors`` (``write``: this
        rank writes; with a sharded model every rank calls this, a collective). Once per number of updates."""
        if not self.weights or self.num_updates == self._snapshot_updates or self.covered_step is None:
            return None
        self._snapshot_updates = self.num_updates
        if not (write or self._sharded):  # whole averages on every rank (DDP): only the writer copies them
            return None
        averages = {s: self._gathered(label(s), write) for s in self.sigma_rels}
        if not write:
            return None
        path = Path(self.snapshot_dir) / f"step_{self.covered_step:07d}.safetensors"
        return write_snapshot(path, averages, self.covered_step, self.num_updates, self.snapshot_dtype,
                              on_grid=self.covered_step % self.snapshot_every == 0)

    @property
    def _sharded(self) -> bool:
        return any(is_dtensor(w) for ws in self.weights.values() for w in ws)

    def _gathered(self, key: str, keep: bool = True) -> dict[str, Tensor]:
        """One average as whole fp32 tensors on the CPU (a collective call with a sharded model: every rank makes
        each whole tensor in turn; only those that ``keep`` them copy them to host memory, the others get {})."""
        out = {}
        for n, w in zip(self.names, self.weights[key]):
            whole = full_tensor(w.detach())
            if keep:
                out[n] = whole.cpu()
        return out

    # -- Lightning hooks ---------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.weights:
            self._init(pl_module)
        if hasattr(pl_module, "val_weights"):  # validation also with these averages: val/loss_ema_<name>
            pl_module.val_weights.update({f"ema_{key}": functools.partial(self.swapped, pl_module, key)
                                          for key in self.validate})

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for key in self.validate:  # the module keeps no reference to this fit's averages
            getattr(pl_module, "val_weights", {}).pop(f"ema_{key}", None)

    def on_step_end(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        self.step_done(pl_module, step)
        if self.snapshot_every and step % self.snapshot_every == 0:
            self.snapshot(trainer.is_global_zero)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.snapshot_every:  # the last step's averages, also when a signal stopped the run
            self.snapshot(trainer.is_global_zero)

    def state(self, keep: bool = True) -> dict:
        """Whole fp32 tensors on the CPU; with a sharded model (FSDP) a collective call: every rank calls it, and
        only ranks that ``keep`` the tensors hold them (the others' ``weights`` are empty)."""
        return {"decays": self.decays, "sigma_rels": self.sigma_rels, "num_updates": self.num_updates,
                "step": self.covered_step, "weights": {k: self._gathered(k, keep) for k in self.weights}}

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self._loaded is not None:  # restored after on_fit_start (FSDP restores after setup) and not used yet
            self._init(pl_module)
        # only rank 0 writes checkpoints: the others would hold a host copy of every average for nothing
        if self.weights and (trainer.is_global_zero or self._sharded):
            state = self.state(keep=trainer.is_global_zero)
            if trainer.is_global_zero:
                checkpoint["ema"] = state

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if "ema" in checkpoint:
            self._loaded, self.weights = checkpoint["ema"], {}
            self.covered_step = checkpoint["ema"].get("step")  # older checkpoints: not known

    # -- using the averages ------------------------------------------------------------------------
    @contextlib.contextmanager
    def swapped(self, module: nn.Module, average: float | str | None = None) -> Iterator[None]:
        """Temporarily loads the EMA weights of ``average`` (a decay or ``sigma_rel_<s>``; default: the sampling
        average) into ``module`` (raw weights restored after)."""
        if not self.weights:
            self._init(module)
        reshard(module)  # a sharded model: its parameters are this rank's shards again
        params = [local(p.detach()) for _, p in self._named_params(module)]
        backup = [p.clone() for p in params]
        key = self.sample_decay if average is None else self.key(average)
        outer = self._swap
        try:
            self._copy_average(params, key)
            self._swap = (module, params, backup, key)
            yield
        finally:
            self._swap = outer
            reshard(module)  # the body's forward passes may have left the average gathered
            with torch.no_grad():
                torch._foreach_copy_(params, backup)

    @torch.no_grad()
    def _copy_average(self, params: list[Tensor], key: str) -> None:
        torch._foreach_copy_(params, [local(w).to(p.dtype) for w, p in zip(self.weights[key], params)])

    @contextlib.contextmanager
    def unswapped(self) -> Iterator[None]:
        """Inside :meth:`swapped`, the trained weights back in the module for the body, the average again after
        it: a checkpoint saved during an evaluation (a signal) must hold the trained weights. Elsewhere, nothing."""
        if self._swap is None:
            yield
            return
        module, params, backup, key = self._swap
        reshard(module)
        with torch.no_grad():
            torch._foreach_copy_(params, backup)
        try:
            yield
        finally:
            reshard(module)
            self._copy_average(params, key)


def checkpoint_average(ckpt: dict, weights: str, where: str, option: str = "weights"
                       ) -> tuple[str, dict[str, Tensor]]:
    """The EMA average of a checkpoint that ``weights`` names, and its tensors: ``ema`` (the run's sampling
    average, its ``callbacks.ema.sample_decay``, else its first average; a checkpoint that records no EMA config,
    or that holds a single average: its first), ``ema_<decay>`` or ``ema_sigma_rel_<s>``. ``where``: the
    checkpoint in errors, ``option``: the setting that chose ``weights``."""
    averages = (ckpt.get("ema") or {}).get("weights")
    if not averages:
        raise ValueError(f"{where} holds no EMA weights; use {option}=raw")
    name = weights.removeprefix("ema").removeprefix("_")
    if name:
        try:
            name = EMA.key(name)
        except ValueError:
            raise ValueError(f"{option}={weights}: give raw, ema, ema_<decay> (ema_0.9999) or ema_sigma_rel_<s>; "
                             f"{where} has EMA averages {list(averages)}") from None
    else:
        config = (ckpt.get("diffusion_train") or {}).get("config") or {}
        ema = (config.get("callbacks") or {}).get("ema") or {}
        chosen = ema.get("sample_decay")
        name = (EMA.key(chosen) if chosen is not None else
                EMA.first_average(ema.get("decays") or [], ema.get("sigma_rels") or []) or next(iter(averages)))
        if name not in averages and len(averages) > 1:  # e.g. the post-hoc averages of scripts/posthoc_ema.py
            raise ValueError(f"{option}={weights}: the run samples with its EMA {name}, which {where} does not hold; "
                             f"choose one of its averages: {', '.join('ema_' + k for k in averages)}")
        name = name if name in averages else next(iter(averages))
    if name not in averages:
        raise ValueError(f"{option}={weights}: {where} has EMA averages {list(averages)}, not {name}")
    return name, averages[name]


def find_ema(trainer: L.Trainer) -> EMA | None:
    return next((c for c in trainer.callbacks if isinstance(c, EMA)), None)


@contextlib.contextmanager
def sampling_weights(trainer: L.Trainer, module: nn.Module) -> Iterator[None]:
    """The weights callbacks sample with: the EMA callback's sampling decay swapped in (the raw weights
    without an EMA callback), in the trainer's precision context."""
    ema = find_ema(trainer)
    with (ema.swapped(module) if ema is not None else contextlib.nullcontext()), \
            trainer.precision_plugin.forward_context():
        yield
