"""diffusers models as backbones, so weights users already have train here with this package's objectives,
samplers, EMA and evaluation: ``DiffusersUNet`` (``UNet2DConditionModel``: Stable Diffusion 1.x/2.x and their
fine-tunes) and ``DiffusersPixArt`` (``PixArtTransformer2DModel``: PixArt-alpha/sigma).

``forward(x, t, cond)``: ``cond.context`` (B, L, D) goes to the cross-attention (``encoder_hidden_states``) with
``cond.mask`` as its key mask, and ``cond.image`` channels are appended to the input (inpainting U-Nets have 9
input channels). Timesteps are the objective's model time (0..999 for the DDPM schedules, as diffusers'
schedulers give). The objective must match the weights' training: SD 1.x and SD 2-base predict eps
(``diffusion=ddpm_scaled_linear``), SD 2.x-v predicts v; PixArt predicts eps (its learned-variance channels are
dropped).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from diffusion_train.conditioning.cond import Cond
from diffusion_train.models.layers import input_with_image


def load_diffusers(cls_name: str, name_or_path, subfolder: str | None, config: dict | None) -> nn.Module:
    """A diffusers model class's instance from a folder, a pipeline's subfolder or a cached hub name, or from a
    config (freshly initialised)."""
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(f"diffusers backbones need diffusers ({e}); pip install 'diffusion-train[latent]'") from None
    cls = getattr(diffusers, cls_name)
    if (name_or_path is None) == (config is None):
        raise ValueError("model.name_or_path or model.config: give one (a diffusers model, or its config)")
    if config is not None:
        return cls(**config)
    path = os.fspath(name_or_path)
    local = os.path.isdir(path)
    folder = subfolder if subfolder and (not local or os.path.isdir(os.path.join(path, subfolder))) else None
    return cls.from_pretrained(path, subfolder=folder)


def text_inputs(cond: Cond | None, x: Tensor, width: int) -> tuple[Tensor, Tensor | None]:
    """(encoder_hidden_states, encoder_attention_mask): ``cond.context`` and ``cond.mask``, or for an unconditional
    pass one zero token and no mask."""
    if cond is None or cond.context is None:
        return x.new_zeros(x.shape[0], 1, width), None
    return cond.context.to(x.dtype), cond.mask


class DiffusersUNet(nn.Module):
    """``name_or_path``: a diffusers model directory (``subfolder``, default ``unet``, of a pipeline) or a Hugging
    Face name (offline: from the local cache); or ``config``: the U-Net's config for a freshly initialised one.
    ``in_channels``, ``input_size``, ``context_dim`` and ``cond_dim`` (from the data, autoencoder and
    conditioner) are checked against the U-Net's config."""

    def __init__(self, *, input_size: int, in_channels: int, name_or_path: str | os.PathLike | None = None,
                 subfolder: str | None = "unet", config: dict[str, Any] | None = None, cond_dim: int = 0,
                 context_dim: int = 0, out_channels: int | None = None) -> None:
        super().__init__()
        self.unet = load_diffusers("UNet2DConditionModel", name_or_path, subfolder, config)
        unet = self.unet.config
        self.in_channels, self.out_channels = int(unet.in_channels), int(unet.out_channels)
        self.input_size, self.context_dim = int(input_size), int(unet.cross_attention_dim or 0)
        self.size_multiple = 2 ** (len(unet.block_out_channels) - 1)
        where = name_or_path or "model.config"
        if self.in_channels != in_channels:
            raise ValueError(f"{where}: the U-Net takes {self.in_channels} input channels, the data, autoencoder and "
                             f"task give {in_channels}")
        if out_channels is not None and self.out_channels != out_channels:
            raise ValueError(f"{where}: the U-Net gives {self.out_channels} output channels, {out_channels} wanted")
        if context_dim and context_dim != self.context_dim:
            raise ValueError(f"{where}: the U-Net cross-attends to width {self.context_dim}, the conditioner gives "
                             f"{context_dim} (choose the text encoder it was trained with)")
        self.uses_vector = unet.class_embed_type is not None or unet.num_class_embeds is not None
        if cond_dim and not self.uses_vector:
            raise ValueError(f"{where}: the U-Net has no class embedding for the conditioner's {cond_dim}-wide vector "
                             f"(text-only conditioning: conditioning.embedders.<name>.output=context)")
        if self.uses_vector:
            _check_class_embedding(unet, cond_dim, where)
        self.cond_dim = int(cond_dim)  # the width of cond.vector, its class labels (0: none)

    def forward(self, x: Tensor, t: Tensor, cond: Cond | None = None, residuals: list[Tensor] | None = None) -> Tensor:
        """``residuals``: a ControlNet's additions to each down-block output, then to the middle block's."""
        x = input_with_image(x, cond, self.in_channels, "DiffusersUNet")
        context, mask = text_inputs(cond, x, self.context_dim)
        labels = cond.vector if self.uses_vector and cond is not None else None
        control = {} if residuals is None else {"down_block_additional_residuals": tuple(residuals[:-1]),
                                                "mid_block_additional_residual": residuals[-1]}
        return self.unet(x, t, encoder_hidden_states=context, class_labels=labels, encoder_attention_mask=mask,
                         return_dict=False, **control)[0]


def _check_class_embedding(unet, cond_dim: int, where) -> None:
    """``cond.vector`` goes in as ``class_labels``: only a class embedding that takes a float vector of its width
    can use it (projection, simple_projection: ``projection_class_embeddings_input_dim``; identity: the time
    embedding's width); one of class ids (``num_class_embeds``) or of timesteps cannot."""
    kind = unet.class_embed_type
    time_width = unet.time_embedding_dim or 4 * unet.block_out_channels[0]
    takes = {"projection": unet.projection_class_embeddings_input_dim,
             "simple_projection": unet.projection_class_embeddings_input_dim, "identity": time_width}.get(kind)
    if takes is None:
        setting = f"class_embed_type={kind}" if kind else f"num_class_embeds={unet.num_class_embeds}"
        raise ValueError(f"{where}: the U-Net's class embedding ({setting}) takes class ids or timesteps; the "
                         f"conditioner gives a float vector, which only class_embed_type projection, "
                         f"simple_projection or identity takes")
    if cond_dim != takes:
        raise ValueError(f"{where}: the U-Net's class embedding ({kind}) takes a {takes}-wide vector, the conditioner "
                         f"gives {cond_dim or 'none'}")


class DiffusersPixArt(nn.Module):
    """``name_or_path``: a PixArt pipeline directory (``subfolder``, default ``transformer``), a transformer
    directory or a cached hub name; or ``config``: a ``PixArtTransformer2DModel`` config. Text-conditioned through
    ``cond.context`` (T5's 4096-wide encodings for the released weights); the learned-variance half of the output
    is dropped. Models with resolution conditioning (the 1024 px ones) get the image's pixel size, taken as the
    latent size times ``pixel_factor``, and its aspect ratio."""

    def __init__(self, *, input_size: int, in_channels: int, name_or_path: str | os.PathLike | None = None,
                 subfolder: str | None = "transformer", config: dict[str, Any] | None = None, cond_dim: int = 0,
                 context_dim: int = 0, out_channels: int | None = None, pixel_factor: int = 8) -> None:
        super().__init__()
        self.transformer = load_diffusers("PixArtTransformer2DModel", name_or_path, subfolder, config)
        cfg = self.transformer.config
        where = name_or_path or "model.config"
        self.in_channels, self.input_size = int(cfg.in_channels), int(input_size)
        self.out_channels = out_channels if out_channels is not None else self.in_channels
        self.context_dim, self.size_multiple = int(cfg.caption_channels or 0), int(cfg.patch_size)
        self.pixel_factor = int(pixel_factor)
        if self.in_channels != in_channels:
            raise ValueError(f"{where}: the transformer takes {self.in_channels} input channels, the data, "
                             f"autoencoder and task give {in_channels}")
        if (cfg.out_channels or self.in_channels) < self.out_channels:
            raise ValueError(f"{where}: the transformer gives {cfg.out_channels} output channels, "
                             f"{self.out_channels} wanted")
        if context_dim and context_dim != self.context_dim:
            raise ValueError(f"{where}: the transformer takes captions {self.context_dim} wide, the conditioner gives "
                             f"{context_dim} (choose the text encoder it was trained with)")
        if cond_dim:
            raise ValueError(f"{where}: PixArt has no input for the conditioner's {cond_dim}-wide vector "
                             f"(conditioning.embedders.<name>.output=context)")

    def forward(self, x: Tensor, t: Tensor, cond: Cond | None = None, residuals: list[Tensor] | None = None) -> Tensor:
        if residuals is not None:
            raise ValueError("finetune=controlnet does not support model=diffusers_pixart")
        x = input_with_image(x, cond, self.in_channels, "DiffusersPixArt")
        context, mask = text_inputs(cond, x, self.context_dim)
        extra = {"resolution": None, "aspect_ratio": None}
        if self.transformer.use_additional_conditions:
            h, w = x.shape[-2:]
            size = torch.tensor([[h * self.pixel_factor, w * self.pixel_factor]], device=x.device, dtype=x.dtype)
            extra = {"resolution": size.expand(x.shape[0], 2),
                     "aspect_ratio": torch.full((x.shape[0], 1), h / w, device=x.device, dtype=x.dtype)}
        out = self.transformer(x, encoder_hidden_states=context, timestep=t, added_cond_kwargs=extra,
                               encoder_attention_mask=mask, return_dict=False)[0]
        return out[:, : self.out_channels]
