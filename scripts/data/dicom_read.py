"""Reading a DICOM cine: a folder of classic files (one per frame) or of enhanced multi-frame files, or one enhanced
file; series choice, frame order, timing, geometry and pixels through pydicom (MONAI's PydicomReader reads neither
enhanced multi-frame files nor their functional groups)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pydicom
from pydicom.pixels import get_decoder
from pydicom.uid import JPEGExtended12Bit

from scripts.data.cine import EXPECTED, MIN_FRAMES, Cine, CineError, reading

GEOMETRY_TAGS = {"ImagePositionPatient": [0, 0, 0], "ImageOrientationPatient": [1, 0, 0, 0, 1, 0],
                 "PixelSpacing": [1, 1]}  # DICOM geometry tags and the value assumed where a file has none
FRAME_TAGS = (*GEOMETRY_TAGS, "SliceThickness", "TriggerTime", "InstanceNumber", "NominalInterval", "HeartRate", "Rows",
              "Columns", "SamplesPerPixel", "RescaleSlope", "RescaleIntercept", "SeriesInstanceUID", "SeriesNumber",
              "ImageType")  # the DICOM tags of a frame that the series checks, ordering, timing, affine and pixels read
ENHANCED_TAGS = {  # where an enhanced multi-frame file holds FRAME_TAGS: (functional group sequence, tag in it)
    "ImagePositionPatient": ("PlanePositionSequence", "ImagePositionPatient"),
    "ImageOrientationPatient": ("PlaneOrientationSequence", "ImageOrientationPatient"),
    "PixelSpacing": ("PixelMeasuresSequence", "PixelSpacing"),
    "SliceThickness": ("PixelMeasuresSequence", "SliceThickness"),
    "TriggerTime": ("CardiacSynchronizationSequence", "NominalCardiacTriggerDelayTime"),
    "NominalInterval": ("CardiacSynchronizationSequence", "RRIntervalTimeNominal"),
    "InstanceNumber": ("FrameContentSequence", "TemporalPositionIndex"),
    "RescaleSlope": ("PixelValueTransformationSequence", "RescaleSlope"),
    "RescaleIntercept": ("PixelValueTransformationSequence", "RescaleIntercept"),
}
UNEVEN_STEP = 2.0  # a TriggerTime step this many times the median one: a missing frame (two steps in one)


class _Names(NamedTuple):
    """How messages name a series' frames and the tags read as TriggerTime, InstanceNumber and NominalInterval."""

    frame: str
    trigger: str
    index: str
    interval: str


CLASSIC = _Names("file", "TriggerTime", "InstanceNumber", "NominalInterval")
Frame = dict[str, Any]  # the FRAME_TAGS one frame has, by their classic (one file per frame) keywords


@dataclass(frozen=True)
class _Series:
    """One candidate cine: a classic series (one file per frame) or a multi-frame (enhanced) file."""

    uid: str
    frames: list[Frame]
    sources: list[tuple[Path, int]]  # each frame's file and its index there
    names: _Names
    label: str  # how notes name the series
    where: str  # how errors name it


def _named(where: str, path: Path) -> str:
    """`where` followed by the file's name, unless `where` names the file already (by its path, or its folder's path
    and its name)."""
    return where if where.endswith((str(path), f": {path.name}")) else f"{where}: {path.name}"


def _dicom_frame_interval(frames: list[Frame], names: _Names, where: str) -> float:
    """From TriggerTime steps (ms), else NominalInterval (ms) or HeartRate (bpm) over the number of frames."""
    n = len(frames)
    trigger = np.array([float(f.get("TriggerTime", np.nan)) for f in frames])
    if np.isfinite(trigger).all() and trigger[-1] > trigger[0]:
        return float(trigger[-1] - trigger[0]) / (n - 1) / 1000.0
    nominal, rate = float(frames[0].get("NominalInterval", 0) or 0), float(frames[0].get("HeartRate", 0) or 0)
    if nominal > 0:
        return nominal / n / 1000.0
    if rate > 0:
        return 60.0 / rate / n
    raise CineError(f"{where}: no {names.trigger}, {names.interval} or HeartRate: cannot tell the frame interval")


def _dicom_headers(path: Path, where: str) -> dict[Path, pydicom.Dataset]:
    """Headers (no pixel data) of a DICOM file, or of the DICOM files of a folder sorted by name, by path."""
    files = sorted(p for p in path.iterdir() if p.is_file() and pydicom.misc.is_dicom(p)) if path.is_dir() else [path]
    headers = {}
    for file in files:
        with reading(_named(where, file), "cannot read the DICOM header, file truncated or corrupt"):
            headers[file] = pydicom.dcmread(file, stop_before_pixels=True)
    if not headers:
        raise CineError(f"{where}: no DICOM file in the folder; expected one file per frame of {EXPECTED}, or an "
                        "enhanced multi-frame file")
    return headers


def _frame_tags(header: pydicom.Dataset) -> Frame:
    """The FRAME_TAGS a (classic) header has."""
    return {key: header.get(key) for key in FRAME_TAGS if key in header}


def _item(groups: pydicom.Dataset | None, sequence: str) -> pydicom.Dataset:
    """The first item of `sequence` in `groups` (an empty Dataset where there is none)."""
    items = groups.get(sequence) if groups else None
    return items[0] if items else pydicom.Dataset()


def _is_multi_frame(header: pydicom.Dataset) -> bool:
    """Whether a file holds its frames in one file (NumberOfFrames over 1, or functional groups)."""
    return int(header.get("NumberOfFrames") or 1) > 1 or "PerFrameFunctionalGroupsSequence" in header


def _multi_frame_tags(header: pydicom.Dataset, where: str) -> tuple[list[Frame], str]:
    """FRAME_TAGS of each frame of a multi-frame file (per-frame functional groups over shared ones over the file's
    own tags, ENHANCED_TAGS), and what its InstanceNumber is: TemporalPositionIndex, else the frame's place in the
    file ("storage")."""
    count, per_frame = int(header.get("NumberOfFrames") or 1), header.get("PerFrameFunctionalGroupsSequence") or []
    if per_frame and len(per_frame) != count:
        raise CineError(f"{where}: {len(per_frame)} PerFrameFunctionalGroupsSequence items for {count} frames "
                        "(NumberOfFrames)")
    shared = _item(header, "SharedFunctionalGroupsSequence")
    own = {key: value for key, value in _frame_tags(header).items() if key != "InstanceNumber"}  # the file's number
    frames = []
    for k in range(count):
        frame = dict(own)
        for key, (sequence, tag) in ENHANCED_TAGS.items():
            item = next((i for i in (_item(per_frame[k] if per_frame else None, sequence), _item(shared, sequence))
                         if tag in i), None)
            if item is not None:
                frame[key] = item.get(tag)
        frames.append(frame)
    if any("InstanceNumber" in f for f in frames):
        return frames, "TemporalPositionIndex"
    return [{**f, "InstanceNumber": k + 1} for k, f in enumerate(frames)], "storage"


def _candidates(headers: dict[Path, pydicom.Dataset], where: str) -> list[_Series]:
    """The candidate cines among the files: each classic series (files grouped by SeriesInstanceUID, never merged) and
    each multi-frame file, in the order of their first file."""
    groups: dict[tuple[str, Path | None], list[Path]] = {}
    for path, header in headers.items():
        groups.setdefault((str(header.get("SeriesInstanceUID", "")), path if _is_multi_frame(header) else None),
                          []).append(path)
    candidates = []
    for (uid, multi), files in groups.items():
        if multi:
            at = _named(where, multi)
            frames, index = _multi_frame_tags(headers[multi], at)
            names = _Names("frame", "NominalCardiacTriggerDelayTime", index, "RRIntervalTimeNominal")
            what = f"multi-frame file {multi.name}, {len(frames)} frames"
            sources = [(multi, k) for k in range(len(frames))]
        else:
            frames, names, at = [_frame_tags(headers[p]) for p in files], CLASSIC, where
            what, sources = f"{len(files)} files", [(p, 0) for p in files]
        number = frames[0].get("SeriesNumber", "without number")
        label = f"series {number} ({what}, SeriesInstanceUID {uid or 'missing'})"
        candidates.append(_Series(uid, frames, sources, names, label, at))
    return candidates


def _distinct(frames: list[Frame], key: str) -> int:
    """How many different values (numbers rounded to 0.01) the GEOMETRY_TAGS `key` takes over the frames."""
    return len({tuple(np.round(np.asarray(f.get(key, GEOMETRY_TAGS[key]), float), 2)) for f in frames})


def _series_problem(series: _Series) -> str:
    """Why a candidate is not a single-slice cine ("" if it is)."""
    frames, names = series.frames, series.names
    for key, default in GEOMETRY_TAGS.items():
        try:
            np.asarray([f.get(key, default) for f in frames], float)
        except (ValueError, TypeError):
            values = sorted({str(f.get(key, default)) for f in frames})
            return f"{key} is not {len(default)} numbers in every {names.frame} (values {', '.join(values[:3])})"
    instance = [f.get("InstanceNumber") for f in frames]
    positions = _distinct(frames, "ImagePositionPatient")
    problems = [
        (len(frames) < MIN_FRAMES, f"only {len(frames)} frame(s); a cine needs at least {MIN_FRAMES}"),
        (positions > 1, f"{positions} slice positions (a 3D volume)"),
        (None in instance, f"{instance.count(None)} {names.frame}(s) without {names.index}"),
        (len(set(instance)) < len(instance), f"duplicate {names.index}"),
        (_distinct(frames, "ImageOrientationPatient") > 1, "ImageOrientationPatient changes between frames"),
        (_distinct(frames, "PixelSpacing") > 1, "PixelSpacing changes between frames"),
        (len({(f.get("Rows"), f.get("Columns")) for f in frames}) > 1, "frames of different sizes (Rows, Columns)"),
        (any(int(f.get("SamplesPerPixel") or 1) != 1 for f in frames), "colour frames (SamplesPerPixel not 1)"),
    ]
    return next((text for bad, text in problems if bad), "")


def _series_key(frames: list[Frame]) -> tuple[bool, int]:
    """Preference among cine series: original (not derived) images first, then the latest (highest SeriesNumber)."""
    return "DERIVED" not in str(frames[0].get("ImageType", "")), int(frames[0].get("SeriesNumber") or 0)


def _choose_series(candidates: list[_Series], where: str) -> tuple[_Series, str]:
    """The candidate to read and a note naming the others ("" where there is one): of those that are single-slice
    cines, the one `_series_key` prefers; CineError where none is."""
    problems = [_series_problem(s) for s in candidates]
    if len(candidates) == 1 and problems[0]:
        raise CineError(f"{candidates[0].where}: {problems[0]}; expected {EXPECTED}")
    fits = sorted((k for k, problem in enumerate(problems) if not problem),
                  key=lambda k: (_series_key(candidates[k].frames), candidates[k].uid, candidates[k].label))
    if not fits:
        raise CineError(f"{where}: none of the {len(candidates)} DICOM series in the folder is {EXPECTED}: "
                        + "; ".join(f"{s.label}: {problem}" for s, problem in zip(candidates, problems)))
    others = [s.label + (f" ({problem})" if problem else "") for k, (s, problem) in enumerate(zip(candidates, problems))
              if k != fits[-1]]
    chosen = candidates[fits[-1]]
    note = f"{len(candidates)} DICOM series in the folder: read {chosen.label}; ignored {'; '.join(others)}"
    return chosen, note if others else ""


def _decoders(uid: pydicom.uid.UID, bits_stored: int) -> tuple[str, ...]:
    """The installed pydicom plugins that decode transfer syntax `uid` at `bits_stored` bits."""
    try:
        plugins = get_decoder(uid).available_plugins
    except NotImplementedError:  # pydicom has no decoder for this syntax at all
        return ()
    twelve_bit = uid == JPEGExtended12Bit and bits_stored > 8  # Pillow's libjpeg decodes 8-bit JPEG only
    return tuple(p for p in plugins if not (twelve_bit and p == "pillow"))


def _check_decodable(headers: dict[Path, pydicom.Dataset], where: str) -> None:
    """CineError naming the transfer syntax of a compressed file that no installed pydicom decoder reads."""
    for path, header in headers.items():
        uid = getattr(header, "file_meta", {}).get("TransferSyntaxUID")  # dir() would list every element per file
        with reading(_named(where, path), f"unknown transfer syntax {uid}"):
            if uid is None or not uid.is_compressed or _decoders(uid, int(header.get("BitsStored") or 0)):
                continue
        raise CineError(f"{_named(where, path)}: unsupported compressed transfer syntax {uid.name} ({uid}): no "
                        "installed pixel data decoder reads it (pydicom plugins that may: python-gdcm, pylibjpeg "
                        "with pylibjpeg-libjpeg)")


def _frame_order(frames: list[Frame], names: _Names, where: str) -> tuple[np.ndarray, str]:
    """Frame order (TriggerTime, InstanceNumber breaking ties) and a note on odd timing ("" if none); CineError where
    TriggerTime is in some frames only, or frames repeat one (two acquisitions mixed)."""
    instance = np.array([int(f["InstanceNumber"]) for f in frames])
    present = sum("TriggerTime" in f for f in frames)
    if 0 < present < len(frames):
        raise CineError(f"{where}: {names.trigger} in {present} of {len(frames)} {names.frame}s; expected in all or "
                        "none")
    trigger = np.array([float(f.get("TriggerTime", 0.0)) for f in frames])
    order = np.lexsort((instance, trigger))
    times = trigger[order]
    if np.ptp(times) == 0:  # no timing: InstanceNumber order
        return order, ""
    repeats = len(times) - len(np.unique(times))
    if repeats:
        raise CineError(f"{where}: {repeats} frame(s) repeat a {names.trigger}; expected one frame per cardiac phase")
    steps, notes = np.diff(times), []
    if not np.array_equal(order, np.argsort(instance)):
        notes.append(f"{names.index} order differs from {names.trigger} order: frames ordered by {names.trigger}")
    if steps.max() >= UNEVEN_STEP * np.median(steps):
        notes.append(f"uneven {names.trigger} steps ({steps.min():g} to {steps.max():g} ms): a frame may be missing")
    return order, "; ".join(notes)


def _dicom_geometry(frame: Frame, where: str) -> tuple[tuple[float, float], np.ndarray]:
    """Pixel size (X, Y) and RAS affine of a frame stored as (X = columns, Y = rows), the affine as MONAI's
    PydicomReader has it: X along the row direction (ImageOrientationPatient[:3]) by the column spacing, Y along the
    column direction by the row spacing, origin ImagePositionPatient; the slice axis along their normal by
    SliceThickness (1 mm where absent)."""
    if "PixelSpacing" not in frame:
        raise CineError(f"{where}: no PixelSpacing")
    dy, dx = (float(v) for v in frame["PixelSpacing"])  # (between rows, between columns) = (along Y, along X)
    orientation = np.asarray(frame.get("ImageOrientationPatient", GEOMETRY_TAGS["ImageOrientationPatient"]), float)
    position = np.asarray(frame.get("ImagePositionPatient", GEOMETRY_TAGS["ImagePositionPatient"]), float)
    thickness = float(frame.get("SliceThickness", 1.0) or 1.0)
    row, column = orientation[:3], orientation[3:]
    lps = np.eye(4)
    lps[:3] = np.column_stack([row * dx, column * dy, np.cross(row, column) * thickness, position])
    return (dx, dy), np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM's LPS to NIfTI's RAS


def _dicom_pixels(series: _Series, order: np.ndarray, where: str) -> np.ndarray:
    """(X, Y, T) float32 frames of `series` in `order`, each rescaled by its RescaleSlope and RescaleIntercept."""
    stored = {}
    for path in dict.fromkeys(p for p, _ in series.sources):
        with reading(_named(where, path), "cannot read the DICOM pixel data, file truncated or corrupt"):
            ds = pydicom.dcmread(path)
            stored[path] = ds.pixel_array.reshape(-1, int(ds.Rows), int(ds.Columns))  # (frames, rows, columns)
    with reading(where, "cannot read the DICOM pixel data, a file truncated or corrupt"):
        frames = []
        for i in order:
            (path, k), tags = series.sources[i], series.frames[i]
            slope, intercept = float(tags.get("RescaleSlope", 1.0)), float(tags.get("RescaleIntercept", 0.0))
            frames.append(stored[path][k].T.astype(np.float32) * np.float32(slope) + np.float32(intercept))
        return np.stack(frames, axis=-1)


def read_dicom(path: Path, where: str) -> Cine:
    """One slice over time from a DICOM folder (one series or multi-frame file of it, `_choose_series`) or an enhanced
    multi-frame file, its frames by TriggerTime then InstanceNumber (or the enhanced equivalents, ENHANCED_TAGS)."""
    headers = _dicom_headers(path, where)
    with reading(where, "malformed DICOM header"):
        series, series_note = _choose_series(_candidates(headers, where), where)
        order, timing_note = _frame_order(series.frames, series.names, series.where)
        spacing, affine = _dicom_geometry(series.frames[order[0]], _named(series.where, series.sources[order[0]][0]))
        interval = _dicom_frame_interval([series.frames[i] for i in order], series.names, series.where)
    _check_decodable({p: headers[p] for p in dict.fromkeys(p for p, _ in series.sources)}, where)
    array = _dicom_pixels(series, order, where)
    note = "; ".join(n for n in (series_note, timing_note) if n)
    return Cine(array, spacing, interval, affine, note)
