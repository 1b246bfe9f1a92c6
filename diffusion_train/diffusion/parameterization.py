"""What a network predicts, and exact conversions, for x_t = a * x0 + s * eps.

- ``eps``:  the added noise.
- ``x0``:   the clean sample.
- ``v``:    a * eps - s * x0 (Salimans & Ho 2022).
- ``flow``: the flow velocity eps - x0 (rectified flow / flow matching; dx/dt for a = 1 - t, s = t).
- ``edm``:  the EDM network output F with preconditioning (Karras et al. 2022, table 1), written for any
  schedule in the variance-exploding view x_ve = x_t / a, sigma_ve = s / a:
  D = c_skip x_ve + c_out F(c_in x_ve), c_skip = sd^2/(sigma_ve^2 + sd^2), c_out = sigma_ve sd / sqrt(sigma_ve^2
  + sd^2), c_in = 1 / sqrt(sigma_ve^2 + sd^2), sd = ``sigma_data``.

``x0_mse_factor`` gives k with MSE(prediction) = k * MSE(x0 estimate), which turns a weighting
defined on the x0 error into a weight on the prediction's own MSE.
"""

from __future__ import annotations

import torch
from torch import Tensor

PREDICTIONS = ("eps", "x0", "v", "flow", "edm")


def check(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")


def edm_coefficients(alpha: Tensor, sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in) of the EDM preconditioning at the VE noise level sigma / alpha."""
    s = sigma / alpha
    norm = (s.square() + sigma_data**2).rsqrt()
    return sigma_data**2 * norm.square(), s * sigma_data * norm, norm


def net_input(prediction: str, x_t: Tensor, alpha: Tensor, sigma: Tensor, sigma_data: float = 0.5) -> Tensor:
    """What the network receives: x_t itself, or c_in * x_ve for ``edm``."""
    if prediction != "edm":
        return x_t
    _, _, c_in = edm_coefficients(alpha, sigma, sigma_data)
    return c_in * x_t / alpha


def target(prediction: str, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor, sigma_data: float = 0.5) -> Tensor:
    """The regression target for ``prediction`` given the clean sample and the noise."""
    check(prediction)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return alpha * eps - sigma * x0
    if prediction == "flow":
        return eps - x0
    c_skip, c_out, _ = edm_coefficients(alpha, sigma, sigma_data)
    x_ve = x0 + (sigma / alpha) * eps
    return (x0 - c_skip * x_ve) / c_out


def to_x0(prediction: str, out: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, sigma_data: float = 0.5) -> Tensor:
    """The clean-sample estimate implied by a network output."""
    check(prediction)
    if prediction == "eps":
        return (x_t - sigma * out) / alpha
    if prediction == "x0":
        return out
    if prediction == "v":
        return (alpha * x_t - sigma * out) / (alpha.square() + sigma.square())
    if prediction == "flow":
        return (x_t - sigma * out) / (alpha + sigma)
    c_skip, c_out, _ = edm_coefficients(alpha, sigma, sigma_data)
    return c_skip * x_t / alpha + c_out * out


def x0_to_eps(x0: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return (x_t - alpha * x0) / sigma


def convert(out: Tensor, source: str, dest: str, x_t: Tensor, alpha: Tensor, sigma: Tensor,
            sigma_data: float = 0.5) -> Tensor:
    """A prediction of type ``source`` re-expressed as a prediction of type ``dest`` (exact)."""
    x0 = to_x0(source, out, x_t, alpha, sigma, sigma_data)
    eps = x0_to_eps(x0, x_t, alpha, sigma)
    return target(dest, x0, eps, alpha, sigma, sigma_data)


def x0_mse_factor(prediction: str, alpha: Tensor, sigma: Tensor, sigma_data: float = 0.5) -> Tensor:
    """k(t) with ||pred - target||^2 = k ||x0_hat - x0||^2 at fixed x_t."""
    check(prediction)
    if prediction == "eps":
        return (alpha / sigma).square()
    if prediction == "x0":
        return torch.ones_like(alpha)
    if prediction == "v":
        return ((alpha.square() + sigma.square()) / sigma).square()
    if prediction == "flow":
        return ((alpha + sigma) / sigma).square()
    _, c_out, _ = edm_coefficients(alpha, sigma, sigma_data)
    return c_out.square().reciprocal()
