"""Weights export as safetensors: raw and each EMA under explicit file names."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from diffusion_train.training.ema import EMA


def export_weights(module: nn.Module, ema: EMA | None, out_dir: str | Path, metadata: dict | None = None) -> list[Path]:
    """Writes ``raw.safetensors`` (the module's state dict) and ``ema_<decay>.safetensors`` (the same
    state dict with each EMA average in place of the trained parameters)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = module.state_dict()
    extra = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}  # e.g. text-encoder provenance
    meta = {"format": "pt", "diffusion_train": json.dumps(metadata or {}, default=str),
            "extra_state": json.dumps(extra, default=str)}
    raw = _unshared({k: v.detach().cpu().contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)})
    written = [_save(raw, out_dir / "raw.safetensors", meta)]
    if ema is not None and ema.weights:
        for decay, weights in ema.weights.items():
            state = dict(raw)
            state.update({n: w.detach().cpu().contiguous() for n, w in zip(ema.names, weights)})
            written.append(_save(state, out_dir / f"ema_{decay}.safetensors", meta))
    return written


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied weights, e.g. T5's embeddings): copy repeats."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        out[k] = v.clone() if ptr in seen else v
        if ptr != -1:
            seen.add(ptr)
    return out


def _save(state: dict[str, torch.Tensor], path: Path, meta: dict) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(path)
    return path
