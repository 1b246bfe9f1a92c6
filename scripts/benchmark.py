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
    isolate     true | false: with several modes, time each in its own fresh Python process (true); false times
                them one after the other in this one
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
loop doing what ``DiffusionModule.training_step`` does; each mode builds the module afresh (same seed), in
its own process unless ``isolate=false`` (in one process the mode timed second ran with more idle device time,
either mode: docs/benchmarks.md), and the device is synchronised only at the boundaries of the warm-up and of
each repeat.
``compile_s`` = first step - median step (with compile=true). ``latent=CxHxW`` swaps the config's data
and autoencoder for synthetic data and a random 8x ``tiny_vae`` that is never run (the batch holds the
2C x H x W posterior moments); ``text=LxD`` swaps the conditioning for a random tiny T5 of width D whose
L-token encodings are in the batch. These overrides come before ``config``'s. ``latent=config`` keeps the
config's own data and autoencoder. Definitions, the JSON fields and the target commands:
docs/benchmarks.md. The measuring core (the two loops, the clock, the inputs) is
``diffusion_train/training/benchmark.py``; the markdown is ``scripts/bench_report.py``. Exits with status 1
and one ``error:`` line on a bad argument or config.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shlex
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_report import OVERHEAD_TARGET_PCT, add_markdown, fmt, markdown  # noqa: E402
from diffusion_train.cli import UsageError, parse_key_values, run_main  # noqa: E402
from diffusion_train.files import write_text  # noqa: E402
from diffusion_train.scaling.flops import TRAINING_FLOPS_PER_MAC, peak_flops  # noqa: E402
from diffusion_train.training.benchmark import (  # noqa: E402
    build, environment, make_batch, make_ema, measure, stand_in_overrides)
from diffusion_train.training.speed import compile_choice  # noqa: E402

MODES = ("lightning", "bare")
PRECISIONS = ("bf16-mixed", "32-true")
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
    "md": str, "profile": int, "isolate": str,
}
DEFAULTS: dict[str, Any] = {
    "config": "", "batch": None, "steps": 20, "warmup": 5, "repeats": 3, "compile": None, "precision": "bf16-mixed",
    "modes": "lightning,bare", "latent": "4x32x32", "classes": 1000, "text": "", "device": "cuda",
    "peak_tflops": None, "out": "", "md": None, "profile": 0, "isolate": "true",
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
    if opts["isolate"] not in ("true", "false"):
        raise UsageError(f"isolate={opts['isolate']}: give true or false")
    opts["isolate"] = opts["isolate"] == "true"
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


def stand_in_args(opts: dict) -> list[str]:
    """``stand_in_overrides`` for the parsed ``latent``, ``classes`` and ``text`` arguments."""
    return stand_in_overrides(None if opts["latent"] == "config" else opts["latent"], opts["classes"],
                              opts["text"] or None)


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            return hydra_compose("train", overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise UsageError("config: " + " ".join(str(e).split())) from None


def git_state() -> tuple[str | None, bool | None]:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=20,
                              check=True).stdout.strip()

    try:
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None, None


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------


def benchmark(opts: dict, argv: list[str]) -> dict:
    import torch
    from omegaconf import OmegaConf

    from diffusion_train.models import DiT, MMDiT
    from diffusion_train.scaling.flops import flop_counter_macs, forward_macs
    from diffusion_train.cli import one_line_error
    from diffusion_train.train import quiet_known_warnings

    if opts["device"] == "cuda" and not torch.cuda.is_available():
        raise UsageError("device=cuda but no CUDA device is available (device=cpu runs on the CPU)")
    device = torch.device(opts["device"])
    overrides = stand_in_args(opts) + opts["config"]
    if opts["compile"] is not None:
        overrides.append(f"training.compile={opts['compile']}")
    overrides.append(f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}")  # resolves compile=auto
    cfg = compose(overrides)  # a bad config fails here, before any mode's process starts
    if opts["isolate"] and len(opts["modes"]) > 1:
        return each_mode_in_its_own_process(opts, argv)
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
    opts["compile"], opts["channels_last"] = module.compile, module.channels_last  # auto resolved for the device
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
    result = {
        "schema": "diffusion_train.benchmark/1",
        "label": label,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command(argv),
        "git_sha": sha, "git_dirty": dirty,
        "config": {"overrides": overrides, "choices": choices,
                   "model": OmegaConf.to_container(cfg.model, resolve=True),
                   "training": {**OmegaConf.to_container(cfg.training, resolve=True),
                                "channels_last": opts["channels_last"]}},
        "inputs": inputs,
        "settings": {"device": device.type, "precision": opts["precision"], "compile": opts["compile"],
                     "cudnn_benchmark": torch.backends.cudnn.benchmark,
                     "steps": opts["steps"], "warmup": opts["warmup"], "repeats": opts["repeats"],
                     "profile_steps": opts["profile"],
                     "modes": opts["modes"], "isolated": False,
                     "log_every_n_steps": int(cfg.trainer.log_every_n_steps),
                     "ema_decays": ema.decays if ema is not None else None,
                     "ema_sigma_rels": ema.sigma_rels if ema is not None else None},
        "params": params,
        "flops": {"forward_macs_per_image": macs, "forward_macs_flop_counter": counted,
                  "flop_counter_rel_diff": (macs - counted) / counted if counted else None,
                  "counting": counting, "training_flops_per_image": TRAINING_FLOPS_PER_MAC * macs,
                  "definition": "forward multiply-adds per image (diffusion_train.scaling.flops.forward_macs); "
                                "training FLOPs per image = 6 x forward multiply-adds"},
        "peak_flops": peak, "peak_flops_source": peak_source, "mfu_definition": MFU_DEFINITION,
        "environment": env,
        "results": results,
        "lightning_overhead_pct": lightning_overhead(results), "lightning_overhead_target_pct": OVERHEAD_TARGET_PCT,
    }
    return report(result, opts)


def each_mode_in_its_own_process(opts: dict, argv: list[str]) -> dict:
    """Each mode timed by this script in a fresh Python process (``modes=<one>``), its JSON merged into one
    result: no mode runs on the heap, caches and allocator state that another left behind."""
    own = ("modes", "out", "md", "isolate")
    passed = [a for a in argv if a.partition("=")[0] not in own]
    results, first = {}, None
    with tempfile.TemporaryDirectory(prefix="benchmark_") as tmp:
        for mode in opts["modes"]:
            out = Path(tmp) / f"{mode}.json"
            log(f"{mode}: in its own process")
            error = run_child([sys.executable, str(Path(__file__).resolve()), *passed, f"modes={mode}", f"out={out}",
                               "md=", "isolate=false"])
            if error is not None or not out.is_file():
                raise UsageError(f"modes={mode}: {error or 'its process wrote no result'}")
            child = json.loads(out.read_text())
            first = first or child
            results[mode] = child["results"][mode]
    result = {**first, "command": command(argv), "results": results,
              "settings": {**first["settings"], "modes": opts["modes"], "isolated": True},
              "lightning_overhead_pct": lightning_overhead(results)}
    return report(result, opts)


def run_child(cmd: list[str]) -> str | None:
    """Runs ``cmd`` with its stderr passed on, but for its ``error:`` line: None when it succeeds, else that error
    (or its exit status). A SIGTERM to this process (a time limit) kills the child too: left running, it would
    hold the GPU under the next measurement."""
    import signal

    error = None
    with subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc:
        def stop(signum, frame):
            proc.kill()
            raise SystemExit(128 + signum)

        previous = signal.signal(signal.SIGTERM, stop)
        try:
            for line in proc.stderr:
                if line.startswith("error: "):
                    error = line[len("error: "):].rstrip("\n")
                else:
                    print(line, end="", file=sys.stderr, flush=True)
        finally:
            signal.signal(signal.SIGTERM, previous)
    return None if proc.returncode == 0 else error or f"exited with status {proc.returncode}"


def lightning_overhead(results: dict) -> float | None:
    """The Lightning loop's step time over the bare loop's, in percent, when both ran."""
    ok = {m: r for m, r in results.items() if r["status"] == "ok"}
    return (ok["lightning"]["step_ms"] / ok["bare"]["step_ms"] - 1) * 100 if len(ok) == 2 else None


def report(result: dict, opts: dict) -> dict:
    """``result`` as JSON on stdout and in ``out``, and as a table in ``md``."""
    text = json.dumps(result, indent=2, default=str)
    if opts["out"]:
        write_text(opts["out"], text + "\n")
    if opts["md"]:
        add_markdown(Path(opts["md"]), markdown(result))
    print(text)
    return result


def command(argv: list[str]) -> str:
    return " ".join(["python", "scripts/benchmark.py", *map(_quote, argv)])


def _quote(arg: str) -> str:
    """``key=value`` for a shell, the value quoted when it needs it: config='model=dit_xl2 optim.lr=1e-4'."""
    key, sep, value = arg.partition("=")
    return key + sep + shlex.quote(value) if sep and key.isidentifier() else shlex.quote(arg)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    return run_main(lambda a: benchmark(parse_args(a), a), args)


if __name__ == "__main__":
    sys.exit(main())
