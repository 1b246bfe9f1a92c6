"""In-memory image data modules: uint8 tensors in RAM, batches gathered by index in one call."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from diffusion_train.data.samplers import FixedBatches, InfiniteBatchSampler, fixed_batches, ignore_preemption_signals


class ImageBatches(Dataset):
    """``dataset[list_of_indices]`` -> a batch dict with the documented keys.

    image: (B, C, H, W) float32 in [-1, 1]; label: (B,) int64; __key__: list of "<split>/<index>", the index
    in the source split (``ids[i]`` when a subset is held, else ``i``); caption: list of str when ``captions``
    ((source index, label) -> caption) is given.
    """

    def __init__(self, images: Tensor, labels: Tensor, split: str, captions=None, ids: Tensor | None = None):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"{split} images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images, self.labels, self.split, self.captions = images, labels.long(), split, captions
        self.ids = ids.tolist() if ids is not None else None

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, indices: list[int]) -> dict:
        idx = torch.as_tensor(indices, dtype=torch.long)
        image = self.images[idx].float().div_(127.5).sub_(1.0)
        source = indices if self.ids is None else [self.ids[i] for i in indices]
        batch = {"image": image, "label": self.labels[idx], "__key__": [f"{self.split}/{i}" for i in source]}
        if self.captions is not None:
            batch["caption"] = [self.captions(s, int(self.labels[i])) for s, i in zip(source, indices)]
        return batch


class InMemoryDataModule(L.LightningDataModule):
    """Base class for datasets held in RAM: subclasses implement :meth:`make_sets` returning train and
    val datasets indexed by a list of indices (``dataset[[i, j, ...]] -> batch dict``).

    Training reads an endless, seeded stream (see :class:`InfiniteBatchSampler`) that resumes at
    the batch the restored optimizer step implies; validation is a fixed set of batches (see :func:`fixed_batches`).
    """

    def __init__(self, batch_size: int, channels: int, resolution: int, num_classes: int,
                 num_workers: int = 0, seed: int = 0, val_batch_size: int | None = None):
        super().__init__()
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.channels, self.resolution, self.num_classes = channels, resolution, num_classes
        self.val_batch_size = val_batch_size or batch_size
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def make_sets(self) -> tuple[Dataset, Dataset]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set, self.val_set = self.make_sets()

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_sampler(self, start_batch: int = 0) -> InfiniteBatchSampler:
        rank, world = self._rank_world()
        return InfiniteBatchSampler(len(self.train_set), self.batch_size, self.seed, rank, world, start_batch)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        start = 0
        if self.trainer is not None:  # resume: the stream continues after the batches already used
            accumulate = getattr(self.trainer.lightning_module, "accumulate_grad_batches", 1)
            start = self.trainer.global_step * accumulate
        return self._loader(self.train_set, self.train_sampler(start))

    def val_dataloader(self) -> DataLoader:
        self.setup()
        rank, world = self._rank_world()
        return self._loader(FixedBatches(self.val_set), fixed_batches(len(self.val_set), self.val_batch_size, rank, world))

    def _loader(self, dataset: Dataset, batches) -> DataLoader:
        return DataLoader(dataset, sampler=batches, batch_size=None, num_workers=self.num_workers,
                          pin_memory=torch.cuda.is_available(), persistent_workers=self.num_workers > 0,
                          worker_init_fn=ignore_preemption_signals)


class InMemoryImageDataModule(InMemoryDataModule):
    """Base class for image datasets: subclasses implement :meth:`load` returning uint8 train/val
    images and labels, and :meth:`captioner` when they have captions."""

    subset_ids: tuple[Tensor, Tensor] | None = None  # source indices of the held train / val images, when a subset

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def captioner(self, split: str):
        """``(index within split, label) -> caption`` for datasets with captions, else None."""
        return None

    def make_sets(self) -> tuple[ImageBatches, ImageBatches]:
        tr_x, tr_y, va_x, va_y = self.load()
        expected = (self.channels, self.resolution, self.resolution)
        if tuple(tr_x.shape[1:]) != expected:
            raise ValueError(f"{type(self).__name__}: images are {tuple(tr_x.shape[1:])}, config says "
                             f"channels={self.channels}, resolution={self.resolution}")
        ids = self.subset_ids or (None, None)
        return (ImageBatches(tr_x, tr_y, "train", self.captioner("train"), ids[0]),
                ImageBatches(va_x, va_y, "val", self.captioner("val"), ids[1]))
