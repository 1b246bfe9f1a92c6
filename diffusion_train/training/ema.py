"""Exponential moving averages of the trainable weights, several decays at once, in fp32."""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import lightning as L
import torch
from torch import Tensor, nn

from diffusion_train.training.parallel import full_tensor, like, local


class EMA(L.Callback):
    """Keeps fp32 EMA copies of every trainable parameter of the LightningModule.

    After each optimizer step n (counting from 1), for each decay d:
        ema <- ema + (1 - d_n) * (param - ema),   d_n = min(d, (1 + n) / (10 + n)) with ``warmup``
    (the warm-up keeps early averages from being dominated by the random init), else d_n = d.
    Updates use ``torch._foreach_lerp_`` over all tensors at once. With ``update_every`` = k > 1 they run after
    every k-th optimizer step only, and one update stands for the k steps since the last: the old average keeps
    the product of their k decays and the current weights stand in for the k - 1 skipped ones. The decays stay
    per optimizer step (the same horizon for any k) while the EMA's memory traffic falls k-fold; the steps after
    the last multiple of k are not averaged in.

    The averages live in ``checkpoint["ema"]`` = {"decays", "num_updates" (optimizer steps averaged in),
    "step" (the global step they cover through), "weights": {str(decay): {name: tensor}}}, next to (never
    instead of) the raw weights in ``checkpoint["state_dict"]``. ``sample_decay`` (default: the first decay) is
    the average used for sample grids and export.
    """

    def __init__(self, decays: Sequence[float] = (0.9999,), warmup: bool = True, update_every: int = 1,
                 sample_decay: float | None = None):
        super().__init__()
        self.decays = [float(d) for d in decays]
        if not self.decays or not all(0.0 < d < 1.0 for d in self.decays):
            raise ValueError(f"callbacks.ema.decays must be a non-empty list of values in (0, 1), got {decays}")
        self.sample_decay = float(sample_decay) if sample_decay is not None else self.decays[0]
        if self.sample_decay not in self.decays:
            raise ValueError(f"callbacks.ema.sample_decay {sample_decay} is not one of decays {self.decays}")
        self.warmup, self.update_every = warmup, int(update_every)
        if self.update_every < 1:
            raise ValueError(f"callbacks.ema.update_every must be >= 1, got {update_every}")
        self.num_updates = 0
        self.covered_step: int | None = None  # the global step the averages cover through (None: not known)
        self.names: list[str] = []
        self.weights: dict[float, list[Tensor]] = {}
        self._loaded: dict | None = None
        self._last_step = -1
        self._swap: tuple[list[Tensor], list[Tensor], float] | None = None  # inside swapped(): params, raw, decay

    @staticmethod
    def _named_params(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in module.named_parameters() if p.requires_grad]

    def decay_at(self, decay: float, n: int) -> float:
        return min(decay, (1 + n) / (10 + n)) if self.warmup else decay

    def _init(self, module: nn.Module) -> None:
        named = self._named_params(module)
        self.names = [n for n, _ in named]
        if self._loaded is not None:
            state, self._loaded = self._loaded, None
            missing = [n for n in self.names if n not in state["weights"].get(str(self.decays[0]), {})]
            if missing or [float(d) for d in state["decays"]] != self.decays:
                raise ValueError(f"checkpoint EMA (decays {state['decays']}) does not match this run "
                                 f"(decays {self.decays}, missing {missing[:3]})")
            self.num_updates = int(state["num_updates"])
            self.weights = {d: [like(state["weights"][str(d)][n].float(), p) for n, p in named] for d in self.decays}
        else:
            self.weights = {d: [p.detach().float().clone() for _, p in named] for d in self.decays}

    @torch.no_grad()
    def update(self, module: nn.Module, steps: int = 1) -> None:
        """Averages in ``module``'s weights as the last ``steps`` optimizer steps' (see the class docstring)."""
        if not self.weights:
            self._init(module)
        params = [local(p.detach()) for _, p in self._named_params(module)]
        params = [p.float() if p.dtype != torch.float32 else p for p in params]
        first, self.num_updates = self.num_updates + 1, self.num_updates + steps
        for d, ema in self.weights.items():
            keep = math.prod(self.decay_at(d, n) for n in range(first, self.num_updates + 1))
            torch._foreach_lerp_([local(w) for w in ema], params, 1.0 - keep)

    def step_done(self, module: nn.Module, step: int) -> None:
        """After optimizer step ``step`` (global, from 1): the update, when ``step`` is a multiple of
        ``update_every``, for the steps since the last (since the multiple before when that is not known)."""
        if step % self.update_every == 0:
            covered = self.covered_step if self.covered_step is not None else step - self.update_every
            if step > covered:
                self.update(module, steps=step - covered)
            self.covered_step = step

    # -- Lightning hooks ---------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.weights:
            self._init(pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step  # a resumed run's step is restored by now (not yet at fit start)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step != self._last_step:  # an optimizer step happened in this batch
            self._last_step = step
            self.step_done(pl_module, step)

    def state(self) -> dict:
        """Whole fp32 tensors on the CPU; with a sharded model (FSDP) a collective call: every rank calls it."""
        return {"decays": self.decays, "num_updates": self.num_updates, "step": self.covered_step,
                "weights": {str(d): {n: full_tensor(w.detach()).cpu() for n, w in zip(self.names, ws)}
                            for d, ws in self.weights.items()}}

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self.weights:
            checkpoint["ema"] = self.state()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if "ema" in checkpoint:
            self._loaded, self.weights = checkpoint["ema"], {}
            self.covered_step = checkpoint["ema"].get("step")  # older checkpoints: not known

    # -- using the averages ------------------------------------------------------------------------
    @contextlib.contextmanager
    def swapped(self, module: nn.Module, decay: float | None = None) -> Iterator[None]:
        """Temporarily loads the EMA weights of ``decay`` into ``module`` (raw weights restored after)."""
        if not self.weights:
            self._init(module)
        params = [local(p.detach()) for _, p in self._named_params(module)]  # a sharded model: this rank's shards
        backup = [p.clone() for p in params]
        decay = decay or self.sample_decay
        self._copy_average(params, decay)
        self._swap = (params, backup, decay)
        try:
            yield
        finally:
            self._swap = None
            with torch.no_grad():
                torch._foreach_copy_(params, backup)

    @torch.no_grad()
    def _copy_average(self, params: list[Tensor], decay: float) -> None:
        torch._foreach_copy_(params, [local(w).to(p.dtype) for w, p in zip(self.weights[decay], params)])

    @contextlib.contextmanager
    def unswapped(self) -> Iterator[None]:
        """Inside :meth:`swapped`, the trained weights back in the module for the body, the average again after
        it: a checkpoint saved during an evaluation (a signal) must hold the trained weights. Elsewhere, nothing."""
        if self._swap is None:
            yield
            return
        params, backup, decay = self._swap
        with torch.no_grad():
            torch._foreach_copy_(params, backup)
        try:
            yield
        finally:
            self._copy_average(params, decay)


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
