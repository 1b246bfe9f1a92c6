"""Plans an IsoFLOP sweep and writes it as a Hydra sweep config::

    python scripts/scaling_plan.py budgets=1e15,3e15,1e16 family=dit_paper batch=256 \\
        base="experiment=fmnist" name=isoflop_dit                # -> conf/sweep/isoflop_dit.yaml
    diffusion-train -m +sweep=isoflop_dit experiment=fmnist                          # locally, one job after another
    diffusion-train -m +sweep=isoflop_dit experiment=fmnist hydra/launcher=slurm     # a Slurm job array

    python scripts/scaling_plan.py budgets=1e15,3e15,1e16 schedule=wsd name=wsd_dit ...  # trunks and cool-downs:
    diffusion-train -m +sweep=wsd_dit experiment=fmnist                # first each size's longest run (its trunk),
    diffusion-train -m +sweep=wsd_dit_cooldowns experiment=fmnist      # then the shorter runs, branched from it

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
    schedule    cosine | wsd (cosine): the LR schedule; wsd: warm-up-stable-decay, each size's shorter runs are
                cool-downs branched from its longest run's stable phase, written to a second sweep config
                <name>_cooldowns.yaml to run after the first (diffusion_train/scaling/plan.py)
    decay       wsd: the fraction of each run's steps its rate decays over (0.2)
    min_steps   points with fewer steps are left out (20)
    name        the sweep's name: written to conf/sweep/<name>.yaml (isoflop)
    out         write the sweep config here instead
    mfu         the model FLOPs utilisation to expect (e.g. 0.4, as scripts/benchmark.py measures it): adds
                each run's GPU-hours and the plan's total (none by default)
    peak_tflops the GPU's dense bf16 peak for mfu, in TFLOP/s (989: an H100 SXM)

Prints the grid (parameters, MACs per image, steps, LR, the compute each run lands on, with ``mfu`` its
GPU-hours; with wsd what it trains itself), the plan's total compute (with wsd also what the trunks and cool-downs
spend) and what was left out; the runs' summary.json files are what
``scripts/scaling_report.py`` fits.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from diffusion_train.cli import UsageError, parse_key_values, run_main  # noqa: E402
from diffusion_train.files import write_text  # noqa: E402

OPTIONS = {"budgets": str, "family": str, "sizes": str, "batch": int, "lr": float, "lr_rule": str, "base": str,
           "evals": int, "min_steps": int, "name": str, "out": str, "mfu": float, "peak_tflops": float,
           "schedule": str, "decay": float}
DEFAULTS = {"budgets": None, "family": "dit", "sizes": "", "batch": 64, "lr": None, "lr_rule": "constant",
            "base": "", "evals": 5, "min_steps": 20, "name": "isoflop", "out": "", "mfu": None, "peak_tflops": 989.0,
            "schedule": "cosine", "decay": 0.2}


def main(argv: list[str]) -> None:
    from hydra import compose, initialize_config_dir

    from diffusion_train.scaling.plan import (
        FAMILIES, SCHEDULES, cool_downs, gpu_hours, isoflop_grid, size_costs, summary_line, sweep_yaml, thin_budgets,
    )

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
    family, schedule = opts["family"], opts["schedule"]
    if schedule not in SCHEDULES:
        raise UsageError(f"schedule={schedule}: one of {', '.join(SCHEDULES)}")
    if not 0 < opts["decay"] < 1:
        raise UsageError(f"decay={opts['decay']}: the fraction of a run's steps its rate decays over, in (0, 1)")
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
              f"global batch {opts['batch']}, lr {lr:g} ({opts['lr_rule']}), {schedule} schedule.\n"
              f"# Made by: {command}\n")
    out = Path(opts["out"]) if opts["out"] else ROOT / "conf" / "sweep" / f"{opts['name']}.yaml"
    branched = {c.point.label: c for c in cool_downs(points, opts["decay"])[1]} if schedule == "wsd" else {}
    files = {out: [p.label for p in points if p.label not in branched]}
    if branched:
        files[out.with_name(f"{out.stem}_cooldowns.yaml")] = list(branched)
    for path, jobs in files.items():
        write_text(path, sweep_yaml(points, family, opts["batch"], base, opts["evals"], header, name=out.stem,
                                    schedule=schedule, decay=opts["decay"], jobs=jobs))
    spent = 0.0
    for p in points:
        c = branched.get(p.label)
        own = p.flops * (p.steps - c.start) / p.steps if c else p.flops  # a cool-down trains its decay only
        spent += own
        print(summary_line(p, mfu, peak, own) + (f"  cool-down of {c.trunk.label} from step {c.start}: trains "
                                            f"{p.steps - c.start} steps, C={own:.3e}" if c else ""))
    total = sum(p.flops for p in points)
    print(f"total: {len(points)} runs, C={total:.3e} FLOPs"
          + (f"; trained: C={spent:.3e} ({spent / total:.0%}), the trunks and cool-downs" if branched else "")
          + (f", {gpu_hours(spent, mfu, peak):.3g} GPU-hours at {mfu:.0%} MFU of {opts['peak_tflops']:g} TFLOP/s"
             if mfu else ""))
    for s in skipped:
        print(f"left out: {s}")
    for s in thin_budgets(points, budgets):
        print(f"warning: {s}")
    # Hydra finds sweep configs in the package's conf/sweep, or in a sweep/ folder of another search path
    search = "" if out.parent.resolve() == (ROOT / "conf" / "sweep").resolve() else \
        shlex.quote(f"hydra.searchpath=[file://{out.parent.parent.resolve()}]") + " "
    for path, jobs in files.items():
        print(f"wrote {path} ({len(jobs)} runs); run: diffusion-train -m {search}+sweep={path.stem} "
              f"{' '.join(base)}".rstrip())
    if search and out.parent.name != "sweep":
        print(f"to run it, put it in a folder named sweep/ (out=DIR/sweep/{out.name}): Hydra looks for sweep configs "
              f"there")
    if branched:
        print(f"run {out.stem} first: the cool-downs of {out.stem}_cooldowns branch from its checkpoints")


if __name__ == "__main__":
    sys.exit(run_main(main))
