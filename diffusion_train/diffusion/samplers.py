"""Samplers: pure functions with one signature, in the style of k-diffusion.

    sampler(denoiser, x, timesteps, cond=None, *, generator=None, progress=False, **options) -> x0

``denoiser(x, t, cond)`` returns the clean-sample estimate and ``denoiser.alpha_sigma(t)`` the
schedule, so every sampler works with every prediction type. ``x`` is the initial noise at the
first (noisiest) timestep, in the model's own space x_t = alpha*x0 + sigma*eps; ``timesteps``
is descending; after the last timestep the sampler returns the final clean estimate.
Guidance is a denoiser wrapper (``diffusion.guidance``), so every sampler gets it for free.

``generator`` is a ``torch.Generator`` or a list with one generator per image: with a list,
image i draws its noise from its own generator, so a sample depends only on its seed, never on
the batch size or on the number of processes it was split across.
"""

from __future__ import annotations

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


@torch.no_grad()
def ddim(denoiser: Denoiser, x: Tensor, timesteps: Tensor, cond: Cond | None = None, *,
         eta: float = 0.0, generator: Generator = None, progress: bool = False) -> Tensor:
    """DDIM (Song et al. 2021). ``eta=0`` is deterministic (the probability-flow ODE's first-order
    exponential integrator); ``eta=1`` adds the DDPM posterior noise, i.e. ancestral sampling.

    One step from (a, s) to (a', s'): x' = a' x0 + sqrt(s'^2 - c^2) eps + c z, with
    c = eta * s' * sqrt(1 - (a s' / (a' s))^2) (the posterior std) and eps = (x - a x0)/s.
    """
    x = x.float()
    ts = timesteps.to(x.device)
    alphas, sigmas = denoiser.alpha_sigma(ts)
    x0 = x
    for i in _iter(len(ts), progress):
        x0 = denoiser(x, ts[i].expand(x.shape[0]), cond)
        if i == len(ts) - 1:
            break
        a, s, a_next, s_next = alphas[i], sigmas[i], alphas[i + 1], sigmas[i + 1]
        eps = (x - a * x0) / s
        c = eta * s_next * (1 - (a * s_next / (a_next * s)) ** 2).clamp(min=0).sqrt()
        x = a_next * x0 + (s_next**2 - c**2).clamp(min=0).sqrt() * eps
        if eta > 0:
            x = x + c * randn(x.shape, generator, x.device)
    return x0


@torch.no_grad()
def ddpm(denoiser: Denoiser, x: Tensor, timesteps: Tensor, cond: Cond | None = None, *,
         generator: Generator = None, progress: bool = False) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020): each step samples the posterior q(x_t' | x_t, x0).

    Over the full 1000-step grid this is the original DDPM sampler; over a subsequence it is the
    ancestral sampler of that subsequence (identical to DDIM with eta=1).
    """
    return ddim(denoiser, x, timesteps, cond, eta=1.0, generator=generator, progress=progress)


class Sampler:
    """A configured sampler: a solver function, its number of steps and their spacing.

    Config example (``conf/sampler/ddim.yaml``)::

        _target_: diffusion_train.diffusion.samplers.Sampler
        solver: {_target_: diffusion_train.diffusion.samplers.ddim, _partial_: true, eta: 0.0}
        steps: 50
        spacing: leading
    """

    def __init__(self, solver, steps: int = 50, spacing: str = "leading"):
        self.solver, self.steps, self.spacing = solver, int(steps), spacing

    def __call__(self, denoiser, noise: Tensor, cond: Cond | None = None, *, uncond: Cond | None = None,
                 guidance_scale: float = 1.0, generator: Generator = None, progress: bool = False) -> Tensor:
        """Samples from standard normal ``noise`` (scaled to the first timestep's marginal)."""
        from diffusion_train.diffusion.guidance import CFGDenoiser

        if guidance_scale != 1.0:
            if uncond is None:
                raise ValueError("guidance_scale != 1 needs the unconditional cond (uncond=...)")
            denoiser = CFGDenoiser(denoiser, uncond, guidance_scale)
        ts = denoiser.timesteps(self.steps, self.spacing)
        a, s = denoiser.alpha_sigma(ts[:1].to(noise.device))
        x = noise.float() * (a.square() + s.square()).sqrt()
        return self.solver(denoiser, x, ts, cond, generator=generator, progress=progress)
