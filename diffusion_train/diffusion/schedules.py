"""Noise schedules: x_t = alpha(t) * x0 + sigma(t) * eps.

Discrete DDPM schedules have ``num_timesteps`` integer steps t = 0 .. T-1 with
alpha_bar(t) = prod_{s<=t} (1 - beta_s); alpha(t) = sqrt(alpha_bar), sigma(t) = sqrt(1 - alpha_bar).
``alpha_sigma`` also accepts fractional t (log alpha_bar is interpolated linearly), so samplers
may use any timestep on the continuous line [0, T-1].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class DiscreteSchedule:
    """A variance-preserving schedule defined by its betas (float64 internally)."""

    def __init__(self, betas: Tensor):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("schedule betas must be a 1-D tensor with values in (0, 1)")
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self._log_ac = {torch.device("cpu"): self.alphas_cumprod.log()}

    @property
    def num_timesteps(self) -> int:
        return self.betas.numel()

    def alpha_bar(self, t: Tensor) -> Tensor:
        """alpha_bar at (possibly fractional) timesteps ``t``, float32 on t's device."""
        t = torch.as_tensor(t)
        tf = t.to(torch.float64).clamp(0, self.num_timesteps - 1)
        lo = tf.floor().long()
        hi = (lo + 1).clamp(max=self.num_timesteps - 1)
        w = tf - lo
        if t.device not in self._log_ac:  # one copy per device, not one per call
            self._log_ac[t.device] = self._log_ac[torch.device("cpu")].to(t.device)
        log_ac = self._log_ac[t.device]
        return torch.exp(torch.lerp(log_ac[lo], log_ac[hi], w)).to(torch.float32)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        ab = self.alpha_bar(t)
        return ab.sqrt(), (1 - ab).sqrt()

    def log_snr(self, t: Tensor) -> Tensor:
        ab = self.alpha_bar(t).double()
        return (ab / (1 - ab)).log().float()

    def timesteps(self, num_steps: int, spacing: str = "leading") -> Tensor:
        """Descending sampling timesteps (float32) for ``num_steps`` model evaluations.

        leading:  0, k, 2k, ... with k = T // num_steps (DDIM paper).
        trailing: T-1, T-1-k, ... (reaches the noisiest step; recommended by Lin et al. 2024).
        linspace: evenly spaced from T-1 to 0, rounded.
        """
        T = self.num_timesteps
        if not 1 <= num_steps <= T:
            raise ValueError(f"sampler steps must be in [1, {T}], got {num_steps}")
        if spacing == "leading":
            k = T // num_steps
            ts = torch.arange(0, num_steps) * k
        elif spacing == "trailing":
            ts = torch.round(T - torch.arange(num_steps, dtype=torch.float64) * (T / num_steps)).long() - 1
        elif spacing == "linspace":
            ts = torch.linspace(0, T - 1, num_steps).round().long()
        else:
            raise ValueError(f"unknown timestep spacing {spacing!r}; valid: leading, trailing, linspace")
        return ts.sort(descending=True).values.to(torch.float32)


class LinearSchedule(DiscreteSchedule):
    """DDPM (Ho et al. 2020): betas linear in [beta_start, beta_end]."""

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        super().__init__(torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64))


class ScaledLinearSchedule(DiscreteSchedule):
    """Stable Diffusion: sqrt(beta) linear in [sqrt(beta_start), sqrt(beta_end)]."""

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012):
        root = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64)
        super().__init__(root**2)


class CosineSchedule(DiscreteSchedule):
    """Improved DDPM (Nichol & Dhariwal 2021): alpha_bar(t) = cos^2(((t/T + s)/(1 + s)) * pi/2)."""

    def __init__(self, num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999):
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
        super().__init__(betas)
