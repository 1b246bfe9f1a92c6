"""The IsoFLOP analysis (diffusion_train/scaling/isoflop.py): parabolas per compute budget and their flags, the
compute-optimal frontier and its intervals, recovered from synthetic Chinchilla-law runs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from diffusion_train.scaling.fit import percentile_ci
from diffusion_train.scaling.isoflop import fit_isoflop_parabola, group_budgets, isoflop_analysis


def chinchilla(n, d, E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28):
    return E + A / n ** alpha + B / d ** beta


def optimum(c, E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28):
    """N_opt of ``chinchilla`` under D = C / (6 N): G (C/6)^(beta / (alpha + beta))."""
    a = beta / (alpha + beta)
    return (alpha * A / (beta * B)) ** (1 / (alpha + beta)) * (c / 6) ** a


def test_isoflop_pipeline_recovers_frontier_exponent():
    """Runs from L(N, D) = E + A/N^alpha + B/D^beta with D = C / 6N (N_opt ∝ C^0.4516), 7 sizes around the
    optimum of 4 budgets, 0.2% noise, plus a 5th budget whose sizes all lie below its optimum (flagged)
    and a 6th with only 2 sizes (flagged)."""
    rng = np.random.default_rng(2)
    true_a = 0.28 / (0.34 + 0.28)
    budgets, params, losses = [], [], []
    for c in (1e18, 1e19, 1e20, 1e21):
        for n in optimum(c) * 10 ** np.linspace(-0.8, 0.8, 7):
            budgets.append(c), params.append(n), losses.append(chinchilla(n, c / (6 * n)) * (1 + rng.normal(0, 2e-3)))
    for n in optimum(1e22) * 10 ** np.linspace(-2.5, -1.5, 4):
        budgets.append(1e22), params.append(n), losses.append(chinchilla(n, 1e22 / (6 * n)))
    for n in (1e8, 1e9):
        budgets.append(1e17), params.append(n), losses.append(chinchilla(n, 1e17 / (6 * n)))
    result = isoflop_analysis(budgets, params, losses, flops_per_image=6 * np.array(params), boot=300, seed=0)
    by_c = {b.budget: b for b in result.budgets}
    assert [c for c, b in by_c.items() if b.used] == [1e18, 1e19, 1e20, 1e21]
    assert "above the largest" in by_c[1e22].flag and by_c[1e22].n_opt > max(by_c[1e22].params)
    assert "2 model sizes" in by_c[1e17].flag and math.isnan(by_c[1e17].n_opt)
    for c in (1e18, 1e19, 1e20, 1e21):  # the parabola's minimum is within 10% of the true optimum
        assert by_c[c].n_opt == pytest.approx(optimum(c), rel=0.1)
    fr = result.frontier
    assert fr.exponent == pytest.approx(true_a, abs=0.02)
    lo, hi = fr.ci
    assert lo < true_a < hi and hi - lo < 0.1
    assert fr.method == "bootstrap" and fr.boot_valid > 0.75 * fr.boot_total
    band_lo, band_hi = fr.band([1e19])
    assert band_lo[0] < fr.fit.predict(1e19) < band_hi[0]
    # F(N) = 6N: D_opt = C / 6 N_opt ∝ C^(1 - a) = C^(alpha / (alpha + beta))
    assert result.images_exponent == pytest.approx(1 - fr.exponent, abs=1e-9)
    assert result.loss_frontier.exponent < 0 and result.loss_ci[0] < result.loss_ci[1]
    # the same seed gives the same interval
    again = isoflop_analysis(budgets, params, losses, boot=300, seed=0).frontier
    assert again.ci == fr.ci


def test_budgets_fitted_to_exactly_three_sizes_get_the_regression_interval():
    """A parabola through exactly 3 sizes passes through them: resampling its runs cannot move its N_opt, so the
    bootstrap would only measure which budgets resamples drop. The interval is then the regression's t interval
    over the budgets (none with 2); with 4+ sizes per budget it is the bootstrap's, and a resample that loses a
    budget is discarded, not fitted over the rest."""
    from scipy.stats import linregress, t

    budgets, params, losses = [], [], []
    for c, shift in ((1e11, 0.0), (1e12, 0.08), (1e13, 0.1), (1e14, 0.25)):
        for n in optimum(c) * 10 ** np.array([-0.5, 0.0, 0.5]):
            budgets.append(c), params.append(n), losses.append(chinchilla(n * 10 ** shift, c / (6 * n)))
    result = isoflop_analysis(budgets, params, losses, boot=200, seed=0)
    fr = result.frontier
    assert fr.exact_budgets == 4 and fr.method == "regression" and "exactly 3 runs of 3 sizes" in result.notes[0]
    reg = linregress(np.log(fr.budgets), np.log(fr.n_opt))
    half = t.ppf(0.975, 2) * reg.stderr
    np.testing.assert_allclose(fr.ci, (reg.slope - half, reg.slope + half), rtol=1e-9)
    assert fr.ci[1] - fr.ci[0] > 0.05  # the old degenerate bootstrap gave a zero-width interval here
    lo, hi = fr.band([1e12])
    assert lo[0] < fr.fit.predict(1e12) < hi[0]
    reg_loss = linregress(np.log(fr.budgets), np.log([b.loss_opt for b in result.budgets]))
    np.testing.assert_allclose(np.mean(result.loss_ci), reg_loss.slope, rtol=1e-9)

    two = isoflop_analysis(budgets[:6], params[:6], losses[:6], boot=50).frontier
    assert two.method == "none" and all(map(math.isnan, two.ci)) and np.isnan(two.band([1e12])[0]).all()

    budgets, params, losses = [], [], []
    for c in (1e18, 1e19, 1e20):
        for n in optimum(c) * 10 ** np.linspace(-0.6, 0.6, 6):
            budgets.append(c), params.append(n), losses.append(chinchilla(n, c / (6 * n)))
    fr = isoflop_analysis(budgets, params, losses, boot=200, seed=0).frontier
    assert fr.method == "bootstrap" and fr.exact_budgets == 0
    # 6 runs per budget: a resample keeps all 3 budgets usable only with 3+ distinct sizes and the best run
    # inside them each time, so some are discarded; every kept one is a fit over all 3 budgets
    assert 0 < fr.boot_valid < fr.boot_total
    assert fr.ci == percentile_ci(fr.boot_exponents)


def test_a_nearly_linear_budget_is_flagged_without_an_extrapolated_optimum():
    """Losses almost linear in log N put the parabola's minimum hundreds of decades away: 10**z overflowed (an
    OverflowError in the report, also from a bootstrap resample of data whose own fit was fine). Beyond 10x past
    the sizes the budget is flagged with no N_opt; within it, the extrapolated N_opt is kept."""
    n = np.array([1e6, 1e7, 1e8])
    z = np.log10(n)
    far = fit_isoflop_parabola(n, 0.5 - 0.01 * z + 1e-6 * (z - 7) ** 2)
    assert "minimum far above the largest sampled size (more than 10x" in far.flag
    assert math.isnan(far.n_opt) and math.isnan(far.loss_opt)
    near = fit_isoflop_parabola(n, (z - 8.9) ** 2)
    assert "(N_opt extrapolated)" in near.flag and near.n_opt == pytest.approx(10 ** 8.9)


def test_several_seeds_of_three_sizes_get_the_bootstrap_interval():
    """3 sizes x 3 seeds per budget: a least-squares parabola through 9 runs, which resampling moves. It was
    counted as fitted exactly (3 distinct sizes) and given the 1-degree-of-freedom regression interval."""
    rng = np.random.default_rng(0)
    budgets, params, losses = [], [], []
    for c in (1e18, 1e19, 1e20):
        for n in optimum(c) * 10 ** np.array([-0.5, 0.0, 0.5]):
            for _ in range(3):
                budgets.append(c), params.append(n), losses.append(chinchilla(n, c / (6 * n)) * (1 + rng.normal(0, 2e-3)))
    result = isoflop_analysis(budgets, params, losses, boot=200, seed=0)
    fr = result.frontier
    assert all(b.fitted_runs == 9 for b in result.budgets) and fr.exact_budgets == 0
    assert fr.method == "bootstrap" and np.nanstd(fr.boot_exponents) > 0
    assert not any("exactly 3" in note for note in result.notes)


def test_isoflop_parabola_flags():
    n = np.array([1e6, 3e6, 1e7, 3e7])
    concave = fit_isoflop_parabola(n, -(np.log10(n) - 7) ** 2 + 1)
    assert "no minimum" in concave.flag and math.isnan(concave.n_opt)
    inside = fit_isoflop_parabola(n, (np.log10(n) - 6.8) ** 2 + 0.1, budget=1e15)
    assert inside.used and inside.n_opt == pytest.approx(10 ** 6.8) and inside.loss_opt == pytest.approx(0.1)
    below = fit_isoflop_parabola(n, (np.log10(n) - 5.5) ** 2 + 0.1)
    assert "below the smallest" in below.flag and below.n_opt == pytest.approx(10 ** 5.5)
    # a loss that only rises with N: the parabola's minimum falls inside the sizes, yet nothing brackets it
    sizes = np.array([1.18e5, 2.72e5, 7.5e5, 1.9e6, 5.5e6])
    rising = fit_isoflop_parabola(sizes, [0.0346, 0.0381, 0.0423, 0.0572, 0.1198])
    assert sizes.min() < rising.n_opt < sizes.max() and rising.loss_opt < 0.0346
    assert not rising.used and "the best run is the smallest sampled size" in rising.flag
    falling = fit_isoflop_parabola(sizes, [0.1198, 0.0572, 0.0423, 0.0381, 0.0346])
    assert not falling.used and "largest sampled size" in falling.flag
    flat = fit_isoflop_parabola(n, [0.1] * 4)  # polyfit's curvature is rounding noise here, of either sign
    assert "the same at every size" in flat.flag and math.isnan(flat.n_opt)
    result = isoflop_analysis([1e15] * 4, n, (np.log10(n) - 6.8) ** 2 + 0.1, boot=10)
    assert result.frontier is None and "1 usable budget" in result.notes[0]


def test_a_window_fits_the_parabola_near_the_best_run():
    """Losses that rise steeply for undertrained large models: the parabola over every size puts its minimum
    below the smallest size, the one over the sizes within 0.5 decades of the best run brackets it."""
    sizes = np.array([5.85e4, 1.18e5, 2.72e5, 7.5e5, 1.9e6])
    losses = [0.04514, 0.04462, 0.05174, 0.1117, 0.1337]
    wide = fit_isoflop_parabola(sizes, losses)
    assert not wide.used and "below the smallest sampled size" in wide.flag
    near = fit_isoflop_parabola(sizes, losses, window=0.5)
    assert near.used and sizes[0] < near.n_opt < sizes[2]
    z, y = np.log10(sizes[:3]), losses[:3]  # the three runs within 0.5 decades of 118k: an exact parabola
    c2, c1, _ = np.polyfit(z, y, 2)
    assert near.n_opt == pytest.approx(10 ** (-c1 / (2 * c2)))
    lone = fit_isoflop_parabola(sizes, losses, window=0.2)
    assert not lone.used and "1 model size within 0.2 decades of the best run" in lone.flag
    result = isoflop_analysis([1e11] * 5 + [1e12] * 5, np.tile(sizes, 2), losses + [v * 0.8 for v in losses],
                              boot=20, window=0.5)
    assert all(b.used for b in result.budgets) and result.frontier is not None


def test_group_budgets():
    got = group_budgets([None, None, 1e15, None, None, 5e15], [1.02e15, 0.97e15, 1.1e15, 3.1e15, 2.9e15, 4e15])
    assert got[:3].tolist() == [1e15, 1e15, 1e15]  # near the nominal 1e15: named by it
    assert got[3] == got[4] == pytest.approx(math.sqrt(3.1e15 * 2.9e15))
    assert got[5] == 5e15
