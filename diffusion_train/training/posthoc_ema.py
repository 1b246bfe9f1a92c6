"""Post-hoc EMA: averages of any length, after training, from snapshots of two power-function EMAs.

A power-function EMA with exponent gamma averages the weights of steps 1..t with the profile
p(u) = (gamma + 1) u^gamma / t^(gamma + 1) on [0, t]: its width grows with training, a fixed fraction of it,
the relative standard deviation sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))) of p. Its update
after step n is ema <- ema + (1 - beta_n) (theta_n - ema) with beta_n = (1 - 1/n)^(gamma + 1), so step k's weights
carry exactly the integral of p over [k - 1, k]: the discrete average *is* the continuous profile, bucketed.

Snapshots of a few such averages (``callbacks.ema.sigma_rels``, saved every ``callbacks.ema.snapshot_every``
steps) span many profiles: a target profile (any sigma_rel, at any snapshot's step) is matched in least squares
by a weighted sum of the snapshots' profiles, and the same weighted sum of their weights is the target's average.
The profiles' inner products have a closed form, so the fit costs nothing; the reconstruction reads each snapshot
once. (The method of Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models", 2024.)
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from diffusion_train.files import atomic_save_file

SIGMA_REL_MAX = 12 ** -0.5  # gamma = 0: the plain running mean of all steps, the widest profile (0.28868)
SNAPSHOT_GLOB = "step_*.safetensors"


def label(sigma_rel: float) -> str:
    """The name of a power-function average in ``checkpoint["ema"]["weights"]`` and of its weights files."""
    return f"sigma_rel_{float(sigma_rel):g}"


def check_sigma_rel(sigma_rel: float, where: str = "sigma_rel") -> float:
    try:
        s = float(sigma_rel)
    except (TypeError, ValueError):
        s = math.nan
    if not 0.0 < s <= round(SIGMA_REL_MAX, 4):  # 0.2887 as written is the widest (gamma 0)
        raise ValueError(f"{where}: {sigma_rel} is not a relative width in (0, {SIGMA_REL_MAX:.4f}] "
                         f"(the widest, {SIGMA_REL_MAX:.4f}, is the plain mean of all steps)")
    return s


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma >= 0 whose profile has relative width ``sigma_rel``: the largest real root of
    s^2 (gamma + 2)^2 (gamma + 3) = gamma + 1."""
    s2 = check_sigma_rel(sigma_rel) ** 2
    roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
    return max(0.0, float(max(r.real for r in roots if abs(r.imag) < 1e-9)))


def gamma_to_sigma_rel(gamma: float) -> float:
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def profile_products(t_a: np.ndarray, g_a: np.ndarray, t_b: np.ndarray, g_b: np.ndarray) -> np.ndarray:
    """The inner products of power profiles, integral of p_a(u) p_b(u) du, for every pair (a, b): with
    T = min(t_a, t_b), (g_a + 1)(g_b + 1) T^(g_a + g_b + 1) / ((g_a + g_b + 1) t_a^(g_a + 1) t_b^(g_b + 1)).
    Computed in logs: the powers overflow for long runs otherwise."""
    t_a, g_a = np.asarray(t_a, float)[:, None], np.asarray(g_a, float)[:, None]
    t_b, g_b = np.asarray(t_b, float)[None, :], np.asarray(g_b, float)[None, :]
    g = g_a + g_b + 1
    log = (np.log((g_a + 1) * (g_b + 1) / g) + g * np.log(np.minimum(t_a, t_b))
           - (g_a + 1) * np.log(t_a) - (g_b + 1) * np.log(t_b))
    return np.exp(log)


def solve_coefficients(times: np.ndarray, gammas: np.ndarray, t: float, gamma: float) -> tuple[np.ndarray, float]:
    """The weights x of the snapshots (profiles at ``times`` with exponents ``gammas``) whose sum best matches the
    profile (t, gamma) in least squares, and the fit's relative error ||sum x_i p_i - p|| / ||p|| (0: exact)."""
    gram = profile_products(times, gammas, times, gammas)
    target = profile_products(times, gammas, np.array([t]), np.array([gamma]))[:, 0]
    x = np.linalg.lstsq(gram, target, rcond=None)[0]
    own = profile_products(np.array([t]), np.array([gamma]), np.array([t]), np.array([gamma]))[0, 0]
    error2 = max(0.0, float(x @ gram @ x - 2 * x @ target + own))
    return x, math.sqrt(error2 / own)


# -- snapshots -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Snapshot:
    """One snapshot file: the power-function averages of ``sigma_rels`` after optimizer step ``step``, covering
    ``num_updates`` steps (the profile's t). ``on_grid``: written at a multiple of ``snapshot_every``, not where a
    launch stopped between them (a preemption): only those take part in the fits of later steps, so a preempted
    run's reconstructions are those of an uninterrupted one."""
    path: Path
    step: int
    num_updates: int
    sigma_rels: tuple[float, ...]
    on_grid: bool = True


def write_snapshot(path: str | os.PathLike, averages: dict[float, dict[str, torch.Tensor]], step: int,
                   num_updates: int, dtype: torch.dtype = torch.float32, on_grid: bool = True) -> Path:
    """Writes the averages (sigma_rel -> {name: tensor}) as ``<label>/<name>`` tensors of one safetensors file,
    through a temporary file renamed over ``path`` (a kill never leaves a half-written snapshot)."""
    tensors = {f"{label(s)}/{n}": w.detach().to("cpu", dtype).contiguous() for s, ws in averages.items()
               for n, w in ws.items()}
    meta = {"step": str(int(step)), "num_updates": str(int(num_updates)),
            "sigma_rels": json.dumps([float(s) for s in averages]), "on_grid": str(int(on_grid))}
    return atomic_save_file(tensors, path, meta)


def read_snapshot(path: str | os.PathLike) -> Snapshot:
    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return Snapshot(path, int(meta["step"]), int(meta["num_updates"]),
                        tuple(float(s) for s in json.loads(meta["sigma_rels"])), meta.get("on_grid", "1") == "1")
    except Exception as e:  # noqa: BLE001 - one line naming the file
        raise ValueError(f"{path} is not an EMA snapshot ({type(e).__name__}: {str(e).splitlines()[0]})") from e


def find_snapshots(folder: str | os.PathLike, through_step: int | None = None) -> list[Snapshot]:
    """The snapshots in ``folder`` (at steps <= ``through_step`` if given), by step."""
    found = [read_snapshot(p) for p in sorted(Path(folder).glob(SNAPSHOT_GLOB))]
    return sorted((s for s in found if through_step is None or s.step <= through_step), key=lambda s: s.step)


@dataclass(frozen=True)
class Reconstruction:
    """A post-hoc average: its sigma_rel, the step and t it is for, the fit's relative error, and the
    coefficient of each (snapshot, sigma_rel) profile."""
    sigma_rel: float
    step: int
    num_updates: int
    error: float
    terms: list[tuple[Snapshot, float, float]]  # snapshot, its average's sigma_rel, coefficient


def solve(snapshots: list[Snapshot], sigma_rels: list[float], step: int | None = None) -> list[Reconstruction]:
    """The least-squares coefficients of each target ``sigma_rel`` at snapshot step ``step`` (default: the last
    snapshot's) from the snapshots at that step and the ones on the grid before it."""
    if not snapshots:
        raise ValueError("no EMA snapshots: train with callbacks.ema.sigma_rels and callbacks.ema.snapshot_every")
    step = snapshots[-1].step if step is None else int(step)
    at = [s for s in snapshots if s.step == step]
    if not at:
        raise ValueError(f"step={step}: no snapshot at that step; snapshots are at steps "
                         f"{[s.step for s in snapshots]}")
    used = [s for s in snapshots if s.step < step and s.on_grid] + at
    profiles = [(snap, s) for snap in used for s in snap.sigma_rels]
    times = np.array([snap.num_updates for snap, _ in profiles], float)
    gammas = np.array([sigma_rel_to_gamma(s) for _, s in profiles])
    out = []
    for target in dict.fromkeys(check_sigma_rel(s) for s in sigma_rels):  # each width once
        x, error = solve_coefficients(times, gammas, at[0].num_updates, sigma_rel_to_gamma(target))
        out.append(Reconstruction(target, step, at[0].num_updates, error,
                                  [(snap, s, float(c)) for (snap, s), c in zip(profiles, x)]))
    return out


def reconstruct(recs: list[Reconstruction]) -> dict[float, dict[str, torch.Tensor]]:
    """The averages of ``recs`` (sigma_rel -> {name: fp32 tensor}): each the weighted sum of its snapshots'
    averages. Reads every snapshot file once; a snapshot lacking a tensor that another has is an error."""
    sums: dict[float, dict[str, torch.Tensor]] = {r.sigma_rel: {} for r in recs}
    counts: dict[float, dict[str, int]] = {r.sigma_rel: {} for r in recs}
    for path in sorted({snap.path for r in recs for snap, _, _ in r.terms}):
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
            for r in recs:
                acc, seen = sums[r.sigma_rel], counts[r.sigma_rel]
                for s, c in ((s, c) for snap, s, c in r.terms if snap.path == path):
                    prefix = f"{label(s)}/"
                    for key in (k for k in keys if k.startswith(prefix)):
                        name = key[len(prefix):]
                        value = f.get_tensor(key).float() * c  # not in place: the file may be mapped
                        acc[name] = acc[name].add_(value) if name in acc else value
                        seen[name] = seen.get(name, 0) + 1
    for r in recs:
        short = [n for n, k in counts[r.sigma_rel].items() if k != len(r.terms)]
        if short:
            raise ValueError(f"the EMA snapshots do not all hold the same tensors (e.g. {short[0]}): "
                             f"snapshots of different models in one folder?")
    return sums


# -- runs ------------------------------------------------------------------------------------------------------
SNAPSHOT_DIR = "ema_snapshots"  # in the run directory (callbacks.ema.snapshot_dir's default)


def run_snapshots(run_dir: str | os.PathLike, folder: str | os.PathLike | None = None) -> list[Snapshot]:
    """The snapshots behind a run's averages, by step: its own (in ``folder``, default ``<run_dir>/ema_snapshots``)
    and, for a branch (``init.branch_from``, which run.json records), its trunk's up to the branch step, as far
    back as the branches go."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    own = find_snapshots(folder or run_dir / SNAPSHOT_DIR)
    info_path = run_dir / "run.json"
    origin = json.loads(info_path.read_text()).get("branched_from") if info_path.is_file() else None
    if not origin:
        return own
    trunk = Path(origin["checkpoint"]).parent.parent
    if not (trunk / SNAPSHOT_DIR).is_dir():
        raise FileNotFoundError(f"{info_path}: the run branched from {origin['checkpoint']}, but "
                                f"{trunk / SNAPSHOT_DIR} is not there (run from the folder the branch was launched in)")
    steps = {s.step for s in own}
    earlier = [s for s in run_snapshots(trunk) if s.step <= int(origin["step"]) and s.step not in steps]
    return sorted(earlier + own, key=lambda s: s.step)


def base_checkpoint(run_dir: str | os.PathLike, step: int) -> Path:
    """The run's checkpoint whose model config and raw weights a post-hoc checkpoint carries: the one at ``step``,
    else ``last.ckpt``."""
    folder = Path(run_dir) / "checkpoints"
    for path in (folder / f"step_{step:07d}.ckpt", folder / "last.ckpt"):
        if path.is_file():
            return path
    raise FileNotFoundError(f"{folder}: no step_{step:07d}.ckpt or last.ckpt to take the model config from")
