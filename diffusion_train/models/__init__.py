"""Denoising backbones: ``DiT`` (Diffusion Transformer) and ``UNet`` (ADM-style U-Net)."""

from diffusion_train.models.dit import DIT_SIZES, DiT
from diffusion_train.models.unet import UNet

__all__ = ["DIT_SIZES", "DiT", "UNet"]
