"""Post-hoc EMA: averages of any relative width sigma_rel, after training, from a run's EMA snapshots
(``callbacks.ema.sigma_rels=[0.05,0.1] callbacks.ema.snapshot_every=N``; docs/training.md#post-hoc-ema)::

    python scripts/posthoc_ema.py runs/fmnist sigma_rels=0.03,0.05,0.08,0.12,0.2
    diffusion-eval ckpt=runs/fmnist/posthoc_ema/step_0004000.ckpt weights=ema_sigma_rel_0.08 ...

    python scripts/posthoc_ema.py runs/isoflop/*/ sigma_rels=0.03,0.05,0.08,0.12 validate=true   # several runs

The run folders come first (one or more), then ``key=value`` options:

    sigma_rels  comma-separated relative widths to make, each in (0, 0.2887] (required)
    step        the step to make them for, one with a snapshot (default: the last snapshot's)
    snapshots   the snapshot folder (default: <run>/ema_snapshots, and for a branch of another run,
                init.branch_from, also the trunk's snapshots up to the branch step; one run only)
    out         the checkpoint to write (default: <run>/posthoc_ema/step_<step>.ckpt; one run only)
    validate    true: also the validation loss of each made average and of the raw weights, on the run's
                validation set as training computes val/loss (same noise and timesteps), in one pass over it
    device      where to validate: auto (default: a GPU if there is one), cpu, cuda

It writes one checkpoint holding the averages as ``ema_sigma_rel_<s>``, with the model config and raw weights of
the run's checkpoint at that step (else its last.ckpt): ``diffusion-sample``, ``diffusion-eval``, ``init.path``
read it like any checkpoint. It prints, for each width, its gamma, the number of snapshot averages combined, and the
fit's relative error (how far the combined profile is from the asked one; under a few percent is a close match,
and above 5% a note says that the width is far outside the tracked ones), and with ``validate=true`` each
average's validation loss, the lowest marked. The same record (the fit, the losses, ``lowest_val_loss``) is kept
in the checkpoint's ``diffusion_train.posthoc_ema`` and written beside it as ``step_<step>.json``. With several runs
and ``validate=true``, a last table gives each run's parameter count, its lowest width and that width's loss: how
the best EMA length moves with model size in a scaling study.
Without ``validate=true`` it will not replace a record that has validation losses (give ``validate=true`` or ``out=``).
Exits with status 1 and one ``error:`` line when there are no snapshots, the step has none, or an option is bad.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from diffusion_train.cli import UsageError, parse_bool, parse_key_values, run_main, split_arguments  # noqa: E402
from diffusion_train.files import atomic_write  # noqa: E402
from diffusion_train.training.checkpointing import atomic_torch_save, load_checkpoint  # noqa: E402
from diffusion_train.training.posthoc_ema import (SNAPSHOT_DIR, base_checkpoint, check_sigma_rel,  # noqa: E402
                                                  label, reconstruct, run_snapshots, sigma_rel_to_gamma, solve)

OPTIONS = {"sigma_rels": str, "step": int, "snapshots": str, "out": str, "validate": parse_bool, "device": str}
DEFAULTS: dict[str, Any] = {"sigma_rels": "", "step": None, "snapshots": "", "out": "", "validate": False,
                            "device": "auto"}
ROUGH_FIT = 0.05  # a fit error above this is worth a note


def parse_args(argv: list[str]) -> tuple[list[Path], dict[str, Any]]:
    positional, given = split_arguments(argv, OPTIONS)
    opts = parse_key_values(given, OPTIONS, DEFAULTS)
    runs = [Path(a) for a in positional]
    if not runs:
        raise UsageError("give the run folder (or several)")
    if len(runs) > 1 and (opts["out"] or opts["snapshots"]):
        raise UsageError("out= and snapshots= are for one run folder; give one, or leave them out")
    opts["sigma_rels"] = [check_sigma_rel(s, "sigma_rels") for s in opts["sigma_rels"].split(",") if s.strip()]
    if not opts["sigma_rels"]:
        raise UsageError("sigma_rels: give the relative widths to make, e.g. sigma_rels=0.05,0.1")
    if opts["device"] not in ("auto", "cpu", "cuda"):
        raise UsageError(f"device={opts['device']}: use auto, cpu or cuda")
    return runs, opts


@contextlib.contextmanager
def loaded(module, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """``module`` with ``weights`` (by parameter name) copied into its parameters, and its own copied back after."""
    params = dict(module.named_parameters())
    unknown = [n for n in weights if n not in params]
    if unknown:
        raise UsageError(f"the averages hold {unknown[:3]}, which the run's model does not have: snapshots of "
                         f"another model?")
    names = list(weights)
    backup = [params[n].detach().clone() for n in names]
    with torch.no_grad():
        for n in names:
            params[n].copy_(weights[n])
    try:
        yield
    finally:
        with torch.no_grad():
            for n, b in zip(names, backup):
                params[n].copy_(b)


def one_device_limit(limit: int | float | None, world_size: int, num_batches: Callable[[], int]) -> int | float:
    """A run's ``trainer.limit_val_batches`` for one device, so that it validates the batches the run did. Lightning
    limits each rank's share of the fixed validation batches (rank r of W: batches r, r+W, ...), so n per rank are
    the first n x W; a fraction f of the ceil(B / W) per rank likewise. ``num_batches``: B, asked only if needed."""
    if limit is None:
        return 1.0
    if world_size <= 1:
        return limit
    if isinstance(limit, int) and not isinstance(limit, bool):
        return limit * world_size
    if float(limit) >= 1.0:
        return 1.0
    total = num_batches()
    return min(int(-(-total // world_size) * float(limit)) * world_size, total)


def validation_batches(datamodule) -> int:
    """The number of fixed validation batches of a data module (0 without a validation set)."""
    from diffusion_train.data.samplers import fixed_batches

    datamodule.setup()
    val_set = getattr(datamodule, "val_set", None)
    return 0 if val_set is None else len(fixed_batches(len(val_set), datamodule.val_batch_size, 0, 1))


def validation_losses(ckpt: dict, averages: dict[str, dict[str, torch.Tensor]], device: str) -> dict[str, float]:
    """``val/loss`` of a loaded checkpoint's raw weights (key ``raw``) and of each average, as training computes it
    (the run's validation set, its fixed noise and timesteps), in one validation pass that swaps each average in per
    batch."""
    import lightning as L
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from diffusion_train.training.build import checkpoint_module

    module = checkpoint_module(ckpt, weights="raw")
    config = ckpt["diffusion_train"]["config"]
    datamodule = instantiate(OmegaConf.create(config).data, _convert_="all")
    module.val_weights = {name: functools.partial(loaded, module, ws) for name, ws in averages.items()}
    accelerator = {"auto": "gpu" if torch.cuda.is_available() else "cpu", "cuda": "gpu"}.get(device, device)
    run = config.get("trainer") or {}  # the run's precision and validation batches: its val/loss's
    limit = one_device_limit(run.get("limit_val_batches"), int(ckpt["diffusion_train"].get("world_size") or 1),
                             lambda: validation_batches(datamodule))
    trainer = L.Trainer(accelerator=accelerator, devices=1, precision=run.get("precision", "32-true"),
                        limit_val_batches=limit, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    logged = trainer.validate(module, datamodule=datamodule, verbose=False)
    if not logged or "val/loss" not in logged[0]:
        raise UsageError("validate=true: the run's data has no validation set")
    logged = logged[0]
    return {"raw": logged["val/loss"], **{name: logged[f"val/loss_{name}"] for name in averages}}


def keep_validated(record: Path) -> None:
    """Refuses to replace a record that holds validation losses by one without (the scaling registry reads them as
    ``val/loss_posthoc_ema``)."""
    try:
        validated = "raw_val_loss" in json.loads(record.read_text())
    except (OSError, ValueError, TypeError):  # none yet, or not a record: nothing to keep
        return
    if validated:
        raise UsageError(f"{record} holds validation losses; remaking it without them would lose them: add "
                         "validate=true, or write elsewhere with out=")


def make(run: Path, opts: dict[str, Any]) -> dict[str, Any]:
    """Makes the averages of one run, writes its checkpoint and the record of the fit (``.json`` beside it), prints
    the table, and returns the record."""
    snapshots = run_snapshots(run, opts["snapshots"] or None)
    if not snapshots:
        raise UsageError(f"{opts['snapshots'] or run / SNAPSHOT_DIR}: no EMA snapshots; train with "
                         "callbacks.ema.sigma_rels and callbacks.ema.snapshot_every")
    recs = solve(snapshots, opts["sigma_rels"], opts["step"])
    step = recs[0].step
    out = Path(opts["out"] or run / "posthoc_ema" / f"step_{step:07d}.ckpt")
    if not opts["validate"]:
        keep_validated(out.with_suffix(".json"))
    base_path = base_checkpoint(run, step)
    base = load_checkpoint(base_path)
    averages = reconstruct(recs)
    meta = dict(base.get("diffusion_train") or {})
    record = meta["posthoc_ema"] = {
        "run": str(run), "checkpoint": str(out), "step": step, "num_updates": recs[0].num_updates,
        "base_checkpoint": str(base_path), "raw_weights_step": int(base.get("global_step", step)),
        "averages": {label(r.sigma_rel): {"sigma_rel": r.sigma_rel, "gamma": sigma_rel_to_gamma(r.sigma_rel),
                                          "fit_error": r.error, "terms": len(r.terms)} for r in recs}}
    ema = {"decays": [], "sigma_rels": [r.sigma_rel for r in recs], "num_updates": recs[0].num_updates, "step": step,
           "weights": {label(s): ws for s, ws in averages.items()}}
    if opts["validate"]:
        losses = validation_losses(base, {f"ema_{k}": ws for k, ws in ema["weights"].items()}, opts["device"])
        record["raw_val_loss"] = losses["raw"]
        for name, average in record["averages"].items():
            average["val_loss"] = losses[f"ema_{name}"]
        record["lowest_val_loss"] = min(record["averages"], key=lambda name: record["averages"][name]["val_loss"])
    atomic_torch_save({"state_dict": base["state_dict"], "global_step": step, "diffusion_train": meta, "ema": ema},
                      out)
    atomic_write(out.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))
    used = sorted({snap.step for r in recs for snap, _, _ in r.terms})
    print(f"{run}, step {step}: {len(used)} snapshots (steps {used[0]}..{used[-1]}), model and raw weights from "
          f"{base_path}" + (f" (step {record['raw_weights_step']})" if record["raw_weights_step"] != step else ""))
    validated = "raw_val_loss" in record
    print(f"{'average':<18} {'gamma':>8} {'terms':>6} {'fit error':>10}" + f" {'val/loss':>10}" * validated)
    for name, a in record["averages"].items():
        loss = f" {a['val_loss']:>10.6f}" + " (lowest)" * (name == record["lowest_val_loss"]) if validated else ""
        print(f"{name:<18} {a['gamma']:>8.3f} {a['terms']:>6} {a['fit_error']:>10.2%}" + loss)
    if validated:
        raw = record["raw_weights_step"]  # another step's raw weights when the run has no checkpoint at this one
        print(f"{'raw weights' + (f' ({raw})' if raw != step else ''):<18} {'':>8} {'':>6} {'':>10} "
              f"{record['raw_val_loss']:>10.6f}")
    rough = [label(r.sigma_rel) for r in recs if r.error > ROUGH_FIT]
    if rough:
        tracked = sorted({s for r in recs for _, s, _ in r.terms})
        print(f"note: {', '.join(rough)} fit with more than {ROUGH_FIT:.0%} error: far outside the tracked widths "
              f"{tracked}, they are only rough averages; track a width nearer them")
    print(f"wrote {out} and {out.with_suffix('.json').name}")
    return record


def main(argv: list[str]) -> list[dict[str, Any]]:
    runs, opts = parse_args(argv)
    records = []
    for run in runs:
        records.append(make(run, opts))
        print()
    if len(records) > 1 and opts["validate"]:  # where the best width lies across the runs (e.g. model sizes)
        print(f"{'run':<40} {'parameters':>12} {'step':>8} {'lowest val/loss':>18} {'val/loss':>10} {'raw':>10}")
        for run, r in zip(runs, records):
            best = r["lowest_val_loss"]
            print(f"{str(run):<40} {run_parameters(run):>12} {r['step']:>8} {best:>18} "
                  f"{r['averages'][best]['val_loss']:>10.6f} {r['raw_val_loss']:>10.6f}")
    return records


def run_parameters(run: Path) -> str:
    """The run's trainable parameters, from its ``summary.json`` (``-`` without one)."""
    try:
        return f"{json.loads((run / 'summary.json').read_text())['params']:,}"
    except (OSError, ValueError, KeyError):
        return "-"


if __name__ == "__main__":
    sys.exit(run_main(main))
