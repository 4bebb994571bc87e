"""scripts.data.cine_files on DICOM beyond the plain series of tests/test_io.py (issue 14): compressed transfer syntaxes
(decoded by the pydicom plugins in pyproject.toml) and enhanced multi-frame MR files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from monai.data import PydicomReader
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from test_io import synthetic_cine, write_dicom_series, write_nifti

from scripts.data.cine import CineError
from scripts.data.cine_files import load_cine, load_stored
from scripts.data.prepare import prepare

SPACING, STEP_MS = (1.25, 1.75), 30.0  # (X, Y) mm; TriggerTime step
OBLIQUE = {"ImagePositionPatient": [-80.5, 20.25, 110.0], "ImageOrientationPatient": [0.8, 0.6, 0.0, 0.0, 0.0, -1.0],
           "SliceThickness": 6.0, "RescaleSlope": 0.5, "RescaleIntercept": 10.0}
LOSSLESS = [RLELossless, JPEGLSLossless, JPEG2000Lossless]


def _cine(frames: int = 25, seed: int = 0) -> np.ndarray:
    """A synthetic (X, Y, T) image cine of whole grey levels 0..255 (fits 8-bit JPEG)."""
    return np.rint(synthetic_cine(frames, seed=seed)[0]).clip(0, 255).astype(np.float32)


def _item(**tags: object) -> Dataset:
    """A dataset (a sequence item) holding `tags`."""
    item = Dataset()
    for key, value in tags.items():
        setattr(item, key, value)
    return item


def enhanced(cine: np.ndarray, stored: list[int] | None = None, geometry: dict | None = None,
             series_number: int = 1) -> Dataset:
    """An Enhanced MR Image Storage dataset of an (X, Y, T) cine stored in frame order `stored` (default time order):
    pixel measures, orientation and rescale shared; per frame the plane position, the nominal trigger delay
    (t x STEP_MS) and the temporal position index (t + 1). `geometry`: OBLIQUE-like tags, default none (position 0,
    axial orientation, thickness 1, no rescale)."""
    stored = list(range(cine.shape[2])) if stored is None else stored
    geometry = {"ImagePositionPatient": [0, 0, 0], "ImageOrientationPatient": [1, 0, 0, 0, 1, 0],
                "SliceThickness": 1.0, **(geometry or {})}
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = EnhancedMRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SeriesInstanceUID, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = generate_uid(), "MR", series_number, 1
    shared = _item(PixelMeasuresSequence=[_item(PixelSpacing=[SPACING[1], SPACING[0]],
                                                SliceThickness=geometry["SliceThickness"])],
                   PlaneOrientationSequence=[_item(ImageOrientationPatient=geometry["ImageOrientationPatient"])])
    if "RescaleSlope" in geometry:
        shared.PixelValueTransformationSequence = [_item(RescaleSlope=geometry["RescaleSlope"],
                                                         RescaleIntercept=geometry["RescaleIntercept"],
                                                         RescaleType="US")]
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PerFrameFunctionalGroupsSequence = [_item(
        PlanePositionSequence=[_item(ImagePositionPatient=geometry["ImagePositionPatient"])],
        CardiacSynchronizationSequence=[_item(NominalCardiacTriggerDelayTime=t * STEP_MS)],
        FrameContentSequence=[_item(TemporalPositionIndex=t + 1, InStackPositionNumber=1, StackID="1")],
    ) for t in stored]
    frames = np.stack([cine[:, :, t].T for t in stored]).astype(np.uint16)  # (frames, rows = Y, columns = X)
    ds.NumberOfFrames, ds.Rows, ds.Columns = frames.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = frames.tobytes()
    return ds


def _save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _compress(ds: Dataset, syntax: str) -> None:
    """Compress the pixel data of `ds` (one or more frames): pydicom's encoders, JPEG baseline 8-bit through Pillow."""
    if syntax != JPEGBaseline8Bit:
        ds.compress(syntax)
        return
    encoded = []
    for frame in ds.pixel_array.reshape(-1, ds.Rows, ds.Columns):
        buffer = io.BytesIO()
        Image.fromarray(frame.astype(np.uint8)).save(buffer, "JPEG", quality=95)
        encoded.append(buffer.getvalue())
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.LossyImageCompression = 8, 8, 7, "01"
    ds.PixelData = encapsulate(encoded)
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit


def _edit_series(folder: Path, edit) -> None:
    """Apply `edit(ds)` to each file of a DICOM folder."""
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        edit(ds)
        ds.save_as(path, enforce_file_format=True)


def _oblique(ds: Dataset) -> None:
    """Give a classic file the OBLIQUE geometry and rescale."""
    for key, value in OBLIQUE.items():
        setattr(ds, key, value)


def _cine_error(path: Path, *fragments: str) -> None:
    """load_cine raises a CineError naming the subject and all fragments."""
    with pytest.raises(CineError) as err:
        load_cine(path, "s1")
    for fragment in ("subject 's1'", *fragments):
        assert fragment in str(err.value), (fragment, str(err.value))


# -------------------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("layout", ["series", "enhanced"])
@pytest.mark.parametrize("syntax", [*LOSSLESS, JPEGBaseline8Bit])
def test_compressed_dicom_decodes(tmp_path: Path, syntax: str, layout: str) -> None:
    """Each compressed syntax reads, as a series and as an enhanced file, to the uncompressed series' cine."""
    cine = _cine()
    write_dicom_series(tmp_path / "plain", cine, SPACING, list(range(1, 26)), {"TriggerTime": STEP_MS})
    if layout == "series":
        write_dicom_series(tmp_path / "packed", cine, SPACING, list(range(1, 26)), {"TriggerTime": STEP_MS})
        _edit_series(tmp_path / "packed", lambda ds: _compress(ds, syntax))
        target = tmp_path / "packed"
    else:
        ds = enhanced(cine, stored=[(7 * t) % 25 for t in range(25)])
        _compress(ds, syntax)
        target = _save(ds, tmp_path / "packed" / "EN0001.dcm")
    assert pydicom.dcmread(next((tmp_path / "packed").iterdir())).file_meta.TransferSyntaxUID == syntax
    plain, packed = load_cine(tmp_path / "plain", "s1"), load_cine(target, "s1")
    assert packed.array.shape == plain.array.shape and packed.note == ""
    if syntax in LOSSLESS:
        assert np.array_equal(packed.array, plain.array)
    else:
        assert np.abs(packed.array - plain.array).mean() < 3.0
    assert packed.spacing_mm == plain.spacing_mm and packed.frame_interval_s == pytest.approx(plain.frame_interval_s)
    np.testing.assert_allclose(packed.affine, plain.affine)


def test_enhanced_file_reads_as_the_classic_series(tmp_path: Path) -> None:
    """One oblique cine (rescaled pixels) as a classic series and as an enhanced file (frames stored out of temporal
    order), read from the file and from its folder: same array, pixel size, frame interval, affine and orientation."""
    cine = _cine()
    write_dicom_series(tmp_path / "classic", cine, SPACING, list(range(1, 26)), {"TriggerTime": STEP_MS})
    _edit_series(tmp_path / "classic", _oblique)
    path = _save(enhanced(cine, stored=[(7 * t) % 25 for t in range(25)], geometry=OBLIQUE),
                 tmp_path / "enhanced" / "EN0001.dcm")
    classic = load_cine(tmp_path / "classic", "s1")
    for other in (load_cine(path, "s1"), load_cine(path.parent, "s1")):
        assert np.array_equal(other.array, classic.array) and other.note == ""
        assert other.spacing_mm == classic.spacing_mm and other.frame_interval_s == pytest.approx(STEP_MS / 1000)
        np.testing.assert_allclose(other.affine, classic.affine)
        assert other.orientation == classic.orientation
    stored = load_stored(path, "s1")[0]
    assert np.array_equal(stored.array, cine * 0.5 + 10)


def test_classic_affine_is_monai_pydicom_readers(tmp_path: Path) -> None:
    """The affine of a series as stored is MONAI's PydicomReader's (read before issue 14), its slice column aside
    (the normal by SliceThickness, where MONAI has zeros for a single position)."""
    write_dicom_series(tmp_path / "s", _cine(), SPACING, list(range(1, 26)), {"TriggerTime": STEP_MS})
    _edit_series(tmp_path / "s", _oblique)
    ours = load_stored(tmp_path / "s", "s1")[0].affine
    reader = PydicomReader()
    monai = np.asarray(reader.get_data(reader.read(tmp_path / "s"))[1]["affine"])
    np.testing.assert_allclose(ours[:, [0, 1, 3]], monai[:, [0, 1, 3]], atol=1e-9)
    np.testing.assert_allclose(ours[:3, 2], [3.6, -4.8, 0.0], atol=1e-9)  # RAS of the LPS normal (-0.6, 0.8, 0) x 6


def test_enhanced_frames_out_of_order_and_index_note(tmp_path: Path) -> None:
    """Frames stored out of temporal order come back ordered by trigger delay; a TemporalPositionIndex that disagrees
    with the trigger delays is noted."""
    cine = _cine()
    ds = enhanced(cine, stored=list(range(24, -1, -1)))
    path = _save(ds, tmp_path / "EN.dcm")
    assert np.array_equal(load_cine(path, "s1").array, load_cine(_save(enhanced(cine), tmp_path / "b.dcm")).array)
    for k, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        item.FrameContentSequence[0].TemporalPositionIndex = k + 1  # storage order, reversed time
    note = load_cine(_save(ds, tmp_path / "EN.dcm"), "s1").note
    assert "TemporalPositionIndex order differs from NominalCardiacTriggerDelayTime order" in note


def test_enhanced_missing_trigger_delay(tmp_path: Path) -> None:
    ds = enhanced(_cine())
    for item in ds.PerFrameFunctionalGroupsSequence[3:6]:
        del item.CardiacSynchronizationSequence[0].NominalCardiacTriggerDelayTime
    path = _save(ds, tmp_path / "EN.dcm")
    _cine_error(path, str(path), "NominalCardiacTriggerDelayTime in 22 of 25 frames; expected in all or none")


def test_enhanced_with_two_plane_positions(tmp_path: Path) -> None:
    """Two slices of 13 phases in one file: a CineError naming the file and the positions, from the file or folder."""
    ds = enhanced(_cine(26))
    for k, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        item.PlanePositionSequence[0].ImagePositionPatient = [0, 0, 8 * (k // 13)]
        item.CardiacSynchronizationSequence[0].NominalCardiacTriggerDelayTime = (k % 13) * STEP_MS
        item.FrameContentSequence[0].TemporalPositionIndex = k % 13 + 1
    path = _save(ds, tmp_path / "stack" / "EN.dcm")
    for target in (path, path.parent):
        _cine_error(target, str(path.parent), "EN.dcm: 2 slice positions (a 3D volume)")


def test_enhanced_compressed_without_decoder(tmp_path: Path) -> None:
    ds = enhanced(_cine())
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1  # no permissively licensed pydicom plugin decodes it
    ds.PixelData = encapsulate([b"\xff\xd8 not a JPEG stream \xff\xd9"] * 25)
    ds["PixelData"].VR = "OB"
    path = _save(ds, tmp_path / "EN.dcm")
    if pydicom.pixels.get_decoder(JPEGLosslessSV1).is_available:
        pytest.skip("a JPEG Lossless decoder is installed here (python-gdcm or pylibjpeg-libjpeg)")
    _cine_error(path, str(path), "unsupported compressed transfer syntax JPEG Lossless")


def test_folder_mixing_classic_and_enhanced_series(tmp_path: Path) -> None:
    """A classic series (number 3) and an enhanced file (series 4): the same series choice reads the latter, noted."""
    folder = tmp_path / "mixed"
    write_dicom_series(folder, _cine(seed=1), SPACING, list(range(1, 26)), {"TriggerTime": STEP_MS}, series_number=3)
    _save(enhanced(_cine(seed=2), series_number=4), folder / "EN0001.dcm")
    cine = load_cine(folder, "s1")
    assert np.array_equal(cine.array, load_cine(folder / "EN0001.dcm").array)
    assert "2 DICOM series in the folder: read series 4 (multi-frame file EN0001.dcm, 25 frames" in cine.note
    assert "ignored series 3 (25 files" in cine.note


def test_prepare_reads_compressed_and_enhanced_subjects(tmp_path: Path) -> None:
    """A JPEG-LS series and a JPEG 2000 enhanced file (each in the subject's image folder) are prepared."""
    root = tmp_path / "cohort"
    for n, name in enumerate(("series", "enhanced")):
        image, label = synthetic_cine(25, seed=n)
        image = np.rint(image).clip(0, 255).astype(np.float32)
        write_nifti(root / name / "seg4_la_4ch.nii.gz", label.astype(np.float32), spacing=SPACING, dt=STEP_MS / 1000)
        if name == "series":
            write_dicom_series(root / name / "la_4ch", image, SPACING, list(range(1, 26)), {"TriggerTime": STEP_MS})
            _edit_series(root / name / "la_4ch", lambda ds: _compress(ds, JPEGLSLossless))
        else:
            ds = enhanced(image)
            _compress(ds, JPEG2000Lossless)
            _save(ds, root / name / "la_4ch" / "EN0001.dcm")
    report = prepare(root, tmp_path / "out", num_workers=0, image_name="la_4ch")
    assert report["prepared"] == 2 and report["skipped"] == [], report["skipped"]
