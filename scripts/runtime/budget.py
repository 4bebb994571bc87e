"""A training-time budget: after a few timed epochs the trainer's epoch count is derived once from the budget and then
kept (checkpointed), so a run stays reproducible on its machine; `--<stage>#num_epochs N` with no budget repeats it."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from ignite.engine import Engine, Events
from torch.optim.lr_scheduler import LRScheduler

from scripts.runtime.files import write_json

logger = logging.getLogger(__name__)


class EpochBudget:
    """Derive max_epochs = min(max_epochs, the epochs that fit in `budget_s` seconds at the mean wall time of the first
    `measure_epochs` epochs of this run), rounded down to a multiple of `round_to` (a validation interval, so the last
    epoch is validated), at least `min_epochs`; budget_s None: off. Writes the decision to `path`; a
    per-iteration `scheduler` with a `T_max` (cosine) or a LambdaLR of a factor with a `total` (WarmupCosine) is
    stretched to the derived length. Attach after
    LatestCheckpoint: a resumed run applies the checkpointed decision once the checkpoint is loaded."""

    def __init__(self, budget_s: float | None, path: str | Path, min_epochs: int = 1, measure_epochs: int = 2,
                 scheduler: LRScheduler | None = None, round_to: int = 1) -> None:
        self.budget_s, self.path, self.min_epochs, self.measure_epochs = budget_s, Path(path), min_epochs, measure_epochs
        self.scheduler, self.round_to = scheduler, max(1, round_to)
        self.derived: int | None = None
        self.started, self.first_epoch = 0.0, 0

    def attach(self, engine: Engine) -> None:
        if self.budget_s is None:
            return
        engine.add_event_handler(Events.STARTED, self.start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.decide)  # before EPOCH_COMPLETED saves a checkpoint

    def start(self, engine: Engine) -> None:
        if self.derived is not None:  # decided in the run this one resumes: keep it
            self._apply(engine, max(self.derived, engine.state.epoch))
        self.started, self.first_epoch = time.perf_counter(), engine.state.epoch

    def decide(self, engine: Engine) -> None:
        length = engine.state.epoch_length
        done = engine.state.epoch - self.first_epoch
        if self.derived is not None or done < self.measure_epochs or engine.state.iteration % length:
            return  # only at the last iteration of the measured epochs
        per_epoch = (time.perf_counter() - self.started) / done
        fit = math.floor(self.budget_s / per_epoch) // self.round_to * self.round_to  # at this machine's speed
        self.derived = max(self.min_epochs, min(engine.state.max_epochs, fit), engine.state.epoch)
        self._apply(engine, self.derived)
        record = {"budget_s": self.budget_s, "seconds_per_epoch": round(per_epoch, 2), "measured_epochs": done,
                  "max_epochs": self.derived, "min_epochs": self.min_epochs, "round_to": self.round_to}
        write_json(self.path, record)
        logger.info("time budget %.0f s at %.1f s per epoch: training %d epochs (recorded in %s)", self.budget_s,
                    per_epoch, self.derived, self.path)

    def _apply(self, engine: Engine, max_epochs: int) -> None:
        engine.state.max_epochs = max_epochs
        total = max(1, max_epochs * engine.state.epoch_length)  # the schedule ends with the run
        if self.scheduler is not None and hasattr(self.scheduler, "T_max"):
            self.scheduler.T_max = total
        for factor in getattr(self.scheduler, "lr_lambdas", []):
            if hasattr(factor, "total"):
                factor.total = total

    def state_dict(self) -> dict:
        return {"derived": -1 if self.derived is None else self.derived}

    def load_state_dict(self, state: dict) -> None:
        self.derived = None if int(state["derived"]) < 0 else int(state["derived"])
