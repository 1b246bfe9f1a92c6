"""Instruction editing (``task=editing``, InstructPix2Pix-style): the backbone also sees the source image's latents,
and an edit instruction arrives as text through the conditioner.

Training batches hold the edited image (``image`` or ``latent``, the target) and the source (``source`` image, or
``source_latent`` precomputed moments). As in InstructPix2Pix, ``image_dropout`` (p) of the training samples lose the
source (zero latents) only, p the instruction only, and p both, in place of the text embedders' own dropout, so the
model learns all three passes of :class:`~diffusion_train.diffusion.guidance.DualGuidance` (independent draws gave
the pass without either p^2 of the samples). Validation keeps both. Sampling: ``DiffusionModule.edit``.
"""

from __future__ import annotations

import torch
from torch import Tensor


class InstructionEditing:
    def __init__(self, image_dropout: float = 0.05, source_key: str = "source"):
        if not 0.0 <= image_dropout < 1 / 3:
            raise ValueError(f"task.image_dropout must be in [0, 1/3) (that share drops the source, as many the text, "
                             f"as many both), got {image_dropout}")
        self.image_dropout, self.source_key = float(image_dropout), source_key

    @property
    def encoded_keys(self) -> tuple[str, ...]:
        """Batch images the task encodes besides ``image``: precomputed sets store them as ``<key>_latent``."""
        return (self.source_key,)

    def extra_channels(self, channels: int) -> int:
        """The source image's latents."""
        return channels

    @staticmethod
    def null_image(like: Tensor) -> Tensor:
        """``cond.image`` without a source: zero latents (what the dropped samples see)."""
        return torch.zeros_like(like)

    def draw_drops(self, n: int, generator: torch.Generator | None, device) -> tuple[Tensor, Tensor]:
        """(instruction dropped, source dropped) for ``n`` training samples: p of them lose the source only, p the
        instruction only, p both."""
        u = torch.rand(n, generator=generator, device=device if generator is None else generator.device).to(device)
        p = self.image_dropout
        return (u >= p) & (u < 3 * p), (u < p) | ((u >= 2 * p) & (u < 3 * p))

    def training_image(self, x0: Tensor, generator: torch.Generator | None, batch: dict, encode,
                       drop: Tensor | None = None) -> Tensor:
        """The source latents, zero where ``drop`` (from :meth:`draw_drops`; None in validation: none dropped)."""
        key = f"{self.source_key}_latent" if f"{self.source_key}_latent" in batch else self.source_key
        if key not in batch:
            raise KeyError(f"task=editing needs the source image in batch key {self.source_key!r} (or precomputed "
                           f"{self.source_key}_latent); the batch has {sorted(batch)}")
        source = encode({"latent" if key.endswith("_latent") else "image": batch[key]})
        if source.shape != x0.shape:
            raise ValueError(f"the source latents {tuple(source.shape)} do not match the target's {tuple(x0.shape)}")
        if drop is not None:
            source = torch.where(drop.to(x0.device)[:, None, None, None], 0.0, source)
        return source
