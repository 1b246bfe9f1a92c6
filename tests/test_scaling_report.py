"""Scaling-law fits (diffusion_train/scaling/fit.py; the IsoFLOP analysis: test_isoflop.py), the run registry
(diffusion_train/scaling/registry.py) and scripts/scaling_report.py: the fits recover known exponents from synthetic
noisy data, the report is written from fixture summary.json runs, and bad input gives one error line naming the
file."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import load_script
from diffusion_train.scaling.fit import bootstrap_saturating, fit_power_law, fit_saturating_power_law, percentile_ci
from diffusion_train.scaling.registry import FORMAT, RegistryError, load_runs, run_from_dict, wandb_summary


report = load_script("scaling_report")


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
