"""The one reader of a prepared (configs/prepare.json) or generated (configs/generate.json) folder: its
datalist.json (decathlon form: split -> items, plus "phenotype_columns"), its phenotype_stats.json and its cines."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import load_decathlon_datalist

from scripts.data.phenotypes import normalise

DATALIST = "datalist.json"
STATS = "phenotype_stats.json"
AUDIT = "privacy_audit.json"  # a generated folder's copy audit (configs/evaluate_generation.json): {"flagged": [...], "audited": [...]}


# ---------------------------------------------------------------------------------------------------------- datalist
def read_datalist(folder: str | Path, required: bool = True) -> dict | None:
    """<folder>/datalist.json as a dict; a missing file is FileNotFoundError naming the folder (None if not
    `required`), a malformed one ValueError naming the file."""
    path = Path(folder) / DATALIST
    if not path.is_file():
        if not required:
            return None
        raise FileNotFoundError(f"{folder}: not a prepared folder (no {DATALIST}); run configs/prepare.json (or "
                                "configs/generate.json for a generated folder) first")
    try:
        datalist = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(datalist, dict):
        raise ValueError(f"{path}: not a JSON object of split -> items")  # noqa: TRY004 (a malformed file, not a caller error)
    return datalist


def split_items(folder: str | Path, splits: Sequence[str], absolute: bool = False) -> list[dict]:
    """The items of `splits` of <folder>/datalist.json, in order; with `absolute`, their image and label paths joined
    to the folder (MONAI's load_decathlon_datalist). ValueError naming the file for a split that is no list."""
    datalist = read_datalist(folder)
    absent = [s for s in splits if not isinstance(datalist.get(s), list)]
    if absent:
        lists = sorted(k for k, v in datalist.items() if isinstance(v, list))
        raise ValueError(f"{Path(folder) / DATALIST}: no {absent} list(s) (it has {lists})")
    if absolute:
        return [d for s in splits for d in load_decathlon_datalist(Path(folder) / DATALIST, True, s, folder)]
    return [d for s in splits for d in datalist[s]]


def copy_audit(folder: str | Path) -> tuple[set[str], set[str] | None] | None:
    """(flagged, audited) subjects of a generated folder's privacy audit (<folder>/privacy_audit.json): those flagged
    as copies of training cines and those it examined (None in a record of an earlier version); None where the folder
    has not been audited. ValueError naming the file if it is unreadable."""
    path = Path(folder) / AUDIT
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        return set(record["flagged"]), None if record.get("audited") is None else set(record["audited"])
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path}: not a privacy audit record ({error}); rerun configs/evaluate_generation.json") \
            from error


def has_phenotypes(item: dict, columns: Sequence[str]) -> bool:
    """The item is flagged has_phenotypes and holds a finite number for every one of `columns`."""
    return bool(item.get("has_phenotypes")) and all(isinstance(item.get(c), (int, float)) and math.isfinite(item[c])
                                                    for c in columns)


def phenotype_matrix(items: Sequence[dict], stats: dict) -> np.ndarray:
    """(N, F) float64 phenotypes of stats["columns"], normalised with `stats`; a NaN row where an item has none."""
    rows = np.full((len(items), len(stats["columns"])), np.nan)
    for i, d in enumerate(items):
        if has_phenotypes(d, stats["columns"]):
            rows[i] = normalise([[d[c] for c in stats["columns"]]], stats)[0]
    return rows


# ------------------------------------------------------------------------------------------------------------- data
def read_stats(path: str | Path) -> dict:
    """Read and check a phenotype_stats.json ({"columns", "mean", "std", "n"}) written by configs/prepare.json."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: phenotype statistics not found; the prepared folder {path.parent} needs a "
                                "phenotype_stats.json (configs/prepare.json writes it when the cohort has a phenotype "
                                "table and training subjects with phenotypes)")
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
        ok = (len(stats["columns"]) == len(stats["mean"]) == len(stats["std"]) > 0
              and all(math.isfinite(m) for m in stats["mean"]) and all(math.isfinite(s) and s > 0 for s in stats["std"]))
    except (ValueError, TypeError, KeyError):  # invalid JSON, wrong types, missing keys
        ok = False
    if not ok:
        raise ValueError(f"{path}: malformed statistics: need equal-length, non-empty 'columns', 'mean' and 'std' "
                         "(finite values, std > 0)")
    return stats


def load_cines(root: str | Path, items: Sequence[dict], key: str = "image") -> torch.Tensor:
    """(N, 1, T, H, W) tensor of the items' `key` arrays (relative to `root`), in order: float16 for images, the
    stored integer type for labels."""
    root = Path(root)
    if not items:
        return torch.zeros(0, 1, 0, 0, 0, dtype=torch.float16)
    arrays = []
    for d in items:
        path = root / d[key]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: {key} of subject {d.get('subject')!r} listed in {root} not found")
        try:
            array = np.load(path)
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: {key} of subject {d.get('subject')!r} cannot be read ({error})") from error
        if arrays and array.shape != arrays[0].shape:
            raise ValueError(f"{path}: {key} of subject {d.get('subject')!r} has shape {array.shape}, the first "
                             f"listed in {root} has {tuple(arrays[0].shape)}")
        arrays.append(torch.from_numpy(array.astype(np.float16) if array.dtype.kind == "f" else array))
    return torch.stack(arrays)
