"""Loss-based membership inference on MAR: a subject's training loss under its own phenotypes, lower for members than
for subjects it never saw; used by the evaluation's privacy audit and by the sample-quality checks during training."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_roc_auc
from monai.networks import eval_mode
from sklearn.metrics import roc_curve
from torch import nn

from scripts.runtime.handlers import seeded
from scripts.runtime.progress import track


@torch.no_grad()
def mar_losses(mar: nn.Module, means: torch.Tensor, phenotypes: torch.Tensor, draws: int, seed: int,
               desc: str | None = None) -> np.ndarray:
    """(N,) MAR training loss of each posterior mean (N, C, T, H, W) under its phenotypes (N, F), averaged over
    `draws` seeded draws (masks, timesteps, noise); draw k uses the same seed for every subject; with `desc`, the
    progress is shown."""
    # batch 1: MAR's forward averages over the batch and draws one mask ratio per batch
    device = mar.mask_token.device
    losses = np.zeros((len(means), draws))
    with eval_mode(mar):
        for i in track(range(len(means)), desc) if desc else range(len(means)):
            for k in range(draws):
                with seeded(device, seed * 1000 + k):
                    losses[i, k] = float(mar(means[i:i + 1].to(device), phenotypes[i:i + 1].to(device)))
    return losses.mean(1)


def membership_inference(training_loss: Sequence[float], heldout_loss: Sequence[float], permutations: int = 1000,
                         seed: int = 0, fpr: float = 0.01) -> dict:
    """Loss-based membership inference: AUC of -loss for training (1) vs held-out (0), TPR at `fpr`, and the AUC's 95th
    percentile under `permutations` seeded label shuffles (chance); {"skipped": reason} if a set is empty."""
    score = -np.concatenate([training_loss, heldout_loss])
    label = np.r_[np.ones(len(training_loss)), np.zeros(len(heldout_loss))]
    if not (len(training_loss) and len(heldout_loss)):
        return {"skipped": f"{len(training_loss)} training and {len(heldout_loss)} held-out subjects: need both"}
    auc = float(compute_roc_auc(torch.as_tensor(score), torch.as_tensor(label)))
    false_pos, true_pos, _ = roc_curve(label, score)
    rng = np.random.default_rng(seed)
    null = [float(compute_roc_auc(torch.as_tensor(score), torch.as_tensor(rng.permutation(label))))
            for _ in range(permutations)]
    return {"auc": auc, "tpr_at_fpr": float(true_pos[false_pos <= fpr].max()), "fpr": fpr,
            "null_auc_95": float(np.quantile(null, 0.95)) if null else None, "permutations": permutations,
            "n_training": len(training_loss), "n_heldout": len(heldout_loss),
            "training_loss_mean": float(np.mean(training_loss)), "heldout_loss_mean": float(np.mean(heldout_loss))}
