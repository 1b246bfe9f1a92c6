"""Scaling-law report of a set of training runs: loss against compute per model size, IsoFLOP parabolas and
the compute-optimal frontier ``N_opt(C) = k C^a`` with bootstrap confidence intervals::

    python scripts/scaling_report.py runs/isoflop out=reports/isoflop
    python scripts/scaling_report.py runs/isoflop runs/isoflop_big metric=fd/fmnist_net_1k boot=2000
    python scripts/scaling_report.py wandb:my-team/diffusion_train out=reports/wandb

Arguments are the run sources, then ``key=value`` options (an argument is an option when the text before
its first ``=`` is one of the names below, so sweep folders like ``runs/x/budget=1e+15,size=S`` are
sources). A source is a folder (every ``summary.json`` under it, recursively), one ``summary.json``, or
``wandb:<entity>/<project>`` (the project's runs through ``wandb.Api()``; needs network and credentials,
see diffusion_train/scaling/registry.py):

    metric      the metric to fit, lower is better (val/loss)
    out         report folder (scaling_report)
    boot        bootstrap resamples for the confidence intervals (1000; 0: none)
    seed        bootstrap seed (0)
    skip        fraction of each run's images left out at the start of its history in the per-size
                fits (0.1: the first steep drop of a learning curve is not a power law)
    unfinished  true: use runs that have not reached their max_steps (false: list them, fit without them)
    window      fit each budget's parabola to the runs within this many decades of N of its best run (all)

It writes, in ``out``: ``report.md`` (the runs, the per-size fits, the IsoFLOP table, the frontier with
its 95% interval, the flagged budgets), ``loss_vs_flops.png``, ``isoflop.png``, ``frontier.png`` and
``fits.json`` (every fitted number). Runs with the same ``config_hash`` count once (the one furthest
trained); runs without the metric or with a non-finite final value are listed and left out. The fits
and flags: docs/scaling.md, section "Report". Exits with status 1 and one ``error:`` line for a missing
folder, a malformed summary.json (the file and key named), no runs, or a metric no run logged.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from diffusion_train.cli import UsageError, parse_bool, parse_key_values, run_main, split_arguments  # noqa: E402
from diffusion_train.files import atomic_write, write_text  # noqa: E402
from diffusion_train.scaling.fit import SaturatingFit  # noqa: E402
from diffusion_train.scaling.registry import Metric, RegistryError, human_count, load_runs  # noqa: E402
from diffusion_train.scaling.report import LEVEL, Analysis, analyse, sci, where  # noqa: E402

OPTIONS: dict[str, Callable[[str], Any]] = {"metric": str, "out": str, "boot": int, "seed": int, "skip": float,
                                            "unfinished": parse_bool, "window": float}
DEFAULTS: dict[str, Any] = {"metric": "val/loss", "out": "scaling_report", "boot": 1000, "seed": 0, "skip": 0.1,
                            "unfinished": False, "window": None}
FORMAT = "diffusion_train.scaling_report/1"


def parse_args(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    sources, given = split_arguments(argv, OPTIONS)
    opts = parse_key_values(given, OPTIONS, DEFAULTS)
    if not sources:
        raise UsageError("give one or more run folders (or wandb:<entity>/<project>), e.g. "
                         "scripts/scaling_report.py runs/isoflop out=report")
    if opts["boot"] < 0:
        raise UsageError(f"boot must be >= 0, got {opts['boot']}")
    if not 0 <= opts["skip"] < 1:
        raise UsageError(f"skip must be in [0, 1), got {opts['skip']}")
    if opts["window"] is not None and not opts["window"] > 0:
        raise UsageError(f"window must be > 0 (decades of N), got {opts['window']}")
    if not opts["out"]:
        raise UsageError("out must name a folder")
    return sources, opts


# ----------------------------------------------------------------------------------------------
# formatting


def num(x: float | None, digits: int = 4) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"


def interval(ci: tuple[float, float] | None, digits: int = 3) -> str:
    return "-" if ci is None or not all(map(math.isfinite, ci)) else f"[{ci[0]:.{digits}g}, {ci[1]:.{digits}g}]"


def point_label(m: Metric | None, best: bool) -> str:
    """The label of a metric's final (or best) point: what gave that value (post-hoc EMA: the width), or ''."""
    if m is None or not m.history:
        return ""
    if not best:
        return m.history[-1].label
    finite = [p for p in m.history if math.isfinite(p.value)]  # min() stalls on a NaN that comes first
    return min(finite, key=lambda p: p.value).label if finite else ""


def labelled(m: Metric | None, best: bool) -> str:
    """A Runs-table cell: the final (or best) value, with the label of its point when it has one."""
    if m is None:
        return "-"
    tag = point_label(m, best)
    return num(m.best if best else m.final) + (f" ({tag})" if tag else "")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def images_at(a: Analysis, c: float, n: float) -> float:
    fpi = a.isoflop.flops_per_image_fit
    return c / float(fpi.predict(n)) if fpi is not None and math.isfinite(n) else math.nan


def markdown(a: Analysis, sources: list[str], opts: dict) -> str:
    m, iso, fr = a.metric, a.isoflop, a.isoflop.frontier
    lines = [f"# Scaling report: {m}", "",
             f"{len(a.used)} runs used of {len(a.runs)} found in {', '.join(f'`{s}`' for s in sources)}; "
             f"{len(a.sizes)} model sizes, {len(iso.budgets)} compute budgets. Confidence intervals: {LEVEL:.0%}; "
             f"percentile bootstrap ({opts['boot']} resamples, seed {opts['seed']}) unless said otherwise. "
             "Lower is better; FLOPs are training FLOPs (6 x forward multiply-adds per image x images).", "",
             "## Compute-optimal frontier", ""]
    if fr is None:
        lines += ["No frontier fit: " + "; ".join(iso.notes), ""]
    else:
        lines += [f"- **N_opt(C) = {sci(fr.coefficient, 3)} * C^a, a = {fr.exponent:.3f} {interval(fr.ci)}** "
                  f"({fr.method} interval; {fr.boot_valid}/{fr.boot_total} bootstrap resamples kept every budget "
                  "usable; regression standard error "
                  f"{num(fr.fit.stderr, 2)}), over {len(fr.budgets)} budgets "
                  f"({', '.join(sci(c) for c in fr.budgets)})."]
        if iso.flops_per_image_fit is not None:
            g = iso.flops_per_image_fit
            lines.append(f"- Images at the optimum: D_opt = C / F(N_opt) ∝ C^b, **b = 1 - g a = "
                         f"{iso.images_exponent:.3f} {interval(iso.images_ci)}**, with F(N) = {sci(g.coefficient, 3)}"
                         f" * N^g, g = {g.exponent:.3f} (training FLOPs per image, fitted over the runs).")
        if iso.loss_frontier is not None:
            lf = iso.loss_frontier
            lines.append(f"- {m} at the optimum: L_opt(C) = {sci(lf.coefficient, 3)} * C^c, "
                         f"c = {lf.exponent:.4f} {interval(iso.loss_ci)}.")
        lines.append("")
    lines += ["![frontier](frontier.png)", "", f"## IsoFLOP: final {m} against N per budget", "",
              f"A parabola of final {m} in log10 N per budget"
              + (f", fitted to the runs within {a.window:g} decades of N of the budget's best run" if a.window else "")
              + "; its minimum is N_opt. Flagged budgets are left out of the frontier fit.", ""]
    rows = []
    for b in iso.budgets:
        rows.append([sci(b.budget), str(b.params.size), str(b.sizes), human_count(b.n_opt) if math.isfinite(b.n_opt)
                     else "-", num(b.loss_opt), sci(images_at(a, b.budget, b.n_opt)),
                     f"{human_count(b.best_params)} ({num(b.best_loss)})", "used" if b.used else f"**{b.flag}**"])
    lines += table(["budget C", "runs", "sizes", "N_opt", f"{m} at N_opt", "images at N_opt",
                    "best run: N (value)", "status"], rows)
    lines += ["![isoflop](isoflop.png)", "", f"## Per-size fits: {m} = E + A * C^(-alpha)", "",
              f"Over the logged history of every run of the size (C: cumulative training FLOPs), the first "
              f"{opts['skip']:.0%} of each run's images left out; least squares on ln {m}. The intervals "
              "resample the points, treating them as independent.", ""]
    rows = []
    for label, n in a.sizes:
        e = a.per_size[n]
        f: SaturatingFit | None = e.get("fit")
        if f is None:
            rows.append([label, human_count(n), str(e["points"]), "-", "-", "-", "-", e["note"]])
        else:
            rows.append([label, human_count(n), str(e["points"]), f"{num(f.E)} {interval(e['E_ci'])}", sci(f.A, 3),
                         f"{f.alpha:.3f} {interval(e['alpha_ci'])}", num(f.rmse_log, 2),
                         "" if f.converged else "not converged"])
    lines += table(["size", "N", "points", "E", "A", "alpha", "rmse (ln)", "note"], rows)
    lines += ["![loss vs FLOPs](loss_vs_flops.png)", "", "## Flags", ""]
    lines += [f"- {f}" for f in a.flags] or ["None."]
    lines += ["", "## Runs", ""]
    rows = []
    for r in sorted(a.runs, key=lambda r: (a.budgets.get(r.source, math.inf), r.params, r.source)):
        mt = r.metrics.get(m)
        rows.append([f"`{where(r)}`", r.label, r.model, human_count(r.params), sci(a.budgets.get(r.source, r.budget)),
                     sci(r.total_flops), sci(r.images_seen), labelled(mt, best=False), labelled(mt, best=True),
                     "yes" if r.finished else "no", r.device, f"{r.wall_time_s:.0f}",
                     a.reasons.get(r.source, "yes")])
    lines += table(["run", "size", "model", "N", "budget", "total FLOPs", "images", f"final {m}", f"best {m}",
                    "finished", "device", "wall s", "used"], rows)
    return "\n".join(lines)


def clean(x: Any) -> Any:
    """JSON-safe: numpy to Python, nan/inf to null."""
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [clean(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def fits_json(a: Analysis, sources: list[str], opts: dict) -> dict:
    iso, fr = a.isoflop, a.isoflop.frontier
    per_size = []
    for label, n in a.sizes:
        e = a.per_size[n]
        f = e.get("fit")
        per_size.append({"size": label, "params": n, "points": e["points"], "note": e.get("note"),
                         **({"E": f.E, "A": f.A, "alpha": f.alpha, "x_scale": f.x_scale, "rmse_log": f.rmse_log,
                             "converged": f.converged, "alpha_ci": e["alpha_ci"], "E_ci": e["E_ci"]} if f else {})})
    return clean({
        "format": FORMAT, "metric": a.metric, "sources": sources, "level": LEVEL,
        **{k: opts[k] for k in ("boot", "seed", "skip", "unfinished", "window")},
        "runs": [{"source": r.source, "run_dir": where(r), "size": r.label, "params": r.params,
                  "budget": a.budgets.get(r.source, r.budget), "total_flops": r.total_flops,
                  "images_seen": r.images_seen, "final": r.metrics[a.metric].final if a.metric in r.metrics else None,
                  "best": r.metrics[a.metric].best if a.metric in r.metrics else None,
                  "final_label": point_label(r.metrics.get(a.metric), best=False) or None,
                  "best_label": point_label(r.metrics.get(a.metric), best=True) or None,
                  "finished": r.finished,
                  "used": r.source not in a.reasons, "reason": a.reasons.get(r.source)} for r in a.runs],
        "per_size": per_size,
        "isoflop": [{"budget": b.budget, "runs": int(b.params.size), "sizes": b.sizes, "params": b.params,
                     "values": b.losses, "coefficients": b.coefficients, "n_opt": b.n_opt, "loss_opt": b.loss_opt,
                     "images_opt": images_at(a, b.budget, b.n_opt), "best_params": b.best_params,
                     "best_loss": b.best_loss, "used": b.used, "flag": b.flag} for b in iso.budgets],
        "frontier": None if fr is None else {
            "exponent": fr.exponent, "coefficient": fr.coefficient, "ci": fr.ci, "stderr": fr.fit.stderr,
            "ci_method": fr.method, "budgets": fr.budgets, "n_opt": fr.n_opt, "exact_budgets": fr.exact_budgets,
            "boot_valid": fr.boot_valid, "boot_total": fr.boot_total},
        "loss_frontier": None if iso.loss_frontier is None else {
            "exponent": iso.loss_frontier.exponent, "coefficient": iso.loss_frontier.coefficient, "ci": iso.loss_ci},
        "images_frontier": None if fr is None or iso.flops_per_image_fit is None else {
            "exponent": iso.images_exponent, "ci": iso.images_ci,
            "flops_per_image_exponent": iso.flops_per_image_fit.exponent,
            "flops_per_image_coefficient": iso.flops_per_image_fit.coefficient},
        "flags": a.flags,
    })


# ----------------------------------------------------------------------------------------------
# plots


def colours(n: int) -> list:
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("viridis")
    return [cmap(0.85 * i / max(n - 1, 1)) for i in range(n)]


def plot_loss_vs_flops(a: Analysis, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for (label, n), colour in zip(a.sizes, colours(len(a.sizes))):
        for i, r in enumerate(r for r in a.used if r.params == n):
            hist = [(p.flops, p.value) for p in r.metrics[a.metric].history
                    if p.flops > 0 and math.isfinite(p.value) and p.value > 0]
            name = f"{label} (N={human_count(n)})"
            if hist:
                ax.plot(*zip(*hist), color=colour, lw=1, alpha=0.7, label=None if i else name)
            ax.plot(r.total_flops, r.metrics[a.metric].final, "o", color=colour, ms=4,
                    label=None if i or hist else name)
        e = a.per_size[n]
        if e.get("fit") is not None:
            xs = np.geomspace(e["x"].min(), e["x"].max(), 100)
            ax.plot(xs, e["fit"].predict(xs), "--", color=colour, lw=1.5)
    for c in sorted({b.budget for b in a.isoflop.budgets}):
        ax.axvline(c, color="0.8", lw=0.8, ls=":", zorder=0)
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs (cumulative)", ylabel=a.metric,
           title=f"{a.metric} against compute per model size (dashed: E + A C^-alpha)")
    _save(fig, ax, path)


def _save(fig, ax, path: Path, legend: bool = True) -> None:
    """Legend, grid, layout; the PNG written and the figure closed."""
    import matplotlib.pyplot as plt

    if legend:
        ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.2)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def plot_isoflop(a: Analysis, path: Path) -> None:
    import matplotlib.pyplot as plt

    budgets = a.isoflop.budgets
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for b, colour in zip(budgets, colours(len(budgets))):
        tag = "" if b.used else " (flagged)"
        ax.plot(b.params, b.losses, "o", color=colour, label=f"C = {sci(b.budget)}{tag}")
        if math.isfinite(b.coefficients[0]):
            lo, hi = b.params.min(), b.params.max()
            if a.window:  # the parabola only where it was fitted
                lo, hi = max(lo, b.best_params / 10 ** a.window), min(hi, b.best_params * 10 ** a.window)
            if math.isfinite(b.n_opt):
                lo, hi = min(lo, b.n_opt), max(hi, b.n_opt)
            ns = np.geomspace(lo / 1.2, hi * 1.2, 200)
            ax.plot(ns, b.predict(ns), "-" if b.used else ":", color=colour, lw=1.2)
        if math.isfinite(b.n_opt):
            ax.plot(b.n_opt, b.loss_opt, "*", ms=13, color=colour if b.used else "none", mec=colour, mew=1.2)
    ax.set(xscale="log", xlabel="parameters N", ylabel=f"final {a.metric}",
           title="IsoFLOP: parabolas in log N, N_opt starred (hollow: flagged)")
    _save(fig, ax, path)


def plot_frontier(a: Analysis, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    fr = a.isoflop.frontier
    used = [b for b in a.isoflop.budgets if b.used]
    flagged = [b for b in a.isoflop.budgets if not b.used and math.isfinite(b.n_opt)]
    if used:
        ax.plot([b.budget for b in used], [b.n_opt for b in used], "o", color="C0", label="N_opt (used)")
    if flagged:
        ax.plot([b.budget for b in flagged], [b.n_opt for b in flagged], "o", mfc="none", color="C3",
                label="N_opt (flagged, extrapolated)")
    if fr is not None:
        cs = [b.budget for b in a.isoflop.budgets]
        xs = np.geomspace(min(cs) / 1.5, max(cs) * 1.5, 100)
        ax.plot(xs, fr.fit.predict(xs), "-", color="C0",
                label=f"N_opt = {sci(fr.coefficient, 3)} C^a, a = {fr.exponent:.3f} {interval(fr.ci)}".rstrip(" -"))
        lo, hi = fr.band(xs)
        if np.all(np.isfinite(lo)):
            ax.fill_between(xs, lo, hi, color="C0", alpha=0.15, label=f"{LEVEL:.0%} {fr.method} band")
    else:
        ax.text(0.5, 0.5, "no frontier fit:\n" + "\n".join(a.isoflop.notes), transform=ax.transAxes,
                ha="center", va="center")
    ax.set(xscale="log", yscale="log", xlabel="compute budget C (training FLOPs)", ylabel="N_opt (parameters)",
           title=f"compute-optimal model size ({a.metric})")
    _save(fig, ax, path, legend=bool(used or flagged or fr is not None))


# ----------------------------------------------------------------------------------------------


def report(sources: list[str], opts: dict, log: Callable[[str], None] = print) -> Path:
    """Loads the runs of ``sources``, fits, and writes the report into ``opts['out']``; returns that folder."""
    import matplotlib

    matplotlib.use("Agg")
    runs = load_runs(sources, metrics=[opts["metric"]])
    if not runs:
        raise RegistryError(f"no runs: no summary.json under {', '.join(sources)}")
    a = analyse(runs, opts["metric"], unfinished=opts["unfinished"], skip=opts["skip"], boot=opts["boot"],
                seed=opts["seed"], window=opts["window"])
    out = Path(opts["out"])
    out.mkdir(parents=True, exist_ok=True)
    plot_loss_vs_flops(a, out / "loss_vs_flops.png")
    plot_isoflop(a, out / "isoflop.png")
    plot_frontier(a, out / "frontier.png")
    write_text(out / "fits.json", json.dumps(fits_json(a, sources, opts), indent=1) + "\n")
    write_text(out / "report.md", markdown(a, sources, opts) + "\n")
    fr = a.isoflop.frontier
    headline = (f"a = {fr.exponent:.3f} {interval(fr.ci)}" if fr is not None else "no frontier fit")
    log(f"{len(a.used)}/{len(runs)} runs, {len(a.sizes)} sizes, {len(a.isoflop.budgets)} budgets; N_opt ∝ C^a: "
        f"{headline}; {len(a.flags)} flag(s); report: {out / 'report.md'}")
    return out


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda args: report(*parse_args(args)), argv)


if __name__ == "__main__":
    sys.exit(main())
