"""Checkpoint files: atomic writes, lookup of the run's last checkpoint, safe metadata reads, checkpoints at chosen
steps, and the random number generators' states a checkpoint carries."""

from __future__ import annotations

import os
import random
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from diffusion_train.files import atomic_torch_save
from diffusion_train.training.step_end import StepEndCallback


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO whose saves are atomic (see :func:`atomic_torch_save`)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options, got {storage_options}")
        atomic_torch_save(checkpoint, path)


def remove_stale_temp_files(run_dir: str | os.PathLike) -> list[Path]:
    """Deletes temp files left by a save that a kill interrupted (they are never a valid checkpoint)."""
    stale = sorted((Path(run_dir) / "checkpoints").glob(".*.tmp-*"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def last_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint a run directory resumes from: ``checkpoints/last.ckpt``, else (a run stopped hard, with
    ``callbacks.checkpoint.save_last=false``) its ``step_<N>.ckpt`` of the highest step; None without either."""
    folder = Path(run_dir) / "checkpoints"
    path = folder / "last.ckpt"
    if path.is_file():
        return path
    steps = {int(p.stem[5:]): p for p in folder.glob("step_*.ckpt") if p.stem[5:].isdigit()}
    return steps[max(steps)] if steps else None


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Loads a checkpoint without executing code from it (``weights_only=True``, memory-mapped)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - a one-line error naming the file beats a pickle traceback
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from e


def rng_states() -> dict:
    """The global generators' states (torch, Python's ``random``, numpy, every CUDA device's) in plain types
    and tensors, so that a checkpoint holding them loads with ``weights_only=True``."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "gauss": float(gauss)},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng_states(state: dict) -> None:
    """Sets the generators from :func:`rng_states`; the CUDA states only where the number of devices is the same."""
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["gauss"]))
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


class StepCheckpoints(StepEndCallback, Checkpoint):
    """Checkpoints at the given optimizer steps, ``step_<N>.ckpt`` in ``dirpath`` as the periodic ones are named
    (``callbacks.step_checkpoints.steps``): e.g. the points cool-down runs branch from (``init.branch_from``). Every
    rank saves (sharded states gather); a file already there (a relaunch, a periodic checkpoint) is kept. A
    ``Checkpoint``: Lightning runs it after the other callbacks, and ``train`` puts it after the periodic
    ``ModelCheckpoint``, so a step that is both is saved once."""

    def __init__(self, dirpath: str | os.PathLike, steps: list[int] | tuple[int, ...] = ()):
        super().__init__()
        self.dirpath, self.steps = Path(dirpath), {int(s) for s in steps}

    def on_step_end(self, trainer: L.Trainer, pl_module, step: int) -> None:
        path = self.dirpath / f"step_{step:07d}.ckpt"
        if step in self.steps and not trainer.strategy.broadcast(path.is_file()):
            trainer.save_checkpoint(path, weights_only=False)
