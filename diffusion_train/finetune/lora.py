"""LoRA adapters (through peft) on any backbone: low-rank updates ``W + (alpha / rank) * B @ A`` of chosen
Linear layers, with everything else frozen.

Layers are chosen by regular expressions searched in the backbone's module names (``blocks.3.attn.qkv``);
every pattern must match at least one Linear layer. peft renames an adapted layer's weight
``X.weight`` -> ``X.base_layer.weight`` and adds ``X.lora_A.default.weight`` (rank x in) and
``X.lora_B.default.weight`` (out x rank, zero at the start, so the adapted model starts as the base model).
:func:`merged_state` folds the adapters back into plain keys, for weights that load without peft.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor, nn

# One expression for every backbone here: attention projections (DiT, MMDiT image / text streams, U-Net
# attention and transformer blocks), DiT / MMDiT block MLPs, U-Net feed-forwards, the U-Net residual blocks'
# embedding projections, and a diffusers U-Net's attention and feed-forward layers (conf/finetune/lora.yaml).
DEFAULT_TARGETS = (r"(attn|cross_attn|image|text)\.(qkv|q|kv|proj)$|^blocks\.\d+\.(.+\.)?mlp\.[02]$|ff\.0\.proj$"
                   r"|ff\.1$|emb_proj\.1$|to_(q|k|v)$|to_out\.0$|ff\.net\.(0\.proj|2)$",)
ADAPTER = "default"  # peft's adapter name
LORA_KEY = re.compile(r"\.lora_[AB]\.")


def lora_targets(backbone: nn.Module, patterns: str | Sequence[str]) -> list[str]:
    """Names of the Linear layers whose name any of ``patterns`` (regular expressions, ``re.search``) finds;
    a ValueError names a pattern that finds no Linear layer."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    if not patterns:
        raise ValueError("finetune.target_modules is empty: give regular expressions of Linear layer names")
    linears = [name for name, m in backbone.named_modules() if isinstance(m, nn.Linear)]
    found: list[str] = []
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"finetune.target_modules: '{pattern}' is not a regular expression ({e})") from None
        hits = [name for name in linears if regex.search(name)]
        if not hits:
            raise ValueError(f"finetune.target_modules: '{pattern}' matches no Linear layer of "
                             f"{type(backbone).__name__} (e.g. {', '.join(linears[:4])})")
        found += [h for h in hits if h not in found]
    return found


def apply_lora(backbone: nn.Module, *, rank: int = 16, alpha: float = 16.0, dropout: float = 0.0,
               target_modules: str | Sequence[str] = DEFAULT_TARGETS) -> list[str]:
    """Injects LoRA adapters into the matched Linear layers of ``backbone`` (in place) and freezes every other
    parameter of it; returns the adapted layers' names."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise ImportError(f"finetune=lora needs peft ({e}); pip install 'diffusion-train[finetune]'") from None
    if rank < 1:
        raise ValueError(f"finetune.rank must be >= 1, got {rank}")
    targets = lora_targets(backbone, target_modules)
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha), lora_dropout=float(dropout), target_modules=targets,
                        bias="none")
    inject_adapter_in_model(config, backbone, adapter_name=ADAPTER)
    for name, p in backbone.named_parameters():
        p.requires_grad_(bool(LORA_KEY.search(name)))
    return targets


def input_layer(backbone: nn.Module) -> tuple[str, nn.Module]:
    """The backbone's input convolution (the first taking its ``in_channels``): a task's extra input channels
    (inpainting's mask, an editing source) enter there."""
    for name, m in backbone.named_modules():
        if isinstance(m, nn.Conv2d) and m.in_channels == getattr(backbone, "in_channels", None):
            return name, m
    raise ValueError(f"{type(backbone).__name__} has no input convolution taking its {backbone.in_channels} channels")


def lora_layers(module: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in module.modules() if isinstance(m, LoraLayer)]


def merge_lora(module: nn.Module) -> None:
    """Folds every adapter into its base weight (outputs unchanged; the adapters stay, inactive)."""
    for layer in lora_layers(module):
        layer.merge()


def unmerge_lora(module: nn.Module) -> None:
    """Undoes :func:`merge_lora`."""
    for layer in lora_layers(module):
        layer.unmerge()


def lora_scaling(config) -> float | None:
    """alpha / rank of a run config's LoRA fine-tune (a config or the dict a checkpoint or export records), else
    None."""
    finetune = config.get("finetune") or {}
    return float(finetune["alpha"]) / int(finetune["rank"]) if finetune.get("method") == "lora" else None


def has_lora(state: dict[str, Tensor]) -> bool:
    return any(LORA_KEY.search(k) for k in state)


def lora_state(state: dict[str, Tensor], trained: Sequence[str] = ()) -> dict[str, Tensor]:
    """What a LoRA fine-tune trains: the adapter tensors of a state dict, and the ``trained`` tensors besides them
    (a task's input convolution, a conditioner trained with ``train_conditioner``)."""
    trained = set(trained)
    return {k: v for k, v in state.items() if LORA_KEY.search(k) or k in trained}


def merged_state(state: dict[str, Tensor], scaling: float) -> dict[str, Tensor]:
    """A LoRA model's state dict as the plain model's: each ``X.base_layer.weight`` plus
    ``scaling * lora_B @ lora_A`` under ``X.weight``, ``X.base_layer.bias`` under ``X.bias``, adapters dropped."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if LORA_KEY.search(key):
            continue
        if ".base_layer." in key:
            layer, param = key.rsplit(".base_layer.", 1)
            if param == "weight":
                a, b = state[f"{layer}.lora_A.{ADAPTER}.weight"], state[f"{layer}.lora_B.{ADAPTER}.weight"]
                delta = (b.double() @ a.double()) * scaling
                value = (value.double() + delta).to(value.dtype)
            key = f"{layer}.{param}"
        out[key] = value
    return out


def plain_key(key: str) -> str:
    """The key a tensor of a LoRA model has in the plain model (``X.base_layer.weight`` -> ``X.weight``)."""
    return key.replace(".base_layer.", ".")


def apply_lora_file(module: nn.Module, path: str, scale: float = 1.0) -> list[str]:
    """Adds the adapters of an exported ``lora*.safetensors`` file (a ``finetune=lora`` run's, on the same base
    model) to ``module``'s plain weights in place: ``W += scale * (alpha / rank) * B @ A``, alpha and rank read
    from the file's run config; the other tensors the run trained (a task's input convolution, a trained
    conditioner) are moved ``scale`` of the way to the file's. Needs no peft; returns the layers and tensors
    changed. ``scale`` 0 leaves the model as it was, 1 gives the fine-tuned model.
    """
    import json

    from diffusion_train.files import read_safetensors

    tensors, metadata = read_safetensors(path, "lora")
    meta = json.loads(metadata.get("diffusion_train") or "{}")
    run_scaling = lora_scaling(meta.get("config") or {})
    if run_scaling is None or not has_lora(tensors):
        raise ValueError(f"lora={path}: not a LoRA export of a finetune=lora run (lora.safetensors, lora_ema_*)")
    scaling = float(scale) * run_scaling
    params = dict(module.named_parameters())
    layers = sorted({k.split(".lora_A.")[0] for k in tensors if ".lora_A." in k})
    missing = [f"{layer}.weight" for layer in layers if f"{layer}.weight" not in params]
    if missing:
        raise ValueError(f"lora={path}: the model has no {', '.join(missing[:3])}: adapters of another base model")
    for layer in layers:
        weight = params[f"{layer}.weight"]
        a, b = tensors[f"{layer}.lora_A.{ADAPTER}.weight"], tensors[f"{layer}.lora_B.{ADAPTER}.weight"]
        if (b.shape[0], a.shape[1]) != tuple(weight.shape):
            raise ValueError(f"lora={path}: {layer} is {tuple(weight.shape)} in the model, the adapter gives "
                             f"{(b.shape[0], a.shape[1])}")
        with torch.no_grad():
            weight.add_((b.double() @ a.double() * scaling).to(weight))
    trained = sorted(k for k in tensors if not LORA_KEY.search(k))
    for key in trained:
        if key not in params or params[key].shape != tensors[key].shape:
            have = "no such tensor" if key not in params else f"{tuple(params[key].shape)}"
            raise ValueError(f"lora={path}: {key} is {tuple(tensors[key].shape)} in the file, the model has {have}: "
                             f"a fine-tune of another base model")
        with torch.no_grad():
            params[key].lerp_(tensors[key].to(params[key]), float(scale))
    return layers + trained
