"""The conditioning a backbone receives, whatever produced it."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class Cond:
    """Conditioning for one batch.

    vector:  (B, D) added to the timestep embedding / used for adaLN (class labels, pooled text).
    context: (B, L, Dc) token sequence for cross-attention (text encoders), or None.
    mask:    (B, L) bool, True where ``context`` holds a real token, or None.
    image:   (B, Ci, H, W) channels appended to the backbone's input (an inpainting task's masked image and
             mask, an editing task's source image), or None.
    control: (B, Cc, H', W') a ControlNet's control image (edges, depth, ...) at image resolution, or None.
    """

    vector: Tensor | None = None
    context: Tensor | None = None
    mask: Tensor | None = None
    image: Tensor | None = None
    control: Tensor | None = None

    def _map(self, fn) -> "Cond":
        return Cond(**{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                       for f in fields(self)})

    def to(self, *args, **kwargs) -> "Cond":
        return self._map(lambda t: t.to(*args, **kwargs))

    def __getitem__(self, index) -> "Cond":
        return self._map(lambda t: t[index])

    def repeat(self, n: int) -> "Cond":
        """Each row repeated ``n`` times along the batch, like ``torch.cat([c] * n)``."""
        return self._map(lambda t: torch.cat([t] * n))

    @staticmethod
    def cat(conds: list["Cond"]) -> "Cond":
        """Concatenate along the batch dimension (used for the batched CFG forward pass).

        Token sequences of different lengths are right-padded with zeros and ``mask`` False.
        """
        out = {}
        for f in fields(Cond):
            values = [getattr(c, f.name) for c in conds]
            if all(v is None for v in values):
                out[f.name] = None
            elif any(v is None for v in values):
                raise ValueError(f"Cond.cat: field {f.name!r} is set in some conds and None in others")
            else:
                if f.name in ("context", "mask"):
                    length = max(v.shape[1] for v in values)
                    values = [torch.nn.functional.pad(v, (0, 0, 0, length - v.shape[1])) if v.ndim == 3 else
                              torch.nn.functional.pad(v, (0, length - v.shape[1]), value=False) for v in values]
                out[f.name] = torch.cat(values)
        return Cond(**out)
