"""Post-hoc EMA: averages of any relative width sigma_rel, after training, from a run's EMA snapshots
(``callbacks.ema.sigma_rels=[0.05,0.1] callbacks.ema.snapshot_every=N``; docs/training.md#post-hoc-ema)::

    python scripts/posthoc_ema.py runs/fmnist sigma_rels=0.03,0.05,0.08,0.12,0.2
    diffusion-eval ckpt=runs/fmnist/posthoc_ema/step_0004000.ckpt weights=ema_sigma_rel_0.08 ...

The first argument is the run folder, then ``key=value`` options:

    sigma_rels  comma-separated relative widths to make, each in (0, 0.2887] (required)
    step        the step to make them for, one with a snapshot (default: the last snapshot's)
    snapshots   the snapshot folder (default: <run>/ema_snapshots, and for a branch of another run,
                init.branch_from, also the trunk's snapshots up to the branch step)
    out         the checkpoint to write (default: <run>/posthoc_ema/step_<step>.ckpt)

It writes one checkpoint holding the averages as ``ema_sigma_rel_<s>``, with the model config and raw weights of
the run's checkpoint at that step (else its last.ckpt): ``diffusion-sample``, ``diffusion-eval``, ``init.path``
read it like any checkpoint. It prints, for each width, its gamma, the number of snapshot averages combined, and the
fit's relative error (how far the combined profile is from the asked one; under a few percent is a close match,
and above 5% a note says that the width is far outside the tracked ones).
Exits with status 1 and one ``error:`` line when there are no snapshots, the step has none, or an option is bad.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusion_train.cli import UsageError, parse_key_values, run_main  # noqa: E402
from diffusion_train.training.checkpointing import atomic_torch_save, load_checkpoint  # noqa: E402
from diffusion_train.training.posthoc_ema import (base_checkpoint, check_sigma_rel, label, reconstruct,  # noqa: E402
                                                  run_snapshots, sigma_rel_to_gamma, solve)

OPTIONS = {"sigma_rels": str, "step": int, "snapshots": str, "out": str}
DEFAULTS: dict[str, Any] = {"sigma_rels": "", "step": None, "snapshots": "", "out": ""}
ROUGH_FIT = 0.05  # a fit error above this is worth a note


def parse_args(argv: list[str]) -> tuple[Path, dict[str, Any]]:
    runs = [a for a in argv if a.partition("=")[0] not in OPTIONS]
    if len(runs) != 1:
        raise UsageError(f"give one run folder, got {runs or 'none'}")
    opts = parse_key_values([a for a in argv if a.partition("=")[0] in OPTIONS], OPTIONS, DEFAULTS)
    opts["sigma_rels"] = [check_sigma_rel(s, "sigma_rels") for s in opts["sigma_rels"].split(",") if s.strip()]
    if not opts["sigma_rels"]:
        raise UsageError("sigma_rels: give the relative widths to make, e.g. sigma_rels=0.05,0.1")
    return Path(runs[0]), opts


def main(argv: list[str]) -> Path:
    run, opts = parse_args(argv)
    snapshots = run_snapshots(run, opts["snapshots"] or None)
    recs = solve(snapshots, opts["sigma_rels"], opts["step"])
    step = recs[0].step
    base_path = base_checkpoint(run, step)
    base = load_checkpoint(base_path)
    averages = reconstruct(recs)
    meta = dict(base.get("diffusion_train") or {})
    meta["posthoc_ema"] = {"step": step, "num_updates": recs[0].num_updates, "base_checkpoint": str(base_path),
                           "averages": {label(r.sigma_rel): {"gamma": sigma_rel_to_gamma(r.sigma_rel),
                                                             "fit_error": r.error, "terms": len(r.terms)}
                                        for r in recs}}
    out = Path(opts["out"] or run / "posthoc_ema" / f"step_{step:07d}.ckpt")
    ema = {"decays": [], "sigma_rels": [r.sigma_rel for r in recs], "num_updates": recs[0].num_updates, "step": step,
           "weights": {label(s): ws for s, ws in averages.items()}}
    atomic_torch_save({"state_dict": base["state_dict"], "global_step": step, "diffusion_train": meta, "ema": ema}, out)
    used = sorted({snap.step for r in recs for snap, _, _ in r.terms})
    print(f"step {step}: {len(used)} snapshots (steps {used[0]}..{used[-1]}), model and raw weights from {base_path}")
    print(f"{'average':<18} {'gamma':>8} {'terms':>6} {'fit error':>10}")
    for r in recs:
        print(f"{label(r.sigma_rel):<18} {sigma_rel_to_gamma(r.sigma_rel):>8.3f} {len(r.terms):>6} {r.error:>10.2%}")
    rough = [label(r.sigma_rel) for r in recs if r.error > ROUGH_FIT]
    if rough:
        tracked = sorted({s for r in recs for _, s, _ in r.terms})
        print(f"note: {', '.join(rough)} fit with more than {ROUGH_FIT:.0%} error: far outside the tracked widths "
              f"{tracked}, they are only rough averages; track a width nearer them")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    sys.exit(run_main(main))
