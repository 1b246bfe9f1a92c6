"""Conditioners turn batch entries into a :class:`Cond`, applying classifier-free-guidance dropout.

Each embedder declares the batch key it reads (``input_key``), its CFG dropout rate, and what it
produces: a pooled ``vector`` (``vector_dim`` > 0, for the adaLN / time-embedding path) and/or a token
sequence ``context`` with ``mask`` (``context_dim`` > 0, for cross-attention). Its ``forward(values,
drop)`` returns a dict with those keys; a dropped entry gets the embedder's null input (the null class
for labels, the empty caption for text).

Text embedders also take precomputed encodings: when the batch holds ``<name>.context``,
``<name>.mask`` or ``<name>.vector`` for the embedder registered as ``<name>`` (see
``scripts/precompute.py``), those are used and the encoder is not run.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn

from diffusion_train.conditioning.cond import Cond, joint_mask


class ClassEmbedder(nn.Module):
    """Class labels -> learned vectors; index ``num_classes`` is the learned null class."""

    context_dim = 0

    def __init__(self, num_classes: int, dim: int, input_key: str = "label", dropout: float = 0.1):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"ClassEmbedder dropout must be in [0, 1), got {dropout}")
        self.num_classes, self.dim, self.input_key, self.dropout = num_classes, dim, input_key, dropout
        self.vector_dim = dim
        self.embedding = nn.Embedding(num_classes + 1, dim)
        nn.init.normal_(self.embedding.weight, std=0.02)

    def forward(self, labels: Tensor, drop: Tensor | None = None) -> dict[str, Tensor]:
        labels = torch.as_tensor(labels, device=self.embedding.weight.device).long()
        if drop is not None:
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return {"vector": self.embedding(labels)}

    def null_input(self, batch_size: int, device) -> Tensor:
        return torch.full((batch_size,), self.num_classes, dtype=torch.long, device=device)


class Conditioner(nn.Module):
    """Holds named embedders. Their vectors are concatenated into ``Cond.vector`` and their token
    sequences (all of one width) along the sequence into ``Cond.context`` / ``Cond.mask``.

    An empty conditioner gives unconditional models (``Cond()``, ``vector_dim == context_dim == 0``).
    """

    def __init__(self, embedders: Mapping[str, nn.Module] | None = None):
        super().__init__()
        self.embedders = nn.ModuleDict(dict(embedders or {}))
        widths = {name: e.context_dim for name, e in self.embedders.items() if e.context_dim}
        if len(set(widths.values())) > 1:
            raise ValueError(f"conditioning.embedders give token sequences of different widths {widths}; "
                             f"cross-attention needs one width")

    @property
    def vector_dim(self) -> int:
        return sum(e.vector_dim for e in self.embedders.values())

    @property
    def context_dim(self) -> int:
        return max((e.context_dim for e in self.embedders.values()), default=0)

    def forward(self, batch: Mapping[str, Any], generator: torch.Generator | None = None,
                force_drop: bool = False, drop: Tensor | None = None) -> Cond:
        """Embeds ``batch``; while training, each embedder drops entries at its own rate.

        ``force_drop=True`` gives the unconditional ``Cond`` for guidance; ``drop`` (B,) bool drops those samples'
        inputs of every embedder instead of the embedders' own draws (a task's joint scheme, e.g. editing's).
        """
        vectors, contexts, masks = [], [], []
        device = self._device()
        for name, emb in self.embedders.items():
            values = self._precomputed(batch, name) if hasattr(emb, "output_keys") else None
            if values is None and emb.input_key not in batch:
                first = batch.get("__key__", ["?"])[0] if isinstance(batch.get("__key__"), (list, tuple)) else "?"
                raise KeyError(f"conditioning.embedders.{name} needs batch key {emb.input_key!r}, missing in the "
                               f"batch of sample {first!r} (keys: {sorted(batch)})")
            if values is None:
                values = batch[emb.input_key]
            n = len(next(iter(values.values()))) if isinstance(values, dict) else len(values)
            if force_drop:
                dropped = torch.ones(n, dtype=torch.bool, device=device)
            elif drop is not None:
                dropped = drop.to(device)
            elif self.training and emb.dropout > 0:
                u = torch.rand(n, device=device if generator is None else generator.device, generator=generator)
                dropped = (u < emb.dropout).to(device)
            else:
                dropped = None
            out = emb(values.to(device) if isinstance(values, Tensor) else values, dropped)
            if "vector" in out:
                vectors.append(out["vector"])
            if "context" in out:
                contexts.append(out["context"])
                masks.append(out.get("mask"))
        return Cond(vector=torch.cat(vectors, dim=-1) if vectors else None,
                    context=torch.cat(contexts, dim=1) if contexts else None, mask=joint_mask(contexts, masks))

    @contextlib.contextmanager
    def uncounted(self) -> Iterator[None]:
        """Captions encoded inside are not added to the text embedders' ``num_truncated``: a training run counts the
        captions of its training batches (``data/truncated_captions``), not those of validation or sampling."""
        counted = [e for e in self.embedders.values() if hasattr(e, "num_truncated")]
        before = [e.num_truncated for e in counted]
        try:
            yield
        finally:
            for e, n in zip(counted, before):
                e.num_truncated = n

    @staticmethod
    def _precomputed(batch: Mapping[str, Any], name: str) -> dict[str, Any] | None:
        prefix = name + "."
        parts = {k[len(prefix):]: v for k, v in batch.items() if k.startswith(prefix)}
        return parts or None

    def input_pools(self, labels=None, prompts=None, prompts_option: str = "prompts") -> dict[str, list]:
        """Per batch key, the values to sample for: the given labels (else every class) for class
        embedders, the given prompts for text embedders; one-line errors for what does not fit, naming the
        prompts as ``prompts_option`` (the setting that gives them). One prompt given as a string (``prompts="a
        bag"``) is a list of one; labels must be a list (``labels=[3]``), neither list empty."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if labels is not None and (isinstance(labels, (str, bytes)) or not hasattr(labels, "__iter__")):
            raise ValueError(f"labels={labels}: give a list of class indices, e.g. labels=[{labels}]")
        if labels is not None and not len(list(labels)):
            raise ValueError("labels=[]: give at least one class index, or leave labels out for every class")
        pools = {}
        for name, emb in self.embedders.items():
            if hasattr(emb, "num_classes"):
                pool = [int(c) for c in labels] if labels is not None else list(range(emb.num_classes))
                bad = [c for c in pool if not 0 <= c < emb.num_classes]
                if bad:
                    raise ValueError(f"labels {bad} are outside the model's {emb.num_classes} classes")
            else:
                if not prompts:
                    raise ValueError(f"the model is conditioned on text ({emb.input_key!r}): give "
                                     f"{prompts_option}=[...]")
                pool = [str(p) for p in prompts]
            pools[emb.input_key] = pool
        if not pools and (labels is not None or prompts):
            raise ValueError("labels or prompts were given but the model is unconditional")
        classes = [hasattr(emb, "num_classes") for emb in self.embedders.values()]
        if pools and labels is not None and not any(classes):
            raise ValueError("labels were given but the model has no class conditioning (give prompts=[...])")
        if pools and prompts and all(classes):
            raise ValueError("prompts were given but the model is not conditioned on text (give labels=[...])")
        return pools

    def sample_inputs(self, num_images: int, labels=None, prompts=None, repeat: int = 1) -> dict:
        """Conditioning inputs for ``num_images`` images: each pool value (see :meth:`input_pools`) is
        used ``repeat`` times in a row, and the pool is cycled."""
        inputs = {}
        for key, pool in self.input_pools(labels, prompts).items():
            values = [pool[(i // repeat) % len(pool)] for i in range(num_images)]
            inputs[key] = torch.tensor(values) if isinstance(pool[0], int) else values
        return inputs

    def uncond(self, batch_size: int) -> Cond:
        """The all-dropped conditioning (null class, empty caption) for ``batch_size`` samples."""
        device = self._device()
        null = {e.input_key: e.null_input(batch_size, device) for e in self.embedders.values()}
        return self.forward(null, force_drop=True)

    def _device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")


def select_inputs(inputs: dict, indices: list[int]) -> dict:
    """The entries ``indices`` of each conditioning input of :meth:`Conditioner.sample_inputs`."""
    return {k: v[indices] if isinstance(v, Tensor) else [v[i] for i in indices] for k, v in inputs.items()}
