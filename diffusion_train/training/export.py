"""Weights export as safetensors: raw and each EMA under explicit file names."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffusion_train.files import atomic_save_file
from diffusion_train.finetune.lora import has_lora, lora_state, merged_state


def export_weights(state_dict: dict, ema: dict | None, out_dir: str | Path, metadata: dict | None = None,
                   lora_scaling: float | None = None, trained: list[str] | tuple[str, ...] = ()) -> list[Path]:
    """Writes ``raw.safetensors`` (the module's state dict, as a checkpoint's ``state_dict`` holds it) and
    ``ema_<decay>.safetensors`` (the same with each EMA average, ``checkpoint["ema"]``, in place of the
    trained parameters). Exported from the checkpoint, so a sharded model (FSDP) exports whole.

    A LoRA fine-tune (``lora_scaling`` = alpha / rank) writes those with the adapters merged into plain keys
    (they load into the model without peft), and what it trained alone as ``lora.safetensors`` and
    ``lora_ema_<decay>.safetensors``: the adapters and the ``trained`` tensors besides them (a task's input
    convolution, a conditioner trained with them)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    extra = {k: v for k, v in state_dict.items() if not isinstance(v, torch.Tensor)}  # e.g. text-encoder provenance
    meta = {"format": "pt", "diffusion_train": json.dumps(metadata or {}, default=str),
            "extra_state": json.dumps(extra, default=str)}
    raw = _unshared({k: v.detach().cpu().contiguous() for k, v in state_dict.items() if isinstance(v, torch.Tensor)})
    states = {"raw": raw}
    for decay, weights in ((ema or {}).get("weights") or {}).items():
        states[f"ema_{decay}"] = {**raw, **{n: w.detach().cpu().contiguous() for n, w in weights.items()}}
    written = []
    for name, state in states.items():
        if lora_scaling is not None and has_lora(state):
            written.append(_save(lora_state(state, trained), out_dir / ("lora.safetensors" if name == "raw" else
                                                               f"lora_{name}.safetensors"), meta))
            state = merged_state(state, lora_scaling)
        written.append(_save(state, out_dir / f"{name}.safetensors", meta))
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
    return atomic_save_file(state, path, meta)
