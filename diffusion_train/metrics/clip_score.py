"""CLIP score of generated images against their prompts, with an open_clip model."""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_train.conditioning.clip import load_open_clip
from diffusion_train.metrics.base import no_tf32

# open_clip's OpenAI normalization, used when the model's preprocess config gives none
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class CLIPScore(nn.Module):
    """``100 * max(cos(image embedding, text embedding), 0)`` per image (Hessel et al. clamp each image's cosine;
    the scale of 100 is torchmetrics', which clamps the mean instead), averaged over images; computed with an
    open_clip model (``model_name``, and ``pretrained``: a tag with cached weights, a local checkpoint file, or None
    with ``model_cfg`` for a random tiny model in tests).

    Images are float in [-1, 1] (B, C, H, W); 1-channel images are repeated to RGB, resized
    (bicubic, antialiased) to the model's image size and normalized with its mean and std. Runs in fp32
    with autocast and TF32 off. ``name`` (for metric names) is ``clip_score/<model>``.
    """

    def __init__(self, model_name: str = "ViT-L-14", pretrained: str | os.PathLike | None = "openai",
                 model_cfg: Mapping[str, Any] | None = None, create_kwargs: Mapping[str, Any] | None = None):
        super().__init__()
        model, self.tokenizer, self.provenance = load_open_clip(model_name, pretrained, model_cfg, create_kwargs,
                                                                "CLIPScore")
        if getattr(model, "visual", None) is None:
            raise ValueError(f"CLIPScore: {model_name!r} has no image tower")
        self.model = model.eval().requires_grad_(False)
        size = model.visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        cfg = getattr(model.visual, "preprocess_cfg", None) or {}
        self.register_buffer("mean", torch.tensor(cfg.get("mean", OPENAI_MEAN)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.get("std", OPENAI_STD)).view(1, 3, 1, 1), persistent=False)
        self.name = f"clip_score/{model_name.replace('/', '_')}"

    def train(self, mode: bool = True) -> "CLIPScore":
        return super().train(False)  # always in eval mode

    @torch.no_grad()
    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """(B,) float64 scores of the images against their prompts."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"CLIPScore: {images.shape[0]} images but {len(prompts)} prompts")
        device = self.mean.device
        with torch.autocast(device.type, enabled=False), no_tf32():
            x = images.to(device=device, dtype=torch.float32)
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
            x = F.interpolate((x + 1) / 2, size=self.image_size, mode="bicubic", antialias=True, align_corners=False)
            x = (x.clamp(0, 1) - self.mean) / self.std
            image = F.normalize(self.model.encode_image(x).float(), dim=-1)
            text = F.normalize(self.model.encode_text(self.tokenizer(list(prompts)).to(device)).float(), dim=-1)
        return (100 * (image * text).sum(-1)).clamp(min=0).double()
