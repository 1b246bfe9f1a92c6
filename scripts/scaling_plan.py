"""Plans an IsoFLOP sweep and writes it as a Hydra sweep config::

    python scripts/scaling_plan.py budgets=1e15,3e15,1e16 family=dit_paper batch=256 \\
        base="experiment=fmnist" name=isoflop_dit                # -> conf/sweep/isoflop_dit.yaml
    diffusion-train -m +sweep=isoflop_dit experiment=fmnist                          # locally, one job after another
    diffusion-train -m +sweep=isoflop_dit experiment=fmnist hydra/launcher=slurm     # a Slurm job array

Every argument is ``key=value``:

    budgets     training FLOPs per run, comma separated (required)
    family      dit | dit_paper | unet: the size ladder (diffusion_train/scaling/plan.py FAMILIES) (dit)
    sizes       a comma-separated subset of the family's sizes (all)
    batch       the global batch, the same for every run (64)
    lr          the learning rate (the base config's optim.lr); with inverse_width, the rate at the family's
                lr_width (dit 64, dit_paper 384, unet 16), scaled by lr_width / width for each size
    lr_rule     constant | inverse_width (constant)
    base        Hydra overrides the plan is made for, in one quoted string: the data, the patch size,
                the conditioning... (they set the image size and so the FLOPs; give them to the sweep too)
    evals       validations (and checkpoints) per run, evenly spaced (5)
    min_steps   points with fewer steps are left out (20)
    name        the sweep's name: written to conf/sweep/<name>.yaml (isoflop)
    out         write the sweep config here instead
    mfu         the model FLOPs utilisation to expect (e.g. 0.4, as scripts/benchmark.py measures it): adds
                each run's GPU-hours and the plan's total (none by default)
    peak_tflops the GPU's dense bf16 peak for mfu, in TFLOP/s (989: an H100 SXM)

Prints the grid (parameters, MACs per image, steps, LR, the compute each run lands on, with ``mfu`` its
GPU-hours), the plan's total compute and what was left out; the runs' summary.json files are what
``scripts/scaling_report.py`` fits.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from diffusion_train.cli import UsageError, parse_key_values, run_main  # noqa: E402

OPTIONS = {"budgets": str, "family": str, "sizes": str, "batch": int, "lr": float, "lr_rule": str, "base": str,
           "evals": int, "min_steps": int, "name": str, "out": str, "mfu": float, "peak_tflops": float}
DEFAULTS = {"budgets": None, "family": "dit", "sizes": "", "batch": 64, "lr": None, "lr_rule": "constant",
            "base": "", "evals": 5, "min_steps": 20, "name": "isoflop", "out": "", "mfu": None, "peak_tflops": 989.0}


def main(argv: list[str]) -> None:
    from hydra import compose, initialize_config_dir

    from diffusion_train.scaling.plan import FAMILIES, gpu_hours, isoflop_grid, size_costs, summary_line, sweep_yaml

    opts = parse_key_values(argv, OPTIONS, DEFAULTS)
    if not opts["budgets"]:
        raise UsageError("budgets=... is required, e.g. budgets=1e15,3e15,1e16")
    try:
        budgets = [float(b) for b in opts["budgets"].split(",")]
    except ValueError:
        raise UsageError(f"budgets={opts['budgets']}: not a comma-separated list of numbers") from None
    mfu, peak = opts["mfu"], opts["peak_tflops"] * 1e12
    if mfu is not None and not 0 < mfu <= 1:
        raise UsageError(f"mfu={mfu}: a fraction in (0, 1], e.g. 0.4")
    if peak <= 0:
        raise UsageError(f"peak_tflops={opts['peak_tflops']}: must be positive")
    base = shlex.split(opts["base"])
    family = opts["family"]
    if family not in FAMILIES:
        raise UsageError(f"family={family}: one of {', '.join(FAMILIES)}")

    def compose_with(extra: list[str]):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            return compose("train", overrides=[*base, *extra, f"data.batch_size={opts['batch']}"])

    lr = opts["lr"] if opts["lr"] is not None else float(compose_with([f"model={FAMILIES[family]['model']}"]).optim.lr)
    sizes = [s for s in opts["sizes"].split(",") if s] or None
    costs = size_costs(family, compose_with, sizes)
    points, skipped = isoflop_grid(costs, budgets, opts["batch"], lr, opts["lr_rule"], FAMILIES[family]["width_key"],
                                   opts["min_steps"], lr_width=FAMILIES[family]["lr_width"])
    if not points:
        raise ValueError(f"no run of the plan gets {opts['min_steps']} steps: raise the budgets or lower the batch "
                         f"({'; '.join(skipped)})")
    command = "python scripts/scaling_plan.py " + " ".join(shlex.quote(a) for a in argv)
    header = (f"# IsoFLOP plan: family {family}, budgets {', '.join(f'{b:.3g}' for b in sorted(budgets))} FLOPs, "
              f"global batch {opts['batch']}, lr {lr:g} ({opts['lr_rule']}).\n# Made by: {command}\n")
    out = Path(opts["out"]) if opts["out"] else ROOT / "conf" / "sweep" / f"{opts['name']}.yaml"
    text = sweep_yaml(points, family, opts["batch"], base, opts["evals"], header, name=out.stem)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    for p in points:
        print(summary_line(p, mfu, peak))
    total = sum(p.flops for p in points)
    print(f"total: {len(points)} runs, C={total:.3e} FLOPs" + (
        f", {gpu_hours(total, mfu, peak):.3g} GPU-hours at {mfu:.0%} MFU of {opts['peak_tflops']:g} TFLOP/s"
        if mfu else ""))
    for s in skipped:
        print(f"left out: {s}")
    print(f"wrote {out} ({len(points)} runs); run: diffusion-train -m +sweep={out.stem} {' '.join(base)}".rstrip())


if __name__ == "__main__":
    sys.exit(run_main(main))
