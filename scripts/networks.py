"""Networks of the CPGG bundle. Stage 1: the phenotype VAE (joint distribution of the phenotype vector).

The encoder and decoder are stacks of `Linear` + MONAI `ADN` (BatchNorm1d, LeakyReLU, optional dropout).
`monai.networks.nets.VarFullyConnectedNet` does not fit: it has no normalisation option, shares one activation block
across layers, puts a ReLU on the decoder input and a sigmoid on the output (phenotypes here are z-scores).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
from monai.networks import eval_mode
from monai.networks.blocks import ADN
from torch import nn


def _mlp(sizes: Sequence[int], negative_slope: float, dropout: float) -> nn.Sequential:
    """Linear -> BatchNorm1d -> LeakyReLU (-> Dropout) for each consecutive pair of `sizes`."""
    layers = [nn.Sequential(nn.Linear(a, b), ADN(ordering="NAD", in_channels=b, norm="BATCH", norm_dim=1,
                                                  act=("leakyrelu", {"negative_slope": negative_slope}),
                                                  dropout=dropout or None, dropout_dim=1))
              for a, b in pairwise(sizes)]
    return nn.Sequential(*layers)



def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over the latent elements, averaged over the batch (dim 0)."""
    return (0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)).flatten(1).sum(1).mean()

class PhenotypeVAE(nn.Module):
    """MLP VAE over a normalised phenotype vector of `in_features` columns (82 in the paper, 21 in this bundle).

    Encoder in_features -> hidden... -> (mu, logvar) of size `latent`; the decoder mirrors it:
    latent -> reversed(hidden)... -> in_features (a plain linear output: the inputs are z-scores).
    """

    def __init__(self, in_features: int, hidden: Sequence[int] = (128, 128, 128), latent: int = 32,
                 negative_slope: float = 0.01, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = list(hidden)
        if in_features < 1 or latent < 1 or not hidden:
            raise ValueError(f"PhenotypeVAE needs in_features >= 1, latent >= 1 and hidden layers; got "
                             f"in_features={in_features}, latent={latent}, hidden={hidden}")
        self.in_features, self.latent = in_features, latent
        self.encoder = _mlp([in_features, *hidden], negative_slope, dropout)
        self.mu = nn.Linear(hidden[-1], latent)
        self.logvar = nn.Linear(hidden[-1], latent)
        self.decoder = nn.Sequential(*_mlp([latent, *hidden[::-1]], negative_slope, dropout),
                                     nn.Linear(hidden[0], in_features))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, in_features) -> mu, logvar, each (B, latent)."""
        h = self.encoder(x)  # (B, hidden[-1])
        return self.mu(h), self.logvar(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent) -> (B, in_features) normalised phenotypes."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, in_features) -> (recon (B, in_features), mu (B, latent), logvar (B, latent)).

        Training draws z = mu + eps * exp(logvar / 2) (reparameterisation); evaluation decodes z = mu.
        """
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu  # (B, latent)
        return self.decode(z), mu, logvar

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Decode z ~ N(0, I): (n, in_features) normalised vectors, in eval mode.

        z is drawn on the CPU (with `generator`, a CPU generator) and moved to the network's device, so a seed gives
        the same draws on any device.
        """
        z = torch.randn(n, self.latent, generator=generator)  # (n, latent)
        with eval_mode(self):
            return self.decode(z.to(self.mu.weight.device))
