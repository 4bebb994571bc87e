"""Cine autoencoder training pieces for `configs/train_autoencoder.json`: the GAN iteration and the evaluation step."""

from __future__ import annotations

import torch
from ignite.engine import Engine
from monai.networks import eval_mode
from monai.utils import CommonKeys
from torch import nn
from torch.nn import functional as F

from scripts.runtime.distributed import unwrap
from scripts.runtime.handlers import autocast
from scripts.runtime.optim_steps import FiniteSteps

# ------------------------------------------------------------------------------------- cine autoencoder (stage 2)
IMAGE = "image"  # dataset key of a (1, T, H, W) float32 cine in [0, 1]


class AutoencoderGANStep:
    """`iteration_update` of SupervisedTrainer for the cine autoencoder: a generator step (the network through the
    engine's inferer), then a hinge discriminator step; from iteration `gan_start_step` (1-based) the generator adds
    -D(recon) x `adaptive_weight`. An update with non-finite gradients is skipped (`FiniteSteps`). Returns the loss
    pieces as MONAI's decollated output: [{"loss", ...}]."""

    def __init__(self, discriminator: nn.Module, d_optimizer: torch.optim.Optimizer, gan_start_step: int = 10001,
                 adversarial_weight: float = 0.05) -> None:
        self.discriminator, self.d_optimizer = discriminator, d_optimizer
        self.gan_start_step, self.adversarial_weight = gan_start_step, adversarial_weight
        self.steps, self.d_steps = FiniteSteps("autoencoder"), FiniteSteps("discriminator")

    def adaptive_weight(self, nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
        """adversarial_weight x |d nll / d w| / (|d g_loss / d w| + 1e-4), ratio clamped to [0, 1e4], detached."""
        nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        ratio = nll_grad.norm() / (g_grad.norm() + 1e-4)
        return self.adversarial_weight * ratio.clamp(0.0, 1e4).detach()

    def __call__(self, engine: Engine, batch: dict) -> list[dict[str, float]]:
        x = batch[IMAGE].to(engine.state.device, non_blocking=engine.non_blocking)  # (B, 1, T, H, W)
        net, disc = engine.network, self.discriminator
        gan_on = engine.state.iteration >= self.gan_start_step
        net.train()
        disc.train()
        with autocast(engine):
            recon, mean, logvar = engine.inferer(x, net)
            losses = engine.loss_function(recon, x, mean, logvar)
            total = losses["loss"]
            if gan_on:
                losses["g_loss"] = -disc(recon)[-1].float().mean()  # the discriminator's last output: patch logits
                last_layer = [p for p in unwrap(net).decoder.parameters() if p.ndim == 5][-1]
                losses["d_weight"] = self.adaptive_weight(losses["nll"], losses["g_loss"], last_layer)
                total = total + losses["d_weight"] * losses["g_loss"]
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        total.backward()
        self.steps.step(engine.optimizer, net.parameters(), iteration=engine.state.iteration)
        if gan_on:
            self.d_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
            halves = []
            for target, sign in ((x, 1.0), (recon.detach(), -1.0)):  # a backward per forward, as DDP requires
                with autocast(engine):
                    halves.append(0.5 * F.relu(1.0 - sign * disc(target)[-1].float()).mean())
                halves[-1].backward()
            losses["d_loss"] = halves[0].detach() + halves[1].detach()
            self.d_steps.step(self.d_optimizer, disc.parameters(), iteration=engine.state.iteration)
        return [{k: v.item() for k, v in losses.items()}]


def autoencoder_eval_step(engine: Engine, batch: dict) -> dict[str, torch.Tensor]:
    """`iteration_update` of SupervisedEvaluator: {"pred": reconstruction of the posterior mean in [0, 1], "label"}."""
    x = batch[IMAGE].to(engine.state.device, non_blocking=engine.non_blocking)
    with eval_mode(engine.network), autocast(engine):
        recon = engine.inferer(x, engine.network)[0]
    return {CommonKeys.PRED: recon.float().clamp(0.0, 1.0), CommonKeys.LABEL: x}


