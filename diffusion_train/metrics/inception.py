"""Inception-v3 pool features for FID: torch-fidelity's network (the one torchmetrics' FID uses),
with its weights loaded safely from a local file.

torch-fidelity reads its weights with ``torch.load(weights_only=False)``, which would run code from
an untrusted file; here the network is built without weights and the file is read with
``weights_only=True`` and checked against the network's keys and shapes before loading.
"""

from __future__ import annotations

import functools
import io
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffusion_train.conditioning.weights import one_line, sha256_files
from diffusion_train.metrics.base import FeatureExtractor, no_tf32

INPUT_SIZE = 299
_BUILD_ONLY = "diffusion_train:build_only"


@functools.lru_cache(maxsize=None)
def _network_class() -> type:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Network(FeatureExtractorInceptionV3):
        """torch-fidelity's Inception-v3 built with random weights: its constructor gets a stand-in
        state dict instead of reading a weights file or downloading one."""

        def __init__(self) -> None:
            buffer = io.BytesIO()
            torch.save({_BUILD_ONLY: True}, buffer)
            buffer.seek(0)
            super().__init__("inception-v3-compat", ["2048"], feature_extractor_weights_path=buffer)

        def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
            if _BUILD_ONLY in state_dict:
                return None
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

        def train(self, mode: bool = True) -> "Network":
            return super().train(False)

    return Network


def random_network() -> torch.nn.Module:
    """torch-fidelity's Inception-v3 with random (default-init) weights, e.g. to save a weights file for tests."""
    return _network_class()()


def download_weights() -> Path:
    """torch-fidelity's Inception-v3 weights in the torch hub cache, downloaded when not there yet."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    path = Path(torch.hub.get_dir()) / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[-1]
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(URL_INCEPTION_V3, str(path))
        except Exception as e:  # noqa: BLE001 - any network failure: point to the offline setting
            raise OSError(f"could not download the Inception-v3 FID weights from {URL_INCEPTION_V3} "
                          f"({type(e).__name__}: {one_line(e)}); on machines without internet copy the file "
                          f"and give its path") from None
    return path


def read_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    """The state dict in ``path``, read with ``weights_only=True``; one-line errors naming the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Inception-v3 weights file {path} does not exist; give the path of torch-fidelity's "
                                f"weights-inception-2015-12-05-6726825d.pth")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, OSError) as e:
        raise ValueError(f"Inception-v3 weights file {path} cannot be read as a state dict with weights_only=True "
                         f"({type(e).__name__}: {one_line(e, 160)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"Inception-v3 weights file {path} does not hold a state dict of tensors "
                         f"(found {type(state).__name__})")
    return state


def check_weights(path: str | os.PathLike, state: dict[str, Tensor], network: torch.nn.Module) -> None:
    """Raises a one-line ValueError naming ``path`` unless ``state`` has ``network``'s keys and shapes."""
    expected = network.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"Inception-v3 weights file {path} does not match torch-fidelity's Inception-v3: "
                         f"{len(missing)} missing keys{f' (first {missing[0]})' if missing else ''}, "
                         f"{len(unexpected)} unexpected keys{f' (first {unexpected[0]})' if unexpected else ''}")
    for k, t in expected.items():
        if state[k].shape != t.shape:
            raise ValueError(f"Inception-v3 weights file {path}: {k} has shape {tuple(state[k].shape)}, "
                             f"expected {tuple(t.shape)}")


def to_uint8_rgb(images: Tensor) -> Tensor:
    """Float images in [-1, 1], (B, 1 or 3, H, W) -> uint8 (B, 3, H, W) in 0..255 (rounded, as saved images are)."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (B, 1 or 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"expected float images in [-1, 1], got {images.dtype}")
    if not bool(torch.isfinite(images).all()):
        raise ValueError("images contain NaN or inf")
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class InceptionV3(FeatureExtractor):
    """2048-d pool features of the FID Inception-v3 (torch-fidelity's port of the TensorFlow graph).

    Images in [-1, 1] of any size with 1 or 3 channels are rounded to uint8 RGB and resized to
    299x299 by the network itself (TensorFlow 1.x bilinear, as in the original FID). Inference runs
    in fp32, in eval mode, without grad, with autocast and TF32 off. ``weights_path`` is a local copy
    of ``weights-inception-2015-12-05-6726825d.pth``; ``None`` downloads it into the torch hub cache.
    """

    name = "inception_v3"
    feature_dim = 2048

    def __init__(self, weights_path: str | os.PathLike | None = None):
        super().__init__()
        path = Path(weights_path).expanduser() if weights_path else download_weights()
        state = read_weights(path)
        with torch.device("meta"):  # no random init: every tensor comes from the file
            net = _network_class()()
        check_weights(path, state, net)
        net.load_state_dict(state, assign=True)
        self.net = net.float().requires_grad_(False).eval()
        self.weights_path = str(path)
        self.weights_sha256 = sha256_files([path])

    def train(self, mode: bool = True) -> "InceptionV3":
        return super().train(False)

    @property
    def provenance(self) -> dict[str, Any]:
        return {"extractor": self.name, "weights_sha256": self.weights_sha256, "feature": "2048",
                "input": f"uint8 RGB, TensorFlow 1.x bilinear resize to {INPUT_SIZE}x{INPUT_SIZE}",
                "network": "torch_fidelity FeatureExtractorInceptionV3"}

    def forward(self, images: Tensor) -> Tensor:
        """(B, 1 or 3, H, W) float images in [-1, 1] -> (B, 2048) float32 features."""
        device = next(self.net.parameters()).device
        x = to_uint8_rgb(images.to(device))
        with torch.no_grad(), torch.autocast(device.type, enabled=False), no_tf32():
            self.net.eval()
            (features,) = self.net(x)
        return features.float()
