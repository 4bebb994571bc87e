"""Guarded optimiser steps: an update whose gradients are not finite is skipped, since one inf or NaN gradient
poisons Adam's moment estimates (and then every weight) for the rest of the run; too many in a row stop the run."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch
from torch import nn

logger = logging.getLogger(__name__)


class FiniteSteps:
    """`step` clips (optionally) and applies an optimiser's update only when the gradient norm is finite; a skipped
    update drops the gradients and is logged; `patience` skipped updates in a row raise a RuntimeError naming `name`.
    Under DDP the gradients are all-reduced before the check, so every rank skips alike."""

    def __init__(self, name: str, patience: int = 20) -> None:
        self.name, self.patience = name, patience
        self.skipped, self.in_a_row = 0, 0

    def step(self, optimizer: torch.optim.Optimizer, parameters: Iterable[nn.Parameter],
             max_norm: float = math.inf, iteration: int | None = None) -> torch.Tensor:
        """Gradient norm before clipping (a 0-d tensor); the update is applied only if it is finite."""
        params = [p for p in parameters if p.grad is not None]
        norm = nn.utils.get_total_norm([p.grad for p in params])
        if not torch.isfinite(norm):
            optimizer.zero_grad(set_to_none=True)
            self.skipped, self.in_a_row = self.skipped + 1, self.in_a_row + 1
            logger.warning("%s: non-finite gradient norm at iteration %s, update skipped (%d skipped so far)",
                           self.name, iteration, self.skipped)
            if self.in_a_row >= self.patience:
                raise RuntimeError(f"{self.name} diverged: {self.in_a_row} updates in a row with non-finite gradients "
                                   f"(last at iteration {iteration}); lower the learning rate or run with "
                                   f"--precision False")
            return norm
        if math.isfinite(max_norm):
            nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        optimizer.step()
        self.in_a_row = 0
        return norm
