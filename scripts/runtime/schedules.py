"""Learning-rate factors for torch's LambdaLR that a time budget can stretch (their `total` is plain state)."""

from __future__ import annotations

import math


class WarmupCosine:
    """Factor of the base rate at iteration i: linear warm-up over `warmup` iterations to 1, then a cosine from 1 to
    `final` at iteration `total`; `final` 1.0 keeps the rate constant after the warm-up (MAR's schedule)."""

    def __init__(self, warmup: int, total: int, final: float = 1.0) -> None:
        if not 0.0 <= final <= 1.0:
            raise ValueError(f"final learning-rate factor must be in [0, 1], got {final}")
        self.warmup, self.total, self.final = max(1, int(warmup)), max(1, int(total)), float(final)

    def __call__(self, i: int) -> float:
        if i < self.warmup:
            return (i + 1) / self.warmup
        progress = min(1.0, (i - self.warmup) / max(1, self.total - self.warmup))
        return self.final + (1.0 - self.final) * 0.5 * (1.0 + math.cos(math.pi * progress))
