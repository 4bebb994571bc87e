"""Stage runner of the meta configs (pipeline, evaluation, downstream table): each stage a timed `monai.bundle.run`,
with the profile layered on and the meta config's forwarded sections edited in key by key."""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

from monai.bundle import ConfigParser, run

from scripts.runtime.files import write_json

logger = logging.getLogger(__name__)

MERGE_WARNING = "Can't merge entry"  # MONAI's warning for a profile's `+key` that a stage config lacks (it copies it)


def select(stages: Sequence[dict], only: Sequence[str] | None) -> list[dict]:
    """The stages named in `only` (None: all), in their order; ValueError for a name that is no stage."""
    names = [s["name"] for s in stages]
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise ValueError(f"unknown stages {unknown} in `only`; the stages are {names}")
    return [s for s in stages if only is None or s["name"] in only]


def section_overrides(forward: Mapping, config: Mapping) -> dict:
    """Overrides of the forwarded sections that `config` has: a dict section as `section#key` pairs (so the stage's
    dict is edited key by key), any other value as it is."""
    out = {}
    for key, value in ((k, v) for k, v in forward.items() if k in config):
        if not isinstance(value, (Mapping, list, str, int, float, bool, type(None))):
            raise TypeError(f"forwarded section {key!r} is a {type(value).__name__}, not a config value: forward "
                            "plain sections (a built network cannot be edited into another config)")
        out |= {f"{key}#{k}": v for k, v in value.items()} if isinstance(value, Mapping) else {key: value}
    return out


def run_stage(stage: Mapping, forward: Mapping, profile_file: str | None) -> None:
    """One stage `{"name", "config_file" (a path or a list), "overrides"}` with `monai.bundle.run`: its config files
    and the profile layered, the forwarded sections that its own config files have and then its overrides applied."""
    files = [stage["config_file"]] if isinstance(stage["config_file"], str) else list(stage["config_file"])
    overrides = section_overrides(forward, ConfigParser.load_config_files(files)) | stage.get("overrides", {})
    files += [profile_file] if profile_file else []
    logger.info("stage %s (%s)", stage["name"], files)
    with warnings.catch_warnings():  # a profile's `+key` that this config lacks is copied: expected here
        warnings.filterwarnings("ignore", message=MERGE_WARNING)
        run(config_file=files, **overrides)


def run_stages(stages: Sequence[dict], output_dir: str | Path | None = None, only: Sequence[str] | None = None,
               forward: Mapping | None = None, profile_file: str | None = None) -> dict[str, float]:
    """Run the stages selected by `only` in order; return this run's seconds per stage, also merged into
    `<output_dir>/stage_times.json` (a rerun of some stages keeps the others'; no record without `output_dir`)."""
    times: dict[str, float] = {}
    record_path = Path(output_dir) / "stage_times.json" if output_dir is not None else None
    record = json.loads(record_path.read_text(encoding="utf-8")) if record_path and record_path.is_file() else {}
    for stage in select(stages, only):
        start = time.perf_counter()
        run_stage(stage, forward or {}, profile_file)
        times[stage["name"]] = round(time.perf_counter() - start, 1)
        logger.info("stage %s done in %.1f s", stage["name"], times[stage["name"]])
        if record_path:
            record[stage["name"]] = times[stage["name"]]
            write_json(record_path, record)
    return times
