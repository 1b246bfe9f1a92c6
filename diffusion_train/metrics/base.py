"""What every feature extractor of the metrics offers."""

from __future__ import annotations

from typing import Any

from torch import nn


class FeatureExtractor(nn.Module):
    """Images -> features for Fréchet distances.

    ``forward`` takes float images in [-1, 1], (B, C, H, W) with C of 1 or 3 and any size, does its own
    resizing and channel conversion, runs in fp32 with autocast off and TF32 off, and returns (B,
    ``feature_dim``) float32 features. ``name`` names the extractor in metric names (``fid/...`` for
    ``inception_v3``, ``fd/<name>_...`` for any other) and in reference statistics; ``provenance``
    (extractor name, weights file and its sha256, input size, ...) must match between a reference and
    the extractor it is compared with.
    """

    name: str = ""
    feature_dim: int = 0

    @property
    def provenance(self) -> dict[str, Any]:
        raise NotImplementedError
