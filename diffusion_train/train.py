"""``diffusion-train``: compose the config, build the parts, fit; relaunching resumes."""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from diffusion_train.cli import CONFIG_DIR, check_numbers, user_errors_as_one_line
from diffusion_train.training import EMA, AtomicCheckpointIO, RunSummary, StepCheckpoints
from diffusion_train.finetune.lora import lora_scaling
from diffusion_train.training.build import build_module, load_checkpoint_weights
from diffusion_train.training.checkpointing import load_checkpoint, remove_stale_temp_files
from diffusion_train.training.export import export_weights
from diffusion_train.training.loggers import LossProgressBar, OptimizerStepAxis, ResumableCSVLogger, finish_wandb
from diffusion_train.training.parallel import (
    check_devices,
    check_launcher,
    global_batch,
    lightning_intervals,
    lr_scale,
    per_device_batch,
)
from diffusion_train.training.pretrained import load_pretrained
from diffusion_train.training.periodic import finish_resumed_runs
from diffusion_train.training.preemption import Preemption, find_preemption, hand_over, requeue, slurm_identity
from diffusion_train.training.run_dir import (
    Resumable,
    check_ema_averages,
    check_global_batch,
    check_multirun,
    check_param_groups,
    check_resumable,
    check_weights,
    hold_run_dir,
    resolved,
    run_info,
    write_run_files,
)

log = logging.getLogger("diffusion_train")
# Warnings that say nothing about this run: checkpoints are taken after the optimizer step on purpose.
KNOWN_NOISE = (".*ModelCheckpoint with manual optimization.*", ".*isinstance.treespec, LeafSpec.*",
               ".*does not have many workers.*", ".*Checkpoint directory .* exists and is not empty.*",
               ".*module.s. in eval mode at the start of training.*",  # frozen text encoders, on purpose
               ".*IterableDataset. has .__len__. defined.*",  # shard streams split their epoch over workers
               ".*Total length of .list. across ranks is zero.*",  # no validation set: an empty list, on purpose
               ".*The dirpath has changed from.*",  # a branch's checkpoints go to its own folder; all are kept anyway
               r".*self\.log\('val/loss.*sync_dist=True.*")  # the validation losses are summed over ranks by hand


# Numbers checked before any work: (kind, minimum); a bad one is a one-line error naming its key.
TRAINING_NUMBERS = {"data.batch_size": (int, 1), "data.val_batch_size": (int, 1), "scale.global_batch": (int, 1),
                    "optim.lr": (float, 0), "optim.weight_decay": (float, 0), "trainer.max_steps": (int, 1),
                    "training.accumulate_grad_batches": (int, 1), "training.grad_clip": (float, 0),
                    "training.max_nonfinite_steps": (int, 1), "seed": (int, 0),
                    "lr_schedule.warmup_steps": (int, 0), "lr_schedule.total_steps": (int, 1),
                    "lr_schedule.decay_steps": (int, 1), "lr_schedule.decay_fraction": (float, 0),
                    "lr_schedule.min_ratio": (float, 0), "trainer.log_every_n_steps": (int, 1),
                    "data.val_size": (int, 0)}


def check_optimizer(cfg: DictConfig) -> None:
    """Builds the configured optimizer and learning-rate schedule once on a stand-in parameter, so settings they
    refuse (betas outside [0, 1), a cosine with no steps after its warm-up, a decay longer than the run) fail before
    any work, not in the fit."""
    stand_in = [torch.zeros(1, requires_grad=True)]
    try:
        instantiate(cfg.optim, _convert_="all")(stand_in)
    except ValueError as e:
        raise ValueError(f"optim: {e}") from None
    except Exception:  # noqa: BLE001 - e.g. an optimizer for GPU tensors only: the stand-in cannot judge its settings
        pass
    if cfg.get("lr_schedule"):
        instantiate(cfg.lr_schedule, _convert_="all")(torch.optim.SGD(stand_in, lr=1.0))


def quiet_known_warnings() -> None:
    for pattern in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=pattern)


def _instantiate_all(node: DictConfig | None) -> list:
    return [instantiate(c, _convert_="all") for c in (node or {}).values() if c is not None]


def _warn_of_untrained_guidance(module, callbacks: list, pretrained: bool) -> None:
    """Guided samples need the unconditional prediction, which a fresh model learns only from CFG dropout."""
    embedders = list(module.conditioner.embedders.values())
    scales = sorted({c.guidance_scale for c in callbacks if getattr(c, "guidance_scale", 1.0) != 1.0})
    if scales and embedders and not pretrained and not any(getattr(e, "dropout", 0.0) > 0 for e in embedders):
        log.warning("callbacks sample with guidance_scale %s, but no conditioning embedder drops its input (dropout 0): "
                    "the unconditional prediction is never trained and guided samples are not meaningful; set the "
                    "embedder's dropout (e.g. 0.1) or the callbacks' guidance_scale=1", scales)


def train(cfg: DictConfig, run_dir: str | Path) -> L.Trainer:
    """Trains in ``run_dir``, resuming from ``run_dir/checkpoints/last.ckpt`` when it exists, else from
    ``init.branch_from`` when set (a branch of another run)."""
    run_dir = Path(run_dir)
    quiet_known_warnings()
    check_multirun(cfg)  # e.g. a job sharing its directory with another must not touch it
    config = resolved(cfg)  # fails on a missing value before any work starts
    check_numbers(cfg, TRAINING_NUMBERS)  # a bad one would fail later, far from its cause, or train on nothing
    check_optimizer(cfg)
    init = cfg.get("init") or {}
    resume = check_resumable(run_dir, config, init.get("branch_from"))  # refuses another model's; changes nothing
    ckpt = resume.ckpt
    if resume.branched:
        check_branch(resume, init, int(cfg.trainer.max_steps))
    check_devices(cfg.trainer.get("accelerator"), cfg.trainer.get("devices"))
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere and newer
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    datamodule = instantiate(cfg.data, _convert_="all")
    module = build_module(cfg)
    check_weights(resume, module)
    check_param_groups(resume, [len(g["params"]) for g in module.parameter_groups()],
                       f"training.no_weight_decay={module.no_weight_decay}")
    init_report = None
    if init.get("path") and ckpt is None:  # a resumed run has its own weights
        init_report = load_pretrained(module, init.path, str(init.get("weights") or "ema"),
                                      strict=bool(init.get("strict", True)), diffusion=config.get("diffusion") or {})
        if init_report.objective_change:  # a deliberate change is a fine-tune of its own; an unnoticed one is nonsense
            log.warning("init.path: %s was trained with another diffusion objective (%s): the fine-tune learns the "
                        "new one from these weights; if that is not meant, set diffusion=... as the base run had it",
                        init.path, init_report.objective_change)
    if hasattr(datamodule, "check_provenance"):  # precomputed latents / text encodings
        datamodule.check_provenance(module.autoencoder, module.conditioner, module.task)
    accumulate = module.accumulate_grad_batches
    intervals = lightning_intervals(cfg.trainer, accumulate)  # Lightning counts batches, the config steps
    callbacks = _instantiate_all(cfg.callbacks)
    check_ema_averages(resume, next((c.labels for c in callbacks if isinstance(c, EMA)), None))
    for callback in callbacks:  # sample grids, Fréchet distances: their prompts and samplers, before any work
        if hasattr(callback, "check_inputs"):
            callback.check_inputs(module)
    # The EMA first: a checkpoint that another callback's step-end hook saves holds this step's average.
    # The run summary last: it records what the others logged this step. (Lightning then moves the checkpoint
    # callbacks to the end, in this order: the step checkpoints after the periodic ones, which they do not repeat.)
    callbacks.sort(key=lambda c: (not isinstance(c, EMA), isinstance(c, RunSummary), isinstance(c, StepCheckpoints)))
    _warn_of_untrained_guidance(module, callbacks, bool(init.get("path")))
    if cfg.trainer.get("enable_progress_bar", True):  # a refresh reads the loss (a device sync): once per log interval
        callbacks.append(LossProgressBar(refresh_rate=intervals["log_every_n_steps"]))
    loggers = _instantiate_all(cfg.logger)
    for lg in loggers:
        if isinstance(lg, ResumableCSVLogger):
            lg.resume_from(resume.step)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                     plugins=[AtomicCheckpointIO(), *cluster_plugins()], use_distributed_sampler=False,
                                     **intervals)
    check_launcher(trainer)
    finish_resumed_runs(trainer)  # a run resumed at its last step still makes its missing end-of-fit evaluations
    for lg in loggers:
        if isinstance(lg, OptimizerStepAxis):
            lg.follow(trainer)
    scale = cfg.get("scale") or {}
    datamodule.batch_size = per_device_batch(datamodule.batch_size, scale.get("global_batch"), trainer.world_size,
                                             accumulate)
    batch = global_batch(datamodule.batch_size, trainer.world_size, accumulate)
    check_global_batch(ckpt, resume.global_batch, batch, f"{datamodule.batch_size} per device x {trainer.world_size} "
                                                  f"devices x {accumulate} accumulated")
    module.lr_scale = lr_scale(scale.get("lr_scaling"), batch, int(scale.get("lr_base_batch", 256)))
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    module.run_info = run_info(config, overrides, trainer.world_size, batch, slurm=slurm_identity(),
                               per_device_batch=datamodule.batch_size, lr=float(cfg.optim.lr) * module.lr_scale,
                               compile=module.compile, channels_last=module.channels_last)
    if init_report is not None:
        module.run_info["init"] = init_report.as_dict()
    if resume.branched_from:
        module.run_info["branched_from"] = resume.branched_from
    lock = hold_run_dir(run_dir) if trainer.global_rank == 0 else None  # before it changes anything there
    preemption = find_preemption(trainer)
    exit_code = 1  # until the work below returns
    try:
        if trainer.global_rank == 0:
            remove_stale_temp_files(run_dir)
            write_run_files(run_dir, module.run_info)
            if init_report is not None:
                log.info("%s", init_report.summary())
            start = f"{'branching from' if resume.branched else 'resuming'} {ckpt}" if ckpt else "fresh run"
            log.info("run dir %s, %s, global batch %d (%d per device x %d devices x %d accumulated), lr %g, "
                     "compile %s, channels-last %s", run_dir, start, batch, datamodule.batch_size, trainer.world_size,
                     accumulate, module.run_info["lr"], module.compile, module.channels_last)
        if hasattr(datamodule, "prepare_class_images"):  # DreamBooth's prior images, made by the model before training
            make_class_images(datamodule, module, instantiate(cfg.sampler, _convert_="all"), preemption, ckpt)
        if not stopped(preemption):
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
        if not stopped(preemption):
            save_and_export(trainer, run_dir, config, lora_scaling(cfg))
        exit_code = 128 + preemption.signum if stopped(preemption) else 0
        if stopped(preemption):  # checkpointed at a step boundary (or stopped before the fit)
            finish_wandb(loggers, exit_code)  # before a requeue, which ends the job's processes
            # rank 0 requeues while the other ranks wait for it in the barrier below: a rank that exited first
            # could have srun (--kill-on-bad-exit) end the step, rank 0 with it, before the requeue
            requeue(preemption, trainer.is_global_zero, trainer.global_step)
        close_process_groups(trainer)  # a run stopped by a signal (one that finished has closed them)
    finally:
        finish_wandb(loggers, exit_code)  # the next job of a local sweep, in this process, starts its own W&B run
        if preemption is not None:  # its handler covered the work before the fit, the end-of-fit work and the export
            preemption.uninstall()
        if lock is not None:
            lock.close()
    if stopped(preemption):
        hand_over(preemption, trainer.is_global_zero)  # to submitit's handler, which requeues and exits
    return trainer


def check_branch(resume: Resumable, init: DictConfig, max_steps: int) -> None:
    """A branch (``init.branch_from``) continues its checkpoint's weights, so it takes no other initial weights, and
    it needs steps left to train."""
    if init.get("path"):
        raise ValueError(f"init.path={init.path} and init.branch_from={init.branch_from}: a branch continues its "
                         f"checkpoint's weights; give one of them")
    if max_steps <= resume.step:
        raise ValueError(f"init.branch_from: {resume.ckpt} is at step {resume.step}, and trainer.max_steps="
                         f"{max_steps} leaves nothing to train")


def stopped(preemption: Preemption | None) -> bool:
    """Whether the run was stopped by a signal (its ``Preemption`` callback, or None)."""
    return preemption is not None and preemption.stopped_by is not None


def save_and_export(trainer: L.Trainer, run_dir: Path, config: dict, lora_scale: float | None) -> None:
    """After a fit that ended by itself (not by a signal): ``last.ckpt`` at the last step, and the exported weights."""
    last = run_dir / "checkpoints" / "last.ckpt"
    if trainer.state.finished and not trainer.interrupted:
        stale = not last.is_file() or load_checkpoint(last)["global_step"] != trainer.global_step
        if trainer.strategy.broadcast(stale):  # rank 0 decides (the file changes as it is saved); all ranks save
            trainer.save_checkpoint(last, weights_only=False)
        close_process_groups(trainer)  # the last collective: a failing export below leaves no rank waiting
        if trainer.global_rank == 0:
            state = load_checkpoint(last)
            trained = [n for n, p in trainer.lightning_module.named_parameters() if p.requires_grad]
            export_weights(state["state_dict"], state.get("ema"), run_dir / "weights",
                           {"global_step": trainer.global_step, "config": config}, lora_scaling=lora_scale,
                           trained=trained)


def close_process_groups(trainer: L.Trainer) -> None:
    """The orderly end of a multi-process run, after its last collective: every rank waits for the others, then the
    process groups are destroyed. Left alive, a process's gloo groups can crash it at exit (a segmentation fault in
    their threads) once its peers are gone. Not after an error: a failed peer may never arrive. Once closed, or in
    one process, nothing."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        trainer.strategy.barrier("end of the run")
        torch.distributed.destroy_process_group()


def make_class_images(datamodule, module, sampler, preemption: Preemption | None = None, ckpt: Path | None = None,
                      timeout_s: float = 3600.0) -> None:
    """Process 0 makes the missing class images (on its GPU when there is one); the others wait for them. With a
    ``Preemption`` callback its handler is installed first: a signal stops the work between batches (the images
    made are kept, a relaunch makes the rest) and the run stops as after a fit stopped by that signal. A run that
    resumes or branches (``ckpt``) makes them with the checkpoint's sampling weights, which the fit restores only
    later: ``module`` holds its fresh initialisation until then."""
    if not datamodule.class_images_missing():
        return
    if preemption is not None:
        preemption.install()
    stop = preemption.signalled_before_fit if preemption is not None else lambda: False
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    if rank == 0:
        if ckpt is not None:  # the fit loads the whole checkpoint again (its raw weights) when it starts
            state = load_checkpoint(ckpt)
            load_checkpoint_weights(module, state, "ema" if (state.get("ema") or {}).get("weights") else "raw",
                                    str(ckpt))
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else "cpu"
        datamodule.prepare_class_images(module.to(device), sampler, stop=stop)
        module.to("cpu")
    else:
        deadline = time.monotonic() + timeout_s
        while datamodule.class_images_missing() and not stop():
            if time.monotonic() > deadline:
                raise TimeoutError(f"data.class_dir: process 0 did not make the class images in {timeout_s:.0f} s")
            time.sleep(5)
    if stop():
        log.warning("%s while making class images (%d of %d missing): stopping before training%s",
                    preemption.stopped_by, datamodule.class_images_missing(), datamodule.num_class_images,
                    "; the job will be requeued" if preemption.requeue and rank == 0 else "")


def cluster_plugins() -> list:
    """Under Slurm, Lightning's Slurm environment without its own requeue handler (it saves inside the
    signal handler); the ``Preemption`` callback checkpoints at a step boundary and requeues instead."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    with user_errors_as_one_line():
        trainer = train(cfg, cfg.run_dir)
    preemption = find_preemption(trainer)
    if stopped(preemption):
        sys.exit(128 + preemption.signum)  # stopped by a signal, checkpoint safe: the shell's convention


if __name__ == "__main__":
    main()
