"""Speed options of the training step, applied to the backbone in one place (the model code knows none of them).

``training.compile``     ``false``; ``true``: ``torch.compile`` of the whole backbone; ``blocks``: each of its
                         repeated blocks compiled in place (regional compilation: one block's code is traced
                         and reused by all its copies, so compiling takes a fraction of the time), and the
                         code before and after them (a transformer's ``stem`` and ``head``) as two more
                         regions; ``auto`` (the default): on a CUDA GPU ``blocks`` for backbones of identical
                         blocks (DiT, MMDiT) and ``true`` for others (U-Nets), elsewhere ``false``.
``training.compile_options``  keyword arguments of ``torch.compile``, e.g. ``{mode: reduce-overhead}`` (CUDA
                         graphs), ``{mode: max-autotune-no-cudagraphs}``, ``{backend: aot_eager}``.
``training.activation_checkpointing``  recompute each repeated block's activations in the backward pass
                         instead of keeping them (less memory, about one more forward pass of compute); an
                         integer N: only the first N repeated blocks (less memory saved, less recomputed).
``training.channels_last``  NHWC memory for the convolution weights and the backbone's input; ``auto`` (the
                         default): on a CUDA GPU for convolutional backbones whose blocks differ (U-Nets), else off.
``training.fp8``         the Linear layers of the repeated blocks train in float8 (torchao's dynamic tensorwise
                         scaling; the weights stay in their dtype); needs a GPU of compute capability >= 8.9
                         and pays with ``training.compile``.
``training.bf16_residual``  under bf16 autocast, the token streams between the transformer blocks (DiT, MMDiT)
                         in bf16 instead of fp32: each block's token inputs are cast to the autocast dtype, so
                         its residual additions, their gradients and what the backward keeps are half as
                         wide. Less memory traffic in blocks that are bound by it (small widths); the
                         residual sums round to bf16. No effect without autocast (``32-true``).
``training.attention``   which kernel runs ``F.scaled_dot_product_attention``: ``auto`` (torch's own choice, the
                         default), or only ``flash``, ``cudnn``, ``efficient`` (memory-efficient) or ``math``, so
                         that a call the chosen kernel cannot run fails with torch's reason rather than falling
                         back to a slower one. ``cudnn`` and ``efficient`` need a CUDA GPU.

Nothing here changes the backbone's parameter names: state dicts, checkpoints and EMA read the same keys
with any combination (a compiled whole backbone is kept outside the module tree by ``DiffusionModule``).
Compiled or checkpointed blocks hold their new ``forward`` as an instance attribute bound to the block:
a deep copy of a prepared backbone would still call the original blocks, so copy the backbone before
preparing it, never after.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

COMPILE_CHOICES = ("false", "true", "blocks", "auto")
OUTER_REGIONS = ("stem", "head")  # a transformer's code before and after its blocks, compiled with compile=blocks
ATTENTION_BACKENDS = {"auto": None, "flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                      "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}  # training.attention: SDPBackend names
CUDA_ONLY_ATTENTION = ("cudnn", "efficient")
FP8_MIN_CAPABILITY = (8, 9)
FP8_SKIP = ("adaLN_modulation", "emb_proj")  # per-image (not per-token) projections: too small for float8


def compile_choice(value: Any) -> str:
    """``training.compile`` as one of ``false``, ``true``, ``blocks``, ``auto`` (booleans and their strings
    accepted)."""
    choice = str(value).lower() if value is not None else "false"
    if choice not in COMPILE_CHOICES:
        raise ValueError(f"training.compile must be one of {', '.join(COMPILE_CHOICES)}, got {value!r}")
    return choice


def resolve_compile(value: Any, backbone: nn.Module, on_gpu: bool) -> str:
    """``training.compile`` made concrete: ``auto`` is ``false`` off CUDA GPUs, else ``blocks`` when the
    backbone's repeated blocks are copies of one layer (:func:`uniform_blocks`) and ``true`` otherwise."""
    choice = compile_choice(value)
    if choice != "auto":
        return choice
    if not on_gpu:
        return "false"
    return "blocks" if has_uniform_blocks(backbone) else "true"


def has_uniform_blocks(backbone: nn.Module) -> bool:
    """Whether the backbone's repeated blocks are copies of one layer (:func:`uniform_blocks`): a DiT or MMDiT,
    not a U-Net."""
    try:
        uniform_blocks(backbone)
    except ValueError:
        return False
    return True


def resolve_channels_last(value: Any, backbone: nn.Module, on_gpu: bool) -> bool:
    """``training.channels_last`` made concrete: ``auto`` is true on a CUDA GPU for a convolutional backbone (one
    with convolutions besides a patch embedding, whose kernel is its stride: a U-Net, not a DiT or a diffusers
    PixArt), else false. cuDNN runs bf16 convolutions in NHWC and converts NCHW tensors around each one
    otherwise."""
    choice = str(value).lower() if value is not None else "false"
    if choice not in ("false", "true", "auto"):
        raise ValueError(f"training.channels_last must be one of false, true, auto, got {value!r}")
    if choice != "auto":
        return choice == "true"
    return on_gpu and any(isinstance(m, nn.Conv2d) and m.kernel_size != m.stride for m in backbone.modules())


def block_lists(backbone: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The backbone's own ``nn.ModuleList`` attributes with their names: the transformer blocks of a DiT or
    MMDiT, the encoder and decoder stages of a U-Net (lists inside those are part of their elements)."""
    return [(name, m) for name, m in backbone.named_children() if isinstance(m, nn.ModuleList)]


def repeated_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The elements of :func:`block_lists`."""
    return [block for _, blocks in block_lists(backbone) for block in blocks]


def uniform_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The repeated blocks for regional compilation: they must be copies of one layer (one class, the same
    parameter shapes, a last block without some of them allowed), else each copy would be compiled anew."""
    blocks = repeated_blocks(backbone)
    name = type(backbone).__name__
    if not blocks:
        raise ValueError(f"training.compile=blocks: {name} has no repeated blocks (an nn.ModuleList); "
                         f"use training.compile=true")
    shapes = {_shapes(b) for b in blocks[:-1]}  # MMDiT's last block lacks the text stream's output layers
    classes = {type(b) for b in blocks}
    if len(classes) > 1 or len(shapes) > 1:
        layouts = len(shapes | {_shapes(blocks[-1])})
        raise ValueError(f"training.compile=blocks: {name}'s repeated blocks differ ({layouts} different "
                         f"layouts), so each would be compiled separately; use training.compile=true")
    return blocks


def _shapes(block: nn.Module) -> tuple:
    return tuple((n, tuple(p.shape)) for n, p in block.named_parameters())


def fp8_filter(block_prefixes: tuple[str, ...]) -> Callable[[nn.Module, str], bool]:
    """torchao's module filter: Linear layers inside the repeated blocks with both widths multiples of 16,
    except the per-image modulation projections (:data:`FP8_SKIP`)."""
    def keep(module: nn.Module, fqn: str) -> bool:
        return (isinstance(module, nn.Linear) and fqn.startswith(block_prefixes)
                and module.in_features % 16 == 0 and module.out_features % 16 == 0
                and not any(part in FP8_SKIP for part in fqn.split(".")))
    return keep


def convert_fp8(backbone: nn.Module) -> int:
    """Swaps the Linear layers :func:`fp8_filter` keeps for torchao's ``Float8Linear``; returns how many."""
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError as e:
        raise ImportError(f"training.fp8=true needs torchao ({e}); pip install 'diffusion-train[fp8]'") from None
    keep = fp8_filter(tuple(name + "." for name, _ in block_lists(backbone)))
    count = sum(keep(m, n) for n, m in backbone.named_modules())
    if count == 0:
        raise ValueError(f"training.fp8=true: {type(backbone).__name__} has no Linear layer inside its repeated "
                         f"blocks with widths that are multiples of 16")
    convert_to_float8_training(backbone, module_filter_fn=keep)
    return count


def checkpointed_blocks(value: Any, count: int) -> int:
    """How many of ``count`` repeated blocks ``training.activation_checkpointing`` recomputes: ``false`` none,
    ``true`` all, an integer N the first N (N <= ``count``)."""
    if value is None or isinstance(value, bool):
        return count if value else 0
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return count if value.lower() == "true" else 0
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = -1
    if n < 0 or str(n) != str(value).strip():
        raise ValueError(f"training.activation_checkpointing must be true, false or a number of blocks, got {value!r}")
    if n > count:
        raise ValueError(f"training.activation_checkpointing={n}: the backbone has {count} repeated blocks")
    return n


def attention_choice(value: Any) -> str:
    """``training.attention`` as one of :data:`ATTENTION_BACKENDS` (``null`` is ``auto``)."""
    choice = "auto" if value is None else str(value).lower()
    if choice not in ATTENTION_BACKENDS:
        raise ValueError(f"training.attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {value!r}")
    return choice


def with_attention(fn: Callable, choice: str) -> Callable:
    """``fn`` run with only the ``choice`` kernel of ``F.scaled_dot_product_attention`` enabled (``auto``: ``fn``
    itself). The kernel is picked when a call is traced or run, so a compiled ``fn`` keeps the one it was traced
    with. Compiled code cached on disk from another choice would be reused without that (the caches' keys do not
    see the kernel choice), so the choice is added to ``torch.compiler.config.cache_key_tag`` during the call.
    Dynamo's in-memory code cache does not see it either: one choice per process."""
    if choice == "auto":
        return fn
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = getattr(SDPBackend, ATTENTION_BACKENDS[choice])
    config = torch.compiler.config
    tagged = config.patch(cache_key_tag=f"{config.cache_key_tag}|sdpa={choice}") \
        if hasattr(config, "cache_key_tag") else contextlib.nullcontext()

    def call(*args, **kwargs):
        with sdpa_kernel(backend), tagged:
            return fn(*args, **kwargs)
    return call


def check_attention_device(choice: str, device: torch.device) -> None:
    """cuDNN's and the memory-efficient attention kernels exist only for CUDA devices."""
    if choice in CUDA_ONLY_ATTENTION and torch.device(device).type != "cuda":
        raise RuntimeError(f"training.attention={choice} needs a CUDA GPU, but the model is on "
                           f"{torch.device(device).type}; use auto, flash or math")


def check_fp8_device(device: torch.device) -> None:
    """Float8 matrix products need compute capability >= 8.9 (Ada, Hopper, Blackwell); a CPU emulates them."""
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < FP8_MIN_CAPABILITY:
            raise RuntimeError(f"training.fp8=true needs a GPU of compute capability >= 8.9 (H100, L40S, RTX 4090); "
                               f"{torch.cuda.get_device_name(device)} has {cap[0]}.{cap[1]}")


RECOMPILE_LIMIT = 64


def allow_recompiles(limit: int = RECOMPILE_LIMIT) -> None:
    """Lets dynamo keep up to ``limit`` compiled versions of one function (its default, 8, is per code object).
    A sharded backbone (FSDP) breaks the graph at every sharded unit, so one code object (a U-Net stage's
    ``forward``) is compiled once per stage shape, in training and in sampling mode. Past the limit, dynamo
    would run the remaining stages eagerly."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(int(getattr(config, name)), limit))


def channels_last_input(net: Callable) -> Callable:
    """``net`` called with its image input in channels-last (NHWC) memory."""
    def call(x: Tensor, *args, **kwargs) -> Tensor:
        return net(x.contiguous(memory_format=torch.channels_last), *args, **kwargs)
    return call


def autocast_tokens(forward: Callable) -> Callable:
    """``forward`` with its token-sequence arguments ((B, L, C) floating-point tensors) in the autocast dtype
    while autocast is on for their device (``training.bf16_residual``)."""
    def call(*args, **kwargs):
        def cast(a):
            if isinstance(a, Tensor) and a.ndim == 3 and a.is_floating_point() and not a.is_meta \
                    and torch.is_autocast_enabled(a.device.type):
                return a.to(torch.get_autocast_dtype(a.device.type))
            return a
        return forward(*map(cast, args), **{k: cast(v) for k, v in kwargs.items()})
    return call


def prepare_backbone(backbone: nn.Module, *, compile: Any = False, compile_options: dict | None = None,
                     activation_checkpointing: bool | int = False, channels_last: bool | str = False,
                     fp8: bool = False, bf16_residual: bool = False, attention: str = "auto") -> Callable:
    """Applies the speed options to ``backbone`` (in place) and returns what the training step calls:
    the backbone itself, or a compiled / channels-last wrapper of it kept outside the module tree.

    Order: float8 layers; then each repeated block's forward compiled (``blocks``), its token inputs cast to the
    autocast dtype before it (``bf16_residual``), and the two run under
    ``torch.utils.checkpoint`` (non-reentrant, RNG state preserved; the recomputation in the backward pass
    runs the compiled code; ``activation_checkpointing=N``: the first N blocks only); the backbone's ``stem`` and
    ``head`` (:data:`OUTER_REGIONS`) compiled too (``blocks``); then channels-last; then
    whole-backbone compilation around all of it; then the attention kernel (``attention``) around everything,
    and inside each checkpointed block too, so that its recomputation runs the same kernel.
    """
    choice = resolve_compile(compile, backbone, torch.cuda.is_available())
    channels_last = resolve_channels_last(channels_last, backbone, torch.cuda.is_available())
    attention = attention_choice(attention)
    options = dict(compile_options or {})
    if fp8:
        convert_fp8(backbone)
    wrapped = choice == "blocks" or bf16_residual  # every block gets a new forward
    try:
        blocks = uniform_blocks(backbone) if wrapped else repeated_blocks(backbone)
    except ValueError:
        if choice == "blocks":
            raise
        raise ValueError(f"training.bf16_residual: {type(backbone).__name__} has no transformer blocks (copies of "
                         f"one layer, as in DiT and MMDiT) whose token streams could be cast") from None
    if activation_checkpointing and not blocks:
        raise ValueError(f"training.activation_checkpointing: {type(backbone).__name__} has no repeated blocks "
                         f"(an nn.ModuleList) to checkpoint")
    recompute = checkpointed_blocks(activation_checkpointing, len(blocks))
    for i, block in enumerate(blocks if wrapped else blocks[:recompute]):
        forward = block.forward
        if choice == "blocks":  # copies of one layer share the compiled code
            forward = torch.compile(forward, **options)
        if bf16_residual:  # outside the compiled code, which then sees one dtype in every block
            forward = autocast_tokens(forward)
        if i < recompute:  # the recomputation runs outside the step's call, so it enters the kernel choice itself
            forward = functools.partial(checkpoint, with_attention(forward, attention), use_reentrant=False)
        block.forward = forward  # an instance attribute: parameter names do not change
    if choice == "blocks":  # the code around the blocks (patch embedding, conditioning, final layer), one region each
        for name in OUTER_REGIONS:
            if inspect.ismethod(getattr(backbone, name, None)):  # a method, not a submodule of that name
                setattr(backbone, name, torch.compile(getattr(backbone, name), **options))
    if choice != "false":
        allow_recompiles()
    net: Callable = backbone
    if channels_last:
        backbone.to(memory_format=torch.channels_last)
        net = channels_last_input(backbone)
    if choice == "true":
        net = torch.compile(net, **options)
    return with_attention(net, attention)
