"""Losses of the generative stages: the Gaussian KL term, the phenotype VAE loss and the cine reconstruction loss."""

from __future__ import annotations

import torch
from monai.utils import CommonKeys
from torch import nn

from scripts.runtime.handlers import frames_as_images


# ------------------------------------------------------------------------------------------------- loss and steps
class VAELoss(nn.Module):
    """MSE (mean over elements) + beta * KL(q(z|x) || N(0, I)) (summed over latent dims, mean over the batch).
    Returns {"loss", "recon", "kl"} (scalar tensors)."""

    def __init__(self, beta: float = 0.01) -> None:  # beta 0.01 as in the authors' code
        super().__init__()
        self.beta = beta

    def forward(self, recon: torch.Tensor, target: torch.Tensor, mu: torch.Tensor,
                logvar: torch.Tensor) -> dict[str, torch.Tensor]:
        """recon, target (B, F); mu, logvar (B, latent)."""
        mse = nn.functional.mse_loss(recon, target)
        kl = gaussian_kl(mu, logvar)
        return {"loss": mse + self.beta * kl, "recon": mse, "kl": kl}


class CineReconLoss(nn.Module):
    """L1 (mean per voxel) + perceptual_weight x per-frame feature L1 (only with a `feature_network`; on
    `perceptual_frames` random frames per cine, None: all) + kl_weight x KL (mean per latent element: the weight does
    not change with the cine or latent size).
    Returns {"loss", "nll" (L1 + perceptual: the term the adaptive GAN weight balances), "l1", "perceptual", "kl"}."""

    def __init__(self, kl_weight: float = 1e-6, feature_network: nn.Module | None = None,
                 perceptual_weight: float = 0.1, perceptual_frames: int | None = None) -> None:
        super().__init__()
        self.kl_weight, self.feature_network, self.perceptual_weight = kl_weight, feature_network, perceptual_weight
        self.perceptual_frames = perceptual_frames

    def forward(self, recon: torch.Tensor, target: torch.Tensor, mean: torch.Tensor,
                logvar: torch.Tensor) -> dict[str, torch.Tensor]:
        """recon, target (B, C, T, H, W); mean, logvar the posterior (B, latent, t, h, w)."""
        l1 = (recon - target).abs().mean()
        perceptual = torch.zeros_like(l1)
        if self.feature_network is not None:
            frames = recon.shape[2]
            if self.perceptual_frames is not None and self.perceptual_frames < frames:  # the same frames of both
                keep = torch.randperm(frames, device=recon.device)[:self.perceptual_frames]
                recon, target = recon[:, :, keep], target[:, :, keep]
            fake, real = frames_as_images({CommonKeys.PRED: recon, CommonKeys.LABEL: target})
            perceptual = (self.feature_network(fake) - self.feature_network(real)).abs().mean()
        nll = l1 + self.perceptual_weight * perceptual
        kl = gaussian_kl(mean, logvar) / mean[0].numel()  # per latent element
        return {"loss": nll + self.kl_weight * kl, "nll": nll, "l1": l1, "perceptual": perceptual, "kl": kl}


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over the latent elements, averaged over the batch (dim 0)."""
    return (0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)).flatten(1).sum(1).mean()

