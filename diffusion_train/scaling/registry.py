"""Run registry: find the ``summary.json`` of finished (and running) training runs and load them as records.

Every training run writes ``<run_dir>/summary.json`` (format ``diffusion_train.summary/1``): the config
hash, the backbone's parameter count N, FLOPs per image, images seen, total FLOPs, the ``scaling``
section of its config (budget, size, family) and, per logged metric, the final and best value and the
history (step, images, FLOPs, value). :func:`load_runs` collects them from folders (searched
recursively) and, optionally, from W&B projects (``wandb:<entity>/<project>``), validates each one and
returns :class:`Run` records; a file that is not a valid summary is a :class:`RegistryError` (a
``ValueError``) whose one-line message names the file and the key. A run folder's post-hoc EMA records
(``scripts/posthoc_ema.py validate=true``) add the metric ``val/loss_posthoc_ema``: its best width's loss.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

__all__ = ["FORMAT", "POSTHOC_METRIC", "Metric", "Point", "RegistryError", "Run", "find_summaries", "human_count",
           "load_runs", "load_summary", "posthoc_metric", "run_from_dict", "wandb_runs", "wandb_summary"]

FORMAT = "diffusion_train.summary/1"
SUMMARY = "summary.json"
WANDB_PREFIX = "wandb:"
WANDB_STEP = "trainer/global_step"  # the step key Lightning's WandbLogger logs with every row
POSTHOC_GLOB = "posthoc_ema/step_*.json"  # scripts/posthoc_ema.py's records, beside the checkpoints it makes
POSTHOC_METRIC = "val/loss_posthoc_ema"  # their lowest validation loss over the widths made at each step


class RegistryError(ValueError):
    """A run source or a summary file is missing or malformed; the message names it and the key."""


@dataclass(frozen=True)
class Point:
    """One logged value of a metric: at ``step``, after ``images`` images and ``flops`` training FLOPs. ``label``:
    what gave the value where several candidates could (:data:`POSTHOC_METRIC`: the winning width's name)."""
    step: int
    images: float
    flops: float
    value: float
    label: str = ""


@dataclass(frozen=True)
class Metric:
    """A metric of a run: its last and lowest logged value and its history (in logging order)."""
    final: float
    best: float
    history: tuple[Point, ...] = ()


@dataclass(frozen=True)
class Run:
    """One run, as its ``summary.json`` describes it (``source``: the file, or ``wandb:entity/project/id``)."""
    source: str
    run_dir: str
    run_name: str
    config_hash: str
    model: str
    params: int
    forward_macs_per_image: float
    flops_per_image: float
    global_batch: int
    steps: int
    images_seen: float
    total_flops: float
    budget: float | None
    size: str | None
    family: str | None
    metrics: dict[str, Metric] = field(default_factory=dict)
    wall_time_s: float = 0.0
    device: str = ""
    world_size: int = 1
    finished: bool = True

    @property
    def label(self) -> str:
        """The size's name (``scaling.size``), else the parameter count (``12.3M``)."""
        return self.size if self.size else human_count(self.params)


def human_count(n: float) -> str:
    """12345678 -> '12.3M'."""
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.3g}"


# ----------------------------------------------------------------------------------------------
# validation


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _get(d: dict, key: str, where: str, kind: str, *, nullable: bool = False, path: str = "") -> Any:
    """``d[key]`` checked against ``kind`` (number / positive / nonneg / int / str / bool / dict / list)."""
    name = f"{path}{key}"
    if key not in d:
        raise RegistryError(f"{where}: missing key '{name}'")
    v = d[key]
    if v is None and nullable:
        return None
    ok = {"number": lambda: _is_number(v) and math.isfinite(v),
          "positive": lambda: _is_number(v) and math.isfinite(v) and v > 0,
          "nonneg": lambda: _is_number(v) and math.isfinite(v) and v >= 0,
          "value": lambda: _is_number(v),  # a metric value: NaN/inf allowed (a diverged run), not strings
          "int": lambda: _is_number(v) and float(v).is_integer() and v >= 0,
          "str": lambda: isinstance(v, str),
          "label": lambda: isinstance(v, (str, int, float)) and not isinstance(v, bool),
          "bool": lambda: isinstance(v, bool),
          "dict": lambda: isinstance(v, dict),
          "list": lambda: isinstance(v, list)}[kind]()
    if not ok:
        want = {"positive": "a positive number", "nonneg": "a number >= 0", "int": "an integer >= 0",
                "number": "a finite number", "value": "a number", "str": "a string", "bool": "true or false",
                "dict": "an object", "list": "a list", "label": "a string or a number"}[kind]
        raise RegistryError(f"{where}: bad key '{name}': expected {want}{' or null' if nullable else ''}, "
                            f"got {json.dumps(v)[:60]}")
    return v


def _metric(d: Any, where: str, name: str) -> Metric:
    path = f"metrics.{name}."
    if not isinstance(d, dict):
        raise RegistryError(f"{where}: bad key 'metrics.{name}': expected an object with final, best, history")
    final = _get(d, "final", where, "value", nullable=True, path=path)
    best = _get(d, "best", where, "value", nullable=True, path=path)
    points = []
    for i, p in enumerate(_get(d, "history", where, "list", path=path)):
        ppath = f"{path}history[{i}]."
        if not isinstance(p, dict):
            raise RegistryError(f"{where}: bad key '{ppath[:-1]}': expected an object with step, images, flops, value")
        value = _get(p, "value", where, "value", nullable=True, path=ppath)
        points.append(Point(step=int(_get(p, "step", where, "int", path=ppath)),
                            images=float(_get(p, "images", where, "nonneg", path=ppath)),
                            flops=float(_get(p, "flops", where, "nonneg", path=ppath)),
                            value=math.nan if value is None else float(value)))
    return Metric(final=math.nan if final is None else float(final), best=math.nan if best is None else float(best),
                  history=tuple(points))


def run_from_dict(d: Any, source: str) -> Run:
    """A :class:`Run` from a parsed summary (``source`` names it in errors); every key of the format is required."""
    if not isinstance(d, dict):
        raise RegistryError(f"{source}: not a JSON object")
    fmt = _get(d, "format", source, "str")
    if fmt != FORMAT:
        raise RegistryError(f"{source}: bad key 'format': expected {FORMAT!r}, got {fmt!r}")
    scaling = _get(d, "scaling", source, "dict")
    size = _get(scaling, "size", source, "label", nullable=True, path="scaling.")
    family = _get(scaling, "family", source, "label", nullable=True, path="scaling.")
    metrics = _get(d, "metrics", source, "dict")
    return Run(
        source=source,
        run_dir=_get(d, "run_dir", source, "str"),
        run_name=_get(d, "run_name", source, "str"),
        config_hash=_get(d, "config_hash", source, "str"),
        model=_get(d, "model", source, "str"),
        params=int(_get(d, "params", source, "positive")),
        forward_macs_per_image=float(_get(d, "forward_macs_per_image", source, "positive")),
        flops_per_image=float(_get(d, "flops_per_image", source, "positive")),
        global_batch=int(_get(d, "global_batch", source, "int")),
        steps=int(_get(d, "steps", source, "int")),
        images_seen=float(_get(d, "images_seen", source, "nonneg")),
        total_flops=float(_get(d, "total_flops", source, "nonneg")),
        budget=_opt_float(_get(scaling, "budget", source, "positive", nullable=True, path="scaling.")),
        size=None if size is None else str(size),
        family=None if family is None else str(family),
        metrics={str(name): _metric(m, source, str(name)) for name, m in metrics.items()},
        wall_time_s=float(_get(d, "wall_time_s", source, "nonneg")),
        device=str(_get(d, "device", source, "str")),
        world_size=int(_get(d, "world_size", source, "int")),
        finished=_get(d, "finished", source, "bool"),
    )


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as e:
        raise RegistryError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        return json.loads(text)
    except ValueError as e:
        raise RegistryError(f"{path}: not valid JSON ({e})") from None


def load_summary(path: str | os.PathLike) -> Run:
    """One ``summary.json`` as a :class:`Run`; :class:`RegistryError` naming the file when it is unreadable,
    not JSON or not in the format. With post-hoc EMA records beside it (:func:`posthoc_metric`), the run also has
    the metric :data:`POSTHOC_METRIC`."""
    path = Path(path)
    run = run_from_dict(_read_json(path), str(path))
    posthoc = posthoc_metric(path.parent, run)
    return run if posthoc is None else replace(run, metrics={**run.metrics, POSTHOC_METRIC: posthoc})


def posthoc_metric(run_dir: Path, run: Run) -> Metric | None:
    """The lowest validation loss over the post-hoc EMA widths made at each step (``scripts/posthoc_ema.py
    validate=true`` writes ``<run>/posthoc_ema/step_<N>.json``), as a metric: one point per step made, labelled with
    the width that gave it; ``final`` the latest step's. Records made without ``validate=true`` are skipped; None
    without any."""
    points = []
    for path in sorted(run_dir.glob(POSTHOC_GLOB)):
        record = _read_json(path)
        if not isinstance(record, dict):
            raise RegistryError(f"{path}: not a JSON object")
        averages = _get(record, "averages", str(path), "dict")
        losses = {name: _get(a, "val_loss", str(path), "value", path=f"averages.{name}.")
                  for name, a in averages.items() if isinstance(a, dict) and "val_loss" in a}
        if losses:
            step = int(_get(record, "step", str(path), "int"))
            images = float(step * run.global_batch)
            finite = {name: loss for name, loss in losses.items() if math.isfinite(loss)}  # a diverged width: not
            lowest = min(finite, key=finite.get) if finite else ""  # the lowest (min() gets stuck on a NaN first)
            points.append(Point(step=step, images=images, flops=images * run.flops_per_image,
                                value=finite[lowest] if finite else math.nan, label=lowest))
    if not points:
        return None
    points.sort(key=lambda p: p.step)
    return Metric(final=points[-1].value, best=min((p.value for p in points if math.isfinite(p.value)),
                                                   default=math.nan), history=tuple(points))


def find_summaries(directory: str | os.PathLike) -> list[Path]:
    """Every ``summary.json`` under ``directory`` (recursively, following no symlinked folders), sorted;
    ``directory`` may also be a summary file itself."""
    directory = Path(directory)
    if directory.is_file():
        return [directory]
    if not directory.is_dir():
        raise RegistryError(f"{directory}: no such directory")
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if SUMMARY in files:
            found.append(Path(root) / SUMMARY)
    return sorted(found)


def load_runs(sources: Iterable[str | os.PathLike], *, metrics: Sequence[str] | None = None) -> list[Run]:
    """The runs of every source: a folder (each ``summary.json`` under it), a ``summary.json`` file, or
    ``wandb:<entity>/<project>`` (:func:`wandb_runs`; ``metrics`` names the histories to read there, all
    logged metrics for local files). A missing folder or a malformed summary raises :class:`RegistryError`;
    a source without runs is not an error here (the caller decides). A file that several sources reach (a folder
    and a folder inside it) is loaded once."""
    runs: list[Run] = []
    seen: set[Path] = set()
    for source in sources:
        source = str(source)
        if source.startswith(WANDB_PREFIX):
            runs.extend(wandb_runs(source[len(WANDB_PREFIX):], metrics=metrics or ()))
            continue
        for path in find_summaries(source):
            if path.resolve() not in seen:
                seen.add(path.resolve())
                runs.append(load_summary(path))
    return runs


# ----------------------------------------------------------------------------------------------
# W&B (thin; not testable offline beyond wandb_summary on stand-in objects)


def wandb_summary(run: Any, path: str, metrics: Sequence[str]) -> dict:
    """The summary dict (format ``diffusion_train.summary/1``) of one W&B run, for :func:`run_from_dict`.

    It expects what the training side puts into W&B: the scalar fields of ``summary.json`` (``params``,
    ``flops_per_image``, ``images_seen``, ``total_flops``, ... everything but ``metrics``) in the W&B run
    summary under the same names, and the ``scaling`` section in the run config. Each metric of
    ``metrics`` is read from the run history against ``trainer/global_step`` (Lightning's W&B step
    key; W&B's ``_step`` otherwise): images = step x global_batch, FLOPs = images x flops_per_image;
    final = the last value, best = the lowest. A field it cannot find is left out, so validation names it.
    """
    summary = dict(run.summary)
    d = {key: summary[key] for key in ("format", "run_dir", "run_name", "config_hash", "model", "params",
                                       "forward_macs_per_image", "flops_per_image", "global_batch", "steps",
                                       "images_seen", "total_flops", "wall_time_s", "device", "world_size",
                                       "finished") if key in summary}
    d.setdefault("run_name", str(getattr(run, "name", "")))
    d.setdefault("run_dir", f"{WANDB_PREFIX}{path}/{run.id}")
    config = dict(run.config)
    if "scaling" in config:
        d["scaling"] = config["scaling"]
    batch, fpi = d.get("global_batch"), d.get("flops_per_image")
    d["metrics"] = {}
    for name in metrics:
        history = []
        rows = list(run.scan_history(keys=[name, WANDB_STEP])) or list(run.scan_history(keys=[name]))
        for row in rows:
            value = row.get(name)
            step = row.get(WANDB_STEP, row.get("_step"))
            if not _is_number(value) or not _is_number(step):
                continue
            images = float(step) * batch if _is_number(batch) else 0.0
            history.append({"step": int(step), "images": images,
                            "flops": images * fpi if _is_number(fpi) else 0.0, "value": float(value)})
        if history:
            values = [p["value"] for p in history if math.isfinite(p["value"])]
            d["metrics"][name] = {"final": history[-1]["value"], "best": min(values) if values else None,
                                  "history": history}
    return d


def wandb_runs(path: str, *, metrics: Sequence[str] = ()) -> list[Run]:
    """The runs of W&B project ``path`` (``entity/project``) through ``wandb.Api()``, each converted by
    :func:`wandb_summary` and validated like a file (source ``wandb:entity/project/<run id>``).

    Needs network access and W&B credentials; it is not exercised by the offline tests (only
    :func:`wandb_summary` is, on stand-in run objects). Runs whose W&B summary has no ``format`` key
    (not written by this package's training) are skipped.
    """
    if path.count("/") != 1 or not all(path.split("/")):
        raise RegistryError(f"{WANDB_PREFIX}{path}: expected {WANDB_PREFIX}<entity>/<project>")
    try:
        import wandb
    except ImportError:
        raise RegistryError(f"{WANDB_PREFIX}{path}: reading W&B runs needs the wandb package") from None
    try:
        api_runs = list(wandb.Api().runs(path))
    except Exception as e:  # network, credentials, unknown project: one line naming the source
        raise RegistryError(f"{WANDB_PREFIX}{path}: cannot list runs: {str(e).splitlines()[0] if str(e) else e!r}") \
            from None
    runs = []
    for run in api_runs:
        if "format" not in dict(run.summary):
            continue
        runs.append(run_from_dict(wandb_summary(run, path, metrics), f"{WANDB_PREFIX}{path}/{run.id}"))
    return runs
