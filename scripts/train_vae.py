"""Trains the package's small KL autoencoder (``TinyVAENet``) on a configured dataset and writes a
weights file for ``autoencoder=tiny_vae``.

    python scripts/train_vae.py out=vae/fmnist.safetensors [steps=2000] [batch_size=64] [lr=1e-3]
        [kl_weight=1e-4] [latent_channels=4] [channels=[32,64,64]] [seed=0] [device=auto]
        [log_every=100] [stat_batches=20] [grad_clip=1.0] [data=fashion_mnist] [data.root=DIR] ...

Every argument is ``key=value``. The keys above (except ``data...``) are this script's options; every
other argument is a Hydra override of the training config (``conf/train.yaml``), so the data is what
``diffusion-train`` would train on with the same overrides: ``data=synthetic``,
``data.resolution=32``, ``data.root=DIR``, ``experiment=...`` (default: the training config's
data, ``fashion_mnist``). ``batch_size`` and ``seed`` set ``data.batch_size`` and the config's
``seed`` (which orders the data stream); ``batch_size`` left out keeps the data config's.
``device=auto`` is CUDA when available, else CPU. Bad arguments exit with status 2, missing data
files with status 1, each with an ``error:`` line.

Training: AdamW at a constant ``lr`` (linear warm-up over the first 2 % of steps), gradient norm
clipped to ``grad_clip``, on :meth:`TinyVAENet.loss` (L1 + MSE of a posterior sample plus
``kl_weight`` x KL), logging the running means of ``recon`` and ``kl`` every ``log_every`` steps.
At the end it measures, over ``stat_batches`` training batches, the mean and std of the posterior
means (over all latent elements) and stores ``scale_factor = 1 / std`` and ``shift_factor = mean``
with the weights, so ``(z - shift) * scale`` has about unit variance; it also reports the validation
reconstruction MSE (posterior mean, images in [-1, 1]) and stores it as ``recon_mse``. The file
(written atomically by :meth:`TinyVAENet.save`) holds the architecture too, so ``TinyVAE`` needs
only its path; the script ends with the line to add to a training command::

    autoencoder=tiny_vae autoencoder.weights=/absolute/path/to/out.safetensors

:func:`train_vae` (the loop), :func:`latent_stats` and :func:`recon_mse` are importable for tests.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusion_train.cli import UsageError, resolve_device  # noqa: E402
from diffusion_train.conditioning.autoencoder import TinyVAENet  # noqa: E402

OPTIONS: dict[str, Callable[[str], Any]] = {
    "out": str, "steps": int, "batch_size": int, "lr": float, "kl_weight": float, "latent_channels": int,
    "channels": lambda v: [int(c) for c in v.strip("[]() ").split(",") if c.strip()], "seed": int,
    "device": str, "log_every": int, "stat_batches": int, "grad_clip": float,
}
DEFAULTS: dict[str, Any] = {
    "out": None, "steps": 2000, "batch_size": None, "lr": 1e-3, "kl_weight": 1e-4, "latent_channels": 4,
    "channels": [32, 64, 64], "seed": 0, "device": "auto", "log_every": 100, "stat_batches": 20, "grad_clip": 1.0,
}


def parse_args(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """(this script's options, Hydra overrides of the training config) from ``key=value`` arguments."""
    opts, overrides = dict(DEFAULTS), []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise UsageError(f"argument {arg!r} is not key=value; script options: {', '.join(OPTIONS)}")
        if key in OPTIONS:
            try:
                opts[key] = OPTIONS[key](value)
            except ValueError:
                raise UsageError(f"{key}={value!r}: not a valid {key}") from None
        else:
            overrides.append(arg)
    if not opts["out"]:
        raise UsageError("set out=PATH (the .safetensors file to write)")
    for key in ("steps", "log_every", "stat_batches", "latent_channels"):
        if opts[key] <= 0:
            raise UsageError(f"{key} must be positive, got {opts[key]}")
    if not opts["channels"]:
        raise UsageError("channels needs at least one level, e.g. channels=[32,64,64]")
    if opts["batch_size"] is not None:
        if opts["batch_size"] <= 0:
            raise UsageError(f"batch_size must be positive, got {opts['batch_size']}")
        overrides.append(f"data.batch_size={opts['batch_size']}")
    overrides.append(f"seed={opts['seed']}")
    return opts, overrides


def compose_config(overrides: list[str]):
    """The training config (``conf/train.yaml``) with ``overrides``, as ``diffusion-train`` composes it."""
    from hydra import compose, initialize_config_dir

    from diffusion_train.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=overrides)


def train_batches(datamodule) -> Iterator[Tensor]:
    """The data module's seeded, endless training stream of images (B, C, H, W) in [-1, 1]."""
    for indices in datamodule.train_sampler():
        yield datamodule.train_set[indices]["image"]


def _images(batch: Tensor | dict, device: torch.device) -> Tensor:
    images = batch["image"] if isinstance(batch, dict) else batch
    return images.to(device, torch.float32, non_blocking=True)


def train_vae(net: TinyVAENet, batches: Iterable[Tensor | dict], steps: int, lr: float = 1e-3,
              kl_weight: float = 1e-4, generator: torch.Generator | None = None, log_every: int = 100,
              grad_clip: float | None = 1.0, warmup: float = 0.02,
              log: Callable[[str], None] | None = print) -> list[dict[str, float]]:
    """Trains ``net`` in place for ``steps`` AdamW steps on ``batches`` (image tensors or batch dicts
    with ``image``, in [-1, 1]; moved to the net's device). ``generator`` (on the net's device) seeds
    the posterior samples. Returns one record per ``log_every`` steps (and the last): ``step`` and the
    means of ``loss``, ``recon``, ``kl`` over the steps since the previous record."""
    device = next(net.parameters()).device
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    warm = max(1, int(round(warmup * steps)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warm))
    history: list[dict[str, float]] = []
    sums = torch.zeros(3, device=device)  # loss, recon, kl: summed on the device, read when logging
    count, start, it = 0, time.perf_counter(), iter(batches)
    for step in range(1, steps + 1):
        images = _images(next(it), device)
        loss, parts = net.loss(images, generator, kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
        opt.step()
        sched.step()
        sums += torch.stack([loss.detach(), parts["recon"], parts["kl"]])
        count += 1
        if step % log_every == 0 or step == steps:
            loss_m, rec_m, kl_m = (sums / count).tolist()
            if not math.isfinite(loss_m):
                raise FloatingPointError(f"train_vae: loss became {loss_m} by step {step}; lower lr={lr}")
            history.append({"step": step, "loss": loss_m, "recon": rec_m, "kl": kl_m})
            if log is not None:
                log(f"step {step:6d}/{steps}  loss {loss_m:.5f}  recon {rec_m:.5f}  kl {kl_m:.4f}  "
                    f"{(time.perf_counter() - start) / step:.3f} s/step")
            sums.zero_()
            count = 0
    net.eval()
    return history


@torch.no_grad()
def latent_stats(net: TinyVAENet, batches: Iterable[Tensor | dict], num_batches: int) -> tuple[float, float]:
    """(mean, std) over all elements of the posterior means of ``num_batches`` batches."""
    device = next(net.parameters()).device
    total = torch.zeros(3, dtype=torch.float64, device=device)  # n, sum, sum of squares
    for _, batch in zip(range(num_batches), batches):
        mean = net.moments(_images(batch, device)).chunk(2, dim=1)[0].double()
        total += torch.stack([torch.tensor(float(mean.numel()), dtype=torch.float64, device=device),
                              mean.sum(), mean.pow(2).sum()])
    n, s, sq = total.tolist()
    if n == 0:
        raise ValueError("latent_stats: no batches")
    mu = s / n
    return mu, math.sqrt(max(sq / n - mu * mu, 0.0))


@torch.no_grad()
def recon_mse(net: TinyVAENet, images: Tensor | Iterable[Tensor | dict], batch_size: int = 256) -> float:
    """Mean squared error of ``decode(posterior mean)`` against the images (in [-1, 1]): a tensor
    (evaluated ``batch_size`` at a time) or an iterable of image tensors / batch dicts."""
    device = next(net.parameters()).device
    err, n = 0.0, 0
    for batch in images.split(batch_size) if isinstance(images, Tensor) else images:
        x = _images(batch, device)
        recon = net.decode(net.moments(x).chunk(2, dim=1)[0])
        err += F.mse_loss(recon, x, reduction="sum").item()
        n += x.numel()
    return err / n


def main(argv: list[str] | None = None) -> int:
    from hydra.errors import HydraException
    from hydra.utils import instantiate

    try:
        opts, overrides = parse_args(list(sys.argv[1:] if argv is None else argv))
        cfg = compose_config(overrides)
    except (UsageError, HydraException) as e:
        options = " ".join(f"{k}=.." for k in list(OPTIONS)[1:])
        print(f"error: {e}\nusage: python scripts/train_vae.py out=PATH [{options}] "
              f"[Hydra overrides of the training config: data=..., data.root=..., ...]", file=sys.stderr)
        return 2

    torch.manual_seed(opts["seed"])
    device = resolve_device(opts["device"])
    channels, resolution = int(cfg.data.channels), int(cfg.data.resolution)
    net = TinyVAENet(channels, opts["latent_channels"], opts["channels"]).to(device)
    if resolution % net.downsample:
        print(f"error: data.resolution={resolution} is not divisible by the downsampling factor {net.downsample} "
              f"of channels={opts['channels']}", file=sys.stderr)
        return 2
    try:
        datamodule = instantiate(cfg.data, _convert_="all")
        datamodule.setup()
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n_params = sum(p.numel() for p in net.parameters())
    print(f"TinyVAE {opts['channels']} latent_channels={opts['latent_channels']} ({n_params / 1e6:.2f} M params) "
          f"on {type(datamodule).__name__} {len(datamodule.train_set)} train / {len(datamodule.val_set)} val images "
          f"{channels}x{resolution}x{resolution}, batch {datamodule.batch_size}, {device}", flush=True)

    generator = torch.Generator(device=device).manual_seed(opts["seed"])
    history = train_vae(net, train_batches(datamodule), opts["steps"], opts["lr"], opts["kl_weight"], generator,
                        opts["log_every"], opts["grad_clip"], log=lambda s: print(s, flush=True))

    shift, std = latent_stats(net, train_batches(datamodule), opts["stat_batches"])
    if not std > 0:
        print(f"error: the latents have std {std}: the encoder collapsed; retry with a lower lr or kl_weight",
              file=sys.stderr)
        return 1
    n_val = len(datamodule.val_set)
    val_mse = recon_mse(net, (datamodule.val_set[list(range(i, min(i + 256, n_val)))] for i in range(0, n_val, 256)))
    out = net.save(opts["out"], extra={"scale_factor": 1.0 / std, "shift_factor": shift, "steps": opts["steps"],
                                       "recon_mse": val_mse, "kl_weight": opts["kl_weight"],
                                       "train_recon": history[-1]["recon"], "data": cfg.data._target_,
                                       "resolution": resolution})
    print(f"latents: mean {shift:.4f}, std {std:.4f} -> scale_factor {1.0 / std:.4f}, shift_factor {shift:.4f}")
    print(f"validation reconstruction MSE {val_mse:.5f} (PSNR {10 * math.log10(4.0 / max(val_mse, 1e-12)):.2f} dB "
          f"on [-1, 1] images), {n_val} images")
    print(f"wrote {out}; train a latent diffusion model on it with:")
    print(f"autoencoder=tiny_vae autoencoder.weights={out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
