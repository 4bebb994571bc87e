"""DICOM export of synthetic cines (scripts.data.dicom_export): the tags a reader relies on, no patient identity,
deterministic UIDs, atomic series, and the round trip through pydicom and this repository's own cine reader.
That prepare accepts exported series (with a label cine of the same geometry) is in tests/test_orientation.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from scripts.data.cine_files import load_cine
from scripts.data.dicom_export import SCALE, write_dicom_cine
from scripts.data.orientation import RAS_TO_LPS
from tests.test_orientation import plane_affine

DT = 0.0186  # s
IDENTITY = ("PatientBirthDate", "PatientSex", "PatientAge", "PatientAddress", "OtherPatientIDs", "OtherPatientNames",
            "PatientBirthName", "PatientMotherBirthName", "EthnicGroup", "PatientTelephoneNumbers",
            "ReferringPhysicianName", "InstitutionName", "OperatorsName", "PerformingPhysicianName")


def small_cine(seed: int = 0) -> np.ndarray:
    """(X, Y, T) = (24, 20, 12) random values in [0, 1]."""
    return np.random.default_rng(seed).random((24, 20, 12)).astype(np.float32)


def _export(folder: Path, cine: np.ndarray, affine: np.ndarray | None = None) -> Path:
    affine = plane_affine("ukb_oblique", (1.9, 2.1)) if affine is None else affine
    return write_dicom_cine(folder, cine, affine, DT, "CPGG synthetic cine, tiny, seed 7", "G000007")


def _headers(folder: Path) -> list[Dataset]:
    return [pydicom.dcmread(p) for p in sorted(folder.iterdir())]


def test_series_tags(tmp_path: Path) -> None:
    affine = plane_affine("ukb_oblique", (1.9, 2.1))
    headers = _headers(_export(tmp_path / "G000007", small_cine(), affine))
    assert len(headers) == 12 and min(p.name for p in (tmp_path / "G000007").iterdir()) == "IM0001.dcm"
    lps = RAS_TO_LPS @ affine[:3]
    for t, ds in enumerate(headers):
        assert ds.SOPClassUID == pydicom.uid.MRImageStorage and ds.Modality == "MR"
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY"] and ds.SyntheticData == "YES"
        assert ds.SeriesDescription == "CPGG synthetic cine, tiny, seed 7"
        assert ds.PatientName == "G000007" and ds.PatientID == "G000007"
        assert not any(ds.get(key) for key in IDENTITY), [key for key in IDENTITY if ds.get(key)]
        assert ds.InstanceNumber == t + 1 and float(ds.TriggerTime) == pytest.approx(1000 * DT * t)
        np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], [2.1, 1.9])  # rows (Y), columns (X)
        np.testing.assert_allclose([float(v) for v in ds.ImageOrientationPatient],
                                   [*lps[:, 0] / 1.9, *lps[:, 1] / 2.1], atol=1e-9)
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], lps[:, 3])
        assert float(ds.SliceThickness) == pytest.approx(8.0)
        assert (ds.Rows, ds.Columns, ds.BitsAllocated, ds.PixelRepresentation) == (20, 24, 16, 0)
        assert float(ds.RescaleSlope) == 1 / SCALE and float(ds.RescaleIntercept) == 0
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert len({ds[key].value for ds in headers}) == 1
    assert len({ds.SOPInstanceUID for ds in headers}) == 12


def test_round_trip_through_pydicom_and_the_cine_reader(tmp_path: Path) -> None:
    """pydicom's pixels x RescaleSlope and the reader prepare uses both give the cine back within uint16 rounding,
    with its pixel size, frame interval and affine."""
    cine, affine = small_cine(), plane_affine("ukb_oblique", (1.9, 2.1))
    folder = _export(tmp_path / "G000007", cine, affine)
    stacked = np.stack([ds.pixel_array.T * float(ds.RescaleSlope) for ds in _headers(folder)], axis=-1)
    np.testing.assert_allclose(stacked, cine, atol=0.5 / SCALE + 1e-7)
    loaded = load_cine(folder, "G000007")
    np.testing.assert_allclose(loaded.array, cine, atol=0.5 / SCALE + 1e-6)
    assert loaded.spacing_mm == pytest.approx((1.9, 2.1)) and loaded.frame_interval_s == pytest.approx(DT)
    np.testing.assert_allclose(loaded.affine, affine, atol=1e-6)
    assert loaded.orientation == "X, Y toward L, P: as stored" and loaded.note == ""


def test_uids_follow_the_content(tmp_path: Path) -> None:
    """The same cine exported twice has the same UIDs (reproducible); another cine has others."""
    first, again, other = (_headers(_export(tmp_path / name, small_cine(seed)))
                           for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    uids = [[ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.SOPInstanceUID] for ds in first]
    assert uids == [[ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.SOPInstanceUID] for ds in again]
    assert not {u for row in uids for u in row} & {u for ds in other for u in (ds.SeriesInstanceUID,
                                                                                 ds.StudyInstanceUID,
                                                                                 ds.SOPInstanceUID)}


def test_a_failed_export_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save = Dataset.save_as

    def fail_on_frame_5(ds: Dataset, path: Path, **kwargs: object) -> None:
        if ds.InstanceNumber == 5:
            raise OSError("disk full")
        save(ds, path, **kwargs)

    monkeypatch.setattr(Dataset, "save_as", fail_on_frame_5)
    with pytest.raises(OSError, match="disk full"):
        _export(tmp_path / "G000007", small_cine())
    assert list(tmp_path.iterdir()) == []
