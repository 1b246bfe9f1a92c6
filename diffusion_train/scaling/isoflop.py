"""IsoFLOP analysis (Chinchilla's approach 2) and the compute-optimal frontier. Pure numpy/scipy.

:func:`isoflop_analysis`: per compute budget C, a parabola of the final loss
  against ``log10 N`` (:func:`fit_isoflop_parabola`); its minimum is ``N_opt(C)``. A budget with fewer
  than 3 distinct sizes, without a minimum (curvature <= 0, or the same loss at every size), with the minimum
  outside the sampled sizes or with its best run at the smallest or largest size is flagged and left out of
  the frontier fit ``N_opt = k C^a`` (its extrapolated ``N_opt`` is still reported, up to 10x beyond the sizes). With ``flops_per_image``,
  the images seen at the optimum follow
  ``D_opt = C / F(N_opt) ∝ C^b`` with ``F(N) = k_F N^g`` fitted over the runs, so ``b = 1 - g a``.

Confidence intervals: the frontier's is a percentile bootstrap with a fixed seed (runs resampled with
replacement within each budget; a resample that leaves any budget unusable, e.g. with fewer than 3
distinct sizes, is discarded and counted) when it measures anything: every budget's parabola must be fitted
to more runs than its 3 coefficients, or resampling cannot move that budget's N_opt. Otherwise it is the
regression's t interval over 3 or more budgets (:attr:`Frontier.method`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from diffusion_train.scaling.fit import PowerLawFit, fit_power_law, percentile_ci, t_quantile

__all__ = ["Frontier", "IsoFlopBudget", "IsoFlopResult", "MIN_SIZES", "fit_isoflop_parabola", "group_budgets",
           "isoflop_analysis"]

MIN_SIZES = 3
MAX_EXTRAPOLATION = 1.0  # decades beyond the fitted sizes within which a flagged budget's N_opt is still given



def group_budgets(budgets, total_flops, rel_tol: float = 0.1) -> np.ndarray:
    """The compute budget of each run: its nominal ``budget`` (``scaling.budget``) when given (not None/nan),
    else its ``total_flops`` grouped with runs within ``rel_tol`` of each other (sorted, a new group
    starts more than ``rel_tol`` above the smallest of the current one), each group named by the
    geometric mean of its total FLOPs, or by a nominal budget within ``rel_tol`` of that mean."""
    nominal = np.array([math.nan if b is None else float(b) for b in budgets], dtype=float)
    flops = np.asarray(total_flops, dtype=float)
    out = nominal.copy()
    missing = np.flatnonzero(~np.isfinite(nominal))
    known = np.unique(nominal[np.isfinite(nominal)])
    order = missing[np.argsort(flops[missing], kind="stable")]
    groups: list[list[int]] = []
    for i in order:
        if groups and flops[i] <= flops[groups[-1][0]] * (1 + rel_tol):
            groups[-1].append(i)
        else:
            groups.append([i])
    for g in groups:
        centre = float(np.exp(np.mean(np.log(np.maximum(flops[g], 1e-300)))))
        near = known[np.abs(known / centre - 1) <= rel_tol] if known.size else known
        out[g] = near[np.argmin(np.abs(np.log(near / centre)))] if near.size else centre
    return out


@dataclass(frozen=True)
class IsoFlopBudget:
    """One budget's parabola ``loss = c2 z^2 + c1 z + c0`` with ``z = log10 N`` (``coefficients``; nan when
    not fitted), its minimum ``n_opt`` / ``loss_opt`` (nan when there is none), the best sampled run
    (``best_params`` / ``best_loss``) and ``flag``: why it is left out of the frontier fit (None: used)."""
    budget: float
    params: np.ndarray
    losses: np.ndarray
    coefficients: tuple[float, float, float]
    n_opt: float
    loss_opt: float
    best_params: float
    best_loss: float
    flag: str | None = None
    fitted_sizes: int = 0  # distinct sizes the parabola is fitted to (those within the window)
    fitted_runs: int = 0  # runs it is fitted to: MIN_SIZES of them, one per size, and it passes through them all

    @property
    def used(self) -> bool:
        return self.flag is None

    @property
    def sizes(self) -> int:
        return int(np.unique(self.params).size)

    def predict(self, params) -> np.ndarray:
        return np.polyval(self.coefficients, np.log10(np.asarray(params, dtype=float)))


def fit_isoflop_parabola(params, losses, budget: float = math.nan, window: float | None = None) -> IsoFlopBudget:
    """The IsoFLOP parabola of one budget: final loss against ``log10 N`` (params, losses: one entry per
    run, finite, N > 0), fitted to the runs within ``window`` decades of N of the budget's best run (None: all
    of them; the loss is far from parabolic over a wide range, steep where large models are undertrained).
    Flags (and keeps out of the frontier) fewer than 3 distinct sizes in the fit, a parabola without a
    minimum, a minimum outside the fitted sizes (then ``n_opt`` is the extrapolated one, or nan beyond
    ``MAX_EXTRAPOLATION`` decades, where the loss is nearly linear in log N), and a best run at the smallest or
    largest sampled size (the sizes do not bracket the minimum, whatever the parabola says)."""
    params, losses = np.asarray(params, dtype=float).ravel(), np.asarray(losses, dtype=float).ravel()
    if params.shape != losses.shape or not params.size:
        raise ValueError("fit_isoflop_parabola: needs as many losses as params, at least one")
    if not (np.all(np.isfinite(params)) and np.all(params > 0) and np.all(np.isfinite(losses))):
        raise ValueError("fit_isoflop_parabola: needs N > 0 and finite losses")
    best = int(np.argmin(losses))
    common = dict(budget=float(budget), params=params, losses=losses, best_params=float(params[best]),
                  best_loss=float(losses[best]))
    z_all = np.log10(params)
    near = np.ones(params.shape, dtype=bool) if window is None else np.abs(z_all - z_all[best]) <= window + 1e-9
    z, fitted = z_all[near], losses[near]
    sizes = np.unique(z).size
    common.update(fitted_sizes=int(sizes), fitted_runs=int(z.size))
    nan3 = (math.nan, math.nan, math.nan)
    if sizes < MIN_SIZES:
        within = "" if window is None else f" within {window:g} decades of the best run"
        flag = f"{sizes} model size{'s' if sizes != 1 else ''}{within} (a parabola needs {MIN_SIZES})"
        return IsoFlopBudget(**common, coefficients=nan3, n_opt=math.nan, loss_opt=math.nan, flag=flag)
    c2, c1, c0 = (float(c) for c in np.polyfit(z, fitted, 2))
    if np.ptp(fitted) <= 1e-12 * np.abs(fitted).max():  # equal losses: c2 is rounding noise of either sign
        return IsoFlopBudget(**common, coefficients=(c2, c1, c0), n_opt=math.nan, loss_opt=math.nan,
                             flag="no minimum: the loss is the same at every size")
    if not c2 > 0:
        return IsoFlopBudget(**common, coefficients=(c2, c1, c0), n_opt=math.nan, loss_opt=math.nan,
                             flag="no minimum: the loss is not convex in log N")
    z_opt = -c1 / (2 * c2)
    flag = None
    if not z.min() <= z_opt <= z.max():
        side = "below the smallest" if z_opt < z.min() else "above the largest"
        size = f"{'sampled' if window is None else 'fitted'} size"
        if max(z.min() - z_opt, z_opt - z.max()) > MAX_EXTRAPOLATION:  # nearly linear: c2 ~ 0, z_opt can overflow
            return IsoFlopBudget(**common, coefficients=(c2, c1, c0), n_opt=math.nan, loss_opt=math.nan,
                                 flag=f"minimum far {side} {size} (more than {10 ** MAX_EXTRAPOLATION:g}x; "
                                      "not extrapolated)")
        flag = f"minimum {side} {size} (N_opt extrapolated)"
    n_opt, loss_opt = float(10 ** z_opt), float(c0 - c1 * c1 / (4 * c2))
    if flag is None and params[best] in (params.min(), params.max()):
        end = "smallest" if params[best] == params.min() else "largest"
        flag = f"the best run is the {end} sampled size: the sizes do not bracket the minimum"
    return IsoFlopBudget(**common, coefficients=(c2, c1, c0), n_opt=n_opt, loss_opt=loss_opt, flag=flag)


@dataclass(frozen=True)
class Frontier:
    """``N_opt(C) = k C^a`` over the used budgets, with bootstrap samples of ``(a, ln k)`` (nan: a resample
    that left a budget unusable) and ``exact_budgets``, the used budgets whose parabola is fitted to exactly
    3 runs of 3 sizes: it goes through them, so no resample of their runs moves their N_opt."""
    fit: PowerLawFit
    budgets: np.ndarray
    n_opt: np.ndarray
    boot_exponents: np.ndarray
    boot_log_coefficients: np.ndarray
    boot_total: int
    level: float = 0.95
    exact_budgets: int = 0

    @property
    def method(self) -> str:
        """Where :attr:`ci` and :meth:`band` come from: ``bootstrap`` when no budget is fitted exactly and half
        or more of the resamples kept every budget usable; else ``regression`` (the t interval of the
        least-squares line over 3 or more budgets, whose scatter holds the optima's noise); else ``none``."""
        if self.boot_total and not self.exact_budgets and self.boot_valid >= 0.5 * self.boot_total:
            return "bootstrap"
        return "regression" if self.budgets.size >= 3 else "none"

    @property
    def exponent(self) -> float:
        return self.fit.exponent

    @property
    def coefficient(self) -> float:
        return self.fit.coefficient

    @property
    def boot_valid(self) -> int:
        return int(np.isfinite(self.boot_exponents).sum())

    @property
    def ci(self) -> tuple[float, float]:
        method = self.method
        if method == "bootstrap":
            return percentile_ci(self.boot_exponents, self.level)
        return self.fit.exponent_ci(self.level) if method == "regression" else (math.nan, math.nan)

    def band(self, c) -> tuple[np.ndarray, np.ndarray]:
        """The pointwise band of ``N_opt`` at compute ``c``: the bootstrap fits' percentiles, or the regression
        line's t band (see :attr:`method`)."""
        c = np.atleast_1d(np.asarray(c, dtype=float))
        ok = np.isfinite(self.boot_exponents)
        method = self.method
        if method == "regression":
            x = np.log(self.budgets)
            sxx = np.sum((x - x.mean()) ** 2)
            resid_sd = self.fit.stderr * math.sqrt(sxx)  # stderr = resid_sd / sqrt(sxx)
            spread = np.sqrt(1 / x.size + (np.log(c) - x.mean()) ** 2 / sxx)
            half = t_quantile(x.size - 2, self.level) * resid_sd * spread
            mid = np.log(self.fit.predict(c))
            return np.exp(mid - half), np.exp(mid + half)
        if method == "none":
            nan = np.full(c.shape, np.nan)
            return nan, nan
        logs = self.boot_log_coefficients[ok, None] + self.boot_exponents[ok, None] * np.log(c)[None, :]
        lo, hi = np.percentile(logs, [50 * (1 - self.level), 50 * (1 + self.level)], axis=0)
        return np.exp(lo), np.exp(hi)


@dataclass(frozen=True)
class IsoFlopResult:
    """All budgets (used or flagged), the frontier (None with fewer than 2 used budgets), the loss at the
    optimum ``L_opt(C) = k C^c`` with bootstrap samples of ``c``, the images at the optimum
    ``D_opt ∝ C^b`` (``b = 1 - g a``, with ``g`` of ``flops_per_image = k_F N^g``; None without
    ``flops_per_image``) and general ``notes``."""
    budgets: list[IsoFlopBudget]
    frontier: Frontier | None
    loss_frontier: PowerLawFit | None = None
    boot_loss_exponents: np.ndarray = field(default_factory=lambda: np.zeros(0))
    flops_per_image_fit: PowerLawFit | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def images_exponent(self) -> float:
        if self.frontier is None or self.flops_per_image_fit is None:
            return math.nan
        return 1.0 - self.flops_per_image_fit.exponent * self.frontier.exponent

    @property
    def images_ci(self) -> tuple[float, float]:
        if self.frontier is None or self.flops_per_image_fit is None:
            return math.nan, math.nan
        lo, hi = self.frontier.ci
        g = self.flops_per_image_fit.exponent
        return tuple(sorted((1.0 - g * lo, 1.0 - g * hi)))

    @property
    def loss_ci(self) -> tuple[float, float]:
        """The interval of ``c``, made as the frontier's (see :attr:`Frontier.method`)."""
        method = self.frontier.method if self.frontier else "none"
        if method == "bootstrap":
            return percentile_ci(self.boot_loss_exponents, self.frontier.level)
        if method == "regression" and self.loss_frontier is not None:
            return self.loss_frontier.exponent_ci(self.frontier.level)
        return math.nan, math.nan


def isoflop_analysis(budgets, params, losses, *, flops_per_image=None, boot: int = 1000, seed: int = 0,
                     level: float = 0.95, window: float | None = None) -> IsoFlopResult:
    """IsoFLOP analysis of runs given as per-run arrays: ``budgets`` (the compute budget each run belongs
    to, e.g. from :func:`group_budgets`), ``params`` (N) and final ``losses`` (finite). Fits one parabola
    per budget (over the runs within ``window`` decades of its best, see :func:`fit_isoflop_parabola`), then
    ``N_opt = k C^a`` (and ``L_opt = k' C^c``) over the budgets not flagged; ``boot`` bootstrap resamples
    (seed ``seed``, each budget's runs resampled, its best run and window found again; a resample that leaves
    a budget unusable is discarded) give the ``level`` percentile intervals, or the regression gives them (see
    :attr:`Frontier.method`)."""
    budgets = np.asarray(budgets, dtype=float).ravel()
    params = np.asarray(params, dtype=float).ravel()
    losses = np.asarray(losses, dtype=float).ravel()
    if not budgets.size == params.size == losses.size:
        raise ValueError("isoflop_analysis: budgets, params and losses differ in length")
    fits = [fit_isoflop_parabola(params[budgets == c], losses[budgets == c], c, window) for c in np.unique(budgets)]
    used = [f for f in fits if f.used]
    notes = []
    fpi_fit = None
    if flops_per_image is not None:
        fpi = np.asarray(flops_per_image, dtype=float).ravel()
        if np.unique(params).size >= 2:
            fpi_fit = fit_power_law(params, fpi)
    if len(used) < 2:
        notes.append(f"{len(used)} usable budget{'s' if len(used) != 1 else ''}: the frontier needs 2 or more")
        return IsoFlopResult(budgets=fits, frontier=None, flops_per_image_fit=fpi_fit, notes=notes)
    c_used = np.array([f.budget for f in used])
    n_used = np.array([f.n_opt for f in used])
    frontier_fit = fit_power_law(c_used, n_used)
    loss_opt = np.array([f.loss_opt for f in used])
    loss_fit = fit_power_law(c_used, loss_opt) if np.all(loss_opt > 0) else None
    if len(used) == 2:
        notes.append("2 usable budgets: the frontier fit goes through both points exactly")

    rng = np.random.default_rng(seed)
    boot_a = np.full(boot, np.nan)
    boot_lk = np.full(boot, np.nan)
    boot_c = np.full(boot, np.nan)
    for r in range(boot):
        pts = []
        for f in used:
            idx = rng.integers(0, f.params.size, f.params.size)
            g = fit_isoflop_parabola(f.params[idx], f.losses[idx], f.budget, window)
            if not g.used:  # a frontier over fewer budgets would measure which were left out, not the noise
                break
            pts.append((f.budget, g.n_opt, g.loss_opt))
        else:
            c, n, lo = np.array(pts).T
            pf = fit_power_law(c, n)
            boot_a[r], boot_lk[r] = pf.exponent, math.log(pf.coefficient)
            if np.all(lo > 0):
                boot_c[r] = fit_power_law(c, lo).exponent
    exact = sum(f.fitted_runs == MIN_SIZES for f in used)
    frontier = Frontier(fit=frontier_fit, budgets=c_used, n_opt=n_used, boot_exponents=boot_a,
                        boot_log_coefficients=boot_lk, boot_total=boot, level=level, exact_budgets=exact)
    instead = {"regression": f"the interval is the regression's over the {len(used)} budgets",
               "none": "there is no interval (2 budgets)"}.get(frontier.method, "")
    if boot and exact:
        notes.append(f"{exact} of {len(used)} budgets' parabolas are fitted to exactly {MIN_SIZES} runs of "
                     f"{MIN_SIZES} sizes, which they pass through, so resampling cannot move their N_opt: {instead} "
                     "(fit 4 or more sizes, or several seeds, per budget for a bootstrap interval)")
    elif boot and frontier.boot_valid < 0.5 * boot:
        notes.append(f"only {frontier.boot_valid} of {boot} bootstrap resamples kept every budget usable: "
                     f"{instead} (sample more sizes per budget)")
    return IsoFlopResult(budgets=fits, frontier=frontier, loss_frontier=loss_fit, boot_loss_exponents=boot_c,
                         flops_per_image_fit=fpi_fit, notes=notes)
