"""Reads webdataset tar shards and reports what they hold and what is wrong with them::

    python scripts/inspect_shards.py shards/fmnist                                   # a folder with manifest.json
    python scripts/inspect_shards.py 'shards/fmnist/train-{000000..000005}.tar' grid=grid.png n=64
    python scripts/inspect_shards.py 'shards/fmnist/*.tar'                           # a glob, or one .tar file

Shards compressed with gzip (``.tar.gz``) are read as the trainer reads them.

The first argument is a shard folder (its ``manifest.json`` lists the shards; counts and sizes are
compared with it), a brace pattern (``{000000..000003}`` ranges keep their zero padding,
``{a,b}`` lists), a glob or one tar file; then ``key=value`` options:

    grid   write a PNG grid of the first ``n`` decodable images there (resized and center-cropped
           to their most common size, or to 64x64 when no size repeats)
    n      images in the grid (64)

Every image is decoded (JPEGs at 1/8 scale, which still reads all their data). The report gives
the samples per shard and in total, the member extensions and how many samples have each, image
sizes, caption lengths (``txt``), the label histogram (``cls``, with the manifest's class names)
and the bad samples by reason with the first keys (``shard/key``) of each:

    missing image       no png/jpg/jpeg/webp/bmp/gif/tif/ppm member
    undecodable image   PIL cannot decode the image
    truncated member    the tar ends inside a member (reading that shard stops there)
    tar read error      a shard that cannot be opened, has a corrupt header, or ends without the
                        end-of-archive marker (cut at a member boundary)
    missing shard       a shard named by the manifest or the pattern does not exist
    duplicate key       a key seen before (in any shard), or a member twice in one sample
    bad cls / bad txt / bad json   not an integer (or outside the manifest's num_classes) /
                        not UTF-8 / not a JSON object

Exit status: 0 when nothing is wrong, 1 when the report lists problems (or counts that differ from
the manifest), 2 with one ``error:`` line for bad arguments or when no shard can be found.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import math
import re
import sys
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from braceexpand import braceexpand
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusion_train.cli import UsageError, human_bytes  # noqa: E402
from diffusion_train.data.shards import MANIFEST, read_manifest  # noqa: E402
from diffusion_train.data.tar_io import GZIP_MAGIC  # noqa: E402

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff", "ppm")
SHOW = 5  # keys shown per problem




def resolve_shards(target: str) -> tuple[list[Path], dict | None]:
    """(shard paths, manifest or None) of a folder, a brace pattern, a glob or a file."""
    path = Path(target).expanduser()
    if path.is_dir() or path.name == MANIFEST:
        folder = path.parent if path.name == MANIFEST else path
        manifest = read_manifest(path)
        return [folder / s["path"] for s in manifest["shards"]], manifest
    if "{" in target:
        paths = [Path(p).expanduser() for p in braceexpand(target)]
        if not any(p.is_file() for p in paths):
            raise FileNotFoundError(f"none of the {len(paths)} shards of {target} exist")
        return paths, None
    if any(c in target for c in "*?["):
        paths = [Path(p) for p in sorted(glob.glob(str(path)))]
        if not paths:
            raise FileNotFoundError(f"no file matches {target}")
        return paths, None
    if not path.exists():
        raise FileNotFoundError(f"{target} does not exist")
    return [path], None


def split_name(name: str) -> tuple[str, str]:
    """``dir/000123.seg.png`` -> ("dir/000123", "seg.png"), as webdataset groups members."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


@dataclass
class Sample:
    key: str
    shard: str
    members: dict[str, bytes] = field(default_factory=dict)
    problems: set[str] = field(default_factory=set)


class Scan:
    """Statistics and problems of the shards read so far."""

    def __init__(self, num_classes: int | None = None, grid_size: int = 0):
        self.num_classes, self.grid_size = num_classes, grid_size
        self.shards: list[tuple[str, int, int | None]] = []  # (name, samples, file bytes or None)
        self.samples = self.bad_samples = 0
        self.keys: set[str] = set()
        self.exts: Counter = Counter()
        self.sizes: Counter = Counter()
        self.labels: Counter = Counter()
        self.caption_chars: Counter = Counter()  # length -> number of captions
        self.caption_words = 0
        self.problems: Counter = Counter()
        self.examples: dict[str, list[str]] = {}
        self.grid: list[Image.Image] = []

    def problem(self, reason: str, where: str) -> None:
        self.problems[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < SHOW:
            shown.append(where)

    def finish(self, s: Sample) -> None:
        self.samples += 1
        if s.key in self.keys:
            s.problems.add("duplicate key")
        self.keys.add(s.key)
        self.exts.update(list(s.members))
        if "truncated member" not in s.problems:
            self._check(s)
        for reason in sorted(s.problems):
            self.problem(reason, f"{s.shard}/{s.key}")
        self.bad_samples += bool(s.problems)

    def _check(self, s: Sample) -> None:
        image = next((e for e in IMAGE_EXTS if e in s.members), None)
        if image is None:
            s.problems.add("missing image")
        else:
            try:
                with Image.open(io.BytesIO(s.members[image])) as img:
                    self.sizes[img.size] += 1
                    keep = len(self.grid) < self.grid_size
                    if img.format == "JPEG" and not keep:
                        img.draft(img.mode, (1, 1))
                    img.load()
                    if keep:
                        img = ImageOps.exif_transpose(img)
                        self.grid.append(img.convert("L" if img.mode in ("1", "L", "I", "F") else "RGB"))
            except Exception:  # corrupt data raises OSError, SyntaxError, ValueError, ...
                s.problems.add("undecodable image")
        if "cls" in s.members:
            try:
                label = int(s.members["cls"].decode("ascii").strip())
                if label < 0 or (self.num_classes is not None and label >= self.num_classes):
                    raise ValueError(label)
                self.labels[label] += 1
            except ValueError:  # UnicodeDecodeError is one too
                s.problems.add("bad cls")
        if "txt" in s.members:
            try:
                text = s.members["txt"].decode("utf-8")
                self.caption_chars[len(text)] += 1
                self.caption_words += len(text.split())
            except UnicodeDecodeError:
                s.problems.add("bad txt")
        if "json" in s.members:
            try:
                if not isinstance(json.loads(s.members["json"]), dict):
                    raise ValueError("not an object")
            except ValueError:
                s.problems.add("bad json")

    def read_shard(self, path: Path) -> None:
        name, before = path.name, self.samples
        if not path.is_file():
            self.problem("missing shard", str(path))
            self.shards.append((name, 0, None))
            return
        try:
            with open(path, "rb") as raw:
                gzipped = raw.read(len(GZIP_MAGIC)) == GZIP_MAGIC
                raw.seek(0)
                self._read_tar(gzip.GzipFile(fileobj=raw) if gzipped else raw, name)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            self.problem("tar read error", f"{name} ({type(e).__name__}: {e})")
        self.shards.append((name, self.samples - before, path.stat().st_size))

    def _read_tar(self, f, name: str) -> None:
        """The samples of one tar stream (``f`` a seekable file, the gzip reader of a .tar.gz)."""
        current: Sample | None = None
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    key, ext = split_name(info.name)
                    if current is None or key != current.key:
                        if current is not None:
                            self.finish(current)
                        current = Sample(key, name)
                    try:
                        data = tar.extractfile(info).read()
                    except (tarfile.TarError, OSError, EOFError, zlib.error):
                        current.problems.add("truncated member")
                        break
                    if ext in current.members:
                        current.problems.add("duplicate key")
                    current.members[ext] = data
                else:  # read to the end: a complete tar has (at least one) zero block there
                    f.seek(tar.offset)
                    end = f.read(tarfile.BLOCKSIZE)
                    if len(end) < tarfile.BLOCKSIZE or end.strip(b"\0"):
                        what = "a corrupt header" if len(end) == tarfile.BLOCKSIZE else "no end-of-archive marker"
                        self.problem("tar read error", f"{name} ({what} at byte {tar.offset}; truncated?)")
        finally:
            if current is not None:
                self.finish(current)


def _median(counts: Counter) -> float:
    """Median of the values counted in ``counts`` (value -> occurrences)."""
    n, seen = sum(counts.values()), 0
    values = sorted(counts)
    lo = hi = None
    for v in values:
        seen += counts[v]
        if lo is None and seen >= (n + 1) // 2:
            lo = v
        if seen >= n // 2 + 1:
            hi = v
            break
    return (lo + hi) / 2


def report(scan: Scan, manifest: dict | None, print_=print) -> int:
    """Prints the report; returns the number of problems (manifest mismatches included)."""
    mismatches = 0
    listed = {s["path"].rsplit("/", 1)[-1]: s for s in manifest["shards"]} if manifest else {}
    print_(f"shards: {len(scan.shards)}")
    for name, count, size in scan.shards:
        note = ""
        if name in listed and (listed[name]["count"], listed[name]["bytes"]) != (count, size):
            note = f"   manifest: {listed[name]['count']} samples, {listed[name]['bytes']} bytes"
            mismatches += 1
        print_(f"  {name}  {count:8d} samples  {human_bytes(size) if size is not None else '-':>9}{note}")
    note = ""
    if manifest and manifest["count"] != scan.samples:
        note = f" (manifest: {manifest['count']})"
        mismatches += 1
    print_(f"total: {scan.samples} samples{note}, {scan.samples - scan.bad_samples} good")
    n = max(scan.samples, 1)
    print_("members: " + (", ".join(f"{ext} {c} ({100 * c / n:.1f}%)" for ext, c in sorted(scan.exts.items()))
                          or "none"))
    if manifest and sorted(scan.exts) != sorted(manifest["keys"]):
        print_(f"  manifest keys: {', '.join(manifest['keys'])}")
        mismatches += 1
    if scan.sizes:
        top = scan.sizes.most_common(5)
        more = len(scan.sizes) - len(top)
        print_("image sizes (WxH): " + ", ".join(f"{w}x{h} {c}" for (w, h), c in top)
               + (f", {more} other sizes" if more else ""))
    n_txt = sum(scan.caption_chars.values())
    if n_txt:
        chars = scan.caption_chars
        mean = sum(k * c for k, c in chars.items()) / n_txt
        print_(f"captions: {n_txt} ({100 * n_txt / n:.1f}% of samples), characters min {min(chars)} / median "
               f"{_median(chars):g} / mean {mean:.1f} / max {max(chars)}, words mean "
               f"{scan.caption_words / n_txt:.1f}, empty {chars.get(0, 0)}")
    if scan.labels:
        names = (manifest or {}).get("class_names") or []
        print_(f"labels: {sum(scan.labels.values())} samples, {len(scan.labels)} distinct"
               + (f" of num_classes {manifest['num_classes']}" if manifest and manifest.get("num_classes") else ""))
        rows = sorted(scan.labels.items()) if len(scan.labels) <= 30 else scan.labels.most_common(20)
        for label, c in rows:
            name = f" {names[label]}" if label < len(names) else ""
            print_(f"  {label:4d}{name}: {c}")
        if len(scan.labels) > 30:
            print_(f"  ... {len(scan.labels) - 20} more; fewest samples: {min(scan.labels.values())}")
    if scan.problems:
        print_(f"problems: {scan.bad_samples} bad sample{'s' * (scan.bad_samples != 1)} of {scan.samples}")
        for reason, c in scan.problems.most_common():
            print_(f"  {reason}: {c}  e.g. {', '.join(scan.examples[reason])}" + (" ..." if c > SHOW else ""))
    else:
        print_("problems: none")
    return sum(scan.problems.values()) + mismatches


def grid_tensor(images: list[Image.Image]):
    """The images as one (N, C, H, W) float tensor in [-1, 1]: resized and center-cropped to their most
    common size (64x64 when no size repeats), RGB unless all are grayscale."""
    import numpy as np
    import torch

    (size, count), = Counter(img.size for img in images).most_common(1)
    if count == 1 and len(images) > 1:
        size = (64, 64)
    mode = "L" if all(img.mode == "L" for img in images) else "RGB"
    arrays = []
    for img in images:
        img = img.convert(mode)
        if img.size != size:
            img = ImageOps.fit(img, size, Image.Resampling.LANCZOS)
        arr = np.asarray(img, dtype=np.uint8)
        arrays.append(arr[..., None] if arr.ndim == 2 else arr)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def parse_args(argv: list[str]) -> tuple[str, dict]:
    target, opts = None, {"grid": None, "n": 64}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in opts:
            try:
                opts[key] = int(value) if key == "n" else value
            except ValueError:
                raise UsageError(f"{arg}: n must be an integer") from None
        elif target is None and not (sep and re.fullmatch(r"\w+", key)):
            target = arg
        else:
            raise UsageError(f"unexpected argument {arg!r}")
    if target is None:
        raise UsageError("give the shards: a folder with manifest.json, a pattern like "
                         "'dir/train-{000000..000003}.tar', or a .tar file")
    if opts["n"] < 1:
        raise UsageError(f"n must be positive, got {opts['n']}")
    return target, opts


def main(argv: list[str] | None = None) -> int:
    try:
        target, opts = parse_args(list(sys.argv[1:] if argv is None else argv))
        paths, manifest = resolve_shards(target)
    except (UsageError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        if isinstance(e, UsageError):
            print("usage: python scripts/inspect_shards.py DIR|PATTERN|FILE.tar [grid=out.png] [n=64]", file=sys.stderr)
        return 2
    scan = Scan(manifest.get("num_classes") if manifest else None, opts["n"] if opts["grid"] else 0)
    for path in paths:
        scan.read_shard(path)
    problems = report(scan, manifest)
    if opts["grid"]:
        if scan.grid:
            from diffusion_train.training.images import save_grid

            images = grid_tensor(scan.grid)
            out = save_grid(images, opts["grid"], ncol=math.ceil(math.sqrt(len(images))))
            print(f"grid: wrote {out} ({len(images)} images at {images.shape[-1]}x{images.shape[-2]})")
        else:
            print("grid: no decodable image to show")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
