"""Metrics of generated images: sample with fixed per-index seeds and conditioning, spread over ranks,
extract features, and compare them with a reference (Fréchet distance) and with the requested class."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from diffusion_train.conditioning.conditioner import select_inputs
from diffusion_train.diffusion import Sampler
from diffusion_train.metrics.base import FeatureExtractor
from diffusion_train.metrics.fid import FeatureStats, count_label, frechet_distance, metric_name


def rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@torch.no_grad()
def evaluate_generated(module, extractor: FeatureExtractor, sampler: Sampler, num_samples: int,
                       reference: tuple[Tensor, Tensor] | None = None, *, batch_size: int = 64,
                       guidance_scale: float = 1.0, seed: int = 0, labels: Sequence[int] | None = None,
                       prompts: Sequence[str] | None = None, guidance: dict | None = None,
                       keep: int = 0, clip=None,
                       stop: Callable[[], bool] | None = None) -> tuple[dict[str, float], Tensor | None] | None:
    """Metrics of ``num_samples`` images of ``module`` (a :class:`DiffusionModule`, in its current weights).

    Image i starts from the noise of seed ``seed + i`` with the i-th conditioning input (classes or
    ``prompts`` cycled, as ``diffusion-sample`` does), so the set is the same whatever the batch size
    and number of ranks; rank r makes images r, r + world, ... and the feature statistics and counts
    are summed over ranks (every rank must call this). Returns ``{metric: value}`` -- the Fréchet
    distance to ``reference`` (mean, covariance) under :func:`metric_name`, and for class-conditional
    models with an extractor that classifies (``logits``), ``class_accuracy/<extractor>_<n>``: the
    share of images classified as their requested class; with a ``clip`` (:class:`CLIPScore`) and a
    text-conditioned model, ``<clip.name>_<n>``: the mean CLIP score of the images against their
    prompts -- and, on rank 0, the first ``keep`` images.

    Every rank runs as many batches as the rank with the most images (one with fewer samples an unused image
    for each batch it lacks), since a sharded model's forward passes are collective. ``stop`` is asked before
    each batch; when it says yes, the evaluation ends there and returns None.

    An image with a NaN or inf pixel (a diverging model) does not stop a training run: it is counted
    (``nonfinite_images_<n>``, present when not 0), the Fréchet distance is NaN, and it counts as a miss for
    the class accuracy and as 0 for the CLIP score.
    """
    rank, world = rank_world()
    device = next(module.parameters()).device
    extractor = extractor.to(device)
    inputs = module.conditioner.sample_inputs(num_samples, labels, prompts)
    stats = FeatureStats(extractor.feature_dim, device=device)
    hits = torch.zeros(2, dtype=torch.float64, device=device)  # (classified as requested, labelled)
    scores = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of CLIP scores, images scored)
    nonfinite = torch.zeros((), dtype=torch.int64, device=device)  # images with a NaN or inf pixel
    if clip is not None:
        clip = clip.to(device)
    kept: list[Tensor] = []
    mine = list(range(rank, num_samples, world))
    for start in range(0, -(-num_samples // world), batch_size):  # the most images a rank has
        if stop is not None and stop():
            return None
        idx = mine[start:start + batch_size]
        # A rank with no image left still samples one, unused: a sharded (FSDP) model's forward is collective.
        images = module.sample_seeded(idx or mine[:1] or [0], inputs, sampler, guidance_scale, seed,
                                      **(guidance or {})).float()
        if not idx:
            continue
        batch = select_inputs(inputs, idx)
        finite = images.flatten(1).isfinite().all(dim=1)
        nonfinite += (~finite).sum()
        images = torch.where(finite[:, None, None, None], images, 0.0)  # the extractors see no NaN
        stats.update(extractor(images))
        if "label" in batch and hasattr(extractor, "logits"):
            requested = batch["label"].to(device)
            hits[0] += ((extractor.logits(images).argmax(dim=1) == requested) & finite).sum()
            hits[1] += len(idx)
        texts = next((v for v in batch.values() if isinstance(v, list) and v and isinstance(v[0], str)), None)
        if clip is not None and texts is not None:
            scores[0] += (clip(images, texts) * finite).sum()
            scores[1] += len(idx)
        if rank == 0 and sum(len(k) for k in kept) < keep:
            kept.append(images[:keep - sum(len(k) for k in kept)].cpu())
    stats.all_reduce()
    if world > 1:
        for total in (hits, scores, nonfinite):
            torch.distributed.all_reduce(total)
    metrics: dict[str, Any] = {}
    bad = int(nonfinite)
    if bad:
        metrics[f"nonfinite_images_{count_label(num_samples)}"] = bad
    if reference is not None:  # no distance of a set with a NaN image: NaN, and training goes on
        metrics[metric_name(extractor.name, num_samples)] = (
            math.nan if bad else frechet_distance(stats.mean(), stats.covariance(), *reference))
    if hits[1] > 0:
        metrics[f"class_accuracy/{extractor.name}_{count_label(num_samples)}"] = float(hits[0] / hits[1])
    if scores[1] > 0:
        metrics[f"{clip.name}_{count_label(num_samples)}"] = float(scores[0] / scores[1])
    return metrics, (torch.cat(kept) if kept else None)
