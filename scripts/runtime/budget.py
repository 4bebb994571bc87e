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
    epoch is validated), at least `min_epochs`; budget_s None: off. Those first epochs see neither the validations nor
    a costlier phase from `phase_iteration` on (the autoencoder's GAN): given `phase_iteration` or `window`, the first
    `window` epochs (default round_to; MAR: its sample-quality interval) run wholly in the phase after epoch 1 are timed
    with the one validation or check among them and the count is revised once (down only) from the time left, so the
    run still ends within its budget. Writes each decision to `path`; a per-iteration `scheduler` with a `T_max`
    (cosine) or a LambdaLR of a factor with a `total` (WarmupCosine) is stretched to the derived length. Attach after
    LatestCheckpoint: a resumed run applies the checkpointed decision once the checkpoint is loaded."""

    def __init__(self, budget_s: float | None, path: str | Path, min_epochs: int = 1, measure_epochs: int = 2,
                 scheduler: LRScheduler | None = None, round_to: int = 1, phase_iteration: int | None = None,
                 window: int | None = None) -> None:
        self.budget_s, self.path, self.min_epochs, self.measure_epochs = budget_s, Path(path), min_epochs, measure_epochs
        self.scheduler, self.round_to = scheduler, max(1, round_to)
        self.revise = phase_iteration is not None or window is not None
        self.phase_iteration, self.window = phase_iteration or 1, max(1, window or self.round_to)
        self.derived: int | None = None
        self.record: dict = {}
        self.first_epoch = 0
        self.marks: dict[int, float] = {}  # epoch -> wall time at its end (before its validation); the start at first_epoch

    def attach(self, engine: Engine) -> None:
        if self.budget_s is None:
            return
        engine.add_event_handler(Events.STARTED, self.start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.decide)  # before EPOCH_COMPLETED saves a checkpoint

    def start(self, engine: Engine) -> None:
        if self.derived is not None:  # decided in the run this one resumes: keep it
            self._apply(engine, max(self.derived, engine.state.epoch))
        self.first_epoch = engine.state.epoch
        self.marks = {self.first_epoch: time.perf_counter()}

    def decide(self, engine: Engine) -> None:
        if engine.state.iteration % engine.state.epoch_length:
            return  # only at an epoch's last iteration
        now, epoch = time.perf_counter(), engine.state.epoch
        self.marks[epoch] = now
        started, done = self.marks[self.first_epoch], epoch - self.first_epoch
        if self.derived is None and done >= self.measure_epochs:
            per_epoch = (now - started) / done
            timed = {"seconds_per_epoch": round(per_epoch, 2), "measured_epochs": done}
            self._decide(engine, self._fit(engine, self.budget_s / per_epoch), timed)
        elif self.derived is not None and (window := self._revision_window(engine)) in self.marks:
            per_epoch = (now - self.marks[window]) / self.window  # with the validation or check among them
            elapsed = now - started + self.first_epoch * self.record["seconds_per_epoch"]  # before a resume: estimated
            fit = epoch + max(0.0, self.budget_s - elapsed) / per_epoch
            self._decide(engine, min(self.derived, self._fit(engine, fit)),
                         {"phase_iteration": self.phase_iteration, "window": self.window,
                          "phase_seconds_per_epoch": round(per_epoch, 2), "seconds_before_revision": round(elapsed, 1)})

    def _revision_window(self, engine: Engine) -> int | None:
        """The epoch (>= 1, so validated ones follow) whose end opens `window` epochs wholly in the phase, not timed yet."""
        if not self.revise or "phase_seconds_per_epoch" in self.record or "seconds_per_epoch" not in self.record:
            return None
        opens = engine.state.epoch - self.window  # its end starts the window's wall time, before its validation
        return opens if opens >= 1 and opens * engine.state.epoch_length + 1 >= self.phase_iteration else None

    def _fit(self, engine: Engine, epochs: float) -> int:
        fit = math.floor(epochs) // self.round_to * self.round_to  # at this machine's speed
        return max(self.min_epochs, min(engine.state.max_epochs, fit), engine.state.epoch)

    def _decide(self, engine: Engine, epochs: int, measured: dict) -> None:
        self.derived = epochs
        self._apply(engine, epochs)
        self.record = {**self.record, "budget_s": self.budget_s, **measured, "max_epochs": epochs,
                       "min_epochs": self.min_epochs, "round_to": self.round_to}
        write_json(self.path, self.record)
        logger.info("time budget %.0f s: training %d epochs (%s; recorded in %s)", self.budget_s, epochs,
                    ", ".join(f"{k} {v}" for k, v in measured.items()), self.path)

    def _apply(self, engine: Engine, max_epochs: int) -> None:
        engine.state.max_epochs = max_epochs
        total = max(1, max_epochs * engine.state.epoch_length)  # the schedule ends with the run
        if self.scheduler is not None and hasattr(self.scheduler, "T_max"):
            self.scheduler.T_max = total
        for factor in getattr(self.scheduler, "lr_lambdas", []):
            if hasattr(factor, "total"):
                factor.total = total

    def state_dict(self) -> dict:
        return {"derived": -1 if self.derived is None else self.derived, "record": self.record}

    def load_state_dict(self, state: dict) -> None:
        self.derived = None if int(state["derived"]) < 0 else int(state["derived"])
        self.record = dict(state.get("record", {}))  # checkpoints before the phase revision hold no record
