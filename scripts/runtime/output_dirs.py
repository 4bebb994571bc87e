"""Output folders a stage may write into: a new or empty folder is claimed with a marker naming the stage
(<output_dir>/stage.json); a non-empty folder the stage did not make is refused unless the user says
--overwrite True."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from fnmatch import fnmatch
from pathlib import Path

from scripts.runtime.cli import as_bool
from scripts.runtime.files import TMP_PATTERN, write_json

logger = logging.getLogger(__name__)
MARKER = "stage.json"  # {"stage": <name>}: the stage that made the folder


def entries(folder: str | Path, own: Sequence[str] = ()) -> list[str]:
    """Sorted names in `folder` (a subfolder's with a trailing /), less atomic-write temporaries and the names that
    match a glob pattern of `own`; [] where there is no such folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(f"{p.name}/" if p.is_dir() else p.name for p in folder.iterdir()
                  if not TMP_PATTERN.fullmatch(p.name) and not any(fnmatch(p.name, g) for g in own))


def listing(names: Sequence[str], shown: int = 4) -> str:
    """'a, b/, c, d and 3 more': the first `shown` names and how many more."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def refuse_foreign(folder: str | Path, stage: str, found: Sequence[str], why: str, overwrite: bool | str) -> None:
    """ValueError naming `folder`, what it holds (`found`, nothing: no error) and `why` it is not `stage`'s own,
    unless `overwrite`."""
    if found and not as_bool(overwrite, "overwrite"):
        raise ValueError(f"--output_dir {folder} holds {listing(found)} but {why}: {stage} would write over it; give "
                         "a new or empty --output_dir, or --overwrite True to write into it anyway")


def marked_stage(folder: Path) -> str | None:
    """The stage that `folder`'s marker names, None without a marker; ValueError naming an unreadable marker."""
    path = folder / MARKER
    if not path.is_file():
        return None
    try:
        return str(json.loads(path.read_text(encoding="utf-8"))["stage"])
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a stage marker ({type(error).__name__}: {error}); remove it, or give another "
                         "--output_dir") from None


def claim_output_dir(output_dir: str | Path, stage: str, overwrite: bool | str = False, own: Sequence[str] = ()
                     ) -> Path:
    """Mark `output_dir` as `stage`'s (MARKER) and return it: a new or empty folder, one this stage marked (a resume)
    or an unmarked one holding only names that match `own` (glob patterns of the stage's outputs: a folder of a
    version before the marker) is claimed; any other folder is refused (`refuse_foreign`) unless `overwrite`, which
    writes over it (nothing is deleted) and marks it as `stage`'s."""
    folder = Path(output_dir)
    owner = marked_stage(folder)
    if owner == stage:
        return folder
    why = f"was made by {owner} ({MARKER})" if owner else f"has no {MARKER} of {stage}"
    found = entries(folder, () if owner else own)
    if owner is None and MARKER in found and marked_stage(folder) == stage:
        return folder  # another rank of this run claimed it between the marker's read and the listing
    refuse_foreign(folder, stage, found, why, overwrite)
    if found:
        logger.warning("%s holds %s but %s: written into (--overwrite True)", folder, listing(found), why)
    elif entries(folder):
        logger.info("%s: outputs of %s from before %s markers, claimed", folder, stage, MARKER)
    write_json(folder / MARKER, {"stage": stage})
    return folder
