"""Run bundle stages (each a `configs/<stage>.json` run) in order, in this process, timing each."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

from monai.bundle import run

from scripts.io import write_json

logger = logging.getLogger(__name__)


def run_stages(stages: Sequence[dict], output_dir: str | Path) -> dict[str, float]:
    """Run every stage `{"name", "config_file", "overrides"}` with `monai.bundle.run`; write `<output_dir>/stage_times.json`."""
    times: dict[str, float] = {}
    for stage in stages:
        logger.info("pipeline: stage %s (%s)", stage["name"], stage["config_file"])
        start = time.perf_counter()
        run(config_file=stage["config_file"], **stage.get("overrides", {}))
        times[stage["name"]] = round(time.perf_counter() - start, 1)
        logger.info("pipeline: stage %s done in %.1f s", stage["name"], times[stage["name"]])
        write_json(Path(output_dir) / "stage_times.json", times)
    return times
