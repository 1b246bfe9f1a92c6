"""Pretrained weights: dtype names, load errors with a hint, provenance (name, path, sha256) and
frozen modules whose weights stay out of checkpoints.

A frozen pretrained module (text encoder, VAE) is rebuilt from its weights file, so copying it into
every checkpoint would only cost disk. :func:`keep_out_of_state_dict` drops its parameters from the
state dict of the module holding it and lets ``load_state_dict`` accept their absence; the module
records instead which weights it used (``provenance``, saved as extra state by its owner).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}") from None


def one_line(e: BaseException, limit: int = 240) -> str:
    """The first line of an exception message, shortened: library errors can span many lines."""
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    msg = lines[0] if lines else type(e).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def looks_like_path(name: str) -> bool:
    """A filesystem path rather than a hub id / tag (hub ids look like relative paths: ``org/name``)."""
    return name.startswith(("/", "./", "../", "~", "\\")) or name.endswith(
        (".safetensors", ".pt", ".pth", ".bin", ".ckpt"))


_SHA_CACHE: dict[tuple, str] = {}


def sha256_files(paths: Sequence[str | os.PathLike]) -> str:
    """sha256 of the files' bytes concatenated in the given order (for one file: its ``sha256sum``).

    Cached per (path, size, mtime) within the process, as encoder weights can be gigabytes.
    """
    paths = [Path(p).resolve() for p in paths]
    key = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        for p in paths:
            with open(p, "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


# What transformers' and diffusers' from_pretrained read (no variant), in their order of preference.
_HF_WEIGHTS = ("model.safetensors", "diffusion_pytorch_model.safetensors", "pytorch_model.bin",
               "diffusion_pytorch_model.bin")


def hf_weight_files(directory: Path) -> list[Path]:
    """The weight files ``from_pretrained`` would read from a ``save_pretrained`` directory: the standard file or
    the shards its ``.index.json`` names, not a variant beside it (``*.fp16.safetensors``) or another checkpoint
    in the folder (``sdxl_vae.safetensors``); for other layouts, every weights file of the first kind found."""
    for name in _HF_WEIGHTS:
        index = directory / f"{name}.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, AttributeError) as e:
                raise ValueError(f"{index}: not a weights index ({type(e).__name__}: {e})") from None
            return [directory / shard for shard in shards]
        if (directory / name).is_file():
            return [directory / name]
    for pattern in ("*.safetensors", "*.bin", "*.pt", "*.pth"):
        files = sorted(p for p in directory.glob(pattern) if p.is_file())
        if files:
            return files
    return []


def hf_provenance(name_or_path: str, display_name: str | None = None) -> dict[str, str]:
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        files = hf_weight_files(p)
        return {"name": display_name or str(name_or_path), "path": str(p.resolve()),
                "sha256": sha256_files(files) if files else ""}
    return {"name": display_name or str(name_or_path), "path": "", "sha256": ""}


def hf_load_error(cls_name: str, what: str, name_or_path: str, e: BaseException) -> Exception:
    hint = ("set name_or_path to a local directory saved with save_pretrained "
            "(config.json and weight files, plus tokenizer files for a text encoder)")
    if looks_like_path(str(name_or_path)) and not Path(str(name_or_path)).expanduser().exists():
        return FileNotFoundError(f"{cls_name}: {what} directory {name_or_path!r} does not exist; {hint}")
    return ValueError(f"{cls_name}: could not load {what} {name_or_path!r} ({type(e).__name__}: {one_line(e)}); "
                      f"it is not available offline or not a valid model; {hint}")


# state-dict hooks: module-level functions, as they must be picklable / deep-copyable and
# register_state_dict_post_hook sets an attribute on the hook, which bound methods refuse.


def _drop_external_keys(module: nn.Module, state_dict, prefix: str, local_metadata) -> None:
    if not module.weights_external:
        return
    inner = prefix + module.external_prefix
    for k in [k for k in state_dict if k.startswith(inner)]:
        del state_dict[k]
    meta = getattr(state_dict, "_metadata", None)
    if meta is not None:
        for k in [k for k in meta if k == inner[:-1] or k.startswith(inner)]:
            del meta[k]


def _remember_load_prefix(module: nn.Module, state_dict, prefix: str, *args) -> None:
    module._load_prefix = prefix


def _allow_missing_external_keys(module: nn.Module, incompatible_keys) -> None:
    prefix = getattr(module, "_load_prefix", None)
    if not module.weights_external or prefix is None:
        return
    inner = prefix + module.external_prefix
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not k.startswith(inner)]
    module._load_prefix = None


def keep_out_of_state_dict(module: nn.Module, external_prefix: str) -> None:
    """While ``module.weights_external`` is true, the parameters under ``external_prefix`` (e.g.
    ``"encoder."``) are left out of state dicts and may be missing when one is loaded."""
    module.external_prefix = external_prefix
    module._load_prefix = None
    module.register_state_dict_post_hook(_drop_external_keys)
    module.register_load_state_dict_pre_hook(_remember_load_prefix)
    module.register_load_state_dict_post_hook(_allow_missing_external_keys)


def tensors_sha256(module: nn.Module) -> str:
    """sha256 over a module's state-dict tensors (names and bytes): the identity of random weights."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        if isinstance(t, Tensor):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def loaded_provenance(current: Mapping[str, str], state: Any, external: bool) -> dict[str, str]:
    """The provenance to keep after a state dict recorded ``state``; warns when external weights differ.

    Weights that live in the state dict (random or trainable) take its provenance; external
    (pretrained, frozen) weights keep the current one, with a warning if the checkpoint was made
    with other weights.
    """
    if not isinstance(state, Mapping):
        return dict(current)
    loaded = {str(k): str(v) for k, v in state.items()}
    if not external:
        return {**current, **loaded}
    cls, name = current.get("class", ""), current.get("name", "")
    if loaded.get("class") and loaded["class"] != cls:
        warnings.warn(f"{cls}: state dict was saved by a {loaded['class']} ({loaded.get('name', '')!r})", stacklevel=3)
    elif loaded.get("sha256") and current.get("sha256") and loaded["sha256"] != current["sha256"]:
        warnings.warn(f"{cls}: checkpoint was made with weights {loaded.get('name', '')!r} "
                      f"sha256={loaded['sha256'][:12]}..., now loaded {name!r} sha256={current['sha256'][:12]}...",
                      stacklevel=3)
    elif loaded.get("name") and name and loaded["name"] != name and not current.get("sha256"):
        warnings.warn(f"{cls}: checkpoint was made with {loaded['name']!r}, now {name!r}", stacklevel=3)
    return dict(current)
