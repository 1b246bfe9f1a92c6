"""Autoencoders for latent diffusion: the diffusion model works on ``encode(images)`` and sampled
latents become images through ``decode``.

* :class:`Autoencoder`            - identity: pixel-space diffusion (the default);
* :class:`DiffusersAutoencoderKL` - a diffusers ``AutoencoderKL`` (SD, SDXL, SD3, FLUX VAEs) from a hub
  name or a local ``save_pretrained`` directory, or built from a config dict (tests, offline presets);
* :class:`TinyVAE`                - a small KL autoencoder of this package, trained with
  ``scripts/train_vae.py`` and loaded from its safetensors file (or random for tests).

Encoding is split in two so the expensive half can be precomputed (``scripts/precompute.py``)::

    moments = encode_moments(images)             # deterministic; KL VAEs: cat(mean, logvar) on channels
    latents = latents_from_moments(moments, g)   # posterior sample (seeded), then (z - shift) * scale
    images  = decode(latents)                    # z = latents / scale + shift -> decoder

Both run in float32 with autocast off, whatever the training precision. The autoencoder is frozen
(no gradients, eval mode, not in the optimizer); pretrained weights stay out of checkpoints, which
record the autoencoder's ``provenance`` (class, name, path, sha256) instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_train.conditioning.weights import (
    LOAD_ERRORS,
    hf_load_error,
    hf_provenance,
    keep_out_of_state_dict,
    loaded_provenance,
    sha256_files,
    tensors_sha256,
)
from diffusion_train.files import read_safetensors

__all__ = ["Autoencoder", "KLAutoencoder", "DiffusersAutoencoderKL", "TinyVAE", "TinyVAENet", "load_tiny_vae_net"]


def _fp32(fn):
    """Runs ``fn`` without gradients, with autocast off and float32 inputs."""

    def wrapper(self, x: Tensor, *args, **kwargs):
        with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
            return fn(self, x.float(), *args, **kwargs)

    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


class Autoencoder(nn.Module):
    """Identity: pixel-space diffusion. Subclasses map images to latents and back."""

    downsample = 1
    weights_external = False
    pixel_space = True  # the diffusion model sees images (denoised estimates may be clamped to [-1, 1])

    def latent_shape(self, channels: int, resolution: int) -> tuple[int, int]:
        """(latent channels, latent resolution) for images of ``channels`` x ``resolution``^2."""
        return channels, resolution

    def encode_moments(self, images: Tensor) -> Tensor:
        """The deterministic part of encoding (what ``scripts/precompute.py`` stores)."""
        return images.float()

    def latents_from_moments(self, moments: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return moments.float()

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.latents_from_moments(self.encode_moments(images), generator)

    def decode(self, latents: Tensor) -> Tensor:
        return latents.float()

    @property
    def provenance(self) -> dict[str, str]:
        return {"class": type(self).__name__, "name": "", "path": "", "sha256": ""}


def _factor(value: float | Sequence[float]) -> Tensor:
    """A scalar or per-channel factor as a (1 or C, 1, 1) float32 tensor."""
    return torch.as_tensor(value, dtype=torch.float32).reshape(-1, 1, 1)


class KLAutoencoder(Autoencoder):
    """An autoencoder with a diagonal Gaussian posterior; subclasses provide ``self.model`` and
    ``_moments`` / ``_decode``.

    Args:
        scale_factor, shift_factor: latents = (z - shift) * scale, so that they have about unit
            variance (SD: scale 0.18215; SDXL 0.13025; SD3 1.5305 / shift 0.0609). A float or one
            value per latent channel; ``None`` takes the value stored with the weights.
        sample_posterior: draw z from the posterior (``mean + std * noise``, seeded by the training
            step) as Stable Diffusion does; ``False`` uses the mean.
    """

    weights_external = True
    pixel_space = False

    def __init__(self, scale_factor: float | Sequence[float] | None = 1.0,
                 shift_factor: float | Sequence[float] | None = 0.0, sample_posterior: bool = True):
        super().__init__()
        self.sample_posterior = bool(sample_posterior)
        self.register_buffer("scale", _factor(1.0 if scale_factor is None else scale_factor), persistent=False)
        self.register_buffer("shift", _factor(0.0 if shift_factor is None else shift_factor), persistent=False)
        self.latent_channels = 0
        self._provenance = {"class": type(self).__name__, "name": "", "path": "", "sha256": ""}
        self.loaded_provenance: dict[str, str] | None = None  # what a loaded state dict recorded
        keep_out_of_state_dict(self, "model.")

    model: nn.Module

    def _moments(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def _decode(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def _finish_init(self, latent_channels: int, downsample: int, in_channels: int, provenance: Mapping[str, str],
                     pretrained: bool) -> None:
        self.latent_channels, self.downsample, self.in_channels = int(latent_channels), int(downsample), int(in_channels)
        self.weights_external = bool(pretrained)
        self._provenance.update({k: str(v) for k, v in provenance.items()})
        if not pretrained:  # random weights: identified by their bytes
            self._provenance["sha256"] = tensors_sha256(self.model)
        for name in ("scale", "shift"):
            n = getattr(self, name).shape[0]
            if n not in (1, self.latent_channels):
                raise ValueError(f"{type(self).__name__}: {name}_factor has {n} values for "
                                 f"{self.latent_channels} latent channels")
        self.model.requires_grad_(False)
        self.model.eval()

    def get_extra_state(self) -> dict[str, str]:
        return dict(self.provenance)

    def weights_replaced(self) -> None:
        """Random weights are identified by their bytes: after their tensors were copied in (``init.path``)."""
        if not self.weights_external:
            self._provenance["sha256"] = tensors_sha256(self.model)

    def set_extra_state(self, state: Any) -> None:
        if isinstance(state, Mapping):
            self.loaded_provenance = {str(k): str(v) for k, v in state.items()}
        keep = loaded_provenance(self.provenance, state, self.weights_external)
        self._provenance.update({k: v for k, v in keep.items() if k in self._provenance})

    @property
    def provenance(self) -> dict[str, str]:
        return {**self._provenance, "latent_channels": str(self.latent_channels), "downsample": str(self.downsample)}

    def train(self, mode: bool = True) -> "KLAutoencoder":
        super().train(mode)
        self.model.eval()  # frozen: always in eval mode
        return self

    def latent_shape(self, channels: int, resolution: int) -> tuple[int, int]:
        if channels != self.in_channels:
            raise ValueError(f"{type(self).__name__} {self._provenance['name']!r} encodes {self.in_channels}-channel "
                             f"images, the data has {channels} channels")
        if resolution % self.downsample:
            raise ValueError(f"{type(self).__name__}: data.resolution={resolution} is not divisible by the "
                             f"autoencoder's downsampling factor {self.downsample}")
        return self.latent_channels, resolution // self.downsample

    @_fp32
    def encode_moments(self, images: Tensor) -> Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, 2 * latent_channels, H/f, W/f): posterior mean and log-variance."""
        return self._moments(images)

    def latents_from_moments(self, moments: Tensor, generator: torch.Generator | None = None) -> Tensor:
        moments = moments.float()
        if moments.shape[1] != 2 * self.latent_channels:
            raise ValueError(f"{type(self).__name__}: moments have {moments.shape[1]} channels, expected "
                             f"{2 * self.latent_channels} (mean and log-variance of {self.latent_channels})")
        mean, logvar = moments.chunk(2, dim=1)
        z = mean
        if self.sample_posterior:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device if generator is None else
                                generator.device).to(mean.device)
            z = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise
        return (z - self.shift) * self.scale

    @_fp32
    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images in about [-1, 1]."""
        return self._decode(latents / self.scale + self.shift)


class DiffusersAutoencoderKL(KLAutoencoder):
    """A diffusers ``AutoencoderKL``.

    Args:
        name_or_path: hub id (e.g. ``stabilityai/sd-vae-ft-ema``; needs the weights in the local Hugging
            Face cache when offline) or a local ``save_pretrained`` directory.
        subfolder: e.g. ``vae`` for a full pipeline repository.
        config: ``AutoencoderKL`` arguments: builds a randomly initialised VAE instead of loading one.
        scale_factor, shift_factor, sample_posterior: see :class:`KLAutoencoder` (``None``: from the
            VAE's config, ``scaling_factor`` and ``shift_factor``).
    """

    def __init__(self, name_or_path: str | os.PathLike | None = None, subfolder: str | None = None,
                 scale_factor: float | Sequence[float] | None = None,
                 shift_factor: float | Sequence[float] | None = None, sample_posterior: bool = True,
                 config: Mapping[str, Any] | None = None):
        super().__init__(scale_factor, shift_factor, sample_posterior)
        try:
            from diffusers import AutoencoderKL
        except ImportError as e:
            raise ImportError("DiffusersAutoencoderKL needs diffusers: pip install 'diffusion_train[latent]'") from e
        cls = type(self).__name__
        if config is not None:
            self.model = AutoencoderKL(**dict(config))
            provenance = {"name": f"random AutoencoderKL {list(self.model.config.block_out_channels)}"}
        elif name_or_path is None:
            raise ValueError(f"{cls}: set name_or_path (hub id or local directory) or config")
        else:
            name = str(name_or_path)
            kwargs = {"subfolder": subfolder} if subfolder else {}
            try:
                self.model = AutoencoderKL.from_pretrained(name, torch_dtype=torch.float32, **kwargs)
            except LOAD_ERRORS as e:
                raise hf_load_error(cls, "VAE", name, e) from e
            local = Path(name).expanduser()
            provenance = hf_provenance(str(local / subfolder) if subfolder and local.is_dir() else name,
                                       f"{name}/{subfolder}" if subfolder else name)
        vae_cfg = self.model.config
        if scale_factor is None:
            self.scale = _factor(vae_cfg.scaling_factor)
        if shift_factor is None:
            self.shift = _factor(getattr(vae_cfg, "shift_factor", None) or 0.0)
        self._finish_init(vae_cfg.latent_channels, 2 ** (len(vae_cfg.block_out_channels) - 1), vae_cfg.in_channels,
                          provenance, pretrained=config is None)

    def _moments(self, images: Tensor) -> Tensor:
        dist = self.model.encode(images).latent_dist
        return torch.cat([dist.mean, dist.logvar], dim=1)

    def _decode(self, z: Tensor) -> Tensor:
        return self.model.decode(z).sample


# ----------------------------------------------------------------------------------------------
# TinyVAE: small enough to train on a CPU in minutes (scripts/train_vae.py)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class _ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.block = nn.Sequential(_norm(in_ch), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1),
                                   _norm(out_ch), nn.SiLU(), nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.block(x)


class TinyVAENet(nn.Module):
    """A small convolutional KL autoencoder: one residual block per level, stride-2 convolutions
    down and nearest-neighbour upsampling up; downsampling factor ``2 ** (len(channels) - 1)``."""

    def __init__(self, in_channels: int = 1, latent_channels: int = 4, channels: Sequence[int] = (32, 64, 64)):
        super().__init__()
        channels = [int(c) for c in channels]
        if not channels:
            raise ValueError("TinyVAENet needs at least one level in channels")
        self.config = {"in_channels": int(in_channels), "latent_channels": int(latent_channels), "channels": channels}
        enc: list[nn.Module] = [nn.Conv2d(in_channels, channels[0], 3, padding=1)]
        for i, ch in enumerate(channels):
            enc.append(_ResBlock(ch, ch))
            if i < len(channels) - 1:
                enc.append(nn.Conv2d(ch, channels[i + 1], 3, stride=2, padding=1))
        enc += [_norm(channels[-1]), nn.SiLU(), nn.Conv2d(channels[-1], 2 * latent_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv2d(latent_channels, channels[-1], 3, padding=1)]
        rev = channels[::-1]
        for i, ch in enumerate(rev):
            dec.append(_ResBlock(ch, ch))
            if i < len(rev) - 1:
                dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, rev[i + 1], 3, padding=1)]
        dec += [_norm(channels[0]), nn.SiLU(), nn.Conv2d(channels[0], in_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.config["channels"]) - 1)

    def moments(self, images: Tensor) -> Tensor:
        return self.encoder(images)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def loss(self, images: Tensor, generator: torch.Generator | None = None,
             kl_weight: float = 1e-4) -> tuple[Tensor, dict[str, Tensor]]:
        """Training loss: L1 + MSE reconstruction of a posterior sample, plus ``kl_weight`` x KL to N(0, I)
        (summed over latent elements, averaged over the batch and image elements)."""
        mean, logvar = self.moments(images).chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device)
        recon = self.decode(mean + torch.exp(0.5 * logvar) * noise)
        rec = F.l1_loss(recon, images) + F.mse_loss(recon, images)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3)).mean() / images[0].numel()
        return rec + kl_weight * kl, {"recon": rec.detach(), "kl": kl.detach()}

    def save(self, path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> Path:
        """Writes the weights with the architecture in the safetensors metadata (atomically)."""
        from diffusion_train.files import atomic_save_file

        meta = {"diffusion_train.tiny_vae": json.dumps(self.config),
                **{k: json.dumps(v) for k, v in (extra or {}).items()}}
        return atomic_save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, path, meta)


def load_tiny_vae_net(path: str | os.PathLike) -> tuple[TinyVAENet, dict[str, str]]:
    """A :class:`TinyVAENet` from a file written by :meth:`TinyVAENet.save`, and the file's metadata."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"TinyVAE weights {str(path)!r} do not exist; train them with "
                                f"'python scripts/train_vae.py out={path}' or set autoencoder.weights=null (random)")
    state, meta = read_safetensors(path, "autoencoder.weights")
    if "diffusion_train.tiny_vae" not in meta:
        raise ValueError(f"{path} is not a TinyVAE file (no diffusion_train.tiny_vae metadata)")
    net = TinyVAENet(**json.loads(meta["diffusion_train.tiny_vae"]))
    net.load_state_dict(state)
    return net, meta


class TinyVAE(KLAutoencoder):
    """A frozen :class:`TinyVAENet`: from ``weights`` (a file of ``scripts/train_vae.py``), or random
    with the given architecture when ``weights`` is null (tests; then kept in checkpoints).
    ``scale_factor=None`` / ``shift_factor=None`` take the values the training script measured and
    stored with the weights (1 / 0 for random weights)."""

    def __init__(self, weights: str | os.PathLike | None = None, in_channels: int = 1, latent_channels: int = 4,
                 channels: Sequence[int] = (32, 64, 64), scale_factor: float | Sequence[float] | None = None,
                 shift_factor: float | Sequence[float] | None = None, sample_posterior: bool = True):
        super().__init__(scale_factor, shift_factor, sample_posterior)
        if weights is None:
            self.model = TinyVAENet(in_channels, latent_channels, channels)
            provenance = {"name": f"random TinyVAE {list(self.model.config['channels'])}"}
        else:
            self.model, meta = load_tiny_vae_net(weights)
            if self.model.config["in_channels"] != in_channels:  # the data's channels: the images it will encode
                raise ValueError(f"autoencoder.weights={weights} encodes {self.model.config['in_channels']}-channel "
                                 f"images, the data has {in_channels} (autoencoder.in_channels, data.channels)")
            if scale_factor is None and "scale_factor" in meta:
                self.scale = _factor(json.loads(meta["scale_factor"]))
            if shift_factor is None and "shift_factor" in meta:
                self.shift = _factor(json.loads(meta["shift_factor"]))
            path = str(Path(weights).expanduser().resolve())
            provenance = {"name": Path(path).name, "path": path, "sha256": sha256_files([path])}
        cfg = self.model.config
        self._finish_init(cfg["latent_channels"], self.model.downsample, cfg["in_channels"], provenance,
                          pretrained=weights is not None)

    def _moments(self, images: Tensor) -> Tensor:
        return self.model.moments(images)

    def _decode(self, z: Tensor) -> Tensor:
        return self.model.decode(z)
