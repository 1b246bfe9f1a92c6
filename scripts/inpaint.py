"""Inpaint validation images of a ``task=inpainting`` run with each kind of mask, as a grid and numbers::

    python scripts/inpaint.py ckpt=runs/fmnist_inpaint/checkpoints/last.ckpt out=inpaint/fmnist

Every argument is ``key=value``: ``ckpt`` (a checkpoint of an inpainting run), ``out`` (a folder), ``num`` (images,
8), ``masks`` (kinds, comma separated: box,stroke,border), ``weights`` (ema | ema_<decay> | raw), ``steps``
(sampler steps, 50), ``guidance`` (2.0), ``seed`` (0), ``device`` (auto | cpu | cuda).

The images are the first ``num`` of the run's validation set (its own data config, an in-memory dataset), with
their labels or captions when the model is conditioned on them. ``grid.png`` has the originals in its first row,
then for each mask kind (masks drawn from ``seed``) the masked images (unknown pixels grey) and the inpainted
images. ``inpaint.json`` records, per kind,
the unknown fraction, the largest change of a known pixel (0: kept exactly), the mean squared error of the
filled pixels against the originals (a rough measure: any plausible completion is a right answer) and, for
scale, the same error of filling with grey (0).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusion_train.cli import UsageError, parse_key_values, run_main  # noqa: E402
from diffusion_train.files import write_json  # noqa: E402

OPTIONS = {"ckpt": str, "out": str, "num": int, "masks": str, "weights": str, "steps": int, "guidance": float,
           "seed": int, "device": str}
DEFAULTS = {"ckpt": "", "out": "", "num": 8, "masks": "box,stroke,border", "weights": "ema", "steps": 50,
            "guidance": 2.0, "seed": 0, "device": "auto"}


def inpaint(opts: dict) -> dict:
    from hydra.utils import instantiate

    from diffusion_train.cli import resolve_device
    from diffusion_train.finetune.examples import load_run, validation_examples
    from diffusion_train.finetune.masks import KINDS, random_masks
    from diffusion_train.training.images import save_grid

    if not opts["ckpt"] or not opts["out"]:
        raise UsageError("give ckpt=CHECKPOINT and out=FOLDER")
    kinds = [k.strip() for k in opts["masks"].split(",") if k.strip()]
    if not kinds or any(k not in KINDS for k in kinds):
        raise UsageError(f"masks={opts['masks']}: give kinds among {', '.join(KINDS)}")
    if opts["num"] < 1:
        raise UsageError(f"num must be >= 1, got {opts['num']}")
    device = resolve_device(opts["device"])
    module, config = load_run(opts["ckpt"], opts["weights"], device)
    images, inputs = validation_examples(module, config, opts["num"], device)
    sampler = instantiate(config.sampler, _convert_="all", steps=opts["steps"])
    rows, report = [images], {"ckpt": opts["ckpt"], "weights": opts["weights"], "steps": opts["steps"],
                              "guidance": opts["guidance"], "seed": opts["seed"], "images": len(images), "kinds": {}}
    h, w = images.shape[-2:]
    for i, kind in enumerate(kinds):
        gen = torch.Generator(device).manual_seed(opts["seed"] + i)
        masks = random_masks(len(images), h, w, {kind: 1.0}, gen, device=device)
        out = module.inpaint(images, masks, inputs, sampler, opts["guidance"], seed=opts["seed"])
        known = (masks < 0.5).expand_as(images)
        report["kinds"][kind] = {
            "unknown_fraction": float(masks.mean()),
            "known_max_abs_change": float((out - images).abs()[known].max()) if known.any() else 0.0,
            "filled_mse": float(((out - images) ** 2)[~known].mean()) if (~known).any() else None,
            "grey_fill_mse": float((images ** 2)[~known].mean()) if (~known).any() else None}
        rows += [torch.where(known, images, torch.zeros_like(images)), out]
    out_dir = Path(opts["out"])
    save_grid(torch.cat(rows), out_dir / "grid.png", ncol=len(images))
    write_json(out_dir / "inpaint.json", report)
    print(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    return run_main(lambda a: inpaint(parse_key_values(a, OPTIONS, DEFAULTS)), args)


if __name__ == "__main__":
    sys.exit(main())
