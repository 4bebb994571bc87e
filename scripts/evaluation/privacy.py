"""Privacy audit of generated cines: copy detection against the training cines and loss-based membership inference.
A copy exceeds the held-out quantile of both pixel (shift- and mirror-invariant) and embedding nearest-training r;
protocol: docs/evaluation.md."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from scripts.data.cohort import AUDIT
from scripts.runtime.files import write_json
from scripts.runtime.montage import save_montage

METRICS = ("pixel", "embedding")
PIXEL_FRAME_STEP, PIXEL_POOL = 5, 2  # the pixel audit sees every 5th frame at half resolution (10 x 48 x 48 values)
MAX_SHIFT = 2  # pooled pixels (4 at 96 x 96): training cines are compared shifted by -2..2 in each axis and mirrored


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """(N, ...) -> (N, D) float32 rows centred and L2-normalised: the dot product of two rows is their Pearson r."""
    x = x.flatten(1).float()
    x = x - x.mean(1, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def pixel_rows(cines: torch.Tensor, variants: bool = False) -> torch.Tensor:
    """(N, 1, T, H, W) -> (N, D) unit rows of the pixel audit's features; with `variants` (N, V, D), V = 50: each cine
    and its left-right mirror, circularly shifted by every (dy, dx) in [-MAX_SHIFT, MAX_SHIFT]^2."""
    x = F.avg_pool2d(cines[:, 0, ::PIXEL_FRAME_STEP].float(), PIXEL_POOL)  # (N, K, h, w)
    if not variants:
        return unit_rows(x)
    pair = torch.stack([x, x.flip(-1)], 1)  # (N, 2, K, h, w)
    shifts = range(-MAX_SHIFT, MAX_SHIFT + 1)
    moved = torch.stack([pair.roll((dy, dx), (-2, -1)) for dy in shifts for dx in shifts], 2)  # (N, 2, S, K, h, w)
    return unit_rows(moved.flatten(0, 2)).reshape(len(x), -1, x[0].numel())


class NearestNeighbours:
    """Running nearest reference row (largest dot product) of several query sets over reference chunks."""

    def __init__(self, queries: Mapping[str, torch.Tensor]) -> None:
        self.queries = dict(queries)  # name -> (N, D) unit rows
        self.best = {k: torch.full((len(q),), -torch.inf) for k, q in self.queries.items()}
        self.index = {k: torch.full((len(q),), -1, dtype=torch.long) for k, q in self.queries.items()}
        self.seen = 0

    def update(self, references: torch.Tensor) -> None:
        """references (n, D) unit rows, or (n, V, D) with V variants each (the best counts): the next `n` reference
        cines, in order."""
        flat = references.reshape(-1, references.shape[-1])  # (n * V, D)
        for k, q in self.queries.items():
            if not len(q):
                continue
            sim, idx = (q @ flat.T.to(q.dtype)).reshape(len(q), len(references), -1).amax(2).max(dim=1)  # (N,)
            better = sim > self.best[k]
            self.best[k] = torch.where(better, sim, self.best[k])
            self.index[k] = torch.where(better, idx + self.seen, self.index[k])
        self.seen += len(references)

    def result(self) -> dict[str, dict[str, list]]:
        """name -> {"similarity": [float], "index": [int]} (index into the references)."""
        return {k: {"similarity": self.best[k].tolist(), "index": self.index[k].tolist()} for k in self.queries}


def zscore(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """x standardised with the mean and std of `reference` (both (N, D)); constant dimensions are left centred."""
    return (x - reference.mean(0)) / reference.std(0).clamp_min(1e-8)


def copy_audit(nearest: Mapping[str, Mapping[str, dict]], subjects: Mapping[str, Sequence[str]], heldout: str,
               training: Sequence[str], quantile: float = 0.95) -> dict:
    """{"thresholds": {metric: t}, "quantile", "sets": {name: {"n", "flagged_share", ...}}} at `heldout` quantiles.
    nearest: metric -> set -> NearestNeighbours.result(); training: the training names in reference order."""
    thresholds = {m: float(np.quantile(nearest[m][heldout]["similarity"], quantile)) for m in METRICS}
    sets = {}
    for name, names in subjects.items():
        sim = {m: np.asarray(nearest[m][name]["similarity"], float) for m in METRICS}
        over = {m: sim[m] > thresholds[m] for m in METRICS}
        both = over["pixel"] & over["embedding"]
        n = len(names)
        sets[name] = {
            "n": n,
            "flagged_share": {**{m: float(over[m].mean()) if n else None for m in METRICS},
                              "both": float(both.mean()) if n else None},
            "memorised_share": len({nearest["pixel"][name]["index"][i] for i in np.flatnonzero(both)}) / len(training),
            "median_similarity": {m: float(np.median(sim[m])) if n else None for m in METRICS},
            "flagged": [names[i] for i in np.flatnonzero(both)],
            "nearest": [{"subject": names[i], **{f"{m}_similarity": float(sim[m][i]) for m in METRICS},
                         "training_index": int(nearest["pixel"][name]["index"][i]),
                         "training_subject": training[nearest["pixel"][name]["index"][i]]} for i in range(n)],
        }
    return {"quantile": quantile, "thresholds": thresholds, "sets": sets}


def closest_pairs_image(audit_set: dict, cines: torch.Tensor, training_cine, path: str | Path, k: int = 8,
                        frames: Sequence[int] = (0, 20)) -> Path | None:
    """PNG of the `k` synthetic cines of highest pixel similarity beside their nearest training cine (None if none).
    cines (N, 1, T, H, W) in audit_set["nearest"] order; training_cine(index) -> (1, T, H, W) array."""
    rows = sorted(range(len(audit_set["nearest"])), key=lambda i: -audit_set["nearest"][i]["pixel_similarity"])[:k]
    if not rows:
        return None
    tiles, captions = [], []
    for i in rows:
        near = audit_set["nearest"][i]
        pair = (np.asarray(cines[i, 0], np.float32), np.asarray(training_cine(near["training_index"])[0], np.float32))
        for who, cine in zip((near["subject"], f"train {near['training_subject']}"), pair):
            for t in frames:
                tiles.append(cine[t])
                captions.append(f"{who} t{t}" + (f" r{near['pixel_similarity']:.3f} e{near['embedding_similarity']:.2f}"
                                                 if who == near["subject"] and t == frames[0] else ""))
    return save_montage(tiles, path, ncols=2 * len(frames), captions=captions)


def record_audit(generated_dir: str | Path, flagged: Sequence[str], audited: Sequence[str], audit: dict,
                 evaluation_dir: str | Path) -> Path:
    """Write <generated_dir>/privacy_audit.json: the flagged and the audited subjects, the thresholds and which
    evaluation made it (downstream stages leave the flagged cines out and report unaudited ones, cohort.copy_audit)."""
    path = Path(generated_dir) / AUDIT
    write_json(path, {"flagged": sorted(flagged), "audited": sorted(audited), "thresholds": audit["thresholds"],
                      "evaluation_dir": str(Path(evaluation_dir).resolve())})
    return path


def drop_flagged(datalist_path: str | Path, flagged: Sequence[str], out_path: str | Path, audit: dict) -> Path:
    """Copy of a generated datalist without the `flagged` subjects, at `out_path`; image paths are rewritten relative
    to the new file's folder, and the dropped subjects and thresholds are recorded."""
    datalist_path, out_path = Path(datalist_path), Path(out_path)
    datalist = json.loads(datalist_path.read_text(encoding="utf-8"))
    drop = set(flagged)
    rel = os.path.relpath(datalist_path.parent.resolve(), out_path.parent.resolve())
    kept = [{**d, "image": f"{rel}/{d['image']}"} for d in datalist.get("training", []) if d["subject"] not in drop]
    write_json(out_path, {**datalist, "training": kept, "dropped_as_copies": sorted(drop),
                          "privacy_thresholds": audit["thresholds"], "source": str(datalist_path)})
    return out_path
