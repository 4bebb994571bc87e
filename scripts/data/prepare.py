"""Preprocessing of 4-chamber cines into 1 x 50 x 96 x 96 clips (MONAI dictionary transforms) and the prepare job.
Arrays are C x T x H x W with H, W the X, Y axes of the cine in the canonical in-plane orientation (X toward patient
left, Y toward posterior for an axial-like plane: scripts.data.orientation). Frame 0 is end-diastole."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.transforms import (
    BorderPadd,
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    MapTransform,
    Resized,
    ScaleIntensityRangePercentilesd,
    SpatialCropd,
    Transposed,
)
from torch.utils.data import DataLoader, Dataset

from scripts.data.cine import CineError, one_line
from scripts.data.heart_crop import box_fraction, crop_pad, heart_box
from scripts.data.labels import Labeller, LoadSubjectd, ResampleLabelTimed, partial_record
from scripts.data.phenotypes import LABELS, fit_normaliser, read_eid_table, read_phenotype_table, write_phenotype_table
from scripts.data.shapes import IMAGE_SIZE, NUM_FRAMES
from scripts.runtime.files import check_disjoint, save_npy, write_json, write_text
from scripts.runtime.progress import track

logger = logging.getLogger(__name__)

KEYS = ("image", "label")
SPLITS = ("training", "validation", "test")
RESERVED = {"image", "label", "subject", "has_phenotypes", "spacing_mm", "frame_interval_s"}


# --------------------------------------------------------------------------------------------------------- transforms
SEGMENTER_ED_SMOOTHING = 2  # frames each side: the segmenter's per-frame LV areas are noisy on the flat ED plateau


def end_diastole(lv_area: np.ndarray, smooth: int = 0) -> int:
    """Frame of largest LV area in a cyclic (T,) curve, averaged over `smooth` frames each side first (0: as is)."""
    kernel = np.ones(2 * smooth + 1) / (2 * smooth + 1)
    padded = np.take(lv_area.astype(float), np.arange(-smooth, len(lv_area) + smooth), mode="wrap")
    return int(np.argmax(np.convolve(padded, kernel, mode="valid")))


class AlignEndDiastoled(MapTransform):
    """Roll (C, T, H, W) arrays in time so that frame 0 is the frame of largest LV area, among the "labelled" frames
    where the item has that mask; labels from the segmenter alone use the area averaged over
    SEGMENTER_ED_SMOOTHING frames each side (MONAI has no cyclic shift)."""

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        area = (torch.as_tensor(d["label"]) == LABELS["LV"]).sum(dim=(0, 2, 3)).numpy()
        if "labelled" in d:
            area = np.where(d["labelled"], area, -1)
        shift = end_diastole(area, SEGMENTER_ED_SMOOTHING if d.get("labels") == "segmenter" else 0)
        for key in self.key_iterator(d):
            d[key] = torch.roll(torch.as_tensor(d[key]), -shift, dims=1)
        d["ed_shift"] = shift
        return d


class CropHeartd(MapTransform):
    """Square crop (in mm, same box for all frames) around all heart labels over all frames, zero-padded outside the
    field of view. Own transform: MONAI's CropForegroundd boxes are per axis in pixels, not square in mm."""

    def __init__(self, margin: float) -> None:
        super().__init__(KEYS)
        if not margin >= 0:
            raise ValueError(f"crop margin must be >= 0 (a fraction of the box side), got {margin}")
        self.margin = margin

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        counts = (torch.as_tensor(d["label"])[0] > 0).sum(dim=0).numpy()  # heart voxels per (X, Y) pixel, all frames
        box = heart_box(counts > 0, d["spacing_mm"], self.margin)
        for key in self.key_iterator(d):
            d[key] = crop_pad(d[key], box)
        d["crop_box"], d["heart_fraction"] = box, box_fraction(counts, box)
        return d


def preprocessing(margin: float = 0.15, labeller: Labeller | None = None) -> Compose:
    """Subject item {"subject", "image", "label"} (paths) -> image float16 and label uint8 arrays, 1 x 50 x 96 x 96
    (missing label files labelled by `labeller`, where given)."""
    return Compose([
        LoadSubjectd(labeller),
        EnsureChannelFirstd(KEYS, channel_dim="no_channel"),
        Transposed(KEYS, indices=(0, 3, 1, 2)),  # C x T x H x W
        AlignEndDiastoled(KEYS),
        CropHeartd(margin),
        # cyclic time resampling: append frame 0, resize T + 1 -> 51 with the end points fixed, drop the last frame
        # (labels: frame_sources, the input frame nearest in time, within half a frame of the images' time)
        BorderPadd("image", spatial_border=[0, 1, 0, 0, 0, 0], mode="wrap"),
        Resized("image", spatial_size=(NUM_FRAMES + 1, -1, -1), mode="trilinear", align_corners=True),
        SpatialCropd("image", roi_slices=[slice(0, NUM_FRAMES), slice(None), slice(None)]),
        ResampleLabelTimed("label"),
        # in-plane: bilinear with Gaussian anti-aliasing when shrinking (T is unchanged), labels pixel-centred nearest
        Resized(KEYS, spatial_size=(-1, IMAGE_SIZE, IMAGE_SIZE), mode=("trilinear", "nearest-exact"),
                anti_aliasing=(True, False)),
        ScaleIntensityRangePercentilesd("image", lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True),
        EnsureTyped(KEYS, data_type="numpy", dtype=(np.float16, np.uint8), track_meta=False),
    ])


def _causes(error: BaseException) -> list[BaseException]:
    """An exception and the chain of exceptions behind it (MONAI's Compose wraps transform errors in RuntimeError)."""
    chain = [error]
    while chain[-1].__cause__ is not None and chain[-1].__cause__ not in chain:
        chain.append(chain[-1].__cause__)
    return chain


def _skip_record(item: dict, error: Exception) -> dict:
    """{"subject", "file", "reason", "error"} of a subject whose reading or preprocessing raised `error`: a CineError's
    message and file, else the innermost error (the image file named, as the file behind it is unknown)."""
    chain = _causes(error)
    cine = next((e for e in chain if isinstance(e, CineError)), None)
    if cine is not None:
        return {"subject": item["subject"], "file": cine.path or item["image"], "reason": str(cine),
                "error": "CineError"}
    root = chain[-1]
    return {"subject": item["subject"], "file": item["image"], "error": type(root).__name__,
            "reason": f"subject {item['subject']!r}: {item['image']}: preprocessing failed ({one_line(root)})"}


def _record(d: dict) -> dict:
    """What the report keeps of a preprocessed subject; output spacing = box side (mm) / 96, interval = T * dt / 50."""
    keys = ("subject", "labels", "note", "orientation", "original_shape", "ed_shift", "crop_box", "heart_fraction")
    return {**{k: d[k] for k in keys}, "original_spacing_mm": d["spacing_mm"],
            "original_frame_interval_s": d["frame_interval_s"],
            "spacing_mm": [(b - a) * s / IMAGE_SIZE for (a, b), s in zip(d["crop_box"], d["spacing_mm"])],
            "frame_interval_s": d["frame_interval_s"] * d["original_shape"][2] / NUM_FRAMES, **partial_record(d)}


class _PrepareSubjects(Dataset):
    """Item i: preprocess subject i, save its arrays atomically and return its record (or its CineError message)."""

    def __init__(self, items: list[dict], output_dir: Path, margin: float, labeller: Labeller | None = None) -> None:
        self.items, self.output_dir, self.transform = items, output_dir, preprocessing(margin, labeller)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        item = self.items[i]
        try:
            d = self.transform(item)
        except Exception as e:  # any error of one subject skips it; running out of memory stops the run
            if any(isinstance(c, MemoryError) for c in _causes(e)):
                raise
            return _skip_record(item, e)
        save_npy(self.output_dir / "images" / f"{item['subject']}.npy", d["image"])
        save_npy(self.output_dir / "labels" / f"{item['subject']}.npy", d["label"])
        return _record(d)


def _identity(x: dict) -> dict:
    return x


def process_subjects(items: list[dict], output_dir: Path, margin: float, num_workers: int,
                     labeller: Labeller | None = None) -> list[dict]:
    """Records of all items in order, processed by `num_workers` processes (0 or 1: in this process, one thread)."""
    workers = num_workers if num_workers > 1 else 0
    loader = DataLoader(_PrepareSubjects(items, output_dir, margin, labeller), batch_size=None, num_workers=workers,
                        collate_fn=_identity)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in DataLoader workers, so that results do not depend on the worker count
    try:
        records = list(track(loader, "preparing subjects", total=len(items)))
    finally:
        torch.set_num_threads(threads)
    return records


# ------------------------------------------------------------------------------------------------------------- tables
def _cell(text: str) -> int | float | str | None:
    """A labels.csv cell: int, float, text, or None when empty."""
    text = text.strip()
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text or None


def read_labels_table(path: Path) -> tuple[list[str], dict[str, dict]]:
    """labels.csv (first column eid): (columns, {eid: {column: int, float, text or None}}); errors: read_eid_table."""
    header, rows = read_eid_table(path)
    return header[1:], {eid: {c: _cell(v) for c, v in zip(header[1:], row[1:])} for _, eid, row in rows}


def _check_columns(phenotype_columns: list[str], label_columns: list[str]) -> None:
    clash = (set(phenotype_columns) | set(label_columns)) & RESERVED | set(phenotype_columns) & set(label_columns)
    if clash:
        raise ValueError(f"phenotype/labels.csv column names clash with each other or with datalist keys: "
                         f"{sorted(clash)}")


# ------------------------------------------------------------------------------------------------------------- splits
def split_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Subjects per split: largest-remainder rounding; training gets >= 1, and with n >= 3 so does every split with a
    positive fraction."""
    f = np.asarray(fractions, float)
    if f.shape != (len(SPLITS),) or (f < 0).any() or not f.sum() > 0 or not f[0] > 0:
        raise ValueError(f"splits must be {len(SPLITS)} non-negative fractions with training > 0, "
                         f"got {list(fractions)}")
    exact = f / f.sum() * n
    counts = np.floor(exact).astype(int)
    counts[np.argsort(counts - exact, kind="stable")[: n - counts.sum()]] += 1
    need = (f > 0) if n >= 3 else np.array([n > 0, False, False])  # n = 1 or 2: training first
    for i in np.flatnonzero(need & (counts == 0)):
        counts[np.argmax(counts)] -= 1
        counts[i] += 1
    return counts.tolist()


def split_subjects(subjects: Sequence[str], fractions: Sequence[float], seed: int) -> dict[str, list[str]]:
    """Seeded subject-level split into training/validation/test (depends only on the seed and the subject set)."""
    order = sorted(subjects)
    shuffled = [order[i] for i in np.random.default_rng(seed).permutation(len(order))]
    bounds = np.cumsum([0, *split_counts(len(order), fractions)])
    return {name: sorted(shuffled[a:b]) for name, a, b in zip(SPLITS, bounds[:-1], bounds[1:])}


# ------------------------------------------------------------------------------------------------------------ prepare
def find_subjects(dataset_dir: Path, image_name: str, label_name: str) -> list[dict]:
    """Items {"subject", "image", "label"} for the sub-folders holding `image_name` (a file or a DICOM folder)."""
    return [{"subject": p.name, "image": str(p / image_name), "label": str(p / label_name)}
            for p in sorted(dataset_dir.iterdir()) if (p / image_name).exists()]


def _datalist_item(record: dict, columns: list[str], table: dict, label_columns: list[str], labels: dict) -> dict:
    s = record["subject"]
    return {"image": f"images/{s}.npy", "label": f"labels/{s}.npy", "subject": s, "has_phenotypes": s in table,
            **{c: table[s][c] if s in table else None for c in columns},
            **{c: labels.get(s, {}).get(c) for c in label_columns},
            "spacing_mm": record["spacing_mm"], "frame_interval_s": record["frame_interval_s"],
            **({"labelled_frames": record["labelled_frames"]} if record["labels"] == "file" and "labelled_frames" in
               record else {})}


def _label_lines(report: dict) -> list[str]:
    """report.md lines naming the subjects with partial labels and those the segmenter labelled (where given)."""
    partial = report["partially_labelled"]
    text = "Partial labels (end-diastole chosen among the labelled frames only; frames in the subject's note)"
    lines = [f"{text}: {', '.join(partial)}", ""] if partial else []
    if not report["segmenter_checkpoint"]:
        return lines
    subjects = ", ".join(report["labelled_by_segmenter"]) or "none"
    completed = ", ".join(report["completed_by_segmenter"]) or "none"
    return [*lines, f"Labelled by the segmenter {report['segmenter_checkpoint']} (no label file): {subjects}", "",
            f"Unlabelled frames of partial labels labelled by the segmenter: {completed}", ""]


def _report_md(report: dict) -> str:
    lines = [f"# Prepared {report['prepared']} of {report['found']} subjects", "",
             "| split | subjects |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in report["split_sizes"].items()],
             "", f"Subjects without a phenotype row: {len(report['without_phenotypes'])}", "",
             f"Folders without {report['image_name']} (not subjects): {', '.join(report['folders_without_image']) or 'none'}",
             "",
             *_label_lines(report),
             f"## Skipped ({len(report['skipped'])})", ""]
    lines += [f"- `{s['subject']}` ({s['file']}): {s['reason']}" for s in report["skipped"]] or ["none"]
    lines += ["", f"## Notes ({len(report['notes'])})", ""]
    lines += [f"- `{subject}`: {note}" for subject, note in report["notes"].items()] or ["none"]
    return "\n".join(lines) + "\n"


def prepare(dataset_dir: str | Path, output_dir: str | Path, phenotypes_csv: str | Path | None = None,
            splits: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0, margin: float = 0.15, num_workers: int = 2,
            image_name: str = "la_4ch.nii.gz", label_name: str = "seg4_la_4ch.nii.gz",
            labeller: Labeller | None = None) -> dict:
    """Prepare a cohort `<dataset_dir>/<subject>/{image_name,label_name}` into `output_dir` (files: docs/README.md);
    returns the report. A subject whose reading or preprocessing fails in any way is skipped and reported (report.json,
    report.md); `labeller` labels missing labels. ValueError where nothing is prepared or the arguments or tables are
    wrong, or `output_dir` overlaps an input."""
    if dataset_dir is None or not Path(dataset_dir).is_dir():
        raise ValueError(f"dataset_dir must be an existing folder (pass --dataset_dir <folder>), got {dataset_dir}")
    dataset_dir, output_dir = Path(dataset_dir), Path(output_dir)
    check_disjoint({"--dataset_dir": dataset_dir, "--phenotypes_csv": phenotypes_csv}, {"--output_dir": output_dir})
    split_counts(1, splits)  # validate before any work
    pheno_path = Path(phenotypes_csv) if phenotypes_csv else dataset_dir / "phenotypes.csv"
    columns, table = read_phenotype_table(pheno_path) if phenotypes_csv or pheno_path.is_file() else ([], {})
    if not columns:
        logger.warning("no phenotype table at %s: subjects are prepared without phenotypes", pheno_path)
    labels_path = dataset_dir / "labels.csv"
    label_columns, labels = read_labels_table(labels_path) if labels_path.is_file() else ([], {})
    _check_columns(columns, label_columns)
    items = find_subjects(dataset_dir, image_name, label_name)
    if not items:
        raise ValueError(f"{dataset_dir}: no subject folder holds {image_name!r}")
    logger.info("preparing %d subjects from %s into %s", len(items), dataset_dir, output_dir)

    records = process_subjects(items, output_dir, margin, num_workers, labeller)
    done = [r for r in records if "error" not in r]
    report = {"dataset_dir": str(dataset_dir), "image_name": image_name, "found": len(items), "prepared": len(done),
              "segmenter_checkpoint": str(labeller.checkpoint) if labeller else None,
              "labelled_by_segmenter": [r["subject"] for r in done if r["labels"] == "segmenter"],
              "partially_labelled": [r["subject"] for r in done if "labelled_frames" in r],
              "completed_by_segmenter": [r["subject"] for r in done if r["labels"] == "file+segmenter"],
              "skipped": [r for r in records if "error" in r],
              "skipped_by_error": dict(Counter(r["error"] for r in records if "error" in r)),
              "notes": {r["subject"]: r["note"] for r in done if r["note"]},
              "without_phenotypes": [r["subject"] for r in done if r["subject"] not in table],
              "folders_without_image": [p.name for p in sorted(dataset_dir.iterdir())
                                        if p.is_dir() and not (p / image_name).exists()],
              "split_sizes": {}, "subjects": {r["subject"]: r for r in done}}
    if not done:
        write_json(output_dir / "report.json", report)
        write_text(output_dir / "report.md", _report_md(report))
        raise ValueError(f"no subject could be prepared from {dataset_dir}; reasons in {output_dir / 'report.json'}")

    split = split_subjects([r["subject"] for r in done], splits, seed)
    report["split_sizes"] = {k: len(v) for k, v in split.items()}
    by_subject = {r["subject"]: r for r in done}
    datalist = {name: [_datalist_item(by_subject[s], columns, table, label_columns, labels) for s in subjects]
                for name, subjects in split.items()}
    datalist.update(phenotype_columns=columns, label_columns=label_columns, seed=seed, splits=list(splits),
                    shape=[1, NUM_FRAMES, IMAGE_SIZE, IMAGE_SIZE])
    write_json(output_dir / "datalist.json", datalist)
    if columns:
        write_phenotype_table(output_dir / "phenotypes.csv", columns,
                              {s: table[s] for s in sorted(by_subject) if s in table})  # atomic there
        train = [s for s in split["training"] if s in table]
        if train:
            write_json(output_dir / "phenotype_stats.json", fit_normaliser(table, train, columns))
        else:
            logger.warning("no training subject has phenotypes: phenotype_stats.json not written")
    write_json(output_dir / "report.json", report)
    write_text(output_dir / "report.md", _report_md(report))
    logger.info("prepared %d/%d subjects (%d skipped, %d without phenotypes); splits %s; written to %s",
                len(done), len(items), len(report["skipped"]), len(report["without_phenotypes"]),
                report["split_sizes"], output_dir)
    return report


