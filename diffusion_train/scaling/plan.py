"""IsoFLOP planning: for each compute budget, every model size of a family trained for the steps that
spend exactly that budget at a fixed batch; written as a Hydra sweep (``scripts/scaling_plan.py``).

A run's training compute is ``C = 6 x forward MACs per image x batch x steps`` (the accounting of
``flops.py`` and ``training.summary.RunSummary``), so ``steps = round(C / (6 x MACs x batch))`` and the
run lands on its budget up to that rounding (points that would miss it by more than ``tolerance``, or
that get fewer than ``min_steps`` steps, are left out and reported).

Learning rate rule (documented, one of): ``constant`` (every size at ``lr``) or ``inverse_width``
(``lr x width_0 / width``, width_0 the family's ``lr_width``, the same whatever sizes a plan samples: the Adam
scaling of hidden weights that keeps
the per-step update size constant as width grows, the rule of muP without its other parts). The batch
is fixed across the grid. The LR schedule is, with ``schedule=cosine``, a cosine with a 5% warm-up ending at each
run's own last step (as a compute-optimal run of that length would be trained); with ``schedule=wsd``,
warm-up-stable-decay: each size's longest run (its trunk) trains from scratch, and its shorter runs branch from the
trunk's checkpoints in its stable phase and only decay over their last ``decay`` fraction of steps (cool-downs,
Hägele et al. 2024), which spends a fraction of the compute of training each from scratch. A cool-down's rates and
data are those of the same run trained straight, so it is that run (``init.branch_from``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig

# Model families: size label -> model overrides. "width_key" is the LR rule's width; "lr_width" the width at which
# a plan's lr applies as given (inverse_width scales it by lr_width / width).
FAMILIES: dict[str, dict] = {
    # A DiT width/depth ladder for small images (head width 24-32), about 0.4 decades apart in parameters;
    # model=dit with the config's patch size (set model.patch_size in the base overrides).
    "dit": {"model": "dit", "width_key": "hidden_size", "lr_width": 64, "sizes": {
        "XXXS": {"hidden_size": 32, "depth": 2, "num_heads": 1},
        "XXS": {"hidden_size": 48, "depth": 2, "num_heads": 2},
        "XS": {"hidden_size": 64, "depth": 3, "num_heads": 2},
        "S": {"hidden_size": 96, "depth": 4, "num_heads": 3},
        "M": {"hidden_size": 128, "depth": 6, "num_heads": 4},
        "L": {"hidden_size": 192, "depth": 8, "num_heads": 6},
        "XL": {"hidden_size": 256, "depth": 10, "num_heads": 8},
        "XXL": {"hidden_size": 384, "depth": 12, "num_heads": 12}}},
    # The DiT paper's ladder (S/B/L/XL), for ImageNet-scale budgets.
    "dit_paper": {"model": "dit", "width_key": "hidden_size", "lr_width": 384, "sizes": {
        "S": {"hidden_size": 384, "depth": 12, "num_heads": 6},
        "B": {"hidden_size": 768, "depth": 12, "num_heads": 12},
        "L": {"hidden_size": 1024, "depth": 24, "num_heads": 16},
        "XL": {"hidden_size": 1152, "depth": 28, "num_heads": 16}}},
    # An ADM U-Net channel ladder (channel_mult and depth from the base config's model=unet).
    "unet": {"model": "unet", "width_key": "model_channels", "lr_width": 16, "sizes": {
        "XS": {"model_channels": 16, "num_heads": 2}, "S": {"model_channels": 24, "num_heads": 2},
        "M": {"model_channels": 32, "num_heads": 4}, "L": {"model_channels": 48, "num_heads": 4},
        "XL": {"model_channels": 64, "num_heads": 4}, "XXL": {"model_channels": 96, "num_heads": 4}}},
}
LR_RULES = ("constant", "inverse_width")
SCHEDULES = ("cosine", "wsd")


@dataclass
class Point:
    """One run of the grid."""

    budget: float
    size: str
    model: dict
    params: int
    forward_macs: int
    steps: int
    lr: float
    flops: float  # what the run spends: steps x batch x 6 x forward MACs

    @property
    def label(self) -> str:
        """``C<budget>_<size>``, e.g. C1e12_S or C1p5e12_S: a config key and a directory name."""
        return f"C{self.budget:.3g}_{self.size}".replace("+", "").replace(".", "p")


def size_costs(family: str, compose, sizes: list[str] | None = None) -> list[tuple[str, dict, int, int]]:
    """(size, model overrides, trainable backbone parameters, forward MACs per image) of each size; the
    backbone is built on the meta device (no memory), the conditioner and autoencoder as configured
    (they size it), from ``compose(overrides) -> DictConfig``."""
    from hydra.utils import instantiate

    from diffusion_train.conditioning.autoencoder import Autoencoder
    from diffusion_train.scaling.flops import forward_macs
    from diffusion_train.training.build import build_backbone
    from diffusion_train.training.summary import context_len

    spec = _family(family)
    chosen = sizes or list(spec["sizes"])
    unknown = [s for s in chosen if s not in spec["sizes"]]
    if unknown:
        raise ValueError(f"sizes {unknown} are not in family {family!r} (sizes: {', '.join(spec['sizes'])})")
    out = []
    for size in chosen:
        overrides = dict(spec["sizes"][size])
        cfg: DictConfig = compose([f"model={spec['model']}", *(f"model.{k}={v}" for k, v in overrides.items())])
        if spec["model"] == "dit":
            cfg.model.size = None
        conditioner = instantiate(cfg.conditioning, _convert_="all")
        autoencoder = instantiate(cfg.autoencoder, _convert_="all") if cfg.get("autoencoder") else Autoencoder()
        with torch.device("meta"):  # the backbone only: no memory for the big ones
            backbone = build_backbone(cfg, conditioner, autoencoder)
        length = context_len(conditioner) if getattr(backbone, "context_dim", 0) else None
        params = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
        out.append((size, overrides, int(params), int(forward_macs(backbone, context_len=length))))
    return out


def isoflop_grid(costs: list[tuple[str, dict, int, int]], budgets: list[float], batch: int, lr: float,
                 lr_rule: str = "constant", width_key: str = "hidden_size", min_steps: int = 20,
                 tolerance: float = 0.05, lr_width: float | None = None) -> tuple[list[Point], list[str]]:
    """The grid's points (budget-major, sizes in ladder order) and what was left out, and why. ``lr_width``: the
    width at which ``lr`` applies as given (needed by ``inverse_width``; see ``FAMILIES``)."""
    if lr_rule not in LR_RULES:
        raise ValueError(f"lr_rule must be one of {', '.join(LR_RULES)}, got {lr_rule!r}")
    if batch < 1 or not budgets or any(b <= 0 for b in budgets):
        raise ValueError(f"need batch >= 1 and positive budgets, got batch={batch}, budgets={budgets}")
    if lr_rule == "inverse_width" and not lr_width:
        raise ValueError("lr_rule=inverse_width needs lr_width, the width at which lr applies as given")
    points, skipped = [], []
    for budget in sorted(budgets):
        for size, model, params, macs in costs:
            per_step = 6.0 * macs * batch
            steps = int(round(budget / per_step))
            landed = steps * per_step
            if steps < min_steps:
                skipped.append(f"{size} at {budget:.3g} FLOPs: {budget / per_step:.1f} steps (min_steps={min_steps})")
                continue
            if abs(landed - budget) > tolerance * budget:
                skipped.append(f"{size} at {budget:.3g} FLOPs: {steps} steps spend {landed:.3g} FLOPs, more than "
                               f"{tolerance:.0%} off")
                continue
            rate = lr * (lr_width / model[width_key] if lr_rule == "inverse_width" else 1.0)
            points.append(Point(budget=float(budget), size=size, model=model, params=params, forward_macs=macs,
                                steps=steps, lr=float(f"{rate:.4g}"), flops=landed))
    labels = [p.label for p in points]
    clash = sorted({label for label in labels if labels.count(label) > 1})
    if clash:
        raise ValueError(f"budgets {sorted(budgets)} give runs the same label ({', '.join(clash)}): the labels keep 3 "
                         "significant digits of the budget; choose budgets that differ in them")
    return points, skipped


def thin_budgets(points: list[Point], budgets: list[float]) -> list[str]:
    """Why each budget with runs of fewer than 3 sizes (``MIN_SIZES``) gives no IsoFLOP parabola, hence no N_opt:
    its spending is still planned (a study may add sizes later), but the plan says so before the compute is spent."""
    from diffusion_train.scaling.isoflop import MIN_SIZES

    out = []
    for budget in sorted(budgets):
        sizes = [p.size for p in points if p.budget == float(budget)]
        if 0 < len(sizes) < MIN_SIZES:
            out.append(f"budget {budget:.3g} FLOPs has {len(sizes)} size{'s' if len(sizes) > 1 else ''} "
                       f"({', '.join(sizes)}): an IsoFLOP parabola needs {MIN_SIZES}, so it gives no N_opt")
    return out


@dataclass
class CoolDown:
    """A run of a WSD plan that branches from its size's trunk (the size's longest run) at step ``start``, in the
    trunk's stable phase, and decays over its remaining ``point.steps - start`` steps."""

    point: Point
    trunk: Point
    start: int


def cool_downs(points: list[Point], decay: float = 0.2) -> tuple[dict[str, int], list[CoolDown]]:
    """A WSD plan's shape: each size's warm-up (5% of its shortest run, shared by its runs, so that their rates
    agree until a cool-down starts) and the cool-downs, every run but each size's longest (its trunk), which
    branch from the trunk where their own decay of ``decay`` x their steps starts."""
    if not 0 < decay < 1:
        raise ValueError(f"decay={decay}: the fraction of a run's steps its learning rate decays over, in (0, 1)")
    by_size: dict[str, list[Point]] = {}
    for p in points:
        by_size.setdefault(p.size, []).append(p)
    warmups, runs = {}, []
    for size, pts in by_size.items():
        pts = sorted(pts, key=lambda p: p.steps)
        trunk = pts[-1]
        warmups[size] = max(1, round(0.05 * pts[0].steps))
        trunk_decay_start = trunk.steps - max(1, round(decay * trunk.steps))
        for p in pts[:-1]:
            start = p.steps - max(1, round(decay * p.steps))
            if not warmups[size] <= start <= trunk_decay_start:
                raise ValueError(f"{p.label}: its decay would start at step {start}, outside the stable phase "
                                 f"[{warmups[size]}, {trunk_decay_start}] of {trunk.label}; use schedule=cosine")
            runs.append(CoolDown(p, trunk, start))
    return warmups, runs


def plan_table(points: list[Point], evals: int, schedule: str = "cosine", decay: float = 0.2) -> dict[str, dict]:
    """The sweep's ``scaling.plan``: by run label, what its job reads (model, steps, LR, warm-up, evaluation
    interval; with WSD the decay's length, the trunk's branch points and a cool-down's checkpoint)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}: one of {', '.join(SCHEDULES)}")
    plan = {}
    for p in points:
        plan[p.label] = {"budget": p.budget, "size": p.size, "params": p.params, "forward_macs": p.forward_macs,
                         "steps": p.steps, "lr": p.lr, "warmup": max(1, round(0.05 * p.steps)),
                         "eval_every": max(1, p.steps // max(1, evals)), **{f"model_{k}": v for k, v in p.model.items()}}
    if schedule == "wsd":
        warmups, runs = cool_downs(points, decay)
        for p in points:
            plan[p.label].update(warmup=warmups[p.size], decay_steps=max(1, round(decay * p.steps)), branch_at=[],
                                 branch_from=None)
        for c in runs:
            plan[c.point.label].update(decay_steps=c.point.steps - c.start, branch_from=(
                f"${{run_dir}}/../{c.trunk.label}/checkpoints/step_{c.start:07d}.ckpt"))
            plan[c.trunk.label]["branch_at"].append(c.start)
    return plan


def sweep_yaml(points: list[Point], family: str, batch: int, base: list[str], evals: int, header: str,
               name: str = "isoflop", schedule: str = "cosine", decay: float = 0.2,
               jobs: list[str] | None = None) -> str:
    """A ``# @package _global_`` sweep config: one job per point of ``jobs`` (labels; all by default) as
    ``scaling.point``, each taking its model, steps, LR and schedule from the plan table (all points) by nested
    interpolation, its run dir named by the label. ``schedule``: see the module docstring."""
    import yaml

    spec = _family(family)
    plan = plan_table(points, evals, schedule, decay)
    jobs = jobs or list(plan)
    pick = "${scaling.plan.${scaling.point}.%s}"
    wsd = schedule == "wsd"
    body = {
        "defaults": [{"override /model": spec["model"]}, {"override /lr_schedule": schedule}],
        "run_name": name,
        "scaling": {"family": family, "point": jobs[0], "budget": pick % "budget", "size": pick % "size",
                    "plan": plan},
        "model": {**({"size": None} if spec["model"] == "dit" else {}),
                  **{k: pick % f"model_{k}" for k in points[0].model}},
        "scale": {"global_batch": batch},  # split over the devices and accumulation of whatever launches it
        "optim": {"lr": pick % "lr"},
        # cosine or WSD to the run's own last step
        "lr_schedule": {"warmup_steps": pick % "warmup", **({"decay_steps": pick % "decay_steps"} if wsd else {})},
        "trainer": {"max_steps": pick % "steps", "val_check_interval": pick % "eval_every",
                    "log_every_n_steps": pick % "eval_every"},
        "callbacks": {"checkpoint": {"every_n_train_steps": pick % "eval_every"},
                      "sample_grid": {"every_n_steps": pick % "steps"},
                      **({"step_checkpoints": {"steps": pick % "branch_at"}} if wsd else {})},
        **({"init": {"branch_from": pick % "branch_from"}} if wsd else {}),
        "hydra": {"sweeper": {"params": {"scaling.point": ",".join(jobs)}},
                  "sweep": {"subdir": "${scaling.point}"}},
    }
    text = yaml.safe_dump(body, sort_keys=False, width=120)
    usage = (f"# Run: diffusion-train -m +sweep=<this file's name> {' '.join(base)}".rstrip()
             + "   (add hydra/launcher=slurm for Slurm)\n")
    return "# @package _global_\n" + header + usage + text


def _family(name: str) -> dict:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; families: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def gpu_hours(flops: float, mfu: float, peak_flops: float) -> float:
    """Hours of one GPU that ``flops`` training FLOPs take at ``mfu`` of a ``peak_flops`` FLOP/s card."""
    return flops / (mfu * peak_flops) / 3600


def summary_line(p: Point, mfu: float | None = None, peak_flops: float | None = None,
                 trained: float | None = None) -> str:
    """The point in one line; with ``mfu`` and ``peak_flops`` also the GPU-hours it takes to train ``trained`` FLOPs
    (default: the whole run's)."""
    hours = f"  {gpu_hours(p.flops if trained is None else trained, mfu, peak_flops):.3g} GPU-h" if mfu else ""
    return (f"{p.label:>14}  N={p.params / 1e6:8.3f}M  MACs/img={p.forward_macs / 1e6:9.2f}M  steps={p.steps:7d}  "
            f"lr={p.lr:.3g}  C={p.flops:.3e} ({100 * (p.flops / p.budget - 1):+.2f}%){hours}")


__all__ = ["FAMILIES", "LR_RULES", "SCHEDULES", "CoolDown", "Point", "cool_downs", "gpu_hours", "isoflop_grid",
           "plan_table", "size_costs", "summary_line", "sweep_yaml"]
