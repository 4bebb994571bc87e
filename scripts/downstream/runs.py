"""The table's runs: bundle configs run as stages (`run_stages`) with the table's profile, skipped where a complete
metrics JSON records the same settings (so a killed table resumes), and missing synthetic cines generated."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from scripts.data.cohort import split_items
from scripts.downstream.mae import usable
from scripts.runtime.files import write_json
from scripts.runtime.stages import run_stages

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Workspace:
    """Where and how runs are made: `table_dir` (outputs), `bundle_root` (configs), the profile layered on every
    run, the config's `stages` ("generate", "labelled_phantom", "labelled_prepare") and the sections forwarded into
    every run."""

    table_dir: str
    bundle_root: str
    profile_file: str | None = None
    stages: Sequence[dict] = ()
    forward: Mapping | None = None


def synthetic_available(generated_dir: str | Path) -> int:
    """Usable synthetic cines in a generated folder (0 where it has no datalist yet)."""
    if not (Path(generated_dir) / "datalist.json").is_file():
        return 0
    return len(usable([d for d in split_items(generated_dir, ["training"], absolute=True) if d.get("synthetic")]))


def ensure_synthetic(need: int, generated_dir: str | Path, workspace: Workspace, generate_missing: bool) -> float:
    """Generate synthetic cines until `need` exist (the "generate" stage of the workspace's stages, resumable);
    returns seconds."""
    have = synthetic_available(generated_dir)
    if have >= need:
        logger.info("downstream: %d synthetic cines in %s, %d needed", have, generated_dir, need)
        return 0.0
    if not generate_missing:
        raise ValueError(f"{generated_dir}: {have} synthetic cines, the table needs {need}. Generate them (resumable) "
                         "with: python -m monai.bundle run --config_file \"['configs/generate.json','configs/profiles/"
                         f"<profile>.json']\" --output_dir {generated_dir} --num_samples {need}, or run this config "
                         "with --downstream#generate_missing True")
    stage = next((s for s in workspace.stages if s["name"] == "generate"), None)
    if stage is None:
        raise ValueError("downstream_table.json: no 'generate' stage in `stages` to make the missing synthetic cines")
    logger.info("downstream: %d synthetic cines listed in %s, %d needed: generating the rest (samples already "
                "written by an interrupted run are kept)", have, generated_dir, need)
    start = time.perf_counter()
    run_stages([{**stage, "overrides": {**stage["overrides"], "num_samples": need}}], Path(workspace.table_dir), None,
               workspace.forward, workspace.profile_file)
    return time.perf_counter() - start


def finished(metrics_path: Path, settings: Mapping) -> dict | None:
    """The run's metrics JSON where it is complete and records `settings` (those of its keys it records), else None."""
    if not metrics_path.is_file():
        return None
    result = json.loads(metrics_path.read_text(encoding="utf-8"))
    info = result.get("info", {})
    same = all(json.loads(json.dumps(settings[k])) == info[k] for k in settings.keys() & info.keys())
    return result if result.get("complete") and same else None


class Runner:
    """Runs bundle configs as stages (`run_stages`), skipping finished runs and recording wall and CPU seconds."""

    def __init__(self, workspace: Workspace) -> None:
        self.bundle_root, self.profile_file = workspace.bundle_root, workspace.profile_file
        self.forward, self.table_dir = workspace.forward, Path(workspace.table_dir)
        self.times_path = self.table_dir / "times.json"
        self.times = json.loads(self.times_path.read_text()) if self.times_path.is_file() else {}

    def __call__(self, name: str, configs: Sequence[str], settings: dict, metrics_path: Path,
                 recorded: Mapping | None = None) -> dict:
        """`settings` go to the run; they and `recorded` (values the run records but is not given) must match."""
        expected = {**settings, **(recorded or {})}
        result = finished(metrics_path, expected)
        if result is None:
            logger.info("downstream: run %s", name)
            start, cpu = time.perf_counter(), time.process_time()
            stage = {"name": name, "config_file": [f"{self.bundle_root}/{c}" for c in configs],
                     "overrides": {"bundle_root": self.bundle_root, **settings}}
            run_stages([stage], forward=self.forward, profile_file=self.profile_file)
            self.record(name, start, cpu)
            result = finished(metrics_path, expected)
            if result is None:
                raise RuntimeError(f"run {name} finished without a complete {metrics_path} recording its settings")
        return result

    def computed(self, name: str, path: Path, settings: dict, make: Callable[[], dict]) -> dict:
        """The JSON at `path` where it is complete and records `settings`, else {"complete", "info": settings,
        **make()} written there (in-process work such as a linear probe, timed as a run)."""
        result = finished(path, settings)
        if result is None:
            logger.info("downstream: %s", name)
            start, cpu = time.perf_counter(), time.process_time()
            result = {"complete": True, "info": settings, **make()}
            write_json(path, result)
            self.record(name, start, cpu)
        return result

    def record(self, name: str, start: float, cpu: float) -> None:
        """Record the wall and CPU seconds since `start` (perf_counter) and `cpu` (process_time) as run `name`."""
        self.times[name] = {"wall_s": round(time.perf_counter() - start, 1),
                            "cpu_s": round(time.process_time() - cpu, 1)}  # all threads: busy-machine proof
        write_json(self.times_path, self.times)


def command_line() -> str:
    """This process's command, `python -m monai.bundle ...` for a bundle run."""
    args = sys.argv[1:] if sys.argv[0].replace("\\", "/").endswith("monai/bundle/__main__.py") else sys.argv
    return " ".join(["python -m monai.bundle", *args] if args is not sys.argv else args)

