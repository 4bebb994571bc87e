"""Reading a prepared cohort folder: its phenotype statistics and its cines."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


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
