"""scripts.data.cine_files: cine loading (NIfTI, DICOM series), validation errors and atomic writes.

Also holds the small synthetic cine used by tests/test_prepare.py.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from ignite.engine import Engine, Events
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.uid import ExplicitVRLittleEndian, JPEGExtended12Bit, JPEGLosslessSV1, MRImageStorage, generate_uid

from scripts.data.cine import CineError
from scripts.data.cine_files import load_cine, load_subject
from scripts.data.orientation import canonical_affine
from scripts.runtime.checkpoints import BestCheckpointSaver
from scripts.runtime.files import atomic_write, check_disjoint, remove_orphans

SHAPE = (120, 100)  # X, Y


# ------------------------------------------------------------------------------------------------------------ helpers
def _ellipse(xx: np.ndarray, yy: np.ndarray, centre: tuple[float, float], axes: tuple[float, float]) -> np.ndarray:
    return ((xx - centre[0]) / axes[0]) ** 2 + ((yy - centre[1]) / axes[1]) ** 2 <= 1.0


def synthetic_cine(frames: int = 25, ed: int = 0, centre: tuple[float, float] = (60.0, 50.0), seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(image float32, label uint8), both (X, Y, T): 5 moving ellipses; the LV area peaks sharply at frame `ed`."""
    xx, yy = np.meshgrid(np.arange(SHAPE[0]), np.arange(SHAPE[1]), indexing="ij")
    cx, cy = centre
    label = np.zeros((*SHAPE, frames), np.uint8)
    for t in range(frames):
        d = min((t - ed) % frames, (ed - t) % frames) / (frames / 2)  # cyclic distance to ED, 0..1
        v, a = 1.0 - 0.35 * d, 1.0 + 0.3 * d  # ventricles shrink linearly away from ED, atria grow
        frame = label[..., t]
        frame[_ellipse(xx, yy, (cx + 18, cy - 12), (14 * a, 10 * a))] = 4  # LA
        frame[_ellipse(xx, yy, (cx + 18, cy + 12), (13 * a, 10 * a))] = 5  # RA
        frame[_ellipse(xx, yy, (cx - 10, cy + 13), (18 * v, 9 * v))] = 3  # RV
        frame[_ellipse(xx, yy, (cx - 10, cy - 10), (22 * v + 3, 11 * v + 3))] = 2  # myocardium
        frame[_ellipse(xx, yy, (cx - 10, cy - 10), (22 * v, 11 * v))] = 1  # LV blood pool
    intensity = np.array([30.0, 220.0, 70.0, 200.0, 180.0, 190.0], np.float32)
    noise = np.random.default_rng(seed).normal(0.0, 5.0, label.shape).astype(np.float32)
    return intensity[label] + noise, label


def write_nifti(path: Path, array: np.ndarray, spacing: tuple[float, float] = (1.5, 1.5), dt: float = 0.03,
                time_unit: str = "unknown", add_slice_axis: bool = True) -> Path:
    """Save (X, Y, T) as X x Y x 1 x T (or `array` as is with add_slice_axis=False), pixdim[4] = dt, in the canonical
    orientation (X toward L, Y toward P: read back as stored)."""
    data = array[:, :, None, :] if add_slice_axis else array
    img = nib.Nifti1Image(data, canonical_affine(spacing, 8.0))
    img.header["pixdim"][4] = dt
    img.header.set_xyzt_units(xyz="mm", t=time_unit)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return path


def write_dicom_series(folder: Path, cine: np.ndarray, spacing: tuple[float, float], instance: list[int],
                       timing: dict[str, float], series_number: int = 1, prefix: str = "IM") -> None:
    """One MR file per frame of an (X, Y, T) cine, named `<prefix>NNNN.dcm`, as a new series (SeriesInstanceUID) in
    `folder`; `timing` holds TriggerTime step (ms) or NominalInterval/HeartRate."""
    folder.mkdir(parents=True, exist_ok=True)
    series = generate_uid()
    for t in range(cine.shape[2]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SeriesInstanceUID, ds.Modality = MRImageStorage, series, "MR"
        ds.InstanceNumber, ds.SeriesNumber = instance[t], series_number
        for key, value in timing.items():
            setattr(ds, key, t * value if key == "TriggerTime" else value)
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 0], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [spacing[1], spacing[0]]  # (between rows = along Y, between columns = along X)
        frame = cine[:, :, t].T.astype(np.uint16)  # rows = Y, columns = X
        ds.Rows, ds.Columns = frame.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = frame.tobytes()
        ds.save_as(folder / f"{prefix}{(7 * t) % cine.shape[2]:04d}.dcm", enforce_file_format=True)  # names out of order


@pytest.fixture
def subject(tmp_path: Path) -> tuple[Path, Path]:
    """A valid (image, label) NIfTI pair of 25 frames."""
    image, label = synthetic_cine()
    return write_nifti(tmp_path / "la_4ch.nii.gz", image), write_nifti(tmp_path / "seg4_la_4ch.nii.gz", label)


def _raises(path: Path, *fragments: str, subject: str = "s1", label: Path | None = None) -> None:
    """load_cine (or load_subject when `label` is given) raises a CineError naming the subject and all fragments."""
    with pytest.raises(CineError) as err:
        load_subject(path, label, subject) if label else load_cine(path, subject)
    for fragment in (f"subject '{subject}'", *fragments):
        assert fragment in str(err.value), (fragment, str(err.value))


# -------------------------------------------------------------------------------------------------------------- tests
def test_valid_subject(subject: tuple[Path, Path]) -> None:
    image, label = load_subject(*subject, "s1")
    assert image.array.shape == label.array.shape == (*SHAPE, 25)
    assert image.array.dtype == np.float32 and label.array.dtype == np.uint8
    assert image.spacing_mm == (1.5, 1.5) and image.frame_interval_s == pytest.approx(0.03)
    assert np.array_equal(label.array, synthetic_cine()[1]) and image.affine.shape == (4, 4)


@pytest.mark.parametrize("unit, value", [("sec", 0.03), ("msec", 30.0), ("unknown", 30.0), ("unknown", 0.03)])
def test_frame_interval_ms_or_s(tmp_path: Path, unit: str, value: float) -> None:
    path = write_nifti(tmp_path / "c.nii.gz", synthetic_cine()[0], dt=value, time_unit=unit)
    assert load_cine(path).frame_interval_s == pytest.approx(0.03)


def test_shape_mismatch(tmp_path: Path, subject: tuple[Path, Path]) -> None:
    label = write_nifti(tmp_path / "small.nii.gz", synthetic_cine()[1][:110])
    _raises(subject[0], str(subject[0]), str(label), "(120, 100, 25)", "(110, 100, 25)", label=label)


@pytest.mark.parametrize("shape, kind", [((120, 100, 12), "3D volume with no time axis"),
                                         ((120, 100, 3, 25), "3 slices over time")])
def test_volume_instead_of_cine(tmp_path: Path, shape: tuple[int, ...], kind: str) -> None:
    path = write_nifti(tmp_path / "vol.nii.gz", np.zeros(shape, np.float32), add_slice_axis=False)
    _raises(path, str(path), f"found shape {shape}", kind, "expected a 2D cine X x Y x 1 x T")


@pytest.mark.parametrize("edit, problem", [(lambda lab: lab * 0, "label cine is empty"),
                                           (lambda lab: np.where(lab == 1, 2, lab), "no LV (label 1)"),
                                           (lambda lab: np.where(lab == 3, 7, lab), "label values outside 0..5: [7]"),
                                           (lambda lab: lab * 0.5, "non-integer label value")])
def test_bad_labels(tmp_path: Path, subject: tuple[Path, Path], edit, problem: str) -> None:
    label = write_nifti(tmp_path / "bad.nii.gz", edit(synthetic_cine()[1]).astype(np.float32))
    _raises(subject[0], str(label), problem, label=label)


def test_nan_and_infinite_voxels(tmp_path: Path) -> None:
    image = synthetic_cine()[0]
    image[0, 0, :3], image[1, 1, :2] = np.nan, np.inf
    path = write_nifti(tmp_path / "nan.nii.gz", image)
    _raises(path, str(path), "3 NaN and 2 infinite voxel(s)")


def test_too_few_frames(tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "short.nii.gz", synthetic_cine(frames=8)[0])
    _raises(path, str(path), "only 8 frame(s)", "at least 10")


@pytest.mark.parametrize("keep", [0.5, 0.02])  # cut in the data, cut in the header
def test_truncated_file(subject: tuple[Path, Path], keep: float) -> None:
    path = subject[0]
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    _raises(path, str(path), "truncated or corrupt")


def test_missing_file(tmp_path: Path) -> None:
    _raises(tmp_path / "nope.nii.gz", str(tmp_path / "nope.nii.gz"), "file not found")


def test_non_positive_frame_interval(tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "c.nii.gz", synthetic_cine()[0], dt=0.0)
    _raises(path, str(path), "frame interval must be positive, got 0.0 s")


def test_non_positive_spacing(tmp_path: Path) -> None:  # nibabel itself replaces zero/negative NIfTI pixdims
    write_dicom_series(tmp_path / "series", synthetic_cine()[0], (0.0, 1.5), list(range(1, 26)), {"TriggerTime": 30})
    _raises(tmp_path / "series", str(tmp_path / "series"), "pixel spacing must be positive")


@pytest.mark.parametrize("instance, timing, dt", [
    ([25 - t for t in range(25)], {"TriggerTime": 31.0}, 0.031),  # InstanceNumber reversed: order by TriggerTime
    (list(range(1, 26)), {"NominalInterval": 900.0}, 0.9 / 25),
    (list(range(1, 26)), {"HeartRate": 60}, 1.0 / 25),
])
def test_dicom_series_round_trip(tmp_path: Path, instance: list[int], timing: dict, dt: float) -> None:
    cine = np.rint(synthetic_cine()[0]).clip(0).astype(np.float32)
    write_dicom_series(tmp_path / "series", cine, (1.25, 1.75), instance, timing)
    loaded = load_cine(tmp_path / "series", "s1")
    assert np.array_equal(loaded.array, cine)
    assert loaded.spacing_mm == pytest.approx((1.25, 1.75)) and loaded.frame_interval_s == pytest.approx(dt)
    assert np.linalg.matrix_rank(loaded.affine) == 4


def test_dicom_series_with_several_positions(tmp_path: Path) -> None:
    write_dicom_series(tmp_path / "series", synthetic_cine()[0], (1.5, 1.5), list(range(1, 26)), {"TriggerTime": 30})
    path = tmp_path / "series" / "IM0007.dcm"
    ds = pydicom.dcmread(path)
    ds.ImagePositionPatient = [0, 0, 8]
    ds.save_as(path)
    _raises(tmp_path / "series", "2 slice positions (a 3D volume)")


def test_atomic_write(tmp_path: Path) -> None:
    target = tmp_path / "out" / "a.npy"
    with atomic_write(target) as tmp:
        np.save(tmp, np.arange(3))
    assert np.array_equal(np.load(target), np.arange(3))
    with pytest.raises(RuntimeError), atomic_write(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert np.array_equal(np.load(target), np.arange(3)) and [p.name for p in target.parent.iterdir()] == ["a.npy"]


def test_remove_orphans_deletes_only_old_temporaries(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), atomic_write(tmp_path / "a.pt") as tmp:
        tmp.write_bytes(b"half")
        kept = tmp.with_name(tmp.name.replace(".tmp-", ".keep-"))
        os.link(tmp, kept)  # what a killed writer leaves behind (the context manager would clean up a live one)
        raise RuntimeError("killed")
    old = tmp_path / f".tmp-{'a' * 32}-a.pt"
    kept.rename(old)
    young = tmp_path / f".tmp-{'b' * 32}-b.pt"
    young.write_bytes(b"being written")
    (tmp_path / "model.pt").write_bytes(b"weights")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert remove_orphans(tmp_path) == [old]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([young.name, "model.pt"])
    assert remove_orphans(tmp_path / "absent") == []
    series = tmp_path / f".tmp-{'c' * 32}-G000000"  # an atomic_folder of a killed DICOM export
    (series / "IM0001.dcm").parent.mkdir()
    (series / "IM0001.dcm").write_bytes(b"frame")
    os.utime(series, (time.time() - 7200, time.time() - 7200))
    assert remove_orphans(tmp_path) == [series] and not series.exists()


def test_best_checkpoint_survives_a_failed_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MONAI's saver deletes the old best before writing the new one; ours replaces it atomically."""
    net = torch.nn.Linear(2, 1)
    engine = Engine(lambda e, b: None)
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: setattr(e.state, "metrics", {"m": e.state.epoch}))
    saver = BestCheckpointSaver(str(tmp_path), {"network": net}, key_metric_filename="best.pt", save_key_metric=True,
                                key_metric_name="m")
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: net.weight.data.fill_(e.state.epoch))
    saver.attach(engine)
    engine.run([0], max_epochs=2)
    assert torch.load(tmp_path / "best.pt", weights_only=True)["weight"].eq(2).all()

    def crash(obj: object, path: object) -> None:
        Path(path).write_bytes(b"trunc")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        engine.run([0], max_epochs=3)  # epoch 3 improves the metric: the save fails midway
    assert torch.load(tmp_path / "best.pt", weights_only=True)["weight"].eq(2).all()
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]


# ------------------------------------------------------------------------- corrupt files and series (issue 14)
def _edit_dicom(path: Path, **tags: object) -> None:
    ds = pydicom.dcmread(path)
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.save_as(path)


def _series(tmp_path: Path, frames: int = 25, **kwargs: object) -> Path:
    folder = tmp_path / "series"
    write_dicom_series(folder, synthetic_cine(frames)[0], (1.5, 1.5), list(range(1, frames + 1)), {"TriggerTime": 30},
                       **kwargs)
    return folder


def _patched_nifti(tmp_path: Path, offset: int, values: list[int]) -> Path:
    """An uncompressed NIfTI cine with int16 `values` written into its header at byte `offset`."""
    path = write_nifti(tmp_path / "patched.nii", synthetic_cine()[0])
    raw = bytearray(path.read_bytes())
    raw[offset:offset + 2 * len(values)] = np.asarray(values, "<i2").tobytes()
    path.write_bytes(bytes(raw))
    return path


def test_invalid_nifti_datatype_code(tmp_path: Path) -> None:
    path = _patched_nifti(tmp_path, 70, [1234])  # datatype (bytes 70-71): no such code, nibabel's HeaderDataError
    _raises(path, str(path), "cannot read the image")


def test_header_claiming_a_huge_image_is_refused_before_reading(tmp_path: Path) -> None:
    path = _patched_nifti(tmp_path, 40, [4, 30000, 30000, 1, 30000])  # dim: 2.7e13 voxels in a 1.2 MB file
    _raises(path, str(path), "(30000, 30000, 1, 30000) voxels", "more than the file can hold")


def test_dicom_non_numeric_pixel_spacing(tmp_path: Path) -> None:
    folder = _series(tmp_path)
    for path in folder.iterdir():
        raw = path.read_bytes()
        assert raw.count(b"1.5\\1.5") == 1
        path.write_bytes(raw.replace(b"1.5\\1.5", b"abc\\1.5"))
    _raises(folder, str(folder), "PixelSpacing is not 2 numbers in every file", "abc")


@pytest.mark.parametrize("syntax, bits, name", [
    (JPEGLosslessSV1, 16, "JPEG Lossless, Non-Hierarchical, First-Order Prediction"),
    (JPEGExtended12Bit, 12, "JPEG Extended (Process 2 and 4)"),  # Pillow decodes its 8-bit variant only
])
def test_dicom_compressed_without_decoder(tmp_path: Path, syntax: str, bits: int, name: str) -> None:
    if get_decoder(syntax).available_plugins not in ((), ("pillow",)):
        pytest.skip(f"a decoder for {name} is installed here (python-gdcm or pylibjpeg-libjpeg)")
    folder = _series(tmp_path)
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = syntax
        ds.BitsStored, ds.HighBit = bits, bits - 1
        ds.PixelData = encapsulate([b"\xff\xd8 not a JPEG stream \xff\xd9"])
        ds["PixelData"].VR = "OB"
        ds.save_as(path, enforce_file_format=True)
    _raises(folder, str(folder), f"unsupported compressed transfer syntax {name}")


def test_dicom_folder_with_two_series_reads_one(tmp_path: Path) -> None:
    """Two 25-frame series (30 ms steps) in one folder were merged into one 50-frame cine; now series 2 is read."""
    first = np.rint(synthetic_cine(seed=1)[0]).clip(0).astype(np.float32)
    second = np.rint(synthetic_cine(seed=2)[0]).clip(0).astype(np.float32)
    folder = tmp_path / "series"
    write_dicom_series(folder, first, (1.5, 1.5), list(range(1, 26)), {"TriggerTime": 30}, series_number=1, prefix="A")
    write_dicom_series(folder, second, (1.5, 1.5), list(range(1, 26)), {"TriggerTime": 30}, series_number=2,
                       prefix="B")
    cine = load_cine(folder, "s1")
    assert cine.array.shape[2] == 25 and np.array_equal(cine.array, second)
    assert cine.frame_interval_s == pytest.approx(0.030)
    assert "2 DICOM series in the folder: read series 2" in cine.note and "ignored series 1" in cine.note


def test_dicom_folder_with_a_localiser_reads_the_cine(tmp_path: Path) -> None:
    folder = _series(tmp_path, series_number=5)
    write_dicom_series(folder, synthetic_cine(frames=3)[0], (1.5, 1.5), [1, 2, 3], {"TriggerTime": 0},
                       series_number=9, prefix="LOC")
    cine = load_cine(folder, "s1")
    assert cine.array.shape[2] == 25 and "read series 5" in cine.note and "only 3 frame(s)" in cine.note


def test_dicom_orientation_change_within_a_series(tmp_path: Path) -> None:
    folder = _series(tmp_path)
    _edit_dicom(folder / "IM0007.dcm", ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    _raises(folder, str(folder), "ImageOrientationPatient changes between frames")


def test_dicom_repeated_trigger_time(tmp_path: Path) -> None:
    folder = _series(tmp_path)
    _edit_dicom(folder / "IM0007.dcm", TriggerTime=60.0)  # IM0007 is frame 1 (30 ms): now equal to frame 2
    _raises(folder, str(folder), "1 frame(s) repeat a TriggerTime")


def test_dicom_missing_frame_is_noted(tmp_path: Path) -> None:
    folder = _series(tmp_path)
    (folder / "IM0007.dcm").unlink()  # frame 1 of 25
    cine = load_cine(folder, "s1")
    assert cine.array.shape[2] == 24 and "uneven TriggerTime steps (30 to 60 ms)" in cine.note


def test_check_disjoint(tmp_path: Path) -> None:
    src = tmp_path / "cohort"
    check_disjoint({"--dataset_dir": src, "--phenotypes_csv": None}, {"--output_dir": tmp_path / "prepared"})
    for out, how in ((src, "is"), (src / "prepared", "lies inside"), (tmp_path, "contains")):
        with pytest.raises(ValueError, match=f"--output_dir {out} {how} --dataset_dir {src}"):
            check_disjoint({"--dataset_dir": src}, {"--output_dir": out})
