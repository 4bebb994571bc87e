"""Shared test fixtures: repository root and the optional real-data folder."""

from __future__ import annotations

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
