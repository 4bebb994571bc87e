"""A trained segmenter's encoder as the autoencoder's perceptual network: per-frame features we can build here.

Our own module: MONAI's PerceptualLoss needs downloaded LPIPS/RadImageNet weights; this one is trained on the phantom."""

from __future__ import annotations

import copy
from pathlib import Path

import ignite.distributed as idist
import torch
from torch import nn

from scripts.runtime.checkpoints import load_weights
from scripts.runtime.files import atomic_write


class SegmenterFeatures(nn.Module):
    """(N, 1, H, W) frames -> (N, D) encoder activations of a MONAI UNet, every level unit-normalised over its
    channels (as LPIPS) and scaled so that each level weighs the same in a mean over D."""

    def __init__(self, unet: nn.Module, frame_size: int = 96) -> None:
        super().__init__()
        levels, block = [], unet.model
        while isinstance(block, nn.Sequential) and len(block) == 3:  # (down, SkipConnection(inner), up)
            levels.append(block[0])
            block = block[1].submodule
        levels.append(block)  # the bottom
        self.levels = nn.ModuleList(levels)
        with torch.no_grad():
            sizes = [f.shape[1] for f in self._levels(torch.zeros(1, 1, frame_size, frame_size))]
        self.scales = [sum(sizes) / (len(sizes) * s) for s in sizes]

    def _levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for level in self.levels:
            x = level(x)  # (N, C_l, H_l, W_l)
            out.append((x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-6)).flatten(1))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) -> (N, D)."""
        return torch.cat([f * s for f, s in zip(self._levels(x), self.scales)], 1)


def export_features(checkpoint: str | Path, network: nn.Module, path: str | Path) -> Path:
    """The encoder of the segmenter in `checkpoint` (weights_only, shape-checked) as TorchScript at `path` (written to a
    temporary name, then renamed; rank 0): the file `train_autoencoder.json`'s perceptual_weights takes."""
    path = Path(path)
    if idist.get_rank() != 0:
        return path
    features = SegmenterFeatures(load_weights(copy.deepcopy(network), checkpoint).cpu()).eval()
    for parameter in features.parameters():
        parameter.requires_grad_(False)
    with atomic_write(path) as tmp:
        torch.jit.script(features).save(str(tmp))
    return path
