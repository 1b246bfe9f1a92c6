"""What every feature extractor of the metrics offers."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
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


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """TF32 off for float32 matmuls and cuDNN convolutions inside; the previous settings restored after."""
    backends = torch.backends
    try:
        precision = torch.get_float32_matmul_precision()
    except RuntimeError:  # precision set per backend (fp32_precision API): stay with that API
        precision = None
    if precision is not None:
        cudnn = backends.cudnn.allow_tf32
        torch.set_float32_matmul_precision("highest")
        backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(precision)
            backends.cudnn.allow_tf32 = cudnn
        return
    matmul, conv = backends.cuda.matmul.fp32_precision, backends.cudnn.conv.fp32_precision
    backends.cuda.matmul.fp32_precision, backends.cudnn.conv.fp32_precision = "ieee", "ieee"
    try:
        yield
    finally:
        backends.cuda.matmul.fp32_precision, backends.cudnn.conv.fp32_precision = matmul, conv
