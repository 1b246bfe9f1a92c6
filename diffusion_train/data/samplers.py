"""Index samplers whose order is a pure function of (seed, position): exact resume, no replay."""

from __future__ import annotations

import signal
from typing import Iterator

import numpy as np


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


def padded_shard(num_samples: int, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """Fixed evaluation batches: rank r gets items r, r+W, ...; the tail is padded by repeating
    items so every rank runs the same number of batches (no rank waits in a collective)."""
    per_rank = -(-num_samples // world_size)
    idx = [(rank + world_size * j) % num_samples for j in range(per_rank)]
    return [idx[i:i + batch_size] for i in range(0, per_rank, batch_size)]


def ignore_preemption_signals(worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: workers ignore SIGUSR1/SIGUSR2/SIGTERM. Slurm signals every
    process of a job step, workers included; one dying of the signal would crash the training that the
    main process is about to checkpoint (see ``training/preemption.py``). The main process decides."""
    for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
