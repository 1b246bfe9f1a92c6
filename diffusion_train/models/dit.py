"""Diffusion Transformer (DiT) with adaLN-Zero conditioning."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffusion_train.conditioning.cond import Cond
from diffusion_train.models.layers import (
    Attention,
    CondEmbedder,
    CrossAttention,
    context_from_cond,
    input_with_image,
    sincos_pos_embed_2d,
)

DIT_SIZES: dict[str, dict[str, int]] = {
    "S": dict(hidden_size=384, depth=12, num_heads=6),
    "B": dict(hidden_size=768, depth=12, num_heads=12),
    "L": dict(hidden_size=1024, depth=24, num_heads=16),
    "XL": dict(hidden_size=1152, depth=28, num_heads=16),
}


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """Per-sample affine modulation of (B, N, C) tokens by (B, 1, C) shift and scale."""
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    """Transformer block whose norms are modulated (shift/scale/gate) by the conditioning.

    With ``context_dim > 0`` a PixArt-style cross-attention branch over the text tokens sits
    between self-attention and the MLP: ``x + cross_attn(norm_cross(x), context, mask)``, with an
    affine LayerNorm and no adaLN modulation or gate.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, context_dim: int = 0) -> None:
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm_cross: nn.LayerNorm | None = None
        self.cross_attn: CrossAttention | None = None
        if context_dim > 0:
            self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6)
            self.cross_attn = CrossAttention(hidden_size, context_dim, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, hidden_size)
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """x: (B, N, C) tokens, c: (B, C) conditioning embedding, context: (B, L, Dc), mask: (B, L)."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).unsqueeze(1).chunk(6, dim=-1)
        x = x + gate_a * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        if self.cross_attn is not None:
            if context is None:
                raise ValueError("DiTBlock with cross-attention needs a context tensor")
            x = x + self.cross_attn(self.norm_cross(x), context, mask)
        return x + gate_m * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm followed by a projection to patch pixels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """(B, N, C) tokens -> (B, N, patch*patch*out_channels)."""
        shift, scale = self.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


def init_transformer_weights(model: nn.Module) -> None:
    """DiT initialisation shared by the patch transformers: Xavier linears and patch embedding,
    N(0, 0.02) timestep MLP, zero final layer (blocks zero their own adaLN modulation)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    w = model.x_embedder.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(model.x_embedder.bias)
    for i in (0, 2):
        nn.init.normal_(model.cond_embedder.t_embedder.mlp[i].weight, std=0.02)
    for layer in (model.final_layer.adaLN_modulation[-1], model.final_layer.linear):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def unpatchify(x: Tensor, grid_h: int, grid_w: int, patch: int, channels: int) -> Tensor:
    """(B, grid_h*grid_w, patch*patch*channels) row-major tokens -> (B, channels, grid_h*patch, grid_w*patch) image."""
    b = x.shape[0]
    x = x.reshape(b, grid_h, grid_w, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, grid_h * patch, grid_w * patch)


def grid_pos_embed(model: nn.Module, grid: tuple[int, int], like: Tensor) -> Tensor:
    """(1, grid_h*grid_w, hidden_size) positional embedding of a patch transformer's token grid, in
    ``like``'s device and dtype.

    The square training grid (``grid_size`` x ``grid_size``) uses the model's ``pos_embed`` buffer.
    Other grids are computed once per shape, device and dtype (kept in ``model._pos_embed_cache``,
    outside the state dict) in the same units, one position per patch, and centred on the training
    grid: row ``i`` of ``grid_h`` rows sits at position ``i + (grid_size - grid_h) // 2`` (floor division;
    columns alike). Every grid is thus a centred crop of one position table, and the training grid's rows
    and columns are a contiguous block of any larger grid's.
    """
    base = model.grid_size
    if grid == (base, base):
        return model.pos_embed.to(like.dtype)
    key = (grid, like.device, like.dtype)
    if key not in model._pos_embed_cache:
        # Centred, as SD3 crops its position table, rather than starting every grid at 0: the middle
        # of an image keeps the positions the middle of the training images had, and positions
        # beyond the trained range are split between both sides rather than all on the bottom/right.
        start = ((base - grid[0]) // 2, (base - grid[1]) // 2)
        with torch.inference_mode(False):  # usable in training even when first made while sampling
            pos = sincos_pos_embed_2d(model.hidden_size, grid, start)[None]
            model._pos_embed_cache[key] = pos.to(device=like.device, dtype=like.dtype)
    return model._pos_embed_cache[key]


def embed_patches(model: nn.Module, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """Patch tokens (B, N, hidden_size) of ``x`` (B, C, H, W) plus their positional embedding, and the
    token grid (H / patch_size, W / patch_size). H and W must be multiples of the patch size."""
    height, width = x.shape[-2:]
    p = model.patch_size
    if height % p or width % p:
        raise ValueError(f"{type(model).__name__} input of {height}x{width} is not divisible by patch_size={p}")
    grid = (height // p, width // p)
    return model.x_embedder(x).flatten(2).transpose(1, 2) + grid_pos_embed(model, grid, x), grid


class DiT(nn.Module):
    """Diffusion Transformer on (B, C, H, W) inputs, H and W multiples of ``patch_size``.

    ``input_size`` is the (square) training size; other shapes get a sin-cos positional embedding
    of their token grid, centred on the training grid (see :func:`grid_pos_embed`).

    ``size`` picks hidden_size/depth/num_heads from :data:`DIT_SIZES`; any of those given
    explicitly overrides the preset (with ``size=None`` all three must be given).
    ``cond_dim > 0`` adds a projection of ``cond.vector`` to the timestep embedding (adaLN).
    ``context_dim > 0`` adds cross-attention to ``cond.context`` (B, L, context_dim) in every
    block (PixArt-style, after self-attention; ``cond.mask`` marks real tokens, see
    :class:`~diffusion_train.models.layers.CrossAttention`); its output projection is
    zero-initialised, so the branch starts as identity. A pooled text vector still goes through
    ``cond.vector`` / ``cond_dim``.
    An untrained model outputs exactly zeros (adaLN-Zero and zero-initialised output layer).
    """

    def __init__(
        self,
        *,
        input_size: int,
        in_channels: int,
        size: str | None = "S",
        patch_size: int = 2,
        hidden_size: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        cond_dim: int = 0,
        out_channels: int | None = None,
        context_dim: int = 0,
    ) -> None:
        super().__init__()
        preset: dict[str, int] = {}
        if size is not None:
            if size not in DIT_SIZES:
                raise ValueError(f"unknown DiT size {size!r}; valid sizes: {sorted(DIT_SIZES)} (or None)")
            preset = DIT_SIZES[size]
        given = dict(hidden_size=hidden_size, depth=depth, num_heads=num_heads)
        arch = {k: v if v is not None else preset.get(k) for k, v in given.items()}
        missing = [k for k, v in arch.items() if v is None]
        if missing:
            raise ValueError(f"DiT with size=None needs explicit {', '.join(missing)}")
        hidden_size, depth, num_heads = arch["hidden_size"], arch["depth"], arch["num_heads"]
        if input_size % patch_size:
            raise ValueError(f"input_size={input_size} is not divisible by patch_size={patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
        if context_dim < 0:
            raise ValueError(f"context_dim must be >= 0, got {context_dim}")

        self.input_size = input_size
        self.in_channels = in_channels
        self.out_channels = out_channels if out_channels is not None else in_channels
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.grid_size = input_size // patch_size
        self.size_multiple = patch_size  # inputs' height and width must be multiples of this
        self.context_dim = context_dim

        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.cond_embedder = CondEmbedder(hidden_size, cond_dim)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, self.grid_size)[None], persistent=False)
        self._pos_embed_cache: dict[tuple, Tensor] = {}
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, context_dim) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        init_transformer_weights(self)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            if block.cross_attn is not None:
                nn.init.zeros_(block.cross_attn.proj.weight)
                nn.init.zeros_(block.cross_attn.proj.bias)

    def unpatchify(self, x: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """Output tokens of a ``grid`` (grid_h, grid_w) token grid (default: the training grid) -> image."""
        grid_h, grid_w = grid or (self.grid_size, self.grid_size)
        return unpatchify(x, grid_h, grid_w, self.patch_size, self.out_channels)

    def stem(self, x: Tensor, t: Tensor, cond: Cond | None = None):
        """The blocks' arguments in their order, then the token grid: the patch tokens with their positions
        (B, N, hidden_size), the conditioning embedding (B, hidden_size), the text context and mask (or None)."""
        h, grid = embed_patches(self, input_with_image(x, cond, self.in_channels, "DiT"))
        c = self.cond_embedder(t, cond)
        context, mask = context_from_cond(cond, self.context_dim, x.shape[0])
        return h, c, context, mask, grid

    def head(self, h: Tensor, c: Tensor, grid: tuple[int, int]) -> Tensor:
        """The last block's tokens -> the (B, out_channels, H, W) prediction."""
        return self.unpatchify(self.final_layer(h, c), grid)

    def forward(self, x: Tensor, t: Tensor, cond: Cond | None = None, residuals: list[Tensor] | None = None) -> Tensor:
        """Predict (B, out_channels, H, W) from noisy x (B, in_channels, H, W) and timesteps t (B,).
        ``residuals``: a ControlNet's additions to the outputs of the first blocks."""
        h, c, context, mask, grid = self.stem(x, t, cond)
        for i, block in enumerate(self.blocks):
            h = block(h, c, context, mask)
            if residuals is not None and i < len(residuals):
                h = h + residuals[i]
        return self.head(h, c, grid)
