"""The table's labelled cross-validation cohort: a phantom cohort of its own seed and subject range, made by the
config's "labelled_phantom" and "labelled_prepare" stages (configs/make_phantom.json, configs/prepare.json) once and
reused while their settings match, and the check that none of its subjects is one the generator or the MAEs saw."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from scripts.data.cohort import split_items
from scripts.downstream.runs import Workspace
from scripts.runtime.files import write_json
from scripts.runtime.stages import run_stages

logger = logging.getLogger(__name__)

STAGES = ("labelled_phantom", "labelled_prepare")
MARKER = "labelled.json"  # written last: the stages' settings of a finished cohort
GENERATOR_SPLITS = ("training",)  # the prepared split the generator trains on


def labelled_stages(workspace: Workspace) -> tuple[dict, dict]:
    """The "labelled_phantom" and "labelled_prepare" stages of the workspace; ValueError naming a missing one."""
    stages = {s["name"]: s for s in workspace.stages}
    missing = [name for name in STAGES if name not in stages]
    if missing:
        raise ValueError(f"downstream_table.json: no stage {missing} in `stages` to make the labelled cohort; give "
                         "them, or a prepared labelled cohort as --labelled_dir")
    return stages[STAGES[0]], stages[STAGES[1]]


def ensure_labelled(workspace: Workspace) -> tuple[str, float]:
    """(prepared folder, seconds) of the labelled cohort: <table_dir>/cohort_<subjects>_seed<seed>_from<first>/
    {phantom, prepared}, made by the labelled stages unless a finished one of the same stage settings is there (an
    unfinished one is made again)."""
    phantom, prepare = labelled_stages(workspace)
    o = phantom["overrides"]
    root = Path(workspace.table_dir) / f"cohort_{o['num_subjects']}_seed{o['seed']}_from{o['first_subject']}"
    settings = json.loads(json.dumps({s["name"]: s["overrides"] for s in (phantom, prepare)}))
    marker = root / MARKER
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == settings:
        logger.info("downstream: labelled cohort %s reused (same settings)", root)
        return str(root / "prepared"), 0.0
    start = time.perf_counter()  # the folder is this table's, named by its settings: an interrupted one is remade
    run_stages([{**phantom, "overrides": {**phantom["overrides"], "output_dir": str(root / "phantom"),
                                          "overwrite": True}},
                {**prepare, "overrides": {**prepare["overrides"], "dataset_dir": str(root / "phantom"),
                                          "output_dir": str(root / "prepared")}}],
               root, None, workspace.forward, workspace.profile_file)
    write_json(marker, settings)
    return str(root / "prepared"), time.perf_counter() - start


def check_disjoint_subjects(labelled_dir: str, cv_splits: Sequence[str], prepared_dir: str,
                            splits: Sequence[str]) -> int:
    """The number of labelled subjects in `cv_splits` of `labelled_dir`; ValueError naming those that are also in
    `splits` of the generator's prepared folder (cines the generator or an MAE was trained on)."""
    seen = {d["subject"] for d in split_items(prepared_dir, splits)}
    labelled = {d["subject"] for d in split_items(labelled_dir, cv_splits)}
    shared = sorted(labelled & seen)
    if shared:
        raise ValueError(f"{len(shared)} subjects of the labelled cohort ({list(cv_splits)} of {labelled_dir}) are in "
                         f"{list(splits)} of {prepared_dir}, which the generator and the MAEs train on, e.g. "
                         f"{shared[:5]}: cross-validate on subjects neither saw (a labelled cohort of other subjects, "
                         "e.g. --downstream#cohort_first_subject beyond the generator's subject numbers)")
    return len(labelled)
