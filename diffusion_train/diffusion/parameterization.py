"""Exact conversions between what a network predicts and the clean sample, for x_t = a*x0 + s*eps.

eps: the added noise; x0: the clean sample; v: a*eps - s*x0 (Salimans & Ho 2022).
"""

from __future__ import annotations

from torch import Tensor

PREDICTIONS = ("eps", "x0", "v")


def _check(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")


def target(prediction: str, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The regression target for ``prediction`` given the clean sample and the noise."""
    _check(prediction)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    return alpha * eps - sigma * x0


def to_x0(prediction: str, out: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The clean-sample estimate implied by a network output."""
    _check(prediction)
    if prediction == "eps":
        return (x_t - sigma * out) / alpha
    if prediction == "x0":
        return out
    return alpha * x_t - sigma * out


def x0_to_eps(x0: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return (x_t - alpha * x0) / sigma
