"""Classifier-free guidance as a denoiser wrapper: one batched forward pass for cond and uncond."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from diffusion_train.conditioning.cond import Cond
from diffusion_train.diffusion import parameterization as param
from diffusion_train.diffusion.objective import Denoiser, unclipped


def check_guidance(scale: Any, interval: Any = None, rescale: Any = 0.0, option: str = "") -> None:
    """One-line errors naming ``option`` (a config path, e.g. ``callbacks.sample_grid``) for guidance settings: a
    finite scale, an interval [lo, hi] of noise levels (sigma/alpha) with lo < hi, a rescale in [0, 1]."""
    where = f"{option}." if option else ""

    def number(value: Any) -> float:
        try:
            return float(value)
        except (TypeError, ValueError):
            return math.nan

    if not math.isfinite(number(scale)):
        raise ValueError(f"{where}guidance_scale={scale}: give a finite number (1: no guidance)")
    if interval is not None:
        pair = [number(v) for v in interval] if isinstance(interval, (list, tuple)) else []
        if len(pair) != 2 or not pair[0] < pair[1]:
            raise ValueError(f"{where}guidance_interval={interval}: give [lo, hi] with lo < hi, the noise levels "
                             f"(sigma/alpha) between which guidance applies")
    if not 0.0 <= number(rescale) <= 1.0:
        raise ValueError(f"{where}guidance_rescale={rescale}: give a number in [0, 1]")


class CFGDenoiser:
    """x0 = x0_uncond + scale * (x0_cond - x0_uncond) (Ho & Salimans 2022).

    Guidance is linear, so combining x0 estimates equals combining eps or v predictions.
    ``interval = (lo, hi)``: guidance only where lo < sigma/alpha <= hi (Kynkaanniemi et al. 2024);
    elsewhere the conditional estimate alone, and steps wholly outside skip the unconditional pass.
    ``rescale`` in [0, 1] (Lin et al. 2024): blend the guided prediction with a copy rescaled to the
    per-sample standard deviation of the conditional one, against over-exposure at high scales. As in the paper
    (whose model predicts v), this is done on v = alpha eps - sigma x0, whatever the model predicts.
    ``scale=1`` is the plain conditional model and skips the unconditional pass. A denoiser's ``clip_x0``
    clamps the guided estimate, not the two it combines.
    """

    def __init__(self, denoiser: Denoiser, uncond: Cond, scale: float,
                 interval: Sequence[float] | None = None, rescale: float = 0.0):
        self.denoiser, self.uncond, self.scale = denoiser, uncond, float(scale)
        self.schedule = denoiser.schedule
        self._estimate, self._clip = unclipped(denoiser)
        check_guidance(scale, interval, rescale)
        self.interval = None if interval is None else (float(interval[0]), float(interval[1]))
        self.rescale = float(rescale)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return self.denoiser.alpha_sigma(t)

    def _active(self, t: Tensor) -> Tensor:
        """(B,) bool: where guidance applies."""
        if self.interval is None:
            return torch.ones(t.shape, dtype=torch.bool, device=t.device)
        alpha, sigma = self.alpha_sigma(t)
        ve = sigma.double() / alpha.double()
        return (ve > self.interval[0]) & (ve <= self.interval[1])

    def __call__(self, x: Tensor, t: Tensor, cond: Cond | None) -> Tensor:
        if self.scale == 1.0 or cond is None:
            return self.denoiser(x, t, cond)
        active = self._active(t)
        if not bool(active.any()):
            return self.denoiser(x, t, cond)
        both = self._estimate(torch.cat([x, x]), torch.cat([t, t]), Cond.cat([cond, self.uncond]))
        x0_cond, x0_uncond = both.chunk(2)
        guided = x0_uncond + self.scale * (x0_cond - x0_uncond)
        if self.rescale > 0:
            guided = self._rescaled(x, t, guided, x0_cond)
        mask = active.reshape(-1, *([1] * (x.ndim - 1)))
        return self._clip(torch.where(mask, guided, x0_cond))

    def _rescaled(self, x: Tensor, t: Tensor, guided: Tensor, x0_cond: Tensor) -> Tensor:
        """The guided x0 estimate with its v prediction rescaled. The std is per sample; v and x0 are affine in
        each other at fixed x_t, so this is exact. Where sigma = 0, x0 is x_t itself and is left as it is."""
        alpha, sigma = (v.reshape(-1, *([1] * (x.ndim - 1))).to(guided.dtype) for v in self.alpha_sigma(t))
        v_guided, v_cond = (param.convert(e, "x0", "v", x, alpha, sigma) for e in (guided, x0_cond))
        dims = tuple(range(1, x.ndim))
        ratio = v_cond.std(dim=dims, keepdim=True) / v_guided.std(dim=dims, keepdim=True).clamp(min=1e-12)
        v = self.rescale * v_guided * ratio + (1 - self.rescale) * v_guided
        return torch.where(sigma > 0, param.to_x0("v", v, x, alpha, sigma), guided)


class DualGuidance:
    """Separate image and text guidance (InstructPix2Pix, Brooks et al. 2023) for models that see a source image
    in ``cond.image``::

        x0 = x0(-, -) + image_scale * (x0(img, -) - x0(-, -)) + text_scale * (x0(img, txt) - x0(img, -))

    ``uncond_text``: the conditioning without text but with the image; ``uncond_all``: without either. With
    ``image_scale = 1`` it is plain guidance with the image kept in both passes (and skips the image-free pass);
    ``text_scale = image_scale = 1`` is the conditional model alone. A denoiser's ``clip_x0`` clamps the guided
    estimate.
    """

    def __init__(self, denoiser: Denoiser, uncond_text: Cond, uncond_all: Cond, text_scale: float, image_scale: float):
        self.denoiser, self.uncond_text, self.uncond_all = denoiser, uncond_text, uncond_all
        self.text_scale, self.image_scale = float(text_scale), float(image_scale)
        self.schedule = denoiser.schedule
        self._estimate, self._clip = unclipped(denoiser)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return self.denoiser.alpha_sigma(t)

    def __call__(self, x: Tensor, t: Tensor, cond: Cond | None) -> Tensor:
        conds = [cond, self.uncond_text] + ([self.uncond_all] if self.image_scale != 1.0 else [])
        n = len(conds)
        out = self._estimate(torch.cat([x] * n), torch.cat([t] * n), Cond.cat(conds)).chunk(n)
        full, no_text = out[0], out[1]
        guided = no_text + self.text_scale * (full - no_text)
        if self.image_scale != 1.0:
            guided = guided + (self.image_scale - 1.0) * (no_text - out[2])
        return self._clip(guided)
