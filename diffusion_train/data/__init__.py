"""Data modules and dataset sources. Batches are dicts: image (or a precomputed latent), label, caption,
__key__ (see base.ImageBatches and precomputed.PrecomputedBatches)."""

from diffusion_train.data.base import ImageBatches, InMemoryDataModule, InMemoryImageDataModule
from diffusion_train.data.fashion_mnist import FashionMNISTDataModule
from diffusion_train.data.folder import ImageFolderDataModule
from diffusion_train.data.precomputed import PrecomputedDataModule
from diffusion_train.data.synthetic import SyntheticDataModule
from diffusion_train.data.web import WebDataModule

__all__ = ["FashionMNISTDataModule", "ImageBatches", "ImageFolderDataModule", "InMemoryDataModule",
           "InMemoryImageDataModule", "PrecomputedDataModule", "SyntheticDataModule", "WebDataModule"]
