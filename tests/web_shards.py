"""Webdataset shards for tests: writing tar shards, a shard stream with small defaults, the place of one
reader (rank x worker), and a rank's DataLoader order (test_web_data.py, test_stream_resume.py,
test_aspect_buckets.py, test_shard_reading.py)."""

from __future__ import annotations

import io
import itertools
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from diffusion_train.data.decode import SampleDecoder
from diffusion_train.data import stream as stream_module
from diffusion_train.data.stream import ShardStream
from diffusion_train.data.web import expand_shards


def write_shard(path: Path, samples: list[dict[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def stream(pattern, decoder=None, **kw) -> ShardStream:
    decoder = decoder or SampleDecoder(resolution=8, channels=1, caption_key="txt")
    args = dict(batch_size=5, seed=0, resampled=False, shuffle_buffer=1)
    return ShardStream([(expand_shards(pattern), 1.0)], decoder, **{**args, **kw})


def as_reader(monkeypatch, rank: int, world: int, worker: int, workers: int) -> None:
    """Makes the streams of this test read as worker ``worker`` of ``workers`` of rank ``rank`` of ``world``."""
    monkeypatch.setattr(stream_module, "rank_worker", lambda: (rank, world, worker, workers))


def loader_batches(pattern, monkeypatch, start: int, n: int, workers: int = 2, positions=None,
                    decoder=None, **kw) -> list[dict]:
    """What a rank's DataLoader yields: batch b from worker b mod workers."""
    per_worker = []
    for w in range(workers):  # read each worker's batches while rank_worker says which worker it is
        as_reader(monkeypatch, 0, 1, w, workers)
        s = stream(pattern, decoder, start_batch=start, positions=positions, **kw)
        per_worker.append(iter(list(itertools.islice(iter(s), n))))
    return [next(per_worker[b % workers]) for b in range(n)]


def positions_after(batches: list[dict]) -> dict[int, dict]:
    """What WebDataModule saves in a checkpoint: each reader's position after its last used batch."""
    return {b["__position__"]["reader"]: b["__position__"] for b in batches}


def png_of(value: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size), value % 256, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def make_shards(root: Path, n_shards: int, per_shard: int, prefix: str = "train") -> str:
    root.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        samples = []
        for i in range(per_shard):
            k = s * per_shard + i
            samples.append({"__key__": f"{k:06d}", "png": png_of(k), "cls": str(k % 10).encode(),
                            "txt": f"item {k}".encode()})
        write_shard(root / f"{prefix}-{s:06d}.tar", samples)
    return str(root / f"{prefix}-{{{0:06d}..{n_shards - 1:06d}}}.tar")


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["__key__"]]
