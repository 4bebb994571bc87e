"""Stage 2 KL video autoencoder: shapes, gradients, a short overfit, parameter counts and the CPU decode time."""

from __future__ import annotations

import math
import time

import pytest
import torch

from scripts.generation.autoencoder import CineAutoencoderKL
from tests.networks import def_kwargs

PAPER_PARAMS = 277.7e6  # the authors' 3D-VAE
MINI_PAPER = {**def_kwargs("autoencoder_def", "paper"), "channels": (8, 8, 16, 16), "norm_num_groups": 4}  # paper, tiny widths


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread: on a shared 2-core machine, 2 OpenMP threads made these small steps 10-60x slower under load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _cine(b: int, t: int, h: int = 96, seed: int = 0) -> torch.Tensor:
    """(b, 1, t, h, h) in [0, 1]: a bright disc whose radius beats over the frames, plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, h), indexing="ij")
    radius = 0.4 + 0.15 * torch.cos(torch.linspace(0, 2 * math.pi, t))[:, None, None]  # (t, 1, 1)
    disc = torch.sigmoid((radius - (xx**2 + yy**2).sqrt()) * 20)  # (t, h, h)
    return (0.8 * disc + 0.1 * torch.rand(b, 1, t, h, h, generator=g)).clamp(0, 1)


@pytest.mark.parametrize("profile", ["tiny", "cpu"])
@pytest.mark.parametrize("frames", [50, 20])
def test_shapes_round_trip(profile: str, frames: int) -> None:
    model = CineAutoencoderKL(**def_kwargs("autoencoder_def", profile)).eval()
    x = _cine(2, frames)
    with torch.no_grad():
        mean, logvar = model.encode(x)
        recon = model.decode(model.sample(mean, logvar))
    assert model.factors == (2, 8, 8)
    assert mean.shape == logvar.shape == (2, 16, frames // 2, 12, 12)
    assert recon.shape == x.shape


def test_paper_layout_shapes_and_gradients() -> None:
    """The paper design (3D convs, 1x3x3 / 3x3x3 steps, attention) at tiny widths on a small clip."""
    model = CineAutoencoderKL(**MINI_PAPER)
    x = _cine(2, 8, 32)
    recon, mean, logvar = model(x)
    assert mean.shape == (2, 16, 4, 4, 4) and recon.shape == x.shape
    ((recon - x).abs().mean() + model.kl_loss(mean, logvar)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_refuses_sizes_off_the_factors() -> None:
    model = CineAutoencoderKL(**def_kwargs("autoencoder_def", "tiny"))
    with pytest.raises(ValueError, match="multiples"):
        model.encode(torch.zeros(1, 1, 25, 96, 96))
    with pytest.raises(ValueError, match="down_strides"):
        CineAutoencoderKL(**{**def_kwargs("autoencoder_def", "tiny"), "down_strides": [(1, 2, 2)]})


def test_gradients_reach_every_parameter() -> None:
    model = CineAutoencoderKL(**def_kwargs("autoencoder_def", "tiny"))
    x = _cine(2, 50)
    recon, mean, logvar = model(x)
    ((recon - x).abs().mean() + 1e-6 * model.kl_loss(mean, logvar)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_overfits_one_batch() -> None:
    torch.manual_seed(0)
    model = CineAutoencoderKL(**def_kwargs("autoencoder_def", "tiny"))
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = _cine(2, 10, 48)
    losses = []
    for _ in range(40):
        recon, mean, logvar = model(x)
        l1 = (recon - x).abs().mean()
        optimiser.zero_grad()
        (l1 + 1e-6 * model.kl_loss(mean, logvar)).backward()
        optimiser.step()
        losses.append(l1.item())
    print(f"tiny overfit L1: {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[-1] < 0.35 * losses[0]


def test_sample_and_kl() -> None:
    mean, logvar = torch.randn(2, 16, 5, 3, 3), torch.randn(2, 16, 5, 3, 3)
    draws = [CineAutoencoderKL.sample(mean, logvar, torch.Generator().manual_seed(1)) for _ in range(2)]
    assert torch.equal(*draws) and not torch.equal(draws[0], mean)
    assert CineAutoencoderKL.kl_loss(torch.zeros_like(mean), torch.zeros_like(logvar)).item() == 0.0
    assert CineAutoencoderKL.kl_loss(mean, logvar).item() > 0


def test_parameter_counts() -> None:
    """Paper profile counted on the meta device (no 1.1 GB allocation); JSON-passed kwargs build the same network."""
    with torch.device("meta"):
        paper = _count(CineAutoencoderKL(**def_kwargs("autoencoder_def", "paper")))
    counts = {name: _count(CineAutoencoderKL(**def_kwargs("autoencoder_def", name)))
              for name in ("tiny", "cpu")}
    print(f"parameters: paper {paper:,} (authors 277.7M), cpu {counts['cpu']:,}, tiny {counts['tiny']:,}")
    assert abs(paper - PAPER_PARAMS) / PAPER_PARAMS < 0.001
    assert counts["tiny"] < counts["cpu"] < 2e6


@pytest.mark.slow
def test_cpu_profile_decode_time() -> None:
    """Decode one 50x96x96 clip with the cpu profile on 2 threads: best of 5, well under 1 s (slow: a timing that
    other jobs on the machine can spoil)."""
    model = CineAutoencoderKL(**def_kwargs("autoencoder_def", "cpu")).eval()
    z = torch.randn(1, 16, 25, 12, 12)
    torch.set_num_threads(2)  # restored by the autouse fixture
    with torch.no_grad():
        model.decode(z)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            model.decode(z)
            times.append(time.perf_counter() - start)
    print(f"cpu profile decode of one clip: best {min(times):.3f} s, median {sorted(times)[2]:.3f} s")
    assert min(times) < 1.0
