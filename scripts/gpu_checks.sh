#!/usr/bin/env bash
# GPU checks in one go (a machine with one GPU): the trainer on the GPU with bf16, torch.compile, DDP and
# FSDP (one device), preemption by SIGUSR1 and resume, then the training-step benchmarks of the four
# target configs. Logs and results go to $OUT (default: gpu_checks/).
#
#   bash scripts/gpu_checks.sh                    # everything
#   CHECKS=train bash scripts/gpu_checks.sh       # only the trainer checks (CHECKS=bench: only benchmarks)
#   CHECKS=levers bash scripts/gpu_checks.sh      # the speed options (docs/performance.md) against eager, same card
#   CHECKS=syncs bash scripts/gpu_checks.sh       # which parts of the step synchronise (scripts/sync_probe.py)
#   CHECKS=autotune bash scripts/gpu_checks.sh    # S/2 with Triton matmul templates (minutes of autotuning)
#   CHECKS=fp8 FMNIST=dir bash scripts/gpu_checks.sh  # bf16 against fp8 loss curves: DiT-B/2 on Fashion-MNIST (the
#                                                 # IDX files in dir), CURVE_STEPS (1500) steps each, compiled blocks
#   CHECKS=bf16res FMNIST=dir bash scripts/gpu_checks.sh  # the same for training.bf16_residual
#
# Each step has its own time limit and a failure does not stop the others; the summary at the end lists
# each step's exit status. The benchmark rows' JSON files make one table, on any machine:
#   python scripts/bench_summary.py "$OUT"/*.json   (done at the end too: $OUT/targets.md)
#
# DEADLINE=S: the whole script's budget in seconds. A step gets what is left if that is less than its own limit,
# and is skipped (and listed) with under 30 s left; the summary and tables are still written. BUNDLE=FILE.tgz:
# after each step, everything in $OUT but checkpoints and weights, packed into FILE (replaced whole). On a
# machine that returns only a few files from a folder, point OUT elsewhere and BUNDLE there; the assignment
# order matters, BUNDLE is read first:  BUNDLE=$OUT/gc.tgz OUT=/tmp/gc DEADLINE=540 CHECKS=levers bash ...
set -uo pipefail
OUT="${OUT:-gpu_checks}"
CHECKS="${CHECKS:-train,bench}"
PY="${PYTHON:-python3}"
DEADLINE="${DEADLINE:-0}"  # 0: none
FMNIST_DIR="${FMNIST:-/usr/share/datasets/fashion-mnist}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1
declare -a SUMMARY=()

bundle() {  # the results so far, without checkpoints and weights (GBs), replaced whole
    [[ -n ${BUNDLE:-} ]] || return 0
    tar -czf "$BUNDLE.tmp" -C "$OUT" --exclude "$(basename "$BUNDLE")" --exclude "$(basename "$BUNDLE").tmp" \
        --exclude '*.ckpt' --exclude '*.safetensors' . 2>/dev/null && mv "$BUNDLE.tmp" "$BUNDLE"
}

step() {  # step NAME SECONDS CMD...: runs CMD with a time limit (within DEADLINE), logs to $OUT/NAME.log
    local name=$1 limit=$2; shift 2
    if (( DEADLINE > 0 )); then
        local left=$((DEADLINE - SECONDS - 15))  # kept for the summary and the bundle
        if (( left < 30 )); then
            SUMMARY+=("$name skipped: ${left}s of DEADLINE=$DEADLINE left"); echo "== $name: skipped"; return 0
        fi
        (( left < limit )) && limit=$left
    fi
    local t0=$SECONDS
    timeout -k 20 "$limit" "$@" > "$OUT/$name.log" 2>&1  # killed 20 s after a stop that a compile does not see
    local rc=$?
    SUMMARY+=("$name rc=$rc $((SECONDS - t0))s")
    echo "== $name: rc=$rc in $((SECONDS - t0))s"; tail -n 3 "$OUT/$name.log"
    bundle
    return 0
}

finish() {  # the summary and the targets table, also when the script is stopped
    trap - EXIT TERM INT
    printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
    # The benchmark rows against the targets in one table (other JSON files are named and left out)
    if compgen -G "$OUT/*.json" > /dev/null; then
        $PY scripts/bench_summary.py "$OUT"/*.json md="$OUT/targets.md" > /dev/null 2>> "$OUT/summary.txt"
    fi
    bundle
}
trap finish EXIT
trap 'exit 143' TERM INT

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, lightning; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'lightning', lightning.__version__)" | tee -a "$OUT/gpu.txt"
# What every step needs (carried as wheels to a machine without them: docs/performance.md)
if ! $PY -c "import hydra, omegaconf" 2>> "$OUT/gpu.txt"; then
    SUMMARY+=("preflight: hydra-core / omegaconf cannot be imported ($PY); nothing was run"); exit 1
fi
FP8_OK=1
if ! $PY -c "import torchao.float8" 2>/dev/null; then
    FP8_OK=0; SUMMARY+=("preflight: no torchao: fp8 rows and curves skipped")
fi

RUNS="$OUT/runs"
T=(experiment=smoke data=synthetic ~data.val_size logger=csv trainer.max_steps=20 trainer.val_check_interval=10
   callbacks.sample_grid.every_n_steps=10 callbacks.checkpoint.every_n_train_steps=10 training.compile=false)
if [[ $CHECKS == *train* ]]; then
    step bf16 180 $PY -m diffusion_train.train "${T[@]}" trainer=gpu hydra.run.dir="$RUNS/bf16" training.compile=auto \
        trainer.log_every_n_steps=10 callbacks.host_syncs.start=3 callbacks.host_syncs.steps=14
    cp "$RUNS/bf16/host_syncs.json" "$OUT/host_syncs_bf16.json" 2>/dev/null
    step compile 240 $PY -m diffusion_train.train "${T[@]}" trainer=gpu training.compile=true model=dit_tiny \
        hydra.run.dir="$RUNS/compile"
    step ddp1 120 $PY -m diffusion_train.train "${T[@]}" trainer=ddp trainer.devices=1 hydra.run.dir="$RUNS/ddp1"
    step fsdp1 120 $PY -m diffusion_train.train "${T[@]}" trainer=fsdp trainer.devices=1 model=dit_tiny \
        trainer.strategy.param_dtype=bfloat16 hydra.run.dir="$RUNS/fsdp1"
    # preemption: SIGUSR1 once the step-10 checkpoint exists, then relaunch to the end
    P=("${T[@]}" trainer=gpu trainer.max_steps=200 callbacks.sample_grid.every_n_steps=1000 hydra.run.dir="$RUNS/preempt")
    preempt() {
        $PY -m diffusion_train.train "${P[@]}" & local pid=$!
        for _ in $(seq 600); do [[ -f $RUNS/preempt/checkpoints/step_0000010.ckpt ]] && break; sleep 0.1; done
        kill -USR1 $pid; wait $pid; local rc=$?
        echo "signalled run exited $rc (expected 138)"
        $PY -m diffusion_train.train "${P[@]}" && [[ $rc == 138 ]] && [[ -f $RUNS/preempt/weights/raw.safetensors ]]
    }
    step preempt 180 bash -c "$(declare -p P RUNS PY); $(declare -f preempt); preempt"
    $PY - "$RUNS" > "$OUT/checkpoints.txt" 2>&1 <<'PYEOF'
import sys, torch
from pathlib import Path
for ckpt in sorted(Path(sys.argv[1]).glob("*/checkpoints/last.ckpt")):
    c = torch.load(ckpt, map_location="cpu", weights_only=True)
    finite = all(torch.isfinite(v).all() for v in c["state_dict"].values() if v.is_floating_point())
    print(ckpt.parent.parent.name, "step", c["global_step"], "finite", finite, "ema", list(c.get("ema", {}).get("weights", {})),
          "world", c["diffusion_train"]["world_size"])
PYEOF
    cat "$OUT/checkpoints.txt"
fi

if [[ $CHECKS == *bench* ]]; then
    B=($PY scripts/benchmark.py md="$OUT/benchmarks.md" profile=2)
    step bench_dit_xl2 240 "${B[@]}" config="model=dit_xl2" batch=128 out="$OUT/dit_xl2.json"
    step bench_dit_b2 150 "${B[@]}" config="model=dit_b2" batch=256 out="$OUT/dit_b2.json"
    step bench_dit_s2 150 "${B[@]}" config="model=dit_s2" batch=256 out="$OUT/dit_s2.json"
    step bench_unet_sd2 240 "${B[@]}" config="model=unet_sd2 model.attention_resolutions=[32,16,8]" text=77x1024 \
        batch=64 out="$OUT/unet_sd2.json"
    step bench_dit_xl2_compile 300 "${B[@]}" config="model=dit_xl2" batch=128 compile=true modes=lightning \
        out="$OUT/dit_xl2_compile.json"
fi
if [[ $CHECKS == *syncs* ]]; then
    # Which parts of the step make the host wait for the GPU (scripts/sync_probe.py: each SDPA backend, one block,
    # the backbone, the conditioner, the loss, its backward, clipping + AdamW + schedule, EMA, the whole step),
    # then the Lightning loop against the bare loop with the lines that synchronise in each.
    step syncs_s2 120 $PY scripts/sync_probe.py config="model=dit_s2" batch=256 out="$OUT/probes/syncs_s2.json"
    step syncs_unet 150 $PY scripts/sync_probe.py config="model=unet_sd2 model.attention_resolutions=[32,16,8]" \
        text=77x1024 batch=64 out="$OUT/probes/syncs_unet.json"
    step syncs_s2_loops 120 $PY scripts/benchmark.py md="$OUT/benchmarks.md" config="model=dit_s2" batch=256 \
        compile=false modes=both warmup=2 steps=5 repeats=1 out="$OUT/syncs_s2_loops.json"
    cat "$OUT"/syncs_s2.log "$OUT"/syncs_unet.log > "$OUT/syncs.md" 2>/dev/null
fi
if [[ $CHECKS == *levers* ]]; then
    # The trainer's own loop (modes=lightning) with the default compilation of the target configs, each followed
    # by the speed options not yet measured on it, on the same card in the same call; then the rows measured once
    # already. Most important first: a time limit cuts the tail.
    L=($PY scripts/benchmark.py md="$OUT/benchmarks.md" modes=lightning warmup=3 steps=10 repeats=3 profile=2)
    S2=(config="model=dit_s2" batch=256); B2=(config="model=dit_b2" batch=256); XL=(config="model=dit_xl2" batch=128)
    UNC="model=unet_sd2 model.attention_resolutions=[32,16,8]"
    UN=(config="$UNC" text=77x1024 batch=64)
    UN_NCHW=(config="$UNC training.channels_last=false" text=77x1024 batch=64)  # the default before channels_last=auto
    UN_EMA4=(config="$UNC callbacks.ema.update_every=4" text=77x1024 batch=64)  # a quarter of the EMA's traffic
    UN_SD1=(config="model=unet_sd model.attention_resolutions=[32,16,8]" text=77x1024 batch=64)  # 8 heads per level
    step xl_blocks 150 "${L[@]}" "${XL[@]}" compile=blocks out="$OUT/xl_blocks.json"
    step s2_blocks 150 "${L[@]}" "${S2[@]}" compile=blocks modes=both out="$OUT/s2_blocks.json"  # + Lightning overhead
    step xl_full 240 "${L[@]}" "${XL[@]}" compile=true out="$OUT/xl_full.json"  # the code outside the blocks too
    step xl_full_bf16res 150 "${L[@]}" config="model=dit_xl2 training.bf16_residual=true" batch=128 compile=true \
        out="$OUT/xl_full_bf16res.json"
    step xl_flash 150 "${L[@]}" config="model=dit_xl2 training.attention=flash" batch=128 compile=blocks \
        out="$OUT/xl_flash.json"  # FlashAttention-2 instead of torch's choice (cuDNN's on an H100)
    step s2_flash 120 "${L[@]}" config="model=dit_s2 training.attention=flash" batch=256 compile=blocks \
        out="$OUT/s2_flash.json"
    step s2_full_bf16res 120 "${L[@]}" config="model=dit_s2 training.bf16_residual=true" batch=256 compile=true \
        out="$OUT/s2_full_bf16res.json"
    step unet_compiled 240 "${L[@]}" "${UN[@]}" compile=true out="$OUT/unet_compiled.json"  # channels-last (auto)
    step unet_nchw 240 "${L[@]}" "${UN_NCHW[@]}" compile=true out="$OUT/unet_nchw.json"
    step b2_blocks 120 "${L[@]}" "${B2[@]}" compile=blocks out="$OUT/b2_blocks.json"
    step b2_full_bf16res 150 "${L[@]}" config="model=dit_b2 training.bf16_residual=true" batch=256 compile=true \
        out="$OUT/b2_full_bf16res.json"
    step unet_eager 90 "${L[@]}" "${UN[@]}" compile=false modes=both out="$OUT/unet_eager.json"  # Lightning overhead
    step s2_graphs 150 "${L[@]}" config="model=dit_s2 training.compile_options={mode:reduce-overhead}" batch=256 \
        compile=true out="$OUT/s2_graphs.json"
    step unet_ema4 200 "${L[@]}" "${UN_EMA4[@]}" compile=true out="$OUT/unet_ema4.json"
    step unet_cudnn 150 "${L[@]}" config="$UNC trainer.benchmark=true" text=77x1024 batch=64 compile=true \
        out="$OUT/unet_cudnn.json"  # cuDNN autotuning of the convolutions
    (( FP8_OK )) && step xl_blocks_fp8 150 "${L[@]}" config="model=dit_xl2 training.fp8=true" batch=128 \
        compile=blocks out="$OUT/xl_blocks_fp8.json"
    step s2_eager 60 "${L[@]}" "${S2[@]}" compile=false out="$OUT/s2_eager.json"
    step unet_sd1_heads 200 "${L[@]}" "${UN_SD1[@]}" compile=true out="$OUT/unet_sd1_heads.json"
    for n in 14 28; do  # XL/2 at twice the target batch: half or all of the blocks recomputed (memory, speed)
        step "xl_b256_ckpt$n" 200 "${L[@]}" config="model=dit_xl2 training.activation_checkpointing=$n" batch=256 \
            compile=blocks out="$OUT/xl_b256_ckpt$n.json"
    done
fi
if [[ $CHECKS == *autotune* ]]; then
    # Triton matmul templates with fused epilogues (the GELU in the first MLP matmul's), the lever with the most
    # time left: a compile of over 4 minutes on a cold cache (S/2's blocks with every kernel autotuned), so a group
    # of its own. First only the matmuls autotuned (their epilogues fused), then everything (the mode).
    A=($PY scripts/benchmark.py md="$OUT/benchmarks.md" modes=lightning warmup=3 steps=10 repeats=3 profile=2)
    step s2_autotune_gemm 420 "${A[@]}" config="model=dit_s2 training.compile_options={options:{max_autotune_gemm:true}}" \
        batch=256 compile=blocks out="$OUT/s2_autotune_gemm.json"
    step s2_autotune 540 "${A[@]}" config="model=dit_s2 training.compile_options={mode:max-autotune-no-cudagraphs}" \
        batch=256 compile=blocks out="$OUT/s2_autotune.json"
fi
F=(experiment=fmnist model=dit_b2 model.patch_size=2 trainer=gpu
   data.root="$FMNIST_DIR" data.batch_size=256 trainer.max_steps="${CURVE_STEPS:-1500}"
   trainer.val_check_interval=250 trainer.log_every_n_steps=25 logger=csv training.compile=blocks
   callbacks.sample_grid.every_n_steps=100000 callbacks.checkpoint.every_n_train_steps=100000)
curves() {  # curves NAME OPTION: DiT-B/2 on Fashion-MNIST with OPTION false and true, loss curves side by side
    local name=$1 option=$2
    if [[ ! -d $FMNIST_DIR ]]; then
        SUMMARY+=("$name curves skipped: no Fashion-MNIST in $FMNIST_DIR (FMNIST=dir)"); return 0
    fi
    step "${name}_off" 280 $PY -m diffusion_train.train "${F[@]}" "$option=false" hydra.run.dir="$RUNS/${name}_off"
    step "${name}_on" 280 $PY -m diffusion_train.train "${F[@]}" "$option=true" hydra.run.dir="$RUNS/${name}_on"
    $PY scripts/compare_runs.py "$RUNS/${name}_off" "$RUNS/${name}_on" metrics=train/loss,val/loss,perf/images_per_sec \
        rows=13 out="$OUT/${name}_curves.md" plot="$OUT/${name}_curves.png"
    bundle
}
# Same data, seed and steps; only the option differs. Loss curves from each run's metrics.csv.
if [[ $CHECKS == *fp8* ]]; then
    if (( FP8_OK )); then curves fp8 training.fp8; else SUMMARY+=("fp8 curves skipped: no torchao"); fi
fi
[[ $CHECKS == *bf16res* ]] && curves bf16res training.bf16_residual
exit 0  # finish (the EXIT trap) writes the summary, the targets table and the last bundle
