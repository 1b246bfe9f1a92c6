"""Learning curves of runs side by side, from their ``metrics.csv`` (``logger=csv``): an A/B check of one change
(``training.fp8``, a compile mode, a schedule) on the same data, seed and steps::

    python scripts/compare_runs.py runs/fp8_bf16 runs/fp8_fp8
    python scripts/compare_runs.py runs/a runs/b metrics=train/loss,val/loss,perf/images_per_sec rows=10 \\
        out=curves.md plot=curves.png

Arguments are the runs (a run folder holding ``metrics.csv``, or the file), then ``key=value`` options:

    metrics     comma-separated metric names (train/loss,val/loss)
    rows        at most this many steps in the table, evenly spread over the logged steps, the last one
                always kept (12)
    tail        fraction of the steps at the end over which each run's metric is averaged for the summary (0.25)
    out         also write the markdown here
    plot        a PNG of the curves, one panel per metric (needs matplotlib)

The first run is the baseline. The table has one row per chosen step (a metric's cell is empty where a run
did not log it at that step); under it, for each metric, each run's mean over its last ``tail`` of logged
steps and its relative difference from the baseline's (noise of single training-loss values averages out).
Exits with status 1 and one ``error:`` line when a run has no metrics.csv, a metric is logged by none of
the runs, or an option is bad.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusion_train.cli import UsageError, parse_key_values, run_main, split_arguments  # noqa: E402
from diffusion_train.files import atomic_write, write_text  # noqa: E402

OPTIONS = {"metrics": str, "rows": int, "tail": float, "out": str, "plot": str}
DEFAULTS: dict[str, Any] = {"metrics": "train/loss,val/loss", "rows": 12, "tail": 0.25, "out": "", "plot": ""}

Curve = dict[int, float]


def parse_args(argv: list[str]) -> tuple[list[Path], dict[str, Any]]:
    positional, given = split_arguments(argv, OPTIONS)
    opts = parse_key_values(given, OPTIONS, DEFAULTS)
    runs = [Path(a) for a in positional]
    opts["metrics"] = [m.strip() for m in opts["metrics"].split(",") if m.strip()]
    if len(runs) < 2:
        raise UsageError(f"give at least two runs to compare, got {len(runs)}")
    if not opts["metrics"]:
        raise UsageError("metrics: give at least one metric name")
    if opts["rows"] < 1:
        raise UsageError(f"rows must be >= 1, got {opts['rows']}")
    if not 0 < opts["tail"] <= 1:
        raise UsageError(f"tail must be in (0, 1], got {opts['tail']}")
    return runs, opts


def read_curves(run: Path) -> dict[str, Curve]:
    """Every metric of the run's ``metrics.csv`` as {step: value}; a step logged twice keeps its last value."""
    path = run / "metrics.csv" if run.is_dir() else run
    if not path.is_file():
        raise UsageError(f"{run}: no metrics.csv (runs with logger=csv write one in their run folder)")
    curves: dict[str, Curve] = {}
    with path.open(newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            try:
                step = int(float(row["step"]))
            except (KeyError, TypeError, ValueError):
                raise UsageError(f"{path}:{line}: no step in the row") from None
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                try:
                    curves.setdefault(key, {})[step] = float(value)
                except ValueError:
                    raise UsageError(f"{path}:{line}: {key}={value!r} is not a number") from None
    return curves


def spread(steps: list[int], n: int) -> list[int]:
    """At most ``n`` of the sorted ``steps``, evenly spread, the first and last included."""
    if len(steps) <= n:
        return steps
    if n == 1:
        return steps[-1:]
    return sorted({steps[round(i * (len(steps) - 1) / (n - 1))] for i in range(n)})


def tail_mean(curve: Curve, tail: float) -> float | None:
    steps = sorted(curve)
    if not steps:
        return None
    last = steps[-max(1, math.ceil(tail * len(steps))):]
    return sum(curve[s] for s in last) / len(last)


def compare(runs: list[Path], opts: dict) -> dict:
    curves = {str(run): read_curves(run) for run in runs}
    names = [run.name if run.is_dir() else run.parent.name for run in runs]
    if len(set(names)) < len(names):
        names = [str(run) for run in runs]
    for metric in opts["metrics"]:
        if not any(metric in c for c in curves.values()):
            logged = sorted({k for c in curves.values() for k in c})
            raise UsageError(f"metric {metric!r} is logged by none of the runs (they log: {', '.join(logged)})")
    per_metric = {m: [curves[str(run)].get(m, {}) for run in runs] for m in opts["metrics"]}
    steps = sorted({s for m in opts["metrics"] for c in per_metric[m] for s in c})
    summary = {}
    for m, cs in per_metric.items():
        means = [tail_mean(c, opts["tail"]) for c in cs]
        base = means[0]
        summary[m] = [{"run": n, "tail_mean": v, "last_step": max(c) if c else None,
                       "rel_diff": (v / base - 1) if v is not None and base else None}
                      for n, v, c in zip(names, means, cs)]
    return {"runs": names, "metrics": opts["metrics"], "steps": spread(steps, opts["rows"]), "curves": per_metric,
            "summary": summary, "tail": opts["tail"]}


def markdown(result: dict) -> str:
    runs, metrics = result["runs"], result["metrics"]
    head = [f"{m} {r}" for m in metrics for r in runs]
    lines = ["| step | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for s in result["steps"]:
        cells = [f"{c[s]:.5g}" if s in c else "" for m in metrics for c in result["curves"][m]]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    tail = f"Mean over the last {result['tail']:.0%} of each run's logged steps (difference from {runs[0]}):"
    lines += ["", tail, ""]
    for m in metrics:
        words = []
        for e in result["summary"][m]:
            if e["tail_mean"] is None:
                words.append(f"{e['run']} not logged")
                continue
            diff = "" if e["run"] == runs[0] or e["rel_diff"] is None else f" ({e['rel_diff']:+.1%})"
            words.append(f"{e['run']} {e['tail_mean']:.5g}{diff}")
        lines.append(f"- {m}: " + ", ".join(words))
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise UsageError("plot= needs matplotlib (pip install matplotlib, or the scaling extra)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = result["metrics"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        for name, c in zip(result["runs"], result["curves"][m]):
            steps = sorted(c)
            ax.plot(steps, [c[s] for s in steps], label=name, marker="." if len(steps) < 30 else None)
        ax.set(title=m, xlabel="step")
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    def run(args: list[str]) -> dict:
        runs, opts = parse_args(args)
        result = compare(runs, opts)
        text = markdown(result)
        if opts["out"]:
            write_text(opts["out"], text)
        print(text, end="", flush=True)
        if opts["plot"]:
            plot(result, Path(opts["plot"]))
        return result

    return run_main(run, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
