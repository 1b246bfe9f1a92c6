"""Image grids as PNG files (no torchvision needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def grid(images: Tensor, ncol: int, pad: int = 2) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (rows*(H+pad)+pad, ncol*(W+pad)+pad, C) uint8, row-major order."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    n, c, h, w = x.shape
    rows = -(-n // ncol)
    out = torch.zeros(c, rows * (h + pad) + pad, ncol * (w + pad) + pad, dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, ncol)
        out[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = x[i]
    return out.permute(1, 2, 0).numpy()


def save_grid(images: Tensor, path: str | Path, ncol: int, pad: int = 2) -> Path:
    """Writes a PNG grid atomically (temp file + rename); one image with ``pad=0`` is the bare image."""
    arr = grid(images, ncol, pad)
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG")
    tmp.replace(path)
    return path
