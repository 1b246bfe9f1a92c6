"""OpenCLIP text towers as text embedders (Stable Diffusion 1.x/2.x/XL style conditioning)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from diffusion_train.conditioning.text import TextEmbedder, host_side, to_device
from diffusion_train.conditioning.weights import LOAD_ERRORS, looks_like_path, one_line, sha256_files

__all__ = ["CLIPTextEmbedder", "load_open_clip", "register_open_clip_config"]


def register_open_clip_config(model_name: str, model_cfg: Mapping[str, Any]) -> None:
    """Makes ``model_name`` an open_clip architecture with ``model_cfg`` (``embed_dim``,
    ``vision_cfg``, ``text_cfg``), through open_clip's public ``add_model_config``."""
    import open_clip

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{model_name}.json"
        path.write_text(json.dumps(dict(model_cfg)))
        open_clip.add_model_config(path)


def load_open_clip(model_name: str, pretrained: str | os.PathLike | None, model_cfg: Mapping[str, Any] | None = None,
                   create_kwargs: Mapping[str, Any] | None = None, who: str = "open_clip"
                   ) -> tuple[nn.Module, Any, dict[str, Any]]:
    """(model, tokenizer, provenance) of an open_clip model: ``pretrained`` is a tag (needs the weights
    in the local cache when offline), a local checkpoint file, or None (random init; ``model_cfg``
    registers a custom architecture as ``model_name`` first). Errors are one line naming what to set.
    Provenance: ``name``, ``path``, ``sha256`` (of a local file), ``pretrained`` (whether weights were
    loaded)."""
    import open_clip

    if model_cfg is not None:
        register_open_clip_config(model_name, model_cfg)
    pretrained = None if pretrained in (None, "") else str(pretrained)
    is_file = pretrained is not None and Path(pretrained).expanduser().is_file()
    if is_file:
        pretrained = str(Path(pretrained).expanduser().resolve())
    elif pretrained is not None and looks_like_path(pretrained):
        raise FileNotFoundError(f"{who}: pretrained checkpoint {pretrained!r} does not exist; set "
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
        tokenizer = open_clip.get_tokenizer(model_name)
    except LOAD_ERRORS as e:
        if pretrained is None:
            raise ValueError(f"{who}: could not build open_clip model {model_name!r} ({type(e).__name__}: "
                             f"{one_line(e)}); check model_name / model_cfg") from e
        raise ValueError(f"{who}: could not load open_clip model {model_name!r} with pretrained={pretrained!r} "
                         f"({type(e).__name__}: {one_line(e)}); weights are not available offline - set "
                         f"pretrained=/path/to/open_clip_model.safetensors (a local file) and model_name "
                         f"to its architecture") from e
    if is_file:
        prov = {"name": model_name, "path": pretrained, "sha256": sha256_files([pretrained])}
    else:
        prov = {"name": f"{model_name}@{pretrained}" if pretrained else model_name, "path": "", "sha256": ""}
    return model, tokenizer, {**prov, "pretrained": pretrained is not None}


class CLIPTextEmbedder(TextEmbedder):
    """The text tower of an open_clip model.

    Args:
        model_name: open_clip architecture, e.g. ``"ViT-L-14"`` (see ``open_clip.list_models()``).
        pretrained: a tag (``"openai"``, ``"laion2b_s32b_b82k"``; needs the weights in the local
            cache when offline), a local checkpoint file (``.safetensors`` / ``.pt`` / ``.bin``), or
            ``None`` for random init.
        layer: token features from the ``"last"`` block or the ``"penultimate"`` one (SD 2.x style),
            or a block index; ``ln_final`` is applied either way.
        model_cfg: an open_clip architecture config (``embed_dim``, ``vision_cfg``, ``text_cfg``)
            registered as ``model_name`` before the model is built: tiny towers for tests and offline
            presets. With ``pretrained=None`` the weights are random and kept in checkpoints.
        create_kwargs: extra ``open_clip.create_model`` arguments (e.g. ``force_quick_gelu``).
            For a tag trained with QuickGELU (``"openai"``) it is set automatically; for a local
            file of OpenAI weights use ``model_name="ViT-L-14-quickgelu"`` (or
            ``create_kwargs={"force_quick_gelu": True}``).
        attend_padding: see :class:`~diffusion_train.conditioning.text.TextEmbedder`; ``True`` as Stable
            Diffusion, whose U-Nets attend to all 77 tokens.
        pad_token_id: the token after each caption's EOT, up to ``max_length``; ``None``: the tokenizer's
            (0 for open_clip's). With ``attend_padding`` the backbone sees these tokens' features, so
            fine-tuning needs the id the weights were trained with: 49407 (EOT itself) for Stable Diffusion
            1.x, whose Hugging Face tokenizer pads with it, 0 for 2.x.

    context = per-token features (width = text width), mask = tokens up to and including EOT (none with
    ``attend_padding``);
    vector = ``encode_text`` (projected EOT feature, width = embed dim, not normalized).
    """

    def __init__(self, model_name: str = "ViT-L-14", pretrained: str | os.PathLike | None = "openai",
                 layer: str | int = "last", input_key: str = "caption", dropout: float = 0.1, max_length: int = 77,
                 output: str = "both", trainable: bool = False, dtype: str | torch.dtype = "float32",
                 create_kwargs: Mapping[str, Any] | None = None, cache_size: int = 0,
                 model_cfg: Mapping[str, Any] | None = None, attend_padding: bool = False,
                 pad_token_id: int | None = None):
        super().__init__(input_key, dropout, max_length, output, trainable, dtype, cache_size, attend_padding)
        cls = type(self).__name__
        model, self.tokenizer, prov = load_open_clip(model_name, pretrained, model_cfg, create_kwargs, cls)
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
        embedding = getattr(tower, "token_embedding", None)
        vocab = embedding.num_embeddings if isinstance(embedding, nn.Embedding) else None
        if pad_token_id is not None and not 0 <= int(pad_token_id) < (vocab or float("inf")):
            raise ValueError(f"{cls}: pad_token_id={pad_token_id} is not a token of {model_name!r} "
                             f"(vocabulary of {vocab})")
        self.pad_token_id = None if pad_token_id is None else int(pad_token_id)
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
        self._finish_init(transformer.width, embed_dim, {k: prov[k] for k in ("name", "path", "sha256")},
                          pretrained=prov["pretrained"])

    def _unreached_parameters(self) -> list[nn.Parameter]:
        """The contrastive temperature and bias, and with ``output=context`` (no pooled vector) the projection and
        the blocks after ``layer``."""
        out = [p for name in ("logit_scale", "logit_bias") if isinstance(p := getattr(self.encoder, name, None),
                                                                         nn.Parameter)]
        if self.output == "context":
            transformer, _ = self._text_parts()
            tower = getattr(self.encoder, "text", self.encoder)
            for block in transformer.resblocks[self.layer_index + 1:]:
                out += list(block.parameters())
            proj = tower.text_projection
            out += list(proj.parameters()) if isinstance(proj, nn.Module) else [proj] if proj is not None else []
        return out

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
        own_pad = getattr(getattr(tok, "tokenizer", None), "pad_token_id", None) or 0
        eot = getattr(tok, "eot_token_id", None)
        if eot is not None:
            is_eot = ids == eot
            last = torch.where(is_eot.any(1), is_eot.int().argmax(1), torch.full_like(ids[:, 0], ids.shape[1] - 1))
            mask = torch.arange(ids.shape[1]).unsqueeze(0) <= last.unsqueeze(1)
        else:
            mask = ids != own_pad
        full = mask[:, -1].nonzero().flatten().tolist()  # only rows filling max_length may be truncated
        counts = {i: self._token_count(texts[i]) for i in full}
        self._count_truncated([texts[i] for i, n in counts.items() if n is not None and n > self.max_length])
        pad = own_pad
        if self.pad_token_id is not None:
            pad = self.pad_token_id
            ids = ids.masked_fill(~mask, pad)
        if ids.shape[1] < self.model_context_length:  # positional embeddings / causal mask are fixed size
            ids = torch.nn.functional.pad(ids, (0, self.model_context_length - ids.shape[1]), value=pad)
        return ids, mask

    def _encode(self, texts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        with host_side():
            ids, mask = self._tokenize(texts)
        device = self._device()
        ids, mask = to_device(ids, device), to_device(mask, device)
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
