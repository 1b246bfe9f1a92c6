"""Writing a precomputed set (``scripts/precompute.py``): the frozen autoencoder's moments and the text
encodings of a dataset, encoded once; the format and its reading are in :mod:`diffusion_train.data.precomputed`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor
from torch.utils.data import Dataset

from diffusion_train.conditioning.weights import resolve_dtype
from diffusion_train.data.precomputed import (FORMAT, MANIFEST, check_task, expected_provenance, task_image_keys,
                                              text_embedders)


def _index_batches(n: int, batch_size: int) -> Iterable[list[int]]:
    for start in range(0, n, batch_size):
        yield list(range(start, min(start + batch_size, n)))


@torch.no_grad()
def precompute_split(dataset: Dataset, autoencoder, conditioner, batch_size: int = 256,
                     dtype: torch.dtype = torch.float16, device: str | torch.device = "cpu",
                     progress: bool = False, limit: int | None = None,
                     image_keys: Iterable[str] = ()) -> tuple[dict[str, Tensor], dict, list[str]]:
    """Encodes the items of ``dataset`` (indexed by lists, e.g. :class:`ImageBatches`) in order, the
    first ``limit`` of them if given, with the autoencoder and text embedders already on ``device``; the
    images under ``image_keys`` too (the task's, e.g. an editing source), as ``<key>_latent``.

    Returns the tensors of ``<split>.safetensors``, the distinct captions per caption key and the source keys.
    """
    image_keys = list(image_keys)
    latents, labels, captions, source_keys = [], [], {}, []
    extra: dict[str, list[Tensor]] = {key: [] for key in image_keys}
    batches = _index_batches(len(dataset) if limit is None else min(int(limit), len(dataset)), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(list(batches), desc="encoding images", unit="batch")
    for idx in batches:
        batch = dataset[idx]
        latents.append(autoencoder.encode_moments(batch["image"].to(device)).to(dtype).cpu())
        labels.append(batch["label"].long())
        source_keys.extend(batch.get("__key__", ()))
        for key in image_keys:
            if key not in batch:
                raise KeyError(f"the task encodes batch key {key!r}, which the dataset does not provide (it has "
                               f"{sorted(batch)})")
            extra[key].append(autoencoder.encode_moments(batch[key].to(device)).to(dtype).cpu())
        for key, value in batch.items():
            if isinstance(value, list) and value and isinstance(value[0], str) and key != "__key__":
                captions.setdefault(key, []).extend(value)
    tensors = {"latent": torch.cat(latents), "label": torch.cat(labels),
               **{f"{key}_latent": torch.cat(parts) for key, parts in extra.items()}}
    distinct: dict[str, list[str]] = {}
    for key, texts in captions.items():
        table = {}
        tensors[f"{key}.index"] = torch.tensor([table.setdefault(t, len(table)) for t in texts], dtype=torch.long)
        distinct[key] = list(table)
    for name, emb in text_embedders(conditioner).items():
        if emb.input_key not in distinct:
            raise KeyError(f"conditioning.embedders.{name} reads batch key {emb.input_key!r}, which the dataset "
                           f"does not provide (it has {sorted(distinct) or 'no captions'})")
        parts: dict[str, list[Tensor]] = {}
        for idx in _index_batches(len(distinct[emb.input_key]), batch_size):
            for k, v in emb.encode([distinct[emb.input_key][i] for i in idx]).items():
                parts.setdefault(k, []).append(v.cpu() if k == "mask" else v.to(dtype).cpu())
        tensors.update({f"{name}.{k}": torch.cat(v) for k, v in parts.items()})
    return tensors, distinct, source_keys if len(source_keys) == len(tensors["label"]) else []


def write_precomputed(out_dir: str | os.PathLike, datamodule, autoencoder, conditioner,
                      splits: Iterable[str] = ("train", "val"), batch_size: int = 256, dtype: str = "float16",
                      device: str | torch.device = "cpu", progress: bool = False, limit: int | None = None,
                      task=None) -> dict:
    """Encodes the splits of ``datamodule`` (the first ``limit`` items of each, if given; an empty split is
    written empty) into ``out_dir``, with the images ``task`` encodes, and writes its manifest (last,
    atomically: a directory without a manifest is not a precomputed set). The files are written into a staging
    folder in ``out_dir`` and moved in once every split is encoded: a bad setting or a failure on the way leaves
    a set already there as it was."""
    from diffusion_train.files import atomic_save_file

    trainable = [name for name, e in text_embedders(conditioner).items() if e.trainable]
    if trainable:
        raise ValueError(f"conditioning.embedders {trainable} are trainable: their encodings change during "
                         f"training and cannot be precomputed")
    check_task(task, "precompute")
    if getattr(datamodule, "not_precomputable", None):
        raise ValueError(f"data: {type(datamodule).__name__} cannot be precomputed: {datamodule.not_precomputable}")
    image_keys = task_image_keys(task)

    torch_dtype = resolve_dtype(dtype)
    datamodule.setup()
    if not hasattr(datamodule, "train_set"):
        raise ValueError(f"data: {type(datamodule).__name__} streams its data; scripts/precompute.py encodes the "
                         f"in-memory datasets (image folders, Fashion-MNIST, ...), see docs/latent.md")
    sets = {"train": datamodule.train_set, "val": datamodule.val_set}
    splits = list(splits)
    unknown = [s for s in splits if s not in sets]
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; valid: {sorted(sets)}")
    out = Path(out_dir)
    staging = out / f".staging-{os.getpid()}"
    staging.mkdir(parents=True, exist_ok=True)
    was_training = conditioner.training
    conditioner.eval()
    manifest = {"format": FORMAT, "dtype": str(torch_dtype).removeprefix("torch."),
                "data": {"target": f"{type(datamodule).__module__}.{type(datamodule).__name__}",
                         "channels": datamodule.channels, "resolution": datamodule.resolution,
                         "num_classes": datamodule.num_classes},
                **expected_provenance(autoencoder, conditioner), "image_keys": image_keys, "splits": {}}
    try:
        for split in splits:
            if sets[split] is None or not len(sets[split]) or limit == 0:
                tensors, distinct, source_keys = _empty_split(datamodule, autoencoder, image_keys, torch_dtype,
                                                              device)
            else:
                tensors, distinct, source_keys = precompute_split(sets[split], autoencoder, conditioner, batch_size,
                                                                  torch_dtype, device, progress, limit, image_keys)
            bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(v.isfinite().all())]
            if bad:  # e.g. values beyond float16's range
                raise ValueError(f"precompute: the {split} split's {bad} hold non-finite values as "
                                 f"{manifest['dtype']}; use dtype=float32, or check the encoders")
            atomic_save_file({k: v.contiguous() for k, v in tensors.items()}, staging / f"{split}.safetensors")
            for name, value in (("captions", distinct), ("keys", source_keys)):
                (staging / f"{split}.{name}.json").write_text(json.dumps(value))
            manifest["splits"][split] = {"count": int(tensors["latent"].shape[0]),
                                         "latent_shape": list(tensors["latent"].shape[1:]),
                                         "distinct_captions": {k: len(v) for k, v in distinct.items()}}
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        conditioner.train(was_training)
    manifest["truncated_captions"] = {name: int(e.num_truncated) for name, e in text_embedders(conditioner).items()}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
    (out / MANIFEST).unlink(missing_ok=True)  # the old set is invalid from here until the new manifest is in
    for file in sorted(staging.iterdir(), key=lambda p: p.name == MANIFEST):  # the manifest last
        os.replace(file, out / file.name)
    staging.rmdir()
    return manifest


def _empty_split(datamodule, autoencoder, image_keys: list[str], dtype: torch.dtype,
                 device) -> tuple[dict[str, Tensor], dict, list]:
    """The tensors of a split without items (``val_size=0``): no rows, the latents' shape kept."""
    image = torch.zeros(1, datamodule.channels, datamodule.resolution, datamodule.resolution, device=device)
    none = torch.zeros(0, *autoencoder.encode_moments(image).shape[1:], dtype=dtype)
    return {"latent": none, "label": torch.zeros(0, dtype=torch.long),
            **{f"{key}_latent": none.clone() for key in image_keys}}, {}, []
