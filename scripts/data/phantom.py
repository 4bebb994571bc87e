"""Cardiac cine phantom cohort (configs/make_phantom.json): draws subjects, builds their geometry (phantom_shapes),
renders them (phantom_render), measures them as real cines (scripts.data.phenotypes) and writes the cohort."""

from __future__ import annotations

import csv
import json
import logging
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scripts.data.cine_files import write_cine
from scripts.data.orientation import canonical_affine
from scripts.data.phantom_render import Scan, render, sample_scan
from scripts.data.phantom_shapes import ChamberShapes, chamber_geometry, sample_targets, volume_curves
from scripts.data.phenotypes import PHENOTYPE_COLUMNS, measure_cine, write_phenotype_table
from scripts.runtime.cli import as_bool
from scripts.runtime.files import atomic_write, write_json
from scripts.runtime.montage import save_montage
from scripts.runtime.progress import track

logger = logging.getLogger(__name__)

CLASSES = ("healthy", "dilated", "hypertrophic", "restrictive")
LABEL_COLUMNS = ["diagnosis", "diagnosis_index", "disease", "sex"]
SLICE_MM = 8.0  # slice thickness written in the header
MAX_SUBJECTS = 1_000_000  # ids PH000000..PH999999
UNRECORDED = {"first_subject": 0}  # settings a cohort.json of an earlier version lacks: their value then


def subject_id(index: int) -> str:
    """Folder name and eid of phantom subject `index`."""
    return f"PH{index:06d}"


@dataclass(frozen=True)
class Draw:
    """Everything drawn for one subject: labels row, target phenotypes, geometry, scan and the image noise RNG."""

    eid: str
    row: dict
    targets: dict[str, float]
    geometry: ChamberShapes
    scan: Scan
    rng: np.random.Generator

    @property
    def frame_interval_s(self) -> float:
        return 60.0 / (self.targets["hr"] * len(self.geometry.lv))


def draw_subject(seed: int, index: int, class_weights: tuple[float, ...], frames: int = 50) -> Draw:
    """Deterministic draws of subject `index` of cohort `seed`, independent of every other subject."""
    rng = np.random.default_rng([seed, index])
    weights = np.asarray(class_weights, float) / np.sum(class_weights)
    diagnosis = CLASSES[rng.choice(len(CLASSES), p=weights)]
    sex = "male" if rng.random() < 0.5 else "female"
    p = sample_targets(rng, diagnosis, sex)
    geometry = chamber_geometry(p, volume_curves(p, diagnosis, frames))
    row = {"diagnosis": diagnosis, "diagnosis_index": CLASSES.index(diagnosis), "disease": int(diagnosis != "healthy"),
           "sex": sex}
    return Draw(subject_id(index), row, p, geometry, sample_scan(rng), rng)


def make_subject(output_dir: str | Path, seed: int, index: int, class_weights: tuple[float, ...],
                 keep_frames: bool = False) -> dict:
    """Render, write and measure one subject; returns eid, labels row, measured phenotypes (and ED/ES frames)."""
    d = draw_subject(seed, index, class_weights)
    image, label = render(d.scan, d.geometry, d.rng)
    folder = Path(output_dir) / d.eid
    folder.mkdir(parents=True, exist_ok=True)
    affine = canonical_affine((d.scan.spacing, d.scan.spacing), SLICE_MM)  # X (columns) toward L, Y (rows) toward P
    for name, cine, kind in (("la_4ch.nii.gz", image, "cine"), ("seg4_la_4ch.nii.gz", label, "label cine")):
        write_cine(folder / name, cine.transpose(2, 1, 0), affine, d.frame_interval_s,  # (T, H, W) -> (X, Y, T)
                   f"CPGG phantom {kind} {d.eid} (synthetic)")
    measured = measure_cine(label.transpose(2, 1, 0), (d.scan.spacing, d.scan.spacing), d.frame_interval_s, d.eid)
    es = int(np.argmin(d.geometry.lv[:, 0] * d.geometry.lv[:, 1] ** 2))
    frames = {"ed": image[0], "es": image[es]} if keep_frames else {}
    return {"eid": d.eid, "row": d.row, "phenotypes": measured, **frames}


def make_cohort(
    output_dir: str | Path,
    num_subjects: int,
    seed: int = 0,
    class_weights: tuple[float, ...] = (0.4, 0.2, 0.25, 0.15),
    num_workers: int = 2,
    montage_subjects: int = 8,
    overwrite: bool | str = False,
    first_subject: int = 0,
) -> dict:
    """Write a phantom cohort in UK Biobank layout plus phenotypes.csv, labels.csv, cohort.json and montage.png; into
    a non-empty folder only where it is a cohort of the same settings (a rerun) or with `overwrite`. Subjects are
    numbered from `first_subject` (ids PH<index>), so cohorts of distinct ranges share no id and no draw."""
    if num_subjects < 1:
        raise ValueError(f"num_subjects must be >= 1, got {num_subjects}")
    if not 0 <= first_subject <= MAX_SUBJECTS - num_subjects:
        raise ValueError(f"subjects {first_subject}..{first_subject + num_subjects - 1} do not fit the ids PH000000.."
                         f"PH{MAX_SUBJECTS - 1}: give first_subject in 0..{MAX_SUBJECTS - num_subjects}")
    if len(class_weights) != len(CLASSES) or min(class_weights) < 0 or sum(class_weights) <= 0:
        raise ValueError(f"class_weights must be {len(CLASSES)} non-negative numbers for {CLASSES}, got {class_weights}")
    out = Path(output_dir)
    settings = {"num_subjects": num_subjects, "seed": seed, "class_weights": list(class_weights),
                "first_subject": first_subject}
    check_output_dir(out, settings, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    indices = range(first_subject, first_subject + num_subjects)
    args = [(out, seed, i, tuple(class_weights), i < first_subject + montage_subjects) for i in indices]
    pool = ProcessPoolExecutor(max_workers=num_workers) if num_workers > 1 else None
    try:
        mapped = pool.map(make_subject, *zip(*args), chunksize=4) if pool else map(make_subject, *zip(*args))
        results = list(track(mapped, "phantom subjects", total=num_subjects))
    finally:
        if pool:
            pool.shutdown()
    write_phenotype_table(out / "phenotypes.csv", PHENOTYPE_COLUMNS, {r["eid"]: r["phenotypes"] for r in results})
    with atomic_write(out / "labels.csv") as tmp:
        _write_labels(tmp, results)
    shown = results[:montage_subjects]
    if shown:
        save_montage(
            [r["ed"] for r in shown] + [r["es"] for r in shown],
            out / "montage.png",
            ncols=len(shown),
            captions=[f"{r['eid']} {r['row']['diagnosis'][:4]} ED" for r in shown] + [f"{r['eid']} ES" for r in shown],
        )
    counts = {c: sum(r["row"]["diagnosis"] == c for r in results) for c in CLASSES}
    summary = {**settings, "classes": counts, "seconds": round(time.perf_counter() - start, 1)}
    write_json(out / "cohort.json", summary)
    logger.info("phantom cohort written to %s: %s", out, summary)
    return summary


def check_output_dir(out: Path, settings: dict, overwrite: bool | str) -> None:
    """ValueError for a non-empty `out` that is not a phantom cohort of `settings` (its cohort.json), unless
    `overwrite` (true: same-named files are replaced, nothing is deleted)."""
    if as_bool(overwrite, "overwrite") or not out.is_dir() or not any(out.iterdir()):
        return
    try:
        made = json.loads((out / "cohort.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        made = None
    if isinstance(made, dict) and all(made.get(k, UNRECORDED.get(k)) == v for k, v in settings.items()):
        return
    found = "a phantom cohort of other settings" if isinstance(made, dict) else "not a phantom cohort (no cohort.json)"
    raise ValueError(f"--output_dir {out} is not empty and {found}: writing would overwrite its files (phenotypes.csv, "
                     f"labels.csv, subject folders); give a new or empty --output_dir, or --overwrite True")


def _write_labels(path: Path, results: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["eid", *LABEL_COLUMNS])
        writer.writerows([r["eid"], *(r["row"][k] for k in LABEL_COLUMNS)] for r in results)
