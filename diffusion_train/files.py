"""Writing files so that a kill never leaves a half-written one, and others can read them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch


def atomic_save_file(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> Path:
    """safetensors' ``save_file`` to a temporary file in the same folder, fsynced, then renamed over ``path``. The
    file gets the permissions the process's umask gives new files (safetensors itself creates them owner-only,
    which hides exported weights, references and snapshots from the rest of a team on a shared file system)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(dict(tensors), str(tmp), metadata=dict(metadata) if metadata is not None else None)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
