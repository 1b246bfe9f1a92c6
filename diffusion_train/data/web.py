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
the batches, are summed over the ranks and logged at logging steps, where more than ``max_bad_fraction``
of bad samples (filtered ones not counted) stops the run on every rank with the reason; a reader that has
no usable sample at all stops it too (see :class:`Skips`).
A local shard path or pattern that matches nothing fails at start, naming the pattern.

The reader itself (shuffle buffer, decoding, batching, positions) is :class:`diffusion_train.data.stream.ShardStream`.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from diffusion_train.data.bad_data import BadDataError, is_filtered
from diffusion_train.data.decode import IMAGE_KEYS, SampleDecoder, aspect_buckets
from diffusion_train.data.samplers import FixedBatches, fixed_batches, ignore_preemption_signals
from diffusion_train.data.stream import SampleList, ShardStream, finish_batch, unchanged
from diffusion_train.data.tar_io import tar_samples

__all__ = ["BadDataError", "WebDataModule", "expand_shards"]

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
            urls += _existing(found, f"shard directory {item}", "shards its manifest lists")
            continue
        expanded = list(braceexpand(item))
        urls += _existing(expanded, f"shard pattern {item!r}", "paths")
    if not urls:
        raise FileNotFoundError(f"shard spec {spec!r} matches no shards")
    return urls


def _existing(paths: list[str], where: str, what: str) -> list[str]:
    """``paths``, all of which must be files: else one error naming ``where`` and the first missing one."""
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"{where}: {len(missing)} of {len(paths)} {what} do not exist (first: {missing[0]})")
    return paths


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
        if self.val_set is not None or not self.val_urls or self.val_size <= 0:
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
                if len(samples) >= self.val_size:
                    break
            if len(samples) >= self.val_size:
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
        return batch

    def check_bad_data(self, skipped: dict[str, int], used: int) -> None:
        """Raises :class:`BadDataError` when more than ``max_bad_fraction`` of the samples read were unusable:
        of ``skipped`` (counts by reason) and ``used`` samples. The training module passes the sums over all
        ranks at its logging steps, so that every rank stops at the same step (a rank that stopped alone would
        leave the others waiting in a collective)."""
        bad = {reason: n for reason, n in skipped.items() if not is_filtered(reason)}
        seen = sum(skipped.values()) + used
        if seen >= self.min_samples_for_bad_check and sum(bad.values()) > self.max_bad_fraction * seen:
            raise BadDataError(f"{sum(bad.values())} of {seen} samples read were unusable ({bad}), more than "
                               f"data.max_bad_fraction={self.max_bad_fraction}; check the shards "
                               f"(scripts/inspect_shards.py) or raise the bound")

    def _layout(self) -> list:
        """What exact-mode positions depend on: world size, workers per rank, the shard list (its number and a
        digest of the names in order), and the seed and shuffle buffer that order the shards and draw from the
        buffer."""
        import hashlib

        urls = [u for urls, _ in self.sources for u in urls]
        digest = hashlib.sha256("\n".join(Path(u).name for u in urls).encode()).hexdigest()[:16]
        return [self._rank_world()[1], max(1, self.num_workers), len(urls), digest, self.seed, self.shuffle_buffer]

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
        elif state.get("used") and rank == 0:  # another world size: the counts go on, summed, in rank 0's
            self.skip_counts = sum((Counter(counts) for counts in state["skipped"]), Counter())
            self.samples_used = sum(state["used"])
        if self.resampled:
            return
        if state.get("layout") != self._layout() or state.get("resampled", True):
            log.warning("data position saved for (world size, workers, shards, shard list digest, seed, shuffle "
                        "buffer) = %s in %s mode; now %s in exact mode: each reader starts at the beginning of its "
                        "shards", state.get("layout"),
                        "resampled" if state.get("resampled", True) else "exact", self._layout())
            return
        self.positions = dict(state["positions"])
