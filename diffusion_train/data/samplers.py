"""Index samplers whose order is a pure function of (seed, position): exact resume, no replay."""

from __future__ import annotations

import signal
from typing import Iterator, NamedTuple

import numpy as np
from torch.utils.data import Dataset


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from several integers (seed, step, rank, worker, ...)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class InfiniteBatchSampler:
    """An endless stream of per-rank index batches over ``num_samples`` items.

    The global stream visits every item once per epoch in an order drawn from (seed, epoch).
    Global batch k holds stream positions [k*G, (k+1)*G) with G = batch_size * world_size; rank r
    takes the r-th slice of it. Starting at ``start_batch`` resumes the stream exactly where a run
    that had consumed ``start_batch`` batches per rank stopped.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, start_batch: int = 0):
        if num_samples <= 0:
            raise ValueError("InfiniteBatchSampler: the dataset is empty")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size, self.start_batch = rank, world_size, start_batch
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        return self._perm

    def indices(self, batch: int) -> list[int]:
        """Dataset indices of this rank's ``batch``-th batch."""
        start = (batch * self.world_size + self.rank) * self.batch_size
        out = []
        for pos in range(start, start + self.batch_size):
            epoch, i = divmod(pos, self.num_samples)
            out.append(int(self._order(epoch)[i]))
        return out

    def __iter__(self) -> Iterator[list[int]]:
        batch = self.start_batch
        while True:
            yield self.indices(batch)
            batch += 1


class FixedBatch(NamedTuple):
    """One batch of a fixed evaluation set: its place among the set's batches, its items, and whether
    it is a repeat that only keeps the ranks in step (its loss is not counted)."""
    index: int
    items: list[int]
    padding: bool = False


def fixed_batches(num_samples: int, batch_size: int, rank: int, world_size: int) -> list[FixedBatch]:
    """The evaluation set in consecutive batches (batch k: items [k*B, (k+1)*B)); rank r takes batches
    r, r+W, ... A rank with one batch fewer repeats one as padding, so every rank runs the same number of
    batches (no rank waits in a collective). The batches, and so their noise, are the same for any number
    of ranks: each item is counted once and the validation loss does not depend on the world size (unless
    ``trainer.limit_val_batches`` < 1, which Lightning applies to each rank's share)."""
    count = -(-num_samples // batch_size)
    out = []
    for j in range(-(-count // world_size)):
        k = rank + world_size * j
        index = k % count
        out.append(FixedBatch(index, list(range(index * batch_size, min((index + 1) * batch_size, num_samples))),
                              k >= count))
    return out


class FixedBatches(Dataset):
    """A dataset indexed by lists of indices, read by :class:`FixedBatch`: each batch dict gains
    ``__batch__`` (the batch's index) and ``__padding__``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, batch: FixedBatch) -> dict:
        return {**self.dataset[batch.items], "__batch__": batch.index, "__padding__": batch.padding}


def ignore_preemption_signals(worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: workers ignore SIGUSR1/SIGUSR2/SIGTERM. Slurm signals every
    process of a job step, workers included; one dying of the signal would crash the training that the
    main process is about to checkpoint (see ``training/preemption.py``). The main process decides."""
    for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
