"""Webdataset tar shards: a streaming data module for training at scale.

Sources are shard lists (local paths, brace patterns such as ``data/train-{000000..000099}.tar``, a
directory holding a ``manifest.json`` of ``scripts/make_shards.py``, or ``pipe:`` URLs for object
stores), each with a mixing weight. Each DataLoader worker of each rank streams its own shards,
decodes, filters, shuffles in a buffer and yields whole batches:

* ``resampled=true`` (default): an endless stream; each worker draws shards at random (a source by
  weight, then a shard) with a generator seeded by (seed, rank, worker, resume step), so a resumed run
  continues with fresh data instead of replaying what it saw.
* ``resampled=false``: the shards are split exactly across ranks x workers (shard i goes to global
  worker i mod (ranks x workers)); each epoch every sample is seen exactly once, in an order drawn from
  (seed, epoch, worker). Resume skips the batches each worker had already produced, so it is exact.

Bad input loses nothing but the bad sample: undecodable images, samples without an image, duplicate
keys and truncated or unreadable tars are skipped and counted by reason; the counts travel with the
batches, are logged, and more than ``max_bad_fraction`` of bad samples stops the run with the reason.
A local shard path or pattern that matches nothing fails at start, naming the pattern.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Sequence

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from diffusion_train.data.folder import load_image
from diffusion_train.data.samplers import mix_seed, padded_shard
from diffusion_train.data.tar_io import load_array, tar_samples

log = logging.getLogger(__name__)
IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")


class BadDataError(RuntimeError):
    """Too many samples of the stream could not be used."""


# ----------------------------------------------------------------------------------------------
# shard lists


def expand_shards(spec: str | Sequence[str], split: str = "train") -> list[str]:
    """Shard URLs of ``spec``: a path, a brace pattern, a directory written by ``make_shards.py`` (its
    manifest's ``<split>-*`` shards), a ``pipe:`` command, or a list of these. Local paths must exist."""
    from braceexpand import braceexpand

    from diffusion_train.data.shards import shard_paths

    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    urls: list[str] = []
    for item in map(str, specs):
        if item.startswith("pipe:") or "://" in item:
            urls += list(braceexpand(item))
            continue
        if Path(item).is_dir():
            if not (Path(item) / "manifest.json").is_file():
                raise FileNotFoundError(f"shard directory {item} has no manifest.json; give a pattern like "
                                        f"{item}/train-{{000000..000009}}.tar")
            found = [str(p) for p in shard_paths(item, split)]
            if not found:
                raise FileNotFoundError(f"shard directory {item}: its manifest lists no {split}-*.tar shards")
            urls += found
            continue
        expanded = list(braceexpand(item))
        missing = [u for u in expanded if not Path(u).is_file()]
        if missing:
            raise FileNotFoundError(f"shard pattern {item!r}: {len(missing)} of {len(expanded)} paths do not exist "
                                    f"(first: {missing[0]})")
        urls += expanded
    if not urls:
        raise FileNotFoundError(f"shard spec {spec!r} matches no shards")
    return urls


def rank_worker() -> tuple[int, int, int, int]:
    """(rank, world size, worker, workers) from torch.distributed / the DataLoader worker, else from
    the environment (``RANK``, ``WORLD_SIZE``, ``WORKER``, ``NUM_WORKERS``), else a single process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    info = get_worker_info()
    if info is not None:
        return rank, world, info.id, info.num_workers
    return rank, world, int(os.environ.get("WORKER", 0)), int(os.environ.get("NUM_WORKERS", 1))


# ----------------------------------------------------------------------------------------------
# reading and decoding


class SampleDecoder:
    """Raw sample -> ``{"image": uint8 (C, R, R), "label", "caption", "__key__"}``, or a skip reason.

    The image (first of ``image_keys`` present) is resized on its short side to ``resolution`` and
    cropped to a square (``resize="crop"``: centred, or at a random offset with ``random_crop``), or
    centred on a black square (``resize="pad"``, for small images such as Fashion-MNIST's 28x28 in
    32x32); ``flip`` mirrors it with probability 1/2. ``caption_key`` is ``txt`` or
    ``json:<field>``; ``label_key`` (``cls``) is optional unless ``require_label``. Filters:
    ``min_image_size`` (short side of the original), ``max_caption_length`` (characters) and
    ``max_scores`` (``{"punsafe": 0.5}``: the sample's json field must be <= the bound, when present).
    ``tensors`` maps batch keys to members holding precomputed arrays (``.npy``, or ``.pth`` read with
    ``weights_only``), e.g. ``{latent: latent.npy, caption.context: t5.npy, caption.mask: t5mask.npy}``
    (see ``scripts/precompute.py`` for what the keys mean); with a ``latent`` the image is optional.
    """

    def __init__(self, resolution: int, channels: int = 3, image_keys: Sequence[str] = IMAGE_KEYS,
                 label_key: str | None = "cls", caption_key: str | None = "txt", flip: bool = False,
                 min_image_size: int = 0, max_caption_length: int | None = None,
                 max_scores: dict[str, float] | None = None, resize: str = "crop",
                 tensors: dict[str, str] | None = None, random_crop: bool = False):
        if resize not in ("crop", "pad"):
            raise ValueError(f"data.resize must be crop or pad, got {resize!r}")
        self.resize, self.tensors, self.random_crop = resize, dict(tensors or {}), random_crop
        self.resolution, self.channels, self.image_keys = resolution, channels, tuple(image_keys)
        self.label_key, self.caption_key, self.flip = label_key, caption_key, flip
        self.min_image_size, self.max_caption_length = min_image_size, max_caption_length
        self.max_scores = dict(max_scores or {})

    def __call__(self, sample: dict[str, Any], rng: random.Random) -> dict[str, Any] | str:
        ext = next((k for k in self.image_keys if k in sample), None)
        arrays = {}
        for key, member in self.tensors.items():
            if member not in sample:
                return f"missing_{member}"
            try:
                arrays[key] = load_array(sample[member], member)
            except Exception:  # noqa: BLE001 - an unreadable array makes the sample unusable
                return f"bad_{member}"
        if ext is None and "latent" not in arrays:
            return "missing_image"
        meta = {}
        if "json" in sample:
            try:
                meta = json.loads(sample["json"])
            except ValueError:
                return "bad_json"
        for field, bound in self.max_scores.items():
            if field in meta and meta[field] is not None and float(meta[field]) > bound:
                return f"filtered_{field}"
        caption = None
        if self.caption_key:
            if self.caption_key.startswith("json:"):
                caption = meta.get(self.caption_key[5:])
            elif self.caption_key in sample:
                caption = sample[self.caption_key].decode("utf-8", errors="replace").strip()
            if caption is None:
                return "missing_caption"
            if self.max_caption_length is not None and len(caption) > self.max_caption_length:
                return "filtered_caption_length"
        label = 0
        if self.label_key:
            if self.label_key not in sample:
                return "missing_label"
            try:
                label = int(sample[self.label_key].decode().strip())
            except ValueError:
                return "bad_label"
        out = {"label": label, "__key__": sample["__key__"], **arrays}
        if caption is not None:
            out["caption"] = caption
        if ext is None:  # precomputed latents only
            return out
        try:
            if self.min_image_size:
                with Image.open(io.BytesIO(sample[ext])) as img:
                    if min(img.size) < self.min_image_size:
                        return "filtered_image_size"
            if self.resize == "pad":
                array = self._pad(sample[ext])
            elif self.random_crop:
                array = self._random_crop(sample[ext], rng)
            else:
                array = load_image(io.BytesIO(sample[ext]), self.resolution, self.channels)
        except Exception:  # noqa: BLE001 - any decoder failure makes the sample unusable
            return "undecodable_image"
        if array is None:
            return "image_larger_than_resolution"
        image = torch.from_numpy(np.array(array, copy=True)).permute(2, 0, 1)
        if self.flip and rng.random() < 0.5:
            image = image.flip(-1)
        out["image"] = image
        return out


    def _random_crop(self, data: bytes, rng: random.Random) -> np.ndarray:
        r = self.resolution
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            img.draft(None, (-(-2 * r * w // min(w, h)), -(-2 * r * h // min(w, h))))  # JPEG: decode smaller
            img = ImageOps.exif_transpose(img).convert("RGB" if self.channels == 3 else "L")
            w, h = img.size
            scale = r / min(w, h)
            size = (max(r, round(w * scale)), max(r, round(h * scale)))
            img = img.resize(size, Image.Resampling.LANCZOS)
            left, top = rng.randint(0, size[0] - r), rng.randint(0, size[1] - r)
            array = np.asarray(img.crop((left, top, left + r, top + r)), dtype=np.uint8)
        return array[..., None] if array.ndim == 2 else array

    def _pad(self, data: bytes) -> np.ndarray | None:
        with Image.open(io.BytesIO(data)) as img:
            array = np.asarray(img.convert("RGB" if self.channels == 3 else "L"), dtype=np.uint8)
        array = array[..., None] if array.ndim == 2 else array
        h, w = array.shape[:2]
        if h > self.resolution or w > self.resolution:
            return None
        top, left = (self.resolution - h) // 2, (self.resolution - w) // 2
        out = np.zeros((self.resolution, self.resolution, array.shape[2]), dtype=np.uint8)
        out[top:top + h, left:left + w] = array
        return out


def collate(samples: list[dict], skipped: Counter) -> dict:
    """Stacks samples in their stored dtypes (uint8 images, fp16 latents): a quarter / half of the
    bytes to move between processes and to the device; :func:`finish_batch` makes them float."""
    batch = {"label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
             "__key__": [s["__key__"] for s in samples], "__skipped__": dict(skipped)}
    if all("image" in s for s in samples):
        batch["image"] = torch.stack([s["image"] for s in samples])
    for key in samples[0]:
        if key not in ("image", "label", "caption", "__key__") and isinstance(samples[0][key], Tensor):
            batch[key] = torch.stack([s[key] for s in samples])
    if all("caption" in s for s in samples):
        batch["caption"] = [s["caption"] for s in samples]
    skipped.clear()
    return batch


def finish_batch(batch: dict) -> dict:
    """uint8 images -> float32 in [-1, 1], low-precision arrays -> float32, on whatever device the
    batch is (the data module runs it after the batch reached the training device)."""
    image = batch.get("image")
    if isinstance(image, Tensor) and image.dtype == torch.uint8:
        batch["image"] = image.float().div_(127.5).sub_(1.0)
    for key, value in batch.items():
        if isinstance(value, Tensor) and value.is_floating_point() and value.dtype != torch.float32:
            batch[key] = value.float()
    return batch


class SampleList(Dataset):
    """Decoded samples held in RAM, batched by a list of indices (the fixed validation set)."""

    def __init__(self, samples: list[dict]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, indices: list[int]) -> dict:
        batch = collate([self.samples[i] for i in indices], Counter())
        del batch["__skipped__"]
        return batch


class ShardStream(IterableDataset):
    """Endless stream of batches from shards; see the module docstring for the two modes."""

    def __init__(self, sources: Sequence[tuple[list[str], float]], decoder: SampleDecoder, batch_size: int,
                 seed: int = 0, resampled: bool = True, shuffle_buffer: int = 1000, start_batch: int = 0,
                 rank: int | None = None, world_size: int | None = None):
        self.sources, self.decoder, self.batch_size = list(sources), decoder, int(batch_size)
        self.seed, self.resampled, self.shuffle_buffer = seed, resampled, int(shuffle_buffer)
        self.start_batch, self.rank, self.world_size = int(start_batch), rank, world_size

    def _where(self) -> tuple[int, int, int]:
        """(this reader's index among all ranks x workers, their number, workers per rank).

        A rank's DataLoader takes batch b from worker b mod workers. A resumed loader starts again at
        worker 0, so worker w plays the role of worker (w + start_batch) mod workers of the first run
        and continues its stream: the batch order is the same as without the restart.
        """
        rank, world, worker, workers = rank_worker()
        rank = self.rank if self.rank is not None else rank
        world = self.world_size if self.world_size is not None else world
        role = (worker + self.start_batch) % workers
        return rank * workers + role, world * workers, workers

    def assigned_shards(self) -> list[str]:
        """This worker's shards in the exact (non-resampled) mode."""
        me, total, _ = self._where()
        shards = [u for urls, _ in self.sources for u in urls]
        if len(shards) < total:
            raise ValueError(f"{len(shards)} shards cannot be split exactly over {total} readers (ranks x "
                             f"workers); write more, smaller shards (make_shards.py max_count=...), use fewer "
                             f"data.num_workers, or data.resampled=true")
        return shards[me::total]

    def _shard_order(self, rng: random.Random) -> Iterator[tuple[str, int]]:
        if self.resampled:
            weights = [w for _, w in self.sources]
            while True:
                urls, _ = rng.choices(self.sources, weights=weights)[0]
                yield rng.choice(urls), 0
        else:
            mine, epoch = self.assigned_shards(), 0
            while True:
                order = list(mine)
                random.Random(mix_seed(self.seed, epoch, self._where()[0])).shuffle(order)
                for url in order:
                    yield url, epoch
                epoch += 1

    def _samples(self, rng: random.Random, skipped: Counter) -> Iterator[dict]:
        """Decoded samples through the shuffle buffer; in exact mode each pass is emptied from the
        buffer before the next begins, so every pass emits each sample exactly once."""
        buffer: list[dict] = []
        seen: set[str] = set()
        current_epoch = 0
        for url, epoch in self._shard_order(rng):
            if epoch != current_epoch:
                while buffer:
                    yield buffer.pop(rng.randrange(len(buffer)))
                seen.clear()
                current_epoch = epoch
            for raw in tar_samples(url, skipped):
                if not self.resampled:
                    if raw["__key__"] in seen:
                        skipped["duplicate_key"] += 1
                        continue
                    seen.add(raw["__key__"])
                sample = self.decoder(raw, rng)
                if isinstance(sample, str):
                    skipped[sample] += 1
                    continue
                buffer.append(sample)
                if len(buffer) >= self.shuffle_buffer:
                    yield buffer.pop(rng.randrange(len(buffer)))

    def __iter__(self) -> Iterator[dict]:
        me, _, workers = self._where()
        # Exact mode: this reader's role made `done` of the rank's first start_batch batches already.
        done = 0 if self.resampled else len(range(me % workers, self.start_batch, workers))
        stream_seed = mix_seed(self.seed, me, self.start_batch) if self.resampled else mix_seed(self.seed, me)
        rng = random.Random(stream_seed)
        skipped: Counter = Counter()
        batch: list[dict] = []
        for sample in self._samples(rng, skipped):
            batch.append(sample)
            if len(batch) < self.batch_size:
                continue
            if done > 0:
                done -= 1
                skipped.clear()
            else:
                yield collate(batch, skipped)
            batch = []


# ----------------------------------------------------------------------------------------------
# the data module


class WebDataModule(L.LightningDataModule):
    """Training batches streamed from webdataset shards; validation from a fixed set in RAM.

    Args:
        sources: a shard spec (see :func:`expand_shards`; a directory gives its ``train-*`` shards) or
            a list of ``{shards: spec, weight: w}``.
        val_shards: shard spec of the validation set (a directory gives its ``val-*`` shards); its first
            ``val_size`` samples are decoded once and every rank evaluates the same padded share.
        resampled, shuffle_buffer: see the module docstring.
        max_bad_fraction: stop when more than this fraction of the samples read were unusable
            (checked once ``min_samples_for_bad_check`` samples have been read).
        Decoding and filters: see :class:`SampleDecoder`.
    """

    def __init__(self, sources: Any, resolution: int, channels: int = 3, num_classes: int = 1,
                 batch_size: int = 64, val_shards: Any = None, val_size: int = 1000, val_batch_size: int | None = None,
                 resampled: bool = True, shuffle_buffer: int = 1000, num_workers: int = 2, seed: int = 0,
                 image_keys: Sequence[str] = IMAGE_KEYS, label_key: str | None = "cls",
                 caption_key: str | None = None, flip: bool = False, min_image_size: int = 0,
                 max_caption_length: int | None = None, max_scores: dict[str, float] | None = None,
                 resize: str = "crop", random_crop: bool = False, tensors: dict[str, str] | None = None,
                 max_bad_fraction: float = 0.05, min_samples_for_bad_check: int = 1000):
        super().__init__()
        if isinstance(sources, (str, os.PathLike)) or (isinstance(sources, Sequence) and sources
                                                       and not isinstance(sources[0], dict)):
            sources = [{"shards": sources, "weight": 1.0}]
        self.sources = [(expand_shards(s["shards"]), float(s.get("weight", 1.0))) for s in sources]
        self.val_urls = expand_shards(val_shards, split="val") if val_shards else None
        self.resolution, self.channels, self.num_classes = resolution, channels, num_classes
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.val_size, self.resampled, self.shuffle_buffer = val_size, resampled, shuffle_buffer
        self.num_workers, self.seed = num_workers, seed
        self.decoder = SampleDecoder(resolution, channels, image_keys, label_key, caption_key, flip,
                                     min_image_size, max_caption_length, max_scores, resize, tensors,
                                     random_crop)
        self.max_bad_fraction, self.min_samples_for_bad_check = max_bad_fraction, min_samples_for_bad_check
        self.skip_counts: Counter = Counter()
        self.samples_used = 0
        self.val_set: SampleList | None = None

    def _rank_world(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def train_stream(self, start_batch: int = 0) -> ShardStream:
        rank, world = self._rank_world()
        return ShardStream(self.sources, self.decoder, self.batch_size, self.seed, self.resampled,
                           self.shuffle_buffer, start_batch, rank, world)

    def train_dataloader(self) -> DataLoader:
        start = 0
        if self.trainer is not None:  # resume: see ShardStream
            accumulate = getattr(self.trainer.lightning_module, "accumulate_grad_batches", 1)
            start = self.trainer.global_step * accumulate
        return DataLoader(self.train_stream(start), batch_size=None, num_workers=self.num_workers,
                          pin_memory=torch.cuda.is_available(), persistent_workers=self.num_workers > 0)

    def setup(self, stage: str | None = None) -> None:
        if self.val_set is not None or not self.val_urls:
            return
        skipped: Counter = Counter()
        rng = random.Random(self.seed)
        samples: list[dict] = []
        for url in self.val_urls:
            for raw in tar_samples(url, skipped):
                sample = self.decoder(raw, rng)
                if isinstance(sample, str):
                    skipped[sample] += 1
                    continue
                samples.append(sample)
                if len(samples) == self.val_size:
                    break
            if len(samples) == self.val_size:
                break
        if not samples:
            raise ValueError(f"validation shards {self.val_urls[0]}...: no usable sample ({dict(skipped)})")
        self.val_set = SampleList(samples)

    def val_dataloader(self) -> DataLoader | list:
        self.setup()
        if self.val_set is None:
            return []
        rank, world = self._rank_world()
        return DataLoader(self.val_set, sampler=padded_shard(len(self.val_set), self.val_batch_size, rank, world),
                          batch_size=None, num_workers=0)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        return finish_batch(batch)

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        counts = batch.pop("__skipped__", None)
        if counts is not None:
            self.skip_counts.update(counts)
            self.samples_used += len(batch["__key__"])
            bad = sum(self.skip_counts.values())
            seen = bad + self.samples_used
            if seen >= self.min_samples_for_bad_check and bad > self.max_bad_fraction * seen:
                raise BadDataError(f"{bad} of {seen} samples read were unusable ({dict(self.skip_counts)}), more than "
                                   f"data.max_bad_fraction={self.max_bad_fraction}; check the shards "
                                   f"(scripts/inspect_shards.py) or raise the bound")
        return batch
