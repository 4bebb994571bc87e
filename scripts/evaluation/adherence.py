"""Phenotype adherence: segment generated cines, measure their phenotypes and compare with the requested ones,
beside the real held-out floors (protocol: docs/evaluation.md)."""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from scripts.data.cohort import load_cines
from scripts.data.phenotypes import LABELS, PHENOTYPE_COLUMNS, PhenotypeError, measure_cine
from scripts.evaluation import fidelity
from scripts.evaluation.protocol import Loaded, value_rows
from scripts.evaluation.report import adherence_plot
from scripts.runtime.features import slopes
from scripts.runtime.files import atomic_write
from scripts.runtime.progress import track
from scripts.segmentation import segmenter as segmentation

logger = logging.getLogger(__name__)

ED_TOLERANCE = 2  # frames: the end-diastole frame of a cine counts as aligned within this distance of frame 0
Segment = Callable[[torch.Tensor], np.ndarray]  # (B, 1, T, H, W) float [0, 1] on the device -> (B, T, H, W) uint8


def segment_all(segment: Segment, cines: torch.Tensor, batch_size: int, device: torch.device | str) -> np.ndarray:
    """(N, 1, T, H, W) -> (N, T, H, W) uint8 label cines."""
    if not len(cines):
        return np.zeros((0,) + tuple(cines.shape[2:]), np.uint8)
    batches = fidelity.batches(cines, batch_size, device, "evaluation: segmenting")
    return np.concatenate([np.asarray(segment(x), np.uint8) for x in batches])


def measure_labels(labels: np.ndarray, items: Sequence[dict]) -> tuple[np.ndarray, list[dict]]:
    """Phenotypes (N, len(PHENOTYPE_COLUMNS)) of (N, T, H, W) label cines with each item's geometry; a NaN row and a
    {"subject", "reason"} entry for every cine that cannot be measured."""
    values = np.full((len(items), len(PHENOTYPE_COLUMNS)), np.nan)
    failures = []
    for i, (label, d) in track(enumerate(zip(labels, items)), "evaluation: measuring phenotypes", len(items)):
        try:
            if not (d.get("spacing_mm") and d.get("frame_interval_s")):
                raise PhenotypeError(f"subject {d.get('subject')!r}: no spacing_mm / frame_interval_s in the datalist")
            m = measure_cine(np.asarray(label).transpose(1, 2, 0), d["spacing_mm"], d["frame_interval_s"], d["subject"])
            values[i] = [m[c] for c in PHENOTYPE_COLUMNS]
        except PhenotypeError as e:
            failures.append({"subject": d.get("subject"), "reason": str(e)})
    return values, failures


def adherence_stats(target: np.ndarray, measured: np.ndarray, columns: Sequence[str]) -> dict[str, dict]:
    """Per column {"n", "pearson_r", "mae", "r2", "slope"} of measured vs target (N, F), over rows where both are
    finite; r2 = 1 - SS(measured - target) / SS(target - mean target); slope: least-squares slope of measured on
    target (1: the requested spread is kept; > 1 exaggerated). None where fewer than 3 rows or no spread."""
    out = {}
    for k, c in enumerate(columns):
        t, m = target[:, k], measured[:, k]
        ok = np.isfinite(t) & np.isfinite(m)
        t, m = t[ok], m[ok]
        spread = len(t) >= 3 and t.std() > 0 and m.std() > 0
        out[c] = {"n": int(ok.sum()), "pearson_r": float(np.corrcoef(t, m)[0, 1]) if spread else None,
                  "mae": float(np.abs(m - t).mean()) if len(t) else None,
                  "r2": float(1 - ((m - t) ** 2).sum() / ((t - t.mean()) ** 2).sum()) if spread else None,
                  "slope": float(slopes(torch.from_numpy(m[:, None]), torch.from_numpy(t[:, None]))[0]) if spread
                  else None}
    return out


def summarise(measured: np.ndarray, failures: list[dict], target: np.ndarray | None, columns: Sequence[str]) -> dict:
    """{"n", "unmeasurable_share", "unmeasurable", "phenotypes"} for one set; target None: no conditioning values."""
    n = len(measured)
    index = [PHENOTYPE_COLUMNS.index(c) for c in columns]
    stats = adherence_stats(target, measured[:, index], columns) if target is not None else {}
    return {"n": n, "unmeasurable_share": len(failures) / n if n else None, "unmeasurable": failures,
            "phenotypes": stats}


def median_geometry(items: Sequence[dict]) -> list[dict]:
    """The items with every pixel size and frame interval set to their medians over the items (those that have them)."""
    known = [d for d in items if d.get("spacing_mm") and d.get("frame_interval_s")]
    if not known:
        return list(items)
    spacing = np.median([d["spacing_mm"] for d in known], axis=0).tolist()
    interval = float(np.median([d["frame_interval_s"] for d in known]))
    return [{**d, "spacing_mm": spacing, "frame_interval_s": interval} for d in items]


def ed_frames(labels: np.ndarray) -> np.ndarray:
    """(N,) frame of the largest LV blood-pool area of each (N, T, H, W) label cine: prepare's end-diastole rule
    (scripts/data.py AlignEndDiastoled), which puts it at frame 0 of every prepared cine."""
    return (labels == LABELS["LV"]).sum((2, 3)).argmax(1) if len(labels) else np.zeros(0, int)


def ed_aligned_share(frames: np.ndarray, num_frames: int, tolerance: int = ED_TOLERANCE) -> float | None:
    """Share of cines whose end-diastole frame lies within `tolerance` frames of frame 0, cyclically."""
    distance = np.minimum(frames % num_frames, -frames % num_frames)
    return float((distance <= tolerance).mean()) if len(frames) else None


def set_adherence(labels: np.ndarray, items: Sequence[dict], target: np.ndarray | None,
                  columns: Sequence[str]) -> tuple[dict, np.ndarray]:
    """(summarise() of (N, T, H, W) label cines with "median_geometry" (every item at the set's median pixel size and
    frame interval) and "ed_aligned_share" entries, the measured (N, len(PHENOTYPE_COLUMNS)) values)."""
    measured, failures = measure_labels(labels, items)
    entry = summarise(measured, failures, target, columns)
    entry["ed_aligned_share"] = ed_aligned_share(ed_frames(labels), labels.shape[1])
    entry["ed_tolerance_frames"] = ED_TOLERANCE
    if target is not None:
        entry["median_geometry"] = summarise(measure_labels(labels, median_geometry(items))[0], [], target,
                                             columns)["phenotypes"]
    return entry, measured


def write_measurements(path: Path, items: Sequence[dict], ed: np.ndarray, target: np.ndarray | None,
                       measured: np.ndarray, columns: Sequence[str]) -> Path:
    """CSV, one row per cine: subject, end-diastole frame, then requested (empty without conditions) and measured
    (empty where unmeasurable) value of every column."""
    index = [PHENOTYPE_COLUMNS.index(c) for c in columns]
    with atomic_write(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        rows = csv.writer(f)
        rows.writerow(["subject", "ed_frame", *(f"requested {c}" for c in columns), *(f"measured {c}" for c in columns)])
        for i, d in enumerate(items):
            requested = target[i] if target is not None else [None] * len(columns)
            rows.writerow([d.get("subject"), int(ed[i]), *map(_cell, requested), *map(_cell, measured[i, index])])
    return path


def _cell(value: float | None) -> str:
    return "" if value is None or not np.isfinite(value) else repr(float(value))


def segmenter_callable(path: str | Path | None, network: nn.Module | None,
                       device: torch.device) -> tuple[Segment | None, str]:
    """(segment callable, "") from a trained segmenter checkpoint loaded into `network` (a segmenter_def), or
    (None, reason) where there is none."""
    if not path or not Path(path).is_file():
        return None, f"segmenter checkpoint {path} not found: train it with {segmentation.TRAINED_BY}"
    if network is None:
        return None, "no segmenter network (segmenter_def) given"
    network = segmentation.load_segmenter(path, network, device)
    return (lambda cines: segmentation.segment_cines(network, cines).numpy()), ""


def adherence_section(data: Loaded, segment: Segment | None, reason: str, batch_size: int, device: torch.device,
                      evaluation_dir: Path) -> dict:
    """Adherence of every usable set (segmenter + measurement vs its conditioning values, a CSV table and a plot each)
    beside the real held-out floors; {"skipped": reason} beside the true-label floor where `segment` is None."""
    heldout = data.heldout
    columns = [c for c in PHENOTYPE_COLUMNS if c in data.stats["columns"]]
    truth = value_rows(heldout, columns)
    labelled = [d for d in heldout if d.get("label")]
    out = {"columns": columns}
    if len(labelled) == len(heldout):
        measured, failures = measure_labels(load_cines(data.prepared, heldout, "label")[:, 0].numpy(), heldout)
        out["heldout_true_labels"] = summarise(measured, failures, truth, columns)
    if segment is None:
        return out | {"skipped": reason}
    out["heldout_segmented"], measured = set_adherence(segment_all(segment, data.heldout_cines, batch_size, device),
                                                       heldout, truth, columns)
    plots = {"real held-out (segmented)": (truth, measured[:, [PHENOTYPE_COLUMNS.index(c) for c in columns]])}
    out["sets"] = {}
    for name, x in data.cines.items():
        logger.info("evaluation: segmenting and measuring the %d cines of %s", len(x), name)
        items = data.found[name]["items"]
        target = value_rows(items, columns) if any(d.get("has_phenotypes") for d in items) else None
        labels = segment_all(segment, x, batch_size, device)
        out["sets"][name], measured = set_adherence(labels, items, target, columns)
        out["sets"][name]["table"] = write_measurements(evaluation_dir / f"adherence_{name}.csv", items,
                                                        ed_frames(labels), target, measured, columns).name
        if target is not None:
            index = [PHENOTYPE_COLUMNS.index(c) for c in columns]
            path = adherence_plot(evaluation_dir / f"adherence_{name}.png", columns,
                                  {f"generated {name}": (target, measured[:, index]), **plots})
            out["sets"][name]["plot"] = path.name if path else None
    return out
