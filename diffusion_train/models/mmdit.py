"""MMDiT (Esser et al. 2024, Stable Diffusion 3): image and text tokens in two streams with their own
weights, mixed by one joint attention per block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_train.conditioning.cond import Cond
from diffusion_train.models.dit import FinalLayer, embed_patches, init_transformer_weights, modulate, unpatchify
from diffusion_train.models.layers import CondEmbedder, context_from_cond, input_with_image, sincos_pos_embed_2d


class _Stream(nn.Module):
    """One modality's half of an MMDiT block: adaLN modulation, qkv (with RMS-normalised q and k),
    the attention output projection and the MLP. ``pre_only`` (the text stream of the last block,
    whose output is never used) only gives keys and values, so no parameter goes unused."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, pre_only: bool = False) -> None:
        super().__init__()
        self.num_heads, self.pre_only = num_heads, pre_only
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, (2 if pre_only else 3) * dim)
        self.q_norm = None if pre_only else nn.RMSNorm(dim // num_heads, eps=1e-6)
        self.k_norm = nn.RMSNorm(dim // num_heads, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, (2 if pre_only else 6) * dim))
        if not pre_only:
            self.proj = nn.Linear(dim, dim)
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            hidden = int(dim * mlp_ratio)
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

    def pre(self, x: Tensor, c: Tensor) -> tuple[tuple[Tensor | None, Tensor, Tensor], tuple[Tensor, ...]]:
        """(q, k, v) as (B, heads, N, head_dim) (q None for ``pre_only``), and the remaining
        modulation for :meth:`post`."""
        mods = self.adaLN_modulation(c).unsqueeze(1).chunk(2 if self.pre_only else 6, dim=-1)
        b, n, d = x.shape
        qkv = self.qkv(modulate(self.norm1(x), mods[0], mods[1]))
        parts = qkv.reshape(b, n, 2 if self.pre_only else 3, self.num_heads, d // self.num_heads)
        parts = parts.permute(2, 0, 3, 1, 4).unbind(0)
        q, (k, v) = (None, parts) if self.pre_only else (parts[0], parts[1:])
        q = None if q is None else self.q_norm(q).to(v.dtype)
        return (q, self.k_norm(k).to(v.dtype), v), mods[2:]

    def post(self, x: Tensor, attn: Tensor, mods: tuple[Tensor, ...]) -> Tensor:
        gate_a, shift_m, scale_m, gate_m = mods
        x = x + gate_a * self.proj(attn)
        return x + gate_m * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class MMDiTBlock(nn.Module):
    """Joint attention over [text tokens; image tokens]; masked text tokens are never attended to.

    Without a text stream (``text=False``) it is a DiT block with q/k normalisation.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, text: bool, last: bool) -> None:
        super().__init__()
        self.image = _Stream(dim, num_heads, mlp_ratio)
        self.text = _Stream(dim, num_heads, mlp_ratio, pre_only=last) if text else None

    def forward(self, x: Tensor, ctx: Tensor | None, c: Tensor, key_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        (q, k, v), img_mods = self.image.pre(x, c)
        n_text = 0
        if self.text is not None:
            (tq, tk, tv), txt_mods = self.text.pre(ctx, c)
            k, v = torch.cat([tk, k], dim=2), torch.cat([tv, v], dim=2)
            if tq is not None:  # text queries, except in the last block where nothing reads them
                n_text = ctx.shape[1]
                q = torch.cat([tq, q], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        b, h, n, hd = out.shape
        out = out.transpose(1, 2).reshape(b, n, h * hd)
        x = self.image.post(x, out[:, n_text:], img_mods)
        if self.text is not None and not self.text.pre_only:
            ctx = self.text.post(ctx, out[:, :n_text], txt_mods)
        return x, ctx


class MMDiT(nn.Module):
    """Multimodal Diffusion Transformer on (B, C, H, W) inputs, H and W multiples of ``patch_size``.

    ``input_size`` is the (square) training size; other shapes get a centred sin-cos positional
    embedding of their token grid, as in :class:`~diffusion_train.models.dit.DiT`.

    ``cond.context`` (B, L, context_dim) is projected to the model width and processed as a second
    token stream with its own weights; ``cond.mask`` marks real text tokens. ``cond.vector`` (pooled
    text, class embedding) joins the timestep embedding that modulates both streams (adaLN-Zero).
    Sizes follow SD3: ``hidden_size = 64 * depth`` and ``num_heads = depth`` unless given.
    With ``context_dim = 0`` there is no text stream. An untrained model outputs exactly zeros.
    """

    def __init__(self, *, input_size: int, in_channels: int, depth: int = 12, patch_size: int = 2,
                 hidden_size: int | None = None, num_heads: int | None = None, mlp_ratio: float = 4.0,
                 cond_dim: int = 0, context_dim: int = 0, out_channels: int | None = None) -> None:
        super().__init__()
        hidden_size = hidden_size or 64 * depth
        num_heads = num_heads or depth
        if input_size % patch_size:
            raise ValueError(f"input_size={input_size} is not divisible by patch_size={patch_size}")
        if hidden_size % num_heads or hidden_size % 4:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads} and by 4")
        self.input_size, self.in_channels, self.patch_size = input_size, in_channels, patch_size
        self.out_channels = out_channels if out_channels is not None else in_channels
        self.grid_size, self.hidden_size, self.context_dim = input_size // patch_size, hidden_size, context_dim
        self.size_multiple = patch_size  # inputs' height and width must be multiples of this
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.context_embedder = nn.Linear(context_dim, hidden_size) if context_dim > 0 else None
        self.cond_embedder = CondEmbedder(hidden_size, cond_dim)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, self.grid_size)[None], persistent=False)
        self._pos_embed_cache: dict[tuple, Tensor] = {}
        self.blocks = nn.ModuleList(MMDiTBlock(hidden_size, num_heads, mlp_ratio, context_dim > 0, i == depth - 1)
                                    for i in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        init_transformer_weights(self)
        for block in self.blocks:
            for stream in (block.image, block.text):
                if stream is not None:  # adaLN-Zero: every gate and modulation starts at 0
                    nn.init.zeros_(stream.adaLN_modulation[-1].weight)
                    nn.init.zeros_(stream.adaLN_modulation[-1].bias)

    def stem(self, x: Tensor, t: Tensor, cond: Cond | None = None):
        """The blocks' arguments in their order, then the token grid: the image tokens with their positions, the
        projected text tokens (or None), the conditioning embedding, the attention's key mask (or None)."""
        h, grid = embed_patches(self, input_with_image(x, cond, self.in_channels, "MMDiT"))
        c = self.cond_embedder(t, cond)
        context, mask = context_from_cond(cond, self.context_dim, x.shape[0])
        ctx = key_mask = None
        if self.context_embedder is not None:
            ctx = self.context_embedder(context.to(h.dtype))
            if mask is not None:  # keys: the real text tokens, then every image token
                mask = mask.to(h.device)
                mask = mask if mask.dtype == torch.bool else mask != 0
                image = torch.ones(mask.shape[0], h.shape[1], dtype=torch.bool, device=h.device)
                key_mask = torch.cat([mask, image], dim=1)[:, None, None, :]
        return h, ctx, c, key_mask, grid

    def head(self, h: Tensor, c: Tensor, grid: tuple[int, int]) -> Tensor:
        """The last block's image tokens -> the (B, out_channels, H, W) prediction."""
        return unpatchify(self.final_layer(h, c), *grid, self.patch_size, self.out_channels)

    def forward(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        h, ctx, c, key_mask, grid = self.stem(x, t, cond)
        for block in self.blocks:
            h, ctx = block(h, ctx, c, key_mask)
        return self.head(h, c, grid)
