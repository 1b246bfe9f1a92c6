"""Training-step throughput of any experiment config on one GPU: images/s, MFU, peak memory, compile time::

    python scripts/benchmark.py config="model=dit_xl2" batch=128
    python scripts/benchmark.py config="model=unet_sd2 model.attention_resolutions=[32,16,8]" text=77x1024 batch=64
    python scripts/benchmark.py config="experiment=smoke" device=cpu steps=2 repeats=2   # a CPU smoke run

Every argument is ``key=value``:

    config      Hydra overrides of the training config (conf/train.yaml), in one quoted string
    batch       images per step (default: the config's data.batch_size)
    steps       timed steps per repeat (20)
    warmup      untimed steps before the first repeat (5; >= 1; compilation happens here)
    repeats     timed repeats; numbers are medians over them (3)
    compile     false | true | blocks | auto: the config's training.compile (default: the config's, auto: blocks
                for DiTs and MMDiTs, true for U-Nets on a GPU, false on a CPU; see docs/performance.md for the
                other speed options, given in config=)
    precision   bf16-mixed | 32-true (bf16-mixed)
    modes       lightning, bare or both, comma separated (both)
    latent      CxHxW the backbone sees (4x32x32: 256 px through an 8x VAE), or config (see below)
    classes     classes of a class-conditional model when latent is not config (1000)
    text        LxD: L precomputed text tokens of width D for a text-conditioned model (e.g. 77x1024)
    device      cuda | cpu (cuda)
    peak_tflops dense bf16 peak of the card in TFLOP/s for MFU (default: known cards, scaling/flops.py PEAK_BF16)
    profile     N: after the timed repeats, N more steps under torch.profiler: device time per step by kernel
                category and the longest kernels (diffusion_train/training/kernel_profile.py), per mode (0: off)
    out         also write the JSON result here (it is always printed on stdout)
    md          markdown file the result table is added to (cuda: docs/benchmarks.md; cpu: none); md= skips it

The step is the trainer's (forward, backward, clipping, fused AdamW, LR schedule, EMA of every configured
decay) on the module ``build_module`` makes, fed one fixed batch of precomputed latents already on the
device. ``lightning`` times it in a real ``lightning.Trainer`` with the EMA callback; ``bare`` in a plain
loop doing what ``DiffusionModule.training_step`` does; each mode builds the module afresh (same seed),
and the device is synchronised only at the boundaries of the warm-up and of each repeat.
``compile_s`` = first step - median step (with compile=true). ``latent=CxHxW`` swaps the config's data
and autoencoder for synthetic data and a random 8x ``tiny_vae`` that is never run (the batch holds the
2C x H x W posterior moments); ``text=LxD`` swaps the conditioning for a random tiny T5 of width D whose
L-token encodings are in the batch. These overrides come before ``config``'s. ``latent=config`` keeps the
config's own data and autoencoder. Definitions, the JSON fields and the target commands:
docs/benchmarks.md. Exits with status 1 and one ``error:`` line on a bad argument or config.
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import logging
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_report import OVERHEAD_TARGET_PCT, add_markdown, fmt, markdown  # noqa: E402
from diffusion_train.cli import UsageError, parse_key_values, run_main  # noqa: E402
from diffusion_train.scaling.flops import peak_flops  # noqa: E402
from diffusion_train.training.speed import compile_choice  # noqa: E402
from diffusion_train.training.kernel_profile import KernelProfile  # noqa: E402
from diffusion_train.training.syncs import SyncWatch  # noqa: E402

MODES = ("lightning", "bare")
PRECISIONS = ("bf16-mixed", "32-true")
DOWNSAMPLE = 8  # of the stand-in autoencoder, as the SD / SDXL / FLUX VAEs
MFU_DEFINITION = ("MFU = images/s x training FLOPs per image / peak dense bf16 FLOP/s; training FLOPs per image = "
                  "6 x forward multiply-adds (2 FLOPs per multiply-add, x3 for forward + backward)")


def _dims_of(value: str, n: int, usage: str) -> tuple[int, ...]:
    """``value`` as ``n`` integers joined by x, else a UsageError saying ``usage``."""
    try:
        dims = _dims(value)
    except ValueError:
        dims = ()
    if len(dims) != n:
        raise UsageError(usage)
    return dims


def _dims(value: str) -> tuple[int, ...]:
    dims = tuple(int(v) for v in value.lower().split("x"))
    if any(d <= 0 for d in dims):
        raise ValueError(value)
    return dims


OPTIONS: dict[str, Callable[[str], Any]] = {
    "config": str, "batch": int, "steps": int, "warmup": int, "repeats": int, "compile": str, "precision": str,
    "modes": str, "latent": str, "classes": int, "text": str, "device": str, "peak_tflops": float, "out": str,
    "md": str, "profile": int,
}
DEFAULTS: dict[str, Any] = {
    "config": "", "batch": None, "steps": 20, "warmup": 5, "repeats": 3, "compile": None, "precision": "bf16-mixed",
    "modes": "lightning,bare", "latent": "4x32x32", "classes": 1000, "text": "", "device": "cuda",
    "peak_tflops": None, "out": "", "md": None, "profile": 0,
}


def parse_args(argv: list[str]) -> dict[str, Any]:
    opts = parse_key_values(argv, OPTIONS, DEFAULTS)
    for key in ("steps", "warmup", "repeats", "classes"):
        if opts[key] < 1:
            raise UsageError(f"{key} must be >= 1, got {opts[key]}")
    if opts["profile"] < 0:
        raise UsageError(f"profile must be >= 0, got {opts['profile']}")
    if opts["batch"] is not None and opts["batch"] < 1:
        raise UsageError(f"batch must be >= 1, got {opts['batch']}")
    if opts["compile"] is not None:
        try:
            opts["compile"] = compile_choice(opts["compile"])
        except ValueError as e:
            raise UsageError(str(e).replace("training.compile", "compile")) from None
    if opts["precision"] not in PRECISIONS:
        raise UsageError(f"precision={opts['precision']}: valid: {', '.join(PRECISIONS)}")
    modes = [m.strip() for m in opts["modes"].replace("both", ",".join(MODES)).split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        raise UsageError(f"modes={opts['modes']}: give lightning, bare or both (comma separated)")
    opts["modes"] = list(dict.fromkeys(modes))
    if opts["device"] not in ("cuda", "cpu"):
        raise UsageError(f"device={opts['device']}: valid: cuda, cpu")
    if opts["latent"] != "config":
        opts["latent"] = _dims_of(opts["latent"], 3, "latent: give CxHxW (e.g. 4x32x32) or config")
    if opts["text"]:
        opts["text"] = _dims_of(opts["text"], 2, "text: give LxD, tokens x width (e.g. 77x1024)")
    if opts["peak_tflops"] is not None and opts["peak_tflops"] <= 0:
        raise UsageError(f"peak_tflops must be positive, got {opts['peak_tflops']}")
    if opts["md"] is None:
        opts["md"] = str(ROOT / "docs" / "benchmarks.md") if opts["device"] == "cuda" else ""
    try:
        opts["config"] = shlex.split(opts["config"])
    except ValueError as e:
        raise UsageError(f"config: {e}") from None
    return opts


def stand_in_overrides(opts: dict) -> list[str]:
    """Overrides that give the backbone ``latent`` inputs and ``text`` encodings without pretrained weights."""
    out: list[str] = []
    if opts["latent"] != "config":
        c, h, w = opts["latent"]
        if h != w:
            raise UsageError(f"latent: the backbones train on square inputs, got {h}x{w}")
        out += ["data=synthetic", "data.channels=3", f"data.resolution={h * DOWNSAMPLE}",
                f"data.num_classes={opts['classes']}", "autoencoder=tiny_vae", "autoencoder.weights=null",
                f"autoencoder.latent_channels={c}", f"autoencoder.channels=[{','.join(['8'] * 4)}]"]
    if opts["text"]:
        length, width = opts["text"]
        key = "conditioning.embedders.caption"
        out += ["conditioning=t5_tiny", f"{key}.config.d_model={width}", f"{key}.max_length={length}",
                f"{key}.output=context"]
    return out


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            return hydra_compose("train", overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise UsageError("config: " + " ".join(str(e).split())) from None


# ----------------------------------------------------------------------------------------------
# inputs, module, environment


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


def git_state() -> tuple[str | None, bool | None]:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=20,
                              check=True).stdout.strip()

    try:
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None, None


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
    return instantiate(node, _convert_="all") if node is not None else None


# ----------------------------------------------------------------------------------------------
# the two modes


class Clock:
    """perf_counter readings after a device synchronisation, at chosen step counts only. It also counts the
    host-device synchronisations of the timed steps (``diffusion_train.training.syncs.SyncWatch``: on a GPU
    ``torch.cuda.set_sync_debug_mode``, its own synchronisations excepted; on a CPU the operations that would
    synchronise on a GPU), from the end of warm-up to the last mark: compilation, in warm-up, runs unwatched.
    With ``profile`` steps, those steps after the last mark run under a ``KernelProfile``."""

    def __init__(self, device, marks: set[int], warmup: int, profile: int = 0):
        self.cuda = device.type == "cuda"
        self.marks, self.warmup, self.times, self.done = marks, warmup, {}, 0
        self.watch = SyncWatch(device)
        self.profile = KernelProfile(device, profile) if profile else None

    def sync(self) -> None:
        import torch

        if self.cuda:
            with self.watch.paused():
                torch.cuda.synchronize()

    def start(self) -> None:
        self.sync()
        self.times[0] = time.perf_counter()

    def step_done(self) -> None:
        self.done += 1
        if self.done in self.marks:
            self.sync()
            self.times[self.done] = time.perf_counter()
        if self.done == self.warmup:
            self.watch.start()
        if self.done == max(self.marks):
            self.watch.stop()
            if self.profile is not None:
                self.profile.start()
        if self.profile is not None and self.done == max(self.marks) + self.profile.steps:
            self.sync()
            self.profile.stop()


def sync_counts(clock: Clock, steps: int) -> dict:
    """Host-device synchronisations per timed step and the five lines that made the most."""
    return {"host_syncs_per_step": clock.watch.total / steps,
            "host_sync_sites": {site: n for (_, site), n in clock.watch.sites.most_common(5)}}


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

        def on_train_batch_end(self, trainer, pl_module, outputs, b, batch_idx) -> None:
            clock.step_done()

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


def run_bare(cfg, batch: dict, opts: dict, device, clock: Clock) -> dict:
    """The step of ``DiffusionModule.training_step`` (its loss and optimizer update) in a plain loop."""
    import contextlib

    import torch

    module = opts["get_module"]().to(device).train()
    ema = make_ema(cfg)
    setup = module.configure_optimizers()  # the optimizer with the scaled learning rate, and its schedule
    opt, schedulers = (setup["optimizer"], [setup["lr_scheduler"]["scheduler"]]) if isinstance(setup, dict) \
        else (setup, [])
    log_every = max(1, int(cfg.trainer.log_every_n_steps))
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if opts["precision"] == "bf16-mixed"
                else contextlib.nullcontext())
    clock.start()
    for step in range(total_steps(opts)):
        g = module.step_generator(step, 0)  # (global step, global micro-batch 0), as training_step seeds it
        with autocast:  # Lightning's precision context wraps the whole training_step, optimizer step included
            module.batch_loss(batch, g).backward()
            module.optimizer_update(opt, schedulers)
            if (step + 1) % log_every == 0:
                int(module.nonfinite_streak)  # the trainer's host check of the non-finite streak
        if ema is not None:
            ema.update(module)
        clock.step_done()
    return {}


def total_steps(opts: dict) -> int:
    return opts["warmup"] + opts["steps"] * opts["repeats"] + opts.get("profile", 0)


def measure(mode: str, cfg, batch: dict, opts: dict, device, macs: int, peak: float | None) -> dict:
    import torch

    warm, steps, repeats, b = opts["warmup"], opts["steps"], opts["repeats"], int(batch["latent"].shape[0])
    marks = {1, warm, *(warm + steps * r for r in range(1, repeats + 1))}
    clock = Clock(device, marks, warm, opts.get("profile", 0))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    oom = None
    try:
        try:
            extra = (run_lightning if mode == "lightning" else run_bare)(cfg, batch, opts, device, clock)
        finally:
            clock.watch.stop()
            if clock.profile is not None and clock.profile.running:
                clock.profile.stop()
    except Exception as e:  # noqa: BLE001 - only running out of memory is reported instead of raised
        if not _is_oom(e):
            raise
        oom = " ".join(str(e).split())[:300]
    row: dict[str, Any] = {"status": "ok" if oom is None else "OOM", "error": oom}
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
        "achieved_tflops": statistics.median(ips) * 6 * macs / 1e12,
        "mfu": statistics.median(ips) * 6 * macs / peak if peak else None,
        "first_step_s": t[1] - t[0], "warmup_s": t[warm] - t[0],
        "compile_s": (t[1] - t[0]) - median if opts["compile"] != "false" else None,
        **sync_counts(clock, steps * repeats), **extra})
    if clock.profile is not None:
        row["profile"] = clock.profile.summary(step_ms=median * 1e3)
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


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------


def benchmark(opts: dict, argv: list[str]) -> dict:
    import torch
    from omegaconf import OmegaConf

    from diffusion_train.models import DiT, MMDiT
    from diffusion_train.scaling.flops import flop_counter_macs, forward_macs
    from diffusion_train.train import one_line_error, quiet_known_warnings

    if opts["device"] == "cuda" and not torch.cuda.is_available():
        raise UsageError("device=cuda but no CUDA device is available (device=cpu runs on the CPU)")
    device = torch.device(opts["device"])
    overrides = stand_in_overrides(opts) + opts["config"]
    if opts["compile"] is not None:
        overrides.append(f"training.compile={opts['compile']}")
    overrides.append(f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}")  # resolves compile=auto
    cfg = compose(overrides)
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    quiet_known_warnings()
    for pattern in (".*infer the `batch_size`.*", ".*validation_step. but have no .val_dataloader.*",
                    ".*srun. command is available.*"):
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch", "lightning.fabric"):  # device / precision banners and tips
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_float32_matmul_precision("high")  # as diffusion-train: TF32 matmuls
    if cfg.trainer.get("benchmark") is not None:  # trainer.benchmark: both loops (the Lightning one keeps it)
        torch.backends.cudnn.benchmark = bool(cfg.trainer.benchmark)

    try:
        module = build(cfg, int(cfg.seed))
    except Exception as e:  # a text encoder or VAE whose weights are not here: name the stand-ins
        msg = one_line_error(e)
        if msg is None or isinstance(e, UsageError) or (opts["text"] and opts["latent"] != "config"):
            raise
        raise UsageError(f"{msg} [benchmark: text=LxD and latent=CxHxW build weight-free stand-ins]") from None
    opts["compile"] = module.compile  # auto resolved for the device
    batch_size = opts["batch"] or int(cfg.data.batch_size)
    batch, inputs = make_batch(module, batch_size, device)
    size, tokens = inputs["latent"][1:], inputs["text_tokens"] or 0
    macs = forward_macs(module.backbone, size=tuple(size), context_len=tokens)
    counted = flop_counter_macs(module.backbone, size=tuple(size), context_len=tokens)
    counting = "analytic" if isinstance(module.backbone, (DiT, MMDiT)) else "counted (meta forward with hooks)"
    params = {"trainable": sum(p.numel() for p in module.trainable_parameters()),
              "backbone": sum(p.numel() for p in module.backbone.parameters())}
    ema = make_ema(cfg)
    prebuilt = [module]  # the first mode times this module; later ones build their own (same seed)
    del module
    opts["get_module"] = lambda: prebuilt.pop() if prebuilt else build(cfg, int(cfg.seed))
    env = environment(device)
    peak, peak_source = peak_flops(env["device_name"], opts["peak_tflops"]) if device.type == "cuda" else \
        (None, "not defined on a CPU")
    sha, dirty = git_state()
    model = choices.get("model", "?")
    label = " ".join([model] + [o for o in opts["config"] if not o.startswith("model=")])
    log(f"{label}: {params['trainable'] / 1e6:.1f}M trainable parameters, forward {macs / 1e9:.3f} GMACs/image "
        f"(flop_counter {counted / 1e9:.3f}), batch {batch_size}, {env['device_name']}")

    results = {}
    for mode in opts["modes"]:
        results[mode] = row = measure(mode, cfg, batch, opts, device, macs, peak)
        if row["status"] == "ok":
            log(f"{mode}: {row['images_per_s']:,.1f} images/s, {row['step_ms']:.1f} ms/step, MFU "
                f"{fmt(row['mfu'], '.1%')}, peak memory {fmt(row['peak_memory_gib'], '.1f')} GiB, first step "
                f"{row['first_step_s']:.1f} s")
        else:
            log(f"{mode}: {row['status']} ({row['error']})")
    ok = {m: r for m, r in results.items() if r["status"] == "ok"}
    overhead = (ok["lightning"]["step_ms"] / ok["bare"]["step_ms"] - 1) * 100 if len(ok) == 2 else None
    result = {
        "schema": "diffusion_train.benchmark/1",
        "label": label,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "scripts/benchmark.py", *map(_quote, argv)]),
        "git_sha": sha, "git_dirty": dirty,
        "config": {"overrides": overrides, "choices": choices,
                   "model": OmegaConf.to_container(cfg.model, resolve=True),
                   "training": OmegaConf.to_container(cfg.training, resolve=True)},
        "inputs": inputs,
        "settings": {"device": device.type, "precision": opts["precision"], "compile": opts["compile"],
                     "cudnn_benchmark": torch.backends.cudnn.benchmark,
                     "steps": opts["steps"], "warmup": opts["warmup"], "repeats": opts["repeats"],
                     "profile_steps": opts["profile"],
                     "modes": opts["modes"], "log_every_n_steps": int(cfg.trainer.log_every_n_steps),
                     "ema_decays": ema.decays if ema is not None else None},
        "params": params,
        "flops": {"forward_macs_per_image": macs, "forward_macs_flop_counter": counted,
                  "flop_counter_rel_diff": (macs - counted) / counted if counted else None,
                  "counting": counting, "training_flops_per_image": 6 * macs,
                  "definition": "forward multiply-adds per image (diffusion_train.scaling.flops.forward_macs); "
                                "training FLOPs per image = 6 x forward multiply-adds"},
        "peak_flops": peak, "peak_flops_source": peak_source, "mfu_definition": MFU_DEFINITION,
        "environment": env,
        "results": results,
        "lightning_overhead_pct": overhead, "lightning_overhead_target_pct": OVERHEAD_TARGET_PCT,
    }
    text = json.dumps(result, indent=2, default=str)
    if opts["out"]:
        Path(opts["out"]).parent.mkdir(parents=True, exist_ok=True)
        Path(opts["out"]).write_text(text + "\n")
    if opts["md"]:
        add_markdown(Path(opts["md"]), markdown(result))
    print(text)
    return result


def _quote(arg: str) -> str:
    """``key=value`` for a shell, the value quoted when it needs it: config='model=dit_xl2 optim.lr=1e-4'."""
    key, sep, value = arg.partition("=")
    return key + sep + shlex.quote(value) if sep and key.isidentifier() else shlex.quote(arg)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    return run_main(lambda a: benchmark(parse_args(a), a), args)


if __name__ == "__main__":
    sys.exit(main())
