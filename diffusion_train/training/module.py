"""The LightningModule: thin glue around backbone + conditioner + objective."""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import math
from dataclasses import replace
from typing import Any, Callable, Sequence

import lightning as L
import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from diffusion_train.cli import UserError
from diffusion_train.conditioning import Cond, Conditioner
from diffusion_train.conditioning.autoencoder import Autoencoder
from diffusion_train.data.samplers import mix_seed
from diffusion_train.diffusion import GaussianDiffusion
from diffusion_train.finetune.controlnet import Controlled
from diffusion_train.training.checkpointing import restore_rng_states, rng_states
from diffusion_train.training.generation import Generation
from diffusion_train.training.loggers import log_run_config
from diffusion_train.training.parallel import full_tensor, logs_at, mean_over_ranks, sum_over_ranks
from diffusion_train.training.speed import (
    attention_choice, check_attention_device, check_fp8_device, prepare_backbone, resolve_channels_last,
    resolve_compile, with_attention,
)

log = logging.getLogger("diffusion_train")


class NonFiniteLossError(UserError):
    """Raised after too many consecutive optimizer steps with a non-finite loss or gradient."""


def recount_batches(checkpoint: dict, accumulate: int) -> None:
    """Lightning counts batches, the config optimizer steps (its intervals are multiplied by the accumulation). A run
    resumed with another split into accumulated micro-batches (the same global batch) has the checkpoint's batch
    counters moved, in place, to what this split counts by the same step, so validation and logging stay on the
    configured steps. The checkpoint's split: its global batch over its per-device batch and world size."""
    meta = checkpoint.get("diffusion_train") or {}
    try:
        made = int(meta["global_batch"]) // (int(meta["per_device_batch"]) * int(meta["world_size"]))
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return
    shift = int(checkpoint.get("global_step", 0)) * (int(accumulate) - made)
    fit_loop = (checkpoint.get("loops") or {}).get("fit_loop") or {}
    if not shift or not fit_loop:
        return
    progress = fit_loop.get("epoch_loop.batch_progress") or {}
    for part in ("total", "current"):
        for key, value in (progress.get(part) or {}).items():
            progress[part][key] = value + shift
    state = fit_loop.get("epoch_loop.state_dict") or {}
    if "_batches_that_stepped" in state:
        state["_batches_that_stepped"] += shift


class DiffusionModule(Generation, L.LightningModule):
    """Trains ``backbone`` with ``objective`` on batches conditioned by ``conditioner``, in the latent
    space of the frozen ``autoencoder`` (identity: pixel space).

    The optimisation step is written out (manual optimisation) so it can stay free of host syncs:
    a step whose gradient norm is not finite is skipped by the fused optimizer itself (its
    ``found_inf`` input), counted, and ``max_nonfinite_steps`` skipped steps in a row stop the run
    (checked every ``trainer.log_every_n_steps`` steps) before any bad update reaches the weights.

    The noise, timesteps and CFG dropout of each micro-batch come from a generator seeded by (seed, step,
    global micro-batch index), the index being ``micro * world_size + rank``: the data streams give
    that micro-batch the same samples whatever the split (see ``InfiniteBatchSampler``), so a resumed
    run draws exactly what an uninterrupted one would, and W devices with A accumulation steps train
    exactly as W*A micro-batches in a row on one device (up to float summation order).
    """

    data_resize: str | None = None  # how the training images were brought to size (data.resize): FID references

    def __init__(self, backbone: nn.Module, conditioner: Conditioner, objective: GaussianDiffusion,
                 optimizer: Callable[..., torch.optim.Optimizer],
                 lr_schedule: Callable[[torch.optim.Optimizer], Any] | None = None, *,
                 autoencoder: Autoencoder | None = None, grad_clip: float | None = 1.0,
                 accumulate_grad_batches: int = 1, max_nonfinite_steps: int = 20,
                 compile: bool | str = False, compile_options: dict | None = None,
                 activation_checkpointing: bool | int = False, channels_last: bool | str = False, fp8: bool = False,
                 bf16_residual: bool = False, attention: str = "auto", seed: int = 0, task=None,
                 controlnet: nn.Module | None = None, control=None, no_weight_decay: Sequence[str] = ()):
        super().__init__()
        self.automatic_optimization = False
        self.backbone, self.conditioner, self.objective = backbone, conditioner, objective
        self.task = task  # e.g. finetune.inpainting.Inpainting: what cond.image the backbone also sees
        self.autoencoder = autoencoder if autoencoder is not None else Autoencoder()
        self.optimizer_factory, self.lr_schedule_factory = optimizer, lr_schedule
        self.no_weight_decay = list(no_weight_decay or ())
        self.grad_clip, self.accumulate_grad_batches = grad_clip, int(accumulate_grad_batches)
        self.max_nonfinite_steps, self.seed = max_nonfinite_steps, seed
        # What the step calls (see training/speed.py). A compiled wrapper is kept outside the module tree, so
        # state dicts never carry `_orig_mod.`.
        self.compile = resolve_compile(compile, backbone, torch.cuda.is_available())  # auto made concrete
        self.channels_last = resolve_channels_last(channels_last, backbone, torch.cuda.is_available())
        net = prepare_backbone(backbone, compile=self.compile, compile_options=compile_options,
                               activation_checkpointing=activation_checkpointing, channels_last=self.channels_last,
                               fp8=fp8, bf16_residual=bf16_residual, attention=attention)
        self.fp8, self.attention = fp8, attention_choice(attention)
        self.controlnet, self.control = controlnet, control  # a ControlNet fine-tune: the copy, the control images
        self.__dict__["net"] = (Controlled(net, with_attention(controlnet, self.attention)) if controlnet is not None
                                else net)
        self.run_info: dict = {}
        self.lr_scale = 1.0  # set from the global batch by training.lr_scaling (see training/parallel.py)
        self._micro = 0
        self._loss_sum: Tensor | None = None  # the micro-batches' losses of the step in progress
        self._generators: dict[torch.device, torch.Generator] = {}
        self._train_logs: dict[str, Any] = {}  # the latest training values, logged at logging batches
        # more weights to validate, next to the trained ones: name -> a context that loads them (the EMA callback's
        # callbacks.ema.validate); each logs val/loss_<name>
        self.val_weights: dict[str, Callable[[], contextlib.AbstractContextManager]] = {}
        self.register_buffer("nonfinite_steps", torch.zeros((), dtype=torch.long), persistent=True)
        self.register_buffer("nonfinite_streak", torch.zeros((), dtype=torch.long), persistent=False)

    # -- helpers ---------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_groups(self) -> list[dict]:
        """The optimizer's parameter groups: the trainable parameters, and apart, with weight decay 0, those that
        ``no_weight_decay`` names: ``1d`` (biases, norm gains: parameters of fewer than 2 dimensions) or a
        name pattern (fnmatch, e.g. ``*pos_embed*``). A pattern that matches no parameter is an error."""
        if not self.no_weight_decay:
            return [{"params": self.trainable_parameters()}]
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        patterns = [r for r in self.no_weight_decay if r != "1d"]
        unmatched = [r for r in patterns if not any(fnmatch.fnmatchcase(n, r) for n, _ in named)]
        if unmatched:
            raise ValueError(f"training.no_weight_decay: {unmatched} match no trainable parameter (names look like "
                             f"{named[0][0] if named else 'none'!r})")

        def exempt(name: str, p: nn.Parameter) -> bool:
            return ("1d" in self.no_weight_decay and p.ndim < 2) or any(fnmatch.fnmatchcase(name, r) for r in patterns)

        groups = [{"params": [p for n, p in named if not exempt(n, p)]},
                  {"params": [p for n, p in named if exempt(n, p)], "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    @property
    def image_size(self) -> int:
        """The side of the images :meth:`sample_seeded` makes at the backbone's own size, after the autoencoder."""
        return int(self.backbone.input_size) * int(getattr(self.autoencoder, "downsample", 1))

    def step_generator(self, *keys: int) -> torch.Generator:
        g = self._generators.get(self.device)
        if g is None:
            g = self._generators[self.device] = torch.Generator(self.device)
        return g.manual_seed(mix_seed(self.seed, *keys))

    def seed_global_generators(self, *keys: int) -> None:
        """Seeds the default generators that the step's global draws (dropout) use, the CPU's and this module's
        device's, from ``keys``: what ``torch.manual_seed`` does to them, without its host time in a step. That
        also queues the seed for each accelerator backend not yet initialised (XPU and MTIA on a GPU, CUDA too on
        a CPU) and captures the Python stack for each, reading every frame's source file."""
        seed = mix_seed(self.seed, *keys, 1)
        torch.default_generator.manual_seed(seed)
        if self.device.type == "cuda":  # initialised: the module is there
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            torch.cuda.default_generators[index].manual_seed(seed)
        elif self.device.type != "cpu":
            torch.manual_seed(seed)

    def forward(self, x: Tensor, t: Tensor, cond: Cond | None) -> Tensor:
        return self.net(x, t, cond)

    def latents(self, batch: dict, generator: torch.Generator | None = None) -> Tensor:
        """The diffusion model's data: the batch's precomputed ``latent`` (autoencoder moments, see
        ``scripts/precompute.py``) or its ``image`` encoded now, then posterior-sampled and scaled."""
        if "latent" in batch:
            moments = batch["latent"]
        elif "image" in batch:
            moments = self.autoencoder.encode_moments(batch["image"])
        else:
            keys = batch.get("__key__")
            first = keys[0] if isinstance(keys, (list, tuple)) and keys else "?"
            raise KeyError(f"a batch needs an 'image' or a precomputed 'latent'; the batch of sample {first!r} "
                           f"has {sorted(batch)}")
        return self.autoencoder.latents_from_moments(moments, generator)

    def loss(self, batch: dict, generator: torch.Generator | None = None, **objective_kwargs) -> Tensor:
        """Per-sample training loss; one generator draws the posterior sample, the CFG dropout, the
        timesteps and the noise, in that order."""
        x0 = self.latents(batch, generator)
        text_drop, image_drop = None, None
        if self.training and hasattr(self.task, "draw_drops"):  # a task's joint CFG dropout (editing)
            text_drop, image_drop = self.task.draw_drops(x0.shape[0], generator, x0.device)
        cond = self.with_task(self.conditioner(batch, generator=generator, drop=text_drop), x0, batch, generator,
                              image_drop)
        return self.objective.loss(self.net, x0, cond, generator=generator, **objective_kwargs)

    def with_task(self, cond: Cond, x0: Tensor, batch: dict, generator: torch.Generator | None,
                  image_drop: Tensor | None = None) -> Cond:
        """``cond`` with the task's training input as ``cond.image`` (an inpainting mask and masked image, an
        editing source, dropped where ``image_drop``) and a ControlNet's control image as ``cond.control``."""
        if self.control is not None:
            cond = replace(cond, control=self.control(batch).to(self.device))
        if self.task is None:
            return cond
        kwargs = {} if image_drop is None else {"drop": image_drop}
        image = self.task.training_image(x0, generator, batch=batch, encode=lambda b: self.latents(b, generator),
                                         **kwargs)
        return replace(cond, image=image)

    # -- training --------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        keys = (self.global_step, self._micro * self.trainer.world_size + self.global_rank)
        g = self.step_generator(*keys)
        # The global generators (dropout) too: a function of the step, micro-batch and rank, so a resumed run
        # draws what the uninterrupted one did, and the ranks draw differently.
        self.seed_global_generators(*keys)
        # DDP all-reduces the gradients in the step's last backward pass only; FSDP reduce-scatters in each, or with
        # trainer.strategy.reduce_every_micro_batch=false in the last only (keeping whole gradients until then)
        last = self._micro + 1 == self.accumulate_grad_batches
        no_sync = getattr(self.trainer.strategy, "block_backward_sync", None)
        with contextlib.nullcontext() if last or no_sync is None else no_sync():
            loss = self.batch_loss(batch, g)
            self.manual_backward(loss / self.accumulate_grad_batches)
        self._loss_sum = loss.detach() if self._micro == 0 else self._loss_sum + loss.detach()
        self._micro += 1
        if self._micro == self.accumulate_grad_batches:
            self._micro = 0
            self._train_logs["train/loss"] = self._loss_sum / self.accumulate_grad_batches  # the step's loss
            self._optimizer_step()
        return loss.detach()

    def batch_loss(self, batch: dict, generator: torch.Generator | None = None) -> Tensor:
        """The batch's mean training loss, with its per-sample ``loss_weight`` if it has one (e.g. DreamBooth's
        prior-preservation weight of the class images)."""
        per_sample = self.loss(batch, generator)
        weights = batch.get("loss_weight")
        return per_sample.mean() if weights is None else (per_sample * weights.to(per_sample)).mean()

    def optimizer_update(self, opt, schedulers: list) -> Tensor:
        """One optimizer step from the accumulated gradients: clip, step (a non-finite gradient norm skips the
        update), zero the gradients, step the schedules, count non-finite steps. ``opt``: the optimizer or
        Lightning's wrapper of it. Returns the gradient norm (a device tensor).

        A fused optimizer (fused Adam/AdamW) does the clipping itself: it divides each gradient by its
        ``grad_scale`` input as it reads it, as for a gradient scaler, instead of a separate pass that reads and
        writes every gradient (the kernel writes the divided gradients back: 4 bytes per parameter a step saved)."""
        inner = getattr(opt, "optimizer", opt)
        params = [p for group in inner.param_groups for p in group["params"]]  # the trainable ones, without a walk
        if getattr(inner, "_step_supports_amp_scaling", False):
            grads = [p.grad for p in params if p.grad is not None]
            grad_norm = full_tensor(torch.nn.utils.get_total_norm(grads, foreach=True))  # FSDP: the global norm
            nonfinite = ~torch.isfinite(grad_norm)
            inner.found_inf = nonfinite.float()  # the fused kernel skips the update on device
            # clip_grad_norm_'s factor min(1, max_norm / (norm + 1e-6)), as the divisor the kernel takes
            inner.grad_scale = ((grad_norm + 1e-6) / self.grad_clip).clamp_(min=1.0) if self.grad_clip else None
            opt.step()
        else:  # other optimizers: one host sync decides; a step without gradients updates nothing
            max_norm = self.grad_clip if self.grad_clip else math.inf
            grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))
            nonfinite = ~torch.isfinite(grad_norm)
            if bool(nonfinite):  # but is still counted, so schedules and data stay aligned
                opt.zero_grad(set_to_none=True)
            opt.step()
        opt.zero_grad(set_to_none=True)
        for sched in schedulers:
            sched.step()
        self.nonfinite_steps += nonfinite.long()
        self.nonfinite_streak.mul_(nonfinite.long()).add_(nonfinite.long())
        return grad_norm

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        """Logs the training values of the batch (kept as device tensors by the step) when Lightning writes this
        batch's logs: at its logging interval, when a callback has just stopped the fit, and in every batch of a
        ``fast_dev_run``, as Lightning's ``update_train_step_metrics`` decides. Each ``self.log``
        call costs host time, so the other batches, whose values Lightning would overwrite unwritten, skip it.
        (This hook runs after the callbacks' and before Lightning writes the logs.)"""
        trainer = self.trainer
        if 0 < trainer.max_steps <= self.global_step:  # Lightning validates a fit that stops: a run ends validated
            trainer.should_stop = True
        elif trainer.should_stop and self._micro == 0 and not logs_at(trainer, self, self.global_step):
            self._log_data_counts()  # a signal's stop (the same step on every rank) writes a row of this step
        if self._train_logs and (trainer._logger_connector.should_update_logs or trainer.fast_dev_run):
            logs = dict(self._train_logs)
            if "train/lr" in logs:  # a float would be copied to the device in a blocking copy
                logs["train/lr"] = torch.full((), logs["train/lr"], device=self.device)
            if "train/nonfinite_steps" in logs:
                logs["train/nonfinite_steps"] = logs["train/nonfinite_steps"].float()
            if "train/loss" in logs:  # every rank's micro-batches (self.log's sync_dist would add a barrier)
                logs["train/loss"] = mean_over_ranks(logs["train/loss"])
            self.log_dict(logs)  # train/loss: shown by LossProgressBar, which refreshes at logging steps

    def _optimizer_step(self) -> None:
        opt = self.optimizers()
        lr = opt.optimizer.param_groups[0]["lr"]  # the step's (the schedule moves it on after the step)
        grad_norm = self.optimizer_update(opt, self._schedulers())
        self._train_logs.update({"train/grad_norm": grad_norm.detach(), "train/lr": lr,
                                 "train/nonfinite_steps": self.nonfinite_steps})
        if logs_at(self.trainer, self, self.global_step):
            self._log_data_counts()
            streak = int(self.nonfinite_streak)
            if streak >= self.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{streak} optimizer steps in a row had a non-finite loss or gradient (step "
                    f"{self.global_step}); stopping with the last checkpoint intact. Lower optim.lr, "
                    f"check the data, or raise training.max_nonfinite_steps")

    def _log_data_counts(self) -> None:
        """Host-side counts of the data, summed over the ranks (every rank calls this at the same steps): captions
        cut to the encoder's max_length (counted when encoded) and, for streamed data, unusable samples by reason,
        whose share of the samples read the data module then checks (the same sums, so every rank stops or none)."""
        counts = {}
        truncated = self._truncated_captions()
        if truncated:
            counts["data/truncated_captions"] = sum(truncated.values())
        data = self.trainer.datamodule
        skipped = getattr(data, "skip_counts", None)
        if skipped is not None:
            counts.update({f"data/skipped_{reason}": n for reason, n in skipped.items()})
            counts["used"] = data.samples_used
        if not (truncated or skipped is not None):  # the same on every rank: the model's and the data's kind
            return
        total = sum_over_ranks(counts)
        used = total.pop("used", 0)
        self.log_dict({name: float(n) for name, n in total.items()})
        if skipped is not None:
            data.check_bad_data({k.removeprefix("data/skipped_"): n for k, n in total.items()
                                 if k.startswith("data/skipped_")}, used)

    def _truncated_captions(self) -> dict[str, int]:
        """Each text embedder's count of training captions cut to its max_length, in this process."""
        return {name: e.num_truncated for name, e in self.conditioner.embedders.items() if hasattr(e, "num_truncated")}

    def _schedulers(self) -> list:
        scheds = self.lr_schedulers()
        return [] if scheds is None else scheds if isinstance(scheds, list) else [scheds]

    def on_fit_start(self) -> None:
        if self.fp8:
            check_fp8_device(self.device)
        check_attention_device(self.attention, self.device)
        trainer = self._trainer  # None when called outside a fit
        if trainer is not None and getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError(f"trainer.precision={trainer.precision}: fp16 with a gradient scaler is not supported "
                             f"(its step would replace this step's own clipping and non-finite skip); use bf16-mixed")
        log_run_config(getattr(trainer, "loggers", []), self.run_info)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Lightning's count of batches that stepped the loggers, which decides the logging steps: the batches the
        # steps so far hold. Extending a finished run, Lightning's restart counts one batch that never ran.
        loop = self.trainer.fit_loop.epoch_loop
        if hasattr(loop, "_batches_that_stepped"):
            loop._batches_that_stepped = self.trainer.global_step * self.accumulate_grad_batches + self._micro

    def on_train_start(self) -> None:
        if self.trainer.ckpt_path:  # resumed: Lightning restored the checkpoint's rates and schedule
            self.apply_configured_rates()
        for cb in self.trainer.checkpoint_callbacks:
            # Lightning's ModelCheckpoint takes the end of each batch whose step it has not saved for the end of that
            # step: with gradient accumulation, a resumed step's first micro-batch would be saved as the whole step
            if hasattr(cb, "_last_global_step_saved"):
                cb._last_global_step_saved = max(cb._last_global_step_saved, self.trainer.global_step)

    def apply_configured_rates(self) -> None:
        """The optimizer's hyperparameters (learning rate, weight decay, betas, ...) and the learning-rate schedule
        of this launch's config, at the restored step, in place of the checkpoint's. The optimizer's moments and the
        schedule's step count stay. With the config unchanged nothing changes."""
        opt = self.optimizers().optimizer
        saved_lr = opt.param_groups[0]["lr"]
        fresh = self.configure_optimizers()
        fresh_opt = fresh["optimizer"] if isinstance(fresh, dict) else fresh
        scheds = self._schedulers()
        keep = {"params"}
        if scheds and not isinstance(scheds[0], LambdaLR):  # it moves the rate itself: keep the checkpoint's
            log.warning("resumed with the checkpoint's %s state and learning rate: only LambdaLR schedules take "
                        "the new config's", type(scheds[0]).__name__)
            keep |= {"lr", "initial_lr"}
        for group, new in zip(opt.param_groups, fresh_opt.param_groups):
            group.update({k: v for k, v in new.items() if k not in keep})
        if not scheds or "lr" in keep:
            return
        sched, template = scheds[0], fresh["lr_scheduler"]["scheduler"]
        sched.load_state_dict({**template.state_dict(), "last_epoch": sched.last_epoch,
                               "_step_count": sched._step_count})
        for group, base, factor in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["initial_lr"], group["lr"] = base, base * factor(sched.last_epoch)
        sched._last_lr = [group["lr"] for group in opt.param_groups]
        if not math.isclose(saved_lr, opt.param_groups[0]["lr"], rel_tol=1e-9):
            log.info("resumed at step %d: learning rate %.4g (checkpoint) -> %.4g (this config's schedule)",
                     sched.last_epoch, saved_lr, opt.param_groups[0]["lr"])

    def configure_model(self) -> None:
        """Strategies that shard the model (``training.parallel.FSDP``) do it here; others have nothing to do."""
        parallelize = getattr(self.trainer.strategy, "parallelize", None)
        if parallelize is not None:
            parallelize(self)

    def configure_optimizers(self):
        opt = self.optimizer_factory(self.parameter_groups())
        for group in opt.param_groups:  # before the schedule reads its base rates
            group["lr"] *= self.lr_scale
        if self.lr_schedule_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.lr_schedule_factory(opt), "interval": "step"}}

    # -- validation: fixed noise and stratified timesteps, so the number is comparable across steps --
    # and across runs: each fixed batch of the set (data.samplers.fixed_batches) draws from its own stream,
    # whatever the number of ranks, and each item counts once (padding batches not at all).
    def on_validation_model_zero_grad(self) -> None:
        """Lightning frees the gradients before validating; in the middle of an accumulated step (a time-based
        ``trainer.val_check_interval`` validates after any batch) they are the step's micro-batches so far."""
        if self._micro == 0:
            super().on_validation_model_zero_grad()

    def on_validation_epoch_start(self) -> None:
        # (1 + len(val_weights), 2): each set of weights' loss sum and count
        self._val_total = torch.zeros(1 + len(self.val_weights), 2,
                                      dtype=torch.float64 if self.device.type != "mps" else torch.float32,
                                      device=self.device)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # Each set of weights (the trained ones, then each of val_weights) sees the same latents, noise and
        # timesteps, made once; the condition is made again for each when the conditioner has trained weights
        # (a class embedding, a text encoder trained with the network).
        with self.conditioner.uncounted():  # data/truncated_captions counts the training batches' captions
            x0, t, noise, cond = self.validation_inputs(batch, batch_idx)
            remake = bool(self.val_weights) and any(p.requires_grad for p in self.conditioner.parameters())
            for row, weights in enumerate([contextlib.nullcontext, *self.val_weights.values()]):
                with weights():
                    if row and remake:
                        cond = replace(self.conditioner(batch), image=cond.image, control=cond.control)
                    loss = self.objective.loss(self.net, x0, cond, t=t, noise=noise)
                if not batch.get("__padding__", False):  # a padding batch only keeps the ranks' collectives in step
                    total = torch.stack([loss.sum(), loss.new_tensor(loss.shape[0])])
                    self._val_total[row] += total.to(self._val_total.dtype)

    def validation_inputs(self, batch: dict, batch_idx: int) -> tuple[Tensor, Tensor, Tensor, Cond]:
        """``x0, t, noise, cond`` of a fixed validation batch: its own noise stream, timesteps stratified under the
        training distribution (``objective.validation_t``). The same for any weights but the conditioner's."""
        g = self.step_generator(10**9, batch.get("__batch__", batch_idx), 0)
        x0 = self.latents(batch, g)
        t = self.objective.validation_t(x0.shape[0], self.device)
        noise = torch.randn(x0.shape, generator=g, device=self.device)
        return x0, t, noise, self.with_task(self.conditioner(batch), x0, batch, g)

    def on_validation_epoch_end(self) -> None:
        total = self.trainer.strategy.reduce(self._val_total, reduce_op="sum")
        for name, (loss_sum, count) in zip(["", *self.val_weights], total):
            self.log(f"val/loss_{name}" if name else "val/loss", (loss_sum / count).float())

    # -- checkpoints -------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["diffusion_train"] = self.run_info
        checkpoint["rng"] = rng_states()
        truncated = self._truncated_captions()
        if truncated:  # every rank saves (a gather); summed, so a resume on any number of ranks goes on counting
            checkpoint["truncated_captions"] = sum_over_ranks(truncated)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if checkpoint.get("rng"):
            restore_rng_states(checkpoint["rng"])
        recount_batches(checkpoint, self.accumulate_grad_batches)
        for name, count in checkpoint.get("truncated_captions", {}).items():  # the sum goes on in rank 0's count
            if name in self.conditioner.embedders:
                self.conditioner.embedders[name].num_truncated = count if self.global_rank == 0 else 0
