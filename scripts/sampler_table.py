"""Error of every sampler against known answers on 2-D toy data, as markdown tables.

    python scripts/sampler_table.py [--steps 5 10 20 50] [--n 20000] [--seed 0]

Data: a Gaussian (per-dimension mean and std) and a 3-component mixture of Gaussians, whose optimal
denoisers E[x0 | x_t] are exact (``scripts/analytic.py``), so all error is the sampler's. Each run
starts like ``Sampler`` does (standard normal noise scaled to sqrt(a^2 + s^2) at the first timestep)
with the same noise for every sampler. Metrics:

- PF: mean |out - exact|, Gaussian data, deterministic samplers: the exact probability-flow output
  from the same starting noise (closed form), so this is pure discretisation error.
- W2: 2-Wasserstein distance between the Gaussian fit (mean, covariance) of the samples and the
  data's exact mean and covariance; a "data" row gives the floor from sampling N points of the data,
  and for the Gaussian an "exact PF-ODE" row per grid gives the W2 of the exact solution from the same
  noise (its floor: finite N, the N(0, a^2 + s^2) start, and E[x0 | x] returned at the last timestep).

Cells are ``error (NFE)``. Identical samplers (euler = ddim eta=0 = flow_euler; euler_ancestral eta=1 =
ddpm) are run separately, checked to give the same samples, and shown as one row.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analytic import Gaussian, Mixture, moments, w2_gaussian  # noqa: E402

from diffusion_train.diffusion import (  # noqa: E402
    EDMSchedule,
    FlowSchedule,
    LinearSchedule,
    Sampler,
    ddim,
    ddpm,
    dpmpp_2m,
    dpmpp_2s,
    dpmpp_3m,
    euler,
    euler_ancestral,
    flow_euler,
    flow_heun,
    heun,
)


def heun_churn(*args, **kwargs):
    return heun(*args, s_churn=10.0, **kwargs)


# row label -> (solvers that must give identical samples, deterministic?)
ROWS = {
    "ddim = euler": ([ddim, euler], True),
    "ddim = euler = flow_euler": ([ddim, euler, flow_euler], True),
    "ddpm = euler_ancestral": ([ddpm, euler_ancestral], False),
    "dpmpp_2m": ([dpmpp_2m], True),
    "dpmpp_2s": ([dpmpp_2s], True),
    "dpmpp_3m": ([dpmpp_3m], True),
    "heun": ([heun], True),
    "heun s_churn=10": ([heun_churn], False),
    "flow_heun": ([flow_heun], True),
}
CONFIGS = [  # (schedule label, schedule, spacing, rows)
    ("VP linear", LinearSchedule(), "karras",
     ["ddim = euler", "ddpm = euler_ancestral", "dpmpp_2m", "dpmpp_2s", "dpmpp_3m", "heun", "heun s_churn=10"]),
    ("VP linear", LinearSchedule(), "leading", ["ddim = euler", "ddpm = euler_ancestral"]),
    ("EDM", EDMSchedule(), "karras",
     ["ddim = euler", "ddpm = euler_ancestral", "dpmpp_2m", "dpmpp_2s", "dpmpp_3m", "heun", "heun s_churn=10"]),
    ("flow", FlowSchedule(), "linspace",
     ["ddim = euler = flow_euler", "ddpm = euler_ancestral", "dpmpp_2m", "dpmpp_2s", "dpmpp_3m", "flow_heun"]),
]


def run_cell(data_cls, schedule, spacing, row, steps, noise, seed):
    """(samples, nfe) for one table cell, after checking that every solver of the row agrees."""
    outs, nfes = [], []
    for solver in ROWS[row][0]:
        den = data_cls(schedule)
        sampler = Sampler(solver, steps, spacing)
        outs.append(sampler(den, noise, generator=torch.Generator().manual_seed(seed)).double())
        nfes.append(den.nfe)
    for other in outs[1:]:
        if not torch.equal(other, outs[0]):
            raise AssertionError(f"{row} on {spacing}: the solvers of this row disagree")
    return outs[0], nfes[0]


def table(title, header_steps, rows):
    lines = [f"**{title}**", "", "| schedule | spacing | sampler | " + " | ".join(f"{s} steps" for s in header_steps)
             + " |", "|---|---|---|" + "---:|" * len(header_steps)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50])
    ap.add_argument("--n", type=int, default=20000, help="samples per run")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    noise = torch.randn(args.n, 2, generator=torch.Generator().manual_seed(args.seed))

    out = []
    for data_name, data_cls in (("Gaussian", Gaussian), ("mixture", Mixture)):
        pf_rows, w2_rows = [], []
        ref = data_cls(LinearSchedule())
        floor = data_cls(LinearSchedule()).sample(args.n, torch.Generator().manual_seed(args.seed + 1))
        m, c = moments(floor)
        floor_w2 = f"{w2_gaussian(m, c, ref.mean, ref.cov):.4f}"
        w2_rows.append(["data", "", f"N = {args.n} draws"] + [floor_w2] * len(args.steps))
        for label, schedule, spacing, rows in CONFIGS:
            if data_name == "Gaussian":  # the floor for this grid: the exact PF-ODE map of the same noise
                cells = []
                for steps in args.steps:
                    ts = schedule.timesteps(steps, spacing)
                    x = noise * torch.stack(schedule.alpha_sigma(ts[:1])).square().sum().sqrt()
                    m, c = moments(Gaussian(schedule).exact_output(x, ts))
                    cells.append(f"{w2_gaussian(m, c, ref.mean, ref.cov):.4f}")
                w2_rows.append([label, spacing, "*exact PF-ODE*"] + cells)
            for row in rows:
                pf_cells, w2_cells = [], []
                for steps in args.steps:
                    samples, nfe = run_cell(data_cls, schedule, spacing, row, steps, noise, args.seed + 7)
                    m, c = moments(samples)
                    w2_cells.append(f"{w2_gaussian(m, c, ref.mean, ref.cov):.4f} ({nfe})")
                    if data_name == "Gaussian" and ROWS[row][1]:
                        den = Gaussian(schedule)
                        ts = schedule.timesteps(steps, spacing)
                        x = noise * torch.stack(schedule.alpha_sigma(ts[:1])).square().sum().sqrt()
                        pf = float((samples - den.exact_output(x, ts)).abs().mean())
                        pf_cells.append(f"{pf:.1e} ({nfe})")
                w2_rows.append([label, spacing, row] + w2_cells)
                if pf_cells:
                    pf_rows.append([label, spacing, row] + pf_cells)
        if pf_rows:
            out.append(table(f"{data_name} data: PF error, mean |out - exact probability-flow output| (NFE)",
                             args.steps, pf_rows))
        out.append(table(f"{data_name} data: W2 between Gaussian fits of samples and data (NFE)", args.steps,
                         w2_rows))
    print("\n\n".join(out))


if __name__ == "__main__":
    main()
