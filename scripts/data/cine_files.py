"""Reading 2D+time cines (NIfTI here, DICOM through scripts.data.dicom_read) with validation, in the canonical
in-plane orientation (scripts.data.orientation), and writing them as NIfTI. A cine is (X, Y, T) in NIfTI index order
(X = DICOM columns, Y = rows), spacing (mm), frame interval (s), affine."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom

from scripts.data.cine import EXPECTED, LV_LABEL, MAX_LABEL, MIN_FRAMES, Cine, CineError, reading
from scripts.data.dicom_read import read_dicom
from scripts.data.orientation import canonical_affine, describe, in_plane_codes, reorient
from scripts.runtime.files import atomic_write

DEFLATE_MAX_RATIO = 1032  # the most a deflate (gzip) stream can expand: a format limit (RFC 1951), not a measurement


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
            dicom = path.is_dir() or pydicom.misc.is_dicom(path)
            cine = read_dicom(path, where) if dicom else _read_nifti(path, where)
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
    """Load and validate a cine: a NIfTI file (X x Y x 1 x T), a DICOM folder (a series of one file per frame, or an
    enhanced multi-frame file) or an enhanced multi-frame DICOM file, in the canonical in-plane orientation
    (scripts.data.orientation)."""
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
