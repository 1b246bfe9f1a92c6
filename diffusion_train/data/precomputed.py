"""Precomputed autoencoder latents and text encodings, so training skips the frozen encoders.

A precomputed set is a directory::

    manifest.json             format, source data (channels, resolution, classes), provenance of the
                              autoencoder and of each text embedder, dtype, per-split counts
    <split>.safetensors       latent (N, 2C, h, w): the autoencoder's moments (KL VAEs: mean and
                              log-variance; pixel space: the image), label (N,), <key>_latent (N, 2C, h, w)
                              the moments of the task's other images (an editing source),
                              <key>.index (N,) into the distinct captions of batch key <key>, and per
                              text embedder <name>: <name>.context (U, L, D), <name>.mask (U, L),
                              <name>.vector (U, D) as its ``output`` selects
    <split>.captions.json     {<key>: [distinct captions]}
    <split>.keys.json         [the source dataset's ``__key__`` of each item] (empty: it gave none), which a
                              batch's ``__key__`` gives

Captions are stored once per distinct string (templated captions cost nothing). The posterior is
sampled and scaled at training time from the stored moments, with the step's seeded generator, so
training on a precomputed set computes the same loss as encoding online (exactly, with
``dtype=float32``). A set whose provenance (weights hash, architecture, encoder settings) differs
from the configured autoencoder or encoders is refused.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from diffusion_train.data.base import InMemoryDataModule

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
FORMAT = "diffusion_train.precomputed/1"
_EMBEDDER_SETTINGS = ("input_key", "max_length", "output", "layer", "pad_token_id", "tokenizer_name", "dtype")
_RECORDED_LATER = {"pad_token_id", "tokenizer_name", "dtype"}  # a set made before records none: not compared


class PrecomputedMismatchError(ValueError):
    """The precomputed set was made with another autoencoder or text encoder than the config's."""


# ----------------------------------------------------------------------------------------------
# provenance


def text_embedders(conditioner) -> dict[str, Any]:
    return {name: emb for name, emb in conditioner.embedders.items() if hasattr(emb, "output_keys")}


def embedder_provenance(emb) -> dict[str, str]:
    """What makes a text embedder's encodings what they are: its weights and its settings."""
    prov = {k: str(v) for k, v in emb.provenance.items()}
    prov.update({k: str(getattr(emb, k)) for k in _EMBEDDER_SETTINGS if hasattr(emb, k)})
    return prov


def expected_provenance(autoencoder, conditioner) -> dict[str, Any]:
    return {"autoencoder": {k: str(v) for k, v in autoencoder.provenance.items()},
            "embedders": {name: embedder_provenance(e) for name, e in text_embedders(conditioner).items()}}


_LOCATION = ("path", "name")  # where weights were read from: not compared when both sides know the same sha256


def _diffs(made: dict, now: dict, where: str) -> list[str]:
    same_weights = bool(made.get("sha256")) and made.get("sha256") == now.get("sha256")
    return [f"{where}.{k}: set has {made.get(k, '<absent>')!r}, config gives {now.get(k, '<absent>')!r}"
            for k in sorted(set(made) | set(now))
            if made.get(k) != now.get(k) and not (same_weights and k in _LOCATION)
            and not (k in _RECORDED_LATER and k not in made)]


def check_provenance(manifest: dict, path: str | os.PathLike, autoencoder, conditioner) -> None:
    """Refuses a set made with another autoencoder, or text encodings made by another encoder.

    Text embedders with no stored encodings are fine: they encode the stored captions online.
    """
    now = expected_provenance(autoencoder, conditioner)
    diffs = _diffs(manifest["autoencoder"], now["autoencoder"], "autoencoder")
    for name, prov in manifest.get("embedders", {}).items():
        if name in now["embedders"]:
            diffs += _diffs(prov, now["embedders"][name], f"conditioning.embedders.{name}")
            if getattr(conditioner.embedders[name], "trainable", False):
                diffs.append(f"conditioning.embedders.{name}.trainable=true, but the set's stored encodings would "
                             f"stand in for the encoder and it would get no gradient")
    if diffs:
        raise PrecomputedMismatchError(
            f"precomputed set {path} does not match the config ({'; '.join(diffs)}); precompute it again with "
            f"this config (python scripts/precompute.py out=DIR ...) or configure the encoders it was made with")


def task_image_keys(task) -> list[str]:
    """The batch keys of images a task encodes besides ``image`` (an editing source): stored as ``<key>_latent``."""
    return list(getattr(task, "encoded_keys", ()))


def check_task(task, where: str) -> None:
    """Refuses a task that needs the images themselves in training (inpainting's ``masked_image=encoded``)."""
    if getattr(task, "needs_images", False):
        raise ValueError(f"{where}: task.masked_image=encoded encodes the masked images in each step, so it needs "
                         f"the images; precomputed latents have none (use task.masked_image=zeroed)")


# ----------------------------------------------------------------------------------------------
# reading


def read_manifest(path: str | os.PathLike) -> dict:
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"{path} is not a precomputed set: {manifest} does not exist (make one with "
                                f"python scripts/precompute.py out={path} ...)")
    try:
        data = json.loads(manifest.read_text())
    except ValueError as e:
        raise ValueError(f"{manifest}: not valid JSON ({e})") from None
    if data.get("format") != FORMAT:
        raise ValueError(f"{manifest}: format {data.get('format')!r}, expected {FORMAT!r}")
    return data


def manifest_value(path: str, key: str) -> Any:
    """``data.<key>`` of a precomputed set's manifest (the ``${precomputed:path,key}`` config resolver)."""
    data = read_manifest(path)["data"]
    if key not in data:
        raise KeyError(f"{Path(path) / MANIFEST} has no data.{key}; it has {sorted(data)}")
    return data[key]


def checked_split(tensors: dict[str, Tensor], file: Path, manifest: dict, num_classes: int, split: str,
                  source_keys: list[str] | None, embedder_keys: dict[str, str]) -> tuple[dict[str, Tensor],
                                                                                     list[str] | None]:
    """A split's tensors as read from ``file``, checked: a missing or misshapen one (against the manifest's
    ``latent_shape``), per-item tensors of different lengths or labels outside [0, ``num_classes``) are errors
    naming the file; items with a non-finite value (in their latents, or in the text encoding they use) are
    dropped, counted and logged (one would make its whole batch's loss non-finite)."""
    for key in ("latent", "label"):
        if key not in tensors:
            raise ValueError(f"{file}: no {key!r} tensor (it has {sorted(tensors)}); precompute the set again")
    shape = manifest["splits"][split].get("latent_shape")
    if shape is not None and list(tensors["latent"].shape[1:]) != list(shape):
        raise ValueError(f"{file}: latents of shape {list(tensors['latent'].shape[1:])}, the manifest says {shape}")
    per_item = [k for k in tensors if k in ("latent", "label") or k.endswith((".index", "_latent"))]
    n = tensors["latent"].shape[0]
    uneven = {k: tensors[k].shape[0] for k in per_item if tensors[k].shape[0] != n}
    if uneven:
        raise ValueError(f"{file}: {n} latents but {uneven} rows")
    labels = tensors["label"]
    outside = labels[(labels < 0) | (labels >= num_classes)] if num_classes else labels[:0]
    if outside.numel():
        raise ValueError(f"{file}: labels outside [0, {num_classes}) (e.g. {int(outside[0])})")
    good = torch.ones(n, dtype=torch.bool)
    for k in per_item:
        if tensors[k].is_floating_point():
            good &= tensors[k].flatten(1).isfinite().all(1) if tensors[k].dim() > 1 else tensors[k].isfinite()
    for name, key in embedder_keys.items():  # text encodings: one row per distinct caption, indexed by the item
        for part in ("context", "vector"):
            table = tensors.get(f"{name}.{part}")
            if table is not None and f"{key}.index" in tensors and table.shape[0]:
                good &= table.flatten(1).isfinite().all(1)[tensors[f"{key}.index"]]
    if bool(good.all()):
        return tensors, source_keys
    bad = (~good).nonzero().flatten().tolist()
    names = [source_keys[i] if source_keys else f"{split}/{i}" for i in bad[:3]]
    if len(bad) == n:
        raise ValueError(f"{file}: every item holds non-finite values (e.g. {', '.join(names)})")
    log.warning("precomputed %s: skipped %d of %d items holding non-finite values (e.g. %s)", split, len(bad), n,
                ", ".join(names))
    tensors = {k: v[good] if k in per_item else v for k, v in tensors.items()}
    return tensors, [k for k, ok in zip(source_keys, good.tolist()) if ok] if source_keys else source_keys


class PrecomputedBatches(Dataset):
    """``dataset[list_of_indices]`` -> a batch: latent (moments, float32), label, caption(s), the task's
    ``<key>_latent`` moments, the stored text encodings under ``<name>.context`` / ``.mask`` / ``.vector``,
    and ``__key__``: the source item's (``source_keys``), else ``<split>/<index>`` in the set."""

    def __init__(self, tensors: dict[str, Tensor], captions: dict[str, list[str]], split: str,
                 embedder_keys: dict[str, str], source_keys: list[str] | None = None):
        self.tensors, self.captions, self.split, self.source_keys = tensors, captions, split, source_keys
        self.embedder_keys = embedder_keys  # text embedder name -> the caption key its encodings index

    def __len__(self) -> int:
        return self.tensors["latent"].shape[0]

    def __getitem__(self, indices: list[int]) -> dict:
        idx = torch.as_tensor(indices, dtype=torch.long)
        t = self.tensors
        batch: dict[str, Any] = {"latent": t["latent"][idx].float(), "label": t["label"][idx],
                                 "__key__": [self.source_keys[i] if self.source_keys else f"{self.split}/{i}"
                                             for i in indices]}
        batch.update({k: v[idx].float() for k, v in t.items() if k.endswith("_latent")})
        rows = {key: t[f"{key}.index"][idx] for key in self.captions}
        for key, table in self.captions.items():
            batch[key] = [table[int(r)] for r in rows[key]]
        for name, key in self.embedder_keys.items():
            for part in ("context", "mask", "vector"):
                if f"{name}.{part}" in t:
                    value = t[f"{name}.{part}"][rows[key]]
                    batch[f"{name}.{part}"] = value if part == "mask" else value.float()
        return batch


class PrecomputedDataModule(InMemoryDataModule):
    """Batches from a directory written by ``scripts/precompute.py``, held in RAM.

    ``channels``, ``resolution`` and ``num_classes`` describe the source images (they size the
    backbone through the autoencoder); the config reads them from the manifest. ``val_size`` keeps
    the first items of the val split (all when null). Training checks the
    set's provenance against the configured autoencoder and text encoders before the first step.
    """

    def __init__(self, path: str, channels: int, resolution: int, num_classes: int, batch_size: int = 64,
                 num_workers: int = 0, seed: int = 0, val_batch_size: int | None = None, val_size: int | None = None):
        super().__init__(batch_size, channels, resolution, num_classes, num_workers, seed, val_batch_size)
        self.path, self.val_size = Path(path), val_size
        self.manifest = read_manifest(self.path)
        data = self.manifest["data"]
        given = {"channels": channels, "resolution": resolution, "num_classes": num_classes}
        wrong = [f"{k}={v} (set: {data[k]})" for k, v in given.items() if data.get(k) != v]
        if wrong:
            raise ValueError(f"data.{', data.'.join(wrong)} do not match precomputed set {self.path}")
        missing = [s for s in ("train", "val") if s not in self.manifest["splits"]]
        if missing:
            raise ValueError(f"precomputed set {self.path} lacks the {missing} split(s); precompute them too")

    def check_provenance(self, autoencoder, conditioner, task=None) -> None:
        """Refuses a set made with other encoders, or one that lacks what ``task`` needs."""
        check_provenance(self.manifest, self.path, autoencoder, conditioner)
        check_task(task, f"precomputed set {self.path}")
        missing = [k for k in task_image_keys(task) if k not in self.manifest.get("image_keys", [])]
        if missing:
            raise PrecomputedMismatchError(
                f"precomputed set {self.path} has no latents of the task's {missing} images; precompute it again "
                f"with this config's task (python scripts/precompute.py out=DIR task=...)")

    def make_sets(self) -> tuple[PrecomputedBatches, PrecomputedBatches]:
        from safetensors.torch import load_file

        sets = []
        keys = {name: prov["input_key"] for name, prov in self.manifest.get("embedders", {}).items()}
        for split in ("train", "val"):
            file = self.path / f"{split}.safetensors"
            try:
                tensors = load_file(str(file))
            except Exception as e:  # safetensors' own error names no file
                raise ValueError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from None
            captions = json.loads((self.path / f"{split}.captions.json").read_text())
            keys_file = self.path / f"{split}.keys.json"  # sets written before it existed have none
            source_keys = json.loads(keys_file.read_text()) if keys_file.is_file() else None
            if source_keys and "latent" in tensors and len(source_keys) < tensors["latent"].shape[0]:
                raise ValueError(f"{keys_file}: {len(source_keys)} keys for {tensors['latent'].shape[0]} items")
            tensors, source_keys = checked_split(tensors, file, self.manifest, self.num_classes, split, source_keys,
                                                 keys)
            if split == "val" and self.val_size is not None:  # validate on the first val_size items
                per_item = {k for k in tensors if k in ("latent", "label") or k.endswith((".index", "_latent"))}
                tensors = {k: v[: self.val_size] if k in per_item else v for k, v in tensors.items()}
            dataset = PrecomputedBatches(tensors, captions, split, keys, source_keys)
            sets.append(dataset)
            log.info("precomputed %s: %d items from %s", split, len(dataset), self.path)
        return sets[0], sets[1]
