"""Local TorchScript feature networks (no downloads) and the Gaussian Frechet distance between feature sets."""

from __future__ import annotations

from pathlib import Path

import torch
from monai.metrics import FIDMetric
from torch import nn


# ---------------------------------------------------------------------------------------------------------- metrics
def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Gaussian Frechet distance between two sets of (N, F) vectors (MONAI FIDMetric, float64)."""
    return float(FIDMetric()(a.double().cpu(), b.double().cpu()))


def load_feature_network(path: str | Path, what: str = "perceptual_weights") -> nn.Module:
    """A local TorchScript feature network in eval mode without gradients, on the CPU (`what` names it in errors):
    the perceptual term's (N, 1, H, W) frames -> features, or the evaluation's Inception and I3D.

    Only a local file: MONAI's PerceptualLoss downloads its weights, which cannot happen here.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} file not found (a TorchScript feature network)")
    network = torch.jit.load(str(path), map_location="cpu").eval()
    for parameter in network.parameters():  # a loaded ScriptModule rejects requires_grad_
        parameter.requires_grad_(False)
    return network


