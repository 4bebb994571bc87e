"""The epoch budget: derives the epoch count once from timed epochs, records it, and keeps it across a resume."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ignite.engine import Engine

from scripts.runtime.budget import EpochBudget


def _engine(seconds_per_epoch: float) -> Engine:
    engine = Engine(lambda e, b: time.sleep(seconds_per_epoch / 2))
    return engine


def test_budget_derives_epochs_and_records_them(tmp_path: Path) -> None:
    budget = EpochBudget(0.5, tmp_path / "budget.json", min_epochs=2, measure_epochs=2)
    engine = _engine(0.1)  # 0.1 s per epoch of 2 iterations: the budget fits about 5
    budget.attach(engine)
    engine.run([0, 1], max_epochs=50)
    record = json.loads((tmp_path / "budget.json").read_text())
    assert 3 <= engine.state.epoch == record["max_epochs"] <= 6 < 50
    assert budget.state_dict() == {"derived": record["max_epochs"]}


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
    assert engine.state.epoch == 5 and off.state_dict() == {"derived": -1}
