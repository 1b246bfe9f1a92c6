"""The conditioning a backbone receives, whatever produced it."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor


@dataclass
class Cond:
    """Conditioning for one batch.

    vector:  (B, D) added to the timestep embedding / used for adaLN (class labels, pooled text).
    context: (B, L, Dc) token sequence for cross-attention (text encoders), or None.
    mask:    (B, L) bool, True where ``context`` holds a real token, or None: every token is attended to.
    image:   (B, Ci, H, W) channels appended to the backbone's input (an inpainting task's masked image and
             mask, an editing task's source image), or None.
    control: (B, Cc, H', W') a ControlNet's control image (edges, depth, ...) at image resolution, or None.
    """

    vector: Tensor | None = None
    context: Tensor | None = None
    mask: Tensor | None = None
    image: Tensor | None = None
    control: Tensor | None = None

    def map(self, fn) -> "Cond":
        """A Cond of ``fn`` applied to each tensor field (None stays None)."""
        return Cond(**{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                       for f in fields(self)})

    def to(self, *args, **kwargs) -> "Cond":
        return self.map(lambda t: t.to(*args, **kwargs))

    def __getitem__(self, index) -> "Cond":
        return self.map(lambda t: t[index])

    def repeat(self, n: int) -> "Cond":
        """Each row repeated ``n`` times along the batch, like ``torch.cat([c] * n)``."""
        return self.map(lambda t: torch.cat([t] * n))

    @staticmethod
    def cat(conds: list["Cond"]) -> "Cond":
        """Concatenate along the batch dimension (used for the batched CFG forward pass).

        Token sequences of different lengths are right-padded with zeros and ``mask`` False.
        """
        contexts = [c.context for c in conds]
        if all(c is not None for c in contexts) and len({c.shape[1] for c in contexts}) > 1 \
                and all(c.mask is None for c in conds):  # padding needs a mask to be left out
            conds = [replace(c, mask=joint_mask([c.context], [c.mask], fill=True)) for c in conds]
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


def joint_mask(contexts: list[Tensor], masks: list[Tensor | None], fill: bool = False) -> Tensor | None:
    """The (B, sum of L) mask of token sequences joined along the sequence, a sequence without a mask being all
    real tokens. None when no sequence has a mask (every token is attended to, and attention needs no mask),
    unless ``fill``."""
    if all(m is None for m in masks) and not fill:
        return None
    return torch.cat([m if m is not None else torch.ones(c.shape[:2], dtype=torch.bool, device=c.device)
                      for c, m in zip(contexts, masks)], dim=1)
