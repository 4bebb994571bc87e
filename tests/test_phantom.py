"""Phantom cohort: layout, determinism, class distributions, and measured phenotypes against the intended geometry."""

from __future__ import annotations

import csv
import time

import nibabel as nib
import numpy as np
import pytest

from scripts.data import phantom, phantom_render, phantom_shapes
from scripts.data.cine_files import load_subject
from scripts.data.phenotypes import PHENOTYPE_COLUMNS, measure_cine, read_phenotype_table
from tests.conftest import run_bundle

WEIGHTS = (0.25, 0.25, 0.25, 0.25)

# Tolerances for measured (rasterised, 1.75-1.9 mm pixels) against intended (continuous geometry) values.
# Area-length volumes go as A^2 / L: at ~1.8 mm pixels the pixel-centre area of a 30-60 cm^2 chamber is within ~1%
# and the apex/valve points within ~1 px of an 80-100 mm length (~1-2%), so ventricular volumes are held to 5%.
# The atrial method measures its length between the centres of the extreme pixels on a rasterised line and takes
# its axis from the labels, which shortens L by up to ~1 px of a 60-90 mm atrium and reads volumes 4-8% high: 14%.
# Ejection fractions are differences of two volumes, so absolute points; wall thickness is ~4-9 px sampled across
# an oblique band, within 2 px at each of its two edges: 2 * 2 px ~ 7 mm would be trivial, so hold the mean error
# to 1 mm and every subject to 4 mm.
REL_TOL = {"LVEDV (mL)": 5, "LVESV (mL)": 6, "LVM (g)": 6, "RVEDV (mL)": 5, "RVESV (mL)": 7, "LAV max (mL)": 14,
           "LAV min (mL)": 16, "RAV max (mL)": 14, "RAV min (mL)": 16, "HR (bpm)": 1e-6}
ABS_TOL = {"LVEF (%)": 3, "RVEF (%)": 3.5, "LAEF (%)": 6, "RAEF (%)": 7, "WT septal (mm)": 4, "WT lateral (mm)": 4}


def _draw_measure(seed: int, index: int) -> tuple[phantom.Draw, np.ndarray, np.ndarray, dict, dict]:
    d = phantom.draw_subject(seed, index, WEIGHTS)
    image, label = phantom_render.render(d.scan, d.geometry, d.rng)
    measured = measure_cine(label.transpose(2, 1, 0), (d.scan.spacing,) * 2, d.frame_interval_s, d.eid)
    return d, image, label, measured, phantom_shapes.intended_phenotypes(d.geometry, d.frame_interval_s)


@pytest.fixture(scope="module")
def measured_cohort() -> list[tuple]:
    return [_draw_measure(3, i) for i in range(16)]


def test_measured_phenotypes_match_the_intended_geometry(measured_cohort: list[tuple]) -> None:
    errors = {c: [] for c in PHENOTYPE_COLUMNS}
    for d, _, _, measured, intended in measured_cohort:
        for col in PHENOTYPE_COLUMNS:
            errors[col].append(measured[col] - intended[col])
            if col in REL_TOL:
                rel = 100 * abs(measured[col] - intended[col]) / intended[col]
                assert rel <= REL_TOL[col], f"{d.eid} {col}: measured {measured[col]:.2f} intended {intended[col]:.2f}"
            elif col in ABS_TOL:
                assert abs(measured[col] - intended[col]) <= ABS_TOL[col], f"{d.eid} {col}"
    for col in ("WT septal (mm)", "WT lateral (mm)"):
        assert abs(np.mean(errors[col])) < 1.0, f"{col}: mean error {np.mean(errors[col]):.2f} mm"
    assert abs(np.mean(errors["LVEDV (mL)"])) < 2.0  # no systematic bias in the main volume


def test_cine_motion_and_labels(measured_cohort: list[tuple]) -> None:
    for d, image, label, measured, _ in measured_cohort:
        assert image.shape == label.shape == (50, *phantom_render.MATRIX) and image.dtype == np.int16
        assert set(np.unique(label)) == {0, 1, 2, 3, 4, 5}
        lv = (label == 1).sum((1, 2))
        la = (label == 4).sum((1, 2))
        es = int(np.argmin(lv))
        assert lv[0] >= lv.max() * 0.98, f"{d.eid}: frame 0 is not end-diastole"
        assert 8 <= es <= 30 and la[es] > la[0], f"{d.eid}: atria must fill while the ventricles eject"
        blood, myo = image[0][label[0] == 1].mean(), image[0][label[0] == 2].mean()
        assert blood > 1.8 * myo, f"{d.eid}: bSSFP contrast needs bright blood and dark myocardium"
        assert 40 <= measured["HR (bpm)"] <= 120


def test_class_distributions_overlap_but_differ() -> None:
    draws = [phantom.draw_subject(7, i, WEIGHTS) for i in range(480)]
    intended = [phantom_shapes.intended_phenotypes(d.geometry, d.frame_interval_s) for d in draws]
    table = np.array([[p[c] for c in PHENOTYPE_COLUMNS] for p in intended])
    y = np.array([d.row["diagnosis_index"] for d in draws])
    col = {c: table[:, i] for i, c in enumerate(PHENOTYPE_COLUMNS)}
    mean = lambda c, k: col[c][y == k].mean()
    assert mean("LVEDV (mL)", 1) > 1.25 * mean("LVEDV (mL)", 0) and mean("LVEF (%)", 1) < mean("LVEF (%)", 0) - 12
    assert mean("WT septal (mm)", 2) > mean("WT septal (mm)", 0) + 3 and mean("LVM (g)", 2) > mean("LVM (g)", 0)
    assert mean("RAV max (mL)", 3) > mean("RAV max (mL)", 0) + 15 and mean("LAEF (%)", 3) < mean("LAEF (%)", 0) - 10
    # healthy men and women near the UK Biobank reference (Petersen 2017): LVEDV 166 / 124 mL, LVEF 58 / 61 %
    sex = np.array([d.row["sex"] for d in draws])
    for s, edv in (("male", 166), ("female", 124)):
        sel = (y == 0) & (sex == s)
        assert abs(col["LVEDV (mL)"][sel].mean() - edv) < 0.12 * edv
        assert 54 < col["LVEF (%)"][sel].mean() < 64
    # not trivial: a nearest-centroid classifier on all true phenotypes is good but imperfect
    z = (table - table.mean(0)) / table.std(0)
    train = np.arange(len(y)) < 320
    centroids = np.stack([z[train & (y == k)].mean(0) for k in range(4)])
    pred = np.argmin(((z[~train, None] - centroids[None]) ** 2).sum(-1), 1)
    assert 0.6 < (pred == y[~train]).mean() < 0.97


def test_cohort_layout_determinism_and_workers(tmp_path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    phantom.make_cohort(a, 3, seed=5, num_workers=1, montage_subjects=2)
    phantom.make_cohort(b, 3, seed=5, num_workers=2, montage_subjects=2)
    phantom.make_cohort(c, 3, seed=6, num_workers=1, montage_subjects=2)
    for eid in ("PH000000", "PH000001", "PH000002"):
        img = nib.load(a / eid / "la_4ch.nii.gz")
        seg = nib.load(a / eid / "seg4_la_4ch.nii.gz")
        assert img.shape == seg.shape == (208, 180, 1, 50)
        assert img.header.get_xyzt_units() == ("mm", "sec")
        sx, sy, _, dt = img.header.get_zooms()
        assert 1.7 < sx == sy < 1.95 and 0.01 < dt < 0.03
        assert np.array_equal(img.get_fdata(), nib.load(b / eid / "la_4ch.nii.gz").get_fdata())
        assert nib.aff2axcodes(img.affine) == nib.aff2axcodes(seg.affine) == ("L", "P", "S")  # as UK Biobank
        image, label = load_subject(a / eid / "la_4ch.nii.gz", a / eid / "seg4_la_4ch.nii.gz", eid)
        assert image.orientation == label.orientation == "X, Y toward L, P: as stored"  # arrays prepare unturned
        assert np.array_equal(label.array, np.asarray(seg.dataobj)[:, :, 0])
        assert "synthetic" in img.header["descrip"].item().decode()
        assert not np.array_equal(img.get_fdata(), nib.load(c / eid / "la_4ch.nii.gz").get_fdata())
    _, table = read_phenotype_table(a / "phenotypes.csv", PHENOTYPE_COLUMNS)
    assert sorted(table) == ["PH000000", "PH000001", "PH000002"]
    assert (a / "phenotypes.csv").read_bytes() == (b / "phenotypes.csv").read_bytes()
    with open(a / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["eid"] for r in rows] == sorted(table) and set(rows[0]) == {"eid", *phantom.LABEL_COLUMNS}
    assert all(int(r["disease"]) == (r["diagnosis"] != "healthy") for r in rows)
    assert (a / "montage.png").stat().st_size > 10_000 and (a / "cohort.json").is_file()
    assert not list(a.rglob(".tmp-*")), "temporary files left behind"


def test_cli_overrides_and_unknown_key(tmp_path) -> None:
    run_bundle("configs/make_phantom.json", timeout=300, output_dir=tmp_path / "ph", num_subjects=2, seed=1)
    assert sorted(p.name for p in (tmp_path / "ph").iterdir() if p.is_dir()) == ["PH000000", "PH000001"]
    bad = run_bundle("configs/make_phantom.json", expect_failure=True, timeout=300, output_dir=tmp_path / "ph",
                     num_subject=2)
    assert "--num_subject (did you mean --num_subjects?)" in bad.stdout + bad.stderr


@pytest.mark.slow
def test_speed_500_subjects_under_3_minutes(tmp_path) -> None:
    start = time.perf_counter()
    phantom.make_cohort(tmp_path / "ph", 500, seed=0, num_workers=2)
    assert time.perf_counter() - start < 180


def test_refuses_a_non_empty_folder_it_did_not_make(tmp_path) -> None:
    """make_phantom overwrote the phenotypes.csv and labels.csv of any folder it was pointed at."""
    out = tmp_path / "data"
    out.mkdir()
    (out / "phenotypes.csv").write_text("eid,LVEF\n1,60\n")
    with pytest.raises(ValueError, match=f"--output_dir {out} is not empty and not a phantom cohort"):
        phantom.make_cohort(out, 1, seed=1, num_workers=1, montage_subjects=0)
    assert (out / "phenotypes.csv").read_text() == "eid,LVEF\n1,60\n"
    phantom.make_cohort(out, 1, seed=1, num_workers=1, montage_subjects=0, overwrite=True)
    phantom.make_cohort(out, 1, seed=1, num_workers=1, montage_subjects=0)  # a rerun of the same settings
    with pytest.raises(ValueError, match="a phantom cohort of other settings"):
        phantom.make_cohort(out, 1, seed=2, num_workers=1, montage_subjects=0)
    with pytest.raises(ValueError, match="--overwrite must be true or false, got 'yes'"):
        phantom.make_cohort(out, 1, seed=2, num_workers=1, montage_subjects=0, overwrite="yes")
