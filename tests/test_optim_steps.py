"""Guarded optimiser steps: a non-finite gradient never reaches the optimiser, and a run that keeps producing them
stops with an error naming it."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from monai.inferers import SimpleInferer
from monai.networks.nets import PatchDiscriminator
from torch import nn

from scripts.downstream.mae import MAETrainStep, MaskedPatchLoss, mae_network
from scripts.generation.autoencoder import CineAutoencoderKL
from scripts.generation.autoencoder_training import AutoencoderGANStep
from scripts.runtime.optim_steps import FiniteSteps
from tests.networks import def_kwargs, layered
from tests.test_train_autoencoder import _engine

torch.set_num_threads(1)


def _backward(net: nn.Module, x: torch.Tensor) -> None:
    net.zero_grad()
    net(x).pow(2).sum().backward()


def test_a_finite_step_is_applied_and_clipped() -> None:
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    _backward(net, 10 * torch.randn(8, 4))
    grads = [p.grad.clone() for p in net.parameters()]
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
    before = [p.detach().clone() for p in net.parameters()]
    returned = FiniteSteps("test").step(opt, net.parameters(), max_norm=1.0)
    assert float(returned) == pytest.approx(norm, rel=1e-5) and norm > 1.0
    steps = [b - p.detach() for b, p in zip(before, net.parameters())]  # SGD lr 1: the clipped gradient itself
    assert math.sqrt(sum(float(s.pow(2).sum()) for s in steps)) == pytest.approx(1.0, rel=1e-4)
    for s, g in zip(steps, grads):
        assert torch.allclose(s, g / norm, atol=1e-5)


def test_a_non_finite_gradient_is_skipped_and_too_many_in_a_row_stop_the_run() -> None:
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    guard = FiniteSteps("toy network", patience=3)
    before = [p.detach().clone() for p in net.parameters()]
    bad = torch.randn(8, 4)
    bad[0, 0] = math.inf
    for _ in range(2):
        _backward(net, bad)
        assert not math.isfinite(float(guard.step(opt, net.parameters(), iteration=7)))
    assert all(torch.equal(b, p) for b, p in zip(before, net.parameters()))
    assert not opt.state and all(p.grad is None for p in net.parameters())  # Adam's moments never saw the inf
    _backward(net, torch.randn(8, 4))  # a finite update resets the count in a row
    guard.step(opt, net.parameters())
    assert guard.skipped == 2 and guard.in_a_row == 0
    assert all(torch.isfinite(p).all() for p in net.parameters())
    for _ in range(2):
        _backward(net, bad)
        guard.step(opt, net.parameters(), iteration=9)
    _backward(net, bad)
    with pytest.raises(RuntimeError, match=r"toy network diverged: 3 updates in a row .*iteration 9"):
        guard.step(opt, net.parameters(), iteration=9)


def test_autoencoder_gan_step_survives_a_non_finite_batch() -> None:
    """The defect: one non-finite gradient (seen as NaN from the 9th epoch of a bf16 cpu run) poisoned AdamW's
    moments and every weight after it; now that update is skipped and the next batch trains as usual."""
    torch.manual_seed(0)
    net = CineAutoencoderKL(**def_kwargs("autoencoder_def", "tiny"))
    disc = PatchDiscriminator(spatial_dims=3, channels=8, in_channels=1, num_layers_d=2)
    step = AutoencoderGANStep(disc, torch.optim.AdamW(disc.parameters(), 8e-4), gan_start_step=1)
    engine = _engine(net, 1)
    weights = [p.detach().clone() for p in [*net.parameters(), *disc.parameters()]]
    bad = torch.rand(2, 1, 20, 32, 32)
    bad[0, 0, 3, 5, 5] = math.nan
    step(engine, {"image": bad})
    assert all(torch.equal(w, p) for w, p in zip(weights, [*net.parameters(), *disc.parameters()]))
    assert step.steps.skipped == 1 and step.d_steps.skipped == 1 and not engine.optimizer.state
    [out] = step(engine, {"image": torch.rand(2, 1, 20, 32, 32)})
    assert math.isfinite(out["loss"]) and step.steps.in_a_row == 0
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert not all(torch.equal(w, p) for w, p in zip(weights, net.parameters()))


def test_mae_pretraining_step_skips_a_non_finite_batch() -> None:
    """MAE pretraining uses the same guard: a NaN cine leaves the weights and AdamW's state untouched."""
    torch.manual_seed(0)
    net = mae_network(layered("pretrain_mae.json", "tiny")["mae"])
    opt = torch.optim.AdamW(net.parameters(), 1e-3)
    engine = SimpleNamespace(network=net, optimizer=opt, inferer=SimpleInferer(), loss_function=MaskedPatchLoss(),
                             non_blocking=False, optim_set_to_none=True,
                             state=SimpleNamespace(device=torch.device("cpu"), iteration=1))
    step = MAETrainStep()
    weights = [p.detach().clone() for p in net.parameters()]
    bad = torch.rand(2, 50, 96, 96)
    bad[0, 3, 5, 5] = math.nan
    step(engine, {"image": bad})
    assert all(torch.equal(w, p) for w, p in zip(weights, net.parameters()))
    assert step.steps.skipped == 1 and not opt.state
    [out] = step(engine, {"image": torch.rand(2, 50, 96, 96)})
    assert math.isfinite(out["loss"]) and step.steps.in_a_row == 0
    assert not all(torch.equal(w, p) for w, p in zip(weights, net.parameters()))
