"""The inpainting task (``task=inpainting``): the backbone also sees the known part of the image and the mask.

Training draws a random mask per sample (:mod:`diffusion_train.finetune.masks`: boxes, brush strokes,
outpainting borders, or all unknown) at the latent grid and appends ``mask`` and the masked latents to the
noisy input, ``C + 1`` extra input channels, in the order of Stable Diffusion's inpainting U-Net (noisy latents,
mask, masked latents). The masked latents are ``x0 * (1 - mask)`` (``masked_image=zeroed``, which works on
precomputed latents) or, as Stable Diffusion's inpainting U-Net was trained, the autoencoder's encoding of the
image with the unknown pixels gray (``masked_image=encoded``: one more encode per step). A model started from a
plain one (``init.path``) gets those channels' input weights at zero (see ``training.pretrained``), so it starts
as the plain model.

Sampling (:meth:`DiffusionModule.inpaint`) gives the same inputs from a known image and mask, keeps the known
latents in every denoised estimate (:class:`KnownRegion`), and puts the known pixels back exactly at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from diffusion_train.diffusion.objective import unclipped
from diffusion_train.finetune.masks import random_masks

DEFAULT_MASKS = {"box": 0.4, "stroke": 0.3, "border": 0.2, "full": 0.1}
MASKED_IMAGES = ("zeroed", "encoded")


class Inpainting:
    """``masks``: {kind: weight} of the training masks (box, stroke, border, full); ``masked_image``: how the
    known part reaches the model, ``zeroed`` (its latents, zero under the mask) or ``encoded`` (the encoding of
    the image with the unknown pixels gray, Stable Diffusion's inpainting input; needs the batch's images)."""

    def __init__(self, masks: Mapping[str, float] | None = None, masked_image: str = "zeroed"):
        self.masks = dict(masks or DEFAULT_MASKS)
        random_masks(1, 2, 2, self.masks)  # validates the kinds and weights now
        if masked_image not in MASKED_IMAGES:
            raise ValueError(f"task.masked_image must be one of {', '.join(MASKED_IMAGES)}, got {masked_image!r}")
        self.masked_image = masked_image

    @property
    def needs_images(self) -> bool:
        """Training needs the batch's images, not only their latents (precomputed sets cannot train it)."""
        return self.masked_image == "encoded"

    def extra_channels(self, channels: int) -> int:
        """Input channels added to a backbone of ``channels`` latent channels: the masked latents and the mask."""
        return channels + 1

    def image(self, x0: Tensor, mask: Tensor, pixels: Tensor | None = None,
              encode: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """``cond.image``: the mask (1 = fill in), then the masked latents: ``x0`` zeroed under the mask, or
        (``masked_image=encoded``) ``encode`` of ``pixels`` (the images ``x0`` encodes) gray where the mask,
        scaled up to the pixel grid, is 1."""
        if self.masked_image == "zeroed":
            return torch.cat([mask, x0 * (1 - mask)], dim=1)
        if pixels is None or encode is None:
            raise ValueError("task.masked_image=encoded encodes the masked images, so it needs the images: a batch "
                             "of precomputed latents has none (use task.masked_image=zeroed)")
        (h, w), (ph, pw) = mask.shape[-2:], pixels.shape[-2:]
        if ph % h or pw % w:
            raise ValueError(f"the images ({ph}x{pw}) are not a whole multiple of the latent mask ({h}x{w})")
        pixel_mask = mask.repeat_interleave(ph // h, dim=-2).repeat_interleave(pw // w, dim=-1)
        masked = encode(pixels * (1 - pixel_mask.to(pixels.dtype)))
        return torch.cat([mask, masked.to(x0.dtype)], dim=1)

    def null_image(self, like: Tensor, pixels: Tensor | None = None,
                   encode: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """``cond.image`` with nothing known (all masked): plain generation, as the ``full`` masks teach. For
        ``masked_image=encoded``, ``pixels`` is one image's shape (its values are not read) and ``encode`` is
        applied to it all gray; the result is the same for every image of the batch."""
        one = torch.zeros_like(like[:1])
        gray = None if pixels is None else torch.zeros_like(pixels[:1])
        return self.image(one, torch.ones_like(one[:, :1]), gray, encode).expand(like.shape[0], -1, -1, -1)

    def training_image(self, x0: Tensor, generator: torch.Generator | None = None, batch: dict | None = None,
                       encode=None) -> Tensor:
        b, _, h, w = x0.shape
        mask = random_masks(b, h, w, self.masks, generator, device=x0.device).to(x0.device, x0.dtype)
        if self.masked_image == "zeroed":
            return self.image(x0, mask)
        if batch is None or "image" not in batch:
            raise KeyError("task.masked_image=encoded encodes the masked images, so each batch needs its 'image'; "
                           f"this one has {sorted(batch or {})} (precomputed latents: use task.masked_image=zeroed)")
        return self.image(x0, mask, batch["image"], lambda pixels: encode({"image": pixels}))


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
