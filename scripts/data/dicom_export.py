"""Writing a synthetic 2D+time cine as a DICOM MR series (classic MR Image Storage, one file per frame) that
scripts.data.cine_files reads back: geometry from the cine's NIfTI affine, marked synthetic, no patient identity."""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_ROOT_UID, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pydicom.valuerep import DSfloat

from scripts.data.orientation import RAS_TO_LPS
from scripts.runtime.files import atomic_folder

SCALE = 50_000  # stored = round(value * SCALE) for values in [0, 1]; RescaleSlope 1 / SCALE = 0.00002
EMPTY = ("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
         "AccessionNumber", "PositionReferenceIndicator", "ScanOptions")  # required (type 2) but left empty


def _ds(values: Sequence[float] | float) -> list[DSfloat] | DSfloat:
    """Decimal-string value(s) of at most 16 characters (DICOM's limit for DS)."""
    if isinstance(values, (int, float, np.floating)):
        return DSfloat(float(values), auto_format=True)
    return [DSfloat(float(v), auto_format=True) for v in values]


def plane_tags(affine: np.ndarray) -> dict:
    """ImageOrientationPatient, ImagePositionPatient, PixelSpacing and SliceThickness of a file whose columns run
    along X and rows along Y of a cine with this NIfTI (RAS) affine."""
    lps = RAS_TO_LPS @ np.asarray(affine, float)[:3]  # (3, 4): X, Y, slice directions and origin in LPS
    dx, dy, thickness = np.linalg.norm(lps[:, :3], axis=0)
    return {"ImageOrientationPatient": _ds([*lps[:, 0] / dx, *lps[:, 1] / dy]),
            "ImagePositionPatient": _ds(lps[:, 3]), "PixelSpacing": _ds([dy, dx]),  # (between rows, between columns)
            "SliceThickness": _ds(thickness)}


def series_uids(content: str, frames: int) -> dict[str, str | list[str]]:
    """Study, series, frame-of-reference and per-frame SOP instance UIDs: pydicom's generate_uid under its root, hashed
    from `content` (a digest of everything the series holds), so the same cine gives the same UIDs, another cine
    others."""
    def uid(role: str) -> str:
        return generate_uid(PYDICOM_ROOT_UID, entropy_srcs=[f"{content}|{role}"])
    return {"StudyInstanceUID": uid("study"), "SeriesInstanceUID": uid("series"),
            "FrameOfReferenceUID": uid("frame of reference"), "SOPInstanceUID": [uid(f"frame {t}") for t in range(frames)]}


def content_digest(cine: np.ndarray, affine: np.ndarray, frame_interval_s: float, description: str,
                   patient_id: str) -> str:
    """SHA-256 of a series' pixels, geometry, timing and text."""
    digest = hashlib.sha256(np.ascontiguousarray(cine, np.float32).tobytes())
    digest.update(np.asarray(affine, np.float64).tobytes())
    digest.update(f"{cine.shape}|{frame_interval_s!r}|{description}|{patient_id}".encode())
    return digest.hexdigest()


def series_header(affine: np.ndarray, frame_interval_s: float, frames: int, description: str, patient_id: str,
                  uids: dict) -> Dataset:
    """The tags every frame shares: synthetic MR, geometry, timing, pixel format and scale."""
    ds = Dataset()
    ds.SOPClassUID, ds.Modality = MRImageStorage, "MR"
    ds.ImageType, ds.SyntheticData = ["DERIVED", "SECONDARY"], "YES"
    ds.PatientName = ds.PatientID = patient_id
    for key in EMPTY:
        setattr(ds, key, "")
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["StudyInstanceUID"], uids["SeriesInstanceUID"]
    ds.FrameOfReferenceUID = uids["FrameOfReferenceUID"]
    ds.SeriesNumber, ds.SeriesDescription, ds.Manufacturer = 1, description, "CPGG cine bundle (synthetic)"
    ds.ImageComments = "Synthetic image made by a generative model; not an acquisition of any person"
    ds.ScanningSequence, ds.SequenceVariant, ds.MRAcquisitionType = "RM", "NONE", "2D"  # research mode: no sequence
    interval_ms = 1000.0 * frame_interval_s
    ds.CardiacNumberOfImages, ds.NominalInterval = frames, round(frames * interval_ms)  # IS: whole ms
    ds.HeartRate = round(60_000.0 / (frames * interval_ms))
    for key, value in plane_tags(affine).items():
        setattr(ds, key, value)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = _ds(1.0 / SCALE), _ds(0.0), "US"
    ds.WindowCenter, ds.WindowWidth = _ds(0.5), _ds(1.0)
    return ds


def frame_dataset(header: Dataset, frame: np.ndarray, t: int, frame_interval_s: float, sop_uid: str) -> Dataset:
    """Frame `t` (an (X, Y) image of values in [0, 1]) as a complete DICOM file dataset."""
    ds = Dataset()
    ds.update(header)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.InstanceNumber, ds.TriggerTime = t + 1, _ds(1000.0 * frame_interval_s * t)
    pixels = np.rint(np.clip(frame.T, 0.0, 1.0) * SCALE).astype("<u2")  # (rows = Y, columns = X)
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.tobytes()
    return ds


def remove_series(folder: Path) -> None:
    """Remove a series folder if there is one: renamed to a temporary name first (atomic), so that a kill midway
    never leaves a partial series under the series' name."""
    if folder.is_dir():
        tmp = folder.with_name(f".tmp-{uuid.uuid4().hex}-{folder.name}")
        os.rename(folder, tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def write_dicom_cine(folder: str | Path, cine: np.ndarray, affine: np.ndarray, frame_interval_s: float,
                     description: str, patient_id: str) -> Path:
    """Write an (X, Y, T) cine of values in [0, 1] with its NIfTI affine as an MR series `folder`/IM0001.dcm... (one
    file per frame, TriggerTime from `frame_interval_s`; PatientName and PatientID `patient_id`, SeriesDescription
    `description`), atomically: the folder appears complete or not at all."""
    folder, frames = Path(folder), cine.shape[2]
    uids = series_uids(content_digest(cine, affine, frame_interval_s, description, patient_id), frames)
    header = series_header(affine, frame_interval_s, frames, description, patient_id, uids)
    with atomic_folder(folder) as tmp:
        for t in range(frames):
            ds = frame_dataset(header, cine[:, :, t], t, frame_interval_s, uids["SOPInstanceUID"][t])
            ds.save_as(tmp / f"IM{t + 1:04d}.dcm", enforce_file_format=True)
    return folder
