"""Samplers: pure functions with one signature, in the style of k-diffusion.

    sampler(denoiser, x, timesteps, cond=None, *, generator=None, progress=False, **options) -> x0

``denoiser(x, t, cond)`` returns the clean-sample estimate and ``denoiser.alpha_sigma(t)`` the
schedule, so every sampler works with every prediction type and every schedule. ``x`` is the initial
noise at the first (noisiest) timestep, in the model's own space x_t = alpha*x0 + sigma*eps;
``timesteps`` is descending; the sample is the clean estimate at the last timestep. All updates are
written with alpha and sigma (DPM-Solver's lambda = log(alpha/sigma)), never assuming a variance-
preserving or variance-exploding schedule. Guidance is a denoiser wrapper (``diffusion.guidance``),
so every sampler gets it for free.

``generator`` is a ``torch.Generator`` or a list with one generator per image: with a list,
image i draws its noise from its own generator, so a sample depends only on its seed, never on
the batch size or on the number of processes it was split across.

Identities used below (exact, not approximations): in (x/alpha, sigma/alpha) coordinates Euler's
method on the probability-flow ODE *is* DDIM (eta=0), so ``euler`` and ``flow_euler`` are DDIM;
Euler-ancestral with eta=1 draws the DDPM posterior, so ``euler_ancestral`` is DDIM with eta.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from diffusion_train.conditioning.cond import Cond
from diffusion_train.diffusion.objective import Denoiser

Generator = torch.Generator | Sequence[torch.Generator] | None


def randn(shape: Sequence[int], generator: Generator = None, device=None, dtype=torch.float32) -> Tensor:
    """Standard normal noise; with one generator per image, row i comes from generator i."""
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=dtype)
                        for g in generator]).to(device)


def per_image_generators(seeds: Sequence[int], device="cpu") -> list[torch.Generator]:
    return [torch.Generator(device).manual_seed(int(s)) for s in seeds]


def _iter(n: int, progress: bool):
    if not progress:
        return range(n)
    from tqdm.auto import tqdm

    return tqdm(range(n), desc="sampling", leave=False)


def _schedule(denoiser: Denoiser, ts: Tensor, device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(timesteps, alpha, sigma, lambda = log(alpha/sigma)) as float64 on ``device``."""
    ts = ts.to(device)
    alphas, sigmas = denoiser.alpha_sigma(ts)
    alphas, sigmas = alphas.double(), sigmas.double()
    return ts, alphas, sigmas, alphas.log() - sigmas.log()


def _positive_alpha(alphas: Tensor, sigmas: Tensor) -> None:
    if not bool((alphas > 0).all()):
        raise ValueError("heun needs alpha > 0 at every timestep (finite sigma/alpha); "
                         "use flow_heun or a dpmpp sampler for flow or zero-terminal-SNR schedules")


def _flow(alphas: Tensor, sigmas: Tensor) -> None:
    if not torch.allclose(alphas + sigmas, torch.ones_like(alphas), atol=1e-6):
        raise ValueError("flow_heun needs a flow schedule (alpha = 1 - t, sigma = t)")


def _call(denoiser: Denoiser, x: Tensor, t: Tensor, cond: Cond | None) -> Tensor:
    return denoiser(x, t.to(torch.float32).expand(x.shape[0]), cond).float()


@torch.no_grad()
def ddim(denoiser: Denoiser, x: Tensor, timesteps: Tensor, cond: Cond | None = None, *,
         eta: float = 0.0, generator: Generator = None, progress: bool = False) -> Tensor:
    """DDIM (Song et al. 2021). ``eta=0`` is deterministic (the probability-flow ODE's first-order
    exponential integrator); ``eta=1`` adds the DDPM posterior noise, i.e. ancestral sampling.

    One step from (a, s) to (a', s'): x' = a' x0 + sqrt(s'^2 - c^2) eps + c z, with
    c = eta * s' * sqrt(1 - (a s' / (a' s))^2) (the posterior std at eta = 1) and eps = (x - a x0)/s.
    With ``eta > 1``, c is capped at s' (as k-diffusion's ancestral steps): x' then keeps the marginal
    noise level s'.
    """
    x = x.float()
    ts, alphas, sigmas, _ = _schedule(denoiser, timesteps, x.device)
    x0 = x
    for i in _iter(len(ts), progress):
        x0 = _call(denoiser, x, ts[i], cond)
        if i == len(ts) - 1:
            break
        a, s, a_next, s_next = alphas[i], sigmas[i], alphas[i + 1], sigmas[i + 1]
        eps = (x - a * x0) / s
        c = (eta * s_next * (1 - (a * s_next / (a_next * s)) ** 2).clamp(min=0).sqrt()).clamp(max=s_next)
        x = (a_next * x0 + (s_next**2 - c**2).clamp(min=0).sqrt() * eps).float()
        if eta > 0:
            x = x + float(c) * randn(x.shape, generator, x.device)
    return x0


@torch.no_grad()
def ddpm(denoiser: Denoiser, x: Tensor, timesteps: Tensor, cond: Cond | None = None, *,
         generator: Generator = None, progress: bool = False) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020): each step samples the posterior q(x_t' | x_t, x0).

    Over the full 1000-step grid this is the original DDPM sampler; over a subsequence it is the
    ancestral sampler of that subsequence (identical to DDIM with eta=1).
    """
    return ddim(denoiser, x, timesteps, cond, eta=1.0, generator=generator, progress=progress)


@torch.no_grad()
def euler(denoiser: Denoiser, x: Tensor, timesteps: Tensor, cond: Cond | None = None, *,
          generator: Generator = None, progress: bool = False) -> Tensor:
    """Euler's method on the probability-flow ODE in sigma/alpha (Karras et al. 2022, k-diffusion's
    ``sample_euler``); identical to DDIM with eta=0, and to flow-matching Euler for flow schedules."""
    return ddim(denoiser, x, timesteps, cond, eta=0.0, generator=generator, progress=progress)


flow_euler = euler


@torch.no_grad()
def euler_ancestral(denoiser: Denoiser, x: Tensor, timesteps: Tensor, cond: Cond | None = None, *,
                    eta: float = 1.0, generator: Generator = None, progress: bool = False) -> Tensor:
    """Euler ancestral (k-diffusion): a deterministic step to sigma_down, then fresh noise sigma_up;
    with eta=1 this is the DDPM posterior step, i.e. DDIM with the same eta."""
    return ddim(denoiser, x, timesteps, cond, eta=eta, generator=generator, progress=progress)


@torch.no_grad()
def dpmpp_2m(denoiser: Denoiser, x: Tensor, timesteps: Tensor, cond: Cond | None = None, *,
             generator: Generator = None, progress: bool = False) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): second-order multistep in lambda, one evaluation per step.

    x' = (s'/s) x - a' (e^{-h} - 1) D, D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}, h = lambda' - lambda,
    r = h_{i-1}/h; the first step is first order (D = x0_i). A step from alpha = 0 (lambda = -inf)
    is exact first order: x' = (s'/s) x + a' x0.
    """
    x = x.float()
    ts, alphas, sigmas, lam = _schedule(denoiser, timesteps, x.device)
    x0_prev, h_prev = None, None
    x0 = x
    for i in _iter(len(ts), progress):
        x0 = _call(denoiser, x, ts[i], cond)
        if i == len(ts) - 1:
            break
        h = lam[i + 1] - lam[i]
        d = x0
        if x0_prev is not None and torch.isfinite(h_prev):
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        x = ((sigmas[i + 1] / sigmas[i]) * x - alphas[i + 1] * torch.expm1(-h) * d).float()
        x0_prev, h_prev = x0, h
    return x0


@torch.no_grad()
def dpmpp_3m(denoiser: Denoiser, x: Tensor, timesteps: Tensor, cond: Cond | None = None, *,
             generator: Generator = None, progress: bool = False) -> Tensor:
    """DPM-Solver++(3M) (Lu et al. 2022, multistep third order), one evaluation per step; the first two
    steps are first and second order.

    With phi1 = e^{-h} - 1, phi2 = phi1/h + 1, phi3 = phi2/h - 1/2, r0 = h0/h, r1 = h1/h:
    D1_0 = (x0_0 - x0_1)/r0, D1_1 = (x0_1 - x0_2)/r1, D1 = D1_0 + r0/(r0 + r1) (D1_0 - D1_1),
    D2 = (D1_0 - D1_1)/(r0 + r1); x' = (s'/s) x - a' phi1 x0_0 + a' phi2 D1 - a' phi3 D2.

    This is the published multistep formula (as in k-diffusion and diffusers). D1 ~ h x0', but D2 ~ h^2 x0''/2,
    half of what the exact integral of the x0'' Taylor term needs, so the solver is second order (its error
    falls about 4x per doubling of the steps). Doubling D2 makes it third order on grids uniform in log-SNR,
    but worse on the Karras grids used in practice (docs/samplers.md), so it is kept as published.
    """
    x = x.float()
    ts, alphas, sigmas, lam = _schedule(denoiser, timesteps, x.device)
    hist: list[tuple[Tensor, Tensor]] = []  # (x0, h that led to it) of earlier steps, newest first
    x0 = x
    for i in _iter(len(ts), progress):
        x0 = _call(denoiser, x, ts[i], cond)
        if i == len(ts) - 1:
            break
        h = lam[i + 1] - lam[i]
        ratio, a_next = sigmas[i + 1] / sigmas[i], alphas[i + 1]
        phi1 = torch.expm1(-h)
        usable = [(m, hh) for m, hh in hist if torch.isfinite(hh)]
        if len(usable) >= 2:
            (m1, h0), (m2, h1) = usable[0], usable[1]
            r0, r1 = h0 / h, h1 / h
            d1_0, d1_1 = (x0 - m1) / r0, (m1 - m2) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi2 = phi1 / h + 1
            phi3 = phi2 / h - 0.5
            x = ratio * x - a_next * phi1 * x0 + a_next * phi2 * d1 - a_next * phi3 * d2
        elif len(usable) == 1:
            m1, h0 = usable[0]
            r0 = h0 / h
            x = ratio * x - a_next * phi1 * x0 - 0.5 * a_next * phi1 * (x0 - m1) / r0
        else:
            x = ratio * x - a_next * phi1 * x0
        x = x.float()
        hist = [(x0, h)] + hist[:1]
    return x0


@torch.no_grad()
def dpmpp_2s(denoiser: Denoiser, x: Tensor, timesteps: Tensor, cond: Cond | None = None, *,
             generator: Generator = None, progress: bool = False) -> Tensor:
    """DPM-Solver++(2S) (Lu et al. 2022), singlestep second order with the midpoint in lambda (r = 1/2):
    two evaluations per step (the last timestep needs one). A step from alpha = 0 is first order."""
    x = x.float()
    ts, alphas, sigmas, lam = _schedule(denoiser, timesteps, x.device)
    x0 = x
    for i in _iter(len(ts), progress):
        x0 = _call(denoiser, x, ts[i], cond)
        if i == len(ts) - 1:
            break
        h = lam[i + 1] - lam[i]
        ratio, a_next = sigmas[i + 1] / sigmas[i], alphas[i + 1]
        if not torch.isfinite(lam[i]):
            x = (ratio * x - a_next * torch.expm1(-h) * x0).float()
            continue
        lam_mid = lam[i] + h / 2
        t_mid = denoiser.schedule.t_at(2 * lam_mid).to(x.device)
        a_mid, s_mid = (v.double() for v in denoiser.alpha_sigma(t_mid))
        lam_mid = a_mid.log() - s_mid.log()  # the exact lambda of the time actually used
        u = ((s_mid / sigmas[i]) * x - a_mid * torch.expm1(lam[i] - lam_mid) * x0).float()
        x0_mid = _call(denoiser, u, t_mid, cond)
        r = (lam_mid - lam[i]) / h
        d = (1 - 1 / (2 * r)) * x0 + 1 / (2 * r) * x0_mid
        x = (ratio * x - a_next * torch.expm1(-h) * d).float()
    return x0


@torch.no_grad()
def heun(denoiser: Denoiser, x: Tensor, timesteps: Tensor, cond: Cond | None = None, *,
         s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0,
         generator: Generator = None, progress: bool = False) -> Tensor:
    """Heun's second-order method in sigma/alpha (Karras et al. 2022, algorithm 2), with optional
    churn: at sigma in [s_tmin, s_tmax] the noise is raised to sigma (1 + gamma), gamma =
    min(s_churn / N, sqrt(2) - 1), by adding fresh noise, before the step, but never past the schedule's
    largest sigma/alpha: the denoiser is then called at the noise level x has, a time the model was trained
    on. Needs alpha > 0 at every timestep (for flow schedules from t = 1 use ``flow_heun``)."""
    x = x.float()
    ts, alphas, sigmas, _ = _schedule(denoiser, timesteps, x.device)
    _positive_alpha(alphas, sigmas)
    sig = sigmas / alphas
    n = len(ts)
    gamma_max = min(s_churn / n, math.sqrt(2) - 1)
    ve_max = denoiser.schedule.ve_sigma_range()[1]
    x_ve = x / alphas[0]

    def d_ve(x_ve: Tensor, t: Tensor) -> Tensor:
        a, _ = denoiser.alpha_sigma(t.reshape(1).to(x.device))
        return _call(denoiser, (a.double() * x_ve).float(), t, cond)

    x0 = x
    for i in _iter(n, progress):
        s_i, t_i = sig[i], ts[i]
        gamma = gamma_max if s_churn > 0 and s_tmin <= float(s_i) <= s_tmax else 0.0
        s_hat = (s_i * (1 + gamma)).clamp(max=ve_max)
        if s_hat > s_i:
            x_ve = x_ve + s_noise * (s_hat**2 - s_i**2).sqrt() * randn(x.shape, generator, x.device)
            s_i, t_i = s_hat, denoiser.schedule.t_at((-2 * s_hat.log()).reshape(1)).to(x.device)[0]
        x0 = d_ve(x_ve, t_i)
        if i == n - 1:
            break
        d = (x_ve - x0) / s_i
        x_pred = x_ve + (sig[i + 1] - s_i) * d
        d_next = (x_pred - d_ve(x_pred, ts[i + 1])) / sig[i + 1]
        x_ve = (x_ve + (sig[i + 1] - s_i) * (d + d_next) / 2).float()
    return x0


@torch.no_grad()
def flow_heun(denoiser: Denoiser, x: Tensor, timesteps: Tensor, cond: Cond | None = None, *,
              generator: Generator = None, progress: bool = False) -> Tensor:
    """Heun's method on dx/dt = (x - x0)/t for linear-interpolation (flow) schedules, alpha = 1 - t and
    sigma = t; works from t = 1 (pure noise)."""
    x = x.float()
    ts, alphas, sigmas, _ = _schedule(denoiser, timesteps, x.device)
    _flow(alphas, sigmas)
    x0 = x
    for i in _iter(len(ts), progress):
        x0 = _call(denoiser, x, ts[i], cond)
        if i == len(ts) - 1:
            break
        v = (x - x0) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        x_pred = (x + dt * v).float()
        v_next = (x_pred - _call(denoiser, x_pred, ts[i + 1], cond)) / sigmas[i + 1]
        x = (x + dt * (v + v_next) / 2).float()
    return x0


heun.check_schedule = _positive_alpha
flow_heun.check_schedule = _flow


class Sampler:
    """A configured sampler: a solver function, its number of steps and their spacing.

    Config example (``conf/sampler/ddim.yaml``)::

        _target_: diffusion_train.diffusion.samplers.Sampler
        solver: {_target_: diffusion_train.diffusion.samplers.ddim, _partial_: true, eta: 0.0}
        steps: 50
        spacing: auto        # the schedule's own grid (leading for DDPM, karras for EDM, linspace for flow)
    """

    def __init__(self, solver, steps: int = 50, spacing: str = "auto"):
        if int(steps) < 1:
            raise ValueError(f"sampler.steps must be >= 1, got {steps}")
        eta = getattr(solver, "keywords", {}).get("eta")  # a config's solver is a partial of the function
        if eta is not None and not (isinstance(eta, (int, float)) and 0 <= eta < math.inf):
            raise ValueError(f"sampler.solver.eta={eta}: give a number >= 0 (0: deterministic, 1: DDPM's noise)")
        self.solver, self.steps, self.spacing = solver, int(steps), spacing

    @property
    def _function(self):
        return getattr(self.solver, "func", self.solver)  # a config's solver is a partial of the function

    @property
    def name(self) -> str:
        """The solver function's name (``ddim``, ``heun``, ...)."""
        return getattr(self._function, "__name__", type(self._function).__name__)

    def check(self, schedule) -> None:
        """Raises the ValueError sampling would raise at its start: a spacing the schedule cannot take, or a
        solver that cannot run on its times (``heun`` where alpha reaches 0, ``flow_heun`` off a flow)."""
        ts = schedule.timesteps(self.steps, self.spacing)
        check = getattr(self._function, "check_schedule", None)
        if check is not None:
            alphas, sigmas = schedule.alpha_sigma(ts)
            check(alphas.double(), sigmas.double())

    def __call__(self, denoiser, noise: Tensor, cond: Cond | None = None, *, uncond: Cond | None = None,
                 guidance_scale: float = 1.0, guidance_interval: Sequence[float] | None = None,
                 guidance_rescale: float = 0.0, generator: Generator = None, progress: bool = False) -> Tensor:
        """Samples from standard normal ``noise`` (scaled to the first timestep's marginal)."""
        from diffusion_train.diffusion.guidance import CFGDenoiser

        if guidance_scale != 1.0:
            if uncond is None:
                raise ValueError("guidance_scale != 1 needs the unconditional cond (uncond=...)")
            denoiser = CFGDenoiser(denoiser, uncond, guidance_scale, guidance_interval, guidance_rescale)
        ts = denoiser.schedule.timesteps(self.steps, self.spacing)
        a, s = denoiser.alpha_sigma(ts[:1].to(noise.device))
        x = noise.float() * (a.square() + s.square()).sqrt()
        return self.solver(denoiser, x, ts, cond, generator=generator, progress=progress)
