"""Scaling-law fits: power laws and saturating power laws (the IsoFLOP analysis is :mod:`.isoflop`).

Pure numpy/scipy (no plotting):

* :func:`fit_power_law`: ``y = k x^a`` by least squares on ``ln y = ln k + a ln x``, with the regression's t
  interval of ``a`` (:meth:`PowerLawFit.exponent_ci`).
* :func:`fit_saturating_power_law`: ``y = E + A x^(-alpha)`` (loss against compute for one model size),
  least squares on ``ln y`` (every decade of loss weighs the same) with ``E`` in ``[0, max y]``,
  ``alpha`` in ``[1e-4, 10]``, started from the best of a small grid over ``E`` (for each ``E`` the
  power law of ``y - E`` gives ``A`` and ``alpha``); ``x`` is divided by its geometric mean inside the
  fit so that FLOP counts of 1e20 cause no overflow. :func:`bootstrap_saturating` resamples its points
  (a percentile bootstrap with a fixed seed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares
from scipy.stats import t as student_t

__all__ = ["ALPHA_BOUNDS", "PowerLawFit", "SaturatingFit", "bootstrap_saturating", "fit_power_law",
           "fit_saturating_power_law", "percentile_ci"]

ALPHA_BOUNDS = (1e-4, 10.0)


def _logs(x, y, need: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"{what}: x and y differ in length ({x.size} vs {y.size})")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and np.all(x > 0) and np.all(y > 0)):
        raise ValueError(f"{what}: needs finite positive x and y")
    if np.unique(x).size < need:
        raise ValueError(f"{what}: needs at least {need} distinct x values, got {np.unique(x).size}")
    return np.log(x), np.log(y)


def percentile_ci(samples, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval holding ``level`` of the finite ``samples`` (nan, nan when there are none)."""
    s = np.asarray(samples, dtype=float)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return math.nan, math.nan
    lo, hi = np.percentile(s, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def t_quantile(dof: int, level: float) -> float:
    return float(student_t.ppf(0.5 * (1 + level), dof)) if dof > 0 else math.nan


# ----------------------------------------------------------------------------------------------
# power laws


@dataclass(frozen=True)
class PowerLawFit:
    """``y = coefficient * x ** exponent``; ``residuals`` are ``ln y - ln(fit)`` per point, ``stderr`` the
    standard error of the exponent from the regression (nan with 2 points)."""
    exponent: float
    coefficient: float
    residuals: np.ndarray
    stderr: float = math.nan

    def predict(self, x) -> np.ndarray:
        return self.coefficient * np.asarray(x, dtype=float) ** self.exponent

    @property
    def rmse_log(self) -> float:
        return float(np.sqrt(np.mean(self.residuals ** 2)))

    def exponent_ci(self, level: float = 0.95) -> tuple[float, float]:
        """The regression's t interval of the exponent (``residuals.size - 2`` degrees of freedom; nan with 2
        points)."""
        half = t_quantile(self.residuals.size - 2, level) * self.stderr
        return self.exponent - half, self.exponent + half


def fit_power_law(x, y) -> PowerLawFit:
    """``y = k x^a`` by least squares in log-log space (at least 2 distinct x; x, y > 0)."""
    lx, ly = _logs(x, y, 2, "fit_power_law")
    a, b = np.polyfit(lx, ly, 1)
    resid = ly - (a * lx + b)
    n = lx.size
    stderr = math.sqrt(np.sum(resid ** 2) / (n - 2) / np.sum((lx - lx.mean()) ** 2)) if n > 2 else math.nan
    return PowerLawFit(exponent=float(a), coefficient=float(math.exp(b)), residuals=resid, stderr=stderr)


@dataclass(frozen=True)
class SaturatingFit:
    """``y = E + A x^(-alpha)``. Internally ``A x^(-alpha) = amplitude * (x / x_scale)^(-alpha)``;
    ``residuals`` are ``ln y - ln(fit)``."""
    E: float
    amplitude: float
    alpha: float
    x_scale: float
    residuals: np.ndarray
    converged: bool = True

    @property
    def A(self) -> float:
        return float(self.amplitude * self.x_scale ** self.alpha)

    def predict(self, x) -> np.ndarray:
        return self.E + self.amplitude * (np.asarray(x, dtype=float) / self.x_scale) ** -self.alpha

    @property
    def rmse_log(self) -> float:
        return float(np.sqrt(np.mean(self.residuals ** 2)))


def _saturating_problem(lu: np.ndarray, ly: np.ndarray):
    def resid(theta):
        e, la, alpha = theta
        return np.log(e + np.exp(la - alpha * lu)) - ly

    def jac(theta):
        e, la, alpha = theta
        p = np.exp(la - alpha * lu)
        m = e + p
        return np.stack([1 / m, p / m, -lu * p / m], axis=1)

    return resid, jac


def fit_saturating_power_law(x, y, *, x_scale: float | None = None,
                             init: tuple[float, float, float] | None = None) -> SaturatingFit:
    """``y = E + A x^(-alpha)`` by least squares on ``ln y`` (at least 4 distinct x; x, y > 0).

    ``x_scale`` (default: the geometric mean of x) normalises x inside the fit; ``init``
    (``E, ln amplitude, alpha``, in the units of that ``x_scale``) skips the grid search for a start.
    """
    lx, ly = _logs(x, y, 4, "fit_saturating_power_law")
    x_scale = float(math.exp(lx.mean())) if x_scale is None else float(x_scale)
    lu = lx - math.log(x_scale)
    y_min, y_max = float(np.exp(ly.min())), float(np.exp(ly.max()))
    resid, jac = _saturating_problem(lu, ly)
    lower, upper = np.array([0.0, -np.inf, ALPHA_BOUNDS[0]]), np.array([y_max, np.inf, ALPHA_BOUNDS[1]])
    if init is None:
        best = None
        for frac in (0.0, 0.25, 0.5, 0.75, 0.9, 0.97):
            e = frac * y_min
            slope, icpt = np.polyfit(lu, np.log(np.exp(ly) - e), 1)
            theta = np.array([e, icpt, float(np.clip(-slope, *ALPHA_BOUNDS))])
            sse = float(np.sum(resid(theta) ** 2))
            if best is None or sse < best[0]:
                best = (sse, theta)
        theta0 = best[1]
    else:
        theta0 = np.clip(np.asarray(init, dtype=float), lower, upper)
    res = least_squares(resid, theta0, jac=jac, bounds=(lower, upper), method="trf", x_scale="jac")
    e, la, alpha = res.x
    return SaturatingFit(E=float(e), amplitude=float(math.exp(la)), alpha=float(alpha), x_scale=x_scale,
                         residuals=-res.fun, converged=bool(res.success))


def bootstrap_saturating(x, y, fit: SaturatingFit, *, boot: int = 1000, seed: int = 0) -> np.ndarray:
    """``(boot, 3)`` samples of ``(E, A, alpha)`` refitted on the points resampled with replacement (rows
    of nan where a resample has fewer than 4 distinct x). Treats the points as independent, which
    consecutive points of one learning curve are not quite: the interval is on the narrow side."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    rng = np.random.default_rng(seed)
    out = np.full((boot, 3), np.nan)
    init = (fit.E, math.log(fit.amplitude), fit.alpha)
    for r in range(boot):
        idx = rng.integers(0, x.size, x.size)
        if np.unique(x[idx]).size < 4:
            continue
        try:
            f = fit_saturating_power_law(x[idx], y[idx], x_scale=fit.x_scale, init=init)
        except ValueError:  # a resample the optimizer cannot start from (non-finite residuals): left out
            continue
        out[r] = (f.E, f.A, f.alpha)
    return out
