"""Fréchet distances: feature statistics in float64, the distance itself, reference statistics with
provenance, metric names, and the registry of feature extractors.

Statistics are sums (count, sum, sum of outer products) in float64, so they do not depend on the
batch size or on how the samples are split across processes, and ranks combine them with one
``all_reduce``. A reference file (safetensors: ``mu``, ``sigma`` in float64) records what it was
computed from, and the feature extractor's provenance; loading it for another extractor (other
weights, another feature) is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import Tensor

from diffusion_train.metrics.base import FeatureExtractor

REFERENCE_FORMAT = "diffusion_train.fid_reference"
REFERENCE_VERSION = "1"
FID_EXTRACTOR = "inception_v3"  # the only extractor whose Fréchet distance is called FID


class FeatureStats:
    """Running count, sum and sum of outer products of (N, ``dim``) features, in float64.

    ``update`` adds a batch, ``merge`` another ``FeatureStats``, ``all_reduce`` sums over the
    processes of ``torch.distributed`` (every rank must call it). ``mean`` and ``covariance``
    (unbiased) are the statistics of all samples seen. The buffers live on ``device``: a CUDA device
    keeps the updates free of host syncs.
    """

    def __init__(self, dim: int, device: str | torch.device | None = None):
        if dim < 1:
            raise ValueError(f"FeatureStats: dim must be positive, got {dim}")
        self.dim = int(dim)
        self.num = torch.zeros((), dtype=torch.int64, device=device)
        self.sum = torch.zeros(self.dim, dtype=torch.float64, device=device)
        self.sum_outer = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=device)

    @property
    def device(self) -> torch.device:
        return self.sum.device

    @property
    def count(self) -> int:
        return int(self.num.item())

    def update(self, features: Tensor) -> "FeatureStats":
        """Adds a (B, dim) batch (cast to float64 first)."""
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"FeatureStats.update: expected (B, {self.dim}) features, got {tuple(features.shape)}")
        f = features.detach().to(device=self.device, dtype=torch.float64)
        self.num += f.shape[0]
        self.sum += f.sum(0)
        self.sum_outer += f.T @ f
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Adds the samples of ``other`` (same dim)."""
        if other.dim != self.dim:
            raise ValueError(f"FeatureStats.merge: dims differ ({self.dim} vs {other.dim})")
        self.num += other.num.to(self.device)
        self.sum += other.sum.to(self.device)
        self.sum_outer += other.sum_outer.to(self.device)
        return self

    def all_reduce(self) -> "FeatureStats":
        """Sums count, sum and outer products over all ranks when torch.distributed is initialized."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            for t in (self.num, self.sum, self.sum_outer):
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return self

    def mean(self) -> Tensor:
        n = self.count
        if n < 1:
            raise ValueError("FeatureStats.mean: no samples")
        return self.sum / n

    def covariance(self) -> Tensor:
        """Unbiased (N - 1) covariance, symmetric."""
        n = self.count
        if n < 2:
            raise ValueError(f"FeatureStats.covariance: needs at least 2 samples, got {n}")
        cov = (self.sum_outer - torch.outer(self.sum, self.sum) / n) / (n - 1)
        return (cov + cov.T) / 2

    def state_dict(self) -> dict[str, Tensor]:
        return {"count": self.num.clone(), "sum": self.sum.clone(), "sum_outer": self.sum_outer.clone()}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor], device: str | torch.device | None = None) -> "FeatureStats":
        stats = cls(int(state["sum"].shape[0]), device=device)
        stats.num += torch.as_tensor(state["count"]).to(stats.device, torch.int64)
        stats.sum += state["sum"].to(stats.device, torch.float64)
        stats.sum_outer += state["sum_outer"].to(stats.device, torch.float64)
        return stats


def _float64(x: Tensor | np.ndarray) -> Tensor:
    return torch.as_tensor(x).detach().to(torch.float64)


def _floored(w: Tensor) -> Tensor:
    """Eigenvalues of a PSD matrix with those at rounding level (below D x eps x the largest) set to 0:
    rank-deficient covariances (fewer samples than features) would otherwise add sqrt(noise) terms."""
    tol = w.shape[0] * torch.finfo(w.dtype).eps * w.abs().max()
    return torch.where(w > tol, w, torch.zeros_like(w))


def _psd_sqrt(s: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix."""
    w, v = torch.linalg.eigh((s + s.T) / 2)
    return (v * _floored(w).sqrt()) @ v.T


def frechet_distance(mu1: Tensor | np.ndarray, sigma1: Tensor | np.ndarray, mu2: Tensor | np.ndarray,
                     sigma2: Tensor | np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(s1) + tr(s2) - 2 tr(sqrt(s1 s2)), in float64.

    tr(sqrt(s1 s2)) is the sum of the square roots of the eigenvalues of the symmetric PSD matrix
    sqrt(s1) s2 sqrt(s1) (same spectrum as s1 s2); eigenvalues at rounding level (negative ones
    included) count as 0.
    """
    mu1 = _float64(mu1)
    mu2, s1, s2 = (_float64(x).to(mu1.device) for x in (mu2, sigma1, sigma2))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"frechet_distance: shapes do not match: mu {tuple(mu1.shape)} / {tuple(mu2.shape)}, "
                         f"sigma {tuple(s1.shape)} / {tuple(s2.shape)}")
    if not all(bool(torch.isfinite(t).all()) for t in (mu1, mu2, s1, s2)):
        raise ValueError("frechet_distance: statistics contain NaN or inf")
    root1 = _psd_sqrt(s1)
    m = root1 @ s2 @ root1
    tr_covmean = _floored(torch.linalg.eigvalsh((m + m.T) / 2)).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean)


# ----------------------------------------------------------------------------------------------
# reference statistics


class ReferenceMismatchError(ValueError):
    """Reference statistics were computed with another feature extractor, or from images of another size."""


def check_reference_images(path: str | os.PathLike, provenance: Mapping[str, Any], size: int,
                           resize: str | None = None) -> None:
    """Refuses a reference computed from images of another resolution than the ``size`` x ``size`` samples it is
    to be compared with, or brought to size another way (``resize``: the training data's ``data.resize``, e.g.
    Fashion-MNIST padded to 32 against a reference enlarged to 32). References record both; what one does not
    record, or a run without ``data.resize``, is taken as it is."""
    made = provenance.get("resolution")
    if made is not None and int(made) != int(size):
        raise ReferenceMismatchError(
            f"reference statistics {path} were computed from {made}x{made} images but the model makes {size}x{size} "
            f"samples: compute a reference at resolution={size} (scripts/fid_reference.py)")
    made = provenance.get("resize")
    if made is not None and resize is not None and str(made) != str(resize):
        raise ReferenceMismatchError(
            f"reference statistics {path} were computed from images brought to size with resize={made}, the model "
            f"learned images made with data.resize={resize}: compute a reference with resize={resize} "
            f"(scripts/fid_reference.py)")


def _json_normal(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True))


def save_reference(path: str | os.PathLike, stats: FeatureStats, provenance: Mapping[str, Any]) -> Path:
    """Writes ``mu`` and ``sigma`` (float64) to a safetensors file, atomically, with ``provenance``
    (json in the metadata). ``provenance["extractor"]`` must hold the extractor's provenance;
    ``count`` is taken from ``stats``."""
    from diffusion_train.files import atomic_save_file

    if not isinstance(provenance.get("extractor"), Mapping):
        raise ValueError("save_reference: provenance needs 'extractor': the feature extractor's provenance")
    count = stats.count
    if "count" in provenance and int(provenance["count"]) != count:
        raise ValueError(f"save_reference: provenance count {provenance['count']} but the statistics hold {count}")
    record = _json_normal({**provenance, "count": count})
    tensors = {"mu": stats.mean().cpu().contiguous(), "sigma": stats.covariance().cpu().contiguous()}
    return atomic_save_file(tensors, path, {"format": REFERENCE_FORMAT, "version": REFERENCE_VERSION,
                                            "provenance": json.dumps(record, sort_keys=True)})


def _differences(expected: Mapping[str, Any], found: Mapping[str, Any]) -> list[str]:
    return [f"{k} expected {expected.get(k)!r}, found {found.get(k)!r}"
            for k in sorted(set(expected) | set(found)) if expected.get(k) != found.get(k)]


def load_reference(path: str | os.PathLike, extractor_provenance: Mapping[str, Any]
                   ) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """(mu, sigma, provenance) of a reference file; refuses a reference made with another extractor,
    naming each differing provenance key."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics {path} do not exist; compute them with scripts/fid_reference.py")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            mu, sigma = f.get_tensor("mu"), f.get_tensor("sigma")
        if meta.get("format") != REFERENCE_FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}, not {REFERENCE_FORMAT!r}")
        provenance = json.loads(meta["provenance"])
    except Exception as e:  # noqa: BLE001 - any reader failure means the file is not a usable reference
        msg = " ".join(str(e).split())[:200] or type(e).__name__
        raise ValueError(f"reference statistics {path} are unreadable or not a reference file ({msg})") from None
    d = mu.shape[0] if mu.dim() == 1 else -1
    if d < 1 or sigma.shape != (d, d) or mu.dtype != torch.float64 or sigma.dtype != torch.float64:
        raise ValueError(f"reference statistics {path}: expected float64 mu (D,) and sigma (D, D), got "
                         f"{mu.dtype} {tuple(mu.shape)} and {sigma.dtype} {tuple(sigma.shape)}")
    diffs = _differences(_json_normal(dict(extractor_provenance)), provenance.get("extractor") or {})
    if diffs:
        raise ReferenceMismatchError(f"reference statistics {path} were computed with another feature extractor: "
                                     f"{'; '.join(diffs)}; recompute them with scripts/fid_reference.py")
    return mu, sigma, provenance


# ----------------------------------------------------------------------------------------------
# names and extractors


def count_label(n: int) -> str:
    """A sample count as metric names write it: 2000 -> 2k, 2500 -> 2.5k, 1234 -> 1234."""
    if n >= 1000 and n % 1000 == 0:
        return f"{n // 1000}k"
    if n >= 1000 and n % 100 == 0:
        return f"{n / 1000:g}k"
    return str(n)


def metric_name(extractor_name: str, num_samples: int) -> str:
    """``fid/inception_10k`` for Inception-v3 features (FID), ``fd/<name>_2k`` for any other
    extractor (never "fid"); ``_500`` for counts that are not whole thousands below 1000."""
    if num_samples < 1:
        raise ValueError(f"metric_name: num_samples must be positive, got {num_samples}")
    if extractor_name == FID_EXTRACTOR:
        return f"fid/inception_{count_label(num_samples)}"
    return f"fd/{extractor_name}_{count_label(num_samples)}"


def _inception(weights: str | None) -> FeatureExtractor:
    from diffusion_train.metrics.inception import InceptionV3

    return InceptionV3(weights_path=weights)


def _fmnist_net(weights: str | None) -> FeatureExtractor:
    from diffusion_train.metrics.fmnist_net import FMNISTNet

    return FMNISTNet.load(weights)


# name -> constructor from a weights path (None: the extractor's default, e.g. a download)
EXTRACTORS: dict[str, Callable[[str | None], FeatureExtractor]] = {
    "inception": _inception,
    "fmnist_net": _fmnist_net,
}
NEEDS_WEIGHTS = {"fmnist_net": "a file written by FMNISTNet.save or scripts/train_feature_net.py"}  # no default


def build_extractor(name: str, weights: str | os.PathLike | None = None, option: str = "weights") -> FeatureExtractor:
    """The feature extractor registered as ``name`` in :data:`EXTRACTORS`, loaded from ``weights``; ``option`` is
    what the caller's user sets them with, for the error when they are needed and missing."""
    if name not in EXTRACTORS:
        raise ValueError(f"unknown feature extractor {name!r}; valid: {', '.join(EXTRACTORS)}")
    if name in NEEDS_WEIGHTS and not weights:
        raise ValueError(f"extractor {name} needs {option}=PATH ({NEEDS_WEIGHTS[name]})")
    try:
        return EXTRACTORS[name](str(weights) if weights else None)
    except OSError as e:
        if weights or isinstance(e, ModuleNotFoundError):
            raise
        raise OSError(f"{e} with {option}=PATH") from None  # the default file could not be fetched
    except ModuleNotFoundError as e:
        raise ValueError(f"feature extractor {name!r} is not available ({e}); the evaluation extra "
                         f"(pip install diffusion_train[eval]) provides torchmetrics and torch-fidelity") from None
