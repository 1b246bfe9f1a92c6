"""Building the DiffusionModule from a config, and rebuilding it from a checkpoint."""

from __future__ import annotations

import inspect
import os

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffusion_train.conditioning.autoencoder import Autoencoder
from diffusion_train.finetune.controlnet import ControlSource, make_controlnet
from diffusion_train.finetune.lora import apply_lora, input_layer
from diffusion_train.training.checkpointing import load_checkpoint
from diffusion_train.training.ema import checkpoint_average
from diffusion_train.training.module import DiffusionModule
from diffusion_train.training.parallel import resolve_accelerator
from diffusion_train.training.speed import resolve_channels_last, resolve_compile


def build_module(cfg: DictConfig, accelerator: str | None = None) -> DiffusionModule:
    """Backbone + conditioner + autoencoder + objective + optimizer factory, as the config names them.

    What the autoencoder makes of the data's images sizes the backbone's input (``in_channels``,
    ``input_size``), and what the conditioner produces sizes its conditioning inputs. ``training.compile=auto``
    and ``training.channels_last=auto`` are resolved for ``accelerator`` (default: the config's
    ``trainer.accelerator``).
    """
    conditioner = instantiate(cfg.conditioning, _convert_="all")
    autoencoder = instantiate(cfg.autoencoder, _convert_="all") if cfg.get("autoencoder") else Autoencoder()
    task = instantiate(cfg.task, _convert_="all") if cfg.get("task") else None
    backbone = build_backbone(cfg, conditioner, autoencoder, task)
    finetune = cfg.get("finetune") or {}
    method = finetune.get("method", "none")
    controlnet = control = None
    if method == "lora":
        apply_lora(backbone, rank=int(finetune.rank), alpha=float(finetune.alpha), dropout=float(finetune.dropout),
                   target_modules=OmegaConf.to_object(finetune.target_modules))
        if task is not None:  # the task's new input channels (at zero from a plain model) must learn
            input_layer(backbone)[1].requires_grad_(True)
        if not finetune.get("train_conditioner", False):
            conditioner.requires_grad_(False)
    elif method == "controlnet":
        controlnet = make_controlnet(backbone, int(finetune.control_channels), int(cfg.data.resolution),
                                     finetune.get("depth"))
        control = ControlSource(finetune.get("control_key"), finetune.get("detector"), int(finetune.control_channels))
        backbone.requires_grad_(False)
        if not finetune.get("train_conditioner", False):
            conditioner.requires_grad_(False)
    elif method != "none":
        raise ValueError(f"finetune.method={method!r}: valid: none, lora, controlnet")
    objective = instantiate(cfg.diffusion, _convert_="all")
    if not autoencoder.pixel_space:
        objective.clip_x0 = False  # [-1, 1] bounds pixels; latents are not clamped while sampling
    schedule = instantiate(cfg.lr_schedule, _convert_="all") if cfg.get("lr_schedule") else None
    training = dict(cfg.training)
    known = inspect.signature(DiffusionModule.__init__).parameters
    unknown = sorted(k for k in training if k not in known or k in ("backbone", "conditioner", "objective"))
    if unknown:
        options = sorted(k for k in known if k not in ("self", "backbone", "conditioner", "objective", "autoencoder",
                                                        "optimizer", "lr_schedule", "seed", "task", "controlnet",
                                                        "control"))
        raise ValueError(f"training.{unknown[0]}: not a training option; the options are {', '.join(options)}")
    if accelerator is None:
        accelerator = (cfg.get("trainer") or {}).get("accelerator")
    on_gpu = resolve_accelerator(accelerator) in ("gpu", "cuda")
    training["compile"] = resolve_compile(training.get("compile"), backbone, on_gpu)
    training["channels_last"] = resolve_channels_last(training.get("channels_last"), backbone, on_gpu)
    module = DiffusionModule(backbone, conditioner, objective, autoencoder=autoencoder,
                             optimizer=instantiate(cfg.optim, _convert_="all"), lr_schedule=schedule, seed=cfg.seed,
                             task=task, controlnet=controlnet, control=control, **training)
    module.data_resize = (cfg.get("data") or {}).get("resize")
    return module


def build_backbone(cfg: DictConfig, conditioner, autoencoder: Autoencoder, task=None) -> torch.nn.Module:
    """``cfg.model`` sized by the data through the autoencoder (``in_channels``, ``input_size``), by
    what the conditioner produces (``cond_dim``, ``context_dim``) and by the task's extra input channels."""
    channels, size = autoencoder.latent_shape(int(cfg.data.channels), int(cfg.data.resolution))
    dims = {"in_channels": channels, "input_size": size, "cond_dim": conditioner.vector_dim}
    if task is not None:
        dims.update(in_channels=channels + task.extra_channels(channels), out_channels=channels)
    if conditioner.context_dim:
        dims["context_dim"] = conditioner.context_dim
    return instantiate(cfg.model, **dims, _convert_="all")


def load_module(ckpt_path: str | os.PathLike, weights: str = "ema", map_location="cpu") -> DiffusionModule:
    """The model of a checkpoint with its raw weights (``weights="raw"``), its sampling EMA
    (``"ema"``) or the EMA of one decay (``"ema_0.9999"``), in eval mode."""
    return checkpoint_module(load_checkpoint(ckpt_path, map_location), weights, str(ckpt_path))


def with_recorded_autoencoder(config: dict, state_dict: dict) -> dict:
    """The run's config, with its autoencoder's weights file at the absolute path the checkpoint recorded when the
    config's own path (often relative to where the run was launched, e.g. ``vae/fmnist.safetensors``) is not found
    from here. The file's weights are not in the checkpoint, only its provenance."""
    autoencoder = config.get("autoencoder") or {}
    weights = autoencoder.get("weights")
    recorded = (state_dict.get("autoencoder._extra_state") or {}).get("path")
    if isinstance(weights, str) and not os.path.exists(os.path.expanduser(weights)) and recorded \
            and os.path.isfile(recorded):
        return {**config, "autoencoder": {**autoencoder, "weights": recorded}}
    return config


# What a model loaded for sampling runs without, whatever its run trained with: float8 matmuls and a bf16 residual
# stream change its numbers, recomputation saves nothing without gradients, and an attention kernel chosen for the
# training GPU (cudnn, efficient) may not exist where it samples.
TRAINING_ONLY = {"fp8": False, "bf16_residual": False, "activation_checkpointing": False, "attention": "auto"}


def checkpoint_module(ckpt: dict, weights: str = "ema", where: str = "the checkpoint") -> DiffusionModule:
    """:func:`load_module` of a checkpoint already loaded (``where`` names it in errors); ``loaded_weights`` on the
    module names the weights it holds (``raw``, ``ema_<average>``), ``loaded_step`` the checkpoint's step."""
    meta = ckpt.get("diffusion_train", {})
    if "config" not in meta:
        raise ValueError(f"{where} holds no diffusion_train run metadata; cannot rebuild its model")
    config = with_recorded_autoencoder(meta["config"], ckpt["state_dict"])
    config = {**config, "training": {**(config.get("training") or {}), **TRAINING_ONLY}}
    module = build_module(OmegaConf.create(config), accelerator="cpu")  # compile=auto: not for sampling
    load_checkpoint_weights(module, ckpt, weights, where)
    return module.eval()


def load_checkpoint_weights(module: DiffusionModule, ckpt: dict, weights: str = "ema",
                            where: str = "the checkpoint") -> None:
    """The checkpoint's state into ``module``, with ``weights`` (``raw``, ``ema``: its sampling average, or
    ``ema_<average>``) as its trained parameters; ``loaded_weights`` and ``loaded_step`` say which."""
    module.load_state_dict(ckpt["state_dict"])
    module.loaded_weights = "raw"  # which weights these are, for the records of what samples with it
    module.loaded_step = ckpt.get("global_step")  # the optimizer steps they were trained for
    if weights != "raw":
        params = dict(module.named_parameters())
        average, values = checkpoint_average(ckpt, weights, where)
        with torch.no_grad():
            for name, value in values.items():
                params[name].copy_(value)
        module.loaded_weights = f"ema_{average}"
