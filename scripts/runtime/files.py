"""Atomic file writes (a temporary name, then a rename), file digests, and the check that outputs do not overlap
inputs."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)
TMP_PATTERN = re.compile(r"\.tmp-[0-9a-f]{32}-.+")  # atomic_write's temporary names
ORPHAN_AGE_S = 3600.0  # a temporary file this old belongs to no running writer


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file ("" for an empty path): tells a rerun whether an input checkpoint was remade."""
    if not str(path):
        return ""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_disjoint(inputs: Mapping[str, str | Path | None], outputs: Mapping[str, str | Path | None]) -> None:
    """ValueError naming both paths where an output equals, lies inside or contains an input (None: not given);
    keys name the arguments, e.g. {"--dataset_dir": path}. Paths are compared resolved (symbolic links followed)."""
    for out_key, out in outputs.items():
        for in_key, src in inputs.items():
            if out is None or src is None:
                continue
            a, b = Path(out).resolve(), Path(src).resolve()
            if a == b or a in b.parents or b in a.parents:
                how = "is" if a == b else "lies inside" if b in a.parents else "contains"
                raise ValueError(f"{out_key} {out} {how} {in_key} {src}: the outputs could overwrite the inputs; "
                                 f"give an {out_key} that neither is, lies in nor contains {src}")


# ------------------------------------------------------------------------------------------------------ atomic writes
@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; it replaces `path` on success and is removed on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")  # same suffix, so writers keep the format (TMP_PATTERN)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path` (TMP_PATTERN); renamed to `path` on success, removed on failure."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    tmp.mkdir(parents=True)
    try:
        yield tmp
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_npy(path: str | Path, array: np.ndarray) -> None:
    """np.save, atomically."""
    with atomic_write(path) as tmp:
        np.save(tmp, array)


def write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 text, atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: object) -> None:
    """Write indented JSON, atomically."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def remove_orphans(folder: str | Path, min_age_s: float = ORPHAN_AGE_S) -> list[Path]:
    """Delete atomic_write and atomic_folder temporaries in `folder` older than `min_age_s` (left by killed runs;
    younger ones may belong to a running writer) and log each; returns them."""
    folder, now = Path(folder), time.time()
    if not folder.is_dir():
        return []
    orphans = [f for f in folder.iterdir() if TMP_PATTERN.fullmatch(f.name) and now - f.stat().st_mtime >= min_age_s]
    for f in orphans:
        if f.is_dir():
            shutil.rmtree(f, ignore_errors=True)
        else:
            f.unlink(missing_ok=True)
        logger.warning("removed %s: an unfinished write of a killed run", f)
    return orphans
