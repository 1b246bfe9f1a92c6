"""scripts/compare_runs.py: learning curves of two real CPU runs side by side, from their metrics.csv."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from conftest import load_script
from diffusion_train.train import train


def import_script():
    return load_script("compare_runs")


def column(run: Path, key: str) -> dict[int, float]:
    with (run / "metrics.csv").open() as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r[key]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two 8-step runs of a tiny DiT on the same data and seed, one with ten times the learning rate."""
    from conftest import TINY, compose_train

    root = tmp_path_factory.mktemp("compare")
    out = []
    for name, lr in (("base", "1e-4"), ("fast", "1e-3")):
        run = root / name
        cfg = compose_train([*TINY, "model=dit_tiny", "trainer.max_steps=8", "trainer.log_every_n_steps=2",
                             "trainer.val_check_interval=4", f"optim.lr={lr}"], run)
        train(cfg, run)
        out.append(run)
    return out


def test_table_and_tail_means_come_from_the_runs_metrics(runs, tmp_path, capsys):
    script = import_script()
    base, fast = runs
    out, png = tmp_path / "curves.md", tmp_path / "curves.png"
    assert script.main([str(base), str(fast), "rows=3", "tail=0.5", f"out={out}", f"plot={png}"]) == 0
    text = out.read_text()
    assert capsys.readouterr().out == text and png.stat().st_size > 0
    loss, val = column(base, "train/loss"), column(base, "val/loss")
    steps = sorted(set(loss) | set(val))
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| step")]
    shown = [int(r.split("|")[1]) for r in rows]
    assert len(shown) == 3 and shown[0] == steps[0] and shown[-1] == steps[-1], (shown, steps)
    last = f"| {steps[-1]} | {loss[steps[-1]]:.5g} | {column(fast, 'train/loss')[steps[-1]]:.5g} |"
    assert any(r.startswith(last) for r in rows), (last, rows)
    half = sorted(loss)[len(loss) // 2:]
    base_mean = sum(loss[s] for s in half) / len(half)
    fast_loss = column(fast, "train/loss")
    fast_mean = sum(fast_loss[s] for s in half) / len(half)
    assert f"- train/loss: base {base_mean:.5g}, fast {fast_mean:.5g} ({fast_mean / base_mean - 1:+.1%})" in text
    assert "Mean over the last 50% of each run's logged steps (difference from base)" in text


@pytest.mark.parametrize("args, message", [
    (["{base}"], "give at least two runs to compare, got 1"),
    (["{base}", "{missing}"], "missing: no metrics.csv"),
    (["{base}", "{fast}", "metrics=val/los"], "metric 'val/los' is logged by none of the runs"),
    (["{base}", "{fast}", "tail=0"], "tail must be in (0, 1], got 0.0"),
    (["{base}", "{fast}", "rows=zero"], "rows=zero: not a valid rows"),
    (["{base}", "{fast}", "metrix=val/loss"], "argument 'metrix=val/loss': expected key=value with key in metrics,"),
])
def test_bad_input_is_one_line(runs, tmp_path, capsys, args, message):
    paths = {"base": runs[0], "fast": runs[1], "missing": tmp_path / "missing"}
    assert import_script().main([a.format(**paths) for a in args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err
