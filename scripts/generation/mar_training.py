"""MAR training pieces for `configs/train_mar.json`: weight EMA, the training step and a seeded validation loss."""

from __future__ import annotations

import torch
from ignite.engine import Engine
from monai.networks import eval_mode
from torch import nn
from torch.optim.swa_utils import AveragedModel

from scripts.generation.autoencoder import CineAutoencoderKL
from scripts.runtime.distributed import unwrap
from scripts.runtime.handlers import autocast, seeded
from scripts.runtime.optim_steps import FiniteSteps


# ---------------------------------------------------------------------------------------------------- MAR (stage 3)
def ema_decay(decay: float, num_averaged: int) -> float:
    """The decay of the EMA update after `num_averaged` updates: min(decay, (1 + n) / (10 + n)), so the average
    forgets the initial weights within the first hundreds of steps however close `decay` is to 1."""
    return min(decay, (1 + num_averaged) / (10 + num_averaged))


def ema_model(network: nn.Module, decay: float) -> AveragedModel:
    """Exponential moving average of `network`'s parameters and buffers (torch's AveragedModel) with a warm-up of the
    decay per step (`ema_decay`; torch's get_ema_multi_avg_fn has a fixed decay)."""
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        weight = 1.0 - ema_decay(decay, int(num_averaged))
        for a, c in zip(averaged, current):
            a.lerp_(c, weight)
    return AveragedModel(unwrap(network), multi_avg_fn=update, use_buffers=True)


class MARStep:
    """`iteration_update` of SupervisedTrainer for MAR: a posterior draw of each cached latent, the MAR loss (network
    forward through the engine's inferer), an optimiser step with the gradient norm clipped to `grad_clip` (authors
    3.0; skipped if that norm is not finite, `FiniteSteps`) and an EMA update; returns MONAI's decollated output
    [{"loss", "grad_norm"}]."""

    def __init__(self, ema: AveragedModel, grad_clip: float = 3.0) -> None:
        self.ema, self.grad_clip = ema, grad_clip
        self.steps = FiniteSteps("MAR")

    def __call__(self, engine: Engine, batch: dict) -> list[dict[str, float]]:
        device = engine.state.device
        mean, logvar = batch["mean"].to(device), batch["logvar"].to(device)  # (B, 16, 25, 12, 12) each
        z = CineAutoencoderKL.sample(mean, logvar)
        engine.network.train()
        with autocast(engine):
            loss = engine.inferer(z, engine.network, batch["phenotypes"].to(device))  # phenotypes (B, F) normalised
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        loss.backward()
        grad_norm = self.steps.step(engine.optimizer, engine.network.parameters(), self.grad_clip,
                                    engine.state.iteration)
        self.ema.update_parameters(unwrap(engine.network))
        return [{"loss": loss.item(), "grad_norm": grad_norm.item()}]


def mar_eval_step(engine: Engine, batch: dict) -> dict[str, torch.Tensor]:
    """`iteration_update` of SupervisedEvaluator: the MAR loss of the posterior means, with masks, timesteps and noise
    drawn from a generator state seeded by the iteration (the same draws at every evaluation)."""
    device = engine.state.device
    with seeded(device, engine.state.iteration), eval_mode(engine.network), autocast(engine):
        loss = engine.inferer(batch["mean"].to(device), engine.network, batch["phenotypes"].to(device))
    return {"loss": loss.float()}
