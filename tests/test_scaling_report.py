"""Scaling-law fits (diffusion_train/scaling/fit.py), the run registry (diffusion_train/scaling/registry.py)
and scripts/scaling_report.py: the fits recover known exponents from synthetic noisy data, the report is
written from fixture summary.json runs, and bad input gives one error line naming the file."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from diffusion_train.scaling.fit import (
    bootstrap_saturating,
    fit_isoflop_parabola,
    fit_power_law,
    fit_saturating_power_law,
    group_budgets,
    isoflop_analysis,
    percentile_ci,
)
from diffusion_train.scaling.registry import FORMAT, RegistryError, load_runs, run_from_dict, wandb_summary

ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("scaling_report_script", ROOT / "scripts" / "scaling_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


report = _script()


# ----------------------------------------------------------------------------------------------
# fits on synthetic data


def test_power_law_recovers_exponent():
    rng = np.random.default_rng(0)
    x = np.geomspace(1e12, 1e18, 25)
    y = 3e-4 * x ** 0.5 * np.exp(rng.normal(0, 0.01, x.size))
    f = fit_power_law(x, y)
    assert f.exponent == pytest.approx(0.5, abs=0.005)
    assert f.coefficient == pytest.approx(3e-4, rel=0.1)
    assert f.residuals.shape == x.shape and f.rmse_log < 0.02
    assert f.exponent - 3 * f.stderr < 0.5 < f.exponent + 3 * f.stderr
    assert np.allclose(fit_power_law(x, 2 * x ** -0.25).predict(x), 2 * x ** -0.25)
    with pytest.raises(ValueError, match="positive"):
        fit_power_law([1, 2], [1, -1])
    with pytest.raises(ValueError, match="2 distinct"):
        fit_power_law([3, 3], [1, 2])


def test_saturating_power_law_recovers_alpha_and_E():
    rng = np.random.default_rng(1)
    x = np.geomspace(1e13, 1e17, 30)
    E, A, alpha = 0.05, 40.0, 0.12  # the reducible part falls from ~1.1 to ~0.13
    y = (E + A * x ** -alpha) * np.exp(rng.normal(0, 0.003, x.size))
    f = fit_saturating_power_law(x, y)
    assert f.converged
    assert f.alpha == pytest.approx(alpha, abs=0.01)
    assert f.E == pytest.approx(E, abs=0.01)
    assert f.A == pytest.approx(A, rel=0.3)
    assert np.allclose(f.predict(x), y, rtol=0.02)
    samples = bootstrap_saturating(x, y, f, boot=100, seed=0)
    lo, hi = percentile_ci(samples[:, 2])
    assert lo <= f.alpha <= hi and hi - lo < 0.05
    assert lo - 0.01 <= alpha <= hi + 0.01


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
    assert fr.exact_budgets == 4 and fr.method == "regression" and "exactly 3 sizes" in result.notes[0]
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


# ----------------------------------------------------------------------------------------------
# fixture runs and the report


SIZES = {"S": 1e6, "M": 3e6, "L": 1e7, "XL": 3e7}
TOKENS = 64  # forward MACs per image = N x tokens


def fixture_loss(n: float, images: float) -> float:
    """E + A/N^0.3 + B/D^0.3: N_opt ∝ C^0.5, inside S..XL for budgets 1e15..1e16."""
    return 0.03 + 5.1 / n ** 0.3 + 3.6 / images ** 0.3


def summary(size: str, budget: float | None, *, rng, finished: bool = True, frac: float = 1.0,
            points: int = 8, metric: str = "val/loss", run_name: str = "isoflop") -> dict:
    n = SIZES[size]
    macs = int(n * TOKENS)
    fpi = 6 * macs
    batch = 64
    steps = int(round((budget or 3e15) / fpi / batch * frac))
    images = steps * batch
    history = []
    for k in range(1, points + 1):
        step = steps * k // points
        value = fixture_loss(n, step * batch) * (1 + rng.normal(0, 0.003))
        history.append({"step": step, "images": step * batch, "flops": step * batch * fpi, "value": value})
    values = [p["value"] for p in history]
    run_dir = f"runs/{run_name}/budget={budget:g},size={size}"
    return {
        "format": FORMAT, "run_dir": run_dir, "run_name": run_name,
        "config_hash": f"{hash((size, budget, run_name, frac)) & 0xffffffffffff:012x}", "model": "DiT",
        "params": int(n), "forward_macs_per_image": macs, "flops_per_image": fpi, "global_batch": batch,
        "steps": steps, "images_seen": images, "total_flops": images * fpi,
        "scaling": {"budget": budget, "size": size, "family": "dit"},
        "metrics": {metric: {"final": values[-1], "best": min(values), "history": history}},
        "wall_time_s": 12.5, "device": "cpu", "world_size": 1, "finished": finished,
    }


def write(root: Path, d: dict, name: str | None = None) -> Path:
    folder = root / (name or d["run_dir"].split("/", 2)[-1])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(d))
    return folder / "summary.json"


def fixture_runs(root: Path, seed: int = 0) -> None:
    """4 sizes x 3 budgets (1e15, 3e15, 1e16) in two folders, a budget (3e17) whose optimum is above XL,
    and an unfinished run."""
    rng = np.random.default_rng(seed)
    for budget in (1e15, 3e15, 1e16, 3e17):
        for size in SIZES:
            write(root / ("a" if budget < 3e15 else "b"), summary(size, budget, rng=rng))
    write(root / "b", summary("M", 3e16, rng=rng, finished=False, frac=0.4), name="running")


def test_report_from_fixture_runs(tmp_path, capsys):
    fixture_runs(tmp_path / "runs")
    out = tmp_path / "report"
    assert report.main([str(tmp_path / "runs" / "a"), str(tmp_path / "runs" / "b"), f"out={out}", "boot=200",
                        "seed=1"]) == 0
    assert "N_opt ∝ C^a" in capsys.readouterr().out
    for name in ("loss_vs_flops.png", "isoflop.png", "frontier.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    fits = json.loads((out / "fits.json").read_text())
    assert {"format", "metric", "runs", "per_size", "isoflop", "frontier", "loss_frontier", "images_frontier",
            "flags", "boot", "seed"} <= set(fits)
    assert fits["metric"] == "val/loss" and len(fits["runs"]) == 17
    assert sum(r["used"] for r in fits["runs"]) == 16
    assert [s["size"] for s in fits["per_size"]] == ["S", "M", "L", "XL"]
    for s in fits["per_size"]:
        assert 0.15 < s["alpha"] < 0.6 and s["alpha_ci"][0] <= s["alpha"] <= s["alpha_ci"][1]
    iso = {b["budget"]: b for b in fits["isoflop"]}
    assert [c for c, b in iso.items() if b["used"]] == [1e15, 3e15, 1e16]
    assert not iso[3e17]["used"] and "above the largest" in iso[3e17]["flag"]
    fr = fits["frontier"]
    assert set(fr) >= {"exponent", "coefficient", "ci", "stderr", "budgets", "n_opt", "boot_valid", "boot_total"}
    assert fr["exponent"] == pytest.approx(0.5, abs=0.1) and fr["ci"][0] <= fr["exponent"] <= fr["ci"][1]
    md = (out / "report.md").read_text()
    for text in ("# Scaling report: val/loss", "## Compute-optimal frontier", "## IsoFLOP", "## Per-size fits",
                 "## Flags", "## Runs", "budget 3.0e17: minimum above the largest sampled size",
                 "unfinished (unfinished=true uses it)", "![frontier](frontier.png)", "| S | 1M |"):
        assert text in md, text


def test_analyse_from_the_package_as_the_report_does(tmp_path):
    """The analysis the docs offer for notebooks gives the report's numbers and reasons without writing files."""
    from diffusion_train.scaling.report import analyse

    fixture_runs(tmp_path / "runs")
    a = analyse(load_runs([tmp_path / "runs"]), "val/loss", boot=0)
    assert len(a.runs) == 17 and len(a.used) == 16 and a.reasons == {
        str(tmp_path / "runs" / "b" / "running" / "summary.json"): "unfinished (unfinished=true uses it)"}
    assert [label for label, _ in a.sizes] == ["S", "M", "L", "XL"]
    assert a.isoflop.frontier.exponent == pytest.approx(0.5, abs=0.1)
    assert any("minimum above the largest sampled size" in f for f in a.flags)
    assert len(analyse(load_runs([tmp_path / "runs"]), "val/loss", boot=0, unfinished=True).used) == 17
    assert not list(tmp_path.glob("**/*.png"))


def test_report_inputs_with_equals_and_metric_choice(tmp_path):
    """Sweep folders named key=value are sources; another metric; duplicates (same config_hash) count once;
    runs without scaling.budget are grouped by their total FLOPs; boot=0 gives no intervals."""
    rng = np.random.default_rng(3)
    root = tmp_path / "runs" / "sweep=1"
    for budget, sizes in ((1e15, ("S", "M", "L")), (1e16, ("M", "L", "XL"))):  # sizes around each optimum
        for size in sizes:
            d = summary(size, budget, rng=rng, metric="fd/net")
            d["scaling"]["budget"] = None
            write(root, d)
    dup = write(tmp_path / "copy", json.loads(next(root.rglob("summary.json")).read_text()))
    inner = next(root.rglob("summary.json")).parent  # a source inside another: its run is loaded once
    assert len(load_runs([root, inner])) == len(load_runs([root])) == 6
    out = tmp_path / "out=x"
    assert report.main([str(root), str(dup), "metric=fd/net", f"out={out}", "boot=0"]) == 0
    fits = json.loads((out / "fits.json").read_text())
    assert sum(r["used"] for r in fits["runs"]) == 6
    assert any("duplicate of" in (r["reason"] or "") for r in fits["runs"])
    assert len(fits["isoflop"]) == 2 and all(b["used"] for b in fits["isoflop"])
    assert fits["frontier"]["ci"] == [None, None]


def test_the_best_point_s_label_skips_nan_values():
    point = lambda value, label: SimpleNamespace(value=value, label=label)  # noqa: E731
    m = SimpleNamespace(history=[point(math.nan, ""), point(0.01, "sigma_rel=0.1"), point(0.02, "sigma_rel=0.05")])
    assert report.point_label(m, best=True) == "sigma_rel=0.1" and report.point_label(m, best=False) == "sigma_rel=0.05"


def test_peak_flops_names_the_variant_before_the_family():
    from diffusion_train.scaling.flops import peak_flops

    assert peak_flops("NVIDIA H200 NVL")[0] == peak_flops("NVIDIA H100 NVL")[0] == 835e12
    assert peak_flops("NVIDIA H200")[0] == peak_flops("NVIDIA H100 80GB HBM3")[0] == 989e12
    assert "GH200" in peak_flops("NVIDIA GH200 480GB")[1] and peak_flops("NVIDIA H100 PCIe")[0] == 756e12


def test_bad_inputs_give_one_line_naming_the_file(tmp_path, capsys):
    good = summary("S", 1e15, rng=np.random.default_rng(0))
    no_params = {k: v for k, v in good.items() if k != "params"}
    bad_budget = {**good, "scaling": {**good["scaling"], "budget": "lots"}}
    bad_history = json.loads(json.dumps(good))
    del bad_history["metrics"]["val/loss"]["history"][2]["flops"]
    (tmp_path / "empty").mkdir()
    cases = [([str(tmp_path / "missing")], f"error: {tmp_path / 'missing'}: no such directory"),
             ([str(tmp_path / "empty")], f"error: no runs: no summary.json under {tmp_path / 'empty'}"),
             ([str(write(tmp_path / "p", no_params, ".").parent)],
              f"error: {tmp_path / 'p' / 'summary.json'}: missing key 'params'"),
             ([str(write(tmp_path / "b", bad_budget, ".").parent)],
              f"error: {tmp_path / 'b' / 'summary.json'}: bad key 'scaling.budget': expected a positive number"),
             ([str(write(tmp_path / "h", bad_history, ".").parent)],
              f"error: {tmp_path / 'h' / 'summary.json'}: missing key 'metrics.val/loss.history[2].flops'"),
             ([str(write(tmp_path / "f", {**good, "format": "other/2"}, ".").parent)],
              f"error: {tmp_path / 'f' / 'summary.json'}: bad key 'format'"),
             ([str(write(tmp_path / "g", good, ".").parent), "metric=fd/x"],
              "error: no usable run for metric 'fd/x' among 1 runs (metrics logged: val/loss"),
             ([str(tmp_path / "g"), "boot=-1"], "error: boot must be >= 0"),
             ([str(tmp_path / "g"), "window=0"], "error: window must be > 0 (decades of N), got 0.0"),
             ([f"out={tmp_path}"], "error: give one or more run folders")]
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "summary.json").write_text("{not json")
    cases.append(([str(tmp_path / "j")], f"error: {tmp_path / 'j' / 'summary.json'}: not valid JSON"))
    for argv, expected in cases:
        assert report.main([*argv, f"out={tmp_path / 'out'}"] if not argv[0].startswith("out=") else argv) == 1
        err = capsys.readouterr().err
        assert err.startswith(expected) and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "out").exists()


def test_wandb_summary_from_a_stand_in_run():
    """The W&B source cannot be reached offline: its conversion is checked on a stand-in run object."""
    good = summary("M", 3e15, rng=np.random.default_rng(0))
    scalars = {k: v for k, v in good.items() if k not in ("metrics", "scaling")}
    rows = [{"val/loss": p["value"], "trainer/global_step": p["step"]} for p in
            good["metrics"]["val/loss"]["history"]]
    run = SimpleNamespace(id="abc123", name="isoflop", summary=scalars, config={"scaling": good["scaling"]},
                          scan_history=lambda keys: [r for r in rows if all(k in r for k in keys)])
    rec = run_from_dict(wandb_summary(run, "team/proj", ["val/loss"]), "wandb:team/proj/abc123")
    assert rec.params == good["params"] and rec.budget == 3e15 and rec.size == "M"
    m = rec.metrics["val/loss"]
    assert m.final == good["metrics"]["val/loss"]["final"] and m.best == good["metrics"]["val/loss"]["best"]
    assert [p.flops for p in m.history] == [p["flops"] for p in good["metrics"]["val/loss"]["history"]]
    del run.summary["total_flops"]
    with pytest.raises(RegistryError, match=r"^wandb:team/proj/abc123: missing key 'total_flops'$"):
        run_from_dict(wandb_summary(run, "team/proj", ["val/loss"]), "wandb:team/proj/abc123")
    with pytest.raises(RegistryError, match="expected wandb:<entity>/<project>"):
        load_runs(["wandb:justaproject"])


def test_post_hoc_ema_records_give_the_lowest_loss_over_widths_as_a_metric(tmp_path):
    """scripts/posthoc_ema.py validate=true writes posthoc_ema/step_<N>.json beside a run's checkpoints; the registry
    turns them into val/loss_posthoc_ema (the lowest loss over the widths made at each step), which the report fits
    like any logged metric. Records made without validation are skipped; a malformed one is a one-line error."""
    from diffusion_train.scaling.registry import POSTHOC_METRIC

    rng = np.random.default_rng(0)
    root = tmp_path / "runs"
    for budget in (1e15, 3e15, 1e16):
        for size in SIZES:
            d = summary(size, budget, rng=rng)
            folder = write(root, d).parent / "posthoc_ema"
            folder.mkdir()
            final = d["metrics"]["val/loss"]["final"]
            half = d["steps"] // 2
            for step, losses in ((half, None), (d["steps"], (final * 0.99, final * 0.97, final * 0.98))):
                averages = {}
                for i, s in enumerate((0.05, 0.1, 0.15)):
                    averages[f"sigma_rel_{s}"] = {"sigma_rel": s, "fit_error": 0.01}
                    if losses:
                        averages[f"sigma_rel_{s}"]["val_loss"] = losses[i]
                (folder / f"step_{step:07d}.json").write_text(json.dumps({"step": step, "averages": averages}))
    runs = load_runs([root])
    for r in runs:
        m = r.metrics[POSTHOC_METRIC]
        assert [p.step for p in m.history] == [r.steps]  # the record at half the run had no validation losses
        assert m.final == m.best == pytest.approx(r.metrics["val/loss"].final * 0.97)
        assert m.history[0].label == "sigma_rel_0.1"  # the width that gave the lowest loss
        assert m.history[0].images == r.steps * r.global_batch and m.history[0].flops == r.total_flops
    out = tmp_path / "report"
    assert report.main([str(root), f"metric={POSTHOC_METRIC}", f"out={out}", "boot=0"]) == 0
    fits = json.loads((out / "fits.json").read_text())
    assert fits["metric"] == POSTHOC_METRIC and sum(r["used"] for r in fits["runs"]) == 12
    assert {(r["final_label"], r["best_label"]) for r in fits["runs"]} == {("sigma_rel_0.1", "sigma_rel_0.1")}
    runs_table = (out / "report.md").read_text().split("## Runs")[1]
    assert runs_table.count(" (sigma_rel_0.1) |") == 2 * 12  # final and best of each run, with its width
    assert fits["frontier"]["exponent"] == pytest.approx(0.5, abs=0.15)

    folder = next(root.rglob("posthoc_ema"))  # one run's last record remade without validation: its metric is older
    steps = sorted(int(p.stem.split("_")[1]) for p in folder.glob("step_*.json"))
    half, last = (json.loads((folder / f"step_{s:07d}.json").read_text()) for s in steps)
    assert "val_loss" not in str(half) and "val_loss" in str(last)
    (folder / f"step_{steps[0]:07d}.json").write_text(json.dumps({**last, "step": steps[0]}))
    (folder / f"step_{steps[-1]:07d}.json").write_text(json.dumps(half | {"step": steps[-1]}))
    assert report.main([str(root), f"metric={POSTHOC_METRIC}", f"out={out}", "boot=0"]) == 0
    flags = json.loads((out / "fits.json").read_text())["flags"]
    assert [f for f in flags if "from before their last step" in f] == [
        f"1 run(s) with {POSTHOC_METRIC} from before their last step, e.g. {folder.parent}: step {steps[0]} of "
        f"{steps[-1]} (run scripts/posthoc_ema.py validate=true on the last)"]

    # a width that diverged (NaN) is passed over at its step, and a step with no finite loss is never the best
    nan = {"val_loss": math.nan}
    (folder / "step_0000001.json").write_text(json.dumps({"step": 1, "averages": {"sigma_rel_0.1": nan}}))
    last = {**last, "averages": {"sigma_rel_0.03": nan, **last["averages"]}}
    (folder / f"step_{steps[-1]:07d}.json").write_text(json.dumps(last))
    [run] = [r for r in load_runs([root]) if Path(r.source).parent == folder.parent]
    m = run.metrics[POSTHOC_METRIC]
    assert [p.step for p in m.history] == [1, steps[0], steps[-1]] and math.isnan(m.history[0].value)
    assert m.history[-1].label == "sigma_rel_0.1"
    assert m.final == m.best == pytest.approx(run.metrics["val/loss"].final * 0.97)

    bad = folder / "step_0000001.json"
    bad.write_text(json.dumps({"step": 1, "averages": {"sigma_rel_0.1": {"val_loss": "low"}}}))
    with pytest.raises(RegistryError,
                       match=r"step_0000001.json: bad key 'averages.sigma_rel_0.1.val_loss': expected a number"):
        load_runs([root])
