"""Instruction editing (``task=editing``, InstructPix2Pix-style): the backbone also sees the source image's latents,
and an edit instruction arrives as text through the conditioner.

Training batches hold the edited image (``image`` or ``latent``, the target) and the source (``source`` image, or
``source_latent`` precomputed moments). The source is dropped (zero latents) for ``image_dropout`` of the
samples, independently of the text's own dropout, so the model learns all three passes of
:class:`~diffusion_train.diffusion.guidance.DualGuidance`. Sampling: ``DiffusionModule.edit``.
"""

from __future__ import annotations

import torch
from torch import Tensor


class InstructionEditing:
    def __init__(self, image_dropout: float = 0.05, source_key: str = "source"):
        if not 0.0 <= image_dropout < 1.0:
            raise ValueError(f"task.image_dropout must be in [0, 1), got {image_dropout}")
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

    def training_image(self, x0: Tensor, generator: torch.Generator | None, batch: dict, encode) -> Tensor:
        key = f"{self.source_key}_latent" if f"{self.source_key}_latent" in batch else self.source_key
        if key not in batch:
            raise KeyError(f"task=editing needs the source image in batch key {self.source_key!r} (or precomputed "
                           f"{self.source_key}_latent); the batch has {sorted(batch)}")
        source = encode({"latent" if key.endswith("_latent") else "image": batch[key]})
        if source.shape != x0.shape:
            raise ValueError(f"the source latents {tuple(source.shape)} do not match the target's {tuple(x0.shape)}")
        if self.image_dropout > 0:
            u = torch.rand(x0.shape[0], generator=generator, device=x0.device if generator is None else generator.device)
            source = torch.where((u < self.image_dropout).to(x0.device)[:, None, None, None], 0.0, source)
        return source
