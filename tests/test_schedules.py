"""Known-answer tests for the noise schedules (against their published formulas and numpy float64 references,
their invariants, and their inverses t_at) and the parameterizations (each prediction target by definition, its
conversions to x0 and back, and its loss factor)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffusion_train.diffusion import parameterization as param
from diffusion_train.diffusion.objective import GaussianDiffusion
from diffusion_train.diffusion.schedules import (
    CosineSchedule,
    DiscreteSchedule,
    EDMSchedule,
    FlowSchedule,
    LinearSchedule,
    ScaledLinearSchedule,
)

T = 1000


def np_linear_ac(n=T, b0=1e-4, b1=0.02):
    return np.cumprod(1.0 - np.linspace(b0, b1, n, dtype=np.float64))


def np_cosine_f(n=T, s=0.008):
    u = np.arange(n + 1, dtype=np.float64) / n
    return np.cos((u + s) / (1 + s) * np.pi / 2) ** 2


ALL_SCHEDULES = [LinearSchedule, ScaledLinearSchedule, CosineSchedule]


# ------------------------------------------------------------------------------------------------
# 1. schedules against their published formulas
# ------------------------------------------------------------------------------------------------
def test_edm_karras_sigmas_known_values():
    sched = EDMSchedule(sigma_min=0.002, sigma_max=80.0, rho=7.0)
    for n in (5, 11, 18):
        ts = sched.timesteps(n)
        assert ts.shape == (n,) and ts.dtype == torch.float32
        assert math.isclose(float(ts[0]), 80.0, rel_tol=1e-6)
        assert math.isclose(float(ts[-1]), 0.002, rel_tol=1e-6)
        # Karras et al. 2022, eq. 5: sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho
        for i in (1, (n - 1) // 2, n - 2):
            ref = (80.0 ** (1 / 7) + i / (n - 1) * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
            assert math.isclose(float(ts[i]), ref, rel_tol=1e-6)
    assert sched.timesteps(10, "auto").tolist() == sched.timesteps(10, "karras").tolist()
    torch.testing.assert_close(sched.timesteps(5, "linspace"), torch.linspace(80.0, 0.002, 5))
    a, s = sched.alpha_sigma(torch.tensor([0.5, 3.0]))
    assert a.tolist() == [1.0, 1.0] and s.tolist() == [0.5, 3.0]
    torch.testing.assert_close(sched.model_time(torch.tensor([1.0, 80.0])), 250 * torch.tensor([0.0, math.log(80)]))


def test_vp_karras_spacing_spans_the_schedule():
    sched = LinearSchedule()
    ts = sched.timesteps(12, "karras")
    assert bool((ts[1:] < ts[:-1]).all())
    assert abs(float(ts[0]) - 999) < 1e-3 and abs(float(ts[-1])) < 1e-3
    ac = sched.alphas_cumprod.numpy()
    lo, hi = math.sqrt((1 - ac[0]) / ac[0]), math.sqrt((1 - ac[-1]) / ac[-1])
    ref = (hi ** (1 / 7) + np.arange(12) / 11 * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    a, s = sched.alpha_sigma(ts)
    np.testing.assert_allclose((s.double() / a.double()).numpy(), ref, rtol=1e-4)


def test_flow_schedule_formulas_and_shift():
    sched = FlowSchedule()
    t = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0])
    a, s = sched.alpha_sigma(t)
    assert a.tolist() == (1 - t).tolist() and s.tolist() == t.tolist()
    assert sched.timesteps(4).tolist() == [1.0, 0.75, 0.5, 0.25]
    assert sched.timesteps(4, "linspace").tolist() == sched.timesteps(4, "trailing").tolist()
    torch.testing.assert_close(sched.model_time(t), 1000 * t)
    # SD3 shift: t' = shift t / (1 + (shift - 1) t); shift 3 maps 1, .75, .5, .25 to 1, .9, .75, .5
    shifted = FlowSchedule(shift=3.0).timesteps(4)
    torch.testing.assert_close(shifted, torch.tensor([1.0, 0.9, 0.75, 0.5]))
    # ... i.e. the log-SNR moves down by 2 log(shift) at every point of the grid
    base, sh = FlowSchedule().timesteps(7)[1:], FlowSchedule(shift=3.0).timesteps(7)[1:]
    torch.testing.assert_close(sched.log_snr(sh), sched.log_snr(base) - 2 * math.log(3.0), rtol=0, atol=1e-5)
    # karras on a flow schedule: t/(1-t) follows the Karras sigmas of 0.002 .. 80
    tk = sched.timesteps(6, "karras").double()
    ref = (80 ** (1 / 7) + torch.arange(6) / 5 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    torch.testing.assert_close(tk / (1 - tk), ref.double(), rtol=1e-5, atol=0)


def _lin_2024_algorithm_1(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2024, algorithm 1 (enforce zero terminal SNR), in numpy float64: returns betas."""
    alphas_bar_sqrt = np.sqrt(np.cumprod(1 - betas))
    a0, at = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
    alphas_bar_sqrt = (alphas_bar_sqrt - at) * a0 / (a0 - at)
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


@pytest.mark.parametrize("cls", [LinearSchedule, ScaledLinearSchedule, CosineSchedule])
def test_zero_terminal_snr_rescale_matches_lin_2024(cls):
    plain, zt = cls(), cls(rescale_zero_terminal_snr=True)
    betas = _lin_2024_algorithm_1(plain.betas.numpy())
    np.testing.assert_allclose(zt.betas.numpy(), betas, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(zt.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-10, atol=1e-14)
    assert float(zt.alphas_cumprod[-1]) == 0.0 and float(zt.betas[-1]) == 1.0
    np.testing.assert_allclose(float(zt.alphas_cumprod[0]), float(plain.alphas_cumprod[0]), rtol=1e-14)
    a, s = zt.alpha_sigma(torch.tensor([999.0]))
    assert float(a) == 0.0 and float(s) == 1.0
    assert float(zt.log_snr(torch.tensor([999.0]))) == -math.inf
    assert zt.zero_terminal_snr and not plain.zero_terminal_snr


def test_zero_terminal_snr_alpha_sigma_is_finite_between_the_last_two_steps():
    """Fractional t in (T-2, T-1) interpolates towards lambda = -inf; alpha and sigma must stay valid
    numbers there (continuous time samplers such as LogitNormalTime produce such t)."""
    zt = LinearSchedule(rescale_zero_terminal_snr=True)
    t = torch.linspace(997.0, 999.0, 41)
    a, s = zt.alpha_sigma(t)
    assert bool(torch.isfinite(a).all() and torch.isfinite(s).all()), (
        f"NaN alpha/sigma at t = {t[~torch.isfinite(a)].tolist()}")
    torch.testing.assert_close(a.double() ** 2 + s.double() ** 2, torch.ones(41, dtype=torch.float64),
                               rtol=0, atol=1e-6)
    assert bool((a[1:] <= a[:-1]).all())


@pytest.mark.parametrize("cls", [LinearSchedule, ScaledLinearSchedule, CosineSchedule])
def test_zero_terminal_snr_t_at_inverts_between_the_last_two_steps(cls):
    """alpha goes linearly to 0 on (T-2, T-1), where the log-SNR runs to -inf: t_at inverts that too."""
    zt = cls(rescale_zero_terminal_snr=True)
    t = torch.tensor([998.0, 998.1, 998.25, 998.5, 998.75, 998.9, 998.99, 999.0])
    torch.testing.assert_close(zt.t_at(zt.log_snr(t)), t, rtol=0, atol=1e-4)
    # the auto grid starts at the zero-SNR step (trailing), as Lin et al. sample
    torch.testing.assert_close(zt.timesteps(10), zt.timesteps(10, "trailing"))
    assert float(zt.timesteps(10)[0]) == 999.0 and float(cls().timesteps(10)[0]) == 900.0  # leading without


@pytest.mark.parametrize("cls", [LinearSchedule, ScaledLinearSchedule, CosineSchedule])
def test_discrete_t_at_inverts_log_snr(cls):
    sched = cls()
    t = torch.cat([torch.tensor([0.0, 0.5, 1.0, 998.25, 999.0]),
                   torch.rand(300, generator=torch.Generator().manual_seed(0)) * 999])
    back = sched.t_at(sched.log_snr(t))
    torch.testing.assert_close(back, t, rtol=0, atol=2e-3)
    ends = sched.log_snr(torch.tensor([999.0, 0.0])).tolist()
    lam = torch.linspace(ends[0] + 1e-3, ends[1] - 1e-3, 50)
    # float32 t near 999 resolves ~6e-5 of a step, and the cosine log-SNR falls ~7 per step there
    torch.testing.assert_close(sched.log_snr(sched.t_at(lam)), lam, rtol=0, atol=1e-3)
    # out-of-range log-SNRs clamp to the ends of the schedule
    assert sched.t_at(torch.tensor([100.0, -100.0])).tolist() == [0.0, 999.0]


def test_edm_and_flow_t_at_invert_log_snr():
    edm = EDMSchedule()
    sig = torch.tensor([0.002, 0.01, 0.5, 1.0, 7.0, 80.0])
    torch.testing.assert_close(edm.t_at(edm.log_snr(sig)), sig, rtol=1e-5, atol=0)
    torch.testing.assert_close(edm.log_snr(sig), -2 * sig.log(), rtol=1e-6, atol=1e-6)
    assert edm.t_at(torch.tensor([30.0, -30.0])).tolist() == pytest.approx([0.002, 80.0])
    flow = FlowSchedule()
    t = torch.tensor([0.001, 0.1, 0.3, 0.5, 0.77, 0.999])
    torch.testing.assert_close(flow.t_at(flow.log_snr(t)), t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(flow.log_snr(t), 2 * ((1 - t) / t).log(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# 2. parameterizations
# ------------------------------------------------------------------------------------------------
def _alpha_sigma_cases():
    """(name, alpha, sigma) float64 columns from each schedule type, all with alpha > 0."""
    t_vp = torch.tensor([0.0, 3.5, 100.0, 500.0, 900.0, 999.0])
    a_vp, s_vp = LinearSchedule().alpha_sigma(t_vp)
    s_edm = torch.tensor([0.002, 0.05, 0.5, 2.0, 20.0, 80.0], dtype=torch.float64)
    t_fl = torch.tensor([1e-3, 0.1, 0.4, 0.6, 0.9, 0.999], dtype=torch.float64)
    cases = [("vp", a_vp.double(), s_vp.double()), ("edm", torch.ones_like(s_edm), s_edm),
             ("flow", 1 - t_fl, t_fl)]
    return [(n, a.reshape(-1, 1), s.reshape(-1, 1)) for n, a, s in cases]


def _noised(a, s, g):
    """x0 and eps (5 values per row, float64) and x_t = a x0 + s eps."""
    x0 = torch.randn(len(a), 5, generator=g, dtype=torch.float64)
    eps = torch.randn(len(a), 5, generator=g, dtype=torch.float64)
    return x0, eps, a * x0 + s * eps


@pytest.mark.parametrize("prediction", param.PREDICTIONS)
def test_to_x0_inverts_target_for_every_schedule(prediction):
    g = torch.Generator().manual_seed(0)
    for _, a, s in _alpha_sigma_cases():
        x0, eps, x_t = _noised(a, s, g)
        out = param.target(prediction, x0, eps, a, s)
        torch.testing.assert_close(param.to_x0(prediction, out, x_t, a, s), x0, rtol=0, atol=1e-10)


@pytest.mark.parametrize("source", param.PREDICTIONS)
def test_convert_round_trips(source):
    g = torch.Generator().manual_seed(1)
    for _, a, s in _alpha_sigma_cases():
        x0, eps, x_t = _noised(a, s, g)
        out = param.target(source, x0, eps, a, s)
        for dest in param.PREDICTIONS:
            there = param.convert(out, source, dest, x_t, a, s)
            torch.testing.assert_close(there, param.target(dest, x0, eps, a, s), rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(param.convert(there, dest, source, x_t, a, s), out, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("prediction", param.PREDICTIONS)
def test_x0_mse_factor_brute_force(prediction):
    """||delta||^2 / ||x0 change||^2 when the prediction moves by delta (x_t fixed) is x0_mse_factor."""
    g = torch.Generator().manual_seed(2)
    for _, a, s in _alpha_sigma_cases():
        x0 = torch.randn(len(a), 8, generator=g, dtype=torch.float64)
        eps = torch.randn(len(a), 8, generator=g, dtype=torch.float64)
        x_t = a * x0 + s * eps
        out = param.target(prediction, x0, eps, a, s)
        delta = 1e-3 * torch.randn(out.shape, generator=g, dtype=torch.float64)
        dx0 = param.to_x0(prediction, out + delta, x_t, a, s) - param.to_x0(prediction, out, x_t, a, s)
        ratio = delta.square().sum(1) / dx0.square().sum(1)
        k = param.x0_mse_factor(prediction, a, s).reshape(-1)
        torch.testing.assert_close(ratio, k, rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------------
# 3. schedules: definitions and invariants
# ------------------------------------------------------------------------------------------------
def test_linear_schedule_alphas_cumprod_matches_numpy():
    sched = LinearSchedule()
    assert sched.num_timesteps == T
    assert sched.alphas_cumprod.dtype == torch.float64
    np.testing.assert_allclose(sched.alphas_cumprod.numpy(), np_linear_ac(), rtol=1e-12, atol=0)


def test_scaled_linear_schedule_from_definition():
    sched = ScaledLinearSchedule()
    betas = np.linspace(0.00085**0.5, 0.012**0.5, T, dtype=np.float64) ** 2
    np.testing.assert_allclose(sched.betas.numpy(), betas, rtol=1e-12)
    np.testing.assert_allclose(sched.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-12)


def test_cosine_schedule_matches_cos2_ratio_where_unclipped():
    sched = CosineSchedule()
    f = np_cosine_f()
    raw_betas = 1 - f[1:] / f[:-1]
    unclipped = raw_betas < 0.999
    # Only the very last steps are clipped (f -> 0 at t = T).
    assert unclipped[:-1].all()
    assert (sched.betas.numpy() <= 0.999 + 1e-15).all()
    np.testing.assert_allclose(sched.betas.numpy()[~unclipped], 0.999, rtol=1e-12)
    # alpha_bar at integer step i covers betas 0..i, i.e. f((i+1)/T) / f(0).
    expected = f[1:] / f[0]
    np.testing.assert_allclose(sched.alphas_cumprod.numpy()[unclipped], expected[unclipped], rtol=1e-9)


def test_cosine_schedule_clipping_value():
    # With a tiny max_beta, every beta is clipped and alpha_bar is a pure geometric sequence.
    sched = CosineSchedule(num_timesteps=50, max_beta=1e-3)
    f = np_cosine_f(50)
    betas = np.minimum(1 - f[1:] / f[:-1], 1e-3)
    np.testing.assert_allclose(sched.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-12)


@pytest.mark.parametrize("cls", ALL_SCHEDULES)
def test_alpha_squared_plus_sigma_squared_is_one(cls):
    sched = cls()
    t = torch.cat([torch.arange(T, dtype=torch.float32), torch.rand(500) * (T - 1)])
    a, s = sched.alpha_sigma(t)
    assert a.dtype == torch.float32 and s.dtype == torch.float32
    torch.testing.assert_close(a.double() ** 2 + s.double() ** 2, torch.ones_like(t, dtype=torch.float64),
                               rtol=0, atol=1e-6)
    # and alpha^2 is alpha_bar at integer steps
    ac = sched.alphas_cumprod.numpy()
    np.testing.assert_allclose(a[:T].double().numpy() ** 2, ac, rtol=1e-5)


@pytest.mark.parametrize("cls", ALL_SCHEDULES)
def test_log_snr_strictly_decreasing(cls):
    sched = cls()
    lsnr = sched.log_snr(torch.arange(T, dtype=torch.float32)).double().numpy()
    assert np.all(np.diff(lsnr) < 0)
    ac = sched.alphas_cumprod.numpy()
    np.testing.assert_allclose(lsnr, np.log(ac / (1 - ac)), rtol=1e-4, atol=1e-4)
    # also on a fine fractional grid
    fine = sched.log_snr(torch.linspace(0, T - 1, 4 * T + 1)).double().numpy()
    assert np.all(np.diff(fine) < 0)


@pytest.mark.parametrize("cls", ALL_SCHEDULES)
def test_fractional_t_interpolates_log_snr(cls):
    sched = cls()
    ac = sched.alphas_cumprod.numpy()
    lam_tab = np.log(ac / (1 - ac))
    gen = np.random.default_rng(0)
    lo = gen.integers(0, T - 1, size=200)
    w = gen.random(200)
    t = torch.tensor(lo + w, dtype=torch.float64)
    # lambda is linear in t between integers; alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda)
    lam = (1 - w) * lam_tab[lo] + w * lam_tab[lo + 1]
    a, s = sched.alpha_sigma(t)
    np.testing.assert_allclose(a.double().numpy(), np.sqrt(1 / (1 + np.exp(-lam))), rtol=2e-6)
    np.testing.assert_allclose(s.double().numpy(), np.sqrt(1 / (1 + np.exp(lam))), rtol=2e-6)
    np.testing.assert_allclose(sched.alpha_bar(t).double().numpy(), 1 / (1 + np.exp(-lam)), rtol=4e-6)
    np.testing.assert_allclose(sched.log_snr(t).double().numpy(), lam, rtol=1e-5, atol=1e-5)
    # midpoints: the log-SNR is the mean of the neighbours' log-SNRs
    mid = sched.log_snr(torch.tensor([10.5, 500.5])).double().numpy()
    np.testing.assert_allclose(mid, (lam_tab[[10, 500]] + lam_tab[[11, 501]]) / 2, rtol=1e-5, atol=1e-5)
    # integer steps give the exact table values and out-of-range steps clamp to the ends
    a_int, s_int = sched.alpha_sigma(torch.tensor([0, 7, 999]))
    np.testing.assert_allclose(a_int.double().numpy(), np.float32(np.sqrt(ac[[0, 7, 999]])), rtol=0, atol=0)
    np.testing.assert_allclose(s_int.double().numpy(), np.float32(np.sqrt(1 - ac[[0, 7, 999]])), rtol=0, atol=0)
    # integer-valued float t (as samplers pass) also hit the table exactly
    a_f, _ = sched.alpha_sigma(torch.tensor([0.0, 7.0, 999.0]))
    assert torch.equal(a_f, a_int)
    np.testing.assert_allclose(sched.alpha_bar(torch.tensor([-5.0, 2000.0])).double().numpy(), ac[[0, 999]],
                               rtol=1e-6)


def test_discrete_schedule_rejects_invalid_betas():
    with pytest.raises(ValueError):
        DiscreteSchedule(torch.tensor([0.1, 1.0]))
    with pytest.raises(ValueError):
        DiscreteSchedule(torch.tensor([0.0, 0.1]))
    with pytest.raises(ValueError):
        DiscreteSchedule(torch.full((2, 2), 0.1))


def test_timesteps_known_values():
    sched = LinearSchedule()
    lead = sched.timesteps(10, "leading")
    trail = sched.timesteps(10, "trailing")
    lin = sched.timesteps(10, "linspace")
    for ts in (lead, trail, lin):
        assert ts.dtype == torch.float32
    assert lead.tolist() == [float(v) for v in range(900, -1, -100)]
    assert trail.tolist() == [float(v) for v in range(999, 98, -100)]
    assert lin.tolist() == np.round(np.linspace(999, 0, 10)).tolist()
    for n in range(1, T + 1):  # diffusers' grid (numpy, float64) for every count: in float32, 134 differed by a step
        assert sched.timesteps(n, "linspace").tolist() == np.round(np.linspace(0, T - 1, n))[::-1].tolist(), n
    assert lin[0] == 999 and lin[-1] == 0
    # every spacing with num_steps == T is the full grid
    for spacing in ("leading", "trailing", "linspace"):
        assert sched.timesteps(T, spacing).tolist() == [float(v) for v in range(T - 1, -1, -1)]
    assert sched.timesteps(1, "leading").tolist() == [0.0]
    assert sched.timesteps(1, "trailing").tolist() == [999.0]
    # a count that does not divide T: leading still starts in the last stride, not at n - 1 (stride T // n = 1)
    for n, first in ((300, 996), (400, 997), (600, 998), (999, 998)):
        assert float(sched.timesteps(n, "leading")[0]) == first


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps_descending_unique_count_range_for_every_num_steps(spacing):
    sched = LinearSchedule()
    bad = []
    for n in range(1, T + 1):
        ts = sched.timesteps(n, spacing)
        ok = (ts.numel() == n and bool((ts[1:] < ts[:-1]).all()) and float(ts.min()) >= 0
              and float(ts.max()) <= T - 1 and bool((ts == ts.round()).all()))
        if not ok:
            bad.append((n, ts.numel(), float(ts.min())))
    assert not bad, f"{spacing}: {len(bad)} step counts give a wrong grid (n, len, min): {bad[:5]}"


def test_timesteps_invalid_arguments():
    sched = LinearSchedule()
    with pytest.raises(ValueError):
        sched.timesteps(10, "quadratic")
    with pytest.raises(ValueError):
        sched.timesteps(0)
    with pytest.raises(ValueError):
        sched.timesteps(T + 1)


# ------------------------------------------------------------------------------------------------
# 4. parameterizations by definition
# ------------------------------------------------------------------------------------------------
def _alpha_sigma64(t: np.ndarray, ndim: int):
    ac = np_linear_ac()[t]
    shape = (-1,) + (1,) * (ndim - 1)
    return torch.tensor(np.sqrt(ac)).reshape(shape), torch.tensor(np.sqrt(1 - ac)).reshape(shape)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_to_x0_inverts_target(prediction):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(16, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(16, 3, 4, 4, generator=g, dtype=torch.float64)
    t = np.array([0, 1, 5, 50, 100, 250, 400, 500, 600, 700, 800, 900, 950, 990, 998, 999])
    a, s = _alpha_sigma64(t, 4)
    x_t = a * x0 + s * eps
    out = param.target(prediction, x0, eps, a, s)
    torch.testing.assert_close(param.to_x0(prediction, out, x_t, a, s), x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(param.x0_to_eps(x0, x_t, a, s), eps, rtol=0, atol=1e-9)


def test_prediction_targets_by_definition():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    a, s = torch.tensor([[0.6], [0.8], [0.1], [0.99]]), torch.tensor([[0.8], [0.6], [0.995], [0.141]])
    torch.testing.assert_close(param.target("v", x0, eps, a, s), a * eps - s * x0)
    assert param.target("eps", x0, eps, a, s) is eps
    assert param.target("x0", x0, eps, a, s) is x0


def test_invalid_prediction_raises():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError):
        param.target("score", x, x, x, x)
    with pytest.raises(ValueError):
        param.to_x0("score", x, x, x, x)
    with pytest.raises(ValueError):
        GaussianDiffusion(LinearSchedule(), prediction="score")
