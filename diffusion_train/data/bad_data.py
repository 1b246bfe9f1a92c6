"""What a stream does with input it cannot use: the skip counts, the log lines that name the first bad samples,
and the errors that stop the run (too many bad samples, or a reader with none)."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Sequence

from diffusion_train.cli import UserError

log = logging.getLogger(__name__)


LOGGED_PER_REASON = 3  # bad samples named in the log per reason and reader; the rest are only counted
DRY_SAMPLES = 1000  # resampled: unusable samples in a row (and every shard drawn) that stop a reader


class BadDataError(UserError):
    """Too many samples of the stream could not be used, or a reader has none."""

    def __init__(self, message: str):
        # Raised in a DataLoader worker, it reaches the main process as "Caught BadDataError in DataLoader
        # worker process N.\nOriginal Traceback ...\n<module>.BadDataError: <message>": keep the one line.
        if message.startswith(f"Caught {BadDataError.__name__} "):
            message = message.rstrip().rsplit("\n", 1)[-1].split(f"{BadDataError.__name__}: ", 1)[-1]
        super().__init__(message)


def is_filtered(reason: str) -> bool:
    """Whether a skip reason is a configured filter (``filtered_*``), which drops good data on purpose."""
    return reason.startswith("filtered_")


class Skips:
    """A reader's unusable input.

    ``counts`` holds the skips by reason since the reader's last batch (each batch takes them along,
    see ``stream.collate``). The first ``LOGGED_PER_REASON`` bad samples of each reason are named in the log
    with what was wrong (filtered samples are only counted). A reader that has read all of its shards
    since its last usable sample raises :class:`BadDataError`, naming them and the skip counts, instead
    of reading on forever without a batch (its rank would wait for it, and the other ranks in their next
    collective): in exact mode after a whole pass without a usable sample; resampled, once every shard
    was drawn and either none gave a sample or ``patience`` samples in a row were unusable.
    """

    def __init__(self, shards: Sequence[str], reader: str, patience: int | None):
        self.counts: Counter = Counter()
        self.logged: Counter = Counter()
        self.shards, self.reader, self.patience = set(shards), reader, patience
        self.tried: set[str] = set()
        self.read = self.unusable = 0

    def used(self) -> None:
        """A usable sample (or the samples a resumed reader had used before the restart)."""
        if self.tried:
            self.tried = set()
        self.read = self.unusable = 0

    def skip(self, reason: str, raw: dict) -> None:
        """Counts (and maybe logs) a skipped sample."""
        self.counts[str(reason)] += 1
        if is_filtered(reason) or self.logged[reason] >= LOGGED_PER_REASON:
            return
        self.logged[reason] += 1
        detail = getattr(reason, "detail", "")
        log.warning("%s: skipped sample %s of shard %s: %s%s%s", self.reader, raw["__key__"], raw["__url__"], reason,
                    f" ({detail})" if detail else "",
                    f" (more {reason} samples are only counted)" if self.logged[reason] == LOGGED_PER_REASON else "")

    def unusable_sample(self, reason: str, raw: dict) -> None:
        """A decoded sample that is skipped."""
        self.skip(reason, raw)
        self.unusable += 1
        if self.patience is not None and self.unusable >= self.patience and self.tried >= self.shards:
            self.fail(f"every shard was read and the last {self.unusable} samples were unusable")

    def shard_read(self) -> None:
        """Resampled: after each shard draw."""
        if self.patience is not None and not self.read and self.tried >= self.shards:
            self.fail("every shard was read and none gave a sample")

    def pass_read(self) -> None:
        """Exact mode: after each whole pass over the reader's shards, its samples decoded."""
        if self.tried >= self.shards:
            self.fail("a whole pass over its shards gave none")

    def fail(self, what: str) -> None:
        shards = sorted(self.shards)
        shown = ", ".join(shards[:3]) + (f" and {len(shards) - 3} more" if len(shards) > 3 else "")
        raise BadDataError(f"{self.reader} has no usable sample: {what} ({len(shards)} shard"
                           f"{'s' * (len(shards) != 1)}: {shown}); skipped since its last batch: {dict(self.counts)}; "
                           f"check the shards (scripts/inspect_shards.py) and the data config")
