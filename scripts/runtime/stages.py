"""Run bundle stages (each a `configs/<stage>.json` run) in order, in this process, timing each."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from monai.bundle import run

from scripts.runtime.files import write_json

logger = logging.getLogger(__name__)


logger = logging.getLogger(__name__)


def _flatten(overrides: dict) -> dict:
    """{"mar": {"num_epochs": 3}} -> {"mar#num_epochs": 3}: a dict override edits the stage's dict key by key instead
    of replacing it (an empty dict changes nothing)."""
    flat = {}
    for key, value in overrides.items():
        if isinstance(value, dict):
            flat |= _flatten({f"{key}#{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def run_stages(stages: Sequence[dict], output_dir: str | Path, profile_file: str | None = None,
               only: Sequence[str] | None = None) -> dict[str, float]:
    """Run every stage `{"name", "config_file", "overrides"}` with `monai.bundle.run`, the profile file layered on its
    config; record each stage's seconds in `<output_dir>/stage_times.json` (merged with the times already there, so a
    rerun of some stages keeps the others'). `only`: names of the stages to run (default all). Returns this run's."""
    names = [s["name"] for s in stages]
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise ValueError(f"unknown pipeline stages {unknown}; the stages are {names}")
    times: dict[str, float] = {}
    record_path = Path(output_dir) / "stage_times.json"
    record = json.loads(record_path.read_text(encoding="utf-8")) if record_path.is_file() else {}
    for stage in stages:
        if only and stage["name"] not in only:
            continue
        config = [stage["config_file"]] + ([profile_file] if profile_file else [])
        logger.info("pipeline: stage %s (%s)", stage["name"], config)
        start = time.perf_counter()
        run(config_file=config, **_flatten(stage.get("overrides", {})))
        times[stage["name"]] = round(time.perf_counter() - start, 1)
        logger.info("pipeline: stage %s done in %.1f s", stage["name"], times[stage["name"]])
        record[stage["name"]] = times[stage["name"]]
        write_json(record_path, record)
    return times
