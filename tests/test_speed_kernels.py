"""Speed options that change kernels and number formats (training/speed.py): the bf16 residual stream, the attention
kernel, channels-last memory, cuDNN autotuning and float8 layers. Compilation and activation checkpointing:
test_speed.py.

CPU only and fast: tiny models (speed_nets.py), and compiled code runs on the ``aot_eager`` backend.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import TINY, compose_train, load_script
from diffusion_train.conditioning.cond import Cond
from diffusion_train.models import MMDiT
from diffusion_train.scaling.flops import flop_counter_macs
from diffusion_train.training.build import build_module
from diffusion_train.training.export import export_weights
from diffusion_train.training.speed import (
    attention_choice,
    check_attention_device,
    check_fp8_device,
    convert_fp8,
    prepare_backbone,
    with_attention,
)
from speed_nets import assert_same, counter, dit_inputs, randomised, run, tiny_dit, tiny_unet, unet_inputs


# ------------------------------------------------------------------------------------------------
# bf16 residual stream
# ------------------------------------------------------------------------------------------------
def tiny_mmdit() -> MMDiT:
    return randomised(MMDiT(input_size=8, in_channels=3, depth=3, hidden_size=64, num_heads=4, context_dim=16))


def mmdit_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 3, 8, 8, generator=g), torch.rand(2, generator=g) * 1000,
            Cond(context=torch.randn(2, 5, 16, generator=g), mask=torch.tensor([[True] * 5, [True] * 3 + [False] * 2])))


def _stream_dtypes(model: nn.Module) -> list[set]:
    """The dtypes of each block's token outputs, recorded on the next forward pass."""
    seen: list[set] = [set() for _ in model.blocks]
    for i, block in enumerate(model.blocks):
        def hook(module, args, out, i=i):
            seen[i].update(t.dtype for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, torch.Tensor))
        block.register_forward_hook(hook)
    return seen


@pytest.mark.parametrize("make, inputs", [(tiny_dit, dit_inputs), (tiny_mmdit, mmdit_inputs)], ids=["dit", "mmdit"])
def test_bf16_residual_keeps_the_token_streams_in_bf16(make, inputs):
    """Under bf16 autocast every token stream between the blocks is bf16 (without the option the image stream is
    fp32), the output is the fp32 stream's within bf16 rounding and every gradient is finite; without autocast
    nothing changes."""
    eager, model = make(), make()
    net = prepare_backbone(model, bf16_residual=True)
    assert_same(run(eager, eager, inputs()), run(net, model, inputs()))  # 32-true: a no-op
    plain_dtypes, dtypes = _stream_dtypes(eager), _stream_dtypes(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (ref, _), (out, grads) = run(eager, eager, inputs()), run(net, model, inputs())
    assert all(torch.float32 in d for d in plain_dtypes) and all(d == {torch.bfloat16} for d in dtypes)
    assert (out.float() - ref.float()).abs().max() <= 0.05 * ref.float().abs().max()
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_bf16_residual_with_compiled_checkpointed_blocks_and_its_errors():
    eager, model = tiny_dit(), tiny_dit()
    cnt = counter()
    net = prepare_backbone(model, compile="blocks", compile_options={"backend": cnt}, activation_checkpointing=True,
                           bf16_residual=True)
    dtypes = _stream_dtypes(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (ref, _), (out, _) = run(eager, eager, dit_inputs()), run(net, model, dit_inputs())
    assert cnt.frame_count == 3 and all(d == {torch.bfloat16} for d in dtypes)  # blocks, stem, head
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=0.05 * ref.float().abs().max().item())
    with pytest.raises(ValueError, match="training.bf16_residual: UNet has no transformer blocks"):
        prepare_backbone(tiny_unet(), bf16_residual=True)


def test_bf16_residual_backbone_counts_its_flops_on_the_meta_device():
    """The benchmark's FLOP cross-check runs the prepared backbone on the meta device, where autocast is undefined:
    the cast wrapper leaves meta tensors alone and the count equals the plain backbone's."""
    plain, model = tiny_dit(), tiny_dit()
    net = prepare_backbone(model, bf16_residual=True)
    assert flop_counter_macs(net, size=8) == flop_counter_macs(plain, size=8) > 0


# ------------------------------------------------------------------------------------------------
# attention kernel
# ------------------------------------------------------------------------------------------------
SDPA_OPS = {"math": "aten::_scaled_dot_product_attention_math",
            "flash": "aten::_scaled_dot_product_flash_attention_for_cpu"}


def sdpa_ops(fn) -> dict[str, int]:
    """How many times each CPU attention kernel of :data:`SDPA_OPS` ran in ``fn()``."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    names = [e.name for e in prof.events()]
    return {kernel: names.count(op) for kernel, op in SDPA_OPS.items()}


@pytest.mark.parametrize("value, choice", [(None, "auto"), ("auto", "auto"), ("Flash", "flash"), ("cudnn", "cudnn")])
def test_attention_choice(value, choice):
    assert attention_choice(value) == choice


def test_attention_choice_rejects_other_values():
    with pytest.raises(ValueError, match="training.attention must be one of auto, flash, cudnn, efficient, math, "
                                         "got 'fa3'"):
        attention_choice("fa3")


@pytest.mark.parametrize("choice, other", [("math", "flash"), ("flash", "math")])
@pytest.mark.parametrize("compile_", ["false", "blocks"])
def test_attention_kernel_runs_in_every_block_and_in_the_recomputation(choice, other, compile_):
    """Only the chosen kernel runs: in each block's forward, and again when the checkpointed blocks are
    recomputed in the backward pass (outside the step's call); output and gradients are the default's.
    Compiled blocks keep the kernel chosen when they were traced (the math kernel is decomposed there, so
    only the other kernel's absence is seen)."""
    eager, model = tiny_dit(), tiny_dit()
    options = {"compile_options": {"backend": "aot_eager"}} if compile_ == "blocks" else {}
    torch._dynamo.reset()
    net = prepare_backbone(model, compile=compile_, activation_checkpointing=True, attention=choice, **options)
    run(net, model, dit_inputs(1))  # compiles outside the profiled calls
    ref, ref_grads = run(eager, eager, dit_inputs())
    model.zero_grad(set_to_none=True)
    holder = {}
    forward = sdpa_ops(lambda: holder.update(out=net(*dit_inputs())))
    backward = sdpa_ops(lambda: holder["out"].square().mean().backward())
    if compile_ == "false" or choice == "flash":
        assert forward == backward == {choice: 3, other: 0}  # 3 blocks, each checkpointed block recomputed
    assert forward[other] == backward[other] == 0
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert_same((ref, ref_grads), (holder["out"].detach(), grads), rtol=1e-4, atol=1e-6)


def test_attention_choice_keys_the_compile_caches():
    """Compiled code cached on disk under one kernel choice is not reused under another: the choice is in the
    caches' key while the backbone runs (reproduced with inductor on a CPU: without it, a flash run after a
    math run reused the math graph)."""
    seen = []
    net = with_attention(lambda: seen.append(torch.compiler.config.cache_key_tag), "math")
    before = torch.compiler.config.cache_key_tag
    net()
    assert seen == [f"{before}|sdpa=math"] and torch.compiler.config.cache_key_tag == before


def test_attention_auto_leaves_torch_to_choose():
    model = tiny_dit()
    assert prepare_backbone(model, attention="auto") is model
    assert sdpa_ops(lambda: model(*dit_inputs())) == {"math": 0, "flash": 3}  # torch's CPU choice


def test_attention_kernel_runs_in_a_controlnets_copy_too():
    """The choice wrapped the backbone only: a ControlNet fine-tune's copy, the part that trains, ran torch's."""
    from dataclasses import replace

    module = build_module(compose_train(TINY + ["model=dit_tiny", "finetune=controlnet", "training.attention=math"]))
    x, t = torch.randn(2, 3, 16, 16), torch.full((2,), 300.0)
    cond = replace(module.conditioner({"label": torch.tensor([0, 1])}), control=torch.rand(2, 1, 16, 16))
    with torch.no_grad():
        ops = sdpa_ops(lambda: module.net(x, t, cond))
    blocks = len(module.backbone.blocks) + len(module.controlnet.blocks)
    assert ops == {"math": blocks, "flash": 0}


def test_a_model_loaded_for_sampling_drops_the_training_only_options(tmp_path):
    """A run trained with training.attention=cudnn could not be sampled on a CPU (no viable kernel), and fp8 runs
    sampled with float8 matmuls: the sampling model is built without them."""
    from omegaconf import OmegaConf

    from diffusion_train.training.build import checkpoint_module

    cfg = compose_train(TINY + ["model=dit_tiny"], tmp_path)
    module = build_module(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    config["training"].update(attention="cudnn", fp8=True, bf16_residual=True, activation_checkpointing=True)
    ckpt = {"state_dict": module.state_dict(), "diffusion_train": {"config": config}}
    loaded = checkpoint_module(ckpt, "raw")
    assert loaded.net is loaded.backbone and loaded.attention == "auto" and not loaded.fp8
    x, t = torch.randn(2, 3, 16, 16), torch.full((2,), 300.0)
    cond = loaded.conditioner({"label": torch.tensor([0, 1])})
    with torch.no_grad():
        torch.testing.assert_close(loaded.net(x, t, cond), module.net(x, t, cond))


def test_cuda_only_attention_kernels_refuse_the_cpu():
    check_attention_device("flash", torch.device("cpu"))
    check_attention_device("math", torch.device("cpu"))
    for choice in ("cudnn", "efficient"):
        with pytest.raises(RuntimeError, match=f"training.attention={choice} needs a CUDA GPU, but the model is on"):
            check_attention_device(choice, torch.device("cpu"))
    module = build_module(compose_train(TINY + ["model=dit_tiny", "training.attention=cudnn"]))
    with pytest.raises(RuntimeError, match="training.attention=cudnn needs a CUDA GPU"):
        module.on_fit_start()


# ------------------------------------------------------------------------------------------------
# channels-last
# ------------------------------------------------------------------------------------------------
def test_trainer_benchmark_sets_cudnn_autotuning(monkeypatch):
    """trainer.benchmark=true reaches torch.backends.cudnn.benchmark through Lightning's Trainer; the default
    (null) leaves it as it was; the benchmark script names it among the speed options."""
    from hydra.utils import instantiate

    for value, expected in (("true", True), ("null", False)):
        monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
        cfg = compose_train([*TINY, f"trainer.benchmark={value}"])
        instantiate(cfg.trainer, logger=False, enable_checkpointing=False, default_root_dir=None)
        assert torch.backends.cudnn.benchmark is expected
    script = load_script("bench_report")
    assert script.speed_options({"compile": "true"}, True) == "compiled, cuDNN benchmark"
    assert script.speed_options({"compile": "blocks", "activation_checkpointing": 14, "fp8": True}) == \
        "blocks compiled, activation checkpointing of the first 14 blocks, fp8"
    assert script.speed_options({"compile": "blocks", "bf16_residual": True}) == "blocks compiled, bf16 residual"
    assert script.speed_options({"compile": "blocks", "attention": "flash"}) == "blocks compiled, flash attention"
    assert script.speed_options({"compile": "blocks", "attention": "auto"}) == "blocks compiled"


def test_channels_last_unet(tmp_path):
    """NHWC conv weights and input, the eager output, and weights that still export to safetensors."""
    eager, model = tiny_unet(), tiny_unet()
    net = prepare_backbone(model, channels_last=True)
    convs = [p for p in model.parameters() if p.ndim == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert not all(p.is_contiguous() for p in convs)
    seen = []
    model.conv_in.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    out, _ = run(net, model, unet_inputs())
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous()
    torch.testing.assert_close(out, eager(*unet_inputs()).detach(), rtol=0, atol=1e-5)

    state = model.state_dict()
    (path,) = export_weights(state, None, tmp_path)
    loaded = load_file(str(path))
    assert loaded.keys() == state.keys()
    for name, value in state.items():
        assert torch.equal(loaded[name], value), name


# ------------------------------------------------------------------------------------------------
# float8
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mlp_ratio, layers", [
    (4.0, ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")),
    (1.125, ("attn.qkv", "attn.proj")),  # the MLP is 72 wide: not a multiple of 16
], ids=["mlp4", "mlp1.125"])
def test_fp8_swaps_the_block_linears(mlp_ratio, layers):
    """Exactly the block Linears 16-aligned in both widths, except adaLN; close to the float32 model."""
    eager, model = tiny_dit(depth=2, mlp_ratio=mlp_ratio), tiny_dit(depth=2, mlp_ratio=mlp_ratio)
    keys = list(model.state_dict())
    assert prepare_backbone(model, fp8=True) is model
    expected = {f"blocks.{i}.{layer}" for i in range(2) for layer in layers}
    swapped = {n for n, m in model.named_modules() if type(m).__name__ == "Float8Linear"}
    assert swapped == expected
    linears = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    assert {"blocks.0.adaLN_modulation.1", "final_layer.linear", "final_layer.adaLN_modulation.1",
            "cond_embedder.vector_proj", "cond_embedder.t_embedder.mlp.0"} <= linears
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert list(model.state_dict()) == keys

    (out_ref, grads_ref), (out, grads) = run(eager, eager, dit_inputs()), run(model, model, dit_inputs())
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads.values())
    assert (out - out_ref).norm() / out_ref.norm() < 0.1
    flat = lambda gs: torch.cat([g.flatten() for g in gs.values()])  # noqa: E731
    assert (flat(grads) - flat(grads_ref)).norm() / flat(grads_ref).norm() < 0.1


def test_convert_fp8_returns_the_count():
    """Four Linears per DiT block (qkv, proj, two MLP layers)."""
    assert convert_fp8(tiny_dit(depth=3)) == 12


def test_fp8_without_eligible_linear_raises():
    """No 16-aligned Linear in the blocks: refused, and nothing swapped."""
    model = tiny_dit(depth=2, hidden_size=36, num_heads=3)  # widths 36, 108, 144 -> 36
    with pytest.raises(ValueError, match="training.fp8"):
        convert_fp8(model)
    assert not any(type(m).__name__ == "Float8Linear" for m in model.modules())


def test_check_fp8_device(monkeypatch):
    """A CPU passes; a GPU below compute capability 8.9 is refused, naming the card."""
    check_fp8_device(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "A100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (8, 0))
    with pytest.raises(RuntimeError, match=r"8\.9") as e:
        check_fp8_device(torch.device("cuda"))
    assert "A100" in str(e.value) and "8.0" in str(e.value)
    for ok in [(8, 9), (9, 0), (10, 0)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, ok=ok, **k: ok)
        check_fp8_device(torch.device("cuda"))
