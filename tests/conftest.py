"""Shared test fixtures: repository root and the optional real-data folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UKBB_DEMO = REPO.parent / "shared" / "data" / "ukbb_demo"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


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
    done = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                           "['configs/pipeline.json','configs/profiles/tiny.json']", "--output_dir", str(out),
                           "--ckpt_dir", str(out / "models"), "--seed", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out
