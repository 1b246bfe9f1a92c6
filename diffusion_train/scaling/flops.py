"""FLOPs accounting: multiply-adds (MACs) of one forward pass of a backbone, per image.

Conventions (the ones MFU figures in this repository use):

* a multiply-add is one MAC; ``forward FLOPs = 2 x MACs``;
* training FLOPs per image = forward + backward = ``3 x forward FLOPs = 6 x MACs``
  (:func:`training_flops_per_image`); MFU = images/s x training FLOPs per image / peak FLOP/s.

What is counted: every matrix multiplication and convolution of the backbone - patch embedding,
timestep / conditioning MLPs, adaLN modulation, qkv / output projections, MLPs, cross-attention
projections (the text tokens' keys and values included), convolutions - and the two matmuls of
every attention (scores ``Q K^T`` and ``softmax(.) V``: ``2 x queries x keys x width`` MACs).
Left out, on purpose and as ``torch.utils.flop_counter`` leaves them out: bias additions,
normalisations, activations, softmax, residual and modulation arithmetic, embedding lookups, and
everything outside the backbone (conditioner, loss, optimizer, EMA). Attention recomputation in
the backward pass of flash attention is not counted either (the 6 x MACs convention).

The DiT paper's "Gflops" (DiT-XL/2 at 32x32x4 latents: 118.6) are multiply-adds in this sense
(fvcore's convention, "one fused multiply-add as one flop"): :func:`dit_macs` reproduces its table
(S/2 6.06, B/2 23.0, L/2 80.7, XL/2 118.6 G), so one DiT-XL/2 forward is ~237 GFLOPs.

DiT and MMDiT are counted analytically from their configuration (:func:`dit_macs`,
:func:`mmdit_macs`). The U-Net (and any other backbone) is counted by :func:`counted_macs`: one
forward pass at batch 1 on the ``meta`` device (no memory, no compute) with hooks on every
``nn.Conv2d`` / ``nn.Linear`` (MACs from the weight shape and the output size) and on the
package's attention modules (the two attention matmuls). :func:`flop_counter_macs` is the
cross-check: ``torch.utils.flop_counter.FlopCounterMode`` over the same meta forward pass (on the
meta device ``scaled_dot_product_attention`` runs its math path, two counted ``bmm``; on a CPU its
fused kernel is not in flop_counter's registry and would be missed).

A ControlNet fine-tune runs a trainable copy of part of the backbone next to it: the run's forward MACs
per image are the backbone's plus the copy's (:func:`flop_counter_macs` of the ControlNet, given a control
image of its ``control_shape``). The 6 x rule is kept for both; for the frozen base, whose weights get no
gradients, it is an upper bound.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from diffusion_train.conditioning.cond import Cond

__all__ = ["counted_macs", "dit_macs", "flop_counter_macs", "forward_macs", "mmdit_macs", "peak_flops",
           "training_flops_per_image", "PEAK_BF16", "TRAINING_FLOPS_PER_MAC"]

TRAINING_FLOPS_PER_MAC = 6  # 2 FLOPs per multiply-add, x3 for forward + backward
# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, matched against torch.cuda.get_device_name(); the first
# key in the name wins.
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("GH200", 989e12), ("H200 NVL", 835e12),
             ("H200", 989e12), ("A100", 312e12))


def peak_flops(device_name: str | None, given_tflops: float | None = None) -> tuple[float | None, str]:
    """The card's dense bf16 peak in FLOP/s for MFU, and where it comes from: ``given_tflops`` when given, else
    :data:`PEAK_BF16` by name; None for a card not in the table (or no card)."""
    if given_tflops is not None:
        return given_tflops * 1e12, "given (peak_tflops)"
    for key, value in PEAK_BF16:
        if device_name and key in device_name:
            return value, f"dense bf16 peak of {key} ({device_name})"
    return None, f"unknown for {device_name!r}: give peak_tflops="


def _size(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _embed_macs(hidden: int, cond_dim: int, freq_dim: int = 256) -> int:
    """Timestep MLP (freq_dim -> hidden -> hidden) plus the projection of ``cond.vector``."""
    return freq_dim * hidden + hidden * hidden + cond_dim * hidden


def dit_macs(*, input_size: int | tuple[int, int], in_channels: int, hidden_size: int, depth: int,
             patch_size: int = 2, mlp_ratio: float = 4.0, cond_dim: int = 0, out_channels: int | None = None,
             context_dim: int = 0, context_len: int = 0, freq_dim: int = 256, mlp_width: int | None = None) -> int:
    """Forward MACs per image of :class:`~diffusion_train.models.DiT` on ``input_size`` inputs (MLP width
    ``mlp_width``, default ``int(hidden_size * mlp_ratio)`` as the model makes it).

    Per block, for N patch tokens of width D (MLP width M): adaLN ``6 D^2``; qkv ``3 N D^2``; scores
    and values ``2 N^2 D``; output projection ``N D^2``; MLP ``2 N D M``; with cross-attention to L
    context tokens of width Dc: q and output projections ``2 N D^2``, keys/values ``2 L Dc D``,
    scores and values ``2 N L D``. Plus the patch embedding ``N C p^2 D``, the timestep/conditioning
    MLP and the final layer (adaLN ``2 D^2``, projection ``N D p^2 C_out``).
    """
    h, w = _size(input_size)
    p, d = patch_size, hidden_size
    n = (h // p) * (w // p)
    m = int(d * mlp_ratio) if mlp_width is None else mlp_width
    c_out = in_channels if out_channels is None else out_channels
    length = max(context_len, 1) if context_dim else 0  # an empty context attends to one masked dummy token
    block = 6 * d * d + 3 * n * d * d + 2 * n * n * d + n * d * d + 2 * n * d * m
    if context_dim:
        block += 2 * n * d * d + 2 * length * context_dim * d + 2 * n * length * d
    return (n * in_channels * p * p * d + _embed_macs(d, cond_dim, freq_dim) + depth * block
            + 2 * d * d + n * d * p * p * c_out)


def mmdit_macs(*, input_size: int | tuple[int, int], in_channels: int, depth: int, hidden_size: int | None = None,
               patch_size: int = 2, mlp_ratio: float = 4.0, cond_dim: int = 0, context_dim: int = 0,
               context_len: int = 0, out_channels: int | None = None, freq_dim: int = 256,
               mlp_width: int | None = None) -> int:
    """Forward MACs per image of :class:`~diffusion_train.models.MMDiT` (SD3 sizing: ``hidden_size``
    defaults to ``64 * depth``; MLP width ``mlp_width``, default ``int(hidden_size * mlp_ratio)``).

    Each stream (N image tokens; L text tokens when ``context_dim > 0``) has, per block, adaLN
    ``6 D^2``, qkv ``3 T D^2``, output projection ``T D^2`` and MLP ``2 T D M`` for its T tokens; the
    joint attention costs ``2 Q K D`` for Q queries and K = N + L keys. In the last block the text
    stream only gives keys and values (adaLN ``2 D^2``, kv ``2 L D^2``) and only image tokens query.
    Plus patch embedding, the context projection ``L Dc D``, the timestep/conditioning MLP and the
    final layer.
    """
    h, w = _size(input_size)
    p = patch_size
    d = hidden_size or 64 * depth
    n = (h // p) * (w // p)
    m = int(d * mlp_ratio) if mlp_width is None else mlp_width
    c_out = in_channels if out_channels is None else out_channels
    text = context_dim > 0
    length = context_len if text else 0

    def stream(tokens: int) -> int:
        return 6 * d * d + 3 * tokens * d * d + tokens * d * d + 2 * tokens * d * m

    total = n * in_channels * p * p * d + _embed_macs(d, cond_dim, freq_dim) + length * context_dim * d
    for i in range(depth):
        last = i == depth - 1
        total += stream(n)
        queries, keys = n, n + length
        if text and not last:
            total += stream(length)
            queries += length
        elif text:
            total += 2 * d * d + 2 * length * d * d
        total += 2 * queries * keys * d
    return total + 2 * d * d + n * d * p * p * c_out


def training_flops_per_image(backbone: nn.Module, **kwargs) -> int:
    """Training FLOPs per image: ``6 x forward_macs`` (2 FLOPs per MAC, forward + backward = 3 x forward)."""
    return TRAINING_FLOPS_PER_MAC * forward_macs(backbone, **kwargs)


def forward_macs(backbone: nn.Module, size: int | tuple[int, int] | None = None, context_len: int | None = None) -> int:
    """Forward multiply-adds per image of ``backbone`` on inputs of ``size`` (default: its training
    ``input_size``), with ``context_len`` text tokens when it cross-attends to a context (required then).

    DiT and MMDiT: analytic (:func:`dit_macs`, :func:`mmdit_macs`) from the module's configuration; the
    package's U-Net: :func:`counted_macs`; any other backbone (a diffusers U-Net): :func:`flop_counter_macs`.
    """
    from diffusion_train.models import DiT, MMDiT  # the models import nothing from here

    size = _size(size if size is not None else backbone.input_size)
    context_dim = int(getattr(backbone, "context_dim", 0) or 0)
    if context_dim and context_len is None:
        raise ValueError(f"{type(backbone).__name__} cross-attends to a context (context_dim={context_dim}): "
                         f"give context_len, the number of context tokens")
    length = int(context_len or 0) if context_dim else 0
    if isinstance(backbone, DiT):
        block = backbone.blocks[0]
        return dit_macs(input_size=size, in_channels=backbone.in_channels, hidden_size=backbone.hidden_size,
                        depth=len(backbone.blocks), patch_size=backbone.patch_size,
                        mlp_width=block.mlp[0].out_features,
                        cond_dim=backbone.cond_embedder.cond_dim, out_channels=backbone.out_channels,
                        context_dim=context_dim, context_len=length,
                        freq_dim=backbone.cond_embedder.t_embedder.freq_dim)
    if isinstance(backbone, MMDiT):
        stream = backbone.blocks[0].image
        return mmdit_macs(input_size=size, in_channels=backbone.in_channels, depth=len(backbone.blocks),
                          hidden_size=backbone.hidden_size, patch_size=backbone.patch_size,
                          mlp_width=stream.mlp[0].out_features,
                          cond_dim=backbone.cond_embedder.cond_dim, context_dim=context_dim, context_len=length,
                          out_channels=backbone.out_channels, freq_dim=backbone.cond_embedder.t_embedder.freq_dim)
    from diffusion_train.models import UNet

    if isinstance(backbone, UNet):
        return counted_macs(backbone, size, length)
    return flop_counter_macs(backbone, size, length)  # other backbones (diffusers): their attention is functional


# ----------------------------------------------------------------------------------------------
# counting on the meta device


def _meta_inputs(backbone: nn.Module, size: tuple[int, int], context_len: int) -> tuple[Tensor, Tensor, Cond]:
    """Batch-1 meta inputs (x, t, cond) shaped as ``backbone`` expects (a ControlNet: with the control image of
    its ``control_shape``)."""
    x = torch.empty(1, int(backbone.in_channels), *size, device="meta")
    t = torch.empty(1, device="meta")
    cond_dim = int(getattr(getattr(backbone, "cond_embedder", backbone), "cond_dim", 0) or 0)  # diffusers: own
    context_dim = int(getattr(backbone, "context_dim", 0) or 0)
    cond = Cond(vector=torch.empty(1, cond_dim, device="meta") if cond_dim else None,
                context=torch.empty(1, context_len, context_dim, device="meta") if context_dim else None,
                mask=torch.ones(1, context_len, dtype=torch.bool, device="meta") if context_dim else None)
    control = getattr(backbone, "control_shape", None)
    if control is not None:
        cond = replace(cond, control=torch.empty(1, *control, device="meta"))
    return x, t, cond


def _meta_forward(backbone: nn.Module, size: tuple[int, int], context_len: int) -> None:
    """One batch-1 forward pass of ``backbone`` with all its parameters and buffers swapped for meta
    tensors of the same shapes (``torch.func.functional_call``): no memory, no compute, and the module
    itself (on whatever device) is left as it was. Compiled parts (``training.compile=blocks``) run eagerly
    here: a first call under a counting mode would make torch 2.11's dynamo skip their code for good."""
    state = {name: torch.empty_like(t, device="meta") for name, t in
             [*backbone.named_parameters(remove_duplicate=False), *backbone.named_buffers(remove_duplicate=False)]}
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        functional_call(backbone, state, _meta_inputs(backbone, size, context_len))


def counted_macs(backbone: nn.Module, size: int | tuple[int, int] | None = None, context_len: int = 0) -> int:
    """Forward MACs per image counted over one batch-1 meta forward pass: ``nn.Conv2d`` (output
    positions x ``C_in / groups x k_h x k_w`` per output channel), ``nn.Linear`` (output elements x
    ``in_features``), and the attention matmuls of the package's ``Attention`` (``2 N^2 C``) and
    ``CrossAttention`` (``2 N L C``) modules. Functional matmuls outside those modules are not seen
    (the package's U-Net has none; MMDiT's joint attention is one, hence its analytic count)."""
    from diffusion_train.models.layers import Attention, CrossAttention

    size = _size(size if size is not None else backbone.input_size)
    total = [0]

    def conv(mod: nn.Conv2d, args, out: Tensor) -> None:
        kh, kw = mod.kernel_size
        total[0] += out.numel() * (mod.in_channels // mod.groups) * kh * kw

    def linear(mod: nn.Linear, args, out: Tensor) -> None:
        total[0] += out.numel() * mod.in_features

    def attention(mod: nn.Module, args, out: Tensor) -> None:
        b, n, c = args[0].shape
        total[0] += 2 * b * n * n * c

    def cross_attention(mod: nn.Module, args, out: Tensor) -> None:
        b, n, c = args[0].shape
        total[0] += 2 * b * n * max(int(args[1].shape[1]), 1) * c

    hooks: list[tuple[type, Callable]] = [(nn.Conv2d, conv), (nn.Linear, linear), (Attention, attention),
                                          (CrossAttention, cross_attention)]
    handles = [m.register_forward_hook(fn) for m in backbone.modules() for cls, fn in hooks if isinstance(m, cls)]
    try:
        _meta_forward(backbone, size, context_len)
    finally:
        for h in handles:
            h.remove()
    return total[0]


def flop_counter_macs(backbone: nn.Module, size: int | tuple[int, int] | None = None, context_len: int = 0) -> int:
    """``torch.utils.flop_counter.FlopCounterMode``'s count of one batch-1 meta forward pass, as MACs
    (its FLOPs / 2: it counts 2 FLOPs per multiply-add of mm/addmm/bmm/convolution/attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    size = _size(size if size is not None else backbone.input_size)
    with FlopCounterMode(display=False) as counter:
        _meta_forward(backbone, size, context_len)
    return counter.get_total_flops() // 2
