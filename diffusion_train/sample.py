"""``diffusion-sample``: images from a checkpoint, with the EMA weights by default."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffusion_train.cli import CONFIG_DIR, check_numbers, resolve_device, user_errors_as_one_line
from diffusion_train.diffusion import Sampler
from diffusion_train.diffusion.guidance import check_guidance
from diffusion_train.files import strict_json, write_json
from diffusion_train.finetune.lora import apply_lora_file
from diffusion_train.training.build import load_module
from diffusion_train.training.checkpointing import last_checkpoint
from diffusion_train.training.images import save_grid
from diffusion_train.training.module import DiffusionModule
from diffusion_train.training.run_dir import differences


def backbone_size(module: DiffusionModule, height: int | None, width: int | None) -> tuple[int, int]:
    """The backbone's spatial size (latent size in latent models) for images of ``height`` x ``width``
    pixels; None stands for the training resolution."""
    net, factor = module.backbone, int(module.autoencoder.downsample)
    net_multiple = int(getattr(net, "size_multiple", 1))
    multiple = factor * net_multiple
    size = []
    for name, pixels in (("height", height), ("width", width)):
        if pixels is None:
            size.append(int(net.input_size))
            continue
        if isinstance(pixels, bool) or not isinstance(pixels, int) or pixels <= 0 or pixels % multiple:
            raise ValueError(f"{name}={pixels} is not a positive multiple of {multiple} = {factor} (autoencoder "
                             f"downsampling) x {net_multiple} ({type(net).__name__} input multiple)")
        size.append(pixels // factor)
    return size[0], size[1]


# The numbers of diffusion-sample's and diffusion-eval's configs: (kind, minimum), checked before any work.
SAMPLING_NUMBERS = {"sampler.steps": (int, 1), "num_images": (int, 1), "num_samples": (int, 2), "batch_size": (int, 1),
                    "seed": (int, 0), "guidance_scale": (float, None), "guidance_rescale": (float, 0),
                    "lora_scale": (float, None), "ncol": (int, 1), "grid_images": (int, 0)}


def sampling_autocast(device: torch.device):
    """bf16 autocast on any CUDA device (``cuda:1`` too); none elsewhere."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def load_for_sampling(cfg: DictConfig) -> tuple[torch.device, DiffusionModule, Sampler, dict]:
    """(device, the checkpoint's module with the chosen weights, the sampler, the guidance options) of
    a ``diffusion-sample`` / ``diffusion-eval`` config; one-line errors for a bad device, a bad number (the key
    named) or a missing checkpoint. ``ckpt`` may be a run directory: its ``checkpoints/last.ckpt``."""
    device = resolve_device(cfg.device)
    check_numbers(cfg, SAMPLING_NUMBERS)
    interval = cfg.guidance_interval
    if interval is not None:
        interval = OmegaConf.to_container(interval) if OmegaConf.is_config(interval) else interval
    check_guidance(cfg.guidance_scale, interval, cfg.guidance_rescale)
    ckpt = Path(cfg.ckpt)
    if ckpt.is_dir() and last_checkpoint(ckpt) is not None:  # a run directory: its last.ckpt, else latest step_*
        ckpt = cfg.ckpt = str(last_checkpoint(ckpt))
    if not Path(ckpt).is_file():
        what = "is a directory without checkpoints" if Path(ckpt).is_dir() else "does not exist"
        raise FileNotFoundError(f"checkpoint {cfg.ckpt} {what}")
    module = load_module(cfg.ckpt, cfg.weights)
    if cfg.get("lora"):
        if not Path(cfg.lora).is_file():
            raise FileNotFoundError(f"lora={cfg.lora} does not exist")
        apply_lora_file(module, cfg.lora, float(cfg.get("lora_scale", 1.0)))
    module = module.to(device)
    sampler = instantiate(cfg.sampler, _convert_="all")
    interval = None if interval is None else [float(v) for v in interval]
    return device, module, sampler, {"guidance_interval": interval, "guidance_rescale": float(cfg.guidance_rescale)}


def generate(cfg: DictConfig) -> list[Path]:
    """Writes ``images/<seed + i>.png`` batch by batch, then ``grid.png`` of the first ``grid_images`` and
    ``samples.json`` (every setting; ``complete`` false until the last image is written). A call stopped part way
    (preempted) is continued by the same command: the images of ``out_dir`` are kept and only the missing ones
    made, which are the ones an uninterrupted call makes (image i depends on its seed alone). An ``out_dir`` whose
    images were made with other settings (or that records none) is refused: they would mix under one
    ``samples.json``."""
    out = Path(cfg.out_dir)
    earlier = {p.name for p in (out / "images").glob("*.png")}
    if earlier and not (out / "samples.json").is_file():
        raise ValueError(f"out_dir={out}: images/ holds {len(earlier)} images already ({min(earlier)}, ...) and no "
                         f"samples.json to continue from; give another out_dir, or remove them")
    device, module, sampler, guidance = load_for_sampling(cfg)
    size = backbone_size(module, cfg.height, cfg.width)
    inputs = module.conditioner.sample_inputs(cfg.num_images, cfg.labels, cfg.prompts)
    factor = int(module.autoencoder.downsample)
    meta = json.loads(json.dumps(strict_json({  # what the images depend on, as samples.json gives it back (inf: null)
        "ckpt": str(cfg.ckpt), "step": module.loaded_step, "weights": cfg.weights,
        "loaded_weights": module.loaded_weights, "lora": cfg.get("lora"), "lora_scale": cfg.get("lora_scale"),
        "num_images": cfg.num_images, "height": size[0] * factor, "width": size[1] * factor,
        "guidance_scale": cfg.guidance_scale, "seed": cfg.seed, "device": device.type, **guidance,
        "sampler": {"solver": sampler.name, "steps": sampler.steps, "spacing": sampler.spacing,
                    "config": OmegaConf.to_container(cfg.sampler, resolve=True)},
        **{k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}})))
    names = [f"{cfg.seed + i:06d}.png" for i in range(cfg.num_images)]
    if earlier:
        recorded = json.loads((out / "samples.json").read_text())
        recorded.pop("complete", None)
        differ = [f"{key}: {_short(old)} -> {_short(new)}" for key, old, new in differences(recorded, meta)]
        if differ or not earlier <= set(names):
            why = "; ".join(differ) or f"images/ holds other images ({min(earlier - set(names))}, ...)"
            raise ValueError(f"out_dir={out} holds {len(earlier)} images of other settings ({why}); give another "
                             f"out_dir, or remove them")
    write_json(out / "samples.json", {**meta, "complete": False})
    todo = [i for i, name in enumerate(names) if name not in earlier]
    batches = range(0, len(todo), cfg.batch_size)
    if cfg.progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"{len(todo)} of {cfg.num_images} images", unit="batch")
    for start in batches:
        idx = todo[start: start + cfg.batch_size]
        with sampling_autocast(device):
            images = module.sample_seeded(idx, inputs, sampler, cfg.guidance_scale, cfg.seed, size, **guidance).cpu()
        for i, image in zip(idx, images):
            save_grid(image[None], out / "images" / names[i], ncol=1, pad=0)
    paths = [out / "images" / name for name in names]
    if cfg.grid_images:
        save_grid(torch.cat([read_image(p) for p in paths[: int(cfg.grid_images)]]), out / "grid.png", ncol=cfg.ncol)
    write_json(out / "samples.json", {**meta, "complete": True})
    return paths


def _short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_image(path: Path) -> torch.Tensor:
    """A PNG written by ``save_grid`` as the (1, C, H, W) tensor in [-1, 1] that writes it again exactly."""
    import numpy as np
    from PIL import Image

    array = np.asarray(Image.open(path))
    array = array[..., None] if array.ndim == 2 else array
    return torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="sample")
def main(cfg: DictConfig) -> None:
    with user_errors_as_one_line():
        generate(cfg)


if __name__ == "__main__":
    main()
