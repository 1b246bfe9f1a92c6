"""Known-answer tests for the samplers (schedules and parameterizations: test_schedules.py).

The data are 2-D toy distributions whose optimal denoiser E[x0 | x_t] is known in closed form
(``scripts/analytic.py``): a Gaussian with a different mean and std per dimension and a mixture of
three Gaussians. For the Gaussian the probability-flow ODE is solvable exactly, so a deterministic
sampler's output can be compared sample by sample with the exact map; for the mixture the first two
moments of the samples are compared with the data's, with tolerances from the sample size.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_train.diffusion import parameterization as param
from diffusion_train.diffusion.objective import GaussianDiffusion, ModelDenoiser
from diffusion_train.diffusion.samplers import (
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
    per_image_generators,
    randn,
)
from diffusion_train.diffusion.schedules import (
    EDMSchedule,
    FlowSchedule,
    LinearSchedule,
    ScaledLinearSchedule,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from analytic import Gaussian, Mixture, moments  # noqa: E402

SCHEDULES = {  # name -> (schedule, the spacing the samplers use on it)
    "vp": (LinearSchedule(), "karras"),
    "edm": (EDMSchedule(), "karras"),
    "flow": (FlowSchedule(), "linspace"),
}
FIRST_ORDER = {"ddim": ddim, "euler": euler, "ddpm": ddpm, "euler_ancestral": euler_ancestral}
SOLVERS = {**FIRST_ORDER, "dpmpp_2m": dpmpp_2m, "dpmpp_2s": dpmpp_2s, "dpmpp_3m": dpmpp_3m, "heun": heun,
           "heun_churn": lambda *a, **k: heun(*a, s_churn=10.0, **k), "flow_heun": flow_heun}
DETERMINISTIC = ("ddim", "euler", "dpmpp_2m", "dpmpp_2s", "dpmpp_3m", "heun", "flow_heun")


def applies(sampler: str, sched: str) -> bool:
    """heun needs alpha > 0 (flow grids start at t = 1); flow_heun needs a flow schedule."""
    if sampler.startswith("heun"):
        return sched != "flow"
    if sampler == "flow_heun":
        return sched == "flow"
    return True


def exact_start(den, ts, n, seed):
    """x at ts[0] drawn from the exact marginal a x0 + s eps (x0 from the data), so the only error
    left in the samples is the solver's."""
    g = torch.Generator().manual_seed(seed)
    x0 = den.sample(n, g)
    a, s = den.alpha_sigma(ts[:1])
    return (a.double() * x0 + s.double() * torch.randn(x0.shape, generator=g, dtype=torch.float64)).float()


def scaled_noise(schedule, ts, n, seed, d=2):
    """What ``Sampler`` does: standard normal noise scaled to sqrt(a^2 + s^2) at the first timestep."""
    a, s = schedule.alpha_sigma(ts[:1])
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * (a.square() + s.square()).sqrt()


def pf_error(name, sched_name, steps, n=2000):
    """mean |sampler output - exact probability-flow output| on the Gaussian data."""
    schedule, spacing = SCHEDULES[sched_name]
    den = Gaussian(schedule)
    ts = schedule.timesteps(steps, spacing)
    x = scaled_noise(schedule, ts, n, seed=0)
    out = SOLVERS[name](den, x, ts)
    return float((out.double() - den.exact_output(x, ts)).abs().mean())


# ------------------------------------------------------------------------------------------------
# 1. every sampler on Gaussian and mixture data
# ------------------------------------------------------------------------------------------------
def test_sampler_identities():
    """euler is ddim(eta=0), flow_euler is euler, euler_ancestral(eta) is ddim(eta), ddpm is ddim(eta=1)."""
    sched = LinearSchedule()
    ts = sched.timesteps(15, "karras")
    x = scaled_noise(sched, ts, 64, seed=3)
    assert flow_euler is euler
    assert torch.equal(euler(Gaussian(sched), x, ts), ddim(Gaussian(sched), x, ts, eta=0.0))
    for eta in (0.5, 1.0):
        a = euler_ancestral(Gaussian(sched), x, ts, eta=eta, generator=torch.Generator().manual_seed(0))
        b = ddim(Gaussian(sched), x, ts, eta=eta, generator=torch.Generator().manual_seed(0))
        assert torch.equal(a, b)
    a = ddpm(Gaussian(sched), x, ts, generator=torch.Generator().manual_seed(1))
    b = ddim(Gaussian(sched), x, ts, eta=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def _kdiff_reference(name, den, x, ts, d2_weight=1.0):
    """k-diffusion's sample_euler / sample_heun / sample_dpmpp_2m / sample_dpmpp_2s_ancestral (eta=0) /
    sample_dpmpp_3m_sde (eta=0), in float64 on the EDM schedule (x = x0 + sigma eps), sigmas = ts + [0].
    ``d2_weight``: a factor on 3M's second-difference term (2 makes it third order, see dpmpp_3m)."""
    sig = torch.cat([ts.double(), torch.zeros(1, dtype=torch.float64)])
    one = torch.ones(1, 1, dtype=torch.float64)

    def model(x, s):
        return den.posterior_mean(x, one, s.reshape(1, 1))

    x = x.double()
    hist: list = []  # (denoised, h) newest first
    for i in range(len(sig) - 1):
        d0 = model(x, sig[i])
        if sig[i + 1] == 0:
            return d0
        h = sig[i].log() - sig[i + 1].log()
        if name == "euler":
            x = x + (x - d0) / sig[i] * (sig[i + 1] - sig[i])
        elif name == "heun":
            d, dt = (x - d0) / sig[i], sig[i + 1] - sig[i]
            x2 = x + d * dt
            x = x + (d + (x2 - model(x2, sig[i + 1])) / sig[i + 1]) / 2 * dt
        elif name == "dpmpp_2m":
            dd = d0
            if hist:
                r = hist[0][1] / h
                dd = (1 + 1 / (2 * r)) * d0 - (1 / (2 * r)) * hist[0][0]
            x = (sig[i + 1] / sig[i]) * x - torch.expm1(-h) * dd
        elif name == "dpmpp_2s":
            s_mid = sig[i] * torch.exp(-h / 2)
            x2 = (s_mid / sig[i]) * x - torch.expm1(-h / 2) * d0
            x = (sig[i + 1] / sig[i]) * x - torch.expm1(-h) * model(x2, s_mid)
        elif name == "dpmpp_3m":
            x = torch.exp(-h) * x - torch.expm1(-h) * d0
            phi2 = torch.expm1(-h) / h + 1
            if len(hist) >= 2:
                (m1, h1), (m2, h2) = hist[0], hist[1]
                r0, r1 = h1 / h, h2 / h
                d1_0, d1_1 = (d0 - m1) / r0, (m1 - m2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = d2_weight * (d1_0 - d1_1) / (r0 + r1)
                x = x + phi2 * d1 - (phi2 / h - 0.5) * d2
            elif hist:  # the second step: this package uses the DPM-Solver++(2M) update here (k-diffusion's
                # 3M uses the equally second-order phi2 form: x + phi2 (d0 - m1) / r)
                x = x - torch.expm1(-h) * (d0 - hist[0][0]) / (2 * hist[0][1] / h)
        hist = [(d0, h)] + hist[:1]
    raise AssertionError("unreachable")


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m", "dpmpp_2s", "dpmpp_3m"])
def test_samplers_match_k_diffusion_reference(name):
    sched = EDMSchedule()
    for steps in (4, 9, 25):
        ts = sched.timesteps(steps)
        den = Gaussian(sched)
        x = scaled_noise(sched, ts, 256, seed=steps)
        out = SOLVERS[name](den, x, ts)
        ref = _kdiff_reference(name, Gaussian(sched), x, ts)
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=5e-5)


# step counts per solver family: first order needs many more steps for the same accuracy
STEPS = {"ddim": 200, "euler": 200, "euler_ancestral": 200, "ddpm": 200}
CASES = [(s, k) for k in SCHEDULES for s in SOLVERS if applies(s, k)]


@pytest.mark.parametrize("data", ["gaussian", "mixture"])
@pytest.mark.parametrize("name,sched_name", CASES)
def test_sampler_moments_match_data(name, sched_name, data):
    """Sample mean and covariance match the data's: |error| <= 4 standard errors (estimated from the
    samples; N = 20000 Gaussian, 10000 mixture) + 0.01 allowed for the discretisation (50 steps for
    the higher-order solvers, 200 for the first-order ones; ddpm on the VP schedule runs its full 1000
    step leading grid)."""
    schedule, spacing = SCHEDULES[sched_name]
    den = (Gaussian if data == "gaussian" else Mixture)(schedule)
    n = 20000 if data == "gaussian" else 10000
    steps = STEPS.get(name, 50)
    if name == "ddpm" and sched_name == "vp":
        steps, spacing = 1000, "leading"
    ts = schedule.timesteps(steps, spacing)
    x = exact_start(den, ts, n, seed=11)
    out = SOLVERS[name](den, x, ts, generator=torch.Generator().manual_seed(12)).double()
    assert out.shape == (n, 2) and bool(torch.isfinite(out).all())
    # two calls per step except the last; 2S takes a first-order (one-call) step from alpha = 0 (flow t = 1)
    two = 2 * steps - (2 if name == "dpmpp_2s" and sched_name == "flow" else 1)
    assert den.nfe == (two if name in ("dpmpp_2s", "heun", "heun_churn", "flow_heun") else steps)
    mean, cov = moments(out)
    c = out - mean
    se_mean = c.std(0) / math.sqrt(n)
    se_cov = (c[:, :, None] * c[:, None, :]).flatten(1).std(0).reshape(2, 2) / math.sqrt(n)
    err_m, err_c = (mean - den.mean).abs(), (cov - den.cov).abs()
    assert bool((err_m <= 4 * se_mean + 0.01).all()), f"mean {mean.tolist()} vs {den.mean.tolist()}"
    assert bool((err_c <= 4 * se_cov + 0.01).all()), f"cov {cov.tolist()} vs {den.cov.tolist()}"


def test_gaussian_exact_output_is_the_output_distribution():
    """Sanity check of the reference itself: the exact PF map of exact-marginal starts has the
    data mean and the covariance of E[x0 | x_t] at the last timestep."""
    sched = FlowSchedule()
    den = Gaussian(sched)
    ts = sched.timesteps(8)
    x = exact_start(den, ts, 200000, seed=0)
    ref = den.exact_output(x, ts)
    mean, cov = moments(ref)
    torch.testing.assert_close(mean, den.mean, rtol=0, atol=0.005)
    torch.testing.assert_close(cov, den.output_cov(ts), rtol=0, atol=0.003)
    assert float(den.output_cov(ts)[0, 0]) < 0.95 * float(den.cov[0, 0])  # t = 1/8 still smooths


ORDER_CASES = [(s, k) for k in SCHEDULES for s in DETERMINISTIC if applies(s, k)]


@pytest.mark.parametrize("name,sched_name", ORDER_CASES)
def test_deterministic_error_decreases_with_steps(name, sched_name):
    """mean |out - exact PF output| falls monotonically; the last doubling shows the solver's order
    (first order: ~2x; second order: ~4x; 3M is second order too, see dpmpp_3m)."""
    steps = (10, 20, 40, 80) if sched_name != "flow" else (20, 40, 80, 160)
    errs = [pf_error(name, sched_name, n) for n in steps]
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    min_ratio = {"ddim": 1.6, "euler": 1.6, "dpmpp_3m": 2.0}.get(name, 3.0)
    assert errs[-2] / errs[-1] > min_ratio, errs


def _3m_log_snr_errors(d2_weight: float) -> list[float]:
    """PF errors of k-diffusion's 3M (``d2_weight`` 1: as published, and this package's) at 16, 32, 64 steps on a
    grid uniform in log-SNR whose two lower-order start steps are made 1000x shorter (so their error does not
    dominate)."""
    schedule = EDMSchedule()
    errs = []
    for n in (16, 32, 64):
        lam = torch.linspace(-math.log(80.0), -math.log(0.002), n + 1, dtype=torch.float64)
        h = lam[1] - lam[0]
        ts = torch.exp(-torch.cat([lam[:1], lam[:1] + 1e-3 * h, lam[:1] + 2e-3 * h, lam[1:]]))  # EDM: t = sigma
        x = scaled_noise(schedule, ts.float(), 2000, seed=0)
        out = _kdiff_reference("dpmpp_3m", Gaussian(schedule), x, ts, d2_weight)
        errs.append(float((out - Gaussian(schedule).exact_output(x, ts.float())).abs().mean()))
    return errs


def test_dpmpp_3m_as_published_is_second_order_and_twice_its_d2_third():
    """Why docs/samplers.md calls 3M second order: its D2 term has half the weight of the x0'' Taylor term. The
    error falls ~4-6x per doubling as published, and >8x (third order) with D2 doubled."""
    published, doubled = _3m_log_snr_errors(1.0), _3m_log_snr_errors(2.0)
    assert all(3 < a / b < 7 for a, b in zip(published, published[1:])), published
    assert all(a / b > 8 for a, b in zip(doubled, doubled[1:])), doubled


@pytest.mark.parametrize("sched_name", list(SCHEDULES))
def test_higher_order_solvers_beat_first_order(sched_name):
    e10 = {n: pf_error(n, sched_name, 10) for n in DETERMINISTIC if applies(n, sched_name)}
    e20 = {n: pf_error(n, sched_name, 20) for n in DETERMINISTIC if applies(n, sched_name)}
    assert e10["dpmpp_2m"] < e10["ddim"] and e10["dpmpp_2s"] < e10["ddim"], e10
    first = min(e20["ddim"], e20["euler"])
    for n in ("dpmpp_3m", "dpmpp_2s", "dpmpp_2m", "heun" if sched_name != "flow" else "flow_heun"):
        assert e20[n] < first / 2, (n, e20)


# ------------------------------------------------------------------------------------------------
# 2. every prediction type with every sampler
# ------------------------------------------------------------------------------------------------
def _time_from_model_time(schedule, mt):
    if isinstance(schedule, EDMSchedule):
        return torch.exp(mt / 250.0)
    if isinstance(schedule, FlowSchedule):
        return mt / 1000.0
    return mt


def fake_net(analytic, prediction):
    """A 'network' that returns the exact target of ``prediction`` for the analytic data: it sees
    only param.net_input(...) and model_time(t), like a real backbone."""
    schedule = analytic.schedule

    def net(inp, mt, cond):
        t = _time_from_model_time(schedule, mt.double())
        a, s = (v.double().reshape(-1, 1) for v in schedule.alpha_sigma(t.float()))
        x = inp.double()
        if prediction == "edm":  # the net receives c_in * x / a
            x = x * a / param.edm_coefficients(a, s, 0.5)[2]
        x0 = analytic.posterior_mean(x, a, s)
        eps = (x - a * x0) / s
        return param.target(prediction, x0, eps, a, s)

    return net


PRED_CASES = [("vp", "karras", p) for p in param.PREDICTIONS] + [("edm", "karras", p) for p in param.PREDICTIONS] \
    + [("flow", "karras", p) for p in param.PREDICTIONS] + [("flow", "linspace", p) for p in ("x0", "v", "flow")]


@pytest.mark.parametrize("sched_name,spacing,prediction", PRED_CASES)
def test_every_prediction_type_with_every_sampler(sched_name, spacing, prediction):
    schedule = SCHEDULES[sched_name][0]
    ts = schedule.timesteps(8, spacing)
    x = scaled_noise(schedule, ts, 128, seed=5)
    names = [n for n in SOLVERS if applies(n, sched_name) or (n.startswith("heun") and spacing == "karras")]
    for name in names:
        ref = SOLVERS[name](Gaussian(schedule), x, ts, generator=torch.Generator().manual_seed(9))
        model = ModelDenoiser(fake_net(Gaussian(schedule), prediction), schedule, prediction)
        out = SOLVERS[name](model, x, ts, generator=torch.Generator().manual_seed(9))
        torch.testing.assert_close(out, ref, rtol=0, atol=2e-4, msg=lambda m: f"{name}/{prediction}: {m}")


# ------------------------------------------------------------------------------------------------
# 3. per-image seeding
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ddpm", "euler_ancestral", "heun_churn", "dpmpp_2m"])
def test_per_image_seeds_make_samples_independent_of_batch_size(name):
    schedule = LinearSchedule()
    solver = SOLVERS[name]
    sampler = Sampler(solver, 12, "karras") if name != "ddpm" else Sampler(ddpm, 50, "leading")
    seeds = list(range(100, 116))
    den = Mixture(schedule)

    def run(batch):
        outs = []
        for i in range(0, len(seeds), batch):
            sub = seeds[i:i + batch]
            z = randn((len(sub), 2), per_image_generators([s + 10_000 for s in sub]))
            outs.append(sampler(den, z, generator=per_image_generators(sub)))
        return torch.cat(outs)

    one, four, sixteen = run(1), run(4), run(16)
    assert torch.equal(one, four) and torch.equal(four, sixteen)
    assert len(set(map(tuple, sixteen.tolist()))) == 16


# ------------------------------------------------------------------------------------------------
# 4. zero terminal SNR
# ------------------------------------------------------------------------------------------------
def test_schedules_that_reach_alpha_0_reject_eps_and_edm_prediction_and_zero_snr_rejects_karras():
    """eps and edm predictions divide by alpha to give x0: NaN at the schedule's end, where sampling starts."""
    zt = ScaledLinearSchedule(rescale_zero_terminal_snr=True)
    for schedule in (zt, FlowSchedule()):
        for prediction in ("eps", "edm"):
            with pytest.raises(ValueError, match=f"reaches alpha = 0 at t = .*{prediction} prediction cannot give x0"):
                GaussianDiffusion(schedule, prediction=prediction)
        for prediction in ("v", "x0", "flow"):
            GaussianDiffusion(schedule, prediction=prediction)
    GaussianDiffusion(ScaledLinearSchedule(), prediction="edm")  # alpha > 0 everywhere
    with pytest.raises(ValueError):
        zt.timesteps(10, "karras")


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "dpmpp_2s", "dpmpp_3m", "ddpm", "euler_ancestral"])
def test_zero_terminal_snr_v_prediction_samples_from_pure_noise(name):
    zt = ScaledLinearSchedule(rescale_zero_terminal_snr=True)
    data = Gaussian(zt)
    den = GaussianDiffusion(zt, prediction="v").denoiser(fake_net(data, "v"))
    # ancestral samplers replace x0 by E[x0 | x_t] in the posterior q(x_s | x_t, x0) and so lose the
    # variance of x0 | x_t at every step: a first-order std deficit (~0.025 at 100 steps here)
    steps = {"ddim": 100, "ddpm": 500, "euler_ancestral": 500}.get(name, 25)
    ts = zt.timesteps(steps, "trailing")
    assert float(ts[0]) == 999.0 and float(zt.alpha_sigma(ts[:1])[0]) == 0.0
    n = 10000
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(4))
    out = Sampler(SOLVERS[name], steps, "trailing")(den, noise, generator=torch.Generator().manual_seed(5))
    out = out.double()
    assert bool(torch.isfinite(out).all())
    # at alpha = 0 the initial N(0, 1) noise is the exact marginal: the only errors are sampling and
    # discretisation; the output is E[x0 | x] at the last (trailing) step, with covariance output_cov.
    mean, cov = moments(out)
    se_mean = data.tau / math.sqrt(n)
    se_std = data.tau / math.sqrt(2 * n)
    ref_std = data.output_cov(ts).diagonal().sqrt()
    assert bool(((mean - data.mean).abs() <= 4 * se_mean + 0.005).all()), mean
    assert bool(((cov.diagonal().sqrt() - ref_std).abs() <= 4 * se_std + 0.01).all()), (cov, ref_std)
    if name in DETERMINISTIC:
        assert float((out - data.exact_output(noise, ts)).abs().mean()) < 0.01


class RecordingDenoiser:
    """Records the times it is called at and the std of its input; its estimate is 0."""

    def __init__(self, schedule):
        self.schedule, self.ts, self.stds = schedule, [], []

    def alpha_sigma(self, t):
        return self.schedule.alpha_sigma(t)

    def __call__(self, x, t, cond):
        self.ts.append(float(t.reshape(-1)[0]))
        self.stds.append(float(x.std()))
        return torch.zeros_like(x)


@pytest.mark.parametrize("schedule", [EDMSchedule(), LinearSchedule()], ids=["edm", "vp"])
def test_heun_churn_calls_the_denoiser_at_the_noise_level_x_has(schedule):
    """Churn raises the noise to sigma (1 + gamma) and calls the denoiser there (Karras et al. algorithm 2),
    but never past the schedule's largest sigma/alpha, the end of the model's time range."""
    ts = schedule.timesteps(10, "karras")
    den = RecordingDenoiser(schedule)
    x = scaled_noise(schedule, ts, 20000, seed=0, d=1)
    heun(den, x, ts, s_churn=40.0, generator=torch.Generator().manual_seed(1))
    a, s = schedule.alpha_sigma(ts)
    sig = (s.double() / a.double()).tolist()
    gamma, top = math.sqrt(2) - 1, schedule.ve_sigma_range()[1]
    raised = [min(v * (1 + gamma), top) for v in sig]
    assert raised[0] == pytest.approx(sig[0]) and raised[-1] > sig[-1] * 1.4  # both cases are exercised
    a_c, s_c = schedule.alpha_sigma(torch.tensor(den.ts[::2]))  # the first call of each step is at the raised level
    np.testing.assert_allclose((s_c.double() / a_c.double()).numpy(), raised, rtol=1e-3)
    # x's own noise is at that level: the zero estimate keeps x = noise, std sigma (in VE units, times alpha)
    np.testing.assert_allclose(np.array(den.stds[::2]) / a_c.double().numpy(), raised, rtol=0.03)


def test_ddim_eta_above_one_keeps_the_marginal_noise_level():
    """eta > 1 caps the added noise at the next step's sigma (as k-diffusion): x keeps the marginal std."""
    schedule = EDMSchedule()
    ts = torch.tensor([80.0, 40.0, 20.0])
    for eta in (1.0, 2.0):
        den = RecordingDenoiser(schedule)
        ddim(den, torch.randn(20000, 1, generator=torch.Generator().manual_seed(0)) * 80, ts, eta=eta,
             generator=torch.Generator().manual_seed(1))
        np.testing.assert_allclose(den.stds, [80.0, 40.0, 20.0], rtol=0.03)


def test_heun_rejects_zero_terminal_snr_and_names_flow_heun():
    zt = LinearSchedule(rescale_zero_terminal_snr=True)
    den = Gaussian(zt)
    with pytest.raises(ValueError, match="flow_heun"):
        Sampler(heun, 10, "trailing")(den, torch.randn(4, 2))
    with pytest.raises(ValueError, match="flow_heun"):
        Sampler(heun, 10, "linspace")(Gaussian(FlowSchedule()), torch.randn(4, 2))
    with pytest.raises(ValueError):
        flow_heun(den, torch.randn(4, 2), LinearSchedule().timesteps(10, "trailing"))
