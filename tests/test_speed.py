"""The speed options of the training step (training/speed.py): compile choices, repeated blocks, regional and
whole-backbone compilation, activation checkpointing, and a DiffusionModule built with them from a config. The
attention kernel, channels-last, float8 layers and the bf16 residual stream: test_speed_kernels.py.

CPU only and fast: tiny models (speed_nets.py), and compiled code runs on the ``aot_eager`` backend.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from conftest import TINY, compose_train
from diffusion_train.models import MMDiT, UNet
from diffusion_train.scaling.flops import flop_counter_macs
from diffusion_train.training.build import build_module
from diffusion_train.training.parallel import resolve_accelerator
from diffusion_train.training.speed import (
    block_lists,
    compile_choice,
    prepare_backbone,
    repeated_blocks,
    resolve_channels_last,
    resolve_compile,
    uniform_blocks,
)
from speed_nets import TIGHT, ConvNet, assert_same, counter, dit_inputs, run, tiny_dit, tiny_unet, unet_inputs


# ------------------------------------------------------------------------------------------------
# compile choice and repeated blocks
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, choice", [
    (False, "false"), (True, "true"), (None, "false"), ("false", "false"), ("true", "true"),
    ("True", "true"), ("FALSE", "false"), ("blocks", "blocks"), ("Blocks", "blocks"), ("auto", "auto"),
])
def test_compile_choice_normalises(value, choice):
    """Booleans, None and their strings (any case) map to false / true / blocks; auto stays auto."""
    assert compile_choice(value) == choice


@pytest.mark.parametrize("value, on_gpu, dit, unet", [
    ("auto", True, "blocks", "true"), ("auto", False, "false", "false"),
    ("true", False, "true", "true"), (False, True, "false", "false"), ("blocks", True, "blocks", "blocks"),
])
def test_resolve_compile(value, on_gpu, dit, unet):
    """auto: regional compilation for backbones of identical blocks, whole-model for U-Nets, on GPUs only."""
    assert resolve_compile(value, tiny_dit(depth=2), on_gpu) == dit
    assert resolve_compile(value, tiny_unet(), on_gpu) == unet


def test_resolve_accelerator(monkeypatch):
    """What compile=auto and the device check take the trainer's accelerator to be."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert [resolve_accelerator(a) for a in ("gpu", "CUDA", "cpu", "auto", None)] == ["gpu", "cuda", "cpu", "cpu", "cpu"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert [resolve_accelerator(a) for a in ("auto", None, "cpu")] == ["gpu", "gpu", "cpu"]


@pytest.mark.parametrize("model, accelerator, choice, channels_last", [
    ("dit_tiny", "gpu", "blocks", False), ("unet_tiny", "gpu", "true", True), ("dit_tiny", None, "false", False),
    ("unet_tiny", None, "false", False),
])
def test_compile_auto_is_the_default_and_follows_the_accelerator(model, accelerator, choice, channels_last):
    """The default config compiles on GPUs only, and puts U-Nets in channels-last memory on GPUs only: the
    trainer's accelerator decides (TINY's is the CPU)."""
    cfg = compose_train(TINY + [f"model={model}"])
    assert cfg.training.compile == cfg.training.channels_last == "auto"
    module = build_module(cfg, accelerator=accelerator)
    assert module.compile == choice and module.channels_last is channels_last
    assert _wrapped_blocks(module) == (choice == "blocks")
    assert (module.net is not module.backbone) == (choice == "true")
    conv = next(m for m in module.backbone.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) is channels_last


@pytest.mark.parametrize("value, on_gpu, dit, unet", [
    ("auto", True, False, True), ("auto", False, False, False), (None, True, False, False),
    (True, False, True, True), ("false", True, False, False), ("TRUE", False, True, True),
])
def test_resolve_channels_last(value, on_gpu, dit, unet):
    """auto: NHWC for convolutional backbones whose blocks differ (U-Nets), on GPUs only."""
    assert resolve_channels_last(value, tiny_dit(depth=2), on_gpu) is dit
    assert resolve_channels_last(value, tiny_unet(), on_gpu) is unet
    patchify = nn.Sequential(nn.Conv2d(3, 8, 2, stride=2), nn.Flatten(), nn.Linear(8 * 16, 4))  # PixArt's kind
    assert resolve_channels_last(value, patchify, on_gpu) is dit
    with pytest.raises(ValueError, match="training.channels_last must be one of false, true, auto, got 'nhwc'"):
        resolve_channels_last("nhwc", tiny_unet(), on_gpu)


@pytest.mark.parametrize("value", ["yes", "", "block", "max-autotune", 2])
def test_compile_choice_rejects_other_values(value):
    """Anything else is refused, by name, before the backbone is touched."""
    with pytest.raises(ValueError, match="training.compile"):
        compile_choice(value)
    with pytest.raises(ValueError, match="training.compile"):
        prepare_backbone(tiny_dit(depth=1), compile=value)


def test_repeated_blocks_of_dit_are_its_blocks():
    """A DiT's repeated blocks are the elements of ``blocks``, all copies of one layer."""
    model = tiny_dit()
    assert [name for name, _ in block_lists(model)] == ["blocks"]
    blocks = repeated_blocks(model)
    assert len(blocks) == 3 and all(a is b for a, b in zip(blocks, model.blocks))
    assert uniform_blocks(model) == blocks


def test_repeated_blocks_of_unet_are_its_stages():
    """The elements of ``down`` and ``up``; the transformer blocks nested in them are not listed apart."""
    model = tiny_unet()
    assert [name for name, _ in block_lists(model)] == ["down", "up"]
    blocks = repeated_blocks(model)
    assert len(blocks) == len(model.down) + len(model.up)
    assert all(a is b for a, b in zip(blocks, [*model.down, *model.up]))

    model = tiny_unet(context_dim=8)  # SpatialTransformers, with a ModuleList of their own, in down, middle, up
    assert [name for name, _ in block_lists(model)] == ["down", "up"]  # not middle.1.blocks
    stages, listed = [*model.down, *model.up], repeated_blocks(model)
    assert all(any(b is s for b in listed) for s in stages)
    nested = [m for s in stages for m in s.modules() if type(m).__name__ == "TransformerBlock"]
    assert nested and not any(b is m for b in listed for m in nested)


def test_uniform_blocks_refuses_unet():
    """U-Net stages differ in shape: regional compilation is refused with a pointer to compile=true, also for a
    one-level U-Net whose down and up stages are two layouts."""
    for model in (tiny_unet(), UNet(input_size=16, in_channels=3, model_channels=32, channel_mult=(1,),
                                    attention_resolutions=())):
        with pytest.raises(ValueError, match="training.compile=true") as e:
            uniform_blocks(model)
        assert "UNet" in str(e.value)


def test_uniform_blocks_accepts_mmdit_with_its_different_last_block():
    """MMDiT's last block lacks the text stream's output layers and is still accepted."""
    model = MMDiT(input_size=8, in_channels=3, depth=2, context_dim=16)
    shapes = [[tuple(p.shape) for p in b.parameters()] for b in model.blocks]
    assert shapes[0] != shapes[1]  # the last block has no text-stream output layers
    assert uniform_blocks(model) == list(model.blocks)


def test_no_repeated_blocks_raises():
    """Block-wise options on a backbone without an nn.ModuleList name the option."""
    with pytest.raises(ValueError, match="training.activation_checkpointing"):
        prepare_backbone(ConvNet(), activation_checkpointing=True)
    with pytest.raises(ValueError, match="training.compile=blocks"):
        prepare_backbone(ConvNet(), compile="blocks")


def test_no_options_leave_the_backbone_alone():
    """All options off: the step calls the backbone itself, unchanged."""
    model = tiny_dit()
    assert prepare_backbone(model) is model
    assert not any("forward" in vars(m) for m in model.modules())


# ------------------------------------------------------------------------------------------------
# compilation
# ------------------------------------------------------------------------------------------------
def test_compile_blocks_shares_one_frame_and_matches_eager():
    """compile=blocks: one compiled frame for all blocks, one each for the code before and after them (stem, head),
    eager outputs and gradients, same parameter names."""
    eager, model = tiny_dit(), tiny_dit()
    keys = list(model.state_dict())
    cnt = counter()
    net = prepare_backbone(model, compile="blocks", compile_options={"backend": cnt})
    assert net is model
    assert_same(run(eager, eager, dit_inputs()), run(net, model, dit_inputs()))
    run(net, model, dit_inputs(seed=1))
    assert cnt.frame_count == 3  # three blocks, two passes: one block's code traced once; the stem; the head
    assert all(name in vars(model) for name in ("stem", "head"))
    assert list(model.state_dict()) == keys and not any("_orig_mod" in k for k in keys)


def test_compile_true_wraps_the_backbone_and_matches_eager():
    """compile=true: a compiled wrapper outside the backbone, eager results, the backbone's names unchanged."""
    eager, model = tiny_dit(depth=2), tiny_dit(depth=2)
    keys = list(model.state_dict())
    cnt = counter()
    net = prepare_backbone(model, compile=True, compile_options={"backend": cnt})
    assert net is not model and isinstance(net, nn.Module)
    assert_same(run(eager, eager, dit_inputs()), run(net, model, dit_inputs()))
    frames = cnt.frame_count
    assert frames >= 1
    run(net, model, dit_inputs(seed=1))
    assert cnt.frame_count == frames  # no recompilation for new values of the same shapes
    assert list(model.state_dict()) == keys


# ------------------------------------------------------------------------------------------------
# activation checkpointing
# ------------------------------------------------------------------------------------------------
def _count_calls(module: nn.Module) -> list[int]:
    calls = [0]  # a pre-hook: the recomputation stops once it has what the backward pass needs
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("make, inputs, inner", [
    (tiny_dit, dit_inputs, lambda m: m.blocks[0].mlp),
    (lambda: tiny_unet(dropout=0.5), unet_inputs, lambda m: m.down[0][0]),  # RNG state preserved
], ids=["dit", "unet"])
def test_activation_checkpointing_recomputes_with_same_gradients(make, inputs, inner):
    """Blocks are recomputed in the backward pass, with the outputs and gradients of the plain model."""
    eager, model = make(), make()
    keys = list(model.state_dict())
    net = prepare_backbone(model, activation_checkpointing=True)
    calls_eager, calls = _count_calls(inner(eager)), _count_calls(inner(model))
    torch.manual_seed(3)
    reference = run(eager, eager, inputs())
    torch.manual_seed(3)
    assert_same(reference, run(net, model, inputs()))
    assert calls_eager == [1] and calls == [2]  # run again in the backward pass
    assert list(model.state_dict()) == keys


def _saved_bytes(net, inputs) -> int:
    """Bytes the autograd graph keeps for the backward pass during one forward pass of ``net``."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(*inputs)
    out.square().mean().backward()
    return sum(saved)


def test_checkpointing_the_first_n_blocks():
    """activation_checkpointing=N: the first N blocks are recomputed, the others keep their activations; the
    more blocks, the less the forward pass keeps, with the gradients of the plain model every time."""
    eager = tiny_dit(depth=4)
    reference = run(eager, eager, dit_inputs())
    kept = []
    for n in (0, 1, 3, 4):
        model = tiny_dit(depth=4)
        net = prepare_backbone(model, activation_checkpointing=n)
        calls = [_count_calls(block.mlp) for block in model.blocks]
        assert_same(reference, run(net, model, dit_inputs()))
        assert [c[0] for c in calls] == [2] * n + [1] * (4 - n)
        kept.append(_saved_bytes(net, dit_inputs()))
    assert kept == sorted(kept, reverse=True) and len(set(kept)) == 4
    with pytest.raises(ValueError, match=r"activation_checkpointing=5: the backbone has 4 repeated blocks"):
        prepare_backbone(tiny_dit(depth=4), activation_checkpointing=5)
    for bad in (-1, 2.5, "some"):
        with pytest.raises(ValueError, match="must be true, false or a number of blocks"):
            prepare_backbone(tiny_dit(depth=4), activation_checkpointing=bad)


def test_activation_checkpointing_with_compiled_blocks():
    """Checkpointing around compiled blocks: still one compiled frame for the blocks (and the stem's and head's),
    still the eager results."""
    eager, model = tiny_dit(), tiny_dit()
    cnt = counter()
    net = prepare_backbone(model, compile="blocks", compile_options={"backend": cnt}, activation_checkpointing=True)
    assert_same(run(eager, eager, dit_inputs()), run(net, model, dit_inputs()))
    assert cnt.frame_count == 3


# ------------------------------------------------------------------------------------------------
# the DiffusionModule built from a config
# ------------------------------------------------------------------------------------------------
def _wrapped_blocks(module) -> bool:
    return all("forward" in vars(b) for b in repeated_blocks(module.backbone))


@pytest.mark.parametrize("model, options, applied", [
    ("dit_tiny", ["training.compile=blocks", "training.compile_options={backend:aot_eager}",
                  "training.activation_checkpointing=true"], _wrapped_blocks),
    ("dit_tiny", ["training.compile=true", "+training.compile_options.backend=aot_eager"],
     lambda m: isinstance(m.net, nn.Module) and m.net is not m.backbone),
    ("unet_tiny", ["training.channels_last=true", "training.activation_checkpointing=2"],  # the first 2 stages
     lambda m: [("forward" in vars(b)) for b in repeated_blocks(m.backbone)][:3] == [True, True, False]
     and m.backbone.conv_in.weight.is_contiguous(memory_format=torch.channels_last)),
    ("dit_tiny", ["training.fp8=true"],
     lambda m: any(type(x).__name__ == "Float8Linear" for x in m.backbone.modules())),
    ("dit_tiny", ["training.bf16_residual=true"], _wrapped_blocks),  # a no-op without autocast
    ("dit_tiny", ["training.attention=math"], lambda m: m.net is not m.backbone),
], ids=["blocks+checkpointing", "compile", "channels_last+checkpointing", "fp8", "bf16_residual", "attention"])
def test_module_with_speed_options(model, options, applied):
    """The options reach the backbone; parameter names, loss and gradients are those of a plain module."""
    fp8 = "training.fp8=true" in options
    torch._dynamo.reset()
    torch.manual_seed(0)
    plain = build_module(compose_train(TINY + [f"model={model}"]))
    torch.manual_seed(0)
    fast = build_module(compose_train(TINY + [f"model={model}"] + options))
    assert applied(fast) and not applied(plain)
    assert list(fast.state_dict()) == list(plain.state_dict())
    assert not any("_orig_mod" in k for k in fast.state_dict())
    fast.load_state_dict(plain.state_dict())
    fast.on_fit_start()  # the fp8 device check passes on a CPU

    batch = {"image": torch.rand(4, 3, 16, 16) * 2 - 1, "label": torch.arange(4)}
    losses, grads = [], []
    for module in (plain, fast):
        loss = module.loss(batch, torch.Generator().manual_seed(0)).mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in module.trainable_parameters()]))
    assert torch.isfinite(losses[1]) and torch.isfinite(grads[1]).all()
    if fp8:
        torch.testing.assert_close(losses[1], losses[0], rtol=0.1, atol=0)
        assert (grads[1] - grads[0]).norm() / grads[0].norm() < 0.1
    else:
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("overrides, graphs", [
    (["model=dit_tiny"], 3), (["model=unet_tiny"], 1), (["model=dit_tiny", "finetune=lora"], 4),
    (["model=dit_tiny", "task=inpainting"], 3), (["model=unet_tiny", "finetune=controlnet"], 1),
    (["model=mmdit_tiny", "conditioning=t5_tiny"], 4), (["model=dit_tiny", "training.fp8=true"], 3),
], ids=["dit", "unet", "dit_lora", "dit_inpainting", "unet_controlnet", "mmdit_text", "dit_fp8"])
def test_compile_auto_on_a_gpu_traces_without_graph_breaks(overrides, graphs):
    """The default on a GPU (compile=auto) traced here with the aot_eager backend: every backbone family and
    fine-tune compiles with no graph break, and the training loss and gradients are those of eager. A U-Net is one
    graph; a DiT or MMDiT is its block's graph (two where one block differs: LoRA's first block gets an input that
    needs no gradient, the MMDiT's last block has no text output) and its stem's and head's."""
    from torch._dynamo.utils import counters

    batch = {"image": torch.rand(4, 3, 16, 16) * 2 - 1, "label": torch.arange(4),
             "caption": ["a shoe", "a bag", "a red coat", ""]}
    results = []
    for accelerator, extra in ((None, []), ("gpu", ["+training.compile_options.backend=aot_eager"])):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        module = build_module(compose_train(TINY + overrides + extra), accelerator=accelerator)
        loss = module.loss(batch, torch.Generator().manual_seed(0)).mean()
        loss.backward()
        results.append((loss.detach(), torch.cat([p.grad.flatten() for p in module.trainable_parameters()])))
    assert module.compile in ("blocks", "true")
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == graphs
    torch.testing.assert_close(results[1][0], results[0][0], **TIGHT)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-6)


def test_flop_counting_leaves_compiled_blocks_to_compile():
    """The benchmark counts FLOPs over a meta forward pass of the prepared backbone. Compiled blocks run eagerly
    there (on torch 2.11 a first compiled call under the counting mode made dynamo skip the block's code for good,
    so a benchmark of compile=blocks ran eager), and compile at the first real call."""
    from diffusion_train.scaling.flops import counted_macs

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    model = tiny_dit()
    net = prepare_backbone(model, compile="blocks", compile_options={"backend": counter})
    stances = []
    model.blocks[0].register_forward_pre_hook(lambda *_: stances.append(torch._dynamo.eval_frame._stance.stance))
    assert flop_counter_macs(model) == counted_macs(model) > 0
    assert stances == ["force_eager", "force_eager"] and counter.frame_count == 0
    run(net, model, dit_inputs())
    assert counter.frame_count == 3 and stances[-1] == "default"  # blocks, stem, head
