"""Writing files so that a kill never leaves a half-written one, and others can read them."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` to a temporary file in ``path``'s folder (``.<name>.tmp-<pid>``), fsync, then rename over
    ``path`` and fsync the folder: a kill at any moment leaves the old file or the new one, never a truncated one.
    The file gets the permissions the process's umask gives new files (safetensors creates its files owner-only,
    which hid exported weights, references and snapshots from the rest of a team on a shared file system)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float (a diverged model's FID) as None, so that the JSON written is strict:
    Python's ``json`` writes ``NaN``, which ``jq`` and most readers refuse."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``text`` through :func:`atomic_write` (its folder made if missing)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | os.PathLike, value: Any, indent: int | None = 2) -> Path:
    """``value`` as strict JSON (non-finite floats as null, other objects by ``str``) through :func:`atomic_write`."""
    return write_text(path, json.dumps(strict_json(value), indent=indent, allow_nan=False, default=str) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`atomic_write`."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    return atomic_write(path, write)


def atomic_save_file(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> Path:
    """safetensors' ``save_file`` through :func:`atomic_write`."""
    from safetensors.torch import save_file

    return atomic_write(path, lambda tmp: save_file(dict(tensors), str(tmp),
                                                    metadata=dict(metadata) if metadata is not None else None))


def read_safetensors(path: str | os.PathLike, option: str, tensors: bool = True
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (none with ``tensors=False``) and metadata of a safetensors file. A file that is not one (e.g.
    truncated, or another format) is a one-line ValueError naming the setting (``option``) and the path."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return ({k: f.get_tensor(k) for k in f.keys()} if tensors else {}), dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - safetensors' errors name no file
        msg = " ".join(str(e).split())[:200]
        raise ValueError(f"{option}={path}: not a readable safetensors file ({type(e).__name__}: {msg})") from None
