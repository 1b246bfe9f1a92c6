"""Learning-rate schedules, counted in optimizer steps. Configs use them with ``_partial_: true``.

Each is a linear warm-up, then a constant rate, then (cosine, WSD) a decay that reaches ``min_ratio`` x lr at the
last step. Warm-up-stable-decay (WSD) keeps the rate constant until the last ``decay_steps``: its rates up to the
start of the decay are those of any longer WSD run, so a run can branch from another run's checkpoint taken in the
stable phase and only decay (``init.branch_from``; docs/scaling.md, "Cool-downs").
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

DECAY_SHAPES = ("cosine", "linear", "sqrt")


class _Warmup:
    """A picklable multiplier of the rate of optimizer step ``step + 1`` (LambdaLR's count starts at 0): a linear
    warm-up reaching the peak at step ``warmup_steps``; then constant, or, with ``total_steps``, constant until step
    ``decay_start`` and a decay of ``shape`` reaching ``min_ratio`` at step ``total_steps``, the last.
    ``shape``: ``cosine`` (half a cosine), ``linear``, or ``sqrt`` (1 - sqrt of the decay's progress)."""

    def __init__(self, warmup_steps: int, total_steps: int | None = None, min_ratio: float = 0.0,
                 decay_start: int | None = None, shape: str = "cosine"):
        self.warmup_steps, self.total_steps, self.min_ratio, self.shape = warmup_steps, total_steps, min_ratio, shape
        self.decay_start = warmup_steps if decay_start is None else decay_start

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.total_steps is None:
            return 1.0
        progress = min(1.0, max(0.0, (step + 1 - self.decay_start) / (self.total_steps - self.decay_start)))
        if self.shape == "linear":
            left = 1.0 - progress
        elif self.shape == "sqrt":
            left = 1.0 - math.sqrt(progress)
        else:
            left = 0.5 * (1 + math.cos(math.pi * progress))
        return self.min_ratio + (1 - self.min_ratio) * left


def warmup_constant(optimizer: torch.optim.Optimizer, warmup_steps: int = 0) -> LambdaLR:
    return LambdaLR(optimizer, _Warmup(warmup_steps))


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                  min_ratio: float = 0.0) -> LambdaLR:
    """Linear warm-up, then cosine decay to ``min_ratio`` x lr at ``total_steps``."""
    if total_steps is None or total_steps <= warmup_steps:
        raise ValueError(f"lr_schedule: cosine needs total_steps > warmup_steps, got {total_steps}, {warmup_steps}")
    return LambdaLR(optimizer, _Warmup(warmup_steps, total_steps, min_ratio))


def warmup_stable_decay(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                        decay_fraction: float | None = 0.2, decay_steps: int | None = None, min_ratio: float = 0.0,
                        shape: str = "sqrt") -> LambdaLR:
    """Linear warm-up, constant, then a decay over the last ``decay_steps`` (default: ``decay_fraction`` of
    ``total_steps``, rounded) to ``min_ratio`` x lr at ``total_steps``; ``shape``: ``sqrt`` (1 - sqrt, the best of
    the shapes compared by Hägele et al. 2024), ``linear`` or ``cosine``."""
    if shape not in DECAY_SHAPES:
        raise ValueError(f"lr_schedule.shape={shape!r}: one of {', '.join(DECAY_SHAPES)}")
    if decay_steps is None:
        if decay_fraction is None or not 0 < decay_fraction <= 1:
            raise ValueError(f"lr_schedule.decay_fraction={decay_fraction}: a fraction in (0, 1] of total_steps "
                             f"(or give lr_schedule.decay_steps)")
        decay_steps = max(1, round(decay_fraction * total_steps))
    start = total_steps - decay_steps
    if decay_steps < 1 or start < warmup_steps:
        raise ValueError(f"lr_schedule: the decay ({decay_steps} steps) must be at least 1 step and start after the "
                         f"warm-up ({warmup_steps} steps) in {total_steps} steps")
    return LambdaLR(optimizer, _Warmup(warmup_steps, total_steps, min_ratio, decay_start=start, shape=shape))
