"""Analytic optimal denoisers E[x0 | x_t] for 2-D toy data, shared by ``tests/test_samplers.py`` and
``scripts/sampler_table.py``.

For x_t = a x0 + s eps (any schedule, any a >= 0, s > 0):

- Gaussian x0 ~ N(mu, diag(tau^2)):  E[x0 | x_t] = mu + a tau^2 / (a^2 tau^2 + s^2) (x_t - a mu).
- Mixture sum_k w_k N(m_k, v_k I):  component k gives x_t ~ N(a m_k, (a^2 v_k + s^2) I); with the
  posterior responsibilities r_k, E[x0 | x_t] = sum_k r_k (m_k + a v_k / (a^2 v_k + s^2) (x_t - a m_k)).

Everything is computed in float64; at a = 0 (zero terminal SNR, flow t = 1) both give the prior mean.
For Gaussian data the probability-flow ODE is known exactly: z = (x - a mu) / sqrt(a^2 tau^2 + s^2)
is conserved (the VE-coordinate statement (x/a - mu) / sqrt(tau^2 + (s/a)^2) = const, multiplied
through by a), so a deterministic sampler's exact output is :meth:`Gaussian.exact_output`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


class _Analytic:
    """Denoiser protocol: ``schedule``, ``alpha_sigma(t)``, ``__call__(x, t, cond) -> x0``; counts calls."""

    def __init__(self, schedule):
        self.schedule = schedule
        self.calls: list[int] = []  # batch size of every call

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return self.schedule.alpha_sigma(t)

    def _as(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        t = torch.as_tensor(t)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        if bool((t == t[0]).all()):  # one schedule lookup for the common case of a shared t
            t = t[:1]
        a, s = self.alpha_sigma(t)
        return a.double().reshape(-1, 1), s.double().reshape(-1, 1)

    def __call__(self, x: Tensor, t: Tensor, cond=None) -> Tensor:
        self.calls.append(x.shape[0])
        a, s = self._as(x, t)
        return self.posterior_mean(x.double(), a, s)

    @property
    def nfe(self) -> int:
        return len(self.calls)


class Gaussian(_Analytic):
    """x0 ~ N(mu, diag(tau^2)) in d dimensions (rows of shape (B, d))."""

    def __init__(self, schedule, mu=(0.5, -1.0), tau=(0.5, 0.2)):
        super().__init__(schedule)
        self.mu = torch.tensor(mu, dtype=torch.float64)
        self.tau = torch.tensor(tau, dtype=torch.float64)

    @property
    def mean(self) -> Tensor:
        return self.mu

    @property
    def cov(self) -> Tensor:
        return torch.diag(self.tau.square())

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        return self.mu + self.tau * torch.randn(n, len(self.mu), generator=generator, dtype=torch.float64)

    def posterior_mean(self, x: Tensor, a: Tensor, s: Tensor) -> Tensor:
        v = self.tau.square()
        return self.mu + a * v / (a.square() * v + s.square()) * (x - a * self.mu)

    def exact_output(self, x_start: Tensor, ts: Tensor) -> Tensor:
        """What an exact probability-flow solve from ``x_start`` at ts[0] returns at ts[-1]:
        E[x0 | x(ts[-1])] = mu + a1 tau^2 z / sqrt(a1^2 tau^2 + s1^2), z conserved."""
        a, s = self.schedule.alpha_sigma(ts[[0, -1]])
        (a0, a1), (s0, s1) = a.double().tolist(), s.double().tolist()
        v = self.tau.square()
        z = (x_start.double() - a0 * self.mu) / (a0**2 * v + s0**2).sqrt()
        return self.mu + a1 * v * z / (a1**2 * v + s1**2).sqrt()

    def output_cov(self, ts: Tensor) -> Tensor:
        """Covariance of E[x0 | x_t] at t = ts[-1] when x_t has the exact marginal: tau^4 a^2 / (a^2 tau^2 + s^2)."""
        a, s = self.schedule.alpha_sigma(ts[-1:])
        a1, s1 = float(a.double()), float(s.double())
        v = self.tau.square()
        return torch.diag(v.square() * a1**2 / (a1**2 * v + s1**2))


class Mixture(_Analytic):
    """x0 ~ sum_k w_k N(m_k, std_k^2 I) in 2-D."""

    def __init__(self, schedule, means=((-1.0, 0.0), (1.0, 0.5), (0.0, -1.0)), std=(0.15, 0.1, 0.2),
                 weights=(0.5, 0.3, 0.2)):
        super().__init__(schedule)
        self.m = torch.tensor(means, dtype=torch.float64)  # (K, d)
        self.v = torch.tensor(std, dtype=torch.float64).square()  # (K,)
        self.w = torch.tensor(weights, dtype=torch.float64)
        self.w = self.w / self.w.sum()

    @property
    def mean(self) -> Tensor:
        return self.w @ self.m

    @property
    def cov(self) -> Tensor:
        d = self.m.shape[1]
        mu = self.mean
        dev = self.m - mu
        return (self.w * self.v).sum() * torch.eye(d, dtype=torch.float64) + (self.w[:, None] * dev).T @ dev

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        k = torch.multinomial(self.w, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.m.shape[1], generator=generator, dtype=torch.float64)
        return self.m[k] + self.v[k].sqrt()[:, None] * eps

    def posterior_mean(self, x: Tensor, a: Tensor, s: Tensor) -> Tensor:
        d = x.shape[1]
        var = a.square() * self.v + s.square()  # (B or 1, K)
        diff = x[:, None, :] - a[:, :, None] * self.m  # (B, K, d)
        logp = self.w.log() - 0.5 * d * var.log() - 0.5 * diff.square().sum(-1) / var
        r = torch.softmax(logp, dim=1)  # (B, K)
        gain = (a * self.v / var)[:, :, None]  # (B or 1, K, 1)
        comp = self.m + gain * diff  # (B, K, d)
        return (r[:, :, None] * comp).sum(1)


# -- metrics -------------------------------------------------------------------------------------
def _sqrtm_psd(c: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(c)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def w2_gaussian(mean1, cov1, mean2, cov2) -> float:
    """2-Wasserstein distance between N(mean1, cov1) and N(mean2, cov2)."""
    m1, m2 = np.asarray(mean1, np.float64), np.asarray(mean2, np.float64)
    c1, c2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    r2 = _sqrtm_psd(c2)
    cross = _sqrtm_psd(r2 @ c1 @ r2)
    d2 = float(np.sum((m1 - m2) ** 2) + np.trace(c1 + c2 - 2 * cross))
    return math.sqrt(max(d2, 0.0))


def moments(x: Tensor) -> tuple[Tensor, Tensor]:
    x = x.double()
    return x.mean(0), torch.cov(x.T)
