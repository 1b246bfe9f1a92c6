"""Diffusion math in pure PyTorch: schedules, parameterizations, objectives, samplers, guidance."""

from diffusion_train.diffusion.guidance import CFGDenoiser
from diffusion_train.diffusion.objective import GaussianDiffusion, ModelDenoiser
from diffusion_train.diffusion.samplers import Sampler, ddim, ddpm, per_image_generators, randn
from diffusion_train.diffusion.schedules import (
    CosineSchedule,
    DiscreteSchedule,
    LinearSchedule,
    ScaledLinearSchedule,
)

__all__ = [
    "CFGDenoiser", "CosineSchedule", "DiscreteSchedule", "GaussianDiffusion", "LinearSchedule",
    "ModelDenoiser", "Sampler", "ScaledLinearSchedule", "ddim", "ddpm", "per_image_generators", "randn",
]
