"""Reading 2D+time cines (NIfTI, or a DICOM series folder) with validation, in the canonical in-plane orientation
(scripts.data.orientation), and writing them as NIfTI. A cine is (X, Y, T) in NIfTI index order (X = DICOM columns,
Y = rows), spacing (mm), frame interval (s), affine."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from monai.data import PydicomReader
from pydicom.pixels import get_decoder

from scripts.data.orientation import canonical_affine, describe, in_plane_codes, reorient
from scripts.runtime.files import atomic_write

MIN_FRAMES = 10
MAX_LABEL = 5  # labels 0 background, 1 LV, 2 Myo, 3 RV, 4 LA, 5 RA
LV_LABEL = 1
EXPECTED = "a 2D cine X x Y x 1 x T"
GEOMETRY_TAGS = {"ImagePositionPatient": [0, 0, 0], "ImageOrientationPatient": [1, 0, 0, 0, 1, 0],
                 "PixelSpacing": [1, 1]}  # DICOM geometry tags and the value assumed where a file has none
UNEVEN_STEP = 2.0  # a TriggerTime step this many times the median one: a missing frame (two steps in one)
DEFLATE_MAX_RATIO = 1032  # the most a deflate (gzip) stream can expand: a format limit (RFC 1951), not a measurement


class CineError(ValueError):
    """A cine or label cine that cannot be used; the message names the file (and subject) and the problem, `path` the
    file (`load_cine` sets it where the raiser did not)."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = str(path) if path else None


@dataclass(frozen=True)
class Cine:
    """One 2D+time cine: `array` (X, Y, T) (float32; uint8 for label cines from `load_subject`); `note`: what the
    reader chose or found odd but usable (e.g. which of several DICOM series it read), "" if nothing; `orientation`:
    how the loaders turned the stored array into the canonical orientation (orientation.describe), "" before."""

    array: np.ndarray
    spacing_mm: tuple[float, float]
    frame_interval_s: float
    affine: np.ndarray
    note: str = ""
    orientation: str = ""


def one_line(error: BaseException) -> str:
    """`<type>: <message>` of an exception on one line."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


@contextmanager
def reading(where: str, what: str) -> Iterator[None]:
    """Turn any error in the block (a CineError or MemoryError aside) into a CineError `<where>: <what> (<error>)`."""
    try:
        yield
    except (CineError, MemoryError):
        raise
    except Exception as e:  # a corrupt file can raise anything inside nibabel or pydicom
        raise CineError(f"{where}: {what} ({one_line(e)})") from e


# ------------------------------------------------------------------------------------------------------------ reading
def where_of(path: Path, subject: str) -> str:
    """How messages name a file: `subject '<subject>': <path>`, or the path alone without a subject."""
    return f"subject {subject!r}: {path}" if subject else str(path)


def frame_interval_from_header(header: nib.Nifti1Header) -> float:
    """Frame interval (s) from pixdim[4]: seconds, unless the time unit is msec/usec, or unknown and > 1 (then ms)."""
    value = float(header["pixdim"][4])
    unit = header.get_xyzt_units()[1]
    if unit == "msec" or (unit == "unknown" and value > 1.0):
        return value / 1000.0
    return value / 1e6 if unit == "usec" else value


def _xyt(shape: tuple[int, ...], where: str) -> tuple[int, int, int]:
    """(X, Y, T) of an (X, Y, 1, T[, 1...]) image shape; CineError naming the shape found for anything else."""
    dims = list(shape)
    while len(dims) > 4 and dims[-1] == 1:
        dims.pop()
    if len(dims) == 4 and dims[2] == 1:
        return dims[0], dims[1], dims[3]
    kind = {2: "a single 2D frame", 3: "a 3D volume with no time axis"}.get(
        len(dims), f"{dims[2]} slices over time (a 3D volume)" if len(dims) == 4 else f"a {len(dims)}D image")
    raise CineError(f"{where}: found shape {tuple(shape)}, {kind}; expected {EXPECTED}")


def check_data_size(path: Path, image: nib.Nifti1Image, where: str) -> None:
    """CineError where the header claims more voxel bytes than the file can hold (corrupt header, truncated file),
    checked before any voxel is read."""
    need = math.prod(image.shape) * image.header.get_data_dtype().itemsize
    room = path.stat().st_size - int(image.header.get("vox_offset", 0))
    if path.suffix == ".gz":
        room *= DEFLATE_MAX_RATIO
    if need > room:
        raise CineError(f"{where}: the header claims {image.shape} voxels of {image.header.get_data_dtype()} "
                        f"({need} bytes), more than the file can hold; header corrupt or file truncated")


def _read_nifti(path: Path, where: str) -> Cine:
    with reading(where, "cannot read the image, file truncated or corrupt"):
        image = nib.load(path)
        shape = _xyt(image.shape, where)
        check_data_size(path, image, where)
        data = image.get_fdata(dtype=np.float32).reshape(shape)
        spacing = tuple(float(v) for v in image.header["pixdim"][1:3])
        affine, note = np.asarray(image.affine), ""
        if not (image.header.get("qform_code", 0) or image.header.get("sform_code", 0)):  # nibabel's guess flips X
            affine = canonical_affine(spacing, float(image.header["pixdim"][3]))
            note = "no orientation in the header (qform_code and sform_code 0): array order kept as stored"
        return Cine(data, spacing, frame_interval_from_header(image.header), affine, note)


def _dicom_frame_interval(headers: list[pydicom.Dataset], where: str) -> float:
    """From TriggerTime steps (ms), else NominalInterval (ms) or HeartRate (bpm) over the number of frames."""
    n = len(headers)
    trigger = np.array([float(h.get("TriggerTime", np.nan)) for h in headers])
    if np.isfinite(trigger).all() and trigger[-1] > trigger[0]:
        return float(trigger[-1] - trigger[0]) / (n - 1) / 1000.0
    nominal, rate = float(headers[0].get("NominalInterval", 0) or 0), float(headers[0].get("HeartRate", 0) or 0)
    if nominal > 0:
        return nominal / n / 1000.0
    if rate > 0:
        return 60.0 / rate / n
    raise CineError(f"{where}: no TriggerTime, NominalInterval or HeartRate: cannot tell the frame interval")


def _dicom_headers(folder: Path, where: str) -> dict[Path, pydicom.Dataset]:
    """Headers (no pixel data) of the DICOM files of a folder, by path, sorted by name."""
    headers = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and pydicom.misc.is_dicom(p)):
        with reading(where, f"{path.name}: cannot read the DICOM header, file truncated or corrupt"):
            headers[path] = pydicom.dcmread(path, stop_before_pixels=True)
    if not headers:
        raise CineError(f"{where}: no DICOM file in the folder; expected one file per frame of {EXPECTED}")
    return headers


def _distinct(headers: list[pydicom.Dataset], key: str) -> int:
    """How many different values (numbers rounded to 0.01) the GEOMETRY_TAGS `key` takes over the headers."""
    return len({tuple(np.round(np.asarray(h.get(key, GEOMETRY_TAGS[key]), float), 2)) for h in headers})


def _series_problem(headers: list[pydicom.Dataset]) -> str:
    """Why the headers of one series are not a single-slice cine, one file per frame ("" if they are)."""
    for key, default in GEOMETRY_TAGS.items():
        try:
            np.asarray([h.get(key, default) for h in headers], float)
        except (ValueError, TypeError):
            values = sorted({str(h.get(key, default)) for h in headers})
            return f"{key} is not {len(default)} numbers in every file (values {', '.join(values[:3])})"
    instance = [h.get("InstanceNumber") for h in headers]
    positions = _distinct(headers, "ImagePositionPatient")
    problems = [
        (len(headers) < MIN_FRAMES, f"only {len(headers)} frame(s); a cine needs at least {MIN_FRAMES}"),
        (None in instance, f"{instance.count(None)} file(s) without InstanceNumber"),
        (len(set(instance)) < len(instance), "duplicate InstanceNumber"),
        (positions > 1, f"{positions} slice positions (a 3D volume)"),
        (_distinct(headers, "ImageOrientationPatient") > 1, "ImageOrientationPatient changes between frames"),
        (_distinct(headers, "PixelSpacing") > 1, "PixelSpacing changes between frames"),
        (len({(h.get("Rows"), h.get("Columns")) for h in headers}) > 1, "frames of different sizes (Rows, Columns)"),
    ]
    return next((text for bad, text in problems if bad), "")


def _series_key(headers: list[pydicom.Dataset]) -> tuple[bool, int]:
    """Preference among cine series: original (not derived) images first, then the latest (highest SeriesNumber)."""
    return "DERIVED" not in str(headers[0].get("ImageType", "")), int(headers[0].get("SeriesNumber") or 0)


def _choose_series(headers: dict[Path, pydicom.Dataset], where: str) -> tuple[list[Path], str]:
    """Files of the series to read (grouped by SeriesInstanceUID) and a note naming the others ("" for one series):
    of the series that are single-slice cines, the one `_series_key` prefers; CineError where none is."""
    groups: dict[str, list[Path]] = {}
    for path, header in headers.items():
        groups.setdefault(str(header.get("SeriesInstanceUID", "")), []).append(path)
    series = {uid: [headers[p] for p in files] for uid, files in groups.items()}
    problems = {uid: _series_problem(hs) for uid, hs in series.items()}
    if len(groups) == 1 and problems[next(iter(groups))]:
        raise CineError(f"{where}: {problems[next(iter(groups))]}; expected {EXPECTED}")

    def name(uid: str) -> str:
        number = series[uid][0].get("SeriesNumber", "without number")
        return f"series {number} ({len(groups[uid])} files, SeriesInstanceUID {uid or 'missing'})"

    fits = sorted((uid for uid in groups if not problems[uid]), key=lambda uid: (_series_key(series[uid]), uid))
    if not fits:
        raise CineError(f"{where}: none of the {len(groups)} DICOM series in the folder is {EXPECTED}: "
                        + "; ".join(f"{name(uid)}: {problems[uid]}" for uid in groups))
    others = [f"{name(uid)}" + (f" ({problems[uid]})" if problems[uid] else "") for uid in groups if uid != fits[-1]]
    note = f"{len(groups)} DICOM series in the folder: read {name(fits[-1])}; ignored {'; '.join(others)}"
    return groups[fits[-1]], note if others else ""


def _check_decodable(headers: dict[Path, pydicom.Dataset], where: str) -> None:
    """CineError naming the transfer syntax of a compressed file that no installed pydicom decoder reads."""
    for path, header in headers.items():
        uid = getattr(header, "file_meta", {}).get("TransferSyntaxUID")  # dir() would list every element per file
        with reading(where, f"{path.name}: unknown transfer syntax {uid}"):
            if uid is None or not uid.is_compressed:
                continue
            try:
                available = get_decoder(uid).is_available
            except NotImplementedError:  # pydicom has no decoder for this syntax at all
                available = False
        if not available:
            raise CineError(f"{where}: {path.name}: unsupported compressed transfer syntax {uid.name} ({uid}): no "
                            f"installed pixel data decoder reads it (pydicom plugins: pylibjpeg, gdcm)")


def _frame_order(headers: list[pydicom.Dataset], where: str) -> tuple[np.ndarray, str]:
    """Frame order (TriggerTime, InstanceNumber breaking ties) and a note on odd timing ("" if none); CineError where
    TriggerTime is in some files only, or frames repeat one (two acquisitions mixed)."""
    instance = np.array([int(h.InstanceNumber) for h in headers])
    present = sum("TriggerTime" in h for h in headers)
    if 0 < present < len(headers):
        raise CineError(f"{where}: TriggerTime in {present} of {len(headers)} files; expected in all or none")
    trigger = np.array([float(h.get("TriggerTime", 0.0)) for h in headers])
    order = np.lexsort((instance, trigger))
    times = trigger[order]
    if np.ptp(times) == 0:  # no timing: InstanceNumber order
        return order, ""
    repeats = len(times) - len(np.unique(times))
    if repeats:
        raise CineError(f"{where}: {repeats} frame(s) repeat a TriggerTime; expected one frame per cardiac phase")
    steps, notes = np.diff(times), []
    if not np.array_equal(order, np.argsort(instance)):
        notes.append("InstanceNumber order differs from TriggerTime order: frames ordered by TriggerTime")
    if steps.max() >= UNEVEN_STEP * np.median(steps):
        notes.append(f"uneven TriggerTime steps ({steps.min():g} to {steps.max():g} ms): a frame may be missing")
    return order, "; ".join(notes)


def _read_dicom_series(folder: Path, where: str) -> Cine:
    """One slice over time, one file per frame, via MONAI's PydicomReader: one series of the folder
    (`_choose_series`), its frames by TriggerTime then InstanceNumber."""
    all_headers = _dicom_headers(folder, where)
    with reading(where, "malformed DICOM header"):
        files, series_note = _choose_series(all_headers, where)
        headers = [all_headers[p] for p in files]
        order, timing_note = _frame_order(headers, where)
        stacked = np.argsort(np.argsort([int(h.InstanceNumber) for h in headers]))[order]  # reader: InstanceNumber
        orientation = np.asarray(headers[0].get("ImageOrientationPatient", GEOMETRY_TAGS["ImageOrientationPatient"]),
                                 float)
        thickness = float(headers[0].get("SliceThickness", 1.0) or 1.0)
        if "PixelSpacing" not in headers[0]:
            raise CineError(f"{where}: no PixelSpacing in {files[0].name}")
        dy, dx = (float(v) for v in headers[0].PixelSpacing)  # (between rows, between columns) = (along Y, along X)
        interval = _dicom_frame_interval([headers[i] for i in order], where)
    _check_decodable({p: all_headers[p] for p in files}, where)
    with reading(where, "cannot read the DICOM pixel data, a file truncated or corrupt"):
        reader = PydicomReader(fname_regex="(?:" + "|".join(re.escape(str(p)) for p in files) + r")\Z")
        data, meta = reader.get_data(reader.read(folder))  # stacked by InstanceNumber, (columns, rows, files)
        array = np.asarray(data, dtype=np.float32)[:, :, stacked]
    affine = np.array(meta["affine"], dtype=np.float64)  # RAS, with a zero slice column: all frames at one position
    normal_lps = np.cross(orientation[:3], orientation[3:])
    affine[:3, 2] = normal_lps * [-1, -1, 1] * thickness
    note = "; ".join(n for n in (series_note, timing_note) if n)
    return Cine(array, (dx, dy), interval, affine, note)


def _validate(cine: Cine, where: str) -> None:
    frames = cine.array.shape[2]
    if frames < MIN_FRAMES:
        raise CineError(f"{where}: only {frames} frame(s); a cine needs at least {MIN_FRAMES}")
    n_nan, n_inf = int(np.isnan(cine.array).sum()), int(np.isinf(cine.array).sum())
    if n_nan or n_inf:
        raise CineError(f"{where}: {n_nan} NaN and {n_inf} infinite voxel(s)")
    if not all(np.isfinite(s) and s > 0 for s in cine.spacing_mm):
        raise CineError(f"{where}: pixel spacing must be positive, got {cine.spacing_mm} mm")
    if not (np.isfinite(cine.frame_interval_s) and cine.frame_interval_s > 0):
        raise CineError(f"{where}: frame interval must be positive, got {cine.frame_interval_s} s")


def load_stored(path: str | Path, subject: str) -> tuple[Cine, str]:
    """A validated cine as stored and the directions its affine gives its X and Y axes (orientation.in_plane_codes);
    CineError (its `path` set) for any problem."""
    path = Path(path)
    where = where_of(path, subject)
    try:
        if not path.exists():
            raise CineError(f"{where}: file not found")
        with reading(where, "cannot read the cine"):
            cine = _read_dicom_series(path, where) if path.is_dir() else _read_nifti(path, where)
            _validate(cine, where)
        with reading(where, "cannot orient the cine"):
            codes = in_plane_codes(cine.affine)
    except CineError as error:
        error.path = error.path or str(path)
        raise
    return cine, codes


def reoriented(cine: Cine, codes: str) -> Cine:
    """`cine`, stored toward `codes`, in the canonical orientation, its affine and pixel size to match."""
    array, affine, spacing = reorient(cine.array, cine.affine, cine.spacing_mm, codes)
    return replace(cine, array=array, affine=affine, spacing_mm=spacing, orientation=describe(codes))


def load_cine(path: str | Path, subject: str = "") -> Cine:
    """Load and validate a cine: a NIfTI file (X x Y x 1 x T) or a DICOM series folder (one file per frame), in the
    canonical in-plane orientation (scripts.data.orientation)."""
    return reoriented(*load_stored(path, subject))


def check_label_values(values: np.ndarray, where: str, path: str | Path) -> None:
    """CineError (naming `path`) for label values that are not integers 0..MAX_LABEL."""
    fractional = values[values != np.rint(values)]
    if fractional.size:
        raise CineError(f"{where}: {fractional.size} non-integer label value(s), e.g. {fractional[0]}; "
                        f"expected integer labels 0..{MAX_LABEL}", path)
    outside = np.unique(values[(values < 0) | (values > MAX_LABEL)])
    if outside.size:
        raise CineError(f"{where}: label values outside 0..{MAX_LABEL}: {outside.astype(int).tolist()}", path)


def orientation_note(label_codes: str, codes: str) -> str:
    """A note where a label's affine orients it (`label_codes`) otherwise than its image's (`codes`), else ""."""
    if label_codes == codes:
        return ""
    return (f"its affine orients it {describe(label_codes)}, its image {describe(codes)}: the image's reorientation "
            "was applied to both (voxels taken to correspond)")


def load_subject(image_path: str | Path, label_path: str | Path, subject: str) -> tuple[Cine, Cine]:
    """Load an image cine and its label cine (returned as uint8), checking that they match and the labels are usable;
    both get the image's reorientation (a label whose own affine orients otherwise is noted). Frames without any
    label are allowed (partial labels: scripts.data.labels)."""
    (image, codes), (label, label_codes) = load_stored(image_path, subject), load_stored(label_path, subject)
    where = where_of(Path(label_path), subject)
    if image.array.shape != label.array.shape:
        raise CineError(f"subject {subject!r}: image {image_path} has shape {image.array.shape} (X, Y, T) but label "
                        f"{label_path} has shape {label.array.shape}", label_path)
    values = label.array
    check_label_values(values, where, label_path)
    if not values.any():
        raise CineError(f"{where}: label cine is empty (no foreground in any frame)", label_path)
    if not (values == LV_LABEL).any():
        raise CineError(f"{where}: label cine has no LV (label {LV_LABEL}) in any frame", label_path)
    label = replace(label, note="; ".join(n for n in (label.note, orientation_note(label_codes, codes)) if n))
    return reoriented(image, codes), reoriented(replace(label, array=values.astype(np.uint8)), codes)


def write_cine(path: str | Path, array: np.ndarray, affine: np.ndarray, frame_interval_s: float,
               description: str = "") -> None:
    """Write an (X, Y, T) cine atomically as NIfTI X x Y x 1 x T with `affine` (RAS; qform and sform, code 1), its
    column lengths as pixel size and slice thickness (mm), the frame interval (s) and `description` (descrip, at most
    80 bytes)."""
    data = np.ascontiguousarray(array[:, :, None, :])  # (X, Y, 1, T)
    image = nib.Nifti1Image(data, affine)
    image.header.set_zooms((*np.linalg.norm(np.asarray(affine)[:3, :3], axis=0), frame_interval_s))
    image.header.set_xyzt_units("mm", "sec")
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    image.header["descrip"] = description
    with atomic_write(path) as tmp:
        nib.save(image, tmp)
