"""In-plane orientation (scripts.data.orientation through scripts.data.cine_files): one cine stored with any of the 8
in-plane flips/transposes, as NIfTI or as a DICOM series, reads and prepares to the same arrays; UK Biobank-like
cines (X toward L, Y toward P), the real demo subject among them, are left as stored."""

from __future__ import annotations

import json
from itertools import product
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import apply_orientation, inv_ornt_aff

from scripts.data.cine import CineError
from scripts.data.cine_files import load_cine, load_subject
from scripts.data.dicom_export import write_dicom_cine
from scripts.data.orientation import in_plane_codes
from scripts.data.prepare import prepare
from tests.test_io import synthetic_cine

SPACING = (1.5, 1.6)  # mm along X, Y of the cine as it should come out
UKB_DIRECTIONS = ((-0.9986, -0.0164, 0.0508), (0.0314, -0.9501, 0.3102))  # demo subject's X, Y (RAS, normalised)
PLANES = {  # X and Y directions (RAS) of the cine as it should come out, by plane
    "axial": ((-1.0, 0.0, 0.0), (0.0, -1.0, 0.0)),  # X toward L, Y toward P: the canonical orientation
    "ukb_oblique": UKB_DIRECTIONS,  # normal mostly S, tilted: still X toward L, Y toward P
    "sagittal": ((0.0, -0.8, 0.6), (0.0, -0.6, -0.8)),  # normal along L; X mostly toward P, Y mostly toward I
}
VARIANTS = [np.array([[a, fx], [1 - a, fy], [2, 1]]) for a, fx, fy in product((0, 1), (1, -1), (1, -1))]  # all 8


def plane_affine(plane: str, spacing: tuple[float, float] = SPACING) -> np.ndarray:
    """RAS affine of a cine whose X, Y run along the plane's directions, with an arbitrary origin."""
    x, y = (np.asarray(d) / np.linalg.norm(d) for d in PLANES[plane])
    affine = np.eye(4)
    affine[:3, :3] = np.column_stack([x * spacing[0], y * spacing[1], np.cross(x, y) * 8.0])
    affine[:3, 3] = (12.0, -30.0, 41.0)
    return affine


def stored(array: np.ndarray, affine: np.ndarray, variant: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same cine as another in-plane flip/transpose of the array with the affine that keeps every voxel in place."""
    return (np.ascontiguousarray(apply_orientation(array, variant[:2])),
            affine @ inv_ornt_aff(variant, (*array.shape[:2], 1)))


def cine_pair() -> tuple[np.ndarray, np.ndarray]:
    """(image in [0, 1], label) (X, Y, T) of the synthetic cine, 120 x 100 x 25."""
    image, label = synthetic_cine()
    return np.clip(image / 300.0, 0.0, 1.0).astype(np.float32), label


def write(path: Path, array: np.ndarray, affine: np.ndarray, dt: float = 0.03) -> Path:
    """(X, Y, T) as NIfTI X x Y x 1 x T with `affine` (sform), pixel size from it, frame interval in s."""
    img = nib.Nifti1Image(array[:, :, None, :], affine)
    img.header.set_zooms((*np.linalg.norm(affine[:3, :3], axis=0), dt))
    img.header.set_xyzt_units("mm", "sec")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return path


@pytest.mark.parametrize("plane", PLANES)
def test_the_eight_variants_read_alike(tmp_path: Path, plane: str) -> None:
    """Each of the 8 in-plane variants of a cine (NIfTI) loads to one array, affine and pixel size; for an axial or a
    UK Biobank-like oblique plane that is the cine itself; the slice normal's world axis never enters the plane."""
    image = cine_pair()[0]
    affine = plane_affine(plane)
    loaded = [load_cine(write(tmp_path / f"v{k}.nii", *stored(image, affine, v))) for k, v in enumerate(VARIANTS)]
    for cine in loaded:
        np.testing.assert_array_equal(cine.array, loaded[0].array)
        np.testing.assert_allclose(cine.affine, loaded[0].affine, atol=1e-4)  # float32 in the header
        assert cine.spacing_mm == pytest.approx(loaded[0].spacing_mm)
    if plane != "sagittal":
        np.testing.assert_array_equal(loaded[0].array, image)
        np.testing.assert_allclose(loaded[0].affine, affine, atol=1e-4)
        assert loaded[0].spacing_mm == pytest.approx(SPACING) and loaded[0].orientation.endswith("as stored")
    else:  # normal along L: the image axes run toward P and S, never L/R, whatever the stored order
        assert in_plane_codes(loaded[0].affine) == "PS" and loaded[0].array.shape[:2] == image.shape[:2]
        assert all(set(in_plane_codes(stored(image, affine, v)[1])) <= set("PSAI") for v in VARIANTS)


def test_in_plane_axis_nearest_the_normal_stays_in_plane() -> None:
    """A steep oblique plane (normal mostly S) whose X runs mostly along S too: X still gets one of L/R, P/A."""
    normal = np.array([0.55, 0.55, 0.63]) / np.linalg.norm([0.55, 0.55, 0.63])
    x = np.array([-1.0, -0.6, 1.397]) / np.linalg.norm([-1.0, -0.6, 1.397])  # in the plane, largest component S
    affine = np.eye(4)
    affine[:3, :3] = np.column_stack([x, np.cross(normal, x), normal])  # Y: mostly P (LPS 0.77)
    assert abs(x @ normal) < 1e-3 and np.argmax(np.abs(x)) == np.argmax(np.abs(normal)) == 2
    assert in_plane_codes(affine) == "LP"  # X toward L (its larger other component), Y toward P


def test_prepare_gives_one_array_whatever_the_stored_orientation(tmp_path: Path) -> None:
    """Variants of one subject as NIfTI pairs and as exported DICOM image series (with a NIfTI label of the same
    geometry) prepare to the same image and label arrays, crop box, pixel size and frame interval; the axial and
    UK Biobank-like planes equal the canonical cine. Proves the whole reading + preprocessing path is
    orientation-invariant and that exported series are accepted by prepare; the crop needs the label, written here."""
    image, label = cine_pair()
    cases = {f"nifti_axial_{k}": ("axial", k, False) for k in range(8)}
    cases |= {f"nifti_ukb_oblique_{k}": ("ukb_oblique", k, False) for k in (0, 5)}
    cases |= {f"dicom_{plane}_{k}": (plane, k, True) for plane, k in (("axial", 0), ("axial", 3), ("axial", 6),
                                                                     ("ukb_oblique", 5))}
    cases |= {f"nifti_sagittal_{k}": ("sagittal", k, False) for k in (0, 7)} | {"dicom_sagittal_2": ("sagittal", 2, True)}
    for name, (plane, k, dicom) in cases.items():
        (img, affine), (lab, _) = (stored(a, plane_affine(plane), VARIANTS[k]) for a in (image, label))
        folder = tmp_path / "cohort" / name
        if dicom:  # a DICOM series folder under the image file name, as prepare looks for
            write_dicom_cine(folder / "la_4ch.nii.gz", img, affine, 0.03, "CPGG synthetic cine, test", name)
        else:
            write(folder / "la_4ch.nii.gz", img, affine)
        write(folder / "seg4_la_4ch.nii.gz", lab.astype(np.float32), affine)
    report = prepare(tmp_path / "cohort", tmp_path / "prepared", splits=(1.0, 0.0, 0.0), num_workers=0)
    assert report["prepared"] == len(cases), report["skipped"]
    items = {d["subject"]: d for d in json.loads((tmp_path / "prepared" / "datalist.json").read_text())["training"]}

    def arrays(name: str) -> tuple[np.ndarray, np.ndarray]:
        return tuple(np.load(tmp_path / "prepared" / kind / f"{name}.npy").astype(np.float32)
                     for kind in ("images", "labels"))

    for name, (plane, _, dicom) in cases.items():
        reference = "nifti_sagittal_0" if plane == "sagittal" else "nifti_axial_0"
        (a, la), (b, lb) = arrays(name), arrays(reference)
        np.testing.assert_array_equal(la, lb, err_msg=name)
        np.testing.assert_allclose(a, b, atol=2e-3 if dicom else 0, err_msg=name)  # DICOM: 1 / 50000 steps
        assert report["subjects"][name]["crop_box"] == report["subjects"][reference]["crop_box"], name
        assert items[name]["spacing_mm"] == pytest.approx(items[reference]["spacing_mm"])
        assert items[name]["frame_interval_s"] == pytest.approx(0.03 * 25 / 50)
    assert report["subjects"]["nifti_axial_0"]["orientation"] == "X, Y toward L, P: as stored"
    assert report["subjects"]["nifti_axial_3"]["orientation"] == "X, Y toward R, A: flipped X, flipped Y"
    canonical = arrays("nifti_axial_0")
    np.testing.assert_array_equal(arrays("nifti_ukb_oblique_0")[1], canonical[1])


def test_label_gets_the_image_reorientation(tmp_path: Path) -> None:
    """A label whose affine says otherwise than its image's is turned as the image (voxels correspond), and noted."""
    image, label = cine_pair()
    affine = plane_affine("axial")
    image_path = write(tmp_path / "image.nii", *stored(image, affine, VARIANTS[3]))  # R, A: both axes flipped
    label_path = write(tmp_path / "label.nii", stored(label, affine, VARIANTS[3])[0].astype(np.float32), affine)
    img, lab = load_subject(image_path, label_path, "s1")
    np.testing.assert_array_equal(img.array, image)
    np.testing.assert_array_equal(lab.array, label)
    assert "its affine orients it X, Y toward L, P: as stored" in lab.note and "applied to both" in lab.note


def test_nifti_without_orientation_is_kept_as_stored(tmp_path: Path) -> None:
    image = cine_pair()[0]
    img = nib.Nifti1Image(image[:, :, None, :], None)  # qform_code and sform_code 0
    img.header.set_zooms((*SPACING, 8.0, 0.03))
    nib.save(img, tmp_path / "c.nii")
    cine = load_cine(tmp_path / "c.nii")
    np.testing.assert_array_equal(cine.array, image)
    assert cine.spacing_mm == pytest.approx(SPACING) and "qform_code and sform_code 0" in cine.note


def test_degenerate_affine_is_a_cine_error(tmp_path: Path) -> None:
    affine = plane_affine("axial")
    affine[:3, 1] = affine[:3, 0]  # Y parallel to X
    path = write(tmp_path / "c.nii", cine_pair()[0], affine)
    with pytest.raises(CineError, match=r"subject 's1'.*cannot orient the cine.*zero or parallel"):
        load_cine(path, "s1")


def test_real_demo_subject_is_unchanged(ukbb_demo: Path) -> None:
    """UK Biobank's own array order (X toward L, Y toward P, oblique) is the canonical one: nothing moves."""
    folder = ukbb_demo / "1"
    image, label = load_subject(folder / "la_4ch.nii.gz", folder / "seg4_la_4ch.nii.gz", "1")
    for cine, name in ((image, "la_4ch.nii.gz"), (label, "seg4_la_4ch.nii.gz")):
        raw = nib.load(folder / name)
        np.testing.assert_array_equal(cine.array, np.asarray(raw.dataobj)[:, :, 0].astype(cine.array.dtype))
        np.testing.assert_allclose(cine.affine, raw.affine)
        assert cine.orientation == "X, Y toward L, P: as stored" and nib.aff2axcodes(raw.affine) == ("L", "P", "S")
