"""One markdown table from ``scripts/benchmark.py`` results (its ``out=`` JSON files), against the throughput
targets of one H100::

    python scripts/bench_summary.py gpu_checks/*.json
    python scripts/bench_summary.py gpu_checks/*.json md=summary.md

A row per file and mode: the config and its speed options, images/s, the target and whether it is met, MFU,
step time, peak memory, compile time, host syncs per step, the idle share of the device and its three largest
kernel categories (with ``profile=``), and the Lightning loop's overhead over the bare loop (when both ran). A
target counts only for its config (model, batch, 4x32x32 latents; the U-Net with 77 text tokens) on an H100; on
another card the row says so.
Files that are not benchmark results are named on stderr and left out.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

from bench_report import OVERHEAD_TARGET_PCT, fmt, speed_options  # noqa: E402

from diffusion_train.cli import UsageError, run_main  # noqa: E402
from diffusion_train.files import write_text  # noqa: E402

# (model preset, batch) -> images/s on one H100 80GB (bf16, EMA and AdamW in the step, 4x32x32 latents)
TARGETS = {("dit_xl2", 128): 640, ("dit_b2", 256): 2900, ("dit_s2", 256): 7000, ("unet_sd2", 64): 500}
TARGET_CARD = "H100"
SCHEMA = "diffusion_train.benchmark/1"


def target_of(result: dict) -> int | None:
    """The images/s target of ``result``'s config, or None when it is not one of the target configs."""
    inp = result["inputs"]
    model = result["config"]["choices"].get("model")
    target = TARGETS.get((model, inp["batch"]))
    if target is None or inp["latent"] != [4, 32, 32]:
        return None
    if model.startswith("unet") and inp.get("text_tokens") != 77:
        return None
    return target


def rows(result: dict) -> list[str]:
    card = result["environment"]["device_name"]
    target = target_of(result)
    options = speed_options({**result["config"]["training"], "compile": result["settings"]["compile"]},
                            result["settings"].get("cudnn_benchmark"))
    out = []
    for mode, row in result["results"].items():
        if row["status"] != "ok":
            out.append(f"| {result['label']} | {options} | {mode} | {row['status']} | {fmt(target, ',')} | - "
                       f"| - | - | {fmt(row['peak_memory_gib'], '.1f')} | - | - | - | - | - |")
            continue
        if target is None:
            met = "-"
        elif TARGET_CARD not in card:
            met = f"not an {TARGET_CARD}"
        else:
            met = f"{'yes' if row['images_per_s'] >= target else 'no'} ({row['images_per_s'] / target:.2f}x)"
        profile = row.get("profile") or {}
        kernels = ", ".join(f"{c} {v['pct']:.0f}%" for c, v in list(profile.get("categories", {}).items())[:3])
        overhead = result.get("lightning_overhead_pct") if mode == "lightning" else None
        out.append(f"| {result['label']} | {options} | {mode} | {row['images_per_s']:,.0f} | {fmt(target, ',')} "
                   f"| {met} | {fmt(row['mfu'], '.1%')} | {row['step_ms']:.1f} "
                   f"| {fmt(row['peak_memory_gib'], '.1f')} "
                   f"| {fmt(row['compile_s'], '.0f')} | {fmt(row.get('host_syncs_per_step'), '.1f')} "
                   f"| {fmt(profile.get('idle_pct'), '.0f')} | {kernels or '-'} | {fmt(overhead, '+.1f')} |")
    return out


def summary(paths: list[str]) -> str:
    if not paths:
        raise UsageError("give benchmark.py result files (JSON), e.g. gpu_checks/*.json")
    results = []
    for path in paths:
        try:
            result = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            print(f"{path}: left out ({type(e).__name__}: {e})", file=sys.stderr)
            continue
        if not isinstance(result, dict) or result.get("schema") != SCHEMA:
            print(f"{path}: left out (not a {SCHEMA} result)", file=sys.stderr)
            continue
        results.append(result)
    if not results:
        raise UsageError("none of the files is a benchmark.py result")
    cards = sorted({r["environment"]["device_name"] for r in results})
    shas = sorted({(r["git_sha"] or "unknown")[:10] for r in results})
    lines = [f"Cards: {', '.join(cards)}; code: {', '.join(shas)}. Targets: one {TARGET_CARD}; idle: the device's "
             f"share of the timed step without kernels; busy time: its largest kernel categories (both with "
             f"`profile=`); overhead: Lightning over the bare loop (target <= {OVERHEAD_TARGET_PCT:.0f}%).", "",
             "| config | options | mode | images/s | target | met | MFU | ms/step | peak GiB | compile s "
             "| syncs/step | idle % | busy time | overhead % |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        lines += rows(result)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)

    def run(args: list[str]) -> None:
        md = [a.split("=", 1)[1] for a in args if a.startswith("md=")]
        text = summary([a for a in args if not a.startswith("md=")])
        if md:
            write_text(md[-1], text)
        print(text, end="")
    return run_main(run, args)


if __name__ == "__main__":
    sys.exit(main())
