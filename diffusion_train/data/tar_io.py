"""Reading webdataset tar shards: a lean ustar reader, samples grouped by key, and ``.npy`` /
``.pth`` members as tensors. Used by the streaming data module (:mod:`diffusion_train.data.web`)."""

from __future__ import annotations

import io
import logging
import math
import tarfile
import zlib
from collections import Counter
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)
GZIP_MAGIC = b"\x1f\x8b"  # a .tar.gz shard starts with it; it is read through gzip
_warned_shards: set[str] = set()  # unreadable shards already logged by this process (a resampled stream redraws them)


class TarReadError(tarfile.TarError):
    """A tar stream is truncated or corrupt."""


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for large numbers
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:  # not a tar header: an HTML error page from a failed download, or garbage
        raise TarReadError(f"bad header field {text[:16]!r}") from None


def _read_exact(stream, n: int) -> bytes:
    data = stream.read(n)
    while len(data) < n:  # pipes may return less than asked
        more = stream.read(n - len(data))
        if not more:
            break
        data += more
    return data


class _Prefixed:
    """A readable stream whose first bytes were already read (to sniff the format)."""

    def __init__(self, head: bytes, stream):
        self.head, self.stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(n)
        if n < 0:
            out, self.head = self.head + self.stream.read(), b""
            return out
        out, self.head = self.head[:n], self.head[n:]
        return out if len(out) == n else out + self.stream.read(n - len(out))


def tar_members(stream) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular files of a tar stream (ustar, with PAX and GNU long names).

    A lean reader: about a tenth of ``tarfile``'s per-member cost, which dominates for small members
    such as precomputed latents. Raises :class:`TarReadError` on a truncated or corrupt archive.
    """
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = _read_exact(stream, 512)
        if not header:  # tar writers end with zero blocks: a file ending after a member was cut short there
            raise TarReadError("no end-of-archive marker (cut short at a member boundary?)")
        if header.count(0) == 512:
            return
        if len(header) < 512:
            raise TarReadError("unexpected end of data in a header")
        if _octal(header[148:156]) != sum(header) - sum(header[148:156]) + 256:  # the field counts as spaces
            raise TarReadError("bad header checksum")
        try:
            size = int(pax.get("size", _octal(header[124:136])))
        except ValueError:
            raise TarReadError(f"bad PAX size {pax['size'][:16]!r}") from None
        typeflag = header[156:157]
        data = _read_exact(stream, size)
        if len(data) < size:
            raise TarReadError("unexpected end of data in a member")
        _read_exact(stream, -size % 512)
        if typeflag == b"x":  # PAX extended header for the next member: "<len> <key>=<value>\n" records
            pax = {}
            for record in data.decode("utf-8", "replace").splitlines():
                key, _, value = record.partition(" ")[2].partition("=")
                pax[key] = value
            continue
        if typeflag == b"L":  # GNU long name for the next member
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
            continue
        if typeflag in (b"0", b"\0", b"7"):
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") if header[257:262] == b"ustar" else ""
            name = pax.get("path") or long_name or (f"{prefix}/{name}" if prefix else name)
            yield name, data
        if typeflag != b"g":
            long_name, pax = None, {}


def tar_samples(url: str, skipped: Counter) -> Iterator[dict[str, Any]]:
    """Samples (``{"__key__", "__url__", ext: bytes, ...}``) of one tar, consecutive members of a key grouped; a
    member whose key and extension the sample has already starts another sample of that key.

    A tar that cannot be opened, is corrupt (a bad header, bad gzip data), ends early (truncated) or
    holds no sample (an empty file) counts as ``unreadable_tar`` each time it is read and is logged with
    its url the first time (per process); the samples before the damage are kept, the partial one is dropped.
    """
    import gzip

    import webdataset as wds

    current: dict[str, Any] | None = None
    found = False
    try:
        with wds.gopen(url, bufsize=1 << 20) as raw:
            head = _read_exact(raw, 512)
            stream = _Prefixed(head, raw)
            if head[:2] == GZIP_MAGIC:  # .tar.gz
                stream = gzip.GzipFile(fileobj=stream)
            for path, data in tar_members(stream):
                directory, _, name = path.rpartition("/")
                stem, dot, ext = name.partition(".")
                if not dot or stem.startswith("__"):
                    continue
                key, ext = (f"{directory}/{stem}" if directory else stem), ext.lower()
                # a new key, or a member the sample has already: a rewrite of it, which the reader drops as a duplicate
                if current is not None and (current["__key__"] != key or ext in current):
                    found = True
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": url}
                current[ext] = data
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        _unreadable(url, skipped, "%s: %s (samples before it are used)", type(e).__name__, e)
        return
    if current is not None:
        yield current
    elif not found:
        _unreadable(url, skipped, "no sample in it (an empty file or archive)")


def _unreadable(url: str, skipped: Counter, why: str, *args) -> None:
    skipped["unreadable_tar"] += 1
    if url not in _warned_shards:
        _warned_shards.add(url)
        log.warning("shard %s: " + why + " (logged once; each read is counted)", url, *args)


_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...]]] = {}


def load_array(data: bytes, member: str) -> Tensor:
    if member.endswith(".pth"):
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    return torch.from_numpy(_load_npy(data))


def _load_npy(data: bytes) -> np.ndarray:
    """``np.load`` of a .npy file's bytes, parsing each distinct header once (the parse costs more
    than the copy for small arrays); anything unusual goes through ``np.load``."""
    if data[:6] == b"\x93NUMPY" and data[6] in (1, 2, 3):
        width = 2 if data[6] == 1 else 4
        length = int.from_bytes(data[8:8 + width], "little")
        start = 8 + width + length
        header = data[8 + width:start]
        info = _NPY_HEADERS.get(header)
        if info is None:
            fp = io.BytesIO(data[8:start])  # after the magic string and version
            meta = np.lib.format.read_array_header_1_0(fp) if data[6] == 1 else np.lib.format.read_array_header_2_0(fp)
            shape, fortran, dtype = meta
            if not fortran and not dtype.hasobject and len(_NPY_HEADERS) < 256:
                info = _NPY_HEADERS[header] = (dtype, shape)
        if info is not None:
            dtype, shape = info
            count = math.prod(shape)
            return np.frombuffer(data, dtype=dtype, count=count, offset=start).reshape(shape).copy()
    return np.load(io.BytesIO(data), allow_pickle=False)
