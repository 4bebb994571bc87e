"""What an evaluation reads: folders and sets (`Inputs`), networks (`Networks`), protocol sizes (`Protocol`) and the
cines loaded once for every section (`Loaded`, `load`)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from scripts.data.cohort import load_cines, read_datalist, read_stats, split_items
from scripts.evaluation import fidelity

logger = logging.getLogger(__name__)

HELDOUT = "heldout"  # name of the real held-out set in the privacy audit
RECONSTRUCTION = "autoencoder reconstructions"  # half B decoded from its posterior means: a fidelity ceiling


@dataclass(frozen=True)
class Protocol:
    """The protocol sizes, recorded in metrics.json's settings."""

    fid_frame_step: int = 10
    batch_size: int = 8
    max_heldout: int | None = None
    mia_draws: int = 4
    mia_max_subjects: int | None = None
    mia_permutations: int = 1000
    privacy_quantile: float = 0.95
    closest_pairs: int = 8
    speed_clips: int = 4


@dataclass(frozen=True)
class Inputs:
    """What is evaluated: a finished run's folders, the generated sets (name -> generate.json output folder), the
    held-out splits and the optional I3D and segmenter files; results go to `evaluation_dir`."""

    output_dir: str
    prepared_dir: str
    ckpt_dir: str
    evaluation_dir: str
    profile: str
    sets: Mapping[str, str]
    heldout_splits: Sequence[str] = ("validation", "test")
    i3d_path: str | None = None
    i3d_sha256: str | None = None
    segmenter_path: str | None = None


@dataclass(frozen=True)
class Networks:
    """The autoencoder and MAR (their checkpoints loaded by the evaluation), an untrained segmenter_def or None, and
    the device they run on."""

    autoencoder: nn.Module
    mar: nn.Module
    device: torch.device
    segmenter: nn.Module | None = None


@dataclass(frozen=True)
class Loaded:
    """The cohort and generated cines every section reads, their latent means (held-out ones under HELDOUT) and the
    phenotype stats."""

    prepared: Path
    training: list[dict]
    heldout: list[dict]
    found: dict[str, dict]
    heldout_cines: torch.Tensor
    cines: dict[str, torch.Tensor]
    means: dict[str, torch.Tensor]
    stats: dict

    @property
    def sets(self) -> dict[str, dict]:
        """The usable sets ("ok") of `found`."""
        return {k: v for k, v in self.found.items() if v["status"] == "ok"}


def subset(items: Sequence[dict], max_items: int | None, seed: int) -> list[dict]:
    """At most `max_items` of `items` (a seeded subset, in their order); all of them for None."""
    if max_items is None or len(items) <= max_items:
        return list(items)
    keep = np.sort(np.random.default_rng(seed).choice(len(items), max_items, replace=False))
    return [items[i] for i in keep]


def read_sets(sets: Mapping[str, str]) -> dict[str, dict]:
    """name -> {"dir", "status" ("ok", "missing" or "empty"), "items", "record" (generation.json or {})}."""
    out = {}
    for name, folder in sets.items():
        datalist = read_datalist(folder, required=False)
        items = (datalist or {}).get("training", [])
        status = "missing" if datalist is None else "ok" if items else "empty"
        record_path = Path(folder) / "generation.json"
        record = json.loads(record_path.read_text(encoding="utf-8")) if record_path.is_file() else {}
        out[name] = {"dir": str(folder), "status": status, "items": items, "record": record,
                     "columns": (datalist or {}).get("phenotype_columns", [])}
        if status != "ok":
            logger.warning("generated set %r: %s (%s)", name, status, Path(folder) / "datalist.json")
    return out


def value_rows(items: Sequence[dict], columns: Sequence[str]) -> np.ndarray:
    """(N, F) float values of `columns` (NaN where an item has none: unconditional or no phenotypes)."""
    rows = np.full((len(items), len(columns)), np.nan)
    for i, d in enumerate(items):
        if d.get("has_phenotypes"):
            rows[i] = [d[c] if isinstance(d.get(c), (int, float)) else np.nan for c in columns]
    return rows


def load(inputs: Inputs, autoencoder: nn.Module, protocol: Protocol, seed: int, device: torch.device) -> Loaded:
    """The prepared cohort (held-out items: a seeded subset of at most max_heldout), the sets and their latent means
    under `autoencoder` (its checkpoint loaded)."""
    prepared = Path(inputs.prepared_dir)
    training = split_items(prepared, ["training"])
    stats = read_stats(prepared / "phenotype_stats.json")
    heldout = subset(split_items(prepared, inputs.heldout_splits), protocol.max_heldout, seed)
    found = read_sets(inputs.sets)
    cines = {k: load_cines(v["dir"], v["items"]) for k, v in found.items() if v["status"] == "ok"}
    heldout_cines = load_cines(prepared, heldout)
    means = {k: fidelity.latent_means(autoencoder, x, protocol.batch_size, device, f"evaluation: latent means of {k}")
             for k, x in {HELDOUT: heldout_cines, **cines}.items()}
    logger.info("evaluation: %d held-out and %d training cines; sets %s", len(heldout), len(training),
                {k: v["status"] for k, v in found.items()})
    return Loaded(prepared, training, heldout, found, heldout_cines, cines, means, stats)
