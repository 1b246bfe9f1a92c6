"""ADM-style U-Net with scale-shift timestep conditioning, self-attention and optional text cross-attention."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_train.conditioning.cond import Cond
from diffusion_train.models.layers import (
    GEGLU,
    Attention,
    CondEmbedder,
    CrossAttention,
    context_from_cond,
    input_with_image,
)

log = logging.getLogger(__name__)


def group_norm(channels: int, num_groups: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= ``num_groups`` that divides ``channels``."""
    groups = max(g for g in range(1, min(num_groups, channels) + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv, scale-shift embedding injection, SiLU-dropout-zero Conv, residual."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, num_groups: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_ch, num_groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_ch))
        self.norm2 = group_norm(out_ch, num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x: (B, in_ch, H, W), emb: (B, emb_dim) -> (B, out_ch, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """GroupNorm then self-attention over the H*W positions, added residually.

    The attention's output projection is zero-initialised, so the block starts as identity.
    """

    def __init__(self, channels: int, num_heads: int, num_groups: int) -> None:
        super().__init__()
        self.norm = group_norm(channels, num_groups)
        self.attn = Attention(channels, num_heads)
        nn.init.zeros_(self.attn.proj.weight)
        nn.init.zeros_(self.attn.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        b, c, height, width = x.shape
        tokens = self.norm(x).reshape(b, c, height * width).transpose(1, 2)
        out = self.attn(tokens).transpose(1, 2).reshape(b, c, height, width)
        return x + out


class TransformerBlock(nn.Module):
    """Pre-norm transformer layer: self-attention, cross-attention over the context, GEGLU MLP.

    Each sub-layer is ``x + f(LayerNorm(x))``; the feed-forward is GEGLU with hidden width
    ``4 * dim``.
    """

    def __init__(self, dim: int, num_heads: int, context_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = CrossAttention(dim, context_dim, num_heads)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(GEGLU(dim, 4 * dim), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: (B, N, dim), context: (B, L, context_dim), mask: (B, L) -> (B, N, dim)."""
        x = x + self.attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), context, mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Stable-Diffusion-style transformer over the H*W positions with cross-attention to a context.

    GroupNorm -> linear proj_in -> ``depth`` :class:`TransformerBlock` -> linear proj_out, added
    residually to the input. proj_out is zero-initialised, so the block starts as identity.
    """

    def __init__(self, channels: int, num_heads: int, context_dim: int, depth: int, num_groups: int) -> None:
        super().__init__()
        self.norm = group_norm(channels, num_groups)
        self.proj_in = nn.Linear(channels, channels)
        self.blocks = nn.ModuleList(TransformerBlock(channels, num_heads, context_dim) for _ in range(depth))
        self.proj_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W), context: (B, L, context_dim), mask: (B, L) -> (B, C, H, W)."""
        b, c, height, width = x.shape
        h = self.proj_in(self.norm(x).reshape(b, c, height * width).transpose(1, 2))
        for block in self.blocks:
            h = block(h, context, mask)
        h = self.proj_out(h).transpose(1, 2).reshape(b, c, height, width)
        return x + h


class Downsample(nn.Module):
    """Stride-2 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class EmbedSequential(nn.Sequential):
    """Sequential that hands the embedding to its ResBlocks and the context to its SpatialTransformers."""

    def forward(  # type: ignore[override]
        self, x: Tensor, emb: Tensor, context: Tensor | None = None, mask: Tensor | None = None
    ) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                if context is None:
                    raise ValueError("SpatialTransformer needs a context tensor")
                x = layer(x, context, mask)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """ADM-style U-Net for (B, in_channels, H, W) inputs, H and W multiples of 2**(len(channel_mult)-1).

    Each level ``i`` has ``model_channels * channel_mult[i]`` channels and ``num_res_blocks``
    ResBlocks in the encoder (``num_res_blocks + 1`` in the decoder, which consumes the
    concatenated skips); levels except the last are followed by a 2x down/upsampling.
    Self-attention with ``num_heads`` heads (or, with ``num_head_channels``, heads of that width: as many as
    the level's channels hold, as in SD 2 and ADM's ImageNet models) follows every ResBlock of a level whose
    feature map resolution is in ``attention_resolutions`` and always sits in the middle block.
    The timestep (and ``cond.vector`` if ``cond_dim > 0``) embedding is 4*model_channels wide.
    ``input_size`` is the (square) training size: ``attention_resolutions`` are resolutions of its
    feature maps, and the attention stays at those levels for other input shapes.

    With ``context_dim > 0`` each of those self-attention blocks (middle included) is replaced by
    a Stable-Diffusion-style :class:`SpatialTransformer` of ``transformer_depth`` layers
    (self-attention, cross-attention to ``cond.context`` (B, L, context_dim) with key mask
    ``cond.mask``, GEGLU feed-forward), whose zero-initialised proj_out makes it start as identity.
    An untrained model outputs exactly zeros (zero-initialised output convolution).
    """

    def __init__(
        self,
        *,
        input_size: int,
        in_channels: int,
        model_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        num_heads: int = 4,
        num_head_channels: int | None = None,
        dropout: float = 0.0,
        cond_dim: int = 0,
        out_channels: int | None = None,
        num_groups: int = 32,
        context_dim: int = 0,
        transformer_depth: int = 1,
    ) -> None:
        super().__init__()
        channel_mult = list(channel_mult)
        attention_resolutions = list(attention_resolutions)
        factor = 2 ** (len(channel_mult) - 1)
        if input_size % factor:
            raise ValueError(
                f"input_size={input_size} must be divisible by {factor} (2**(len(channel_mult)-1), "
                f"channel_mult={channel_mult})"
            )
        if context_dim < 0:
            raise ValueError(f"context_dim must be >= 0, got {context_dim}")
        if transformer_depth < 1:
            raise ValueError(f"transformer_depth must be >= 1, got {transformer_depth}")
        self.input_size, self.in_channels = input_size, in_channels
        self.size_multiple = factor  # inputs' height and width must be multiples of this
        self.context_dim = context_dim
        self.out_channels = out_channels if out_channels is not None else in_channels
        emb_dim = 4 * model_channels
        self.cond_embedder = CondEmbedder(emb_dim, cond_dim)

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, dropout, num_groups)

        def attn(ch: int) -> nn.Module:
            heads = num_heads
            if num_head_channels:
                if ch % num_head_channels:
                    raise ValueError(f"num_head_channels={num_head_channels} does not divide the {ch} channels of an "
                                     f"attention level (model_channels x channel_mult)")
                heads = ch // num_head_channels
            if context_dim > 0:
                return SpatialTransformer(ch, heads, context_dim, transformer_depth, num_groups)
            return AttentionBlock(ch, heads, num_groups)

        ch = model_channels
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels = [ch]
        resolution = input_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, model_channels * mult)]
                ch = model_channels * mult
                if resolution in attention_resolutions:
                    layers.append(attn(ch))
                self.down.append(EmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(EmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                resolution //= 2

        levels = [input_size // 2**i for i in range(len(channel_mult))]
        unused = [r for r in attention_resolutions if r not in levels]
        if unused:
            log.warning("UNet: attention_resolutions %s match no level (feature maps %s at input_size %d): no "
                        "attention there", unused, levels, input_size)
        self.skip_channels = list(skip_channels)  # of conv_in and each down block: what a ControlNet adds to
        self.middle = EmbedSequential(res(ch, ch), attn(ch), res(ch, ch))
        self.middle_channels = ch

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if resolution in attention_resolutions:
                    layers.append(attn(ch))
                if level != 0 and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    resolution *= 2
                self.up.append(EmbedSequential(*layers))

        self.out = nn.Sequential(group_norm(ch, num_groups), nn.SiLU(), nn.Conv2d(ch, self.out_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: Tensor, t: Tensor, cond: Cond | None = None, residuals: list[Tensor] | None = None) -> Tensor:
        """Predict (B, out_channels, H, W) from noisy x (B, in_channels, H, W) and timesteps t (B,).
        ``residuals``: a ControlNet's additions to each skip (conv_in, then each down block) and, last, to the
        middle block's output."""
        height, width = x.shape[-2:]
        if height % self.size_multiple or width % self.size_multiple:
            raise ValueError(f"UNet input of {height}x{width} is not divisible by {self.size_multiple} "
                             f"(2**(len(channel_mult)-1): one 2x downsampling between levels)")
        emb = self.cond_embedder(t, cond)
        context, mask = context_from_cond(cond, self.context_dim, x.shape[0])
        h = self.conv_in(input_with_image(x, cond, self.in_channels, "UNet"))
        skips = [h]
        for block in self.down:
            h = block(h, emb, context, mask)
            skips.append(h)
        h = self.middle(h, emb, context, mask)
        if residuals is not None:
            skips = [s + r for s, r in zip(skips, residuals[:-1])]
            h = h + residuals[-1]
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context, mask)
        return self.out(h)
