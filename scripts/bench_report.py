"""The markdown of ``scripts/benchmark.py`` results: the table added to docs/benchmarks.md, and the words for a
config's speed options (also used by ``scripts/bench_summary.py``)."""

from __future__ import annotations

from pathlib import Path

from diffusion_train.files import write_text
from diffusion_train.training.kernel_profile import describe
from diffusion_train.training.speed import compile_choice

OVERHEAD_TARGET_PCT = 3.0  # the Lightning loop's step time over the bare loop's, at most
MARKER = "<!-- scripts/benchmark.py adds result tables above this line -->"


def fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def markdown(result: dict) -> str:
    env, inp, fl, s = result["environment"], result["inputs"], result["flops"], result["settings"]
    sha = (result["git_sha"] or "unknown")[:10] + (" (uncommitted changes)" if result["git_dirty"] else "")
    cond = ", ".join(x for x in (f"{inp['classes']} classes" if inp["classes"] else "",
                                 f"text {inp['text_tokens']}x{inp['text_width']}" if inp["text_tokens"] else "") if x)
    options = speed_options({**result['config']['training'], 'compile': s['compile']}, s.get('cudnn_benchmark'))
    steps = f"{s['repeats']} repeats x {s['steps']} steps after {s['warmup']} warm-up step" + "s" * (s["warmup"] > 1)
    steps += ", each mode in its own process" if s.get("isolated") else ""
    lines = [
        f"### {result['label']}: {result['date'][:10]}, {env['device_name']}", "",
        f"`{result['command']}`", "",
        f"torch {env['torch']}, lightning {env['lightning']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, "
        f"driver {env['driver']}, python {env['python']}; git {sha}. {s['precision']}, "
        f"{options}; batch {inp['batch']} of {'x'.join(map(str, inp['latent']))} latents "
        f"({cond or 'unconditional'}); {result['params']['trainable'] / 1e6:.1f}M trainable parameters; forward "
        f"{fl['forward_macs_per_image'] / 1e9:.4g} GMACs/image ({fl['counting']}; flop_counter "
        f"{fl['forward_macs_flop_counter'] / 1e9:.4g}); {steps}, medians; EMA decays {s['ema_decays']}; MFU "
        f"against {fmt(result['peak_flops'] and result['peak_flops'] / 1e12, '.0f')} TFLOP/s.", "",
        "| mode | images/s | ms/step | MFU | TFLOP/s | peak memory (GiB) | first step (s) | compile (s) "
        "| host syncs/step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, row in result["results"].items():
        if row["status"] != "ok":
            lines.append(f"| {mode} | {row['status']} | - | - | - | {fmt(row['peak_memory_gib'], '.1f')} | - | - | - |")
            continue
        lines.append(f"| {mode} | {row['images_per_s']:,.1f} | {row['step_ms']:.1f} | {fmt(row['mfu'], '.1%')} | "
                     f"{row['achieved_tflops']:.1f} | {fmt(row['peak_memory_gib'], '.1f')} | "
                     f"{row['first_step_s']:.1f} | {fmt(row['compile_s'], '.1f')} | "
                     f"{fmt(row.get('host_syncs_per_step'), '.2f')} |")
    for mode, row in result["results"].items():
        logging = row.get("timed_logging_steps") or 0
        other = s["steps"] * s["repeats"] - logging
        if row.get("host_sync_sites"):
            sites = ", ".join(f"`{site}` {n / other:.2f}" for site, n in row["host_sync_sites"].items())
            lines += ["", f"Host syncs per step by line ({mode}): {sites}."]
        if logging:
            by_line = row.get("host_sync_sites_logging", {}).items()
            sites = ", ".join(f"`{site}` {n / logging:.2f}" for site, n in by_line)
            lines += ["", f"Logging steps ({mode}: step numbers that are multiples of {s.get('log_every_n_steps')}, "
                          f"counted apart from the column): {logging} of the timed steps, "
                          f"{fmt(row.get('host_syncs_per_logging_step'), '.2f')} host syncs each"
                          + (f" ({sites})" if sites else "") + "."]
    for mode, row in result["results"].items():
        if row.get("profile"):
            lines += ["", describe(row["profile"], mode)]
    if result["lightning_overhead_pct"] is not None:
        lines += ["", f"Lightning loop over the bare loop: {result['lightning_overhead_pct']:+.1f}% step time "
                      f"(target <= {OVERHEAD_TARGET_PCT:.0f}%)."]
    return "\n".join(lines) + "\n"


def speed_options(training: dict, cudnn_benchmark: bool = False) -> str:
    """The config's speed options in words (training/speed.py, and cuDNN's autotuning: trainer.benchmark)."""
    compile_ = compile_choice(training.get("compile"))
    words = [{"false": "not compiled", "true": "compiled", "blocks": "blocks compiled"}[compile_]]
    if compile_ != "false" and training.get("compile_options"):
        words[0] += f" ({', '.join(f'{k}={v}' for k, v in training['compile_options'].items())})"
    checkpointing = training.get("activation_checkpointing")  # true, or a number of blocks
    if checkpointing:
        blocks = "" if checkpointing is True else f" of the first {checkpointing} blocks"
        words.append("activation checkpointing" + blocks)
    words += [w for key, w in (("channels_last", "channels-last"), ("fp8", "fp8"), ("bf16_residual", "bf16 residual"))
              if training.get(key)]
    if training.get("attention") not in (None, "auto"):
        words.append(f"{training['attention']} attention")
    return ", ".join(words + ["cuDNN benchmark"] * bool(cudnn_benchmark))


def add_markdown(path: Path, text: str) -> None:
    old = path.read_text() if path.exists() else ""
    if MARKER in old:
        head, tail = old.split(MARKER, 1)
        new = head + text + "\n" + MARKER + tail
    else:
        new = old + ("\n" if old and not old.endswith("\n\n") else "") + text
    write_text(path, new)  # a kill mid-write leaves the old page, never a truncated one
