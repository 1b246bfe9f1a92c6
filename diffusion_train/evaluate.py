"""``diffusion-eval``: metrics of a checkpoint's samples against reference statistics."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from diffusion_train.cli import CONFIG_DIR, check_numbers, user_errors_as_one_line
from diffusion_train.files import write_json
from diffusion_train.metrics.fid import build_extractor, check_reference_images, load_reference
from diffusion_train.metrics.generated import evaluate_generated
from diffusion_train.sample import SAMPLING_NUMBERS, load_for_sampling, sampling_autocast
from diffusion_train.training.images import save_grid


def evaluate(cfg: DictConfig) -> dict:
    """Samples ``num_samples`` images from the checkpoint, writes ``metrics.json`` and ``grid.png`` to
    ``out_dir`` and returns the metrics."""
    check_numbers(cfg, SAMPLING_NUMBERS)  # before the extractor and the reference are loaded
    extractor = build_extractor(cfg.extractor, cfg.extractor_weights, option="extractor_weights")
    mu, sigma, reference = load_reference(cfg.reference, extractor.provenance)
    clip = None
    if cfg.clip:
        from diffusion_train.metrics.clip_score import CLIPScore

        clip = CLIPScore(**OmegaConf.to_container(cfg.clip, resolve=True))
    device, module, sampler, guidance = load_for_sampling(cfg)
    check_reference_images(cfg.reference, reference, module.image_size, module.data_resize)
    with sampling_autocast(device):
        metrics, images = evaluate_generated(
            module, extractor, sampler, int(cfg.num_samples), (mu.to(device), sigma.to(device)),
            batch_size=int(cfg.batch_size), guidance_scale=float(cfg.guidance_scale), seed=int(cfg.seed),
            labels=cfg.labels, prompts=cfg.prompts, guidance=guidance, keep=int(cfg.grid_images), clip=clip)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if images is not None:
        save_grid(images, out / "grid.png", ncol=int(cfg.ncol))
    settings = OmegaConf.to_container(cfg, resolve=True)
    record = {"metrics": metrics, "loaded_weights": module.loaded_weights, "reference": reference,
              "extractor": extractor.provenance, "settings": settings,
              **({"clip": clip.provenance} if clip is not None else {})}
    write_json(out / "metrics.json", record)
    print(json.dumps(metrics))
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    with user_errors_as_one_line():
        evaluate(cfg)


if __name__ == "__main__":
    main()
