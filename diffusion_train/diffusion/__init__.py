"""Diffusion math in pure PyTorch: schedules, parameterizations, objectives, samplers, guidance."""

from diffusion_train.diffusion.guidance import CFGDenoiser
from diffusion_train.diffusion.objective import (
    EDMWeighting,
    GaussianDiffusion,
    LogitNormalTime,
    LogNormalSigma,
    MinSNRWeighting,
    ModelDenoiser,
    ScheduleTime,
    UniformWeighting,
)
from diffusion_train.diffusion.samplers import (
    Sampler,
    ddim,
    ddpm,
    dpmpp_2m,
    dpmpp_2s,
    dpmpp_3m,
    euler,
    euler_ancestral,
    flow_euler,
    flow_heun,
    heun,
    per_image_generators,
    randn,
)
from diffusion_train.diffusion.schedules import (
    CosineSchedule,
    DiscreteSchedule,
    EDMSchedule,
    FlowSchedule,
    LinearSchedule,
    NoiseSchedule,
    ScaledLinearSchedule,
)

__all__ = [
    "CFGDenoiser", "CosineSchedule", "DiscreteSchedule", "EDMSchedule", "EDMWeighting", "FlowSchedule",
    "GaussianDiffusion", "LinearSchedule", "LogNormalSigma", "LogitNormalTime", "MinSNRWeighting",
    "ModelDenoiser", "NoiseSchedule", "Sampler", "ScaledLinearSchedule", "ScheduleTime",
    "UniformWeighting", "ddim", "ddpm", "dpmpp_2m", "dpmpp_2s", "dpmpp_3m", "euler", "euler_ancestral",
    "flow_euler", "flow_heun", "heun", "per_image_generators", "randn",
]
