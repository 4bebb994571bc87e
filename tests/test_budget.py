"""The epoch budget: derives the epoch count once from timed epochs, records it, and keeps it across a resume."""

from __future__ import annotations

import itertools
import json
import logging
import time
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events

from scripts.runtime.budget import EpochBudget
from scripts.runtime.checkpoints import LatestCheckpoint
from scripts.runtime.schedules import WarmupCosine


def _engine(seconds_per_epoch: float, check_every: int | None = None) -> Engine:
    """Epochs of 2 iterations at `seconds_per_epoch`; with `check_every`, a 0.1 s pause (a validation or sample-quality
    check) after every that many epochs."""
    engine = Engine(lambda e, b: time.sleep(seconds_per_epoch / 2))
    if check_every:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=check_every), lambda e: time.sleep(0.1))
    return engine


def test_budget_derives_epochs_and_records_them(tmp_path: Path) -> None:
    budget = EpochBudget(0.5, tmp_path / "budget.json", min_epochs=2, measure_epochs=2)
    engine = _engine(0.1)  # 0.1 s per epoch of 2 iterations: the budget fits about 5
    budget.attach(engine)
    engine.run([0, 1], max_epochs=50)
    record = json.loads((tmp_path / "budget.json").read_text())
    assert 3 <= engine.state.epoch == record["max_epochs"] <= 6  # of the 50 allowed
    assert budget.state_dict() == {"derived": record["max_epochs"], "record": record}


def test_budget_never_below_min_epochs_nor_above_max(tmp_path: Path) -> None:
    slow = EpochBudget(0.01, tmp_path / "slow.json", min_epochs=3, measure_epochs=1)
    engine = _engine(0.05)
    slow.attach(engine)
    engine.run([0, 1], max_epochs=10)
    assert engine.state.epoch == 3
    fast = EpochBudget(1e6, tmp_path / "fast.json", measure_epochs=1)
    engine = _engine(0.0)
    fast.attach(engine)
    engine.run([0, 1], max_epochs=4)
    assert engine.state.epoch == 4
    rounded = EpochBudget(0.5, tmp_path / "rounded.json", measure_epochs=1, round_to=4)
    engine = _engine(0.1)  # about 5 epochs fit: 4, a multiple of the validation interval
    rounded.attach(engine)
    engine.run([0, 1], max_epochs=50)
    assert engine.state.epoch == 4


def test_resumed_budget_keeps_its_decision_and_none_is_off(tmp_path: Path) -> None:
    resumed = EpochBudget(1e6, tmp_path / "b.json")
    resumed.load_state_dict({"derived": 3})
    engine = _engine(0.0)
    resumed.attach(engine)
    engine.run([0, 1], max_epochs=10)
    assert engine.state.epoch == 3 and not (tmp_path / "b.json").exists()
    off = EpochBudget(None, tmp_path / "off.json")
    engine = _engine(0.0)
    off.attach(engine)
    engine.run([0, 1], max_epochs=5)
    assert engine.state.epoch == 5 and off.state_dict() == {"derived": -1, "record": {}}


def test_budget_stretches_a_cosine_schedule_to_the_derived_length(tmp_path: Path) -> None:
    """A cosine learning rate ends at its minimum at the derived last iteration, not at the configured one."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=2 * 50, eta_min=0.0)
    budget = EpochBudget(1e6, tmp_path / "b.json", scheduler=cosine)
    budget.load_state_dict({"derived": 4})  # as a resumed run: 4 epochs of 2 iterations
    engine = _engine(0.0)
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: (optimizer.step(), cosine.step()))
    budget.attach(engine)
    engine.run([0, 1], max_epochs=50)
    assert engine.state.epoch == 4 and cosine.T_max == 8
    assert optimizer.param_groups[0]["lr"] < 1e-9  # the schedule's end, reached with the run's


def test_budget_stretches_a_warmup_cosine_factor_and_it_resumes(tmp_path: Path) -> None:
    """MAR's LambdaLR(WarmupCosine): warm-up, then a cosine to `final` at the derived end; its total is checkpointed."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup=2, total=2 * 50, final=0.1))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5)  # first warm-up step
    budget = EpochBudget(1e6, tmp_path / "b.json", scheduler=schedule)
    budget.load_state_dict({"derived": 4})
    lrs: list[float] = []
    engine = _engine(0.0)
    engine.add_event_handler(Events.ITERATION_COMPLETED,
                             lambda e: (optimizer.step(), schedule.step(), lrs.append(optimizer.param_groups[0]["lr"])))
    budget.attach(engine)
    engine.run([0, 1], max_epochs=50)
    assert engine.state.epoch == 4 and schedule.lr_lambdas[0].total == 8
    assert lrs[0] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)  # warm-up done; the end reached at step 8
    assert all(a >= b for a, b in itertools.pairwise(lrs))
    again = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup=2, total=100, final=0.1))
    again.load_state_dict(schedule.state_dict())
    assert again.lr_lambdas[0].total == 8 and again.last_epoch == schedule.last_epoch


def test_warmup_cosine_constant_and_bad_final() -> None:
    constant = WarmupCosine(warmup=4, total=10, final=1.0)
    assert [constant(i) for i in (0, 3, 4, 9, 20)] == [0.25, 1.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="final learning-rate factor"):
        WarmupCosine(1, 10, final=1.5)


def test_a_checkpoint_of_an_earlier_scheduler_resumes_at_its_position(tmp_path: Path, caplog) -> None:
    """0.9.0's MAR checkpoints hold a LinearLR warm-up state; 0.9.1 runs LambdaLR(WarmupCosine): a resume took the
    LinearLR state and died with KeyError 'lr_lambdas'. Now it keeps the new schedule at the saved iteration (the same
    rates where final is 1.0); a state of the same class loads as before (the stretched total included)."""
    def scheduler(kind: str) -> torch.optim.lr_scheduler.LRScheduler:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        if kind == "linear":
            return torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.25, total_iters=4)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup=4, total=40, final=1.0))

    old, network = scheduler("linear"), torch.nn.Linear(1, 1)
    for _ in range(6):
        old.optimizer.step(), old.step()
    torch.save({"lr_scheduler": old.state_dict(), "network": network.state_dict(), "trainer": {"epoch": 3,
                "epoch_length": 2, "max_epochs": 10}}, tmp_path / "latest.pt")
    new, engine = scheduler("lambda"), Engine(lambda e, b: None)
    with caplog.at_level(logging.WARNING):
        LatestCheckpoint(tmp_path / "latest.pt", {"lr_scheduler": new, "network": network}).load(engine)
    assert "written by another scheduler" in caplog.text and "latest.pt" in caplog.text
    assert new.last_epoch == 6 and new.lr_lambdas[0].total == 40 and engine.state.epoch == 3
    new.optimizer.step(), new.step(), old.optimizer.step(), old.step()
    assert new.get_last_lr() == old.get_last_lr() == [1.0]

    stretched = scheduler("lambda")
    stretched.lr_lambdas[0].total = 8
    torch.save({"lr_scheduler": stretched.state_dict(), "trainer": {"epoch": 0, "epoch_length": 2,
                "max_epochs": 10}}, tmp_path / "same.pt")
    caplog.clear()
    again = scheduler("lambda")
    LatestCheckpoint(tmp_path / "same.pt", {"lr_scheduler": again}).load(Engine(lambda e, b: None))
    assert again.lr_lambdas[0].total == 8 and "another scheduler" not in caplog.text


def test_budget_revises_once_when_a_costlier_phase_starts(tmp_path: Path) -> None:
    """The GAN's steps cost more than the timed first epochs: the first epoch wholly in that phase is timed and the
    count revised down so the run still fits; the record keeps both measurements and survives a resume."""
    phase = 5  # iterations 1-4 (epochs 1-2) cheap, from iteration 5 (epoch 3) four times the cost
    engine = Engine(lambda e, b: time.sleep(0.01 if e.state.iteration < phase else 0.04))
    budget = EpochBudget(0.6, tmp_path / "b.json", measure_epochs=2, phase_iteration=phase)
    budget.attach(engine)
    engine.run([0, 1], max_epochs=100)
    record = json.loads((tmp_path / "b.json").read_text())
    assert 0.015 < record["seconds_per_epoch"] < 0.06 and record["phase_seconds_per_epoch"] > 0.07
    # cheap epochs alone would fit ~30; with two cheap ones the rest fit (0.6 - 0.04) / 0.08 ~ 7 more
    assert 5 <= engine.state.epoch == record["max_epochs"] <= 11 and record["phase_iteration"] == phase
    resumed = EpochBudget(0.6, tmp_path / "b.json", phase_iteration=phase)
    resumed.load_state_dict(budget.state_dict())
    assert resumed.derived == record["max_epochs"] and resumed.record == record
    steady = EpochBudget(0.6, tmp_path / "s.json", measure_epochs=2, phase_iteration=1)  # timed epochs in phase
    engine = Engine(lambda e, b: time.sleep(0.04))
    steady.attach(engine)
    engine.run([0, 1], max_epochs=100)
    kept = json.loads((tmp_path / "s.json").read_text())  # revised from epochs of the same cost: about the same count
    assert kept["phase_seconds_per_epoch"] > 0.07 and 5 <= kept["max_epochs"] <= 7  # 0.6 / 0.08


def test_budget_revision_counts_the_validation_between_epochs(tmp_path: Path) -> None:
    """Epochs of equal cost, a 0.1 s validation after every second epoch (outside the first timed epochs' wall time):
    the revision's window of round_to = 2 epochs holds one validation, so the count falls to what fits with them."""
    engine = _engine(0.02, check_every=2)
    budget = EpochBudget(1.0, tmp_path / "b.json", measure_epochs=1, round_to=2, phase_iteration=3)
    budget.attach(engine)
    engine.run([0, 1], max_epochs=100)
    record = json.loads((tmp_path / "b.json").read_text())
    assert record["phase_seconds_per_epoch"] > 0.06  # 0.02 of steps + half a validation
    assert 8 <= engine.state.epoch == record["max_epochs"] <= 16 and engine.state.epoch % 2 == 0  # not ~50


def test_budget_revision_counts_periodic_checks_without_a_phase(tmp_path: Path) -> None:
    """MAR: a 0.1 s sample-quality check after every third epoch, unseen by the two timed epochs: with window = 3 the
    revision times three epochs with one check among them and the count falls to what fits with the checks."""
    engine = _engine(0.02, check_every=3)
    budget = EpochBudget(1.0, tmp_path / "b.json", measure_epochs=2, window=3)
    budget.attach(engine)
    engine.run([0, 1], max_epochs=100)
    record = json.loads((tmp_path / "b.json").read_text())
    assert record["window"] == 3 and record["phase_seconds_per_epoch"] > 0.045  # 0.02 of steps + a third of a check
    assert 10 <= engine.state.epoch == record["max_epochs"] <= 22  # the timed epochs alone: ~50
    unrevised = EpochBudget(1.0, tmp_path / "u.json", measure_epochs=2)  # neither phase nor window: decided once
    engine = _engine(0.02, check_every=3)
    unrevised.attach(engine)
    engine.run([0, 1], max_epochs=100)
    assert "phase_seconds_per_epoch" not in json.loads((tmp_path / "u.json").read_text())
