"""Shared test fixtures: repository root, the optional real-data folder and running a bundle config as a user does."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from scripts.runtime.cli import DEBUG_ENV

REPO = Path(__file__).resolve().parents[1]
UKBB_DEMO = REPO.parent / "shared" / "data" / "ukbb_demo"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
pytest_plugins = ["tests.stage_runs"]  # the stage training runs shared by the stage tests and tests/test_resume.py


def bundle_command(configs: str | Sequence[str], *args: str, launcher: Sequence[str] = (), **overrides: object
                   ) -> list[str]:
    """`python -m monai.bundle run --config_file <configs> <args> --<key> <value>...`, or `python -m <launcher> -m
    monai.bundle run ...` (e.g. torch.distributed.run), as an argument list."""
    config_file = configs if isinstance(configs, str) else str(list(configs))
    module = [*launcher, "-m", "monai.bundle"] if launcher else ["monai.bundle"]
    return [sys.executable, "-m", *module, "run", "--config_file", config_file, *args,
            *[a for k, v in overrides.items() for a in (f"--{k}", str(v))]]


def bundle_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a bundle run in a test: full tracebacks of user errors in the test logs, then `env`."""
    return {**os.environ, DEBUG_ENV: "1", **(env or {})}


def run_bundle(configs: str | Sequence[str], *args: str, expect_failure: bool = False, launcher: Sequence[str] = (),
               env: Mapping[str, str] | None = None, timeout: int = 600, **overrides: object,
               ) -> subprocess.CompletedProcess:
    """`bundle_command` run from the repository root; asserts it succeeds (fails, with `expect_failure`), the tail
    of stdout and stderr in the message."""
    cmd = bundle_command(configs, *args, launcher=launcher, **overrides)
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False,
                          env=bundle_env(env))
    tail = f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert (done.returncode != 0) == expect_failure, tail
    return done


def tensorboard_events(folder: Path) -> EventAccumulator:
    """The TensorBoard events of every event file in `folder` (a run's <output_dir>/tensorboard), loaded in full."""
    return EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0}).Reload()


@pytest.fixture(scope="session")
def ukbb_demo() -> Path:
    """The real UK Biobank demo subject; tests using it skip where the folder is absent."""
    if not (UKBB_DEMO / "1" / "seg4_la_4ch.nii.gz").is_file():
        pytest.skip(f"real demo data not found at {UKBB_DEMO} (UK Biobank terms: not shipped with the repository)")
    return UKBB_DEMO


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole pipeline (configs/pipeline.json) with the tiny profile, run once per test session into a temporary
    folder (checkpoints in <folder>/models, seed 2); returns the folder. Tests that write into a run copy it first."""
    out = tmp_path_factory.mktemp("tiny_pipeline")
    run_bundle(["configs/pipeline.json", "configs/profiles/tiny.json"], timeout=900, output_dir=out,
               ckpt_dir=out / "models", seed=2)
    return out
