"""Denoising backbones: ``DiT`` (Diffusion Transformer), ``MMDiT`` (SD3-style joint attention over image
and text tokens) and ``UNet`` (ADM-style U-Net)."""

from diffusion_train.models.dit import DIT_SIZES, DiT
from diffusion_train.models.mmdit import MMDiT
from diffusion_train.models.unet import UNet

__all__ = ["DIT_SIZES", "DiT", "MMDiT", "UNet"]
