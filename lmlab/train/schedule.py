"""Learning-rate schedule: linear warm-up, then cosine decay to a floor (Zhao et al. §4.3.2)."""

from __future__ import annotations

import math


def lr_at(step: int, progress: float, peak: float, warmup_steps: int, min_ratio: float) -> float:
    """`progress` in [0, 1] is the fraction of the budget (steps, tokens or time) spent."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    q = min(max(progress, 0.0), 1.0)
    floor = peak * min_ratio
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * q))
