"""How a text-conditioned Fashion-MNIST model draws a DreamBooth subject and whether its other prompts drift::

    python scripts/dreambooth_eval.py ckpt=runs/dreambooth/checkpoints/last.ckpt out=db/eval \
        instance_dir=photos/cat 'instance_prompt=a photo of sks cat' classifier=feature_nets/fmnist.safetensors

Every argument is ``key=value``: ``ckpt``, ``out`` (a folder), ``instance_dir`` (the subject's images),
``instance_prompt``, ``classifier`` (the weights of ``fmnist_net``, ``scripts/train_feature_net.py``), ``num``
(samples of the subject's prompt, 16), ``per_class`` (samples of each class prompt, 20), ``template`` (the class
prompts, ``a photo of a {name}``), ``weights`` (ema), ``steps`` (50), ``guidance`` (2.0), ``seed`` (0),
``device`` (auto).

``dreambooth.json``: ``subject_distance``, the mean over the subject's samples of the mean squared pixel
distance to the nearest subject image (lower: the model draws the subject); ``class_accuracy``, the share of
the class-prompt samples that the classifier puts in the prompt's class (language drift lowers it). The grid:
the subject images, the subject's samples, and the first sample of each class prompt.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusion_train.cli import UsageError, parse_key_values, run_main  # noqa: E402
from diffusion_train.files import write_json  # noqa: E402

OPTIONS = {"ckpt": str, "out": str, "instance_dir": str, "instance_prompt": str, "classifier": str, "num": int,
           "per_class": int, "template": str, "weights": str, "steps": int, "guidance": float, "seed": int,
           "device": str}
DEFAULTS = {"ckpt": "", "out": "", "instance_dir": "", "instance_prompt": "", "classifier": "", "num": 16,
            "per_class": 20, "template": "a photo of a {name}", "weights": "ema", "steps": 50, "guidance": 2.0,
            "seed": 0, "device": "auto"}


def evaluate(opts: dict) -> dict:
    from hydra.utils import instantiate

    from diffusion_train.data.fashion_mnist import CLASSES
    from diffusion_train.finetune.dreambooth import load_folder
    from diffusion_train.cli import resolve_device
    from diffusion_train.finetune.examples import load_run
    from diffusion_train.metrics.fmnist_net import FMNISTNet
    from diffusion_train.training.images import save_grid

    missing = [k for k in ("ckpt", "out", "instance_dir", "instance_prompt", "classifier") if not opts[k]]
    if missing:
        raise UsageError(f"give {', '.join(f'{k}=...' for k in missing)}")
    device = resolve_device(opts["device"])
    module, config = load_run(opts["ckpt"], opts["weights"], device)
    sampler = instantiate(config.sampler, _convert_="all", steps=opts["steps"])
    subject = load_folder(opts["instance_dir"], module.image_size, int(config.data.channels))  # pixels, not latents
    subject = subject.float().div(127.5).sub(1).to(device)

    def sample(prompts: list[str], first_seed: int) -> torch.Tensor:
        inputs = module.conditioner.sample_inputs(len(prompts), prompts=prompts)  # image i: prompts[i]
        out = [module.sample_seeded(list(range(i, min(i + 50, len(prompts)))), inputs, sampler, opts["guidance"],
                                    seed=first_seed) for i in range(0, len(prompts), 50)]
        return torch.cat(out)

    drawn = sample([opts["instance_prompt"]] * opts["num"], opts["seed"])
    distance = ((drawn[:, None] - subject[None]) ** 2).flatten(2).mean(2).min(dim=1).values.mean()
    prompts = [opts["template"].format(name=name.lower()) for name in CLASSES for _ in range(opts["per_class"])]
    classes = sample(prompts, opts["seed"] + 10_000)
    classifier = FMNISTNet.load(opts["classifier"]).to(device)
    labels = torch.arange(len(CLASSES), device=device).repeat_interleave(opts["per_class"])
    report = {"ckpt": opts["ckpt"], "instance_prompt": opts["instance_prompt"], "subject_images": len(subject),
              "samples": opts["num"], "subject_distance": float(distance),
              "class_accuracy": classifier.class_accuracy(classes, labels), "per_class": opts["per_class"],
              "template": opts["template"], "steps": opts["steps"], "guidance": opts["guidance"], "seed": opts["seed"]}
    out = Path(opts["out"])
    firsts = classes[:: opts["per_class"]]
    width = max(len(subject), len(drawn), len(firsts))
    pad = lambda x: torch.cat([x, -torch.ones(width - len(x), *x.shape[1:], device=x.device)])  # noqa: E731
    save_grid(torch.cat([pad(subject), pad(drawn), pad(firsts)]), out / "grid.png", ncol=width)
    write_json(out / "dreambooth.json", report)
    print(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    return run_main(lambda a: evaluate(parse_key_values(a, OPTIONS, DEFAULTS)), args)


if __name__ == "__main__":
    sys.exit(main())
