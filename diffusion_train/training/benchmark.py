"""The training-step benchmark's measuring core (``scripts/benchmark.py`` is its command line): the module the
trainer builds, one fixed batch of precomputed inputs on the device, and the step timed in a real
``lightning.Trainer`` (``lightning``) or in a plain loop doing what ``DiffusionModule.training_step`` does
(``bare``), with the device synchronised only at the boundaries of the warm-up and of each repeat, the
host-device synchronisations of the timed steps counted (``training/syncs.py``) and, optionally, a few more
steps profiled (``training/kernel_profile.py``)."""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from diffusion_train.cli import UsageError
from diffusion_train.scaling.flops import TRAINING_FLOPS_PER_MAC
from diffusion_train.training.kernel_profile import KernelProfile
from diffusion_train.training.syncs import SyncWatch

DOWNSAMPLE = 8  # of the stand-in autoencoder, as the SD / SDXL / FLUX VAEs
PROFILE_TOP = 40  # kernels listed in a row's JSON profile (its markdown names the first 5)


def stand_in_overrides(latent: tuple[int, int, int] | None, classes: int, text: tuple[int, int] | None) -> list[str]:
    """Overrides that give the backbone ``latent`` (C, H, W) inputs of ``classes`` classes and ``text`` (L, D)
    encodings without pretrained weights: synthetic data, a random 8x ``tiny_vae`` that is never run, a random
    tiny T5 of width D whose L tokens are all attended to, without a mask (as Stable Diffusion's U-Nets attend to
    CLIP's). ``None``: the config's own data and autoencoder, or its own conditioning."""
    out: list[str] = []
    if latent:
        c, h, w = latent
        if h != w:
            raise UsageError(f"latent: the backbones train on square inputs, got {h}x{w}")
        out += ["data=synthetic", "data.channels=3", f"data.resolution={h * DOWNSAMPLE}",
                f"data.num_classes={classes}", "autoencoder=tiny_vae", "autoencoder.weights=null",
                f"autoencoder.latent_channels={c}", f"autoencoder.channels=[{','.join(['8'] * 4)}]"]
    if text:
        length, width = text
        key = "conditioning.embedders.caption"
        out += ["conditioning=t5_tiny", f"{key}.config.d_model={width}", f"{key}.max_length={length}",
                f"{key}.output=context", f"{key}.attend_padding=true"]
    return out


# -- inputs, module, environment -------------------------------------------------------------------


def make_batch(module, batch: int, device) -> tuple[dict, dict]:
    """One batch of precomputed inputs as the module's autoencoder and conditioner take them, on ``device``,
    and a description of it."""
    import torch

    from diffusion_train.conditioning.autoencoder import KLAutoencoder

    bb, g = module.backbone, torch.Generator().manual_seed(0)
    c, size = int(bb.in_channels), int(bb.input_size)
    moments = 2 * c if isinstance(module.autoencoder, KLAutoencoder) else c
    data = {"latent": torch.randn(batch, moments, size, size, generator=g)}
    info: dict[str, Any] = {"batch": batch, "latent": [c, size, size], "moments": [moments, size, size],
                            "classes": None, "text_tokens": None, "text_width": None}
    tokens = 0
    for name, emb in module.conditioner.embedders.items():
        if hasattr(emb, "num_classes"):
            data[emb.input_key] = torch.randint(0, emb.num_classes, (batch,), generator=g)
            info["classes"] = emb.num_classes
        elif hasattr(emb, "output_keys"):
            length = int(emb.max_length)
            shapes = {"context": (batch, length, emb.context_dim), "vector": (batch, emb.vector_dim)}
            for key in emb.output_keys:
                data[f"{name}.{key}"] = (torch.ones(batch, length, dtype=torch.bool) if key == "mask"
                                         else torch.randn(*shapes[key], generator=g))
            if "context" in emb.output_keys:
                tokens += length
                info["text_width"] = emb.context_dim
        else:
            raise UsageError(f"conditioning.embedders.{name} ({type(emb).__name__}): no precomputed input for it")
    info["text_tokens"] = tokens or None
    return {k: v.to(device) for k, v in data.items()}, info


def environment(device) -> dict:
    import lightning
    import torch

    env = {"device_name": cpu_name(), "device_memory_gib": None,
           "torch": torch.__version__, "lightning": lightning.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "python": platform.python_version(), "driver": None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, device_memory_gib=round(props.total_memory / 2**30, 1))
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.split("\n")[0] or None
        except (OSError, subprocess.SubprocessError):
            pass
    return env


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build(cfg, seed: int):
    import lightning as L

    from diffusion_train.training.build import build_module

    L.seed_everything(seed, verbose=False)
    module = build_module(cfg)
    if module.accumulate_grad_batches != 1:
        raise UsageError("the benchmark times one optimizer step per batch: set training.accumulate_grad_batches=1")
    return module


def make_ema(cfg):
    from hydra.utils import instantiate

    node = (cfg.get("callbacks") or {}).get("ema")
    if node is None:
        return None
    return instantiate(node, _convert_="all", snapshot_every=0, snapshot_dir=None)  # the step's EMA; no run folder


# -- the two loops ---------------------------------------------------------------------------------


class Clock:
    """perf_counter readings after a device synchronisation, at chosen step counts only. It also counts the
    host-device synchronisations of the timed steps (``diffusion_train.training.syncs.SyncWatch``: on a GPU
    ``torch.cuda.set_sync_debug_mode``, its own synchronisations excepted; on a CPU the operations that would
    synchronise on a GPU), in the steps from the end of warm-up to the last mark: compilation, in warm-up, runs
    unwatched.
    Logging steps (each ``log_every``-th, where both loops read logged values on purpose) are counted apart from
    the others, so a timed window that holds one does not charge its reads to every step. With ``profile`` steps,
    those steps after the last mark run under a ``KernelProfile``."""

    KINDS = ("other_steps", "logging_steps")

    def __init__(self, device, marks: set[int], warmup: int, profile: int = 0, log_every: int = 50):
        self.cuda = device.type == "cuda"
        self.marks, self.warmup, self.times, self.done = marks, warmup, {}, 0
        self.log_every = max(1, int(log_every))
        self.watches = {kind: SyncWatch(device) for kind in self.KINDS}
        self.steps = dict.fromkeys(self.KINDS, 0)  # timed steps of each kind
        self.watch: SyncWatch | None = None  # the running one
        self.profile = KernelProfile(device, profile) if profile else None

    def kind(self, step: int) -> str:
        return self.KINDS[step % self.log_every == 0]

    def sync(self) -> None:
        import torch

        if self.cuda:
            with self.watch.paused() if self.watch is not None else contextlib.nullcontext():
                torch.cuda.synchronize()

    def start(self) -> None:
        self.sync()
        self.times[0] = time.perf_counter()

    def watch_step(self, step: int | None) -> None:
        """Counts into ``step``'s watch from here (None: stops counting). The watches switch only where the kind
        changes, so a run of other steps pays no switching."""
        watch = None if step is None else self.watches[self.kind(step)]
        if watch is not self.watch:
            if self.watch is not None:
                self.watch.stop()
            if watch is not None:
                watch.start()
            self.watch = watch
        if step is not None:
            self.steps[self.kind(step)] += 1

    def stop(self) -> None:
        self.watch_step(None)

    def step_begins(self) -> None:
        """At the start of each step. A step's synchronisations are counted from here to the next step's start (or
        the end of the loop), so they include what the loop does after the step's end (Lightning's logging)."""
        step = self.done + 1
        self.watch_step(step if self.warmup < step <= max(self.marks) else None)

    def step_done(self) -> None:
        self.done += 1
        if self.done in self.marks:
            self.sync()
            self.times[self.done] = time.perf_counter()
        if self.done == max(self.marks) and self.profile is not None:
            self.profile.start()
        if self.profile is not None and self.done == max(self.marks) + self.profile.steps:
            self.sync()
            self.profile.stop()


def sync_counts(clock: Clock) -> dict:
    """Host-device synchronisations per timed step and the five lines that made the most, for the steps that do not
    log, and apart for the logging steps among the timed ones."""
    other, logging = (clock.watches[kind] for kind in clock.KINDS)
    n_other, n_logging = (clock.steps[kind] for kind in clock.KINDS)
    return {"host_syncs_per_step": other.total / n_other if n_other else None,
            "host_sync_sites": {site: n for (_, site), n in other.sites.most_common(5)},
            "timed_logging_steps": n_logging,
            "host_syncs_per_logging_step": logging.total / n_logging if n_logging else None,
            "host_sync_sites_logging": {site: n for (_, site), n in logging.sites.most_common(5)}}


def run_lightning(cfg, batch: dict, opts: dict, device, clock: Clock) -> dict:
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    module = opts["get_module"]()
    pointer = batch["latent"].data_ptr()
    seen: dict[str, bool] = {}

    class Timer(Callback):
        def on_train_batch_start(self, trainer, pl_module, b, batch_idx) -> None:
            if clock.done == 0:
                seen["unchanged"] = b["latent"].data_ptr() == pointer and b["latent"].device == batch["latent"].device
                clock.start()
            clock.step_begins()

        def on_train_batch_end(self, trainer, pl_module, outputs, b, batch_idx) -> None:
            clock.step_done()

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            clock.stop()  # the last step's logging is counted, the end of the fit (its only epoch) is not

    class SameBatch:
        def __iter__(self):
            while True:
                yield batch

    ema = make_ema(cfg)
    with tempfile.TemporaryDirectory(prefix="benchmark_") as tmp:
        trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                            precision=opts["precision"], max_steps=total_steps(opts), logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp,
                            log_every_n_steps=int(cfg.trainer.log_every_n_steps),
                            callbacks=[c for c in (ema, Timer()) if c is not None])
        trainer.fit(module, train_dataloaders=SameBatch())
    return {"batch_on_device_unchanged": seen.get("unchanged")}


def optimizer_and_schedules(module) -> tuple[Any, list]:
    """The module's optimizer (with its scaled learning rate) and LR schedules, as ``configure_optimizers`` gives
    them to Lightning."""
    setup = module.configure_optimizers()
    return (setup["optimizer"], [setup["lr_scheduler"]["scheduler"]]) if isinstance(setup, dict) else (setup, [])


def step_autocast(device, precision: str):
    """The autocast context of Lightning's ``precision`` for a step run outside Lightning (a new one per use):
    its precision plugin's own (for ``bf16-mixed``, autocast without its weight-cast cache)."""
    import contextlib

    from lightning.pytorch.plugins.precision import MixedPrecision

    return (MixedPrecision(precision, device.type).autocast_context_manager() if precision == "bf16-mixed"
            else contextlib.nullcontext())


def run_bare(cfg, batch: dict, opts: dict, device, clock: Clock) -> dict:
    """The step of ``DiffusionModule.training_step`` (its loss and optimizer update) in a plain loop."""
    module = opts["get_module"]().to(device).train()
    ema = make_ema(cfg)
    opt, schedulers = optimizer_and_schedules(module)
    log_every = max(1, int(cfg.trainer.log_every_n_steps))
    clock.start()
    for step in range(total_steps(opts)):
        clock.step_begins()
        g = module.step_generator(step, 0)  # (global step, global micro-batch 0), as training_step seeds it
        module.seed_global_generators(step, 0)
        # Lightning's precision context wraps the whole training_step, optimizer step included
        with step_autocast(device, opts["precision"]):
            module.batch_loss(batch, g).backward()
            module.optimizer_update(opt, schedulers)
            if (step + 1) % log_every == 0:
                int(module.nonfinite_streak)  # the trainer's host check of the non-finite streak
        if ema is not None:
            ema.step_done(module, step + 1)  # as the EMA callback after optimizer step step + 1
        clock.step_done()
    return {}


def total_steps(opts: dict) -> int:
    return opts["warmup"] + opts["steps"] * opts["repeats"] + opts.get("profile", 0)


def measure(mode: str, cfg, batch: dict, opts: dict, device, macs: int, peak: float | None) -> dict:
    import torch

    warm, steps, repeats, b = opts["warmup"], opts["steps"], opts["repeats"], int(batch["latent"].shape[0])
    marks = {1, warm, *(warm + steps * r for r in range(1, repeats + 1))}
    clock = Clock(device, marks, warm, opts.get("profile", 0), int(cfg.trainer.log_every_n_steps))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    oom = None
    try:
        try:
            extra = (run_lightning if mode == "lightning" else run_bare)(cfg, batch, opts, device, clock)
        finally:
            clock.stop()
            if clock.profile is not None and clock.profile.running:
                clock.profile.stop()
    except Exception as e:  # noqa: BLE001 - only running out of memory is reported instead of raised
        if not _is_oom(e):
            raise
        oom = " ".join(str(e).split())[:300]
    row: dict[str, Any] = {"status": "ok" if oom is None else "OOM", "error": oom, "pid": os.getpid()}
    if device.type == "cuda":
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
    else:
        row["peak_memory_gib"] = row["peak_reserved_gib"] = None
    free_memory(device)
    if oom is not None:
        return row
    t = clock.times
    step_s = [(t[warm + steps * r] - t[warm + steps * (r - 1)]) / steps for r in range(1, repeats + 1)]
    median = statistics.median(step_s)
    ips = [b / s for s in step_s]
    row.update({
        "images_per_s": statistics.median(ips), "images_per_s_repeats": ips,
        "step_ms": median * 1e3, "step_ms_repeats": [s * 1e3 for s in step_s],
        "achieved_tflops": statistics.median(ips) * TRAINING_FLOPS_PER_MAC * macs / 1e12,
        "mfu": statistics.median(ips) * TRAINING_FLOPS_PER_MAC * macs / peak if peak else None,
        "first_step_s": t[1] - t[0], "warmup_s": t[warm] - t[0],
        "compile_s": (t[1] - t[0]) - median if opts["compile"] != "false" else None,
        **sync_counts(clock), **extra})
    if clock.profile is not None:
        row["profile"] = clock.profile.summary(step_ms=median * 1e3, top=PROFILE_TOP)
    return row


def _is_oom(e: BaseException) -> bool:
    import torch

    while e is not None:
        if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower():
            return True
        e = e.__cause__ or e.__context__
    return False


def free_memory(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        torch._dynamo.reset()  # the next mode compiles its own module from scratch (disk caches stay)
    except Exception:  # noqa: BLE001
        pass
