"""A synthetic, class-structured image dataset for tests and benchmarks (no files needed)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion_train.data.base import InMemoryImageDataModule


def make_synthetic(num_samples: int, num_classes: int, channels: int, resolution: int, seed: int,
                   noise: float = 0.1) -> tuple[Tensor, Tensor]:
    """Each class is a fixed smooth random pattern; each image is its class pattern plus noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, channels, 4, 4, generator=g) * 2 - 1
    patterns = F.interpolate(coarse, size=(resolution, resolution), mode="bilinear", align_corners=False)
    labels = torch.randint(0, num_classes, (num_samples,), generator=g)
    x = patterns[labels] + noise * torch.randn(num_samples, channels, resolution, resolution, generator=g)
    images = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images, labels


class SyntheticDataModule(InMemoryImageDataModule):
    def __init__(self, batch_size: int = 16, resolution: int = 16, channels: int = 3, num_classes: int = 4,
                 num_train: int = 256, val_size: int = 32, num_workers: int = 0, seed: int = 0,
                 val_batch_size: int | None = None):
        super().__init__(batch_size, channels, resolution, num_classes, num_workers, seed, val_batch_size)
        self.num_train, self.val_size = num_train, val_size

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x, y = make_synthetic(self.num_train + self.val_size, self.num_classes, self.channels, self.resolution,
                              seed=1234)  # the data is fixed; ``seed`` only orders it
        return x[: self.num_train], y[: self.num_train], x[self.num_train:], y[self.num_train:]
