"""Progress of long loops and Ignite runs: a tqdm bar with ETA on a terminal, periodic log lines with ETA otherwise
(CI, files), so a log never fills with carriage-return bars."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar
from tqdm import tqdm

T = TypeVar("T")
LOG_EVERY_S = 30.0
logger = logging.getLogger(__name__)


def on_terminal() -> bool:
    """True where stderr is an interactive terminal (a bar can redraw itself)."""
    return sys.stderr.isatty()


def _duration(seconds: float) -> str:
    """`1h02m`, `3m05s` or `42s`."""
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def status_line(desc: str, done: int, total: int | None, elapsed: float) -> str:
    """`desc: done/total (pct), elapsed, ETA` (no ETA before the first item or without a total)."""
    if not total:
        return f"{desc}: {done} done, {_duration(elapsed)} elapsed"
    eta = f", ETA {_duration(elapsed / done * (total - done))}" if done else ""
    return f"{desc}: {done}/{total} ({100 * done / total:.0f}%), {_duration(elapsed)} elapsed{eta}"


class PeriodicLog:
    """Log `status_line` at most every `every_s` seconds, and once at the end."""

    def __init__(self, desc: str, total: int | None, every_s: float = LOG_EVERY_S) -> None:
        self.desc, self.total, self.every_s = desc, total, every_s
        self.start = self.last = time.monotonic()
        self.logged = -1

    def update(self, done: int, final: bool = False) -> None:
        now = time.monotonic()
        if (final and done != self.logged) or now - self.last >= self.every_s:
            self.last, self.logged = now, done
            logger.info(status_line(self.desc, done, self.total, now - self.start))


def track(items: Iterable[T], desc: str, total: int | None = None, every_s: float = LOG_EVERY_S) -> Iterator[T]:
    """Yield `items`, showing progress: a tqdm bar on a terminal, a log line every `every_s` seconds otherwise."""
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
    if on_terminal():
        yield from tqdm(items, desc=desc, total=total, dynamic_ncols=True)
        return
    log, done = PeriodicLog(desc, total, every_s), 0
    for item in items:
        yield item
        done += 1
        log.update(done)
    log.update(done, final=True)


class EngineProgress:
    """An Ignite engine's progress: Ignite's `ProgressBar` (tqdm) per epoch on a terminal, otherwise a log line of the
    whole run's iterations with ETA every `every_s` seconds."""

    def __init__(self, desc: str = "", every_s: float = LOG_EVERY_S) -> None:
        self.desc, self.every_s = desc, every_s

    def attach(self, engine: Engine) -> None:
        if on_terminal():
            ProgressBar(desc=self.desc or None, persist=False).attach(engine)
            return
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._update)

    def _start(self, engine: Engine) -> None:
        self.log, self.first = PeriodicLog(self.desc or "iterations", None, self.every_s), engine.state.iteration

    def _update(self, engine: Engine) -> None:
        # read the total each time: a time budget may change max_epochs after the first epochs; resumed runs start midway
        total = (engine.state.epoch_length or 0) * (engine.state.max_epochs or 0) - self.first
        self.log.total = total if total > 0 else None
        self.log.update(engine.state.iteration - self.first)
