"""Webdataset tar shards: the writer and the manifest (``scripts/make_shards.py`` builds them from
Fashion-MNIST, image folders and CSV/JSONL lists; ``scripts/inspect_shards.py`` checks them)::

    out/
      train-000000.tar    standard webdataset tars: members <key>.<ext>, those of one sample adjacent
      train-000001.tar
      val-000000.tar      (another prefix: same layout)
      manifest.json       written last, atomically: a folder without it is not a finished shard set

A sample is a dict ``{"__key__": "000123", "png": b"...", "cls": 3, "txt": "a caption", "json": {...}}``;
its key is a unique string without dots or slashes. Members are written in the dict's order:
``bytes`` as they are (``png``/``jpg``: encoded images, see :func:`encode_image`), ``str`` as
UTF-8, ``int`` as ASCII text (``cls``: the label), ``dict``/``list`` as JSON; ``None`` values and
other ``__`` fields are left out. Tar headers are fixed (mtime 0, mode 0444, no owner names), so
the same samples give byte-identical shards.

The manifest (``FORMAT``)::

    {"format": "diffusion_train.shards/1", "count": N, "keys": ["cls", "png", "txt"],
     "num_classes": K or null, "class_names": [...] or null,
     "shards": [{"path": "train-000000.tar", "count": n, "bytes": b}, ...]}

``keys`` are the member extensions present in any sample, sorted; shard paths are relative to the
manifest; ``count`` sums every shard (all prefixes); ``bytes`` is the file size.
"""

from __future__ import annotations

import io
import json
import math
import numbers
import os
import re
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from PIL import Image

from diffusion_train.files import write_json

FORMAT = "diffusion_train.shards/1"
MANIFEST = "manifest.json"
IMAGE_FORMATS = ("png", "jpg")
JPEG_QUALITY = 95
_RECORD = tarfile.RECORDSIZE  # tarfile pads a closed archive to a multiple of this (10240 bytes)


def encode_image(image, fmt: str = "png", quality: int = JPEG_QUALITY) -> bytes:
    """PNG or JPEG bytes of a uint8 image: (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4
    (a numpy array, a CPU tensor or anything ``np.asarray`` takes). A 3-D array whose first axis is
    1, 3 or 4 and whose last is not is read as channels-first. JPEG takes 1 or 3 channels."""
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"unknown image format {fmt!r}; valid: {', '.join(IMAGE_FORMATS)}")
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"encode_image needs uint8 pixels, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))) or 0 in arr.shape:
        raise ValueError(f"encode_image needs (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4, got {arr.shape}")
    if fmt == "jpg" and arr.ndim == 3 and arr.shape[-1] == 4:
        raise ValueError("jpg has no alpha channel: encode RGBA images as png")
    buf = io.BytesIO()
    img = Image.fromarray(np.ascontiguousarray(arr))
    if fmt == "png":
        img.save(buf, format="PNG")
    else:
        img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _member_bytes(value: Any, key: str, ext: str) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value)).encode("ascii")
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    raise TypeError(f"sample {key!r}: member {ext!r} is a {type(value).__name__}; "
                    f"give bytes, str, int, dict or list")


def _members(sample: dict) -> tuple[str, list[tuple[str, bytes]]]:
    key = sample.get("__key__")
    if not isinstance(key, str) or not key or "." in key or "/" in key:
        raise ValueError(f"sample key {key!r}: needs a non-empty string without '.' or '/'")
    members = [(ext, _member_bytes(v, key, ext)) for ext, v in sample.items()
               if not ext.startswith("__") and v is not None]
    for ext, _ in members:
        if not ext or "/" in ext:
            raise ValueError(f"sample {key!r}: bad member extension {ext!r}")
    if not members:
        raise ValueError(f"sample {key!r} has no members")
    return key, members


def _tar_size(payload: int) -> int:
    """Bytes of a closed tar whose members take ``payload`` bytes (headers and padding included)."""
    return math.ceil((payload + 2 * tarfile.BLOCKSIZE) / _RECORD) * _RECORD


class _ShardSeries:
    """``<out>/<prefix>-%06d.tar``, a new file whenever the next sample would pass a limit. Each
    file is written as ``.<name>.tmp`` and renamed when closed."""

    def __init__(self, out: Path, prefix: str, max_count: int, max_bytes: int,
                 on_shard: Callable[[dict], None] | None):
        self.out, self.prefix, self.max_count, self.max_bytes = out, prefix, max_count, max_bytes
        self.on_shard = on_shard
        self.shards: list[dict] = []
        self.tar: tarfile.TarFile | None = None
        self.count = 0

    @property
    def name(self) -> str:
        return f"{self.prefix}-{len(self.shards):06d}.tar"

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        infos = []
        for ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode, info.mtime = len(data), 0o444, 0
            infos.append(info)
        size = sum(len(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
                   + math.ceil(info.size / tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE for info in infos)
        if self.tar is not None and (self.count >= self.max_count
                                     or _tar_size(self.tar.offset + size) > self.max_bytes):
            self.close()
        if self.tar is None:
            self.tar = tarfile.open(self.out / f".{self.name}.tmp", "w", format=tarfile.PAX_FORMAT)
            self.count = 0
        for info, (_, data) in zip(infos, members):
            self.tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        self.tar = None
        name = self.name
        os.replace(self.out / f".{name}.tmp", self.out / name)
        entry = {"path": name, "count": self.count, "bytes": (self.out / name).stat().st_size}
        self.shards.append(entry)
        if self.on_shard is not None:
            self.on_shard(entry)

    def abort(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None
            (self.out / f".{self.name}.tmp").unlink(missing_ok=True)

    def remove_stale(self) -> None:
        """Deletes ``<prefix>-NNNNNN.tar`` files left in ``out`` by an earlier, longer run."""
        pattern = re.compile(re.escape(self.prefix) + r"-(\d{6})\.tar")
        for path in self.out.iterdir():
            m = pattern.fullmatch(path.name)
            if m and int(m.group(1)) >= len(self.shards):
                path.unlink()


def write_shards(samples: Iterable[dict], out_dir: str | os.PathLike, prefix: str = "train",
                 max_count: int = 10000, max_bytes: int = 1 << 30, *, val_samples: Iterable[dict] | None = None,
                 val_prefix: str = "val", num_classes: int | None = None, class_names: list[str] | None = None,
                 on_shard: Callable[[dict], None] | None = None) -> dict:
    """Writes ``samples`` (dicts, see the module docstring) as ``<out_dir>/<prefix>-%06d.tar`` shards of
    at most ``max_count`` samples and ``max_bytes`` bytes (a single larger sample gets a shard of its
    own), then ``val_samples`` (if given) as ``<val_prefix>-%06d.tar``, then the manifest; returns it.

    Keys must be unique over both. ``num_classes`` defaults to ``len(class_names)``, else to the
    largest ``cls`` + 1 (null without ``cls``). ``on_shard(entry)`` is called as each shard is
    closed. An existing manifest is removed first, and shards of the same prefixes beyond those
    written (left by an earlier run) are deleted at the end.
    """
    if max_count < 1 or max_bytes < 1:
        raise ValueError(f"max_count and max_bytes must be positive, got {max_count}, {max_bytes}")
    splits = [(prefix, samples)] + ([(val_prefix, val_samples)] if val_samples is not None else [])
    if len({p for p, _ in splits}) != len(splits) or any(not p or "/" in p for p, _ in splits):
        raise ValueError(f"shard prefixes must be distinct names without '/', got {[p for p, _ in splits]}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the old manifest would describe shards about to change

    keys_seen: set[str] = set()
    exts: set[str] = set()
    max_label = -1
    shards: list[dict] = []
    for split_prefix, split_samples in splits:
        series = _ShardSeries(out, split_prefix, max_count, max_bytes, on_shard)
        try:
            for sample in split_samples:
                key, members = _members(sample)
                if key in keys_seen:
                    raise ValueError(f"duplicate sample key {key!r}")
                keys_seen.add(key)
                label = sample.get("cls")
                if label is not None:
                    if not isinstance(label, numbers.Integral) or isinstance(label, bool) or label < 0:
                        raise ValueError(f"sample {key!r}: cls must be a non-negative int, got {label!r}")
                    if class_names is not None and label >= len(class_names):
                        raise ValueError(f"sample {key!r}: cls {label} but only {len(class_names)} class_names")
                    max_label = max(max_label, int(label))
                exts.update(ext for ext, _ in members)
                series.add(key, members)
            series.close()
        except BaseException:
            series.abort()
            raise
        series.remove_stale()
        shards += series.shards
    if not shards:
        raise ValueError(f"no samples to write to {out}")

    if num_classes is None:
        num_classes = len(class_names) if class_names is not None else (max_label + 1 if max_label >= 0 else None)
    manifest = {"format": FORMAT, "count": sum(s["count"] for s in shards), "keys": sorted(exts),
                "num_classes": num_classes, "class_names": list(class_names) if class_names is not None else None,
                "shards": shards}
    write_json(out / MANIFEST, manifest)
    return manifest


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a shard folder (``path``: the folder or its ``manifest.json``)."""
    path = Path(path)
    file = path if path.suffix == ".json" else path / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(f"no shard manifest {file}: write the shards with scripts/make_shards.py")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{file}: format {found!r}, expected {FORMAT!r}")
    return manifest


def shard_paths(path: str | os.PathLike, prefix: str | None = None) -> list[Path]:
    """Paths of the shards a manifest lists (all, or those named ``<prefix>-*``), in its order."""
    path = Path(path)
    folder = path.parent if path.suffix == ".json" else path
    return [folder / s["path"] for s in read_manifest(path)["shards"]
            if prefix is None or Path(s["path"]).name.startswith(prefix + "-")]
