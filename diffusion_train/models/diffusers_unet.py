"""A diffusers ``UNet2DConditionModel`` (Stable Diffusion 1.x/2.x and their fine-tunes) as a backbone, so weights
users already have train here with this package's objectives, samplers, EMA and evaluation.

``forward(x, t, cond)``: ``cond.context`` (B, L, D) goes to the cross-attention (``encoder_hidden_states``) with
``cond.mask`` as its key mask, ``cond.image`` channels are appended to the input (inpainting U-Nets have 9 input
channels), and ``cond.vector`` goes in as ``class_labels`` when the U-Net has a class embedding. Timesteps are
the objective's model time (0..999 for the DDPM schedules, as diffusers' schedulers give). The objective must
match the weights' training: SD 1.x and SD 2-base predict eps (``diffusion=ddpm_scaled_linear``), SD 2.x-v
predicts v.
"""

from __future__ import annotations

import os
from typing import Any

from torch import Tensor, nn

from diffusion_train.conditioning.cond import Cond
from diffusion_train.models.layers import input_with_image


class DiffusersUNet(nn.Module):
    """``name_or_path``: a diffusers model directory (``subfolder``, default ``unet``, of a pipeline) or a Hugging
    Face name (offline: from the local cache); or ``config``: the U-Net's config for a freshly initialised one.
    ``in_channels``, ``input_size``, ``context_dim`` and ``cond_dim`` (from the data, autoencoder and
    conditioner) are checked against the U-Net's config."""

    def __init__(self, *, input_size: int, in_channels: int, name_or_path: str | os.PathLike | None = None,
                 subfolder: str | None = "unet", config: dict[str, Any] | None = None, cond_dim: int = 0,
                 context_dim: int = 0, out_channels: int | None = None) -> None:
        super().__init__()
        try:
            from diffusers import UNet2DConditionModel
        except ImportError as e:
            raise ImportError(f"model=diffusers_unet needs diffusers ({e}); pip install 'diffusion-train[latent]'") \
                from None
        if (name_or_path is None) == (config is None):
            raise ValueError("model.name_or_path or model.config: give one (a diffusers U-Net, or its config)")
        if name_or_path is not None:
            path = os.fspath(name_or_path)
            local = os.path.isdir(path)
            folder = subfolder if subfolder and (not local or os.path.isdir(os.path.join(path, subfolder))) else None
            self.unet = UNet2DConditionModel.from_pretrained(path, subfolder=folder)
        else:
            self.unet = UNet2DConditionModel(**config)
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

    def forward(self, x: Tensor, t: Tensor, cond: Cond | None = None, residuals: list[Tensor] | None = None) -> Tensor:
        if residuals is not None:
            raise ValueError("finetune=controlnet does not support model=diffusers_unet yet")
        x = input_with_image(x, cond, self.in_channels, "DiffusersUNet")
        context = cond.context if cond is not None else None
        if context is None:  # an unconditional pass of a text U-Net: one zero token
            context = x.new_zeros(x.shape[0], 1, self.context_dim)
        mask = cond.mask if cond is not None and cond.context is not None else None
        labels = cond.vector if self.uses_vector and cond is not None else None
        return self.unet(x, t, encoder_hidden_states=context.to(x.dtype), class_labels=labels,
                         encoder_attention_mask=mask, return_dict=False)[0]
