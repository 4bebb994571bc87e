"""Cardiac phenotypes from 4-chamber label cines (X, Y, T; labels as LABELS; frame 0 end-diastole), and table I/O.
Methods and units: docs/phenotypes.md."""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from scripts.data.cine import one_line
from scripts.data.cine_files import load_cine
from scripts.data.heart_crop import largest_components
from scripts.runtime.files import atomic_write

logger = logging.getLogger(__name__)


PHENOTYPE_COLUMNS: list[str] = [
    "LVEDV (mL)", "LVESV (mL)", "LVSV (mL)", "LVEF (%)", "LVCO (L/min)", "LVM (g)",
    "RVEDV (mL)", "RVESV (mL)", "RVSV (mL)", "RVEF (%)", "LAV max (mL)", "LAV min (mL)", "LASV (mL)", "LAEF (%)",
    "RAV max (mL)", "RAV min (mL)", "RASV (mL)", "RAEF (%)", "HR (bpm)", "WT septal (mm)", "WT lateral (mm)",
]
LABELS = {"LV": 1, "Myo": 2, "RV": 3, "LA": 4, "RA": 5}

MYOCARDIAL_DENSITY = 1.05  # g/mL
AREA_LENGTH = 8.0 / (3.0 * math.pi)  # V = AREA_LENGTH * A^2 / L (cm^2, cm -> mL)
WT_STEP_PX = 0.05  # wall-thickness sampling step, in pixels
ATRIAL_LINE_HALF_PX = 100  # half-length of the rasterised atrial major axis, in pixels
VALVE_GAP_MM = 4.5  # valve band: ventricle and atrium pixels this close (centre to centre) face each other across
# the valve. Bridges the 1-px gaps automatic segmentations leave (centres 2 px or sqrt(5) px apart, 3.7-4.1 mm at
# 1.83 mm pixels) but not 2-px gaps (3 px, 5.5 mm); docs/phenotypes.md


class PhenotypeError(ValueError):
    """A label cine from which the phenotypes cannot be measured."""


class PhenotypeTableError(ValueError):
    """A malformed phenotype table (or a bad request against one)."""


def _where(subject: str) -> str:
    return f"subject {subject!r}: " if subject else ""


# ----------------------------------------------------------------------------------------------------------- geometry
def _pixels(mask: np.ndarray, spacing: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frame index, mm coordinates (N, 2) and per-frame counts of the pixels of a (T, X, Y) mask (sorted by frame)."""
    t, i, j = np.nonzero(mask)
    return t, np.stack([i * spacing[0], j * spacing[1]], 1), np.bincount(t, minlength=mask.shape[0])


def _frame_mean(t: np.ndarray, pts: np.ndarray, n_frames: int) -> np.ndarray:
    """Per-frame mean (T, 2) of points (N, 2) in frames t; NaN for frames without points."""
    counts = np.bincount(t, minlength=n_frames)
    sums = np.stack([np.bincount(t, pts[:, k], minlength=n_frames) for k in range(2)], 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts[:, None]


def _disk_offsets(spacing: tuple[float, float], radius_mm: float) -> list[tuple[int, int]]:
    """Pixel offsets (di, dj) != (0, 0) whose centres lie within radius_mm of the origin."""
    ri, rj = (int(radius_mm / s * (1 + 1e-9)) for s in spacing)
    return [(di, dj) for di in range(-ri, ri + 1) for dj in range(-rj, rj + 1)
            if (di, dj) != (0, 0) and (di * spacing[0]) ** 2 + (dj * spacing[1]) ** 2 <= radius_mm**2 * (1 + 1e-9)]


def _near(mask: np.ndarray, offsets: list[tuple[int, int]]) -> np.ndarray:
    """Pixels of a (T, X, Y) mask's frames within the given in-plane offsets of a mask pixel (never across frames)."""
    out = mask.copy()
    nx, ny = mask.shape[1:]
    for di, dj in offsets:
        out[:, max(di, 0):nx + min(di, 0), max(dj, 0):ny + min(dj, 0)] |= \
            mask[:, max(-di, 0):nx + min(-di, 0), max(-dj, 0):ny + min(-dj, 0)]
    return out


def _valve_gap_mm(spacing: tuple[float, float]) -> float:
    """VALVE_GAP_MM, but at least one pixel, so that 4-adjacent (touching) pixels always count."""
    return max(VALVE_GAP_MM, *spacing)


def _valve_midpoints(chamber: np.ndarray, atrium: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
    """Per-frame valve midpoint (T, 2) in mm of (T, X, Y) masks: mean of the two valve-band centroids (chamber pixels
    near the atrium, atrium pixels near the chamber); NaN in frames without a band."""
    offsets = _disk_offsets(spacing, _valve_gap_mm(spacing))
    n_frames = chamber.shape[0]
    sides = []
    for own, other in ((chamber, atrium), (atrium, chamber)):
        t, pts, _ = _pixels(own & _near(other, offsets), spacing)
        sides.append(_frame_mean(t, pts, n_frames))
    return (sides[0] + sides[1]) / 2.0


def _principal_extent(pts: np.ndarray) -> tuple[np.ndarray, float, float]:
    """First principal axis (unit) of points (N, 2) and the points' min/max projections on it, about their centroid."""
    centred = pts - pts.mean(0)
    axis = np.linalg.eigh(centred.T @ centred)[1][:, -1]
    proj = centred @ axis
    return axis, float(proj.min()), float(proj.max())


def _ventricle(chamber: np.ndarray, atrium: np.ndarray, spacing: tuple[float, float], name: str, subject: str,
               away_from_atria: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Valve-to-apex area-length volumes (mL), base and apex (mm) per frame, and the mask of frames with a valve band.
    Frames without one use the first principal axis extent (apex on the `away_from_atria` side) and are logged."""
    base = _valve_midpoints(chamber, atrium, spacing)
    t, pts, counts = _pixels(chamber, spacing)
    dist = np.hypot(*(pts - base[t]).T)
    ends = np.cumsum(counts)
    last = np.lexsort((dist, t))[ends - 1]  # farthest pixel of every frame
    apex, length = pts[last], dist[last] / 10.0
    has_valve = ~np.isnan(base[:, 0])
    if not has_valve.all():
        logger.warning("%s%s: no %s-atrium interface (no pixels within %g mm of each other) in frames %s; using the "
                       "principal-axis extent as L", _where(subject), name, name, _valve_gap_mm(spacing),
                       np.flatnonzero(~has_valve).tolist())
    for f in np.flatnonzero(~has_valve):
        fp = pts[ends[f] - counts[f]:ends[f]]
        axis, lo, hi = _principal_extent(fp)
        if axis @ away_from_atria < 0:
            axis, lo, hi = -axis, -hi, -lo
        centre = fp.mean(0)
        base[f], apex[f], length[f] = centre + lo * axis, centre + hi * axis, (hi - lo) / 10.0
    area = counts * spacing[0] * spacing[1] / 100.0
    return AREA_LENGTH * area**2 / length, base, apex, has_valve


def _atrium(mask: np.ndarray, axis: np.ndarray, spacing: tuple[float, float], name: str, subject: str) -> np.ndarray:
    """Per-frame single-plane area-length volumes (mL) of an atrium, the UK Biobank pipeline's major-axis method."""
    n_frames, nx, ny = mask.shape
    t, pts, counts = _pixels(mask, spacing)
    ij = pts / np.asarray(spacing)
    order = np.lexsort((pts @ axis, t))
    t, ij = t[order], ij[order]
    rank = np.arange(t.size) - (np.cumsum(counts) - counts)[t]
    upper, lower = rank >= 2 * counts[t] // 3, rank < counts[t] // 3  # top and bottom thirds along the long axis
    top, bottom = _frame_mean(t[upper], ij[upper], n_frames), _frame_mean(t[lower], ij[lower], n_frames)
    direction = top - bottom
    major = np.abs(direction).max(1, keepdims=True)
    bad = np.flatnonzero(~(major[:, 0] > 0))
    if bad.size:
        raise PhenotypeError(f"{_where(subject)}frame {bad[0]}: {name} too small to define its major axis")
    steps = np.arange(-ATRIAL_LINE_HALF_PX, ATRIAL_LINE_HALF_PX + 1)  # one pixel per step along the major coordinate
    line = np.floor(top[:, None, :] + steps[None, :, None] * (direction / major)[:, None, :] + 0.5).astype(np.int64)
    inside = (line[..., 0] >= 0) & (line[..., 0] < nx) & (line[..., 1] >= 0) & (line[..., 1] < ny)
    li, lj = np.clip(line[..., 0], 0, nx - 1), np.clip(line[..., 1], 0, ny - 1)
    inside &= mask[np.arange(n_frames)[:, None], li, lj]
    empty = np.flatnonzero(~inside.any(1))
    if empty.size:
        raise PhenotypeError(f"{_where(subject)}frame {empty[0]}: {name} major axis does not cross the {name}")
    line_mm = line * np.asarray(spacing, float)
    proj = line_mm @ axis
    rows = np.arange(n_frames)
    lo = np.where(inside, proj, np.inf).argmin(1)
    hi = np.where(inside, proj, -np.inf).argmax(1)
    length = np.hypot(*(line_mm[rows, hi] - line_mm[rows, lo]).T) / 10.0
    if np.any(length <= 0):
        f = int(np.flatnonzero(length <= 0)[0])
        raise PhenotypeError(f"{_where(subject)}frame {f}: {name} major axis crosses a single pixel (zero length)")
    area = counts * spacing[0] * spacing[1] / 100.0
    return AREA_LENGTH * area**2 / length


def _wall_thickness(lv: np.ndarray, myo: np.ndarray, base: np.ndarray, apex: np.ndarray, rv_centroid: np.ndarray,
                    spacing: tuple[float, float], subject: str) -> tuple[float, float]:
    """Septal and lateral myocardial thickness (mm) at ED, across the valve-apex segment at half its length."""
    mid = (base + apex) / 2.0
    seg = apex - base
    normal = np.array([-seg[1], seg[0]]) / np.hypot(*seg)
    step = WT_STEP_PX * min(spacing)
    s = np.arange(int(np.hypot(*np.asarray(lv.shape, float) * spacing) / step) + 1) * step
    thickness = []
    for sign in (1.0, -1.0):
        pix = np.floor((mid + sign * s[:, None] * normal) / np.asarray(spacing) + 0.5).astype(np.int64)
        ok = (pix >= 0).all(1) & (pix < lv.shape).all(1)
        pix = np.where(ok[:, None], pix, 0)
        in_lv, in_myo = lv[pix[:, 0], pix[:, 1]] & ok, myo[pix[:, 0], pix[:, 1]] & ok
        if not in_lv[0]:
            raise PhenotypeError(f"{_where(subject)}frame 0: wall-thickness mid-point lies outside the LV cavity")
        k0 = int(np.argmin(in_lv))  # first sample after the cavity
        run = in_myo[k0:]
        thickness.append((int(np.argmin(run)) if not run.all() else run.size) * step)
    septal_first = (rv_centroid - mid) @ normal >= 0
    return (thickness[0], thickness[1]) if septal_first else (thickness[1], thickness[0])


# -------------------------------------------------------------------------------------------------------- measurement
def _check(label: np.ndarray, subject: str) -> None:
    """Raise PhenotypeError for a cine that is not (X, Y, T), has T < 2, or misses a chamber in some frame."""
    if label.ndim != 3:
        raise PhenotypeError(f"{_where(subject)}label cine must be (X, Y, T), got shape {label.shape}")
    if label.shape[2] < 2:
        raise PhenotypeError(f"{_where(subject)}frame 0: need at least 2 frames, got {label.shape[2]}")
    for name, value in LABELS.items():
        absent = np.flatnonzero(~(label == value).any((0, 1)))
        if absent.size:
            raise PhenotypeError(f"{_where(subject)}frame {absent[0]}: label {value} ({name}) is absent "
                                 f"(absent in {absent.size} frame(s))")


def _ejection(v_max: float, v_min: float) -> list[float]:
    """[max volume, min volume, stroke volume, ejection fraction (%)]."""
    return [v_max, v_min, v_max - v_min, 100.0 * (v_max - v_min) / v_max]


def measure_cine(label: np.ndarray, spacing_mm: tuple[float, float], frame_interval_s: float,
                 subject: str = "") -> dict[str, float]:
    """Measure all PHENOTYPE_COLUMNS from a label cine (X, Y, T) with pixel spacing (mm) and frame interval (s)."""
    label = np.asarray(label)
    _check(label, subject)
    if not frame_interval_s > 0:
        raise PhenotypeError(f"{_where(subject)}frame interval must be > 0 s, got {frame_interval_s}")
    spacing = (float(spacing_mm[0]), float(spacing_mm[1]))
    heart = np.nonzero((label > 0).any(2))
    lo = [max(int(a.min()) - 2, 0) for a in heart]
    label = np.moveaxis(label[lo[0]:heart[0].max() + 3, lo[1]:heart[1].max() + 3], 2, 0)  # (T, X, Y), cropped
    m = {name: largest_components(label == value) for name, value in LABELS.items()}

    atria_c = _pixels(m["LA"][:1] | m["RA"][:1], spacing)[1].mean(0)
    ventricles_c = _pixels(m["LV"][:1] | m["RV"][:1], spacing)[1].mean(0)
    axis = (ventricles_c - atria_c) / np.hypot(*(ventricles_c - atria_c))  # fallback heart long axis
    lv_v, lv_base, lv_apex, has_valve = _ventricle(m["LV"], m["LA"], spacing, "LV", subject, axis)
    if has_valve[0]:
        axis = (lv_apex[0] - lv_base[0]) / np.hypot(*(lv_apex[0] - lv_base[0]))
    rv_v = _ventricle(m["RV"], m["RA"], spacing, "RV", subject, axis)[0]
    la_v = _atrium(m["LA"], axis, spacing, "LA", subject)
    ra_v = _atrium(m["RA"], axis, spacing, "RA", subject)

    heart_rate = 60.0 / (label.shape[0] * frame_interval_s)
    lv = _ejection(lv_v[0], lv_v.min())  # ES = argmin of the LV volume
    epi = ndimage.binary_fill_holes(m["LV"][0] | m["Myo"][0])
    epi_pts = _pixels(epi[None], spacing)[1]
    epi_len = np.hypot(*(epi_pts - lv_base[0]).T).max() / 10.0
    epi_v = AREA_LENGTH * (epi_pts.shape[0] * spacing[0] * spacing[1] / 100.0) ** 2 / epi_len
    rv_c = _pixels(m["RV"][:1], spacing)[1].mean(0)
    wt_septal, wt_lateral = _wall_thickness(m["LV"][0], m["Myo"][0], lv_base[0], lv_apex[0], rv_c, spacing, subject)
    values = [*lv, lv[2] * heart_rate / 1000.0, MYOCARDIAL_DENSITY * (epi_v - lv_v[0]),
              *_ejection(rv_v[0], rv_v.min()), *_ejection(la_v.max(), la_v.min()), *_ejection(ra_v.max(), ra_v.min()),
              heart_rate, wt_septal, wt_lateral]
    return {c: float(v) for c, v in zip(PHENOTYPE_COLUMNS, values)}


def measure_nifti(path: str | Path, subject: str = "") -> dict[str, float]:
    """Load and validate a label cine (NIfTI X x Y x 1 x T, or a DICOM series folder) and measure it."""
    cine = load_cine(path, subject)
    return measure_cine(np.rint(cine.array).astype(np.int16), cine.spacing_mm, cine.frame_interval_s, subject)


# --------------------------------------------------------------------------------------------------------- table I/O
def _parse_value(cell: str, where: str) -> float:
    """A finite float from a CSV cell, or PhenotypeTableError naming `where`."""
    if not cell.strip():
        raise PhenotypeTableError(f"{where}: missing value (empty cell)")
    try:
        value = float(cell)
    except ValueError:
        raise PhenotypeTableError(f"{where}: non-numeric value {cell!r}") from None
    if not math.isfinite(value):
        raise PhenotypeTableError(f"{where}: missing value ({cell.strip()})")
    return value


def read_eid_table(path: str | Path) -> tuple[list[str], list[tuple[int, str, list[str]]]]:
    """Read a CSV whose first column is `eid`: (header, [(row number, eid, cells)]), blank lines skipped.
    PhenotypeTableError names the file and the row (header = row 1) for any malformed table, row or eid."""
    path = Path(path)
    if not path.is_file():
        raise PhenotypeTableError(f"{path}: table not found")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = [(n, r) for n, r in enumerate(csv.reader(f), 1) if r]
    except (UnicodeDecodeError, csv.Error) as error:  # binary bytes, NUL characters
        raise PhenotypeTableError(f"{path}: cannot be read as a UTF-8 CSV table ({one_line(error)})") from error
    if not rows:
        raise PhenotypeTableError(f"{path}: empty file (no header)")
    header = [h.strip() for h in rows[0][1]]
    if header[0] != "eid":
        raise PhenotypeTableError(f"{path}: first column must be 'eid', got {header[0]!r}")
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise PhenotypeTableError(f"{path}: duplicate column names {dupes}")
    if len(rows) == 1:
        raise PhenotypeTableError(f"{path}: no subject rows")
    first_row: dict[str, int] = {}
    out = []
    for n, row in rows[1:]:
        eid = row[0].strip()
        if not eid:
            raise PhenotypeTableError(f"{path}: row {n}: empty eid")
        if eid in first_row:
            raise PhenotypeTableError(f"{path}: row {n}: duplicate eid {eid!r} (first at row {first_row[eid]})")
        if len(row) != len(header):
            raise PhenotypeTableError(f"{path}: row {n} (eid {eid!r}): {len(row)} cells, header has {len(header)}")
        first_row[eid] = n
        out.append((n, eid, row))
    return header, out


def read_phenotype_table(path: str | Path, columns: Sequence[str] | None = None
                         ) -> tuple[list[str], dict[str, dict[str, float]]]:
    """Read a CSV phenotype table whose first column is `eid`: (columns, {eid: {column: value}}); only `columns`, if
    given, are returned and checked. PhenotypeTableError as `read_eid_table`, or absent/non-numeric/missing values."""
    header, rows = read_eid_table(path)
    wanted = list(columns) if columns is not None else header[1:]
    absent = [c for c in wanted if c not in header[1:]]
    if absent:
        raise PhenotypeTableError(f"{path}: columns not in the table: {absent}")
    index = [header.index(c) for c in wanted]
    return wanted, {eid: {c: _parse_value(row[k], f"{path}: row {n}, eid {eid!r}, column {c!r}")
                          for c, k in zip(wanted, index)} for n, eid, row in rows}


def write_phenotype_table(path: str | Path, columns: Sequence[str], rows: dict[str, dict[str, float]]) -> None:
    """Write {eid: {column: value}} as CSV (eid first), atomically."""
    path = Path(path)
    lines = [["eid", *columns]]
    for eid, values in rows.items():
        absent = [c for c in columns if c not in values]
        if not str(eid).strip() or absent:
            raise PhenotypeTableError(f"{path}: eid {eid!r}: empty eid or missing columns {absent}")
        cells = [float(values[c]) for c in columns]
        bad = [c for c, v in zip(columns, cells) if not math.isfinite(v)]
        if bad:
            raise PhenotypeTableError(f"{path}: eid {eid!r}: non-finite values in columns {bad}")
        lines.append([str(eid), *map(repr, cells)])
    with atomic_write(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(lines)


# ------------------------------------------------------------------------------------------------------ normalisation
def fit_normaliser(table: dict[str, dict[str, float]], eids: Sequence[str], columns: Sequence[str]) -> dict:
    """Z-score statistics (population std) of `columns` over `eids` only (the training split)."""
    missing = [e for e in eids if e not in table]
    if not eids or missing:
        raise PhenotypeTableError(f"cannot fit the normaliser: no eids given or eids not in the table: {missing[:10]}")
    values = np.array([[table[e][c] for c in columns] for e in eids], dtype=np.float64)
    mean, std = values.mean(0), values.std(0)
    flat = [c for c, s in zip(columns, std) if not s > 0]
    if flat or len(eids) == 1:
        logger.warning("normaliser: std set to 1.0 for %s (n=%d)", flat if len(eids) > 1 else "all columns", len(eids))
        std = np.where((std > 0) & (len(eids) > 1), std, 1.0)
    return {"columns": list(columns), "mean": mean.tolist(), "std": std.tolist(), "n": len(eids)}


def normalise(values: Sequence[float] | np.ndarray, stats: dict) -> np.ndarray:
    """(values - mean) / std along the last axis."""
    return (np.asarray(values, dtype=np.float64) - np.asarray(stats["mean"])) / np.asarray(stats["std"])


def denormalise(z: Sequence[float] | np.ndarray, stats: dict) -> np.ndarray:
    """z * std + mean along the last axis (the inverse of normalise)."""
    return np.asarray(z, dtype=np.float64) * np.asarray(stats["std"]) + np.asarray(stats["mean"])
