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


def sincos_pos_embed_2d(dim: int, grid_size: int) -> Tensor:
    """Fixed 2D sin-cos positional embedding for a ``grid_size`` x ``grid_size`` token grid.

    Tokens are in row-major order. The first half of the channels encodes the row index and
    the second half the column index, each as [sin | cos] over ``dim // 4`` frequencies.

    Returns:
        (grid_size**2, dim) float32 tensor.
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos positional embedding needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def embed_1d(p: Tensor) -> Tensor:
        args = p.reshape(-1, 1) * omega[None, :]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)

    return torch.cat([embed_1d(rows), embed_1d(cols)], dim=1).float()
