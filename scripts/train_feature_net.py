"""Trains the Fashion-MNIST feature net (``FMNISTNet``) used for FD-FMNIST and class accuracy, and
writes its weights file.

    python scripts/train_feature_net.py out=feature_nets/fmnist.safetensors [epochs=4] [batch_size=128]
        [lr=3e-3] [weight_decay=5e-4] [seed=0] [limit=0] [min_accuracy=0.90] [channels=[32,64,128]]
        [feature_dim=128] [root=DIR] [device=cpu] [threads=1]

Every argument is ``key=value``. Training: the Fashion-MNIST train split (the first ``limit``
images when ``limit`` > 0), light augmentation (random horizontal flips, random shifts of up to 2
pixels with black fill), AdamW with a linear warm-up over the first 5 % of steps and a cosine decay
to zero, cross-entropy. After each epoch the test split (10k images) is evaluated; the file is
written (atomically, with the architecture, the test accuracy and these settings in its metadata)
only when the final test accuracy is at least ``min_accuracy``; otherwise the script exits with
status 1 and an ``error:`` line stating the accuracy reached. Bad arguments exit with status 2.
``root`` is a folder of the IDX files (default: the Debian package ``dataset-fashion-mnist``);
``threads`` sets torch's CPU thread count (default 1: these small convolutions gain little from
more threads and lose much when the cores are shared; 0 keeps torch's default). Runs are
deterministic given ``seed`` on the same device and thread count.

:func:`train_feature_net` (the loop), :func:`augment` and :func:`to_unit` are importable for tests.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusion_train.cli import UsageError, parse_key_values  # noqa: E402
from diffusion_train.data.fashion_mnist import load_split  # noqa: E402
from diffusion_train.metrics.fmnist_net import FMNISTNet  # noqa: E402

OPTIONS: dict[str, Callable[[str], Any]] = {
    "out": str, "epochs": int, "batch_size": int, "lr": float, "weight_decay": float, "seed": int, "limit": int,
    "min_accuracy": float, "channels": lambda v: [int(c) for c in v.strip("[]() ").split(",") if c.strip()],
    "feature_dim": int, "root": str, "device": str, "threads": int,
}
DEFAULTS: dict[str, Any] = {
    "out": None, "epochs": 4, "batch_size": 128, "lr": 3e-3, "weight_decay": 5e-4, "seed": 0, "limit": 0,
    "min_accuracy": 0.90, "channels": [32, 64, 128], "feature_dim": 128, "root": None, "device": "cpu", "threads": 1,
}
SHIFT = 2


def parse_args(argv: list[str]) -> dict[str, Any]:
    opts = parse_key_values(argv, OPTIONS, DEFAULTS)
    if not opts["out"]:
        raise UsageError("set out=PATH (the .safetensors file to write)")
    for key in ("epochs", "batch_size", "feature_dim"):
        if opts[key] <= 0:
            raise UsageError(f"{key} must be positive, got {opts[key]}")
    for key in ("limit", "threads"):
        if opts[key] < 0:
            raise UsageError(f"{key} must be >= 0, got {opts[key]}")
    if not opts["lr"] > 0:
        raise UsageError(f"lr must be positive, got {opts['lr']}")
    if not 0.0 <= opts["min_accuracy"] <= 1.0:
        raise UsageError(f"min_accuracy must be in [0, 1], got {opts['min_accuracy']}")
    if not opts["channels"] or len(opts["channels"]) > 4:
        raise UsageError(f"channels needs 1 to 4 blocks, e.g. channels=[32,64,128], got {opts['channels']}")
    return opts


def to_unit(images: Tensor) -> Tensor:
    """uint8 images -> float32 in [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


def augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Random horizontal flips and integer shifts of up to ``SHIFT`` pixels (black fill) of (B, 1, H, W)."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=generator, device=x.device) < 0.5
    x = torch.where(flip.view(b, 1, 1, 1), x.flip(-1), x)
    padded = F.pad(x, (SHIFT, SHIFT, SHIFT, SHIFT), value=-1.0)
    dy, dx = (torch.randint(0, 2 * SHIFT + 1, (2, b), generator=generator, device=x.device))
    rows = (torch.arange(h, device=x.device).view(1, h) + dy.view(b, 1)).view(b, 1, h, 1).expand(b, 1, h, w + 2 * SHIFT)
    out = padded.gather(2, rows)
    cols = (torch.arange(w, device=x.device).view(1, w) + dx.view(b, 1)).view(b, 1, 1, w).expand(b, 1, h, w)
    return out.gather(3, cols)


def train_feature_net(net: FMNISTNet, images: Tensor, labels: Tensor, epochs: int, batch_size: int, lr: float,
                      weight_decay: float = 5e-4, generator: torch.Generator | None = None,
                      test: tuple[Tensor, Tensor] | None = None, warmup: float = 0.05,
                      log: Callable[[str], None] | None = print) -> list[dict[str, float]]:
    """Trains ``net`` in place on ``images`` (float, (N, 1, 28, 28) in [-1, 1], on the net's device) and
    ``labels``; returns one record per epoch: ``epoch``, mean train ``loss``, and ``test_accuracy`` on
    ``test`` (images, labels) when given. The last partial batch of an epoch is dropped."""
    device = net.head.weight.device
    generator = generator or torch.Generator(device=device).manual_seed(0)
    n = images.shape[0]
    steps_per_epoch = max(1, n // batch_size)
    total = epochs * steps_per_epoch
    warm = max(1, int(round(warmup * total)))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min((i + 1) / warm, 0.5 * (1 + math.cos(math.pi * min(i, total) / total))))
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        net.train()
        perm = torch.randperm(n, generator=generator, device=device)
        loss_sum = torch.zeros((), device=device)
        for s in range(steps_per_epoch):
            idx = perm[s * batch_size: (s + 1) * batch_size]
            x = augment(images[idx], generator)
            loss = F.cross_entropy(net.train_logits(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach()
        net.eval()
        record = {"epoch": epoch, "loss": loss_sum.item() / steps_per_epoch}
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"train_feature_net: loss became {record['loss']} in epoch {epoch}; lower lr={lr}")
        if test is not None:
            record["test_accuracy"] = net.class_accuracy(*test)
        history.append(record)
        if log is not None:
            acc = f"  test accuracy {record['test_accuracy']:.4f}" if test is not None else ""
            log(f"epoch {epoch}/{epochs}  loss {record['loss']:.4f}{acc}  {time.perf_counter() - start:.0f} s")
    return history


def main(argv: list[str] | None = None) -> int:
    try:
        opts = parse_args(list(sys.argv[1:] if argv is None else argv))
        device = torch.device(opts["device"])
    except (UsageError, RuntimeError) as e:
        options = " ".join(f"{k}=.." for k in list(OPTIONS)[1:])
        print(f"error: {e}\nusage: python scripts/train_feature_net.py out=PATH [{options}]", file=sys.stderr)
        return 2
    if opts["threads"]:
        torch.set_num_threads(opts["threads"])
    try:
        tr_x, tr_y = load_split("train", opts["root"])
        te_x, te_y = load_split("test", opts["root"])
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if opts["limit"]:
        tr_x, tr_y = tr_x[: opts["limit"]], tr_y[: opts["limit"]]
    tr_x, tr_y = to_unit(tr_x).to(device), tr_y.to(device)
    te_x, te_y = to_unit(te_x).to(device), te_y.to(device)

    torch.manual_seed(opts["seed"])
    net = FMNISTNet(opts["channels"], opts["feature_dim"]).to(device)
    generator = torch.Generator(device=device).manual_seed(opts["seed"])
    n_params = sum(p.numel() for p in net.parameters())
    print(f"FMNISTNet channels={opts['channels']} feature_dim={opts['feature_dim']} ({n_params / 1e6:.2f} M params) "
          f"on {len(tr_x)} train / {len(te_x)} test images, {opts['epochs']} epochs, batch {opts['batch_size']}, "
          f"{device}, {torch.get_num_threads()} threads", flush=True)
    start = time.perf_counter()
    history = train_feature_net(net, tr_x, tr_y, opts["epochs"], opts["batch_size"], opts["lr"],
                                opts["weight_decay"], generator, test=(te_x, te_y),
                                log=lambda s: print(s, flush=True))
    seconds = time.perf_counter() - start
    accuracy = history[-1]["test_accuracy"]
    print(f"test accuracy {accuracy:.4f} ({len(te_x)} images) after {seconds:.0f} s of training")
    if accuracy < opts["min_accuracy"]:
        print(f"error: test accuracy {accuracy:.4f} is below min_accuracy={opts['min_accuracy']}; "
              f"nothing written (train longer: epochs=..., or set min_accuracy=0 to save anyway)", file=sys.stderr)
        return 1
    training = {k: opts[k] for k in ("epochs", "batch_size", "lr", "weight_decay", "seed", "limit")}
    training.update(train_images=len(tr_x), augmentation=f"hflip, shift <= {SHIFT} px", optimizer="AdamW, cosine",
                    device=str(device), threads=torch.get_num_threads(), seconds=round(seconds, 1),
                    final_train_loss=history[-1]["loss"])
    out = net.save(opts["out"], extra={"test_accuracy": accuracy, "test_images": len(te_x), "training": training})
    print(f"wrote {out} (weights sha256 {net.provenance['weights_sha256'][:16]}...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
