"""Precompute autoencoder latents and text encodings for a dataset (see conf/precompute.yaml).

    python scripts/precompute.py out=DIR data=... autoencoder=... conditioning=...

Then train on them with ``data=precomputed data.path=DIR`` and the same autoencoder / conditioning.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from diffusion_train.cli import CONFIG_DIR, resolve_device, user_errors_as_one_line
from diffusion_train.data.precompute_writer import write_precomputed
from diffusion_train.train import quiet_known_warnings
from diffusion_train.training.build import build_module
from diffusion_train.training.pretrained import load_pretrained

log = logging.getLogger("diffusion_train.precompute")


def precompute(cfg: DictConfig) -> dict:
    quiet_known_warnings()
    device = resolve_device(cfg.device)
    L.seed_everything(cfg.seed, verbose=False)  # as training does: random-init encoders come out the same
    datamodule = instantiate(cfg.data, _convert_="all")
    module = build_module(cfg)  # the autoencoder and conditioner exactly as training builds them
    init = cfg.get("init") or {}
    if init.get("path"):  # and with the weights a fresh run starts from (random encoders' too)
        load_pretrained(module, init.path, str(init.get("weights") or "ema"), strict=bool(init.get("strict", True)))
    autoencoder, conditioner = module.autoencoder.to(device), module.conditioner.to(device)
    manifest = write_precomputed(cfg.out, datamodule, autoencoder, conditioner, splits=list(cfg.splits),
                                 batch_size=int(cfg.batch_size), dtype=str(cfg.dtype), device=device,
                                 progress=bool(cfg.progress), limit=cfg.limit, task=module.task)
    counts = ", ".join(f"{s}: {v['count']}" for s, v in manifest["splits"].items())
    print(f"wrote {Path(cfg.out)} ({counts}; latents {manifest['splits'][next(iter(manifest['splits']))]['latent_shape']} "
          f"{manifest['dtype']}); train on it with: data=precomputed data.path={cfg.out}")
    return manifest


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="precompute")
def main(cfg: DictConfig) -> None:
    with user_errors_as_one_line():
        precompute(cfg)


if __name__ == "__main__":
    main()
