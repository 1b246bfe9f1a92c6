"""ControlNet (Zhang et al. 2023): a trainable copy of a frozen backbone's first half, fed a control image (edges,
depth, pose, ...), whose outputs reach the backbone through zero-initialised projections. At the start every
projection is zero, so the controlled model computes exactly what the base model does.

* U-Net: copies of the timestep/class embedding, ``conv_in``, the down blocks and the middle block. A small
  convolutional encoder brings the control image to the latent grid and adds it to the copy's ``conv_in``
  output; 1x1 zero convolutions add the copy's outputs to the base's skips and middle output.
* DiT: copies of the patch and conditioning embedders and of the first ``depth`` blocks (half by default). The
  control image, patch-embedded at the token grid through a zero-initialised convolution, is added to the
  copy's tokens; zero-initialised linear layers add each copy block's output to the base block's.
* diffusers U-Net (``model=diffusers_unet``): diffusers' own ``ControlNetModel.from_unet``.

The control image comes at the images' resolution (``cond.control``), whatever the latent grid.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_train.conditioning.cond import Cond
from diffusion_train.models.diffusers_backbones import DiffusersUNet, text_inputs
from diffusion_train.models.dit import DiT
from diffusion_train.models.layers import context_from_cond, input_with_image
from diffusion_train.models.unet import UNet


def zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _factor(image_size: int, latent_size: int) -> int:
    factor = image_size // latent_size
    if factor < 1 or image_size != factor * latent_size or factor & (factor - 1):
        raise ValueError(f"finetune.controlnet: the image size {image_size} must be a power-of-2 multiple of the "
                         f"latent size {latent_size}")
    return factor


class HintEncoder(nn.Module):
    """Control image (B, Cc, f*H, f*W) -> (B, out_channels, H, W): 3x3 convolutions with SiLU, one stride-2
    convolution per halving, and a zero-initialised last convolution."""

    def __init__(self, control_channels: int, out_channels: int, factor: int, width: int = 32):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(control_channels, width, 3, padding=1), nn.SiLU()]
        for _ in range(int(math.log2(factor))):
            layers += [nn.Conv2d(width, width, 3, padding=1, stride=2), nn.SiLU()]
        layers.append(zero(nn.Conv2d(width, out_channels, 3, padding=1)))
        self.net = nn.Sequential(*layers)

    def forward(self, control: Tensor) -> Tensor:
        return self.net(control)


class UNetControlNet(nn.Module):
    def __init__(self, base: UNet, control_channels: int, image_size: int):
        super().__init__()
        self.in_channels, self.context_dim = base.in_channels, base.context_dim
        self.control_shape = (int(control_channels), int(image_size), int(image_size))
        self.cond_embedder, self.conv_in = copy.deepcopy(base.cond_embedder), copy.deepcopy(base.conv_in)
        self.down, self.middle = copy.deepcopy(base.down), copy.deepcopy(base.middle)
        self.hint = HintEncoder(control_channels, base.conv_in.out_channels, _factor(image_size, base.input_size))
        self.zero_convs = nn.ModuleList(zero(nn.Conv2d(c, c, 1)) for c in [*base.skip_channels,
                                                                           base.middle_channels])

    @torch.no_grad()
    def copy_base(self, base: UNet) -> None:
        """The copied parts take the base's current weights (after the base was loaded from a checkpoint)."""
        for name in ("cond_embedder", "conv_in", "down", "middle"):
            getattr(self, name).load_state_dict(getattr(base, name).state_dict())

    def forward(self, x: Tensor, t: Tensor, cond: Cond) -> list[Tensor]:
        """The residuals of :meth:`UNet.forward`: one per skip, then the middle's."""
        emb = self.cond_embedder(t, cond)
        context, mask = context_from_cond(cond, self.context_dim, x.shape[0])
        h = self.conv_in(input_with_image(x, cond, self.in_channels, "ControlNet")) + self.hint(cond.control.to(x))
        outs = [h]
        for block in self.down:
            h = block(h, emb, context, mask)
            outs.append(h)
        outs.append(self.middle(h, emb, context, mask))
        return [z(o) for z, o in zip(self.zero_convs, outs)]


class DiTControlNet(nn.Module):
    def __init__(self, base: DiT, control_channels: int, image_size: int, depth: int | None = None):
        super().__init__()
        depth = len(base.blocks) // 2 if depth is None else int(depth)
        if not 1 <= depth <= len(base.blocks):
            raise ValueError(f"finetune.depth must be in 1..{len(base.blocks)}, got {depth}")
        for name in ("in_channels", "context_dim", "patch_size", "grid_size", "hidden_size"):
            setattr(self, name, getattr(base, name))
        self.control_shape = (int(control_channels), int(image_size), int(image_size))
        self.x_embedder, self.cond_embedder = copy.deepcopy(base.x_embedder), copy.deepcopy(base.cond_embedder)
        self.register_buffer("pos_embed", base.pos_embed.clone(), persistent=False)
        self._pos_embed_cache: dict[tuple, Tensor] = {}
        self.blocks = copy.deepcopy(base.blocks[:depth])
        stride = base.patch_size * _factor(image_size, base.input_size)
        self.control_embedder = zero(nn.Conv2d(control_channels, base.hidden_size, stride, stride=stride))
        self.zero_linears = nn.ModuleList(zero(nn.Linear(base.hidden_size, base.hidden_size)) for _ in range(depth))

    @torch.no_grad()
    def copy_base(self, base: DiT) -> None:
        """The copied parts take the base's current weights (after the base was loaded from a checkpoint)."""
        for name in ("x_embedder", "cond_embedder"):
            getattr(self, name).load_state_dict(getattr(base, name).state_dict())
        for mine, theirs in zip(self.blocks, base.blocks):
            mine.load_state_dict(theirs.state_dict())

    def forward(self, x: Tensor, t: Tensor, cond: Cond) -> list[Tensor]:
        """The residuals of :meth:`DiT.forward`: one per copied block."""
        h, c, context, mask, _ = DiT.stem(self, x, t, cond)  # the base's stem, on this copy's embedders
        h = h + self.control_embedder(cond.control.to(x)).flatten(2).transpose(1, 2)
        outs = []
        for block, z in zip(self.blocks, self.zero_linears):
            h = block(h, c, context, mask)
            outs.append(z(h))
        return outs


class DiffusersControlNet(nn.Module):
    """diffusers' ``ControlNetModel`` made from a :class:`DiffusersUNet`'s U-Net (``from_unet``: the encoder's copy,
    zero convolutions), its control-image encoder downsampling as many times as the latents are smaller than the
    images. The text mask does not reach it (diffusers' ControlNet takes none); ``cond.vector`` goes in as class
    labels when the U-Net has a class embedding, as it does for the U-Net."""

    COPIED = ("conv_in", "time_proj", "time_embedding", "class_embedding", "add_embedding", "down_blocks", "mid_block")

    def __init__(self, base: DiffusersUNet, control_channels: int, image_size: int):
        super().__init__()
        from diffusers import ControlNetModel

        halvings = int(math.log2(_factor(image_size, base.input_size)))
        widths = (16, 32, 96, 256, 256, 256, 256)[: halvings + 1]
        self.net = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=widths,
                                             conditioning_channels=control_channels)
        self.in_channels, self.context_dim, self.uses_vector = base.in_channels, base.context_dim, base.uses_vector
        self.cond_dim = base.cond_dim
        self.control_shape = (int(control_channels), int(image_size), int(image_size))

    @torch.no_grad()
    def copy_base(self, base: DiffusersUNet) -> None:
        for name in self.COPIED:
            mine, theirs = getattr(self.net, name, None), getattr(base.unet, name, None)
            if isinstance(mine, nn.Module) and isinstance(theirs, nn.Module):
                mine.load_state_dict(theirs.state_dict())

    def forward(self, x: Tensor, t: Tensor, cond: Cond) -> list[Tensor]:
        """The residuals of :meth:`DiffusersUNet.forward`: one per down-block output, then the middle's."""
        x = input_with_image(x, cond, self.in_channels, "ControlNet")
        context, _ = text_inputs(cond, x, self.context_dim)
        labels = cond.vector if self.uses_vector else None  # the class embedding it copied, as the U-Net gets them
        down, middle = self.net(x, t, encoder_hidden_states=context, controlnet_cond=cond.control.to(x),
                                class_labels=labels, return_dict=False)
        return [*down, middle]


def make_controlnet(backbone: nn.Module, control_channels: int, image_size: int, depth: int | None = None) -> nn.Module:
    if isinstance(backbone, UNet):
        return UNetControlNet(backbone, control_channels, image_size)
    if isinstance(backbone, DiT):
        return DiTControlNet(backbone, control_channels, image_size, depth)
    if isinstance(backbone, DiffusersUNet):
        return DiffusersControlNet(backbone, control_channels, image_size)
    raise ValueError(f"finetune=controlnet supports the UNet, DiT and diffusers U-Net backbones, not "
                     f"{type(backbone).__name__}")


class Controlled:
    """What the training step calls for a ControlNet fine-tune: the backbone with the ControlNet's residuals
    (scaled by ``scale``) when ``cond.control`` is given, else the backbone alone."""

    def __init__(self, net, controlnet: nn.Module):
        self.net, self.controlnet, self.scale = net, controlnet, 1.0

    def __call__(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        if cond is None or cond.control is None:
            return self.net(x, t, cond)
        residuals = self.controlnet(x, t, cond)
        if self.scale != 1.0:
            residuals = [r * self.scale for r in residuals]
        return self.net(x, t, cond, residuals=residuals)


class ControlSource:
    """The control image of a batch: its ``key`` (an image in [-1, 1]), or the ``detector``'s map of its images."""

    DETECTORS = {"sobel": 1}  # detector -> the channels of its maps

    def __init__(self, key: str | None = None, detector: str | None = "sobel", channels: int | None = None):
        if key is None and detector not in self.DETECTORS:
            raise ValueError(f"finetune.detector: give one of {', '.join(self.DETECTORS)} or a finetune.control_key, "
                             f"got {detector!r}")
        if key is None and channels is not None and channels != self.DETECTORS[detector]:
            raise ValueError(f"finetune.control_channels={channels}, but finetune.detector={detector} makes "
                             f"{self.DETECTORS[detector]}-channel maps")
        self.key, self.detector = key, detector

    def __call__(self, batch: dict) -> Tensor:
        if self.key is not None:
            if self.key not in batch:
                raise KeyError(f"finetune.control_key: the batch has no {self.key!r} (keys: {sorted(batch)})")
            return batch[self.key]
        if "image" not in batch:
            raise KeyError(f"finetune.detector={self.detector} makes control images from the batch's 'image', which "
                           f"it lacks (precomputed latents?): give finetune.control_key")
        return sobel_edges(batch["image"])


def _sobel_kernels(device: torch.device) -> Tensor:
    """The x and y Sobel kernels (2, 1, 3, 3), made on ``device`` from device arithmetic: a tensor made from host
    data would be a blocking copy to a GPU in every step."""
    diff = torch.linspace(-1.0, 1.0, 3, device=device)  # [-1, 0, 1]
    kx = (2 - diff.abs())[:, None] * diff[None, :]  # [1, 2, 1] x [-1, 0, 1]
    return torch.stack([kx, kx.t()])[:, None]


def sobel_edges(images: Tensor) -> Tensor:
    """Edge maps of (B, C, H, W) images in [-1, 1]: the Sobel gradient magnitude of their grey level, each
    image scaled to its own maximum, as (B, 1, H, W) in [-1, 1] (-1: flat)."""
    grey = images.float().mean(dim=1, keepdim=True)
    grad = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), _sobel_kernels(images.device))
    mag = grad.square().sum(dim=1, keepdim=True).sqrt()
    mag = mag / mag.amax(dim=(2, 3), keepdim=True).clamp(min=1e-6)
    return mag * 2 - 1
