"""Where a subject's labels come from: its label cine, per-frame label files, or a segmenter (its output checked by
`implausible`); partial labels (labels in some frames only), their completion by the segmenter and their time
resampling to NUM_FRAMES frames. Used by the preprocessing of scripts.data.prepare."""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import nibabel as nib
import numpy as np
import torch
from monai.transforms import MapTransform

from scripts.data.cine import LV_LABEL, Cine, CineError, reading
from scripts.data.cine_files import (
    check_data_size,
    check_label_values,
    load_cine,
    load_stored,
    load_subject,
    orientation_note,
    reoriented,
    where_of,
)
from scripts.data.orientation import in_plane_codes
from scripts.data.phenotypes import LABELS
from scripts.data.shapes import NUM_FRAMES


class Labeller(Protocol):
    """Labels a full-view cine (scripts.segmentation.labeller.CineLabeller); `checkpoint` names its weights."""

    checkpoint: str

    def __call__(self, image: np.ndarray, spacing_mm: Sequence[float]) -> np.ndarray:
        """(X, Y, T) image with its pixel size (mm) -> (X, Y, T) uint8 labels."""


# ---------------------------------------------------------------------------------------------- per-frame label files
def label_frame_files(label_path: str | Path, subject: str = "") -> dict[int, Path]:
    """{frame: path} of the per-frame label files beside a label cine `<stem>.<ext>`: `<stem>_frame<k>.<ext>`
    (e.g. seg4_la_4ch_frame0.nii.gz), k the 0-based index of the frame in the image cine's time order; {} if none.
    CineError where two files name one frame (frame1, frame01)."""
    path = Path(label_path)
    stem, dot, ext = path.name.partition(".")
    pattern = re.compile(rf"{re.escape(stem)}_frame(\d+){re.escape(dot + ext)}\Z")
    names = sorted(path.parent.iterdir()) if path.parent.is_dir() else []
    found = sorted((int(m[1]), p) for p in names if (m := pattern.match(p.name)))
    frames = dict(found)
    if len(frames) < len(found):
        raise CineError(f"{where_of(path.parent, subject)}: several label files name one frame: "
                        f"{', '.join(p.name for _, p in found)}", path.parent)
    return frames


def _read_frame(path: Path, shape: tuple[int, ...], subject: str) -> tuple[np.ndarray, str]:
    """The (X, Y) label frame of a NIfTI file (X x Y, X x Y x 1 or X x Y x 1 x 1) and its in-plane codes; CineError
    naming the file where it is unreadable, of another in-plane shape than `shape`, or has unusable values."""
    where = where_of(path, subject)
    try:
        with reading(where, "cannot read the label frame, file truncated or corrupt"):
            image = nib.load(path)
            check_data_size(path, image, where)
            if tuple(n for n in image.shape[2:] if n != 1) or image.shape[:2] != tuple(shape):
                raise CineError(f"{where}: found shape {image.shape}; expected one label frame {tuple(shape)} "
                                f"(X x Y, optionally x 1 x 1), the in-plane shape of the image")
            frame = image.get_fdata(dtype=np.float32).reshape(shape)
            codes = in_plane_codes(image.affine)
        check_label_values(frame, where, path)
        if not frame.any():
            raise CineError(f"{where}: label frame is empty (no foreground)", path)
    except CineError as error:
        error.path = error.path or str(path)
        raise
    return frame, codes


def load_label_frames(image_path: str | Path, frames: dict[int, Path], subject: str) -> tuple[Cine, Cine]:
    """Load an image cine and a uint8 label cine assembled from per-frame label files ({frame: path},
    `label_frame_files`), 0 in the other frames; as `load_subject` otherwise."""
    image, codes = load_stored(image_path, subject)
    nx, ny, nt = image.array.shape
    label, notes = np.zeros((nx, ny, nt), np.uint8), []
    for k, path in frames.items():
        if k >= nt:
            raise CineError(f"{where_of(path, subject)}: frame {k} named in the file name, but the image {image_path} "
                            f"has {nt} frames (0..{nt - 1})", path)
        frame, frame_codes = _read_frame(path, (nx, ny), subject)
        label[:, :, k] = frame
        notes += [f"{path.name}: {orientation_note(frame_codes, codes)}"] if frame_codes != codes else []
    if not (label == LV_LABEL).any():
        raise CineError(f"{where_of(Path(image_path), subject)}: no LV (label {LV_LABEL}) in any of the label frame "
                        f"files {', '.join(p.name for p in frames.values())}", next(iter(frames.values())))
    cine = Cine(label, image.spacing_mm, image.frame_interval_s, image.affine, "; ".join(notes))
    return reoriented(image, codes), reoriented(cine, codes)


# --------------------------------------------------------------------------------------------------- segmenter labels
HEART_EXTENT_MM = (40.0, 250.0)  # plausible largest extent of the heart over a cine (infant to dilated adult heart)


def implausible(label: np.ndarray, spacing_mm: Sequence[float]) -> str:
    """Why an (X, Y, T) label cine from the segmenter is no heart, "" where it is plausible: the LV in at least half
    the frames, each of the 5 labels in some frame, the heart's largest extent (all frames) within HEART_EXTENT_MM."""
    frames = label.shape[2]
    with_lv = int((label == LV_LABEL).any(axis=(0, 1)).sum())
    if 2 * with_lv < frames:
        return f"LV (label {LV_LABEL}) in {with_lv} of {frames} frames, expected in at least half"
    missing = [f"{name} ({k})" for name, k in LABELS.items() if not (label == k).any()]
    if missing:
        return f"{', '.join(missing)} in no frame, expected each of the 5 labels"
    extent = max((i.max() - i.min() + 1) * s for i, s in zip(np.nonzero(label.any(axis=2)), spacing_mm))
    low, high = HEART_EXTENT_MM
    if not low <= extent <= high:
        return f"heart extent {extent:.0f} mm, outside the plausible {low:.0f}-{high:.0f} mm"
    return ""


def _frame_list(frames: np.ndarray) -> str:
    """The indices of a boolean per-frame mask, as "0, 12"."""
    return ", ".join(str(k) for k in np.flatnonzero(frames))


def _no_labels(subject: str, label_path: str) -> CineError:
    """The error of a subject without any label file and without a segmenter."""
    stem, dot, ext = Path(label_path).name.partition(".")
    return CineError(f"subject {subject!r}: {label_path}: file not found, nor per-frame label files "
                     f"{stem}_frame<k>{dot}{ext}; a segmenter would label this cine: pass --segmenter_checkpoint "
                     "<segmenter.pt> (configs/train_segmenter.json, docs/segmenter.md)", label_path)


# -------------------------------------------------------------------------------------------------- loading transform
class LoadSubjectd(MapTransform):
    """Load and validate a subject's image and labels (scripts.data.cine_files) as (X, Y, T) arrays in the canonical
    in-plane orientation. Labels: the label cine, else per-frame label files, else `labeller` (output checked by
    `implausible`), else a CineError. Frames without labels in a file (partial labels: "labelled" holds the mask
    of labelled frames) are labelled by `labeller` where given and plausible, else stay 0. "labels": "file",
    "segmenter" or "file+segmenter"."""

    def __init__(self, labeller: Labeller | None = None) -> None:
        super().__init__(("image", "label"))
        self.labeller = labeller

    def _segment(self, image: Cine) -> tuple[np.ndarray, str]:
        """The labeller's (X, Y, T) uint8 labels of `image` and why they are no heart ("" if plausible)."""
        label = self.labeller(image.array, image.spacing_mm)
        return label, implausible(label, image.spacing_mm)

    def _load(self, subject: str, image_path: str, label_path: str) -> tuple[Cine, np.ndarray, str, str]:
        """Image, (X, Y, T) uint8 labels, their source and the note."""
        if Path(label_path).exists():
            image, label = load_subject(image_path, label_path, subject)
            paths = ((image_path, image), (label_path, label))
        elif frames := label_frame_files(label_path, subject):
            image, label = load_label_frames(image_path, frames, subject)
            paths = ((image_path, image), (str(Path(label_path).parent), label))
        elif self.labeller is not None:
            image = load_cine(image_path, subject)
            label, problem = self._segment(image)
            if problem:
                raise CineError(f"subject {subject!r}: {image_path}: no label file, and the segmenter "
                                f"{self.labeller.checkpoint} finds no plausible heart: {problem}", image_path)
            return image, label, "segmenter", image.note
        else:
            load_cine(image_path, subject)  # a problem of the image is reported first
            raise _no_labels(subject, label_path)
        note = "; ".join(f"{path}: {c.note}" for path, c in paths if c.note)
        return image, label.array, "file", note

    def _complete(self, d: dict, image: Cine, label: np.ndarray) -> np.ndarray:
        """Partial file labels: the labeller's labels in the unlabelled frames where plausible; notes the frames."""
        labelled = label.any(axis=(0, 1))
        d["labelled"] = labelled
        found = (f"labels in {labelled.sum()} of {labelled.size} frames ({_frame_list(labelled)}): end-diastole is the "
                 "labelled frame of largest LV area")
        rest = "unlabelled frames are 0 (datalist labelled_frames; --segmenter_checkpoint labels them)"
        if self.labeller is not None:
            segmented, problem = self._segment(image)
            rest = f"the segmenter's labels are implausible ({problem}): unlabelled frames are 0"
            if not problem:
                label, d["labels"] = np.where(labelled, label, segmented).astype(np.uint8), "file+segmenter"
                rest = f"the other {(~labelled).sum()} frames labelled by the segmenter (report.json segmenter_frames)"
        d["note"] = "; ".join(n for n in (d["note"], found, rest) if n)
        return label

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        image, label, d["labels"], d["note"] = self._load(str(d["subject"]), d["image"], d["label"])
        if d["labels"] == "file" and not label.any(axis=(0, 1)).all():
            label = self._complete(d, image, label)
        d["image"], d["label"] = image.array, label
        d["original_shape"], d["orientation"] = list(image.array.shape), image.orientation  # shape as oriented
        d["spacing_mm"], d["frame_interval_s"] = list(image.spacing_mm), image.frame_interval_s
        return d


# ---------------------------------------------------------------------------------------------------- time resampling
def frame_sources(frames: int, keep: np.ndarray | None = None) -> np.ndarray:
    """The source frame of each of the NUM_FRAMES output frames when a cyclic cine of `frames` frames is resampled in
    time: the input frame nearest to the output frame's time (output frame j lies at input frame j * frames /
    NUM_FRAMES, as in the images' resampling); a frame in the mask `keep` that no output frame takes
    (frames > NUM_FRAMES) replaces the output frame beside it in time whose source is not in `keep`."""
    sources = np.rint(np.arange(NUM_FRAMES) * frames / NUM_FRAMES).astype(int) % frames
    for s in np.flatnonzero(keep) if keep is not None else []:
        time = s * NUM_FRAMES / frames  # in output frames
        beside = sorted({int(np.floor(time)), int(np.ceil(time)) % NUM_FRAMES}, key=lambda j: abs(j - time))
        free = [j for j in beside if not keep[sources[j]]]
        if s not in sources and free:
            sources[free[0]] = s
    return sources


class ResampleLabelTimed(MapTransform):
    """Resample a (C, T, H, W) label cine to NUM_FRAMES frames by `frame_sources` (the "labelled" frames kept where
    the item has that mask, rolled by "ed_shift"); "frame_sources": the source frame of each output frame."""

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        keep = np.roll(d["labelled"], -d["ed_shift"]) if "labelled" in d else None
        for key in self.key_iterator(d):
            label = torch.as_tensor(d[key])
            d["frame_sources"] = frame_sources(label.shape[1], keep)
            d[key] = label[:, torch.from_numpy(d["frame_sources"])]
        return d


def partial_record(d: dict) -> dict:
    """Of a subject with partial file labels: "original_labelled_frames" (input frames), "labelled_frames" (prepared
    frames whose labels come from those) and, where the segmenter labelled the others, "segmenter_frames"; {} else."""
    if "labelled" not in d:
        return {}
    labelled = d["labelled"]
    from_file = labelled[(d["frame_sources"] + d["ed_shift"]) % labelled.size]
    out = {"original_labelled_frames": np.flatnonzero(labelled).tolist(),
           "labelled_frames": np.flatnonzero(from_file).tolist()}
    return out | ({"segmenter_frames": np.flatnonzero(~from_file).tolist()} if d["labels"] == "file+segmenter" else {})
