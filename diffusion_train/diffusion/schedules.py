"""Noise schedules, all in one continuous-time view: x_t = alpha(t) * x0 + sigma(t) * eps.

Each schedule has its own time coordinate ``t`` (sampling runs from ``t_max`` down to ``t_min``) and
gives alpha(t), sigma(t), the log signal-to-noise ratio lambda(t) = log(alpha^2 / sigma^2), the inverse
``t_at(lambda)``, the time value the network sees (``model_time``), sampling grids and the default
training-time distribution.

- :class:`DiscreteSchedule` (linear, scaled-linear, cosine): the 1000-step DDPM family; t in [0, T-1]
  (fractional t interpolates the log-SNR), optionally rescaled to zero terminal SNR.
- :class:`EDMSchedule`: Karras et al. (2022) noise levels; t = sigma, alpha = 1.
- :class:`FlowSchedule`: rectified flow / flow matching; alpha = 1 - t, sigma = t, t in [0, 1].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SPACINGS = ("auto", "leading", "trailing", "linspace", "karras")


def _check_steps(num_steps: int, limit: int | None = None) -> None:
    if num_steps < 1 or (limit is not None and num_steps > limit):
        raise ValueError(f"sampler steps must be in [1, {limit or 'inf'}], got {num_steps}")


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Descending sigma_max .. sigma_min, evenly spaced in sigma^(1/rho) (Karras et al. 2022, eq. 5)."""
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


class NoiseSchedule:
    """The interface every schedule implements (see the module docstring)."""

    t_min: float
    t_max: float
    default_spacing: str = "linspace"  # what ``timesteps(n, "auto")`` uses

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def log_snr(self, t: Tensor) -> Tensor:
        alpha, sigma = self.alpha_sigma(torch.as_tensor(t))
        return 2 * (alpha.double().log() - sigma.double().log()).float()

    def t_at(self, log_snr: Tensor) -> Tensor:
        """The time whose log-SNR is ``log_snr`` (clamped to the schedule's range)."""
        raise NotImplementedError

    def model_time(self, t: Tensor) -> Tensor:
        """What the network's timestep embedding receives (on the 0..1000 scale of DDPM indices)."""
        return t

    def sample_t(self, n: int, device, generator: torch.Generator | None = None) -> Tensor:
        """Training times under the schedule's own default distribution: uniform in t, on the open interval
        (t_min, t_max). ``torch.rand`` can give exactly 0, and t_min may have no noise (a flow's t = 0), where
        EDM's preconditioning and weighting divide by sigma."""
        return self.quantile(torch.rand(n, device=device, generator=generator).clamp(min=2.0**-25))

    def quantile(self, u: Tensor) -> Tensor:
        """The time below which a fraction ``u`` (in (0, 1)) of ``sample_t``'s draws fall."""
        return self.t_min + u * (self.t_max - self.t_min)

    def timesteps(self, num_steps: int, spacing: str = "auto") -> Tensor:
        """Descending sampling times for ``num_steps`` model evaluations."""
        raise NotImplementedError

    def ve_sigma_range(self) -> tuple[float, float]:
        """(sigma/alpha at t_min, at t_max): the range Karras spacing interpolates."""
        a, s = self.alpha_sigma(torch.tensor([self.t_min, self.t_max], dtype=torch.float32))
        ve = (s.double() / a.double()).tolist()
        return ve[0], ve[1]

    def _karras(self, num_steps: int, rho: float = 7.0) -> Tensor:
        lo, hi = self.ve_sigma_range()
        sig = karras_sigmas(num_steps, lo, hi, rho)
        return self.t_at((-2 * sig.log()).float())


class DiscreteSchedule(NoiseSchedule):
    """A variance-preserving schedule defined by its betas (float64 internally).

    alpha_bar(t) = prod_{s<=t} (1 - beta_s); alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar).
    ``rescale_zero_terminal_snr`` shifts and scales sqrt(alpha_bar) so that the last step has
    alpha = 0 exactly (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed");
    such a schedule needs a v, x0 or flow prediction (eps cannot be converted where alpha = 0).
    """

    def __init__(self, betas: Tensor, rescale_zero_terminal_snr: bool = False):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("schedule betas must be a 1-D tensor with values in (0, 1)")
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        if rescale_zero_terminal_snr:
            root = alphas_cumprod.sqrt()
            first, last = root[0].clone(), root[-1].clone()
            root = (root - last) * first / (first - last)
            alphas_cumprod = root**2
            betas = 1 - alphas_cumprod / torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        self.betas, self.alphas_cumprod = betas, alphas_cumprod
        self.zero_terminal_snr = rescale_zero_terminal_snr
        if rescale_zero_terminal_snr:  # the grid starts at the step with alpha = 0, as Lin et al. sample
            self.default_spacing = "trailing"
        self.t_min, self.t_max = 0.0, float(len(betas) - 1)
        self._tables: dict[torch.device, tuple[Tensor, Tensor]] = {}

    @property
    def num_timesteps(self) -> int:
        return self.betas.numel()

    def _table(self, device) -> tuple[Tensor, Tensor]:
        """(sqrt alpha_bar, sqrt(1 - alpha_bar)) in float64 on ``device``: one copy per device."""
        device = torch.device(device)
        if device not in self._tables:
            ac = self.alphas_cumprod
            self._tables[device] = (ac.sqrt().to(device), (1 - ac).sqrt().to(device))
        return self._tables[device]

    def alpha_bar(self, t: Tensor) -> Tensor:
        alpha, _ = self.alpha_sigma(t)
        return alpha.square()

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Exact table values at integer t; between integers alpha and sigma follow the
        log-SNR, interpolated linearly, so the map stays variance preserving and invertible."""
        t = torch.as_tensor(t)
        tf = t.to(torch.float64).clamp(0, self.num_timesteps - 1)
        lo = tf.floor().long()
        hi = (lo + 1).clamp(max=self.num_timesteps - 1)
        w = tf - lo
        a_tab, s_tab = self._table(t.device)
        frac = w > 0  # both branches are computed: a test of any(frac) would make the host wait for the device
        lam_hi = self._lam(a_tab[hi], s_tab[hi])
        lam = torch.lerp(self._lam(a_tab[lo], s_tab[lo]), lam_hi.clamp(min=-1e30), w)
        alpha, sigma = torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()
        # Towards a zero-SNR end (lambda = -inf) the log-SNR cannot be interpolated: use alpha instead.
        a_lin = torch.lerp(a_tab[lo], a_tab[hi], w)
        to_zero = torch.isinf(lam_hi)
        alpha = torch.where(to_zero, a_lin, alpha)
        sigma = torch.where(to_zero, (1 - a_lin.square()).sqrt(), sigma)
        return torch.where(frac, alpha, a_tab[lo]).float(), torch.where(frac, sigma, s_tab[lo]).float()

    @staticmethod
    def _lam(alpha: Tensor, sigma: Tensor) -> Tensor:
        return 2 * (alpha.log() - sigma.log())

    def t_at(self, log_snr: Tensor) -> Tensor:
        a_tab, s_tab = self._table(torch.as_tensor(log_snr).device)
        lam_tab = self._lam(a_tab, s_tab)  # decreasing in t; -inf at a zero-SNR end
        lam = torch.as_tensor(log_snr, dtype=torch.float64, device=lam_tab.device)
        # searchsorted needs increasing values: flip the table.
        inc = lam_tab.flip(0)
        idx = torch.searchsorted(inc, lam.clamp(inc[0].clamp(min=-1e30), inc[-1]).contiguous())
        idx = idx.clamp(1, len(inc) - 1)
        lo_v, hi_v = inc[idx - 1], inc[idx]
        w = ((lam - lo_v) / (hi_v - lo_v)).nan_to_num(0.0).clamp(0, 1)
        # Next to a zero-SNR end alpha_sigma interpolates alpha linearly from 0: invert that instead.
        w_zero = (torch.sigmoid(lam) / torch.sigmoid(hi_v)).sqrt().clamp(0, 1)
        w = torch.where(torch.isinf(lo_v), w_zero, w)
        pos = idx - 1 + w  # position in the flipped table
        return (self.num_timesteps - 1 - pos).float()

    def sample_t(self, n: int, device, generator: torch.Generator | None = None) -> Tensor:
        return torch.randint(0, self.num_timesteps, (n,), device=device, generator=generator).float()

    def quantile(self, u: Tensor) -> Tensor:
        """Integer steps, uniform over 0 .. T-1 as ``sample_t`` draws them (rounded from t_min .. t_max, the
        validation times of earlier versions, so that a run's ``val/loss`` goes on comparably)."""
        return super().quantile(u).round()

    default_spacing = "leading"

    def timesteps(self, num_steps: int, spacing: str = "auto") -> Tensor:
        """auto: leading (trailing with zero terminal SNR); leading: 0, k, 2k, ... (k = T / num_steps, DDIM
        paper; rounded down, so a step count that does not divide T still starts near T, not at num_steps - 1 as
        an integer stride of 1 would); trailing: T-1, T-1-T/n, ... (reaches the noisiest step; Lin et al. 2024);
        linspace: T-1 .. 0 rounded; karras: Karras rho=7 spacing of sigma/alpha between the schedule's extremes
        (fractional t)."""
        T = self.num_timesteps
        _check_steps(num_steps, T)
        spacing = self.default_spacing if spacing == "auto" else spacing
        if spacing == "leading":
            ts = (torch.arange(num_steps, dtype=torch.float64) * (T / num_steps)).floor().long()
        elif spacing == "trailing":
            ts = torch.round(T - torch.arange(num_steps, dtype=torch.float64) * (T / num_steps)).long() - 1
        elif spacing == "linspace":  # in float64 as numpy (diffusers) computes it: a float32 499.49999 is 499.5
            ts = torch.arange(num_steps, dtype=torch.float64) * ((T - 1) / max(num_steps - 1, 1))
            ts[-1] = T - 1 if num_steps > 1 else 0
            ts = ts.round().long()
        elif spacing == "karras":
            if self.zero_terminal_snr:
                raise ValueError("karras spacing needs a finite sigma/alpha; this schedule has zero terminal SNR")
            return self._karras(num_steps).sort(descending=True).values
        else:
            raise ValueError(f"unknown timestep spacing {spacing!r}; valid: {', '.join(SPACINGS)}")
        return ts.sort(descending=True).values.to(torch.float32)


class LinearSchedule(DiscreteSchedule):
    """DDPM (Ho et al. 2020): betas linear in [beta_start, beta_end]."""

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 rescale_zero_terminal_snr: bool = False):
        super().__init__(torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64),
                         rescale_zero_terminal_snr)


class ScaledLinearSchedule(DiscreteSchedule):
    """Stable Diffusion: sqrt(beta) linear in [sqrt(beta_start), sqrt(beta_end)]."""

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 rescale_zero_terminal_snr: bool = False):
        root = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64)
        super().__init__(root**2, rescale_zero_terminal_snr)


class CosineSchedule(DiscreteSchedule):
    """Improved DDPM (Nichol & Dhariwal 2021): alpha_bar(t) = cos^2(((t/T + s)/(1 + s)) * pi/2)."""

    def __init__(self, num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999,
                 rescale_zero_terminal_snr: bool = False):
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
        super().__init__(betas, rescale_zero_terminal_snr)


class EDMSchedule(NoiseSchedule):
    """Karras et al. (2022): x = x0 + sigma * eps (alpha = 1), t = sigma in [sigma_min, sigma_max].

    The network sees c_noise = log(sigma) / 4 (scaled by 1000 to the DDPM embedding range). The
    preconditioning's ``sigma_data`` is ``GaussianDiffusion``'s; one given here (as older configs do) must
    equal it.
    """

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float | None = None,
                 rho: float = 7.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"EDM needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max, self.sigma_data, self.rho = sigma_min, sigma_max, sigma_data, rho
        self.t_min, self.t_max = sigma_min, sigma_max

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = torch.as_tensor(t, dtype=torch.float32)
        return torch.ones_like(t), t

    def t_at(self, log_snr: Tensor) -> Tensor:
        return torch.exp(-torch.as_tensor(log_snr, dtype=torch.float32) / 2).clamp(self.sigma_min, self.sigma_max)

    def model_time(self, t: Tensor) -> Tensor:
        return 250.0 * t.log()  # 1000 * c_noise, c_noise = ln(sigma) / 4

    def sample_t(self, n: int, device, generator: torch.Generator | None = None) -> Tensor:
        """Log-normal sigma with the EDM defaults (P_mean = -1.2, P_std = 1.2)."""
        return (torch.randn(n, device=device, generator=generator) * self.P_STD + self.P_MEAN).exp()

    def quantile(self, u: Tensor) -> Tensor:
        return (torch.special.ndtri(u) * self.P_STD + self.P_MEAN).exp()

    default_spacing = "karras"
    P_MEAN, P_STD = -1.2, 1.2  # ln(sigma) ~ N(P_MEAN, P_STD^2) in training (Karras et al. 2022)

    def timesteps(self, num_steps: int, spacing: str = "auto") -> Tensor:
        """auto, karras: Karras rho spacing of sigma; linspace: even in sigma."""
        _check_steps(num_steps)
        if spacing in ("auto", "karras"):
            return karras_sigmas(num_steps, self.sigma_min, self.sigma_max, self.rho).float()
        if spacing == "linspace":
            return torch.linspace(self.sigma_max, self.sigma_min, num_steps)
        raise ValueError(f"EDM schedule spacing must be auto, karras or linspace, got {spacing!r}")


class FlowSchedule(NoiseSchedule):
    """Rectified flow / flow matching (Liu et al. 2022; Lipman et al. 2022; SD3): alpha = 1 - t,
    sigma = t, t in [0, 1]; t = 1 is pure noise. The network sees 1000 * t.

    ``shift`` (SD3's timestep shift, 1 = none) warps sampling grids towards high noise:
    t' = shift * t / (1 + (shift - 1) * t).
    """

    def __init__(self, shift: float = 1.0, t_min: float = 0.0):
        self.shift, self.t_min, self.t_max = float(shift), float(t_min), 1.0

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = torch.as_tensor(t, dtype=torch.float32)
        return 1 - t, t

    def t_at(self, log_snr: Tensor) -> Tensor:
        return torch.sigmoid(-torch.as_tensor(log_snr, dtype=torch.float32) / 2)

    def model_time(self, t: Tensor) -> Tensor:
        return 1000.0 * t

    def _shift(self, t: Tensor) -> Tensor:
        return self.shift * t / (1 + (self.shift - 1) * t)

    def timesteps(self, num_steps: int, spacing: str = "auto") -> Tensor:
        """auto, linspace, trailing: 1, 1 - 1/n, ..., 1/n (the last evaluation's x0 estimate is the sample);
        karras: Karras spacing of sigma/alpha = t/(1-t), starting just below t = 1."""
        _check_steps(num_steps)
        if spacing in ("auto", "linspace", "trailing"):
            ts = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1]
        elif spacing == "karras":
            ts = torch.sigmoid(karras_sigmas(num_steps, 0.002, 80.0).log())  # t/(1-t) = sigma
        else:
            raise ValueError(f"flow schedule spacing must be auto, linspace (trailing) or karras, got {spacing!r}")
        return self._shift(ts).float()
