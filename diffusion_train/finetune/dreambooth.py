"""DreamBooth (Ruiz et al. 2023): a few images of one subject with a prompt holding a rare token ("a photo of sks
dog"), optionally with class-prior preservation: images of the subject's class ("a photo of a dog"), made by the
model itself before training (or given), trained alongside with their own loss weight so that the class keeps
its look.

Each batch holds ``batch_size`` instance images and, with a ``class_prompt``, as many class images:
instance image ``i % n_instance`` and class image ``i % n_class`` for each drawn index ``i``. Per-sample
``loss_weight`` is 1 for instance images and ``prior_loss_weight`` for class images; the training loss is the
batch mean of the weighted per-sample losses.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from diffusion_train.data.base import InMemoryDataModule
from diffusion_train.data.folder import list_images, load_image

log = logging.getLogger("diffusion_train")


def load_folder(root: str | Path, resolution: int, channels: int, key: str = "data.instance_dir") -> Tensor:
    """Every readable image under ``root`` (sorted), centre-cropped to ``resolution``, as uint8 (N, C, H, W); an
    unreadable one is skipped and named in a warning, and none readable is an error."""
    entries = list_images(root) if Path(root).is_dir() else []
    if not entries:
        raise FileNotFoundError(f"{key}: no image in {root}")
    arrays, skipped = [], []
    for image, _ in entries:
        try:
            arrays.append(load_image(Path(root) / image, resolution, channels))
        except Exception as e:  # corrupt files raise a zoo of types (OSError, SyntaxError, ...)
            skipped.append(f"{Path(root) / image} ({type(e).__name__}: {e})")
    if skipped:
        log.warning("%s: skipped %d of %d images that could not be read: %s%s", key, len(skipped), len(entries),
                    "; ".join(skipped[:5]), " ..." if len(skipped) > 5 else "")
    if not arrays:
        raise FileNotFoundError(f"{key}: no readable image in {root}: {len(skipped)} could not be decoded, e.g. "
                                f"{skipped[0]}")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


class DreamBoothBatches(Dataset):
    """``dataset[indices]`` -> instance images (and class images) with their prompts and loss weights."""

    def __init__(self, instance: Tensor, instance_prompt: str, klass: Tensor | None, class_prompt: str | None,
                 prior_loss_weight: float, split: str):
        self.instance, self.klass, self.split = instance, klass, split
        self.instance_prompt, self.class_prompt, self.prior_loss_weight = instance_prompt, class_prompt, prior_loss_weight

    def __len__(self) -> int:
        return max(len(self.instance), len(self.klass) if self.klass is not None else 0)

    def __getitem__(self, indices: list[int]) -> dict:
        inst = [i % len(self.instance) for i in indices]
        images, captions = [self.instance[inst]], [self.instance_prompt] * len(inst)
        weights, keys = [1.0] * len(inst), [f"{self.split}/instance/{i}" for i in inst]
        if self.klass is not None:
            cls = [i % len(self.klass) for i in indices]
            images.append(self.klass[cls])
            captions += [self.class_prompt] * len(cls)
            weights += [self.prior_loss_weight] * len(cls)
            keys += [f"{self.split}/class/{i}" for i in cls]
        image = torch.cat(images).float().div_(127.5).sub_(1.0)
        return {"image": image, "caption": captions, "loss_weight": torch.tensor(weights), "__key__": keys}


class DreamBoothDataModule(InMemoryDataModule):
    """``instance_dir``: the subject's images; ``instance_prompt``: their caption, with the rare token.
    ``class_prompt`` (or null: no prior preservation): the caption of the class images in ``class_dir``; when
    it holds fewer than ``num_class_images``, :meth:`prepare_class_images` makes the rest with the model."""

    # what scripts/precompute.py would lose: a batch pairs subject and class images, with their loss weights
    not_precomputable = ("its batches pair subject and class images with their loss weights, and its class images "
                         "are made by the model itself; encode them in the step (a few images)")

    def __init__(self, instance_dir: str, instance_prompt: str, class_prompt: str | None = None,
                 class_dir: str | None = None, num_class_images: int = 100, prior_loss_weight: float = 1.0,
                 resolution: int = 32, channels: int = 3, batch_size: int = 4, num_workers: int = 0, seed: int = 0,
                 num_classes: int = 0, class_guidance_scale: float = 2.0, class_batch_size: int = 16):
        super().__init__(batch_size, channels, resolution, num_classes, num_workers, seed)
        if class_prompt is not None and not class_dir:
            raise ValueError("data.class_dir: give a folder for the class images of data.class_prompt")
        if prior_loss_weight < 0:
            raise ValueError(f"data.prior_loss_weight must be >= 0, got {prior_loss_weight}")
        self.instance_dir, self.instance_prompt = instance_dir, instance_prompt
        self.class_prompt, self.class_dir = class_prompt, class_dir
        self.num_class_images, self.prior_loss_weight = int(num_class_images), float(prior_loss_weight)
        self.class_guidance_scale, self.class_batch_size = float(class_guidance_scale), int(class_batch_size)
        if self.class_batch_size < 1:
            raise ValueError(f"data.class_batch_size must be >= 1, got {class_batch_size}")

    @property
    def images_per_sample(self) -> int:
        """Each sample trains on its subject image and, with prior preservation, a class image (throughput and
        FLOPs count both)."""
        return 2 if self.class_prompt is not None else 1

    def class_images_missing(self) -> int:
        if self.class_prompt is None:
            return 0
        folder = Path(self.class_dir)
        have = len(list_images(folder)) if folder.is_dir() else 0
        return max(0, self.num_class_images - have)

    def class_images_to_make(self) -> list[int]:
        """The indices of the class images to make: the first :meth:`class_images_missing` whose file
        (``class_<i>.png``) is not there, so images given under other names count and a gap is filled."""
        missing, folder = self.class_images_missing(), Path(self.class_dir or "")
        free = (i for i in range(self.num_class_images + missing) if not (folder / f"class_{i:05d}.png").exists())
        return [next(free) for _ in range(missing)]

    @torch.no_grad()
    def prepare_class_images(self, module, sampler, stop: Callable[[], bool] | None = None) -> int:
        """Makes the missing class images with ``module`` (image i from seed i, the class prompt, guidance
        ``class_guidance_scale``), ``class_batch_size`` at a time, as PNG files in ``class_dir``; returns how many
        it made. ``stop``: asked between batches; when it says yes the work ends there (a later call makes the
        rest)."""
        from diffusion_train.training.images import save_grid

        todo = self.class_images_to_make()
        if not todo:
            return 0
        folder = Path(self.class_dir)
        folder.mkdir(parents=True, exist_ok=True)
        log.info("making %d class images of %r in %s", len(todo), self.class_prompt, folder)
        inputs = module.conditioner.sample_inputs(max(todo) + 1, prompts=[self.class_prompt])
        made = 0
        for first in range(0, len(todo), self.class_batch_size):
            if stop is not None and stop():
                break
            indices = todo[first:first + self.class_batch_size]
            images = module.sample_seeded(indices, inputs, sampler, self.class_guidance_scale)
            for i, image in zip(indices, images):
                save_grid(image[None], folder / f"class_{i:05d}.png", ncol=1, pad=0)
            made += len(indices)
        return made

    def make_sets(self) -> tuple[DreamBoothBatches, DreamBoothBatches]:
        instance = load_folder(self.instance_dir, self.resolution, self.channels)
        klass = None
        if self.class_prompt is not None:
            if self.class_images_missing():
                raise FileNotFoundError(f"data.class_dir: {self.class_dir} holds fewer than {self.num_class_images} "
                                        f"class images; training makes them before it starts")
            klass = load_folder(self.class_dir, self.resolution, self.channels, "data.class_dir")[: self.num_class_images]
        log.info("DreamBooth: %d instance images%s", len(instance),
                 f", {len(klass)} class images (prior loss weight {self.prior_loss_weight})" if klass is not None else "")
        train = DreamBoothBatches(instance, self.instance_prompt, klass, self.class_prompt, self.prior_loss_weight,
                                  "train")
        val = DreamBoothBatches(instance, self.instance_prompt, None, None, 1.0, "val")
        return train, val
