"""Writes webdataset tar shards (the format of ``diffusion_train/data/shards.py``) from Fashion-MNIST,
an image folder, or a CSV / JSONL list of images::

    python scripts/make_shards.py source=fashion_mnist out=shards/fmnist [captions=true] [val_size=1000]
    python scripts/make_shards.py source=folder root=DIR out=shards/mine [val_size=500] [shuffle=0]
    python scripts/make_shards.py source=csv path=FILE.csv out=DIR       (or source=jsonl path=FILE.jsonl)

Every argument is ``key=value``:

    source        fashion_mnist | folder | csv | jsonl (required)
    out           output folder (required): <prefix>-000000.tar ..., val-000000.tar ..., manifest.json
    prefix        name of the training shards (train); validation shards are always val-*.tar
    max_count     samples per shard (10000)
    max_bytes     bytes per shard, with an optional K, M or G suffix (decimal: 1G = 10^9) or KiB, MiB, GiB (1GiB)
    image_format  png | jpg (png; jpg at quality 95): encoding of Fashion-MNIST's pixels and of image
                  files in other formats (webp, bmp, ...); PNG and JPEG files are stored byte for byte
    val_size      fashion_mnist: the first N test images go to val-*.tar (1000);
                  folder, csv, jsonl: N items evenly spaced through the list, so that each
                  class folder gives its share (0: no validation shards)
    limit         only the first N items of each split, for quick trials (all)
    short_side    folder, csv, jsonl: resize images whose short side is longer to this (e.g. 288 for
                  training at 256) and re-encode them (JPEG stays JPEG), so that training decodes
                  fewer pixels per sample. Default: keep the files as they are
    shuffle       a seed: shuffle the items before ``limit`` and the split (keys keep the original
                  index). Sorted class folders otherwise give shards of one class each.
    root          folder: the image folder; fashion_mnist: a folder with the IDX files (default: the
                  Debian package dataset-fashion-mnist)
    path          csv, jsonl: the list file
    captions      fashion_mnist: false (default), true (the templates of conf/data/fashion_mnist_captions.yaml,
                  item i of a split using template i mod 4, as the data module does), or one template
                  with {name}
    labels        folder: auto (default: cls from the sorted first-level subfolder names when every
                  image is in one, no cls when none is), true (require class subfolders), false (no cls)

Sources and what each sample gets (``key``, image member ``png``/``jpg``, ``cls``, ``txt``, ``json``):

- fashion_mnist: keys ``train_012345`` / ``test_000123`` (split and index of the image), cls, txt
  with ``captions``; the manifest has the 10 class names.
- folder: images found by :func:`diffusion_train.data.folder.list_images` (sorted, hidden files
  skipped); key = index in that order (``000123``); txt from a same-stem ``.txt`` file (stripped;
  empty: no txt); json ``{"path", "width", "height"}`` (the original's size after EXIF rotation; also as
  ``original_width``/``original_height`` when ``short_side`` stored a shrunk copy); class names in the manifest.
- csv / jsonl: one row / JSON object per image with ``path`` (relative to the list file's folder,
  or absolute), optional ``caption`` and ``label`` (integers as they are; otherwise class names,
  sorted, into the manifest); key = row index; json = ``path``, ``width``, ``height`` and every
  other column / field (a CSV cell written as a number as a JSON number; an empty cell left out).

Images are decoded once to check them: a missing or unreadable file is skipped and counted (the
list of skipped files is printed). The script prints each shard as it is closed and a summary.
Bad input (a missing folder or file, a list without a ``path`` column, a bad option) exits with
status 1 and one ``error:`` line naming the file and line.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import yaml
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusion_train.cli import UsageError, human_bytes, parse_bool, parse_key_values, run_main  # noqa: E402
from diffusion_train.data.fashion_mnist import CLASSES, Captioner, load_split  # noqa: E402
from diffusion_train.data.folder import _flatten_alpha, list_images  # noqa: E402
from diffusion_train.data.shards import IMAGE_FORMATS, encode_image, write_shards  # noqa: E402

CAPTIONS_CONFIG = Path(__file__).resolve().parent.parent / "conf" / "data" / "fashion_mnist_captions.yaml"
SOURCES = ("fashion_mnist", "folder", "csv", "jsonl")
KEPT_FORMATS = {"PNG": "png", "JPEG": "jpg", "MPO": "jpg"}  # PIL format -> member stored byte for byte


def _size(value: str) -> int:
    """Bytes: ``500M`` or ``1G`` in decimal units (as the sizes printed), ``512MiB`` or ``1GiB`` in binary ones."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:([kKmMgG])(i?))?[bB]?\s*", value)
    if not m:
        raise ValueError(value)
    power = {None: 0, "k": 1, "m": 2, "g": 3}[m.group(2) and m.group(2).lower()]
    return int(m.group(1)) * (1024 if m.group(3) else 1000) ** power


OPTIONS: dict[str, Callable[[str], Any]] = {
    "source": str, "out": str, "prefix": str, "max_count": int, "max_bytes": _size, "image_format": str,
    "val_size": int, "limit": int, "shuffle": int, "root": str, "path": str, "captions": str, "labels": str,
    "short_side": int,
}
DEFAULTS: dict[str, Any] = {
    "source": None, "out": None, "prefix": "train", "max_count": 10000, "max_bytes": 1 << 30, "image_format": "png",
    "val_size": None, "limit": None, "shuffle": None, "root": None, "path": None, "captions": "false",
    "labels": "auto", "short_side": None,
}


def parse_args(argv: list[str]) -> dict[str, Any]:
    opts = parse_key_values(argv, OPTIONS, DEFAULTS)
    if opts["source"] not in SOURCES:
        raise UsageError(f"set source= one of {', '.join(SOURCES)}" + (f" (got {opts['source']!r})"
                                                                       if opts["source"] else ""))
    if not opts["out"]:
        raise UsageError("set out=DIR (the folder to write the shards to)")
    if opts["image_format"] not in IMAGE_FORMATS:
        raise UsageError(f"image_format={opts['image_format']}: valid: {', '.join(IMAGE_FORMATS)}")
    if opts["prefix"] == "val" or not re.fullmatch(r"[\w-]+", opts["prefix"]):
        raise UsageError(f"prefix={opts['prefix']}: needs letters, digits, '_' or '-', and not 'val'")
    for key in ("max_count", "max_bytes", "limit", "short_side"):
        if opts[key] is not None and opts[key] < 1:
            raise UsageError(f"{key} must be positive, got {opts[key]}")
    if opts["val_size"] is None:
        opts["val_size"] = 1000 if opts["source"] == "fashion_mnist" else 0
    if opts["val_size"] < 0:
        raise UsageError(f"val_size must be >= 0, got {opts['val_size']}")
    if opts["labels"] not in ("auto", "true", "false"):
        raise UsageError(f"labels={opts['labels']}: valid: auto, true, false")
    need = {"folder": "root", "csv": "path", "jsonl": "path"}.get(opts["source"])
    if need and not opts[need]:
        raise UsageError(f"source={opts['source']} needs {need}=" + ("DIR" if need == "root" else "FILE"))
    return opts


@dataclass
class Item:
    """One image to write: pixels (Fashion-MNIST) or a file, with its label, caption and metadata."""
    key: str
    label: int | None = None
    caption: str | None = None
    caption_file: Path | None = None
    file: Path | None = None
    pixels: np.ndarray | None = None
    meta: dict | None = None
    name: str = ""  # how skip messages name it


@dataclass
class Source:
    train: list[Item]
    val: list[Item]
    class_names: list[str] | None = None
    description: str = ""
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (item name, reason)


def _key_width(n: int) -> int:
    return max(6, len(str(max(n - 1, 0))))


def _order(items: list, opts: dict, split: str = "") -> list:
    if opts["shuffle"] is not None:
        items = list(items)
        random.Random(f"{opts['shuffle']}/{split}").shuffle(items)
    return items


def _split_spread(items: list[Item], opts: dict) -> tuple[list[Item], list[Item]]:
    """(train, val): ``val_size`` items evenly spaced through the (shuffled, limited) list, the rest in order.

    Spacing them out gives each part of a sorted list, e.g. each class folder, its share of the validation
    set; the last N items of a sorted folder would all be of its last class."""
    items = _order(items, opts)[: opts["limit"]]
    n, n_val = len(items), opts["val_size"]
    if n_val >= n:
        raise ValueError(f"val_size={n_val} leaves no training items: there are {n}"
                         + (f" (limit={opts['limit']})" if opts["limit"] else ""))
    picked = {(2 * i + 1) * n // (2 * n_val) for i in range(n_val)}
    return [x for i, x in enumerate(items) if i not in picked], [x for i, x in enumerate(items) if i in picked]


def caption_templates(value: str) -> list[str] | None:
    """Templates of ``captions=``: none for false, the fashion_mnist_captions config's for true."""
    if "{name}" in value:
        return [value]
    try:
        wanted = parse_bool(value)
    except ValueError:
        raise UsageError(f"captions={value}: give true, false, or a template with {{name}}") from None
    if not wanted:
        return None
    return list(yaml.safe_load(CAPTIONS_CONFIG.read_text())["caption_templates"])


def fashion_mnist_source(opts: dict) -> Source:
    templates = caption_templates(opts["captions"])
    captioner = Captioner(templates, [c.lower() for c in CLASSES]) if templates else None
    splits = {}
    for split, n in (("train", None), ("test", opts["val_size"])):
        if n == 0:
            splits[split] = []
            continue
        images, labels = load_split(split, opts["root"])
        images, labels = images.numpy()[:n], labels.tolist()[:n]
        items = [Item(f"{split}_{i:06d}", labels[i], captioner(i, labels[i]) if captioner else None,
                      pixels=images[i], name=f"{split} image {i}") for i in range(len(images))]
        splits[split] = _order(items, opts, split)[: opts["limit"]]
    return Source(splits["train"], splits["test"], list(CLASSES), "Fashion-MNIST"
                  + (f", captions from {len(templates)} template(s)" if templates else ""))


def folder_source(opts: dict) -> Source:
    root = Path(opts["root"]).expanduser()
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise FileNotFoundError(f"root: image folder {root} {what}")
    entries = list_images(root)
    if not entries:
        raise FileNotFoundError(f"root: no images (.png .jpg .jpeg .webp .bmp) under {root}")
    loose = [img for img, _ in entries if "/" not in img]
    use_labels = {"true": True, "false": False, "auto": not loose}[opts["labels"]]
    if use_labels and loose:
        raise ValueError(f"labels={opts['labels']}: {len(loose)} of {len(entries)} images are not in a class "
                         f"subfolder, e.g. {root / loose[0]}; move them into root/<class>/ or set labels=false")
    if opts["labels"] == "auto" and loose and len(loose) < len(entries):
        raise ValueError(f"labels=auto: {len(entries) - len(loose)} images are in subfolders but {len(loose)} "
                         f"directly in {root} (e.g. {loose[0]}); set labels=false (no cls) or labels=true")
    class_names = sorted({img.split("/", 1)[0] for img, _ in entries}) if use_labels else None
    index = {name: i for i, name in enumerate(class_names or [])}
    width = _key_width(len(entries))
    items = [Item(f"{i:0{width}d}", index[img.split("/", 1)[0]] if use_labels else None,
                  caption_file=root / cap if cap else None, file=root / img, meta={"path": img}, name=img)
             for i, (img, cap) in enumerate(entries)]
    train, val = _split_spread(items, opts)
    what = f"{len(class_names)} classes" if class_names else "no class folders"
    return Source(train, val, class_names, f"image folder {root} ({len(entries)} images, {what})")


def _list_rows(path: Path, kind: str) -> list[tuple[int, dict]]:
    """(line number, row) of a CSV or JSONL list; ``path`` must be a column / field."""
    rows: list[tuple[int, dict]] = []
    if kind == "csv":
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            if "path" not in columns:
                raise ValueError(f"{path}:1: no 'path' column in the header (columns: {', '.join(columns) or 'none'})")
            for row in reader:
                if None in row:
                    raise ValueError(f"{path}:{reader.line_num}: more values than the {len(columns)} columns")
                rows.append((reader.line_num, {k: v for k, v in row.items() if v is not None}))
        return rows
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
            if "path" not in row:
                raise ValueError(f"{path}:{line_no}: no 'path' field (fields: {', '.join(row) or 'none'})")
            rows.append((line_no, row))
    return rows


def _labels(rows: list[tuple[int, dict]], path: Path) -> tuple[list[int] | None, list[str] | None]:
    """Labels of the rows: integers as they are, otherwise indices into the sorted class names."""
    if not any("label" in row for _, row in rows):
        return None, None
    raw = []
    for line, row in rows:
        value = row.get("label")
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ValueError(f"{path}:{line}: no label, but other rows have one")
        raw.append(value.strip() if isinstance(value, str) else value)
    if all((isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, str) and v.isdigit()) for v in raw):
        return [int(v) for v in raw], None
    names = sorted({str(v) for v in raw})
    index = {name: i for i, name in enumerate(names)}
    return [index[str(v)] for v in raw], names


_NUMBER = re.compile(r"[+-]?(?:(?:0|[1-9]\d*)(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_INTEGER = re.compile(r"[+-]?(?:0|[1-9]\d*)")


def _cell(text: str) -> Any:
    """A CSV cell as JSON would hold it: an int or a float when it is written as one (``007`` keeps its zeros as
    text), else the text."""
    value = text.strip()
    if _INTEGER.fullmatch(value):
        return int(value)
    return float(value) if _NUMBER.fullmatch(value) else text


def list_source(opts: dict) -> Source:
    path = Path(opts["path"]).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"path: {opts['source']} file {path} does not exist")
    rows = _list_rows(path, opts["source"])
    if not rows:
        raise ValueError(f"{path}: no rows")
    labels, class_names = _labels(rows, path)
    width = _key_width(len(rows))
    items = []
    for i, (line, row) in enumerate(rows):
        image = "" if row.get("path") is None else str(row["path"]).strip()
        if not image:
            raise ValueError(f"{path}:{line}: empty path")
        caption = row.get("caption")
        caption = str(caption).strip() if caption is not None else None
        extra = {k: v for k, v in row.items() if k not in ("path", "caption", "label")}
        if opts["source"] == "csv":  # cells are text: numbers as JSON numbers (filters and metadata read them)
            extra = {k: _cell(v) for k, v in extra.items() if v.strip()}
        items.append(Item(f"{i:0{width}d}", labels[i] if labels else None, caption or None,
                          file=path.parent / Path(image).expanduser(), meta={"path": image, **extra},
                          name=f"{path.name}:{line} {image}"))
    train, val = _split_spread(items, opts)
    what = f", {len(class_names)} classes" if class_names else (", integer labels" if labels else "")
    return Source(train, val, class_names, f"{opts['source']} list {path} ({len(rows)} rows{what})")


class Unreadable(Exception):
    pass


def read_image_file(path: Path, image_format: str, short_side: int | None = None) -> tuple[str, bytes, int, int]:
    """(extension, bytes, width, height) of an image file, decoded once to check it: PNG and JPEG
    bytes are kept as they are, other formats are re-encoded as ``image_format`` (EXIF rotation
    applied, transparency flattened onto white, RGB or grayscale). With ``short_side``, images whose
    short side is longer are resized to it (Lanczos) and re-encoded, so training decodes fewer
    pixels. The returned size is the original's, as displayed (after EXIF rotation)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise Unreadable("missing file") from None
    except OSError as e:
        raise Unreadable(f"{type(e).__name__}: {e}") from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF: stored turned by 90 degrees
                width, height = height, width
            kept = KEPT_FORMATS.get(img.format)
            shrink = short_side is not None and min(width, height) > short_side
            if kept and not shrink:
                if kept == "jpg":
                    img.draft(img.mode, (1, 1))  # decode at 1/8 scale: still reads (and checks) all the data
                img.load()
                return kept, data, width, height
            img = ImageOps.exif_transpose(img)
            if img.mode.startswith("I;16"):
                img = Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8))
            gray = img.mode in ("1", "L", "I", "F")
            img = _flatten_alpha(img).convert("L" if gray else "RGB")
            if shrink:
                scale = short_side / min(img.size)
                size = (max(short_side, round(img.width * scale)), max(short_side, round(img.height * scale)))
                img = img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
                fmt = kept or image_format
                return fmt, encode_image(np.asarray(img), fmt), width, height
            return image_format, encode_image(np.asarray(img), image_format), width, height
    except Exception as e:  # corrupt files raise a zoo of types (OSError, SyntaxError, ValueError, ...)
        raise Unreadable(f"{type(e).__name__}: {e}") from None


def to_sample(item: Item, image_format: str, short_side: int | None = None) -> dict:
    """The shard sample of ``item``; raises :class:`Unreadable` for a missing or corrupt file."""
    if item.pixels is not None:
        ext, data, meta = image_format, encode_image(item.pixels, image_format), item.meta
    else:
        ext, data, width, height = read_image_file(item.file, image_format, short_side)
        meta = {**(item.meta or {}), "width": width, "height": height}
        if short_side is not None and min(width, height) > short_side:  # a shrunk copy: the original's size also
            meta.update(original_width=width, original_height=height)  # as img2dataset names it (image:original_size)
    caption = item.caption
    if item.caption_file is not None:
        try:
            caption = item.caption_file.read_text(encoding="utf-8-sig", errors="replace").strip() or None
        except OSError as e:
            raise Unreadable(f"caption {item.caption_file.name}: {type(e).__name__}: {e}") from None
    return {"__key__": item.key, ext: data, "cls": item.label, "txt": caption, "json": meta}


def samples(items: Iterable[Item], image_format: str, skipped: list[tuple[str, str]],
            workers: int = min(8, os.cpu_count() or 1), short_side: int | None = None) -> Iterator[dict]:
    """Samples of ``items`` in order, prepared on ``workers`` threads (PIL decodes without the GIL);
    unreadable items are appended to ``skipped`` as (name, reason)."""
    def work(item: Item):
        try:
            return item, to_sample(item, image_format, short_side), None
        except Unreadable as e:
            return item, None, str(e)

    with ThreadPoolExecutor(workers, thread_name_prefix="shard-read") as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(work, item))
            while len(pending) > 4 * workers or (pending and pending[0].done()):
                item_, sample, reason = pending.popleft().result()
                if sample is None:
                    skipped.append((item_.name, reason))
                else:
                    yield sample
        while pending:
            item_, sample, reason = pending.popleft().result()
            if sample is None:
                skipped.append((item_.name, reason))
            else:
                yield sample


def make_shards(opts: dict, log: Callable[[str], None] = print) -> tuple[dict, list[tuple[str, str]]]:
    """Builds the source and writes its shards; returns (manifest, skipped items as (name, reason))."""
    build = {"fashion_mnist": fashion_mnist_source, "folder": folder_source, "csv": list_source,
             "jsonl": list_source}[opts["source"]]
    source = build(opts)
    log(f"{source.description}: {len(source.train)} train + {len(source.val)} val items -> {opts['out']}")
    start = time.perf_counter()
    manifest = write_shards(samples(source.train, opts["image_format"], source.skipped,
                                    short_side=opts["short_side"]), opts["out"],
                            opts["prefix"], opts["max_count"], opts["max_bytes"],
                            val_samples=samples(source.val, opts["image_format"], source.skipped,
                                                short_side=opts["short_side"]),
                            class_names=source.class_names,
                            on_shard=lambda s: log(f"  {s['path']}  {s['count']:7d} samples  {human_bytes(s['bytes'])}"))
    per_prefix: dict[str, list[int]] = {}
    for s in manifest["shards"]:
        counts = per_prefix.setdefault(s["path"].rsplit("-", 1)[0], [0, 0])
        counts[0] += s["count"]
        counts[1] += 1
    splits = ", ".join(f"{p}: {n} in {k} shard{'s' * (k != 1)}" for p, (n, k) in per_prefix.items())
    log(f"wrote {manifest['count']} samples ({splits}) in {time.perf_counter() - start:.1f} s; members "
        f"{', '.join(manifest['keys'])}; num_classes {manifest['num_classes']}; skipped {len(source.skipped)} "
        f"unreadable image{'s' * (len(source.skipped) != 1)}")
    for name, reason in source.skipped[:10]:
        log(f"  skipped {name}: {reason}")
    if len(source.skipped) > 10:
        log(f"  ... and {len(source.skipped) - 10} more")
    return manifest, source.skipped


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda args: make_shards(parse_args(args), log=lambda s: print(s, flush=True)), argv)


if __name__ == "__main__":
    sys.exit(main())
