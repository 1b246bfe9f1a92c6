"""The analysis of a scaling report (``scripts/scaling_report.py``): which runs count, the per-size saturating fits,
the IsoFLOP parabolas and frontier (:mod:`diffusion_train.scaling.isoflop`), and the flags on what looks wrong."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffusion_train.scaling.fit import ALPHA_BOUNDS, bootstrap_saturating, fit_saturating_power_law, percentile_ci
from diffusion_train.scaling.isoflop import IsoFlopResult, group_budgets, isoflop_analysis
from diffusion_train.scaling.registry import POSTHOC_METRIC, RegistryError, Run, human_count

LEVEL = 0.95  # of the bootstrap intervals
BUDGET_TOLERANCE = 0.2  # flag runs whose total FLOPs are this far from their nominal budget


@dataclass
class Analysis:
    """What the report shows: the runs (all loaded; ``reasons``: why a run is left out, by source), the
    used runs with their compute budget (by source), the sizes ``(label, N)`` by N, the per-size fits
    (by N), the IsoFLOP result, the ``window`` its parabolas were fitted in and the flags."""

    metric: str
    runs: list[Run]
    reasons: dict[str, str]
    used: list[Run]
    budgets: dict[str, float]
    sizes: list[tuple[str, int]]
    per_size: dict[int, dict] = field(default_factory=dict)
    isoflop: IsoFlopResult | None = None
    window: float | None = None  # decades of N around each budget's best run that its parabola fits
    flags: list[str] = field(default_factory=list)


def select(runs: list[Run], metric: str, unfinished: bool) -> dict[str, str]:
    """Why each left-out run is left out (by source)."""
    reasons: dict[str, str] = {}
    for r in runs:
        m = r.metrics.get(metric)
        if m is None:
            reasons[r.source] = f"no {metric}"
        elif not math.isfinite(m.final) or m.final <= 0:
            reasons[r.source] = f"final {metric} is {m.final} (needs a finite positive value)"
        elif not r.finished and not unfinished:
            reasons[r.source] = "unfinished (unfinished=true uses it)"
    best: dict[str, Run] = {}
    for r in runs:
        if r.source in reasons or not r.config_hash:
            continue
        other = best.get(r.config_hash)
        if other is None or r.images_seen > other.images_seen:
            if other is not None:
                reasons[other.source] = f"duplicate of {r.source} (same config_hash, trained further)"
            best[r.config_hash] = r
        else:
            reasons[r.source] = f"duplicate of {other.source} (same config_hash)"
    return reasons


def curve_points(runs: list[Run], metric: str, skip: float) -> tuple[np.ndarray, np.ndarray]:
    """(FLOPs, value) of the runs' histories past ``skip`` of their images (a run without history: its final)."""
    xs, ys = [], []
    for r in runs:
        pts = [(p.flops, p.value) for p in r.metrics[metric].history
               if p.flops > 0 and math.isfinite(p.value) and p.value > 0 and p.images >= skip * r.images_seen]
        if not pts and r.total_flops > 0:
            pts = [(r.total_flops, r.metrics[metric].final)]
        for x, y in pts:
            xs.append(x)
            ys.append(y)
    return np.array(xs, dtype=float), np.array(ys, dtype=float)


def analyse(runs: list[Run], metric: str = "val/loss", *, unfinished: bool = False, skip: float = 0.1,
            boot: int = 1000, seed: int = 0, window: float | None = None) -> Analysis:
    """Fits ``metric`` of ``runs``: a saturating power law per size over the histories past ``skip`` of each
    run's images, IsoFLOP parabolas per budget (within ``window`` decades of N of its best run) and the
    compute-optimal frontier, with ``boot`` bootstrap resamples for the intervals (seed ``seed``). Runs without
    the metric, with a non-finite final value, duplicated or unfinished (unless ``unfinished``) are left out
    with their reason; what looks wrong is flagged."""
    if not runs:
        raise RegistryError("no runs found")
    reasons = select(runs, metric, unfinished)
    used = [r for r in runs if r.source not in reasons]
    if not used:
        logged = sorted({name for r in runs for name in r.metrics})
        raise RegistryError(f"no usable run for metric {metric!r} among {len(runs)} runs "
                            f"(metrics logged: {', '.join(logged) or 'none'}; "
                            f"first reason: {next(iter(reasons.values()))})")
    groups = group_budgets([r.budget for r in used], [r.total_flops for r in used])
    budgets = {r.source: float(c) for r, c in zip(used, groups)}
    labels: dict[int, str] = {}
    for r in sorted(used, key=lambda r: r.params):
        labels.setdefault(r.params, r.label)
    a = Analysis(metric=metric, runs=runs, reasons=reasons, used=used, budgets=budgets,
                 sizes=sorted(((lab, n) for n, lab in labels.items()), key=lambda t: t[1]))

    for label, n in a.sizes:
        x, y = curve_points([r for r in used if r.params == n], metric, skip)
        entry: dict[str, Any] = {"size": label, "params": n, "points": int(x.size), "x": x, "y": y}
        if np.unique(x).size < 4:
            entry["note"] = f"{np.unique(x).size} distinct FLOP values (the fit needs 4)"
        else:
            try:
                f = fit_saturating_power_law(x, y)
            except ValueError as e:
                entry["note"] = f"fit failed: {e}"
                a.flags.append(f"size {label}: the saturating fit failed ({e})")
                a.per_size[n] = entry
                continue
            samples = bootstrap_saturating(x, y, f, boot=boot, seed=seed) if boot else None
            entry.update(fit=f, alpha_ci=percentile_ci(samples[:, 2], LEVEL) if samples is not None else None,
                         E_ci=percentile_ci(samples[:, 0], LEVEL) if samples is not None else None)
            if not f.converged:
                a.flags.append(f"size {label}: the saturating fit did not converge")
            if np.isclose(f.alpha, ALPHA_BOUNDS[1]) or np.isclose(f.alpha, ALPHA_BOUNDS[0]):
                a.flags.append(f"size {label}: alpha = {f.alpha:.3g} is at a bound of the fit")
        a.per_size[n] = entry

    a.isoflop = isoflop_analysis([budgets[r.source] for r in used], [r.params for r in used],
                                 [r.metrics[metric].final for r in used],
                                 flops_per_image=[r.flops_per_image for r in used], boot=boot, seed=seed,
                                 level=LEVEL, window=window)
    a.window = window
    for b in a.isoflop.budgets:
        if b.flag:
            extra = f" (N_opt = {human_count(b.n_opt)})" if math.isfinite(b.n_opt) else ""
            a.flags.append(f"budget {sci(b.budget)}: {b.flag}{extra}; left out of the frontier fit")
    a.flags.extend(a.isoflop.notes)
    far = [r for r in used if r.budget and abs(r.total_flops / r.budget - 1) > BUDGET_TOLERANCE]
    if far:
        a.flags.append(f"{len(far)} run(s) more than {BUDGET_TOLERANCE:.0%} off their nominal budget, e.g. "
                       f"{where(far[0])}: {sci(far[0].total_flops)} FLOPs for {sci(far[0].budget)}")
    early = [r for r in used if r.metrics[metric].history and r.metrics[metric].history[-1].step < r.steps] \
        if metric == POSTHOC_METRIC else []
    if early:  # the script ran before the run's end, or its last record was remade without validate=true
        step = early[0].metrics[metric].history[-1].step
        a.flags.append(f"{len(early)} run(s) with {metric} from before their last step, e.g. {where(early[0])}: "
                       f"step {step} of {early[0].steps} (run scripts/posthoc_ema.py validate=true on the last)")
    for what, values in (("model classes", {r.model for r in used}),
                         ("scaling families", {r.family for r in used if r.family})):
        if len(values) > 1:
            a.flags.append(f"the runs mix {what} ({', '.join(sorted(values))}): the fits assume one family")
    return a


def sci(x: float | None, digits: int = 2) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    mant, exp = f"{x:.{digits - 1}e}".split("e")
    return f"{mant}e{int(exp)}"


def where(r) -> str:
    """The run's folder as it was found (relative when given relative), else its recorded run_dir."""
    source = Path(r.source)
    return str(source.parent) if source.name == "summary.json" else r.run_dir
