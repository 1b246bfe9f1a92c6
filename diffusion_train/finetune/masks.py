"""Random inpainting masks, drawn on the device from a ``torch.Generator`` (so a resumed run draws the same).

A mask is (B, 1, H, W) float with 1 where the model fills in and 0 where the image is known.

``box``     one axis-aligned rectangle, each side between ``min_frac`` and ``max_frac`` of the image's.
``stroke``  a free-form brush stroke: a polyline of 2-5 random segments, 5-15% of the image wide.
``border``  outpainting: bands along 1-4 random sides, together 20-50% of the image across, known centre.
``full``    everything unknown: the model also learns plain generation (no known pixel).
"""

from __future__ import annotations

import torch
from torch import Tensor

KINDS = ("box", "stroke", "border", "full")


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator, device) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator, device=device)


def _grid(h: int, w: int, device) -> tuple[Tensor, Tensor]:
    """Pixel centres in [0, 1]: (1, H, 1) rows and (1, 1, W) columns."""
    ys = (torch.arange(h, device=device) + 0.5) / h
    xs = (torch.arange(w, device=device) + 0.5) / w
    return ys[None, :, None], xs[None, None, :]


def box_masks(n: int, h: int, w: int, generator: torch.Generator, device, min_frac: float = 0.25,
              max_frac: float = 0.6) -> Tensor:
    bh, bw = (_uniform(n, min_frac, max_frac, generator, device) for _ in range(2))
    top, left = _uniform(n, 0, 1, generator, device) * (1 - bh), _uniform(n, 0, 1, generator, device) * (1 - bw)
    ys, xs = _grid(h, w, device)
    inside = ((ys >= top[:, None, None]) & (ys < (top + bh)[:, None, None])
              & (xs >= left[:, None, None]) & (xs < (left + bw)[:, None, None]))
    return inside.float()[:, None]


def stroke_masks(n: int, h: int, w: int, generator: torch.Generator, device, max_segments: int = 5) -> Tensor:
    points = torch.rand(n, max_segments + 1, 2, generator=generator, device=device)  # (y, x) in [0, 1]
    segments = torch.randint(2, max_segments + 1, (n,), generator=generator, device=device)
    radius = _uniform(n, 0.025, 0.075, generator, device)
    ys, xs = _grid(h, w, device)
    pix = torch.stack(torch.broadcast_tensors(ys, xs), dim=-1).reshape(1, h * w, 2)  # (1, HW, 2)
    out = torch.zeros(n, h * w, dtype=torch.bool, device=device)
    for s in range(max_segments):
        a, b = points[:, s, None, :], points[:, s + 1, None, :]  # (n, 1, 2)
        ab = b - a
        t = ((pix - a) * ab).sum(-1) / (ab * ab).sum(-1).clamp(min=1e-12)
        nearest = a + t.clamp(0, 1)[..., None] * ab
        near = (pix - nearest).norm(dim=-1) <= radius[:, None]
        out |= near & (s < segments)[:, None]
    return out.reshape(n, 1, h, w).float()


def border_masks(n: int, h: int, w: int, generator: torch.Generator, device) -> Tensor:
    sides = torch.rand(n, 4, generator=generator, device=device) < 0.5  # top, bottom, left, right
    none = ~sides.any(dim=1)
    pick = torch.randint(0, 4, (n,), generator=generator, device=device)
    sides |= none[:, None] & (torch.arange(4, device=device) == pick[:, None])  # at least one side (no mask index:
    # that would make the host wait for the device)
    width = _uniform(n, 0.2, 0.5, generator, device) / sides.sum(dim=1)  # the bands together: 20-50% across
    ys, xs = _grid(h, w, device)
    wb = width[:, None, None]
    masked = ((sides[:, 0, None, None] & (ys < wb)) | (sides[:, 1, None, None] & (ys > 1 - wb))
              | (sides[:, 2, None, None] & (xs < wb)) | (sides[:, 3, None, None] & (xs > 1 - wb)))
    return masked.float()[:, None]


_WEIGHTS: dict[tuple, Tensor] = {}


def _on_device(values: tuple[float, ...], device) -> Tensor:
    """``values`` as a tensor on ``device``, copied there once (each copy from the host is a device sync)."""
    key = (values, str(device))
    if key not in _WEIGHTS:
        _WEIGHTS[key] = torch.tensor(values, device=device)
    return _WEIGHTS[key]


def random_masks(n: int, h: int, w: int, kinds: dict[str, float], generator: torch.Generator | None = None,
                 device="cpu") -> Tensor:
    """(n, 1, h, w) masks, each of a kind drawn with the probabilities ``kinds`` ({kind: weight})."""
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds or any(float(v) < 0 for v in kinds.values()) or sum(kinds.values()) <= 0:
        raise ValueError(f"task.masks: give non-negative weights of {', '.join(KINDS)} (not all 0), got {dict(kinds)}")
    if generator is None:
        generator = torch.Generator(device).manual_seed(0)
    device = generator.device
    names = list(kinds)
    weights = _on_device(tuple(float(kinds[k]) for k in names), device)
    choice = torch.multinomial(weights, n, replacement=True, generator=generator)
    drawn = {"box": box_masks(n, h, w, generator, device), "stroke": stroke_masks(n, h, w, generator, device),
             "border": border_masks(n, h, w, generator, device), "full": torch.ones(n, 1, h, w, device=device)}
    out = torch.zeros(n, 1, h, w, device=device)
    for i, name in enumerate(names):
        out = torch.where((choice == i)[:, None, None, None], drawn[name], out)
    return out


def downsample_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """A pixel mask at a latent grid's size: a latent is unknown if any of its pixels is (max pooling)."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return torch.nn.functional.adaptive_max_pool2d(mask, size)
