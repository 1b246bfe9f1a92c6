"""Reference statistics (feature mean and covariance, float64) of a dataset for FID / Fréchet distances::

    python scripts/fid_reference.py out=refs/fmnist_train.safetensors dataset=fashion_mnist split=train \\
        extractor=inception weights=PATH [limit=N] [batch_size=256] [resolution=32] [resize=pad]
    python scripts/fid_reference.py out=refs/mine_train.safetensors dataset=shards sources=DIR split=train \\
        resolution=256 resize=crop extractor=inception weights=PATH

Every argument is ``key=value``:

    out         the safetensors file to write (required); written atomically
    dataset     fashion_mnist | shards (required)
    split       fashion_mnist: train | test; shards: the manifest prefix (train, val) (train)
    sources     shards: what data.sources takes: a folder with manifest.json, a brace pattern of tars
    root        fashion_mnist: a folder with the IDX files (default: the Debian package's)
    extractor   a name in diffusion_train.metrics.fid.EXTRACTORS: inception (FID; default) or fmnist_net
    weights     the extractor's weights file; inception without it downloads torch-fidelity's file
    resolution  the training resolution the images are brought to first, as the data module does (32)
    resize      fashion_mnist: pad | resize; shards: crop | pad (pad for fashion_mnist, crop for shards)
    limit       only the first N images, for quick trials (all)
    batch_size  images per extractor call (256)
    device      auto | cpu | cuda | cuda:N (auto: cuda when available)
    against     another reference made with the same extractor from images of the same size and resize:
                also prints the Fréchet distance between the two (e.g. the test split against the train
                split: the floor a model can reach); checked before the pass over the images

The file records its provenance (dataset, split, count, resolution, resize, extractor provenance
with the weights' sha256); evaluation refuses a reference made with another extractor. Bad input
exits with status 1 and one ``error:`` line.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusion_train.cli import UsageError, parse_key_values, resolve_device, run_main  # noqa: E402
from diffusion_train.metrics.fid import (EXTRACTORS, FeatureStats, build_extractor,  # noqa: E402
                                         check_reference_images, frechet_distance, load_reference, metric_name,
                                         save_reference)

DATASETS = ("fashion_mnist", "shards")
FMNIST_SIZE = 28  # Fashion-MNIST's own resolution: at it, neither pad nor resize changes an image
OPTIONS = {"out": str, "dataset": str, "split": str, "sources": str, "root": str, "extractor": str, "weights": str,
           "resolution": int, "resize": str, "limit": int, "batch_size": int, "device": str,
           "against": str}
DEFAULTS: dict[str, Any] = {"out": None, "dataset": None, "split": "train", "sources": None, "root": None,
                            "extractor": "inception", "weights": None, "resolution": 32, "resize": None,
                            "limit": None, "batch_size": 256, "device": "auto",
                            "against": None}


def parse_args(argv: list[str]) -> dict[str, Any]:
    opts = parse_key_values(argv, OPTIONS, DEFAULTS)
    if not opts["out"]:
        raise UsageError("set out=FILE.safetensors (the reference statistics to write)")
    if opts["dataset"] not in DATASETS:
        raise UsageError(f"set dataset= one of {', '.join(DATASETS)}"
                         + (f" (got {opts['dataset']!r})" if opts["dataset"] else ""))
    if opts["extractor"] not in EXTRACTORS:
        raise UsageError(f"extractor={opts['extractor']}: valid: {', '.join(EXTRACTORS)}")
    if opts["dataset"] == "fashion_mnist":
        opts["resize"] = opts["resize"] or "pad"
        if opts["split"] not in ("train", "test"):
            raise UsageError(f"split={opts['split']}: Fashion-MNIST has train and test")
        if opts["resize"] not in ("pad", "resize"):
            raise UsageError(f"resize={opts['resize']}: valid for fashion_mnist: pad, resize")
    else:
        opts["resize"] = opts["resize"] or "crop"
        if not opts["sources"]:
            raise UsageError("dataset=shards needs sources= (a shard folder with manifest.json, or a pattern)")
        if opts["resize"] not in ("crop", "pad"):
            raise UsageError(f"resize={opts['resize']}: valid for shards: crop, pad")
    for key in ("resolution", "limit", "batch_size"):
        if opts[key] is not None and opts[key] < 1:
            raise UsageError(f"{key} must be positive, got {opts[key]}")
    return opts


def fashion_mnist_batches(opts: dict[str, Any]) -> Iterator[Tensor]:
    """uint8 (B, 1, R, R) batches of a Fashion-MNIST split, brought to the resolution as the data module does."""
    from diffusion_train.data.fashion_mnist import load_split, to_resolution

    images, _ = load_split(opts["split"], opts["root"])
    images = images[: opts["limit"]]
    for i in range(0, images.shape[0], opts["batch_size"]):
        yield to_resolution(images[i: i + opts["batch_size"]], opts["resolution"], opts["resize"])


def shard_batches(opts: dict[str, Any], skipped: Counter) -> Iterator[Tensor]:
    """uint8 (B, 3, R, R) batches of the shards' images in shard order (centre crop or pad); samples
    that cannot be decoded are skipped and counted."""
    from diffusion_train.data.tar_io import tar_samples
    from diffusion_train.data.decode import SampleDecoder
    from diffusion_train.data.web import expand_shards

    decoder = SampleDecoder(opts["resolution"], channels=3, label_key=None, caption_key=None, resize=opts["resize"])
    limit, batch, seen = opts["limit"], [], 0
    for url in expand_shards(opts["sources"], opts["split"]):
        for sample in tar_samples(url, skipped):
            out = decoder(sample)
            if isinstance(out, str):
                skipped[out] += 1
                continue
            batch.append(out["image"])
            seen += 1
            if len(batch) == opts["batch_size"] or seen == limit:
                yield torch.stack(batch)
                batch = []
            if seen == limit:
                return
    if batch:
        yield torch.stack(batch)


def fid_reference(opts: dict[str, Any], log=print) -> dict[str, Any]:
    """Computes and writes the reference statistics; returns their provenance."""
    device = resolve_device(opts["device"])
    extractor = build_extractor(opts["extractor"], opts["weights"]).to(device)
    native = opts["dataset"] == "fashion_mnist" and opts["resolution"] == FMNIST_SIZE  # nothing brought to size
    resize = None if native else opts["resize"]
    if opts["against"]:  # before the pass over the images: the same features, and images of the same size
        mu, sigma, other = load_reference(opts["against"], extractor.provenance)
        check_reference_images(opts["against"], other, opts["resolution"], resize)
    stats, skipped, start = FeatureStats(extractor.feature_dim, device=device), Counter(), time.time()
    batches = fashion_mnist_batches(opts) if opts["dataset"] == "fashion_mnist" else shard_batches(opts, skipped)
    for images in batches:
        stats.update(extractor(images.to(device).float().div_(127.5).sub_(1.0)))
    count = stats.count
    if count < 2:
        raise ValueError(f"{opts['dataset']} {opts['split']}: {count} images; statistics need at least 2")
    provenance: dict[str, Any] = {"dataset": opts["dataset"], "split": opts["split"], "count": count,
                                  "resolution": opts["resolution"], "resize": resize,
                                  "extractor": extractor.provenance}
    if opts["dataset"] == "shards":
        provenance["sources"] = opts["sources"]
        provenance["skipped"] = dict(skipped)
    if opts["limit"]:
        provenance["limit"] = opts["limit"]
    save_reference(opts["out"], stats, provenance)
    sha = str(extractor.provenance.get("weights_sha256", ""))[:12]
    skipped_note = f", skipped {dict(skipped)}" if skipped else ""
    log(f"wrote {opts['out']}: {count} images of {opts['dataset']} {opts['split']} at {opts['resolution']}x"
        f"{opts['resolution']} ({opts['resize']}), {extractor.name} weights sha256 {sha}..., "
        f"{time.time() - start:.0f} s{skipped_note}")
    if opts["against"]:
        provenance["distance"] = frechet_distance(stats.mean(), stats.covariance(), mu, sigma)
        log(f"{metric_name(extractor.name, count)} of {opts['dataset']} {opts['split']} against {opts['against']} "
            f"({other['count']} images of {other.get('dataset')} {other.get('split')}): {provenance['distance']:.4f}")
    return provenance


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda args: fid_reference(parse_args(args)), argv)


if __name__ == "__main__":
    sys.exit(main())
