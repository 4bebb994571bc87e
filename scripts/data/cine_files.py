"""Reading 2D+time cines (NIfTI, or a DICOM series folder) with validation, and atomic file writes.
A cine is (X, Y, T) in NIfTI index order (X = DICOM columns, Y = rows), spacing (mm), frame interval (s), affine."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from monai.data import PydicomReader
from nibabel.filebasedimages import ImageFileError

MIN_FRAMES = 10
MAX_LABEL = 5  # labels 0 background, 1 LV, 2 Myo, 3 RV, 4 LA, 5 RA
LV_LABEL = 1
EXPECTED = "a 2D cine X x Y x 1 x T"


class CineError(ValueError):
    """A cine or label cine that cannot be used; the message names the file (and subject) and the problem."""


@dataclass(frozen=True)
class Cine:
    """One 2D+time cine: `array` (X, Y, T) (float32; uint8 for label cines from `load_subject`)."""

    array: np.ndarray
    spacing_mm: tuple[float, float]
    frame_interval_s: float
    affine: np.ndarray


# ------------------------------------------------------------------------------------------------------------ reading
def _where(path: Path, subject: str) -> str:
    return f"subject {subject!r}: {path}" if subject else str(path)


def frame_interval_from_header(header: nib.Nifti1Header) -> float:
    """Frame interval (s) from pixdim[4]: seconds, unless the time unit is msec/usec, or unknown and > 1 (then ms)."""
    value = float(header["pixdim"][4])
    unit = header.get_xyzt_units()[1]
    if unit == "msec" or (unit == "unknown" and value > 1.0):
        return value / 1000.0
    return value / 1e6 if unit == "usec" else value


def _as_xyt(data: np.ndarray, where: str) -> np.ndarray:
    """(X, Y, 1, T[, 1...]) -> (X, Y, T); CineError naming the shape found for anything else."""
    shape = data.shape
    while data.ndim > 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 4 and data.shape[2] == 1:
        return data[:, :, 0]
    kind = {2: "a single 2D frame", 3: "a 3D volume with no time axis"}.get(
        data.ndim, f"{data.shape[2]} slices over time (a 3D volume)" if data.ndim == 4 else f"a {data.ndim}D image")
    raise CineError(f"{where}: found shape {shape}, {kind}; expected {EXPECTED}")


def _read_nifti(path: Path, where: str) -> Cine:
    try:
        img = nib.load(path)
        data = img.get_fdata(dtype=np.float32)
    except (OSError, EOFError, zlib.error, ValueError, ImageFileError) as e:
        raise CineError(f"{where}: cannot read the image, file truncated or corrupt ({type(e).__name__}: {e})") from e
    spacing = tuple(float(v) for v in img.header["pixdim"][1:3])
    return Cine(_as_xyt(data, where), spacing, frame_interval_from_header(img.header), np.asarray(img.affine))


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


def _read_dicom_series(folder: Path, where: str) -> Cine:
    """One slice over time, one file per frame, via MONAI's PydicomReader; frames by TriggerTime then InstanceNumber."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and pydicom.misc.is_dicom(p))
    if len(files) < 2:
        raise CineError(f"{where}: found {len(files)} DICOM file(s) in the folder; expected one file per frame of "
                        f"{EXPECTED}")
    try:
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
        instance = [int(h.InstanceNumber) for h in headers]
        reader = PydicomReader()
        data, meta = reader.get_data(reader.read(folder))  # stacked by InstanceNumber, (columns, rows, files)
    except (OSError, EOFError, ValueError, AttributeError, pydicom.errors.InvalidDicomError) as e:
        raise CineError(f"{where}: cannot read the DICOM series, a file truncated or corrupt or missing "
                        f"InstanceNumber ({type(e).__name__}: {e})") from e
    if len(set(instance)) < len(instance):
        raise CineError(f"{where}: duplicate InstanceNumber in the folder; expected a single series")
    positions = {tuple(np.round(np.asarray(h.get("ImagePositionPatient", [0, 0, 0]), float), 2)) for h in headers}
    if len(positions) > 1:
        raise CineError(f"{where}: the series holds {len(positions)} slice positions (a 3D volume); "
                        f"expected {EXPECTED}")
    if "PixelSpacing" not in headers[0]:
        raise CineError(f"{where}: no PixelSpacing in {files[0].name}")
    headers = [headers[i] for i in np.argsort(instance, kind="stable")]
    trigger = [float(h.get("TriggerTime", 0.0)) for h in headers]
    order = np.lexsort((np.arange(len(headers)), trigger))  # stable: InstanceNumber breaks TriggerTime ties
    headers = [headers[i] for i in order]
    affine = np.array(meta["affine"], dtype=np.float64)  # RAS, with a zero slice column: all frames at one position
    orientation = np.asarray(headers[0].get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), float)
    normal_lps = np.cross(orientation[:3], orientation[3:])
    affine[:3, 2] = normal_lps * [-1, -1, 1] * float(headers[0].get("SliceThickness", 1.0) or 1.0)
    dy, dx = (float(v) for v in headers[0].PixelSpacing)  # (between rows, between columns) = (along Y, along X)
    spacing = (dx, dy)
    array = np.asarray(data, dtype=np.float32)[:, :, order]
    return Cine(array, spacing, _dicom_frame_interval(headers, where), affine)


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


def load_cine(path: str | Path, subject: str = "") -> Cine:
    """Load and validate a cine: a NIfTI file (X x Y x 1 x T) or a DICOM series folder (one file per frame)."""
    path = Path(path)
    where = _where(path, subject)
    if not path.exists():
        raise CineError(f"{where}: file not found")
    cine = _read_dicom_series(path, where) if path.is_dir() else _read_nifti(path, where)
    _validate(cine, where)
    return cine


def load_subject(image_path: str | Path, label_path: str | Path, subject: str) -> tuple[Cine, Cine]:
    """Load an image cine and its label cine (returned as uint8), checking that they match and the labels are usable."""
    image, label = load_cine(image_path, subject), load_cine(label_path, subject)
    where = _where(Path(label_path), subject)
    if image.array.shape != label.array.shape:
        raise CineError(f"subject {subject!r}: image {image_path} has shape {image.array.shape} (X, Y, T) but label "
                        f"{label_path} has shape {label.array.shape}")
    values = label.array
    fractional = values[values != np.rint(values)]
    if fractional.size:
        raise CineError(f"{where}: {fractional.size} non-integer label value(s), e.g. {fractional[0]}; "
                        f"expected integer labels 0..{MAX_LABEL}")
    outside = np.unique(values[(values < 0) | (values > MAX_LABEL)])
    if outside.size:
        raise CineError(f"{where}: label values outside 0..{MAX_LABEL}: {outside.astype(int).tolist()}")
    if not values.any():
        raise CineError(f"{where}: label cine is empty (no foreground in any frame)")
    if not (values == LV_LABEL).any():
        raise CineError(f"{where}: label cine has no LV (label {LV_LABEL}) in any frame")
    return image, replace(label, array=values.astype(np.uint8))
