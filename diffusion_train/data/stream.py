"""The shard reader behind :class:`diffusion_train.data.web.WebDataModule`: an iterable dataset that
streams raw samples out of tar shards, shuffles them in a buffer, decodes them, groups them by shape and
yields whole batches, with the bookkeeping that makes an exact-mode resume exact (see the web module's
docstring for the two modes), and the batching helpers the DataLoader and the data module share."""

from __future__ import annotations

import itertools
import logging
import os
import random
from collections import Counter
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from diffusion_train.data.bad_data import DRY_SAMPLES, Skips
from diffusion_train.data.decode import SampleDecoder
from diffusion_train.data.samplers import mix_seed
from diffusion_train.data.tar_io import tar_samples

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# readers


def rank_worker() -> tuple[int, int, int, int]:
    """(rank, world size, worker, workers): the rank from torch.distributed, else the environment (``RANK``,
    ``WORLD_SIZE``, as torchrun sets them), else a single process; the worker from the DataLoader, else the
    one reader of a loader without workers."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    info = get_worker_info()
    if info is not None:
        return rank, world, info.id, info.num_workers
    return rank, world, 0, 1


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
                             f"data.resampled=true (an exact-mode stream is one endless epoch)")
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
        wanted: dict[str, dict[str, list[int]]] = {}  # url -> key -> its places in pending: a sample of a rare
        for place, (url, key, _, _) in enumerate(pending):  # shape can wait once from each of several passes
            wanted.setdefault(url, {}).setdefault(key, []).append(place)
        found: dict[int, dict] = {}
        for url, keys in wanted.items():
            for raw in tar_samples(url, Counter()):
                for place in keys.pop(raw["__key__"], ()):  # a key's first copy in the shard, as the stream kept
                    sample = self._decode(raw, stream_seed, *pending[place][2:])
                    if not isinstance(sample, str):
                        found[place] = sample
                if not keys:
                    break
        missing = len(pending) - len(found)
        if missing:
            log.warning("resume: %d of %d samples waiting for a batch are no longer in their shards; the "
                        "shards changed since the checkpoint", missing, len(pending))
        return [found[place] for place in sorted(found)]

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
