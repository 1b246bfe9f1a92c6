"""Layers shared by the DiT and U-Net backbones."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_train.conditioning.cond import Cond


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of float timesteps.

    Args:
        t: (B,) timesteps, any float (fractional values are fine).
        dim: output width; the first half holds cosines, the second half sines
            (a zero column is appended when ``dim`` is odd).
        max_period: controls the lowest frequency.

    Returns:
        (B, dim) float32 tensor.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedder(nn.Module):
    """Sinusoidal features (``freq_dim`` wide) followed by Linear -> SiLU -> Linear to ``dim``.

    Timesteps are expected on the 0..1000 scale of discrete DDPM indices, but any float works.
    """

    def __init__(self, dim: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        """(B,) timesteps -> (B, dim) embedding in the dtype of the MLP weights."""
        freqs = timestep_embedding(t, self.freq_dim)
        return self.mlp(freqs.to(self.mlp[0].weight.dtype))


class CondEmbedder(nn.Module):
    """Timestep embedding plus, when ``cond_dim > 0``, a linear projection of ``cond.vector``.

    With ``cond_dim == 0`` the model is unconditional and any ``cond`` passed in is ignored.
    """

    def __init__(self, dim: int, cond_dim: int = 0) -> None:
        super().__init__()
        if cond_dim < 0:
            raise ValueError(f"cond_dim must be >= 0, got {cond_dim}")
        self.cond_dim = cond_dim
        self.t_embedder = TimestepEmbedder(dim)
        self.vector_proj = nn.Linear(cond_dim, dim) if cond_dim > 0 else None

    def forward(self, t: Tensor, cond: Cond | None = None) -> Tensor:
        """(B,) timesteps and optional conditioning -> (B, dim) embedding."""
        emb = self.t_embedder(t)
        if self.vector_proj is not None:
            if cond is None or cond.vector is None:
                raise ValueError(
                    f"model was built with cond_dim={self.cond_dim} and needs cond.vector of shape "
                    f"(B, {self.cond_dim}), but got {'cond=None' if cond is None else 'cond.vector=None'}"
                )
            emb = emb + self.vector_proj(cond.vector.to(emb.dtype))
        return emb


class Attention(nn.Module):
    """Multi-head self-attention over (B, N, C) tokens with one fused qkv projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, C) -> (B, N, C)."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


def input_with_image(x: Tensor, cond: Cond | None, in_channels: int, name: str) -> Tensor:
    """``x`` with ``cond.image``'s channels appended (inpainting, editing), checked against ``in_channels``."""
    if cond is not None and cond.image is not None:
        if cond.image.shape[0] != x.shape[0] or cond.image.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"cond.image of shape {tuple(cond.image.shape)} does not fit the input {tuple(x.shape)}")
        x = torch.cat([x, cond.image.to(x.dtype)], dim=1)
    if x.shape[1] != in_channels:
        extra = "" if cond is None or cond.image is None else f" (with cond.image's {cond.image.shape[1]})"
        raise ValueError(f"{name} was built for {in_channels} input channels but got {x.shape[1]}{extra}")
    return x


def context_from_cond(
    cond: Cond | None, context_dim: int, batch_size: int | None = None
) -> tuple[Tensor | None, Tensor | None]:
    """Validated ``(context, mask)`` for a model built with ``context_dim``.

    With ``context_dim == 0`` the model has no cross-attention and ``(None, None)`` is returned
    (any ``cond.context`` is ignored, like ``cond.vector`` for ``cond_dim == 0``). Otherwise
    ``cond.context`` must be a (B, L, context_dim) tensor and ``cond.mask``, when given, a (B, L)
    tensor; a ValueError names what is missing or mis-shaped. ``batch_size`` also checks B.
    """
    if context_dim == 0:
        return None, None
    want = f"(B, L, {context_dim})"
    if cond is None or cond.context is None:
        raise ValueError(
            f"model was built with context_dim={context_dim} and needs cond.context of shape {want}, "
            f"but got {'cond=None' if cond is None else 'cond.context=None'}"
        )
    context, mask = cond.context, cond.mask
    if context.ndim != 3 or context.shape[-1] != context_dim:
        raise ValueError(
            f"model was built with context_dim={context_dim} and needs cond.context of shape {want}, "
            f"but got cond.context of shape {tuple(context.shape)}"
        )
    if batch_size is not None and context.shape[0] != batch_size:
        raise ValueError(f"cond.context has batch size {context.shape[0]} but x has batch size {batch_size}")
    if mask is not None and tuple(mask.shape) != tuple(context.shape[:2]):
        raise ValueError(
            f"cond.mask must have shape (B, L) = {tuple(context.shape[:2])} to match cond.context, "
            f"got {tuple(mask.shape)}"
        )
    return context, mask


class CrossAttention(nn.Module):
    """Multi-head attention from (B, N, dim) queries to a (B, L, context_dim) token sequence.

    Queries come from ``x`` and keys/values from ``context`` through one fused kv projection;
    the attention width is ``dim``. ``mask`` (B, L) marks real tokens with True; False tokens
    are never attended to, so their values cannot affect the output. Non-bool masks are read
    as ``mask != 0`` (0/1 tokenizer attention masks work).

    A row whose mask is all False (e.g. a dropped / empty caption, or padding added by
    ``Cond.cat``), and an empty context (L == 0), attends to nothing: that sample's output is
    exactly zero, so a residual cross-attention branch leaves it unchanged. No NaN is produced,
    neither in the output nor in gradients.
    """

    def __init__(self, dim: int, context_dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        if context_dim <= 0:
            raise ValueError(f"CrossAttention needs context_dim > 0, got {context_dim}")
        self.num_heads = num_heads
        self.context_dim = context_dim
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: (B, N, dim), context: (B, L, context_dim), mask: (B, L) or None -> (B, N, dim)."""
        b, n, c = x.shape
        heads, head_dim = self.num_heads, c // self.num_heads
        if context.shape[1] == 0:
            # Nothing to attend to: one dummy, masked-out token keeps the graph uniform.
            context = context.new_zeros(b, 1, context.shape[-1])
            mask = torch.zeros(b, 1, dtype=torch.bool, device=x.device)
        length = context.shape[1]
        q = self.q(x).reshape(b, n, heads, head_dim).transpose(1, 2)
        kv = self.kv(context.to(x.dtype)).reshape(b, length, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        attn_mask = empty = None
        if mask is not None:
            mask = mask.to(device=x.device)
            mask = mask if mask.dtype == torch.bool else mask != 0
            empty = ~mask.any(dim=-1)  # (B,)
            # Empty rows attend everywhere (finite softmax) and are zeroed below.
            attn_mask = (mask | empty[:, None])[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = self.proj(out.transpose(1, 2).reshape(b, n, c))
        if empty is not None:
            out = out.masked_fill(empty[:, None, None], 0.0)
        return out


class GEGLU(nn.Module):
    """Gated-GELU projection: Linear(dim, 2*hidden) split into value and gate, value * GELU(gate)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


def sincos_pos_embed_2d(
    dim: int, grid_size: int | tuple[int, int], start: tuple[int, int] = (0, 0)
) -> Tensor:
    """Fixed 2D sin-cos positional embedding for a token grid.

    ``grid_size`` is an int (square grid) or ``(grid_h, grid_w)``. Row ``i`` and column ``j`` sit at
    positions ``start[0] + i`` and ``start[1] + j`` (in tokens), so any grid's embedding is a
    sub-grid of a larger one with suitable ``start``. Tokens are in row-major order. The first half
    of the channels encodes the row position and the second half the column position, each as
    [sin | cos] over ``dim // 4`` frequencies.

    Returns:
        (grid_h * grid_w, dim) float32 tensor.
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos positional embedding needs dim divisible by 4, got {dim}")
    grid_h, grid_w = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64) + start[0],
                                torch.arange(grid_w, dtype=torch.float64) + start[1], indexing="ij")

    def embed_1d(p: Tensor) -> Tensor:
        args = p.reshape(-1, 1) * omega[None, :]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)

    return torch.cat([embed_1d(rows), embed_1d(cols)], dim=1).float()
