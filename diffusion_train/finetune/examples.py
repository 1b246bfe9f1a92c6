"""What the fine-tuning scripts share: a run's module and config from its checkpoint, and its first validation
images with the conditioning inputs they carry."""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from diffusion_train.training.build import load_module
from diffusion_train.training.checkpointing import load_checkpoint
from diffusion_train.training.module import DiffusionModule


def load_run(ckpt: str, weights: str, device: torch.device) -> tuple[DiffusionModule, DictConfig]:
    config = OmegaConf.create(load_checkpoint(ckpt)["diffusion_train"]["config"])
    return load_module(ckpt, weights).to(device), config


def validation_examples(module: DiffusionModule, config: DictConfig, num: int,
                        device: torch.device) -> tuple[Tensor, dict]:
    """The first ``num`` validation images of the run's own data (an in-memory dataset) and the conditioning
    inputs (labels, captions) the model takes from them."""
    from hydra.utils import instantiate

    data = instantiate(config.data, _convert_="all")
    data.setup()
    batch = data.val_set[list(range(min(num, len(data.val_set))))]
    keys = {e.input_key for e in module.conditioner.embedders.values()}
    return batch["image"].to(device), {k: batch[k] for k in keys if k in batch}
