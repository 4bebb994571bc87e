"""Local TorchScript feature networks (no downloads) and the Gaussian Frechet distance between feature sets."""

from __future__ import annotations

from pathlib import Path

import torch
from monai.metrics import FIDMetric
from torch import nn

from scripts.runtime.files import file_digest

LOW_RANK_MIN_DIM = 128  # below it scipy's sqrtm is cheap: the phenotype vectors keep MONAI's FIDMetric


# ---------------------------------------------------------------------------------------------------------- metrics
def slopes(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(P,) least-squares slopes of (N, P) predictions on their targets (NaN where a target column is constant)."""
    p, t = pred - pred.mean(0), target - target.mean(0)
    var = (t * t).sum(0)  # (P,)
    return torch.where(var > 1e-12, (p * t).sum(0) / var.clamp_min(1e-12), torch.nan)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to (n1, D) and (n2, D) vectors, in float64 (ValueError below 2)."""
    if min(len(a), len(b)) < 2:
        raise ValueError(f"a Frechet distance needs >= 2 vectors per set, got {len(a)} and {len(b)}")
    a, b = a.double().cpu(), b.double().cpu()
    if min(len(a), len(b)) >= a.shape[1] or a.shape[1] < LOW_RANK_MIN_DIM:
        return float(FIDMetric()(a, b))
    # fewer vectors than (many) dimensions: tr sqrt(S1 S2) exactly as the nuclear norm of A B^T, not MONAI's slow sqrtm
    ca, cb = ((x - x.mean(0)) / (len(x) - 1) ** 0.5 for x in (a, b))  # (n, D) each: S = C^T C
    diff = a.mean(0) - b.mean(0)
    trace_sqrt = torch.linalg.svdvals(ca @ cb.T).sum()
    return float(diff @ diff + ca.pow(2).sum() + cb.pow(2).sum() - 2 * trace_sqrt)


def load_feature_network(path: str | Path, what: str = "perceptual_weights", sha256: str | None = None) -> nn.Module:
    """A local TorchScript feature network (perceptual (N, 1, H, W) frames -> features, Inception, I3D), eval mode,
    no gradients, on the CPU; FileNotFoundError names `what` (local file only: MONAI's PerceptualLoss downloads).
    TorchScript is code: with `sha256` the file's digest is checked before it is loaded (ValueError on a mismatch)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} file not found (a TorchScript feature network)")
    if sha256 and file_digest(path) != sha256.strip().lower():
        raise ValueError(f"{path}: {what} has SHA-256 {file_digest(path)}, not the pinned {sha256.strip().lower()}: "
                         "not loaded (TorchScript files run code; check where the file came from)")
    network = torch.jit.load(str(path), map_location="cpu").eval()
    for parameter in network.parameters():  # a loaded ScriptModule rejects requires_grad_
        parameter.requires_grad_(False)
    return network


