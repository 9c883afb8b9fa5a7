"""Learning-rate schedule: linear warm-up, then cosine decay to a floor (Zhao et al. §4.3.2)."""

from __future__ import annotations

import math


def lr_at(
    step: int,
    progress: float,
    peak: float,
    warmup_steps: int,
    min_ratio: float,
    warmup_progress: float = 0.0,
) -> float:
    """`progress` in [0, 1] is the fraction of the budget (steps, tokens or time) spent;
    `warmup_progress` is the progress at which warm-up ended, where the cosine starts."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(1.0 - warmup_progress, 1e-9)
    q = min(max((progress - warmup_progress) / span, 0.0), 1.0)
    floor = peak * min_ratio
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * q))
