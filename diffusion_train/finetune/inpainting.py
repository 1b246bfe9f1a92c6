"""The inpainting task (``task=inpainting``): the backbone also sees the known part of the image and the mask.

Training draws a random mask per sample (:mod:`diffusion_train.finetune.masks`: boxes, brush strokes,
outpainting borders, or all unknown) at the latent grid and appends ``mask`` and ``x0 * (1 - mask)`` to the
noisy input, ``C + 1`` extra input channels, in the order of Stable Diffusion's inpainting U-Net (noisy latents,
mask, masked latents). A model started from a plain one (``init.path``) gets those
channels' input weights at zero (see ``training.pretrained``), so it starts as the plain model.

Sampling (:meth:`DiffusionModule.inpaint`) gives the same inputs from a known image and mask, keeps the known
latents in every denoised estimate (:class:`KnownRegion`), and puts the known pixels back exactly at the end.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from diffusion_train.diffusion.objective import unclipped
from diffusion_train.finetune.masks import random_masks

DEFAULT_MASKS = {"box": 0.4, "stroke": 0.3, "border": 0.2, "full": 0.1}


class Inpainting:
    """``masks``: {kind: weight} of the training masks (box, stroke, border, full)."""

    def __init__(self, masks: Mapping[str, float] | None = None):
        self.masks = dict(masks or DEFAULT_MASKS)
        random_masks(1, 2, 2, self.masks)  # validates the kinds and weights now

    def extra_channels(self, channels: int) -> int:
        """Input channels added to a backbone of ``channels`` latent channels: the masked latents and the mask."""
        return channels + 1

    @staticmethod
    def image(x0: Tensor, mask: Tensor) -> Tensor:
        """``cond.image``: the mask (1 = fill in), then the known latents (zero where unknown)."""
        return torch.cat([mask, x0 * (1 - mask)], dim=1)

    def null_image(self, like: Tensor) -> Tensor:
        """``cond.image`` with nothing known (all masked): plain generation, as the ``full`` masks teach."""
        return self.image(torch.zeros_like(like), torch.ones_like(like[:, :1]))

    def training_image(self, x0: Tensor, generator: torch.Generator | None = None, batch: dict | None = None,
                       encode=None) -> Tensor:
        b, _, h, w = x0.shape
        mask = random_masks(b, h, w, self.masks, generator, device=x0.device).to(x0.device)
        return self.image(x0, mask.to(x0.dtype))


class KnownRegion:
    """A denoiser whose clean-sample estimate is the known ``x0`` where ``mask`` is 0 (the model's elsewhere).

    Every sampler step then moves the known region towards the known latents along the schedule, and the
    last estimate holds them exactly. Batches that are a multiple of ``x0``'s (guidance's doubled batch)
    use ``x0`` repeated."""

    def __init__(self, denoiser, x0: Tensor, mask: Tensor):
        self.denoiser, self.x0, self.mask = denoiser, x0, mask

    def __getattr__(self, name: str):  # schedule, alpha_sigma, timesteps: the wrapped denoiser's
        if name == "denoiser":
            raise AttributeError(name)
        return getattr(self.denoiser, name)

    def __call__(self, x: Tensor, t: Tensor, cond) -> Tensor:
        return self.clip(self.estimate(x, t, cond))

    def estimate(self, x: Tensor, t: Tensor, cond) -> Tensor:
        """The estimate before the wrapped denoiser's clipping (see ``unclipped``), with the known region."""
        x0 = unclipped(self.denoiser)[0](x, t, cond)
        repeat = x.shape[0] // self.x0.shape[0]
        known, mask = self.x0.repeat(repeat, 1, 1, 1), self.mask.repeat(repeat, 1, 1, 1)
        return torch.where(mask > 0.5, x0, known.to(x0.dtype))

    def clip(self, x0: Tensor) -> Tensor:
        return unclipped(self.denoiser)[1](x0)
