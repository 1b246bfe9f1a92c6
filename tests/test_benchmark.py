"""FLOPs accounting (diffusion_train/scaling/flops.py) and scripts/benchmark.py on the CPU. No timings are asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from diffusion_train.models import DiT
from diffusion_train.training import benchmark as step_benchmark
from diffusion_train.scaling import (
    counted_macs,
    dit_macs,
    flop_counter_macs,
    forward_macs,
    mmdit_macs,
    training_flops_per_image,
)
from conftest import compose_train, load_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "benchmark.py"


def backbone(model: str, *, context_dim: int = 0, cond_dim: int = 16, size: int = 16, device: str = "cpu",
             overrides: tuple[str, ...] = ()):
    cfg = compose_train([f"model={model}", *overrides], run_dir=Path("/nonexistent"))
    dims = {"context_dim": context_dim} if context_dim else {}
    with torch.device(device):
        return instantiate(cfg.model, in_channels=4, input_size=size, cond_dim=cond_dim, _convert_="all", **dims)


@pytest.mark.parametrize("model", ["dit_tiny", "mmdit_tiny", "unet_tiny"])
@pytest.mark.parametrize("context", [0, 24], ids=["no-text", "text"])
def test_forward_macs_match_flop_counter(model, context):
    """Our count against torch.utils.flop_counter (its FLOPs / 2) on the tiny presets, with and without
    cross-attention. Both count matmuls, convolutions and the attention matmuls and leave out norms,
    activations, biases and other elementwise ops, so they agree exactly today; 2% leaves room for a
    layer one side counts differently."""
    net = backbone(model, context_dim=context)
    length = 7 if context else None
    ours = forward_macs(net, context_len=length)
    theirs = flop_counter_macs(net, context_len=length or 0)
    assert ours > 0 and theirs > 0
    assert abs(ours - theirs) / theirs < 0.02, (ours, theirs)
    assert training_flops_per_image(net, context_len=length) == 6 * ours


@pytest.mark.parametrize("model", ["dit_tiny", "unet_tiny"])
def test_counted_macs_is_independent_of_the_weights_device(model):
    """The count runs on the meta device: it neither needs nor touches the module's real tensors."""
    net = backbone(model, context_dim=24)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert counted_macs(net, context_len=7) == flop_counter_macs(net, context_len=7)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.device.type == "cpu" for p in net.parameters())


def test_analytic_dit_matches_hook_count():
    """The analytic DiT formula against the independent hook count, at a non-square input."""
    net = backbone("dit_tiny", context_dim=24)
    assert forward_macs(net, size=(16, 24), context_len=5) == counted_macs(net, size=(16, 24), context_len=5)


@pytest.mark.parametrize("model", ["dit_tiny", "mmdit_tiny"])
def test_an_mlp_width_that_is_not_a_whole_multiple_is_counted_exactly(model):
    """hidden 352 x mlp_ratio 8/3 makes an MLP 938 wide; recovering it as out_features / hidden x hidden in
    floating point gave 937."""
    net = backbone(model, device="meta", overrides=("model.hidden_size=352", "model.num_heads=4",
                                                    "model.mlp_ratio=2.6666666666666665"))
    assert forward_macs(net) == flop_counter_macs(net)


def test_dit_presets_reproduce_the_dit_paper():
    """DiT paper, Table 4 ("Gflops" at 256 px = 32x32x4 latents, learned sigma, class lookup table):
    6.06 / 23.01 / 80.71 / 118.64. Our multiply-add counts give the same numbers, so the paper's
    "Gflops" are multiply-adds (fvcore's convention); one DiT-XL/2 forward is ~237 GFLOPs."""
    paper = {("S", 384, 12): 6.06, ("B", 768, 12): 23.01, ("L", 1024, 24): 80.71, ("XL", 1152, 28): 118.64}
    for (_, hidden, depth), gmacs in paper.items():
        ours = dit_macs(input_size=32, in_channels=4, out_channels=8, hidden_size=hidden, depth=depth, patch_size=2)
        assert ours / 1e9 == pytest.approx(gmacs, rel=0.005)


def test_big_presets_on_meta():
    """The benchmark targets' full-size backbones, built on the meta device (no memory)."""
    xl2 = backbone("dit_xl2", cond_dim=256, size=32, device="meta")
    assert isinstance(xl2, DiT)
    assert forward_macs(xl2) / 1e9 == pytest.approx(118.6, rel=0.002)
    assert forward_macs(xl2) == flop_counter_macs(xl2)
    unet = backbone("unet_sd", context_dim=1024, cond_dim=0, size=32, device="meta",
                    overrides=("model.attention_resolutions=[32,16,8]",))
    assert sum(p.numel() for p in unet.parameters()) / 1e6 == pytest.approx(891.7, abs=0.1)
    assert forward_macs(unet, context_len=77) == flop_counter_macs(unet, context_len=77)
    assert forward_macs(unet, context_len=77) / 1e9 == pytest.approx(90.57, rel=0.001)
    sd3 = backbone("mmdit", context_dim=4096, cond_dim=2048, size=32, device="meta", overrides=("model.depth=24",))
    ours = forward_macs(sd3, context_len=77)
    assert ours == flop_counter_macs(sd3, context_len=77)
    assert ours == mmdit_macs(input_size=32, in_channels=4, depth=24, cond_dim=2048, context_dim=4096, context_len=77)


def test_cross_attention_model_needs_the_context_length():
    with pytest.raises(ValueError, match="context_len"):
        forward_macs(backbone("dit_tiny", context_dim=24))


def import_script(name: str = "benchmark"):
    return load_script(name)


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # one thread: no spinning on shared cores
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=240)


@pytest.mark.slow
def test_script_end_to_end_on_cpu(tmp_path, capsys):
    out, md = tmp_path / "result.json", tmp_path / "bench.md"
    md.write_text("# Benchmarks\n\nintro\n\n<!-- scripts/benchmark.py adds result tables above this line -->\n\n"
                  "## Later section\n")
    # logging every 2nd step: 2 of the 4 timed steps (2 to 5) log, and are counted apart
    proc = run_script("config=model=dit_tiny data.batch_size=3 trainer.log_every_n_steps=2", "latent=4x16x16",
                      "classes=10", "device=cpu",
                      "steps=2", "warmup=1", "repeats=2", "modes=both", "profile=2", f"out={out}", f"md={md}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout) == result
    assert result["schema"] == "diffusion_train.benchmark/1"
    assert result["inputs"] == {"batch": 3, "latent": [4, 16, 16], "moments": [8, 16, 16], "classes": 10,
                                "text_tokens": None, "text_width": None}
    assert result["settings"]["ema_decays"] == [0.999, 0.9999] and result["settings"]["compile"] == "false"
    flops = result["flops"]
    assert flops["forward_macs_per_image"] == flops["forward_macs_flop_counter"] > 0
    assert flops["training_flops_per_image"] == 6 * flops["forward_macs_per_image"]
    assert result["peak_flops"] is None and "6 x forward multiply-adds" in result["mfu_definition"]
    assert result["environment"]["torch"] == torch.__version__
    assert "config='model=dit_tiny data.batch_size=3 trainer.log_every_n_steps=2'" in result["command"]
    assert set(result["results"]) == {"lightning", "bare"} and result["settings"]["isolated"] is True
    pids = {row["pid"] for row in result["results"].values()}  # each mode timed in its own fresh process
    assert len(pids) == 2
    for mode, row in result["results"].items():
        assert row["status"] == "ok", row
        assert len(row["images_per_s_repeats"]) == 2 and row["images_per_s"] > 0 and row["step_ms"] > 0
        assert row["mfu"] is None and row["peak_memory_gib"] is None and row["compile_s"] is None
        assert row["host_syncs_per_step"] == 0 and row["host_sync_sites"] == {}  # on a CPU: what would wait for a GPU
        # the logging steps read the logged values (the loss, the non-finite streak) on purpose
        assert row["timed_logging_steps"] == 2 and row["host_syncs_per_logging_step"] >= 1
        assert 0 < sum(row["host_sync_sites_logging"].values()) <= 2 * row["host_syncs_per_logging_step"]
        assert row["first_step_s"] > 0 and row["warmup_s"] >= row["first_step_s"]
        prof = row["profile"]  # 2 more steps under the profiler: on a CPU its operators stand in for kernels
        assert prof["steps"] == 2 and prof["device"] == "cpu"
        assert 0 < prof["busy_ms_per_step"] <= prof["profiled_wall_ms_per_step"]
        assert prof["wall_ms_per_step"] == row["step_ms"]  # the idle share is taken against the unprofiled step
        assert {"matmul", "optimizer, clipping, EMA", "attention"} <= set(prof["categories"])
        assert sum(c["pct"] for c in prof["categories"].values()) == pytest.approx(100)
        assert prof["top"][0]["ms_per_step"] >= prof["top"][-1]["ms_per_step"] > 0
    assert result["results"]["lightning"]["batch_on_device_unchanged"] is True
    assert isinstance(result["lightning_overhead_pct"], float)

    result["results"]["lightning"]["host_sync_sites"] = {"module.py:10": 4}  # as a GPU run records them
    # per step of the 2 timed steps that do not log
    assert "Host syncs per step by line (lightning): `module.py:10` 2.00." in import_script().markdown(result)

    text = md.read_text()
    table = text[text.index("### dit_tiny"):text.index("<!-- scripts/benchmark.py")]
    assert "| mode | images/s | ms/step | MFU |" in table and "host syncs/step |" in table
    assert "bf16-mixed, not compiled; batch 3" in table
    assert "Logging steps (bare: step numbers that are multiples of 2, counted apart from the column): 2 of the " \
           "timed steps, " in table
    assert "1 warm-up step, each mode in its own process, medians" in table
    assert table.count("\n| lightning |") == 1 and table.count("\n| bare |") == 1
    assert "Profile (lightning), 2 steps: CPU operator time" in table and "Longest operators per step: `aten::" in table
    assert result["command"] in table and text.endswith("## Later section\n")

    # bench_summary.py: one table of results against the targets (which count on an H100 only)
    h100 = json.loads(json.dumps(result))  # the same result as if it came from the S/2 target run on an H100
    h100["environment"]["device_name"] = "NVIDIA H100 80GB HBM3"
    h100["config"]["choices"]["model"], h100["inputs"]["batch"], h100["inputs"]["latent"] = "dit_s2", 256, [4, 32, 32]
    h100["results"]["lightning"]["images_per_s"], h100["results"]["bare"]["images_per_s"] = 7100.0, 6900.0
    h200 = json.loads(json.dumps(h100))
    h200["environment"]["device_name"] = "NVIDIA H200"
    for name, value in (("h100.json", h100), ("h200.json", h200), ("other.json", {"a": 1})):
        (tmp_path / name).write_text(json.dumps(value))
    summary = import_script("bench_summary")
    assert summary.main([str(out), *(str(tmp_path / n) for n in ("h100.json", "h200.json", "other.json")),
                         f"md={tmp_path / 'summary.md'}"]) == 0
    captured = capsys.readouterr()
    assert "other.json: left out (not a diffusion_train.benchmark/1 result)" in captured.err
    rows = [ln.split(" | ") for ln in captured.out.splitlines() if ln.startswith("| dit_tiny")]
    assert [r[2:6] for r in rows] == [
        ["lightning", f"{result['results']['lightning']['images_per_s']:,.0f}", "-", "-"],
        ["bare", f"{result['results']['bare']['images_per_s']:,.0f}", "-", "-"],
        ["lightning", "7,100", "7,000", "yes (1.01x)"], ["bare", "6,900", "7,000", "no (0.99x)"],
        ["lightning", "7,100", "7,000", "not an H100"], ["bare", "6,900", "7,000", "not an H100"]]
    assert rows[0][1] == "not compiled" and rows[0][-1] == f"{result['lightning_overhead_pct']:+.1f} |"
    top = list(result["results"]["lightning"]["profile"]["categories"])[:3]
    assert [part.rsplit(" ", 1)[0] for part in rows[0][-2].split(", ")] == top  # the largest device-time shares
    assert (tmp_path / "summary.md").read_text() == captured.out
    assert summary.main([str(tmp_path / "other.json")]) == 1
    assert capsys.readouterr().err.strip().endswith("error: none of the files is a benchmark.py result")


def test_kernel_categories_and_busy_time():
    """Kernel names as cuBLAS, cuDNN, FlashAttention, Inductor and PyTorch's fused optimizer name them; busy time
    is the union of the kernels' intervals (overlaps count once, gaps not at all)."""
    from diffusion_train.training.kernel_profile import busy_us, category

    names = {"sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "matmul",
             "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT": "matmul",
             "triton_tem_fused_addmm_gelu_0": "matmul",
             "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>": "attention",
             "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x128": "attention",
             "void cudnn::fusion::compute_dot_do_o<true>(void const*, void const*, void*)": "attention",
             "void cudnn::fusion::convert_dq_to_16bits<true>(void const*, void*, unsigned int)": "attention",
             "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc": "convolution",
             "triton_red_fused_native_layer_norm_mul_add_3": "compiled fusions",
             "void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>": "optimizer, clipping, EMA",
             "void at::native::vectorized_layer_norm_kernel<c10::BFloat16, float>": "normalization",
             "Memcpy DtoD (Device -> Device)": "copies and fills",
             "void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float>": "copies and fills",
             "void at::native::vectorized_elementwise_kernel<4, GeluCUDAKernelImpl>": "elementwise and reductions",
             "aten::addmm": "matmul", "aten::_foreach_lerp_": "optimizer, clipping, EMA", "cudaLaunchKernel": "other"}
    assert {n: category(n) for n in names} == names
    assert busy_us([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17
    assert busy_us([]) == 0


def test_device_ranges_marked_by_record_function_are_not_kernels():
    """On a GPU the profiler also puts the optimizer's ``record_function`` range on the device timeline; it spans
    the optimizer's kernels and would count their time twice."""
    from types import SimpleNamespace

    from diffusion_train.training.kernel_profile import KernelProfile

    def event(name, start, end, annotation=False):
        return SimpleNamespace(name=name, device_type=torch.autograd.DeviceType.CUDA, is_user_annotation=annotation,
                               time_range=SimpleNamespace(start=start, end=end))

    profile = KernelProfile("cpu", steps=1)
    profile.cuda, profile.wall_s = True, 0.001
    profile._profiler = SimpleNamespace(events=lambda: [
        event("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", 0, 300),
        event("Optimizer.step#AdamW.step", 300, 500, annotation=True),
        event("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>", 310, 490),
        SimpleNamespace(name="aten::mm", device_type=torch.autograd.DeviceType.CPU, is_user_annotation=False,
                        time_range=SimpleNamespace(start=0, end=290))])
    summary = profile.summary()
    assert summary["kernels_per_step"] == 2 and summary["busy_ms_per_step"] == pytest.approx(0.48)
    assert {c: v["ms_per_step"] for c, v in summary["categories"].items()} == pytest.approx(
        {"matmul": 0.3, "optimizer, clipping, EMA": 0.18})


def test_a_run_profiles_its_steps(tiny_cfg, tmp_path):
    """callbacks.kernel_profile: steps 5-6 of a run (with gradient accumulation) under the profiler, steps 3-4
    timed without it; the summary in kernel_profile.json."""
    from diffusion_train.train import train

    cfg = tiny_cfg("trainer.max_steps=8", "training.accumulate_grad_batches=2", "callbacks.kernel_profile.steps=2",
                   "callbacks.kernel_profile.start=4")
    train(cfg, tmp_path / "run")
    report = json.loads((tmp_path / "run" / "kernel_profile.json").read_text())
    assert report["from_step"] == 5 and report["steps"] == 2 and report["device"] == "cpu"
    assert report["wall_ms_per_step"] != report["profiled_wall_ms_per_step"]  # the unprofiled steps 3-4
    assert 0 < report["busy_ms_per_step"] <= report["profiled_wall_ms_per_step"]
    assert {"matmul", "optimizer, clipping, EMA"} <= set(report["categories"]) and report["top"]


def test_text_conditioned_inputs(tmp_path):
    """text=LxD: the module gets precomputed L x D encodings through the weight-free T5 stand-in, all L tokens
    attended to without a mask (as Stable Diffusion's U-Nets), and the step runs on them (in-process, one loss,
    no timing)."""
    benchmark = import_script()
    opts = benchmark.parse_args(["config=model=unet_tiny", "text=9x40", "latent=4x16x16", "device=cpu"])
    cfg = benchmark.compose(benchmark.stand_in_args(opts) + opts["config"])
    module = step_benchmark.build(cfg, 0)
    batch, info = step_benchmark.make_batch(module, 2, torch.device("cpu"))
    assert info["text_tokens"] == 9 and info["text_width"] == 40 and info["classes"] is None
    assert batch["caption.context"].shape == (2, 9, 40) and "caption.mask" not in batch
    assert module.conditioner(batch).mask is None
    assert module.backbone.context_dim == 40 and batch["latent"].shape == (2, 8, 16, 16)
    loss = module.train().loss(batch, torch.Generator().manual_seed(0))
    assert loss.shape == (2,) and torch.isfinite(loss).all()


def test_bare_loop_autocasts_as_the_trainer():
    """The bare loop runs its step under the trainer's own autocast (Lightning's bf16-mixed plugin turns the
    weight-cast cache off), so the overhead the two loops measure is the loop's alone."""
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False, enable_checkpointing=False)
    want = trainer.precision_plugin.autocast_context_manager()
    got = step_benchmark.step_autocast(torch.device("cpu"), "bf16-mixed")
    assert (got.device, got.fast_dtype, got._cache_enabled) == (want.device, want.fast_dtype, want._cache_enabled)
    assert not got._cache_enabled
    with step_benchmark.step_autocast(torch.device("cpu"), "32-true"):
        assert not torch.is_autocast_enabled("cpu")


def test_bare_loop_makes_the_trainers_step():
    """The bare loop, the baseline of the Lightning overhead, runs the module's own loss and optimizer update:
    after the same steps on the same batch both modes hold the same weights."""
    benchmark = import_script()
    opts = benchmark.parse_args(["config=model=dit_tiny optim.lr=1e-3 lr_schedule.warmup_steps=2", "latent=4x8x8",
                                 "classes=3", "device=cpu", "precision=32-true", "steps=2", "warmup=1", "repeats=1"])
    cfg = benchmark.compose(benchmark.stand_in_args(opts) + opts["config"])
    modules = []
    opts["get_module"] = lambda: modules.append(step_benchmark.build(cfg, 0)) or modules[-1]
    batch, _ = step_benchmark.make_batch(step_benchmark.build(cfg, 0), 4, torch.device("cpu"))
    for mode in ("lightning", "bare"):
        assert step_benchmark.measure(mode, cfg, batch, opts, torch.device("cpu"), macs=1, peak=None)["status"] == "ok"
    lightning, bare = (m.state_dict() for m in modules)
    assert lightning.keys() == bare.keys()
    start = step_benchmark.build(cfg, 0).state_dict()
    assert not torch.equal(lightning["backbone.final_layer.linear.weight"], start["backbone.final_layer.linear.weight"])
    for key, value in lightning.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(bare[key], value, rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("arg", ["steps=0", "precision=fp8", "modes=fast", "latent=4x32", "text=77", "device=tpu",
                                 "nonsense", "batch=x", "compile=fast", "isolate=maybe"])
def test_bad_argument_is_one_error_line(arg, capsys):
    benchmark = import_script()
    assert benchmark.main([arg]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err


def test_bad_config_is_one_error_line(capsys):
    benchmark = import_script()
    assert benchmark.main(["config=model=dit_huge", "device=cpu", "md="]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: config:") and "dit_huge" in err and "\n" not in err


def test_an_error_in_a_modes_own_process_is_one_error_line(capsys):
    """A config that composes but cannot be built fails in the process timing the first mode: its error is the
    script's one error line, naming the mode."""
    benchmark = import_script()
    assert benchmark.main(["config=model=dit_tiny model.num_heads=5", "latent=4x8x8", "classes=3", "device=cpu",
                           "md="]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: modes=lightning: hidden_size=32 is not divisible by num_heads=5")
    assert sum(line.startswith("error:") for line in err) == 1


def test_every_command_of_gpu_checks_parses(tmp_path):
    """scripts/gpu_checks.sh run with a Python that only records its arguments (and a stand-in nvidia-smi): every
    script call's arguments parse and its config composes, and every training run's overrides compose, so a
    GPU call is not lost to a misspelt option."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.jsonl"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 81559 MiB, 580.00'\n")
    # The preemption check waits for the run's step-10 checkpoint before it signals the run: the recorder makes it.
    (bin_dir / "record").write_text(
        f"#!{sys.executable}\nimport json, pathlib, sys\n"
        f"open({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "for a in sys.argv[1:]:\n"
        "    if a.startswith('hydra.run.dir=') and a.endswith('/preempt'):\n"
        "        ckpt = pathlib.Path(a.split('=', 1)[1]) / 'checkpoints' / 'step_0000010.ckpt'\n"
        "        ckpt.parent.mkdir(parents=True, exist_ok=True)\n"
        "        ckpt.touch()\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHON": str(bin_dir / "record"),
           "OUT": str(tmp_path / "out"), "CHECKS": "train,bench,syncs,levers,autotune,fp8,bf16res", "FMNIST": str(tmp_path),
           "BUNDLE": str(tmp_path / "results.tgz")}
    out = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_checks.sh")], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    import tarfile

    with tarfile.open(tmp_path / "results.tgz") as bundle:  # what comes back from the GPU machine: no checkpoints
        names = bundle.getnames()
    assert "./summary.txt" in names and "./gpu.txt" in names and not [n for n in names if n.endswith(".ckpt")]
    assert (tmp_path / "out" / "runs" / "preempt" / "checkpoints" / "step_0000010.ckpt").exists()
    argvs = [json.loads(line) for line in calls.read_text().splitlines()]
    scripts = {name: import_script(name) for name in ("benchmark", "sync_probe", "compare_runs")}
    seen: dict[str, int] = {}
    for argv in argvs:
        head = argv[0] if argv[0] != "-m" else argv[1]
        if head in ("-c", "-"):  # the inline version print and checkpoint listing
            continue
        name = Path(head).stem if head.endswith(".py") else head
        seen[name] = seen.get(name, 0) + 1
        if name in ("benchmark", "sync_probe"):
            opts = scripts[name].parse_args(argv[1:])
            scripts["benchmark"].compose(scripts["benchmark"].stand_in_args(opts) + opts["config"])
        elif name == "compare_runs":
            runs, opts = scripts[name].parse_args(argv[1:])
            assert len(runs) == 2 and "train/loss" in opts["metrics"]
        elif name == "diffusion_train.train":
            compose_train(argv[2:])
        else:
            raise AssertionError(f"gpu_checks.sh calls {argv} that this test does not check")
    assert seen["benchmark"] >= 20 and seen["sync_probe"] == 2 and seen["compare_runs"] == 2, seen
    assert seen["diffusion_train.train"] == 10, seen  # bf16, compile, DDP, FSDP, preemption and its relaunch,
    # the fp8 and bf16-residual pairs

    # A budget for the whole script: with too little left, steps are skipped and listed, and the summary written
    late = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_checks.sh")], env={**env, "CHECKS": "levers",
                          "DEADLINE": "20", "OUT": str(tmp_path / "late")}, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    summary = (tmp_path / "late" / "summary.txt").read_text().splitlines()
    assert late.returncode == 0 and len(summary) >= 20 and all("skipped: " in line for line in summary), summary
