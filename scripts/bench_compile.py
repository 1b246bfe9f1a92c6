"""Forward + backward of a class-conditional DiT backbone alone on one GPU, eager against each way of compiling it
(training/speed.py), and the host-device synchronisations of one eager pass::

    python scripts/bench_compile.py                  # DiT-S/2, batch 256, 4x32x32 inputs
    python scripts/bench_compile.py size=XL batch=128

Every argument is ``key=value``: ``size`` (S, B, L, XL), ``patch`` (2), ``batch`` (256), ``steps`` (10 timed steps
after 3 untimed ones). bf16 autocast, TF32 matmuls; no optimizer, EMA or trainer: ``scripts/benchmark.py`` times
the full step. Each variant's first step includes its compilation (inductor's caches, warm from an earlier variant,
shorten the later ones). Prints one line per variant.
"""

from __future__ import annotations

import collections
import sys
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusion_train.cli import UsageError, parse_key_values, run_main  # noqa: E402

OPTIONS = {"size": str, "patch": int, "batch": int, "steps": int}
DEFAULTS = {"size": "S", "patch": 2, "batch": 256, "steps": 10}


def main_(opts: dict) -> None:
    import torch
    from torch._dynamo.utils import counters

    from diffusion_train.conditioning.cond import Cond
    from diffusion_train.models import DiT
    from diffusion_train.training.speed import prepare_backbone

    if not torch.cuda.is_available():
        raise UsageError("bench_compile.py times a CUDA device and none is available")
    if opts["size"] not in ("S", "B", "L", "XL"):
        raise UsageError(f"size={opts['size']}: valid: S, B, L, XL")
    torch.set_float32_matmul_precision("high")
    dev, b = torch.device("cuda"), opts["batch"]
    x, t = torch.randn(b, 4, 32, 32, device=dev), torch.rand(b, device=dev) * 1000
    cond = Cond(vector=torch.randn(b, 64, device=dev))

    def model():
        torch.manual_seed(0)
        return DiT(input_size=32, in_channels=4, size=opts["size"], patch_size=opts["patch"], cond_dim=64).to(dev)

    def forward(net):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return net(x, t, cond)

    def step(net):
        forward(net).float().square().mean().backward()

    # host syncs of one eager forward and backward pass (after a first pass)
    net = model()
    step(net)
    torch.cuda.synchronize()
    sites: collections.Counter = collections.Counter()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *a, **k: sites.update(
            [" <- ".join(f"{f.filename.split('/')[-1]}:{f.lineno}" for f in traceback.extract_stack()[-5:-1])]
            if "synchronizing CUDA operation" in str(message) else [])
        torch.cuda.set_sync_debug_mode(1)
        out = forward(net)
        fwd = sum(sites.values())
        out.float().square().mean().backward()
        torch.cuda.set_sync_debug_mode(0)
    print(f"eager DiT-{opts['size']}/{opts['patch']}, batch {b}: host syncs forward {fwd}, backward "
          f"{sum(sites.values()) - fwd}; sites {dict(sites.most_common(3))}", flush=True)

    variants = {
        "eager": model,
        "compile=blocks": lambda: prepare_backbone(model(), compile="blocks"),
        "compile=true": lambda: prepare_backbone(model(), compile=True),
    }
    for name, make in variants.items():
        torch._dynamo.reset()
        counters.clear()
        net = make()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(net)
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        for _ in range(3):
            step(net)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(opts["steps"]):
            step(net)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) / opts["steps"] * 1e3
        print(f"{name}: first step {first:.1f} s, {ms:.1f} ms/step, {b / ms * 1e3:,.0f} images/s (forward + "
              f"backward), graphs {counters['stats'].get('unique_graphs', 0)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    return run_main(lambda a: main_(parse_key_values(a, OPTIONS, DEFAULTS)), args)


if __name__ == "__main__":
    sys.exit(main())
