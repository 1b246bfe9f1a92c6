"""The training objective and the matching denoiser of a Gaussian diffusion model."""

from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import Tensor

from diffusion_train.conditioning.cond import Cond
from diffusion_train.diffusion import parameterization as param
from diffusion_train.diffusion.schedules import DiscreteSchedule


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


class Denoiser(Protocol):
    """What every sampler calls: the clean-sample estimate at timestep ``t``.

    ``alpha_sigma(t)`` gives the schedule, ``timesteps(n, spacing)`` the sampling grid.
    """

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]: ...

    def __call__(self, x: Tensor, t: Tensor, cond: Cond | None) -> Tensor: ...


class ModelDenoiser:
    """Wraps a backbone ``net(x, t, cond)`` and converts its prediction to x0."""

    def __init__(self, net: Callable, schedule: DiscreteSchedule, prediction: str, clip_x0: bool = False):
        self.net, self.schedule, self.prediction, self.clip_x0 = net, schedule, prediction, clip_x0

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return self.schedule.alpha_sigma(t)

    def timesteps(self, num_steps: int, spacing: str) -> Tensor:
        return self.schedule.timesteps(num_steps, spacing)

    def __call__(self, x: Tensor, t: Tensor, cond: Cond | None) -> Tensor:
        t = t.to(x.device).expand(x.shape[0]) if t.ndim == 0 else t.to(x.device)
        alpha, sigma = self.alpha_sigma(t)
        out = self.net(x, t, cond).float()
        x0 = param.to_x0(self.prediction, out, x.float(), _bcast(alpha, out), _bcast(sigma, out))
        return x0.clamp(-1, 1) if self.clip_x0 else x0


class GaussianDiffusion:
    """Discrete-time Gaussian diffusion (DDPM family): sampling t, noising, target and weighting.

    Args:
        schedule: a :class:`DiscreteSchedule` (linear, scaled-linear, cosine).
        prediction: what the network predicts: ``eps``, ``x0`` or ``v``.
        min_snr_gamma: if set, weight each sample's MSE by min(SNR, gamma) relative to the
            prediction's natural weighting (Hang et al. 2023); ``None`` gives the plain MSE.
        clip_x0: clamp the denoised estimate to [-1, 1] when sampling (pixel-space data).
    """

    def __init__(self, schedule: DiscreteSchedule, prediction: str = "eps",
                 min_snr_gamma: float | None = None, clip_x0: bool = False):
        param._check(prediction)
        self.schedule, self.prediction = schedule, prediction
        self.min_snr_gamma, self.clip_x0 = min_snr_gamma, clip_x0

    def sample_t(self, n: int, device, generator: torch.Generator | None = None) -> Tensor:
        return torch.randint(0, self.schedule.num_timesteps, (n,), device=device, generator=generator)

    def loss_weight(self, t: Tensor) -> Tensor:
        """Per-sample weight on the MSE of the configured prediction."""
        if self.min_snr_gamma is None:
            return torch.ones(t.shape, device=t.device)
        snr = self.schedule.log_snr(t).exp()
        clipped = snr.clamp(max=self.min_snr_gamma)
        # min(SNR, gamma) is the weight on the x0-MSE; eps- and v-MSE equal x0-MSE times SNR and SNR+1.
        return {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}[self.prediction]

    def loss(self, net: Callable, x0: Tensor, cond: Cond | None, generator: torch.Generator | None = None,
             t: Tensor | None = None, noise: Tensor | None = None) -> Tensor:
        """Per-sample weighted MSE, shape (B,). ``t`` and ``noise`` may be given for fixed evaluation."""
        b = x0.shape[0]
        if t is None:
            t = self.sample_t(b, x0.device, generator)
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        alpha, sigma = self.schedule.alpha_sigma(t)
        alpha, sigma = _bcast(alpha, x0), _bcast(sigma, x0)
        x_t = alpha * x0 + sigma * noise
        out = net(x_t, t.to(torch.float32), cond)
        tgt = param.target(self.prediction, x0, noise, alpha, sigma)
        mse = (out.float() - tgt.float()).square().flatten(1).mean(1)
        return mse * self.loss_weight(t)

    def denoiser(self, net: Callable) -> ModelDenoiser:
        return ModelDenoiser(net, self.schedule, self.prediction, self.clip_x0)
