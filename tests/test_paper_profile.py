"""The networks at the paper's (authors') sizes: exact parameter counts on empty (meta) parameters and the paper
profile layered on every stage config (default suite); one training step and one sampling call (slow, marked: a few
minutes and ~12 GB of memory on a 2-core CPU; `python -m pytest -m slow tests/test_paper_profile.py -s`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from monai.bundle import ConfigParser
from torch import nn

from scripts.generation.autoencoder import CineAutoencoderKL
from scripts.generation.mar import MAR
from scripts.generation.phenotype_vae import PhenotypeVAE
from tests.conftest import REPO
from tests.networks import DEF_CONFIG, def_kwargs, layered

N_PHENOTYPES = 82  # the paper's phenotype count
AUTHORS_MAR, AUTHORS_VAE3D = 193.3e6, 277.7e6  # ../shared/REFERENCE.md, "The authors' public code"
OURS_MAR, OURS_VAE3D = 192_463_232, 277_734_097  # this implementation at the paper profile (a change must be deliberate)


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _authors_phenotype_vae() -> int:
    """By hand, the authors' phenotype VAE: Linear + BatchNorm (weight, bias) layers 82->128->128->128, two 128->32
    heads (mu, logvar), mirrored decoder 32->128->128->128 with BatchNorm and a plain 128->82 output (~0.1M)."""
    def lin(a: int, b: int) -> int:
        return a * b + b

    enc = lin(82, 128) + 2 * lin(128, 128) + 3 * 2 * 128
    dec = lin(32, 128) + 2 * lin(128, 128) + 3 * 2 * 128 + lin(128, 82)
    return enc + 2 * lin(128, 32) + dec


def _step(model: torch.nn.Module, loss: torch.Tensor, opt: torch.optim.Optimizer) -> None:
    """Backward + AdamW step; every parameter with a gradient has a finite one, and the weights change."""
    before = next(p for p in model.parameters() if p.requires_grad).detach().clone()
    opt.zero_grad()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    opt.step()
    assert not torch.equal(before, next(p for p in model.parameters() if p.requires_grad))


@contextmanager
def empty_parameters() -> Iterator[None]:
    """Every parameter registered inside the block lives on the meta device (no memory, no initialisation cost);
    buffers and other tensors (noise schedules) stay real. torch.device("meta") alone fails in MONAI's schedulers."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, None if param is None else nn.Parameter(param.to("meta"), param.requires_grad))

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def test_paper_parameter_counts() -> None:
    with empty_parameters():
        mar = MAR(N_PHENOTYPES, **def_kwargs("mar_def", "paper"))
        ae = CineAutoencoderKL(**def_kwargs("autoencoder_def", "paper"))
    vae = PhenotypeVAE(in_features=N_PHENOTYPES, hidden=[128, 128, 128], latent=32, negative_slope=0.01, dropout=0.0)
    rows = [("MAR", _params(mar), AUTHORS_MAR), ("3D-VAE", _params(ae), AUTHORS_VAE3D),
            ("phenotype VAE", _params(vae), _authors_phenotype_vae())]
    for name, ours, theirs in rows:
        print(f"{name}: {ours:,} parameters here, authors {theirs / 1e6:.1f}M ({ours / theirs - 1:+.2%})")
    assert (_params(mar), _params(ae)) == (OURS_MAR, OURS_VAE3D)
    for name, ours, theirs in rows:
        assert abs(ours / theirs - 1) < 0.01, (name, ours, theirs)
    assert _params(vae) == _authors_phenotype_vae()  # the hand count, exactly


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.json")
                                          if p.name not in ("metadata.json", "multi_gpu.json")))
def test_paper_profile_layers_on_every_stage_config(config: str) -> None:
    """configs/profiles/paper.json merges onto each stage config, and every network def the config holds equals the
    def of the config that trains it (so the paper checkpoints load wherever they are used)."""
    own = ConfigParser.load_config_file(REPO / "configs" / config)
    assert layered(config, "paper")["profile"] == "paper" or "profile" not in own
    for name, trainer in DEF_CONFIG.items():
        if "_target_" in own.get(name, {}) and config != trainer:  # a def it builds (not a forwarded edit)
            ours, trained = def_kwargs(name, "paper", config), def_kwargs(name, "paper")
            assert {k: ours.get(k) for k in trained} == trained, (config, name)  # data-dependent ones aside


@pytest.mark.slow
def test_paper_mar_train_step_and_sampling() -> None:
    """One training step (batch 2, AdamW as the authors) and one sampling call at batch 1 with num_iter 2,
    num_inference_steps 2, cfg 3.0 (the paper samples with 16 iterations and 100 steps; shapes and finiteness only)."""
    torch.manual_seed(0)
    mar = MAR(N_PHENOTYPES, **def_kwargs("mar_def", "paper")).train()
    opt = torch.optim.AdamW(mar.parameters(), lr=8e-4, betas=(0.9, 0.95), weight_decay=0.01)
    latents, phenotypes = torch.randn(2, *mar.latent_shape), torch.randn(2, N_PHENOTYPES)
    start = time.perf_counter()
    loss = mar(latents, phenotypes)
    assert loss.ndim == 0 and torch.isfinite(loss)
    _step(mar, loss, opt)
    print(f"MAR training step (batch 2): loss {loss.item():.3f}, {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    out = mar.sample_latents(phenotypes[:1], seeds=[0], num_iter=2, cfg=3.0, num_inference_steps=2)
    assert out.shape == (1, 16, 25, 12, 12) and torch.isfinite(out).all()
    print(f"MAR sampling (batch 1, 2 iterations, 2 steps, cfg 3.0): {time.perf_counter() - start:.1f} s")


@pytest.mark.slow
def test_paper_autoencoder_train_step_and_decode() -> None:
    """One training step (L1 + 1e-6 KL, AdamW) on a 1x1x10x96x96 clip -- 10 frames, not the paper's 50, which would
    take many minutes per step on a 2-core CPU -- and one no-grad decode of a 16x5x12x12 latent."""
    torch.manual_seed(0)
    ae = CineAutoencoderKL(**def_kwargs("autoencoder_def", "paper")).train()
    opt = torch.optim.AdamW(ae.parameters(), lr=8e-4)
    clip = torch.rand(1, 1, 10, 96, 96)
    start = time.perf_counter()
    recon, mean, logvar = ae(clip)
    assert recon.shape == clip.shape and mean.shape == logvar.shape == (1, 16, 5, 12, 12)
    loss = (recon - clip).abs().mean() + 1e-6 * ae.kl_loss(mean, logvar)
    assert torch.isfinite(loss)
    _step(ae, loss, opt)
    print(f"3D-VAE training step (1x1x10x96x96): loss {loss.item():.3f}, {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    with torch.no_grad():
        cine = ae.eval().decode(torch.randn(1, 16, 5, 12, 12))
    assert cine.shape == (1, 1, 10, 96, 96) and torch.isfinite(cine).all()
    print(f"3D-VAE decode (16x5x12x12 -> 1x10x96x96): {time.perf_counter() - start:.1f} s")
