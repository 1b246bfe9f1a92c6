"""Conditioning: the Cond container, embedders and CFG dropout."""

from diffusion_train.conditioning.cond import Cond
from diffusion_train.conditioning.conditioner import ClassEmbedder, Conditioner

__all__ = ["ClassEmbedder", "Cond", "Conditioner"]
