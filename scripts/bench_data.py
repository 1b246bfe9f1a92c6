"""Data-loading throughput of the webdataset training path (``diffusion_train/data/web.py``)::

    python scripts/bench_data.py                                  # both modes; main process and workers=2
    python scripts/bench_data.py mode=jpeg workers=1,2 seconds=20
    python scripts/bench_data.py mode=latent dir=/tmp/bench_shards profile=10

Every argument is ``key=value``:

    mode            jpeg | latent | all (all)
    workers         DataLoader worker counts to measure, comma separated (2); the stream iterated in the
                    main process (one reader, like one worker) is always measured first (workers=0: only it)
    seconds         timed seconds per measurement (20)
    warmup          batches per reader left out of the timing (2; a reader's first batch waits for its
                    shuffle buffer to fill)
    images          JPEG samples to write (2000)
    latents         latent samples to write (10000)
    per_shard       samples per shard (500)
    batch_size      (64)
    resolution      training resolution of the JPEG mode (256)
    short_side      JPEG mode: store the images with this short side (as ``make_shards.py short_side=N``
                    writes them; e.g. 256: decoding and a crop, no resampling); 0: as generated (0)
    shuffle_buffer  (1000)
    dir             folder for the shards (<dir>/jpeg, <dir>/latent), reused by later runs with the same
                    images / latents / per_shard / seed; default: a temporary folder, removed at the end
    seed            (0)
    profile         seconds of cProfile over the main-process loop of each mode; prints the top functions
                    by own time (0: off)

What is measured is what training runs: ``WebDataModule(...).train_stream()`` iterated in the main
process, and ``WebDataModule(...).train_dataloader()`` (a ``DataLoader(stream, batch_size=None,
num_workers=N)``) for N workers, with ``resampled=true``:

* ``mode=jpeg``: synthetic photo-like JPEGs (smooth random colour fields, shapes with hard edges and
  sensor-like noise; 512x384 and 384x512 mixed, quality 90, 40-70 kB each, 54 kB mean) with ``cls``
  and ``txt``, decoded by ``SampleDecoder(resolution, channels=3, caption_key="txt", flip=True)``: short side
  resized to ``resolution`` (Lanczos), centre crop, random flip, collated to uint8 batches.
* ``mode=latent``: samples of ``latent.npy`` (float16 (8, 32, 32): the moments of a 256 px image
  through an 8x VAE) and ``cls``, read with ``tensors={"latent": "latent.npy"}`` and no image.

Torch runs one thread in the main process (as in a DataLoader worker), so the main-process number is
the rate of one reader on one core. One line per measurement: samples/s in total and per reader,
batches, seconds, and whether the per-reader rate meets the targets of the throughput issue
(>= 1,500 JPEG samples/s and >= 20,000 latent samples/s per worker). Exits with status 1 and one
``error:`` line on a bad option; a missed target is reported, not an error.
"""

from __future__ import annotations

import cProfile
import io
import json
import os
import platform
import pstats
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusion_train.cli import UsageError, parse_key_values, run_main  # noqa: E402
from diffusion_train.data.shards import read_manifest, write_shards  # noqa: E402

MODES = ("jpeg", "latent")
TARGETS = {"jpeg": 1500.0, "latent": 20000.0}  # samples/s per worker (the throughput issue)
LATENT_SHAPE = (8, 32, 32)
NUM_CLASSES = 1000  # labels in cls
JPEG_QUALITY = 90
SIZES = ((512, 384), (384, 512))
OPTIONS: dict[str, Callable[[str], Any]] = {
    "mode": str, "workers": str, "seconds": float, "warmup": int, "images": int, "latents": int, "per_shard": int,
    "batch_size": int, "resolution": int, "shuffle_buffer": int, "dir": str, "seed": int, "profile": float,
    "short_side": int,
}
DEFAULTS: dict[str, Any] = {
    "mode": "all", "workers": "2", "seconds": 20.0, "warmup": 2, "images": 2000, "latents": 10000, "per_shard": 500,
    "batch_size": 64, "resolution": 256, "shuffle_buffer": 1000, "dir": None, "seed": 0, "profile": 0.0,
    "short_side": 0,
}
OBJECTS = ("dog", "cat", "house", "car", "tree", "mountain", "bowl of fruit", "bicycle", "boat", "street")
COLOURS = ("red", "blue", "green", "yellow", "white", "dark", "orange", "grey")
PLACES = ("in a field", "at sunset", "on a table", "in the city", "by the sea", "in the snow", "indoors")


def parse_args(argv: list[str]) -> dict[str, Any]:
    opts = parse_key_values(argv, OPTIONS, DEFAULTS)
    if opts["mode"] not in (*MODES, "all"):
        raise UsageError(f"mode={opts['mode']}: valid: {', '.join(MODES)}, all")
    try:
        opts["workers"] = [int(w) for w in str(opts["workers"]).split(",") if w.strip()]
    except ValueError:
        raise UsageError(f"workers={opts['workers']}: give worker counts separated by commas, e.g. 1,2") from None
    if any(w < 0 for w in opts["workers"]):
        raise UsageError(f"workers must be >= 0, got {opts['workers']}")
    opts["workers"] = [w for w in dict.fromkeys(opts["workers"]) if w > 0]
    for key in ("seconds", "images", "latents", "per_shard", "batch_size", "resolution", "shuffle_buffer"):
        if opts[key] <= 0:
            raise UsageError(f"{key} must be positive, got {opts[key]}")
    for key in ("warmup", "profile", "short_side"):
        if opts[key] < 0:
            raise UsageError(f"{key} must be >= 0, got {opts[key]}")
    return opts


def machine_line() -> str:
    import PIL
    import PIL.features
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    jpeg = PIL.features.version_codec("jpg") or "?"
    turbo = " (libjpeg-turbo)" if PIL.features.check_feature("libjpeg_turbo") else ""
    return (f"machine: {cpu}, {cores} cores usable ({os.cpu_count()} online); python {platform.python_version()}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} thread in the main process), "
            f"PIL {PIL.__version__} (libjpeg {jpeg}{turbo}), numpy {np.__version__}")


# ----------------------------------------------------------------------------------------------
# synthetic shards


def photo_like(rng: np.random.Generator, noise: np.ndarray, size: tuple[int, int], short_side: int = 0) -> bytes:
    """JPEG bytes (quality 90) of a photo-like image: a smooth random colour field, a few shapes with hard
    edges, a light blur and per-pixel noise (its strength drawn per image, which spreads the file sizes);
    with ``short_side``, resized (Lanczos) to that short side before encoding, as make_shards.py does."""
    w, h = size
    field = rng.integers(0, 256, (int(rng.integers(3, 7)), int(rng.integers(3, 7)), 3), dtype=np.uint8)
    img = Image.fromarray(field).resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 10))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(2, 8)))
    pixels = np.asarray(img.filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float32)
    top, left = int(rng.integers(0, noise.shape[0] - h)), int(rng.integers(0, noise.shape[1] - w))
    pixels += float(rng.uniform(5.0, 10.0)) * noise[top:top + h, left:left + w]
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if short_side and min(w, h) > short_side:
        scale = short_side / min(w, h)
        img = img.resize((max(short_side, round(w * scale)), max(short_side, round(h * scale))),
                         Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def caption(rng: np.random.Generator) -> str:
    return (f"a photo of a {COLOURS[rng.integers(len(COLOURS))]} {OBJECTS[rng.integers(len(OBJECTS))]} "
            f"{PLACES[rng.integers(len(PLACES))]}")


def jpeg_samples(count: int, seed: int, short_side: int = 0) -> Iterator[dict]:
    noise = np.random.default_rng([seed, 1]).standard_normal((1024, 1024, 3), dtype=np.float32)

    def one(i: int) -> dict:
        rng = np.random.default_rng([seed, 2, i])
        return {"__key__": f"{i:07d}", "jpg": photo_like(rng, noise, SIZES[i % 2], short_side),
                "cls": int(rng.integers(NUM_CLASSES)), "txt": caption(rng)}

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # PIL and numpy release the GIL
        yield from pool.map(one, range(count))


def latent_samples(count: int, seed: int) -> Iterator[dict]:
    rng = np.random.default_rng([seed, 3])
    for i in range(count):
        moments = rng.standard_normal(LATENT_SHAPE, dtype=np.float32).astype(np.float16)
        buf = io.BytesIO()
        np.save(buf, moments, allow_pickle=False)
        yield {"__key__": f"{i:07d}", "latent.npy": buf.getvalue(), "cls": int(rng.integers(NUM_CLASSES))}


def ensure_shards(mode: str, folder: Path, opts: dict) -> dict:
    """Shards of ``mode`` in ``folder``: those of an earlier run with the same settings, else new ones."""
    count = opts["images"] if mode == "jpeg" else opts["latents"]
    spec = {"mode": mode, "count": count, "per_shard": opts["per_shard"], "seed": opts["seed"], "version": 1,
            **({"short_side": opts["short_side"]} if mode == "jpeg" and opts["short_side"] else {})}
    stamp = folder / "bench.json"
    if stamp.is_file() and (folder / "manifest.json").is_file():
        try:
            if json.loads(stamp.read_text()) == spec:
                manifest = read_manifest(folder)
                print(f"shards: {mode}: reusing {manifest['count']} samples in {len(manifest['shards'])} shards "
                      f"({sum(s['bytes'] for s in manifest['shards']) / 1e6:.0f} MB) in {folder}", flush=True)
                return manifest
        except ValueError:
            pass
    stamp.unlink(missing_ok=True)
    start = time.perf_counter()
    samples = (jpeg_samples(count, opts["seed"], opts["short_side"]) if mode == "jpeg"
               else latent_samples(count, opts["seed"]))
    sizes: list[int] = []
    if mode == "jpeg":
        samples = (sizes.append(len(s["jpg"])) or s for s in samples)
    manifest = write_shards(samples, folder, max_count=opts["per_shard"])
    stamp.write_text(json.dumps(spec) + "\n")
    total = sum(s["bytes"] for s in manifest["shards"])
    shrink = f" resized to short side {opts['short_side']}" if opts["short_side"] else ""
    what = (f"JPEG {SIZES[0][0]}x{SIZES[0][1]} / {SIZES[1][0]}x{SIZES[1][1]}{shrink} q{JPEG_QUALITY}, "
            f"{np.mean(sizes) / 1e3:.0f} kB mean ({np.min(sizes) / 1e3:.0f}-{np.max(sizes) / 1e3:.0f})"
            if sizes else f"latent.npy float16 {LATENT_SHAPE}")
    print(f"shards: {mode}: wrote {manifest['count']} samples in {len(manifest['shards'])} shards "
          f"({total / 1e6:.0f} MB; {what}) in {time.perf_counter() - start:.1f} s to {folder}", flush=True)
    return manifest


# ----------------------------------------------------------------------------------------------
# measurement


def datamodule(mode: str, folder: Path, opts: dict, workers: int):
    from diffusion_train.data.web import WebDataModule

    common = dict(sources=str(folder), batch_size=opts["batch_size"], resampled=True,
                  shuffle_buffer=opts["shuffle_buffer"], num_workers=workers, seed=opts["seed"], label_key="cls",
                  num_classes=NUM_CLASSES)
    if mode == "jpeg":
        return WebDataModule(resolution=opts["resolution"], channels=3, caption_key="txt", flip=True, **common)
    return WebDataModule(resolution=LATENT_SHAPE[-1] * 8, tensors={"latent": "latent.npy"}, caption_key=None,
                         **common)


def check_batch(mode: str, batch: dict, opts: dict) -> None:
    if mode == "jpeg":
        shape, dtype = (opts["batch_size"], 3, opts["resolution"], opts["resolution"]), "image"
    else:
        shape, dtype = (opts["batch_size"], *LATENT_SHAPE), "latent"
    got = batch.get(dtype)
    # Batches leave the loader in their stored dtypes; finish_batch makes them float on the training device.
    stored = torch.uint8 if mode == "jpeg" else torch.float16
    if got is None or tuple(got.shape) != shape or got.dtype != stored:
        raise RuntimeError(f"{mode}: unexpected batch {dtype}: "
                           f"{None if got is None else (tuple(got.shape), got.dtype)}, expected {stored} {shape}")
    if batch["__skipped__"]:
        raise RuntimeError(f"{mode}: samples were skipped: {batch['__skipped__']}")


def measure(mode: str, batches: Iterator[dict], readers: int, opts: dict) -> dict:
    """Times ``opts['seconds']`` of batches after ``warmup`` x ``readers`` warm-up batches (at least one:
    the first batch waits for the shuffle buffer, and the workers' start)."""
    for _ in range(max(1, opts["warmup"] * readers)):
        check_batch(mode, next(batches), opts)
    count, start = 0, time.perf_counter()
    while True:
        batch = next(batches)
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= opts["seconds"]:
            break
    check_batch(mode, batch, opts)
    rate = count * opts["batch_size"] / elapsed
    return {"rate": rate, "per_reader": rate / readers, "batches": count, "seconds": elapsed}


def report(mode: str, label: str, result: dict) -> None:
    target = TARGETS[mode]
    verdict = "meets" if result["per_reader"] >= target else "MISSES"
    print(f"{mode:6s}  workers={label:<18s}  samples/s {result['rate']:9.0f}  per worker {result['per_reader']:9.0f}  "
          f"batches {result['batches']:6d}  seconds {result['seconds']:5.1f}  target >= {target:,.0f}/s per worker: "
          f"{verdict} ({result['per_reader'] / target:.2f}x)", flush=True)


def profile(mode: str, folder: Path, opts: dict, top: int = 15) -> None:
    batches = iter(datamodule(mode, folder, opts, 0).train_stream())
    next(batches)  # fill the shuffle buffer outside the profile
    profiler, count = cProfile.Profile(), 0
    start = time.perf_counter()
    profiler.enable()
    while time.perf_counter() - start < opts["profile"]:
        next(batches)
        count += 1
    profiler.disable()
    samples = count * opts["batch_size"]
    stats = pstats.Stats(profiler)
    total = stats.total_tt
    print(f"profile: {mode}: {samples} samples in {total:.1f} s under cProfile ({samples / total:.0f} samples/s); "
          f"top {top} by own time (us per sample, share):", flush=True)
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    for (file, line, func), (_, calls, own, cum, _) in rows:
        where = f"{Path(file).name}:{line}({func})" if line else func
        print(f"  {own / samples * 1e6:8.1f} us  {own / total:5.1%}  cum {cum / samples * 1e6:8.1f} us  "
              f"calls/sample {calls / samples:5.1f}  {where}", flush=True)


def bench(opts: dict) -> list[tuple[str, str, dict]]:
    import torch

    torch.set_num_threads(1)  # the main-process reader runs like one DataLoader worker, on one core
    print(machine_line(), flush=True)
    modes = MODES if opts["mode"] == "all" else (opts["mode"],)
    root = Path(opts["dir"]) if opts["dir"] else Path(tempfile.mkdtemp(prefix="bench_data_"))
    results = []
    try:
        for mode in modes:
            folder = root / mode
            ensure_shards(mode, folder, opts)
            result = measure(mode, iter(datamodule(mode, folder, opts, 0).train_stream()), 1, opts)
            report(mode, "0 (main process)", result)
            results.append((mode, "0", result))
            for workers in opts["workers"]:
                loader = datamodule(mode, folder, opts, workers).train_dataloader()
                batches = iter(loader)
                result = measure(mode, batches, workers, opts)
                del batches, loader  # shuts the workers down
                report(mode, str(workers), result)
                results.append((mode, str(workers), result))
            if opts["profile"]:
                profile(mode, folder, opts)
    finally:
        if not opts["dir"]:
            shutil.rmtree(root, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda args: bench(parse_args(args)), argv)


if __name__ == "__main__":
    sys.exit(main())
