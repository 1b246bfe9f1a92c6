"""Webdataset tar shards: a streaming data module for training at scale.

Sources are shard lists (local paths, brace patterns such as ``data/train-{000000..000099}.tar``, a
directory holding a ``manifest.json`` of ``scripts/make_shards.py``, or ``pipe:`` URLs for object
stores), each with a mixing weight. Each DataLoader worker of each rank streams its own shards,
shuffles the raw samples in a buffer, decodes and filters them, and yields whole batches:

* ``resampled=true`` (default): an endless stream; each worker draws shards at random (a source by
  weight, then a shard) with a generator seeded by (seed, rank, worker, resume step), so a resumed run
  continues with fresh data instead of replaying what it saw.
* ``resampled=false``: the shards are split exactly across ranks x workers (shard i goes to global
  worker i mod (ranks x workers)); each pass every sample is seen exactly once, in an order drawn from
  (seed, pass, worker). Each reader's position is saved in the checkpoint; a resumed reader skips
  the samples it had used without decoding them, so resume is exact and cheap.

With ``buckets`` each image is fitted to the (height, width) bucket closest to its aspect ratio, and
each batch holds one bucket (aspect-ratio bucketing).

Bad input loses nothing but the bad sample: undecodable images, samples without an image, bad labels
or json, duplicate keys and truncated, corrupt, empty or unreadable tars are skipped and counted by
reason, and the first few of each reason are logged with their shard and key; the counts travel with
the batches, are logged, and more than ``max_bad_fraction`` of bad samples (filtered ones not counted)
stops the run with the reason, as does a reader that has no usable sample at all (see :class:`Skips`).
A local shard path or pattern that matches nothing fails at start, naming the pattern.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Sequence

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from diffusion_train.data.bad_data import DRY_SAMPLES, BadDataError, Skips, is_filtered
from diffusion_train.data.decode import IMAGE_KEYS, SampleDecoder, aspect_buckets
from diffusion_train.data.samplers import FixedBatches, fixed_batches, ignore_preemption_signals, mix_seed
from diffusion_train.data.tar_io import tar_samples

log = logging.getLogger(__name__)


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
# batching


SMALL_BYTES = 1 << 16


def _stack(tensors: list[Tensor]) -> Tensor | np.ndarray:
    """torch.stack, made to leave a DataLoader worker cheaply: a large result is stacked straight into
    shared memory (as ``default_collate`` does), a small one (labels, metadata) becomes a numpy array,
    which is pickled through the worker's pipe instead of costing a shared-memory segment and a file
    descriptor hand-over; :meth:`WebDataModule.on_before_batch_transfer` makes it a tensor again."""
    first = tensors[0]
    channels_last = first.dim() == 3 and first.stride(0) == 1 and first.shape[0] > 1  # images as decoded
    if channels_last:  # stack (H, W, C) memory, return (B, C, H, W) in channels-last memory: a plain copy
        tensors = [t.permute(1, 2, 0) for t in tensors]
        first = tensors[0]
    in_worker, small = get_worker_info() is not None, len(tensors) * first.nbytes < SMALL_BYTES
    if in_worker and not small:
        storage = first.untyped_storage()._new_shared(len(tensors) * first.nbytes)
        out = torch.stack(tensors, out=first.new_empty(0).set_(storage).view(len(tensors), *first.shape))
    else:
        out = torch.stack(tensors)
    out = out.permute(0, 3, 1, 2) if channels_last else out
    return out.numpy() if in_worker and small else out


def collate(samples: list[dict], skipped: Counter) -> dict:
    """Stacks samples in their stored dtypes (uint8 images, fp16 latents): a quarter / half of the
    bytes to move between processes and to the device; :func:`finish_batch` makes them float."""
    labels = np.array([s["label"] for s in samples], dtype=np.int64)
    batch = {"label": labels if get_worker_info() is not None else torch.from_numpy(labels),  # see _stack
             "__key__": [s["__key__"] for s in samples], "__skipped__": dict(skipped)}
    if all("image" in s for s in samples):
        batch["image"] = _stack([s["image"] for s in samples])
    for key in samples[0]:
        if key not in ("image", "label", "caption", "__key__") and isinstance(samples[0][key], Tensor):
            batch[key] = _stack([s[key] for s in samples])
    if all("caption" in s for s in samples):
        batch["caption"] = [s["caption"] for s in samples]
    skipped.clear()
    return batch


def unchanged(batch: dict) -> dict:
    """The DataLoader's collate_fn: batches are whole already, and small numpy arrays stay numpy
    until they have left the worker (see :func:`_stack`)."""
    return batch


def finish_batch(batch: dict) -> dict:
    """uint8 images -> float32 in [-1, 1], low-precision arrays -> float32, on whatever device the
    batch is (the data module runs it after the batch reached the training device)."""
    image = batch.get("image")
    if isinstance(image, Tensor) and image.dtype == torch.uint8:
        batch["image"] = image.float().div_(127.5).sub_(1.0).contiguous()
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
    """Endless stream of batches from shards; see the module docstring for the two modes.

    Pipeline per reader: shards -> raw samples (duplicate keys dropped) -> shuffle buffer -> decode
    -> one group per tensor shape (aspect-ratio buckets) -> a batch when a group is full. Decoding
    comes after the shuffle, and the random crop and flip of the i-th sample of a pass draw from a
    generator seeded by (stream, pass, i); so a resumed exact-mode reader skips the samples it had
    used by reading their bytes without decoding them (``positions``, saved in the checkpoint by
    :class:`WebDataModule`), then refetches the few samples that were waiting in partly filled groups.
    Each batch carries ``__position__``: ``{reader, pass, emitted, pending}``, where ``pending`` holds
    ``[url, key, pass, index]`` of every sample waiting in a group after the batch was taken.
    """

    def __init__(self, sources: Sequence[tuple[list[str], float]], decoder: SampleDecoder, batch_size: int,
                 seed: int = 0, resampled: bool = True, shuffle_buffer: int = 1000, start_batch: int = 0,
                 rank: int | None = None, world_size: int | None = None, positions: dict[int, dict] | None = None,
                 epoch_batches: int | None = None):
        if epoch_batches is not None and (not resampled or epoch_batches < 1):
            raise ValueError(f"data.epoch_batches={epoch_batches}: give a positive number of batches per rank, with "
                             f"data.resampled=true (in exact mode an epoch is a pass over the shards)")
        self.sources, self.decoder, self.batch_size = list(sources), decoder, int(batch_size)
        self.seed, self.resampled, self.shuffle_buffer = seed, resampled, int(shuffle_buffer)
        self.start_batch, self.rank, self.world_size = int(start_batch), rank, world_size
        self.positions, self.epoch_batches = dict(positions or {}), epoch_batches
        self._live: Iterator[dict] | None = None  # the endless stream, continued by each epoch

    def __len__(self) -> int:
        """Batches per rank and epoch (``epoch_batches``); without it the stream is endless and has no
        length (``len`` raises TypeError, which torch and Lightning take as "infinite")."""
        if self.epoch_batches is None:
            raise TypeError("an endless shard stream has no length (set data.epoch_batches for epochs)")
        return self.epoch_batches

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_live": None}  # DataLoader workers get the stream's settings, not its state

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

    def _shard_order(self, rng: random.Random, first_pass: int = 0) -> Iterator[tuple[str, int]]:
        """(shard url, pass): random draws (resampled; pass 0 forever), or this reader's shards in the
        order of each pass, from ``first_pass`` on."""
        if self.resampled:
            weights = [w for _, w in self.sources]
            while True:
                urls, _ = rng.choices(self.sources, weights=weights)[0]
                yield rng.choice(urls), 0
        else:
            mine, me = self.assigned_shards(), self._where()[0]
            for epoch in itertools.count(first_pass):
                order = list(mine)
                random.Random(mix_seed(self.seed, epoch, me)).shuffle(order)
                for url in order:
                    yield url, epoch

    def _skips(self) -> Skips:
        """The bookkeeping of this reader's unusable input; it knows the reader's shards."""
        me, total, workers = self._where()
        if self.resampled:
            shards = [u for urls, weight in self.sources if weight > 0 for u in urls]
        else:
            shards = self.assigned_shards()
        patience = max(DRY_SAMPLES, self.shuffle_buffer) if self.resampled else None
        return Skips(shards, f"data reader {me} of {total} (rank {me // workers})", patience)

    def _raw_samples(self, rng: random.Random, skips: Skips, first_pass: int) -> Iterator[tuple[int, dict]]:
        """(pass, raw sample) out of the shuffle buffer. A key read before in the pass from the same
        source (exact mode) or in the shard (resampled: shards are drawn with replacement, so samples
        recur by design) is dropped as a duplicate. In exact mode each pass is emptied from the buffer
        before the next begins, so every pass emits each sample exactly once, and its buffer draws
        restart from a generator seeded by (seed, reader, pass)."""
        me = self._where()[0]
        source = {u: i for i, (urls, _) in enumerate(self.sources) for u in urls}  # sources may share key names
        buffer: list[dict] = []
        keys: set[tuple[int, str]] = set()
        current = first_pass
        if not self.resampled:
            rng = random.Random(mix_seed(self.seed, me, current, 1))
        for url, epoch in self._shard_order(rng, first_pass):
            if self.resampled:
                keys.clear()
            if epoch != current:
                while buffer:
                    yield current, buffer.pop(rng.randrange(len(buffer)))
                skips.pass_read()
                keys.clear()
                current, rng = epoch, random.Random(mix_seed(self.seed, me, epoch, 1))
            skips.tried.add(url)
            for raw in tar_samples(url, skips.counts):
                skips.read += 1
                key = source[url], raw["__key__"]
                if key in keys:
                    skips.skip("duplicate_key", raw)
                    continue
                keys.add(key)
                buffer.append(raw)
                if len(buffer) >= self.shuffle_buffer:
                    yield current, buffer.pop(rng.randrange(len(buffer)))
            skips.shard_read()

    def _decode(self, raw: dict, stream_seed: int, epoch: int, index: int) -> dict | str:
        rng = random.Random(f"{stream_seed}/{epoch}/{index}") if self.decoder.draws_random else None
        sample = self.decoder(raw, rng)
        if not isinstance(sample, str):
            sample["__where__"] = [raw["__url__"], raw["__key__"], epoch, index]
        return sample

    def _refetch(self, pending: list[list], stream_seed: int) -> list[dict]:
        """The samples that waited in partly filled groups at the saved position, read by key from
        their shards and decoded as they were."""
        wanted: dict[str, dict[str, list]] = {}
        for url, key, epoch, index in pending:
            wanted.setdefault(url, {})[key] = [epoch, index]
        found: dict[tuple[str, str], dict] = {}
        for url, keys in wanted.items():
            for raw in tar_samples(url, Counter()):
                if raw["__key__"] in keys:
                    sample = self._decode(raw, stream_seed, *keys[raw["__key__"]])
                    if not isinstance(sample, str):
                        found[url, raw["__key__"]] = sample
        missing = len(pending) - len(found)
        if missing:
            log.warning("resume: %d of %d samples waiting for a batch are no longer in their shards; the "
                        "shards changed since the checkpoint", missing, len(pending))
        return [found[url, key] for url, key, _, _ in pending if (url, key) in found]

    def __iter__(self) -> Iterator[dict]:
        if self.epoch_batches is None:
            return self._batches()
        # An epoch: this worker's share of the rank's epoch_batches (the DataLoader takes batch b from
        # worker b mod workers), then the next epoch continues the same stream instead of restarting it.
        _, _, worker, workers = rank_worker()
        if self._live is None:
            self._live = self._batches()
        return itertools.islice(self._live, len(range(worker, self.epoch_batches, workers)))

    def _batches(self) -> Iterator[dict]:
        me, _, _ = self._where()
        stream_seed = mix_seed(self.seed, me, self.start_batch) if self.resampled else mix_seed(self.seed, me)
        position = None if self.resampled else self.positions.get(me)
        first_pass, skip = (position["pass"], position["emitted"]) if position else (0, 0)
        skips = self._skips()
        groups: dict[tuple, list[dict]] = {}
        for sample in self._refetch(position["pending"], stream_seed) if position else []:
            groups.setdefault(_shape_key(sample), []).append(sample)
        current, index = first_pass, -1
        for epoch, raw in self._raw_samples(random.Random(stream_seed), skips, first_pass):
            if epoch != current:
                current, index = epoch, -1
            index += 1
            if epoch == first_pass and index < skip:  # used before the restart: not decoded again
                skips.used()
                if index == skip - 1:
                    skips.counts.clear()  # counted before the restart (the counts are in the checkpoint)
                continue
            sample = self._decode(raw, stream_seed, epoch, index)
            if isinstance(sample, str):
                skips.unusable_sample(sample, raw)
                continue
            skips.used()
            shape = _shape_key(sample)
            group = groups.setdefault(shape, [])
            group.append(sample)
            if len(group) < self.batch_size:
                continue
            del groups[shape]
            batch = collate(group, skips.counts)
            if not self.resampled:
                pending = sorted((s["__where__"] for g in groups.values() for s in g), key=lambda w: w[2:])
                batch["__position__"] = {"reader": me, "pass": epoch, "emitted": index + 1, "pending": pending}
            yield batch


def _shape_key(sample: dict) -> tuple:
    return tuple((k, tuple(v.shape)) for k, v in sample.items() if isinstance(v, Tensor))


# ----------------------------------------------------------------------------------------------
# the data module


class WebDataModule(L.LightningDataModule):
    """Training batches streamed from webdataset shards; validation from a fixed set in RAM.

    Args:
        sources: a shard spec (see :func:`expand_shards`; a directory gives its ``train-*`` shards) or
            a list of ``{shards: spec, weight: w}``.
        val_shards: shard spec of the validation set (a directory gives its ``val-*`` shards); its first
            ``val_size`` samples are decoded once; the ranks share its fixed batches (``fixed_batches``).
        resampled, shuffle_buffer: see the module docstring.
        epoch_batches: batches per rank in an epoch of the resampled stream (Lightning's epochs, for
            epoch-based callbacks and logs); each epoch continues the stream. null: one endless epoch.
        max_bad_fraction: stop when more than this fraction of the samples read were unusable
            (checked once ``min_samples_for_bad_check`` samples have been read); samples dropped by
            the filters (``filtered_*``) are read, counted and logged, but not unusable.
        sharing_strategy: torch's way for DataLoader workers to hand over tensors. ``file_system``
            (default) passes shared-memory names; ``file_descriptor`` (torch's default) serves each
            tensor's descriptor from a thread of the worker, whose GIL hand-offs slowed latent loading
            from 19.8k to 16.2k samples/s per worker in ``scripts/bench_data.py``. null: leave it.
        buckets, bucket_step, max_aspect: aspect-ratio bucketing (``auto`` or a list of (h, w)).
        Decoding, filters and ``metadata``: see :class:`SampleDecoder`.
    """

    def __init__(self, sources: Any, resolution: int, channels: int = 3, num_classes: int = 1,
                 batch_size: int = 64, val_shards: Any = None, val_size: int = 1000, val_batch_size: int | None = None,
                 resampled: bool = True, shuffle_buffer: int = 1000, num_workers: int = 2, seed: int = 0,
                 image_keys: Sequence[str] = IMAGE_KEYS, label_key: str | None = "cls",
                 caption_key: str | None = None, flip: bool = False, min_image_size: int = 0,
                 max_caption_length: int | None = None, max_scores: dict[str, float] | None = None,
                 resize: str = "crop", random_crop: bool = False, tensors: dict[str, str] | None = None,
                 buckets: Any = None, bucket_step: int = 64, max_aspect: float = 2.0,
                 metadata: dict[str, str] | None = None, max_bad_fraction: float = 0.05,
                 min_samples_for_bad_check: int = 1000, sharing_strategy: str | None = "file_system",
                 epoch_batches: int | None = None):
        super().__init__()
        if isinstance(sources, (str, os.PathLike)) or (isinstance(sources, Sequence) and sources
                                                       and not isinstance(sources[0], dict)):
            sources = [{"shards": sources, "weight": 1.0}]
        self.sources = [(expand_shards(s["shards"]), float(s.get("weight", 1.0))) for s in sources]
        self.val_urls = expand_shards(val_shards, split="val") if val_shards else None
        self.resolution, self.channels, self.num_classes = resolution, channels, num_classes
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.val_size, self.resampled, self.shuffle_buffer = val_size, resampled, shuffle_buffer
        self.num_workers, self.seed, self.sharing_strategy = num_workers, seed, sharing_strategy
        self.epoch_batches = epoch_batches
        if buckets == "auto":
            buckets = aspect_buckets(resolution, bucket_step, max_aspect)
        args = dict(resolution=resolution, channels=channels, image_keys=image_keys, label_key=label_key,
                    caption_key=caption_key, min_image_size=min_image_size, max_caption_length=max_caption_length,
                    max_scores=max_scores, resize=resize, tensors=tensors, metadata=metadata, num_classes=num_classes)
        self.decoder = SampleDecoder(**args, flip=flip, random_crop=random_crop, buckets=buckets)
        self.val_decoder = SampleDecoder(**args)  # square, centred, never flipped: a fixed set
        self.max_bad_fraction, self.min_samples_for_bad_check = max_bad_fraction, min_samples_for_bad_check
        self.skip_counts: Counter = Counter()
        self.samples_used = 0
        self.positions: dict[int, dict] = {}  # exact mode: each reader's position after its last used batch
        self.val_set: SampleList | None = None

    def _rank_world(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def train_stream(self, start_batch: int = 0) -> ShardStream:
        rank, world = self._rank_world()
        return ShardStream(self.sources, self.decoder, self.batch_size, self.seed, self.resampled,
                           self.shuffle_buffer, start_batch, rank, world, self.positions, self.epoch_batches)

    def train_dataloader(self) -> DataLoader:
        start = 0
        if self.trainer is not None:  # resume: see ShardStream
            accumulate = getattr(self.trainer.lightning_module, "accumulate_grad_batches", 1)
            start = self.trainer.global_step * accumulate
        if self.num_workers > 0 and self.sharing_strategy:
            torch.multiprocessing.set_sharing_strategy(self.sharing_strategy)
        return DataLoader(self.train_stream(start), batch_size=None, collate_fn=unchanged,
                          num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
                          persistent_workers=self.num_workers > 0, worker_init_fn=ignore_preemption_signals)

    def setup(self, stage: str | None = None) -> None:
        if self.val_set is not None or not self.val_urls:
            return
        skipped: Counter = Counter()
        samples: list[dict] = []
        for url in self.val_urls:
            for raw in tar_samples(url, skipped):
                sample = self.val_decoder(raw)
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
        return DataLoader(FixedBatches(self.val_set), sampler=fixed_batches(len(self.val_set), self.val_batch_size,
                                                                            rank, world), batch_size=None, num_workers=0)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        return finish_batch(batch)

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        for key, value in batch.items():
            if isinstance(value, np.ndarray):  # small arrays leave the workers as numpy (see _stack)
                batch[key] = torch.from_numpy(value)
        position = batch.pop("__position__", None)
        if position is not None:
            self.positions[position["reader"]] = position
        counts = batch.pop("__skipped__", None)
        if counts is not None:
            self.skip_counts.update(counts)
            self.samples_used += len(batch["__key__"])
            bad = {reason: n for reason, n in self.skip_counts.items() if not is_filtered(reason)}
            seen = sum(self.skip_counts.values()) + self.samples_used
            if seen >= self.min_samples_for_bad_check and sum(bad.values()) > self.max_bad_fraction * seen:
                raise BadDataError(f"{sum(bad.values())} of {seen} samples read were unusable ({bad}), more than "
                                   f"data.max_bad_fraction={self.max_bad_fraction}; check the shards "
                                   f"(scripts/inspect_shards.py) or raise the bound")
        return batch

    def _layout(self) -> list[int]:
        """What exact-mode positions depend on: world size, workers per rank, number of shards."""
        return [self._rank_world()[1], max(1, self.num_workers), sum(len(urls) for urls, _ in self.sources)]

    def _own_positions(self) -> dict[int, dict]:
        """The positions of this rank's readers (global reader index // workers per rank == rank):
        after a resume the module also holds the other ranks' loaded positions, which only their own
        ranks keep up to date."""
        rank, workers = self._rank_world()[0], max(1, self.num_workers)
        return {r: p for r, p in self.positions.items() if r // workers == rank}

    def state_dict(self) -> dict:
        """The data position (exact mode) and the bad-sample counts of every rank, gathered for the
        checkpoint (Lightning calls this on every rank)."""
        mine = {"positions": self._own_positions(), "skipped": dict(self.skip_counts), "used": self.samples_used}
        ranks = [mine]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(ranks, mine)
        return {"layout": self._layout(), "resampled": self.resampled,
                "positions": {r: p for rank in ranks for r, p in rank["positions"].items()},
                "skipped": [rank["skipped"] for rank in ranks], "used": [rank["used"] for rank in ranks]}

    def load_state_dict(self, state: dict) -> None:
        rank, world = self._rank_world()
        if len(state.get("used", [])) == world:
            self.skip_counts, self.samples_used = Counter(state["skipped"][rank]), state["used"][rank]
        if self.resampled:
            return
        if state.get("layout") != self._layout() or state.get("resampled", True):
            log.warning("data position saved for (world size, workers, shards) = %s in %s mode; now %s in exact "
                        "mode: each reader starts at the beginning of its shards", state.get("layout"),
                        "resampled" if state.get("resampled", True) else "exact", self._layout())
            return
        self.positions = dict(state["positions"])
