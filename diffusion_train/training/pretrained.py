"""Starting a run from pretrained weights (``init.*`` in the config): one of our checkpoints, a run directory
or exported safetensors, with its EMA or raw weights, loaded whole or in part with a report of what was not.

A resumed run never reads ``init``: its own checkpoint holds the weights it trained.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from diffusion_train.files import read_safetensors
from diffusion_train.finetune.lora import LORA_KEY, has_lora, lora_scaling, merged_state, plain_key
from diffusion_train.training.checkpointing import last_checkpoint, load_checkpoint
from diffusion_train.training.ema import EMA, checkpoint_average

log = logging.getLogger("diffusion_train")
SHOWN = 5  # keys named in errors and in the log
TRAINING_STATE = ("nonfinite_steps",)  # counters of the earlier run, not weights: a new run starts its own


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did; kept in ``run.json`` under ``init``."""

    source: str
    weights: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)  # the model's tensors the file does not have: left as built
    unexpected: list[str] = field(default_factory=list)  # the file's tensors the model does not have: ignored
    prefix: str = ""  # added to the file's keys (a backbone-only file: "backbone.")
    adapters: int = 0  # LoRA adapter tensors of this model, new in a fine-tune: initialised as built
    expanded: list[str] = field(default_factory=list)  # input convolutions with more channels: the new ones at 0
    controlnet_from_base: bool = False  # a ControlNet's copies took the loaded backbone's weights
    objective_change: str | None = None  # how the file's recorded diffusion objective differs from the run's

    def summary(self) -> str:
        parts = [f"init from {self.source} ({self.weights} weights): {self.loaded} tensors loaded"]
        for name, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            if keys:
                parts.append(f"{len(keys)} {name} (first: {', '.join(keys[:SHOWN])})")
        if self.prefix:
            parts.append(f"file keys read under {self.prefix!r}")
        if self.expanded:
            parts.append(f"new input channels at zero in {', '.join(self.expanded)}")
        if self.adapters:
            parts.append(f"{self.adapters} new LoRA adapter tensors")
        if self.controlnet_from_base:
            parts.append("the ControlNet copied from the loaded backbone")
        return "; ".join(parts)

    def as_dict(self) -> dict:
        return asdict(self)


def objective_change(recorded: dict | None, diffusion: dict) -> str | None:
    """How the diffusion objective ``recorded`` (the ``diffusion`` config weights were trained with) differs from
    ``diffusion`` (a resolved ``diffusion`` config) in prediction or schedule, e.g. ``prediction v -> eps``; None
    when it does not, or when nothing was recorded."""
    if not recorded:
        return None
    changes = [f"{key} {recorded.get(key)} -> {diffusion.get(key)}" for key in ("prediction", "schedule")
               if recorded.get(key) != diffusion.get(key)]
    return "; ".join(changes) or None


def read_weights(path: str | Path, weights: str = "ema") -> tuple[dict[str, Tensor], str, str, dict]:
    """The tensors of ``path`` by module key, the file actually read, which weights they are, and the training
    config the file records (a checkpoint's, or an export's metadata; empty for other files).

    ``path``: a checkpoint (``.ckpt``), an exported ``.safetensors`` file, or a run directory (its
    ``checkpoints/last.ckpt``, else its ``weights/<weights>.safetensors``). ``weights``: ``ema`` (the
    checkpoint's sampling decay), ``ema_<decay>`` or ``raw``; an exported file holds one kind already. A LoRA
    run's checkpoint gives its adapted model's weights (the adapters merged, under the plain model's keys), as
    its exports do.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"init.path: {path} does not exist")
    if path.is_dir():
        ckpt = last_checkpoint(path)  # its last.ckpt, else its latest step_*.ckpt
        if ckpt is not None:
            path = ckpt
        else:
            exported = sorted((path / "weights").glob(f"{'ema_*' if weights == 'ema' else weights}.safetensors"))
            if not exported:
                raise FileNotFoundError(f"init.path: {path} holds neither checkpoints (last.ckpt, step_*.ckpt) nor "
                                        f"weights/{weights}.safetensors")
            path = _sampling_export(exported) if weights == "ema" else exported[-1]
    if path.suffix == ".safetensors":
        state, meta = read_safetensors(path, "init.path")
        return state, str(path), path.stem, json.loads(meta.get("diffusion_train") or "{}").get("config") or {}
    ckpt = load_checkpoint(path)
    state = {k: v for k, v in ckpt.get("state_dict", {}).items() if isinstance(v, Tensor)}
    if not state:
        raise ValueError(f"init.path: {path} holds no state_dict; give a checkpoint, a run directory or a "
                         f".safetensors file")
    kind = "raw"
    if weights != "raw":
        name, average = checkpoint_average(ckpt, weights, f"init.path: {path}", "init.weights")
        state.update(average)
        kind = f"ema_{name}"
    config = (ckpt.get("diffusion_train") or {}).get("config") or {}
    scaling = lora_scaling(config)
    if scaling is not None and has_lora(state):  # a LoRA run's model: its adapters folded in
        state = merged_state(state, scaling)
    return state, str(path), kind, config


def export_info(path: Path) -> dict:
    """What an exported ``.safetensors`` file records of its run (``config``, ...); empty for other files."""
    return json.loads(read_safetensors(path, "init.path", tensors=False)[1].get("diffusion_train") or "{}")


def _sampling_export(files: list[Path]) -> Path:
    """Of a run's exported EMA files, the one of its sampling average (``callbacks.ema.sample_decay`` of the config
    the export records), else the last by name."""
    info = export_info(files[0])
    chosen = (((info.get("config") or {}).get("callbacks") or {}).get("ema") or {}).get("sample_decay")
    named = files[0].with_name(f"ema_{EMA.key(chosen)}.safetensors") if chosen is not None else None
    return named if named in files else files[-1]


def load_pretrained(module: nn.Module, path: str | Path, weights: str = "ema", strict: bool = True,
                    diffusion: dict | None = None) -> LoadReport:
    """Copies the pretrained tensors of ``path`` (see :func:`read_weights`) into ``module`` in place.

    Keys are the module's state-dict keys; a file whose keys are a bare backbone's (none starts with one
    of the module's top-level names) is read under ``backbone.``. Every tensor both have must have the same
    shape, else a ValueError lists the first that differ. ``strict``: the file must also hold every tensor
    of the model and nothing else; ``strict=False`` loads what both have and reports the rest. Training
    counters (``nonfinite_steps``) start afresh. An input convolution with more input channels in the model
    than in the file (an inpainting model started from a plain one) takes the file's weights for the first
    channels and zeros for the others. ``diffusion``: the run's resolved diffusion config, against which the
    report's ``objective_change`` names what differs from the objective the file was trained with.
    """
    state, source, kind, config = read_weights(path, weights)
    # tensors only: extra states (a frozen text encoder's provenance) are not weights and checkpoints keep them apart
    own = {k: v for k, v in module.state_dict().items() if isinstance(v, Tensor) and k not in TRAINING_STATE}
    state = {k: v for k, v in state.items() if k not in TRAINING_STATE}
    tops = {k.split(".", 1)[0] for k in own}
    prefix = "" if any(k.split(".", 1)[0] in tops for k in state) else "backbone."
    adapted = {plain_key(k): k for k in own if ".base_layer." in k}  # a LoRA model's base layers (finetune=lora)
    in_file = {}  # the model's key of each tensor -> its key in the file, for the errors
    for k in list(state):
        key = prefix + k
        in_file[key if key in own else adapted.get(key, key)] = k
    state = {key: state[k] for key, k in in_file.items()}
    adapters = [k for k in own if LORA_KEY.search(k) and k not in state]  # the fine-tune's own adapters: as built
    controlnet = getattr(module, "controlnet", None)
    copy_base = controlnet is not None and not any(k.startswith("controlnet.") for k in state)
    # a ControlNet fine-tune from a plain model: its copies take the base's weights below
    new = adapters + ([k for k in own if k.startswith("controlnet.")] if copy_base else [])
    change = objective_change(config.get("diffusion"), diffusion) if diffusion else None
    report = LoadReport(source=source, weights=kind, prefix=prefix, adapters=len(adapters), objective_change=change,
                        missing=[k for k in own if k not in state and k not in new],
                        unexpected=[k for k in state if k not in own])
    common = [k for k in own if k in state]
    if not common:
        raise ValueError(f"init.path: none of the {len(state)} tensors of {source} has a name of this model "
                         f"(file: {next(iter(in_file.values()), '-')}, model: {next(iter(own), '-')})")
    expand = [k for k in common if _more_inputs(state[k], own[k])]  # e.g. an inpainting model from a plain one
    differ = [f"{in_file[k]} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
              + (f" ({k})" if in_file[k] != k else "") for k in common if state[k].shape != own[k].shape
              and k not in expand]
    if differ:
        raise ValueError(f"init.path: {source} does not match the configured model: {len(differ)} tensors differ "
                         f"in shape, first: {'; '.join(differ[:SHOWN])}")
    if strict and (report.missing or report.unexpected):
        gaps = "; ".join(f"{len(keys)} {name} (first: {', '.join(keys[:SHOWN])})" for name, keys in
                         (("missing", report.missing), ("unexpected", report.unexpected)) if keys)
        raise ValueError(f"init.strict: {source} and the model differ: {gaps}; set init.strict=false to load the "
                         f"{len(common)} tensors both have")
    with torch.no_grad():
        for k in common:
            if k in expand:  # the file's input channels first, the new ones at zero: the model starts as the file's
                own[k].zero_()[:, : state[k].shape[1]].copy_(state[k])
            else:
                own[k].copy_(state[k])
    report.loaded, report.expanded = len(common), expand
    for part in module.modules():  # random encoders' provenance: the sha256 of the weights they now hold
        if hasattr(part, "weights_replaced"):
            part.weights_replaced()
    if copy_base:
        controlnet.copy_base(module.backbone)
        report.controlnet_from_base = True
    return report


def _more_inputs(file: Tensor, model: Tensor) -> bool:
    """A convolution weight (out, in, kh, kw) the model has with more input channels than the file."""
    return (file.ndim == model.ndim == 4 and file.shape[0] == model.shape[0] and file.shape[2:] == model.shape[2:]
            and file.shape[1] < model.shape[1])
