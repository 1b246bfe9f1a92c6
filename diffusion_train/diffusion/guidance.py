"""Classifier-free guidance as a denoiser wrapper: one batched forward pass for cond and uncond."""

from __future__ import annotations

import torch
from torch import Tensor

from diffusion_train.conditioning.cond import Cond
from diffusion_train.diffusion.objective import Denoiser


class CFGDenoiser:
    """x0 = x0_uncond + scale * (x0_cond - x0_uncond) (Ho & Salimans 2022).

    Guidance is linear, so combining x0 estimates equals combining eps or v predictions.
    ``scale=1`` is the plain conditional model and skips the unconditional pass.
    """

    def __init__(self, denoiser: Denoiser, uncond: Cond, scale: float):
        self.denoiser, self.uncond, self.scale = denoiser, uncond, float(scale)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return self.denoiser.alpha_sigma(t)

    def timesteps(self, num_steps: int, spacing: str) -> Tensor:
        return self.denoiser.timesteps(num_steps, spacing)

    def __call__(self, x: Tensor, t: Tensor, cond: Cond | None) -> Tensor:
        if self.scale == 1.0 or cond is None:
            return self.denoiser(x, t, cond)
        both = self.denoiser(torch.cat([x, x]), torch.cat([t, t]), Cond.cat([cond, self.uncond]))
        x0_cond, x0_uncond = both.chunk(2)
        return x0_uncond + self.scale * (x0_cond - x0_uncond)
