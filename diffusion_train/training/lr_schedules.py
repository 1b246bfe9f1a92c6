"""Learning-rate schedules, counted in optimizer steps. Configs use them with ``_partial_: true``."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


class _Warmup:
    """A picklable multiplier of the rate of optimizer step ``step + 1`` (LambdaLR's count starts at 0): a linear
    warm-up reaching the peak at step ``warmup_steps``, then constant or a cosine that reaches ``min_ratio`` at
    step ``total_steps``, the last (the peak is used once)."""

    def __init__(self, warmup_steps: int, total_steps: int | None = None, min_ratio: float = 0.0,
                 cosine: bool = False):
        self.warmup_steps, self.total_steps, self.min_ratio, self.cosine = warmup_steps, total_steps, min_ratio, cosine
        if cosine and (total_steps is None or total_steps <= warmup_steps):
            raise ValueError(f"cosine LR schedule needs total_steps > warmup_steps, got {total_steps}, {warmup_steps}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if not self.cosine:
            return 1.0
        progress = min(1.0, (step + 1 - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_constant(optimizer: torch.optim.Optimizer, warmup_steps: int = 0) -> LambdaLR:
    return LambdaLR(optimizer, _Warmup(warmup_steps))


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                  min_ratio: float = 0.0) -> LambdaLR:
    """Linear warm-up, then cosine decay to ``min_ratio`` x lr at ``total_steps``."""
    return LambdaLR(optimizer, _Warmup(warmup_steps, total_steps, min_ratio, cosine=True))
