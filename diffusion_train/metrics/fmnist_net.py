"""A small Fashion-MNIST classifier (``FMNISTNet``) whose penultimate features give FD-FMNIST, a
Fréchet distance for Fashion-MNIST-sized images, and whose head gives class accuracy.

Weights come from ``scripts/train_feature_net.py``; the safetensors file carries the architecture,
the test accuracy and the training settings in its metadata, so :meth:`FMNISTNet.load` needs only
the path.

Input rule: images (B, C, H, W) in [-1, 1] with C of 1 or 3 (RGB is reduced to luma,
0.299 R + 0.587 G + 0.114 B). 28x28 images are used as they are; 32x32 images are centre-cropped
to 28x28, which undoes the project's default 28 -> 32 black padding (``data.resize=pad``); any
other size is resized to 28x28 with antialiased bilinear interpolation (non-square images are
stretched).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_train.conditioning.weights import one_line, tensors_sha256
from diffusion_train.metrics.base import FeatureExtractor, no_tf32

SIZE = 28
NUM_CLASSES = 10
INPUT_RULE = "28x28 gray; 32x32 inputs centre-cropped"
META_KEY = "diffusion_train.fmnist_net"
LUMA = (0.299, 0.587, 0.114)


def to_input(images: Tensor) -> Tensor:
    """Images in [-1, 1] (B, C, H, W), C of 1 or 3, any size -> (B, 1, 28, 28) float32 (the input rule)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"FMNISTNet expects images (B, C, H, W) with C of 1 or 3, got shape {tuple(images.shape)}")
    x = images.float()
    if x.shape[1] == 3:
        x = (x * x.new_tensor(LUMA).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
    h, w = x.shape[-2:]
    if (h, w) == (SIZE + 4, SIZE + 4):
        x = x[..., 2:2 + SIZE, 2:2 + SIZE]
    elif (h, w) != (SIZE, SIZE):
        x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x.contiguous()


class FMNISTNet(FeatureExtractor):
    """CNN classifier for 28x28 grayscale Fashion-MNIST: conv blocks (3x3 conv, 2x2 max-pool,
    BatchNorm, ReLU) of ``channels``, a ``feature_dim`` fully connected layer (BatchNorm, ReLU) whose
    outputs are the features, dropout, and a 10-way linear head.

    ``forward`` / :meth:`logits` / :meth:`class_accuracy` are the inference API: eval mode, no
    grad, fp32 with autocast and TF32 off, the input rule of this module. :meth:`train_logits`
    is the training path (current mode, autograd, preprocessed 28x28 inputs).
    """

    name = "fmnist_net"

    def __init__(self, channels: Sequence[int] = (32, 64, 128), feature_dim: int = 128, dropout: float = 0.3):
        super().__init__()
        if not channels or any(int(c) <= 0 for c in channels) or feature_dim <= 0:
            raise ValueError(f"FMNISTNet needs positive channels and feature_dim, got {list(channels)}, {feature_dim}")
        self.config: dict[str, Any] = {"channels": [int(c) for c in channels], "feature_dim": int(feature_dim),
                                       "dropout": float(dropout)}
        self.feature_dim = int(feature_dim)
        layers: list[nn.Module] = []
        c_in, size = 1, SIZE
        for c in self.config["channels"]:
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(c),
                       nn.ReLU(inplace=True)]
            c_in, size = c, size // 2
        if size < 1:
            raise ValueError(f"FMNISTNet: {len(channels)} pooling blocks reduce 28x28 below 1x1")
        self.trunk = nn.Sequential(*layers, nn.Flatten())
        self.embed = nn.Sequential(nn.Linear(c_in * size * size, feature_dim, bias=False),
                                   nn.BatchNorm1d(feature_dim), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, NUM_CLASSES)
        self.metadata: dict[str, Any] = {}
        self.eval()

    def train_logits(self, x: Tensor) -> Tensor:
        """Logits of preprocessed (B, 1, 28, 28) inputs in the current mode, with autograd (training)."""
        return self.head(self.dropout(self.embed(self.trunk(x))))

    @contextmanager
    def _inference(self) -> Iterator[None]:
        was_training = self.training
        self.train(False)
        try:
            with torch.no_grad(), torch.autocast(self.head.weight.device.type, enabled=False), no_tf32():
                yield
        finally:
            self.train(was_training)

    def _features(self, images: Tensor) -> Tensor:
        device = self.head.weight.device
        return self.embed(self.trunk(to_input(images.to(device)))).float()

    def forward(self, images: Tensor) -> Tensor:
        """(B, ``feature_dim``) float32 penultimate features of images in [-1, 1]."""
        with self._inference():
            return self._features(images)

    def logits(self, images: Tensor) -> Tensor:
        """(B, 10) float32 class logits of images in [-1, 1]."""
        with self._inference():
            return self.head(self._features(images)).float()

    def class_accuracy(self, images: Tensor, labels: Tensor, batch_size: int = 500) -> float:
        """Share of ``images`` classified as their ``labels`` (evaluated ``batch_size`` at a time)."""
        labels = torch.as_tensor(labels).reshape(-1)
        if labels.numel() != images.shape[0]:
            raise ValueError(f"class_accuracy: {images.shape[0]} images but {labels.numel()} labels")
        if labels.numel() == 0:
            raise ValueError("class_accuracy: no images")
        correct = 0
        for x, y in zip(images.split(batch_size), labels.split(batch_size)):
            correct += int((self.logits(x).argmax(dim=1).cpu() == y.cpu()).sum())
        return correct / labels.numel()

    @property
    def provenance(self) -> dict[str, Any]:
        return {"extractor": self.name, "weights_sha256": tensors_sha256(self), "feature_dim": self.feature_dim,
                "input": INPUT_RULE, "architecture": json.dumps(self.config, sort_keys=True),
                "test_accuracy": self.metadata.get("test_accuracy")}

    def save(self, path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> Path:
        """Writes the weights (atomically) with the architecture and ``extra`` (e.g. ``test_accuracy``,
        ``training``: JSON-serializable values) in the safetensors metadata; returns the path."""
        from diffusion_train.files import atomic_save_file

        meta = {META_KEY: json.dumps(self.config), **{str(k): json.dumps(v) for k, v in (extra or {}).items()}}
        return atomic_save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, path, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> "FMNISTNet":
        """The net saved at ``path`` by :meth:`save`, in eval mode; one-line errors naming the path."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"FMNISTNet weights {str(path)!r} do not exist; train them with "
                                    f"'python scripts/train_feature_net.py out={path}'")
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = f.metadata() or {}
            if META_KEY not in raw:
                raise ValueError(f"no {META_KEY} metadata")
            meta = {k: json.loads(v) for k, v in raw.items()}
            net = cls(**meta.pop(META_KEY))
            net.load_state_dict(load_file(str(path), device=str(map_location)))
        except Exception as e:  # safetensors, json and shape errors alike
            raise ValueError(f"{path}: not a valid FMNISTNet weights file ({type(e).__name__}: {one_line(e)})") \
                from None
        net.metadata = meta
        return net.to(map_location).eval()
