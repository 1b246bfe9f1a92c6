"""Which parts of the training step make the host wait for the GPU: each part of the trainer's step run alone,
its host-device synchronisations counted with their source lines::

    python scripts/sync_probe.py                                        # DiT-S/2, batch 256, on the GPU
    python scripts/sync_probe.py config="model=unet_sd2 model.attention_resolutions=[32,16,8]" text=77x1024 batch=64
    python scripts/sync_probe.py config="model=dit_tiny" latent=4x8x8 classes=10 batch=2 device=cpu

The module, its inputs and its options are ``scripts/benchmark.py``'s (``config``, ``batch``, ``latent``,
``classes``, ``text``, ``device``, ``precision``, ``compile``; the default config is ``model=dit_s2`` at batch
256, not compiled). ``repeats`` (3): calls counted per part, after one uncounted call. ``out``: also write the
JSON here. The parts, from the smallest up:

    attention       the step's first self-attention call alone (its own inputs), forward and backward, with
                    each SDPA backend on a GPU (flash, memory-efficient, cuDNN, math; the default on a CPU);
                    likewise its first cross-attention call, and the first of each with a mask
    block           the backbone's first repeated block alone, forward and backward, on the inputs it gets in
                    the step
    backbone        the backbone (as the step calls it: compiled when compile= says so), forward and backward
    conditioner     the conditioner on the batch (CFG dropout, text encoders in the step)
    loss            the module's loss: conditioner, timesteps and noise, objective, backbone; forward only
    loss+backward   the same and its backward
    update          gradient clipping, the optimizer step and the schedule (``optimizer_update``), after a backward
                    that is not counted
    ema             the EMA callback's update of every configured decay
    step            loss, backward, update and EMA: the step of the benchmark's bare loop

On a GPU the count is ``torch.cuda.set_sync_debug_mode``'s; on a CPU, the operations that would synchronise
on a GPU (``diffusion_train/training/syncs.py``). Every part runs under the precision's autocast, as the
trainer runs its step. Exits with status 1 and one ``error:`` line on a bad argument or config.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import benchmark  # noqa: E402

from diffusion_train.cli import UsageError, parse_key_values, run_main  # noqa: E402
from diffusion_train.files import write_text  # noqa: E402
from diffusion_train.training.benchmark import (  # noqa: E402
    build, environment, make_batch, make_ema, optimizer_and_schedules, step_autocast)

SHARED = ("config", "batch", "latent", "classes", "text", "device", "precision", "compile")
OPTIONS = {**{k: benchmark.OPTIONS[k] for k in SHARED}, "repeats": int, "out": str}
DEFAULTS = {**{k: benchmark.DEFAULTS[k] for k in SHARED}, "config": "model=dit_s2", "batch": 256, "compile": "false",
            "repeats": 3, "out": ""}


def parse_args(argv: list[str]) -> dict[str, Any]:
    """The arguments over this script's defaults, checked and converted as ``scripts/benchmark.py`` does."""
    given = parse_key_values(argv, OPTIONS, DEFAULTS)
    if given["repeats"] < 1:
        raise UsageError(f"repeats must be >= 1, got {given['repeats']}")
    opts = benchmark.parse_args([f"{k}={given[k]}" for k in SHARED] + ["md="])
    return {**opts, "repeats": given["repeats"], "out": given["out"]}


def detached(value):
    """A captured input as a new leaf (floating tensors take gradients), nested tuples, lists and dicts alike."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().requires_grad_(value.is_floating_point())
    if isinstance(value, (tuple, list)):
        return type(value)(detached(v) for v in value)
    if isinstance(value, dict):
        return {k: detached(v) for k, v in value.items()}
    return value


def backward_of(out) -> None:
    """Backward from the sum of squares of every floating tensor in ``out`` (a tensor or a tuple of them)."""
    import torch

    outs = [o for o in (out if isinstance(out, (tuple, list)) else [out])
            if isinstance(o, torch.Tensor) and o.is_floating_point() and o.requires_grad]
    sum(o.float().square().mean() for o in outs).backward()


def capture(module, batch: dict, autocast) -> dict:
    """The inputs the step gives the backbone, its first repeated block and its first attention call of each kind,
    from one forward pass of the module's loss (attention calls outside the backbone, such as a text encoder's,
    are left out)."""
    import torch
    import torch.nn.functional as F

    from diffusion_train.training.speed import repeated_blocks

    seen: dict[str, Any] = {}
    inside = [False]

    def entering(m, args, kwargs):
        inside[0] = True
        seen.setdefault("backbone", (args, kwargs))

    def leaving(m, args, out):
        inside[0] = False

    blocks = repeated_blocks(module.backbone)
    hooks = [module.backbone.register_forward_pre_hook(entering, with_kwargs=True),
             module.backbone.register_forward_hook(leaving)]
    if blocks:
        hooks.append(blocks[0].register_forward_pre_hook(
            lambda m, args, kwargs: seen.setdefault("block", (args, kwargs)), with_kwargs=True))
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        if inside[0]:
            kind = "self-attention" if k.shape[-2] == q.shape[-2] else "cross-attention"
            masked = kwargs.get("attn_mask", args[0] if args else None) is not None
            seen.setdefault(kind + (" (masked)" if masked else ""), ((q, k, v, *args), kwargs))
        return sdpa(q, k, v, *args, **kwargs)

    F.scaled_dot_product_attention = recording
    try:  # eager: the hooks and the recording run as Python (a compiled backbone would trace them)
        with autocast, torch.no_grad(), torch.compiler.set_stance("force_eager"):
            module.batch_loss(batch, module.step_generator(0, 0))
    finally:
        F.scaled_dot_product_attention = sdpa
        for h in hooks:
            h.remove()
    return {k: detached(v) for k, v in seen.items()}


def count(watch_of: Callable, fn: Callable[[], Any], repeats: int, setup: Callable[[], Any] | None = None) -> dict:
    """Synchronisations per call of ``fn`` (``setup`` before each call, not counted), after one call not counted."""
    import torch

    def once():
        if setup is not None:
            setup()
        fn()

    once()
    watch = watch_of()
    for _ in range(repeats):
        if setup is not None:
            setup()
        watch.start()
        try:
            fn()
        finally:
            watch.stop()
    if watch.cuda:
        torch.cuda.synchronize()
    return {"syncs_per_call": watch.total / repeats, "sites": watch.table(repeats, top=5)}


def probe(opts: dict) -> dict:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from diffusion_train.train import quiet_known_warnings
    from diffusion_train.training.syncs import SyncWatch

    if opts["device"] == "cuda" and not torch.cuda.is_available():
        raise UsageError("device=cuda but no CUDA device is available (device=cpu runs on the CPU)")
    device = torch.device(opts["device"])
    quiet_known_warnings()
    torch.set_float32_matmul_precision("high")
    cfg = benchmark.compose(benchmark.stand_in_args(opts) + opts["config"] + [
        f"training.compile={opts['compile']}", f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}"])
    module = build(cfg, int(cfg.seed)).to(device).train()
    batch, inputs = make_batch(module, opts["batch"], device)
    ema = make_ema(cfg)
    opt, schedulers = optimizer_and_schedules(module)

    def autocast():
        return step_autocast(device, opts["precision"])

    seen = capture(module, batch, autocast())
    repeats, results = opts["repeats"], {}

    def part(name: str, fn: Callable[[], Any], setup: Callable[[], Any] | None = None) -> None:
        def under_autocast():
            with autocast():
                fn()
        results[name] = count(lambda: SyncWatch(device), under_autocast, repeats, setup)
        sites = "; ".join(f"`{e['site']}` x{e['per_step']:.1f}" for e in results[name]["sites"][:3])
        benchmark.log(f"{name}: {results[name]['syncs_per_call']:.1f} syncs per call{'; ' + sites if sites else ''}")

    def called(key: str, fn: Callable) -> Callable[[], None]:
        args, kwargs = seen[key]
        return lambda: backward_of(fn(*args, **kwargs))

    import torch.nn.functional as F

    backends = ([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                 SDPBackend.MATH] if device.type == "cuda" else [None])
    for kind in [k for k in seen if "attention" in k]:
        for backend in backends:
            name = kind + (f", {backend.name.lower()}" if backend is not None else "")
            attend = called(kind, F.scaled_dot_product_attention)
            fn = attend if backend is None else (lambda attend=attend, b=backend: _with_backend(sdpa_kernel, b, attend))
            try:
                part(name, fn)
            except RuntimeError as e:  # a backend that does not take these inputs (dtype, head size, mask)
                results[name] = {"syncs_per_call": None, "sites": [], "error": str(e).splitlines()[0][:160]}
                benchmark.log(f"{name}: not available ({results[name]['error']})")
    if "block" in seen:
        from diffusion_train.training.speed import repeated_blocks

        part("block", called("block", repeated_blocks(module.backbone)[0]))
    part("backbone", called("backbone", module.net))
    part("conditioner", lambda: module.conditioner(batch, generator=module.step_generator(0, 0)))
    part("loss", lambda: module.batch_loss(batch, module.step_generator(0, 0)))
    part("loss+backward", lambda: module.batch_loss(batch, module.step_generator(0, 0)).backward())

    def backward():
        with autocast():
            module.batch_loss(batch, module.step_generator(0, 0)).backward()

    part("update", lambda: module.optimizer_update(opt, schedulers), setup=backward)
    if ema is not None:
        part("ema", lambda: ema.update(module))

    def step():
        module.batch_loss(batch, module.step_generator(0, 0)).backward()
        module.optimizer_update(opt, schedulers)
        if ema is not None:
            ema.update(module)
    part("step", step)
    return {"schema": "diffusion_train.sync_probe/1", "config": opts["config"], "inputs": inputs,
            "device": environment(device)["device_name"], "precision": opts["precision"],
            "compile": module.compile, "repeats": repeats,
            "counted_by": "torch.cuda.set_sync_debug_mode" if device.type == "cuda"
            else "operations that would synchronise on a GPU (diffusion_train.training.syncs)",
            "parts": results}


def _with_backend(sdpa_kernel, backend, fn) -> None:
    with sdpa_kernel([backend]):
        fn()


def markdown(result: dict) -> str:
    lines = [f"Host-device synchronisations per call, {' '.join(result['config'])}, batch {result['inputs']['batch']}, "
             f"{result['device']} ({result['counted_by']}; {result['repeats']} calls each):", "",
             "| part | syncs per call | sites (innermost first), per call |", "|---|---|---|"]
    for name, r in result["parts"].items():
        n = "-" if r["syncs_per_call"] is None else f"{r['syncs_per_call']:.1f}"
        sites = r.get("error") or "; ".join(f"`{e['site']}` {e['per_step']:.1f}" for e in r["sites"])
        lines.append(f"| {name} | {n} | {sites} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    def run(args: list[str]) -> dict:
        opts = parse_args(args)
        result = probe(opts)
        if opts["out"]:
            write_text(opts["out"], json.dumps(result, indent=2) + "\n")
        print(markdown(result), end="")
        return result

    return run_main(run, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
