"""Samples of a ``finetune=controlnet`` run for the control images of its validation images, against the same
samples without control, as a grid and numbers::

    python scripts/control.py ckpt=runs/fmnist_controlnet/checkpoints/last.ckpt out=control/fmnist

Every argument is ``key=value``: ``ckpt`` (a checkpoint of a ControlNet run), ``out`` (a folder), ``num`` (images,
10), ``weights`` (ema | ema_<decay> | raw), ``steps`` (sampler steps, 50), ``guidance`` (2.0), ``scale`` (the
control scale, 1.0), ``seed`` (0), ``device`` (auto | cpu | cuda).

The control images are made from the first ``num`` validation images of the run's own data as in training (its
``finetune.control_key`` or detector); sample i has the noise of seed ``seed + i`` and the label or caption of
validation image i, with and without the control. ``grid.png`` rows: the validation images, their control
images, the samples without control, the samples with it. ``control.json`` has, for each row of samples, the mean
correlation between the Sobel edge map of a sample and its control image (higher: the sample follows the control)
and the same for the validation images themselves.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusion_train.cli import UsageError, parse_key_values, run_main  # noqa: E402
from diffusion_train.files import write_json  # noqa: E402

OPTIONS = {"ckpt": str, "out": str, "num": int, "weights": str, "steps": int, "guidance": float, "scale": float,
           "seed": int, "device": str}
DEFAULTS = {"ckpt": "", "out": "", "num": 10, "weights": "ema", "steps": 50, "guidance": 2.0, "scale": 1.0, "seed": 0,
            "device": "auto"}


def edge_agreement(images: torch.Tensor, control: torch.Tensor) -> float:
    """Mean over images of the correlation between an image's Sobel edge map and its control image."""
    from diffusion_train.finetune.controlnet import sobel_edges

    a, b = sobel_edges(images).flatten(1), control.float().mean(dim=1, keepdim=True).flatten(1)
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    return float(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp(min=1e-12)).mean())


def control(opts: dict) -> dict:
    from hydra.utils import instantiate

    from diffusion_train.diffusion import per_image_generators, randn
    from diffusion_train.cli import resolve_device
    from diffusion_train.finetune.examples import load_run, validation_examples
    from diffusion_train.training.images import save_grid

    if not opts["ckpt"] or not opts["out"]:
        raise UsageError("give ckpt=CHECKPOINT and out=FOLDER")
    if opts["num"] < 1:
        raise UsageError(f"num must be >= 1, got {opts['num']}")
    device = resolve_device(opts["device"])
    module, config = load_run(opts["ckpt"], opts["weights"], device)
    if module.controlnet is None:
        raise UsageError(f"{opts['ckpt']} is not a finetune=controlnet run")
    images, inputs = validation_examples(module, config, opts["num"], device)
    controls = module.control({"image": images, **inputs}).to(device)
    sampler = instantiate(config.sampler, _convert_="all", steps=opts["steps"])
    n, net = images.shape[0], module.backbone
    gens = per_image_generators([opts["seed"] + i for i in range(n)], device)
    noise = randn((n, net.out_channels, net.input_size, net.input_size), gens, device)
    rows = {}
    for name, ctrl in (("without_control", None), ("with_control", controls)):
        gens = per_image_generators([opts["seed"] + i for i in range(n)], device)
        rows[name] = module.sample(noise, inputs, sampler, opts["guidance"], generator=gens, control=ctrl,
                                   control_scale=opts["scale"])
    report = {"ckpt": opts["ckpt"], "weights": opts["weights"], "steps": opts["steps"], "guidance": opts["guidance"],
              "scale": opts["scale"], "seed": opts["seed"], "images": n,
              "edge_agreement": {"validation_images": edge_agreement(images, controls),
                                 **{name: edge_agreement(x, controls) for name, x in rows.items()}}}
    shown = controls.expand(-1, images.shape[1], -1, -1) if controls.shape[1] == 1 else controls
    out = Path(opts["out"])
    save_grid(torch.cat([images, shown, rows["without_control"], rows["with_control"]]), out / "grid.png", ncol=n)
    write_json(out / "control.json", report)
    print(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    return run_main(lambda a: control(parse_key_values(a, OPTIONS, DEFAULTS)), args)


if __name__ == "__main__":
    sys.exit(main())
