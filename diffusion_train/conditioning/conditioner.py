"""Conditioners turn batch entries into a :class:`Cond`, applying classifier-free-guidance dropout.

Each embedder declares the batch key it reads (``input_key``), what it produces (``output``:
``vector`` for the adaLN / time-embedding path, ``context`` for cross-attention) and its CFG
dropout rate. A dropped entry is replaced by the embedder's null input (the null class for labels).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from diffusion_train.conditioning.cond import Cond


class ClassEmbedder(nn.Module):
    """Class labels -> learned vectors; index ``num_classes`` is the learned null class."""

    output = "vector"

    def __init__(self, num_classes: int, dim: int, input_key: str = "label", dropout: float = 0.1):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"ClassEmbedder dropout must be in [0, 1), got {dropout}")
        self.num_classes, self.dim, self.input_key, self.dropout = num_classes, dim, input_key, dropout
        self.embedding = nn.Embedding(num_classes + 1, dim)
        nn.init.normal_(self.embedding.weight, std=0.02)

    def forward(self, labels: Tensor, drop: Tensor | None = None) -> Tensor:
        labels = labels.long()
        if drop is not None:
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding(labels)

    def null_input(self, batch_size: int, device) -> Tensor:
        return torch.full((batch_size,), self.num_classes, dtype=torch.long, device=device)


class Conditioner(nn.Module):
    """Holds named embedders; their vectors are concatenated into ``Cond.vector``.

    An empty conditioner gives unconditional models (``Cond()``, ``vector_dim == 0``).
    """

    def __init__(self, embedders: Mapping[str, nn.Module] | None = None):
        super().__init__()
        self.embedders = nn.ModuleDict(dict(embedders or {}))
        for name, emb in self.embedders.items():
            if emb.output != "vector":
                raise ValueError(f"conditioning.embedders.{name}: output {emb.output!r} is not supported yet")

    @property
    def vector_dim(self) -> int:
        return sum(e.dim for e in self.embedders.values() if e.output == "vector")

    def forward(self, batch: Mapping[str, Any], generator: torch.Generator | None = None,
                force_drop: bool = False) -> Cond:
        """Embeds ``batch``; while training, each embedder drops entries at its own rate.

        ``force_drop=True`` gives the unconditional ``Cond`` for guidance.
        """
        vectors = []
        for name, emb in self.embedders.items():
            if emb.input_key not in batch:
                raise KeyError(f"conditioning.embedders.{name} needs batch key {emb.input_key!r}; "
                               f"batch has {sorted(batch)}")
            value = batch[emb.input_key]
            n = len(value)
            device = self._device()
            if force_drop:
                drop = torch.ones(n, dtype=torch.bool, device=device)
            elif self.training and emb.dropout > 0:
                u = torch.rand(n, device=device if generator is None else generator.device, generator=generator)
                drop = (u < emb.dropout).to(device)
            else:
                drop = None
            vectors.append(emb(value.to(device), drop))
        return Cond(vector=torch.cat(vectors, dim=-1) if vectors else None)

    def uncond(self, batch_size: int) -> Cond:
        """The all-dropped conditioning (null class, empty caption) for ``batch_size`` samples."""
        device = self._device()
        null = {e.input_key: e.null_input(batch_size, device) for e in self.embedders.values()}
        return self.forward(null, force_drop=True)

    def _device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")
