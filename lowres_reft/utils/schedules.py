"""Learning-rate multipliers: pure functions of the step (used by the RL loop's optimizer and the tiny model's
pretraining)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, warmup: int, total: int, floor: float = 0.0) -> float:
    """LR multiplier at `step` (0-based) of `total`: linear warm-up over `warmup` steps, then cosine decay from 1 to
    `floor` (reached at `total`, held after)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def lr_factor(update: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base LR at optimizer update `update` (0-based): linear warmup, then the schedule."""
    if schedule == "cosine":
        return warmup_cosine(update, warmup, total)
    if warmup > 0 and update < warmup:
        return (update + 1) / warmup
    if schedule == "linear":
        return max(0.0, 1.0 - (update - warmup) / max(1, total - warmup))
    return 1.0
