"""The training objective and the matching denoiser of a Gaussian diffusion model.

The knobs are small swappable pieces: a schedule (``schedules``), a prediction type
(``parameterization``), a loss weighting and a training-time distribution (both here).
"""

from __future__ import annotations

import warnings
from typing import Callable, Protocol

import torch
from torch import Tensor

from diffusion_train.conditioning.cond import Cond
from diffusion_train.diffusion import parameterization as param
from diffusion_train.diffusion.schedules import NoiseSchedule


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


# -- loss weightings: each gives the weight on the x0 error, or None for the plain prediction MSE --
class UniformWeighting:
    """The plain MSE of whatever the network predicts."""

    def x0_weight(self, alpha: Tensor, sigma: Tensor) -> Tensor | None:
        return None


class MinSNRWeighting:
    """min(SNR, gamma) on the x0 error (Hang et al. 2023): min(SNR, gamma)/SNR for eps, and
    min(SNR, gamma)/(SNR + 1) for v on a variance-preserving schedule."""

    def __init__(self, gamma: float = 5.0):
        self.gamma = float(gamma)

    def x0_weight(self, alpha: Tensor, sigma: Tensor) -> Tensor:
        return (alpha / sigma).square().clamp(max=self.gamma)


class EDMWeighting:
    """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 on the x0 error (Karras et al. 2022), with
    sigma = sigma/alpha; it makes the EDM network's F-loss unweighted. Computed as 1/sd^2 + (alpha/sigma)^2,
    which stays finite at zero SNR (alpha = 0: a zero-terminal-SNR schedule's last step), where the
    quotient would be inf/inf."""

    def __init__(self, sigma_data: float = 0.5):
        self.sigma_data = float(sigma_data)

    def x0_weight(self, alpha: Tensor, sigma: Tensor) -> Tensor:
        return (alpha / sigma).square() + 1.0 / self.sigma_data**2


# -- training-time distributions ------------------------------------------------------------------
class ScheduleTime:
    """The schedule's own default: uniform integer steps (DDPM), uniform t (flow), log-normal sigma (EDM)."""

    def __call__(self, schedule: NoiseSchedule, n: int, device, generator=None) -> Tensor:
        return schedule.sample_t(n, device, generator)

    def quantile(self, schedule: NoiseSchedule, u: Tensor) -> Tensor:
        """The time below which a fraction ``u`` of the draws fall (every time sampler has one)."""
        return schedule.quantile(u)


class LogitNormalTime:
    """t = sigmoid(N(mean, std)) mapped onto [t_min, t_max] (SD3's logit-normal sampling for flows)."""

    def __init__(self, mean: float = 0.0, std: float = 1.0):
        self.mean, self.std = float(mean), float(std)

    def __call__(self, schedule: NoiseSchedule, n: int, device, generator=None) -> Tensor:
        u = torch.sigmoid(torch.randn(n, device=device, generator=generator) * self.std + self.mean)
        return schedule.t_min + u * (schedule.t_max - schedule.t_min)

    def quantile(self, schedule: NoiseSchedule, u: Tensor) -> Tensor:
        v = torch.sigmoid(torch.special.ndtri(u) * self.std + self.mean)
        return schedule.t_min + v * (schedule.t_max - schedule.t_min)


class LogNormalSigma:
    """sigma/alpha = exp(N(p_mean, p_std)) (EDM), mapped to each schedule's time through its log-SNR."""

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2):
        self.p_mean, self.p_std = float(p_mean), float(p_std)

    def __call__(self, schedule: NoiseSchedule, n: int, device, generator=None) -> Tensor:
        log_sigma = torch.randn(n, device=device, generator=generator) * self.p_std + self.p_mean
        return schedule.t_at(-2 * log_sigma).to(device)

    def quantile(self, schedule: NoiseSchedule, u: Tensor) -> Tensor:
        return schedule.t_at(-2 * (torch.special.ndtri(u) * self.p_std + self.p_mean)).to(u.device)


class Denoiser(Protocol):
    """What every sampler calls: the clean-sample estimate at time ``t``, plus the schedule."""

    schedule: NoiseSchedule

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]: ...

    def __call__(self, x: Tensor, t: Tensor, cond: Cond | None) -> Tensor: ...


def unclipped(denoiser: Denoiser) -> tuple[Callable, Callable]:
    """(the x0 estimate before the denoiser's clipping, the clipping). Denoisers that clip their estimate
    (``clip_x0``) have ``estimate`` and ``clip`` methods; for the others the clipping is the identity.
    Guidance combines unclipped estimates and clips the result once: clipping each estimate first would
    leave the guided one outside [-1, 1]."""
    if hasattr(denoiser, "estimate"):
        return denoiser.estimate, denoiser.clip
    return denoiser, lambda x0: x0


class ModelDenoiser:
    """Wraps a backbone ``net(x, model_time, cond)`` and converts its prediction to x0."""

    def __init__(self, net: Callable, schedule: NoiseSchedule, prediction: str, clip_x0: bool = False,
                 sigma_data: float = 0.5):
        self.net, self.schedule, self.prediction, self.clip_x0 = net, schedule, prediction, clip_x0
        self.sigma_data = sigma_data

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return self.schedule.alpha_sigma(t)

    def timesteps(self, num_steps: int, spacing: str) -> Tensor:
        return self.schedule.timesteps(num_steps, spacing)

    def __call__(self, x: Tensor, t: Tensor, cond: Cond | None) -> Tensor:
        return self.clip(self.estimate(x, t, cond))

    def estimate(self, x: Tensor, t: Tensor, cond: Cond | None) -> Tensor:
        """The network's x0 estimate before ``clip_x0``: guidance combines these, then clips once."""
        t = t.to(x.device).expand(x.shape[0]) if t.ndim == 0 else t.to(x.device)
        alpha, sigma = self.alpha_sigma(t)
        alpha, sigma, x = _bcast(alpha, x).float(), _bcast(sigma, x).float(), x.float()
        inp = param.net_input(self.prediction, x, alpha, sigma, self.sigma_data)
        out = self.net(inp, self.schedule.model_time(t).float(), cond).float()
        return param.to_x0(self.prediction, out, x, alpha, sigma, self.sigma_data)

    def clip(self, x0: Tensor) -> Tensor:
        """``x0`` clamped to [-1, 1] with ``clip_x0`` (pixel space), else as it is."""
        return x0.clamp(-1, 1) if self.clip_x0 else x0


class GaussianDiffusion:
    """Sampling t, noising, the prediction target and the loss weighting.

    Args:
        schedule: a :class:`~diffusion_train.diffusion.schedules.NoiseSchedule`.
        prediction: ``eps``, ``x0``, ``v``, ``flow`` or ``edm`` (see ``parameterization``).
        weighting: :class:`UniformWeighting` (default), :class:`MinSNRWeighting` or :class:`EDMWeighting`.
        time_sampler: :class:`ScheduleTime` (default), :class:`LogitNormalTime` or :class:`LogNormalSigma`.
        clip_x0: clamp the denoised estimate to [-1, 1] when sampling (pixel space).
        sigma_data: the data standard deviation assumed by ``edm`` preconditioning. A schedule's or, with
            ``edm``, a weighting's own ``sigma_data`` must equal it.
    """

    def __init__(self, schedule: NoiseSchedule, prediction: str = "eps", weighting=None, time_sampler=None,
                 clip_x0: bool = False, sigma_data: float = 0.5):
        param.check(prediction)
        alpha_end = float(schedule.alpha_sigma(torch.tensor([float(schedule.t_max)]))[0])
        if prediction in ("eps", "edm") and alpha_end == 0.0:
            raise ValueError(f"{type(schedule).__name__} reaches alpha = 0 at t = {schedule.t_max:g}, where {prediction} "
                             f"prediction cannot give x0 (it divides by alpha); use prediction v, x0 or flow")
        parts = [("schedule", schedule)] + ([("weighting", weighting)] if prediction == "edm" else [])
        for name, part in parts:
            own = getattr(part, "sigma_data", None)
            if own is not None and float(own) != float(sigma_data):
                raise ValueError(f"diffusion.{name}.sigma_data={own} differs from diffusion.sigma_data={sigma_data}, "
                                 "the one EDM's preconditioning uses: set them equal")
        self.schedule, self.prediction, self.clip_x0, self.sigma_data = schedule, prediction, clip_x0, sigma_data
        self.weighting = weighting if weighting is not None else UniformWeighting()
        self.time_sampler = time_sampler if time_sampler is not None else ScheduleTime()
        if alpha_end == 0.0 and float(self.loss_weight(torch.tensor([float(schedule.t_max)]))[0]) == 0.0:
            warnings.warn(f"diffusion.weighting ({type(self.weighting).__name__}) gives the zero-SNR step "
                          f"t = {schedule.t_max:g} weight 0: the prediction sampling starts from is never trained; "
                          "with a zero-terminal-SNR schedule, use UniformWeighting", stacklevel=2)

    def sample_t(self, n: int, device, generator: torch.Generator | None = None) -> Tensor:
        return self.time_sampler(self.schedule, n, device, generator)

    def validation_t(self, n: int, device) -> Tensor:
        """``n`` times stratified under the training distribution: its quantiles at (i + 0.5) / n, so that a
        validation batch weighs the noise levels as training draws them (EDM's log-normal sigma, SD3's
        logit-normal t) and gives the same times at every evaluation."""
        return self.time_sampler.quantile(self.schedule, (torch.arange(n, device=device) + 0.5) / n)

    def loss_weight(self, t: Tensor) -> Tensor:
        """Per-sample weight on the MSE of the configured prediction."""
        return self._weight(*self.schedule.alpha_sigma(t))

    def _weight(self, alpha: Tensor, sigma: Tensor) -> Tensor:
        w = self.weighting.x0_weight(alpha.double(), sigma.double())
        if w is None:
            return torch.ones(alpha.shape, device=alpha.device)
        k = param.x0_mse_factor(self.prediction, alpha.double(), sigma.double(), self.sigma_data)
        return (w / k).float()

    def loss(self, net: Callable, x0: Tensor, cond: Cond | None, generator: torch.Generator | None = None,
             t: Tensor | None = None, noise: Tensor | None = None) -> Tensor:
        """Per-sample weighted MSE, shape (B,). ``t`` and ``noise`` may be given for fixed evaluation."""
        if t is None:
            t = self.sample_t(x0.shape[0], x0.device, generator)
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        a, s = self.schedule.alpha_sigma(t)
        alpha, sigma = _bcast(a, x0), _bcast(s, x0)
        x_t = alpha * x0 + sigma * noise
        inp = param.net_input(self.prediction, x_t, alpha, sigma, self.sigma_data)
        out = net(inp, self.schedule.model_time(t.float()), cond)
        tgt = param.target(self.prediction, x0, noise, alpha, sigma, self.sigma_data)
        mse = (out.float() - tgt.float()).square().flatten(1).mean(1)
        return mse * self._weight(a, s)

    def denoiser(self, net: Callable) -> ModelDenoiser:
        return ModelDenoiser(net, self.schedule, self.prediction, self.clip_x0, self.sigma_data)
