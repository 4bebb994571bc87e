"""Cardiac cine phantom: balanced-SSFP 4-chamber cines with exact label cines and known phenotypes.

Each subject draws target phenotypes from its class (healthy, dilated, hypertrophic, restrictive cardiomyopathy),
turns them into per-frame chamber geometry (half-ellipse ventricles, a crescent RV hugging the septum, atria as
ellipses cut by the atrioventricular plane), renders 50 frames with thoracic anatomy, coil bias field and Rician
noise, and is measured with `scripts.data.phenotypes`, the same code that measures real cines.

Geometry lives in heart coordinates, in mm: `u` runs from the atrioventricular (AV) plane towards the apex along the
long axis, `v` across it, positive towards the septum/RV. The epicardial apex is fixed; the AV plane descends in
systole, so the atria lengthen while the ventricles eject.
"""

from __future__ import annotations

import csv
import logging
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter

from scripts.data.phenotypes import PHENOTYPE_COLUMNS, measure_cine, write_phenotype_table
from scripts.runtime.files import atomic_write, write_json
from scripts.runtime.montage import save_montage

logger = logging.getLogger(__name__)


logger = logging.getLogger(__name__)

CLASSES = ("healthy", "dilated", "hypertrophic", "restrictive")
LABEL_COLUMNS = ["diagnosis", "diagnosis_index", "disease", "sex"]
MATRIX = (180, 208)  # display rows (anterior at the top) x columns, as UK Biobank's 208 x 180 4-chamber cines
ATRIAL_CAP = 0.25  # fraction of each atrial ellipse's long semi-axis cut off by the AV plane
LV_CAP = 0.3  # the same for the LV cavity: its base (mitral annulus) is narrower than its mid-cavity

# Target distributions, (mean, sd) per class. LVEDV is a multiple of the sex-specific UK Biobank healthy mean
# (Petersen 2017: 166 / 124 mL, men / women); the rest are absolute values in the columns' units.
SEX_LVEDV = {"male": (166.0, 32.0), "female": (124.0, 21.0)}
SEX_RVEDV = {"male": (180.0, 34.0), "female": (135.0, 25.0)}
TARGETS: dict[str, dict[str, tuple[float, float]]] = {
    "healthy": {"lvedv_x": (1.0, 0.0), "lvef": (59, 5), "rvedv_x": (1.0, 0.0), "rvef": (56, 5), "lav": (72, 17),
                "laef": (58, 8), "rav": (95, 22), "raef": (45, 8), "wts": (9.0, 1.3), "wtl": (8.0, 1.3),
                "hr": (66, 10), "sphericity": (0.34, 0.03)},
    "dilated": {"lvedv_x": (1.4, 0.25), "lvef": (38, 9), "rvedv_x": (1.1, 0.2), "rvef": (47, 9), "lav": (92, 24),
                "laef": (43, 11), "rav": (105, 26), "raef": (40, 10), "wts": (7.8, 1.3), "wtl": (7.2, 1.3),
                "hr": (74, 12), "sphericity": (0.41, 0.05)},
    "hypertrophic": {"lvedv_x": (0.9, 0.16), "lvef": (66, 6), "rvedv_x": (0.95, 0.15), "rvef": (59, 6),
                     "lav": (90, 24), "laef": (48, 10), "rav": (95, 24), "raef": (44, 9), "wts": (14.0, 3.2),
                     "wtl": (10.0, 2.2), "hr": (64, 10), "sphericity": (0.32, 0.03)},
    "restrictive": {"lvedv_x": (0.85, 0.15), "lvef": (55, 7), "rvedv_x": (0.88, 0.15), "rvef": (51, 8),
                    "lav": (105, 28), "laef": (38, 11), "rav": (125, 32), "raef": (34, 10), "wts": (10.8, 1.8),
                    "wtl": (10.2, 1.8), "hr": (76, 12), "sphericity": (0.34, 0.03)},
}
# Diastolic filling per class: (early-filling duration s, fraction of SV refilled after early filling, after diastasis).
FILLING = {"healthy": (0.16, 0.70, 0.80), "dilated": (0.16, 0.65, 0.75), "hypertrophic": (0.24, 0.45, 0.58),
           "restrictive": (0.11, 0.90, 0.95)}
BOUNDS = {"lvef": (12, 82), "rvef": (20, 78), "laef": (10, 80), "raef": (10, 75), "wts": (5, 30), "wtl": (4.5, 20),
          "hr": (45, 115), "sphericity": (0.25, 0.6), "lav": (30, 220), "rav": (35, 260)}


@dataclass(frozen=True)
class Geometry:
    """Per-frame chamber geometry in mm (arrays over T); see the module docstring for coordinates.

    The LV cavity, LA and RA are ellipses cut by the AV plane (u = 0): semi-axes (along u, across) per frame in
    `lv`, `la`, `ra`. The epicardium is the LV ellipse grown by `ta` at the apex and `ts` / `tl` across (septal /
    lateral). The RV cavity is the crescent between the septal epicardium and a width profile `w_rv`, up to `a_rv`.
    """

    lv: np.ndarray  # (T, 2)
    ta: np.ndarray
    ts: np.ndarray
    tl: np.ndarray
    a_rv: np.ndarray
    w_rv: np.ndarray
    la: np.ndarray  # (T, 2)
    ra: np.ndarray  # (T, 2)
    v_la: float  # LA centre across the long axis
    v_ra: float  # RA centre across the long axis

    def lv_centre(self) -> np.ndarray:
        """u of the LV ellipse centre, per frame."""
        return self.lv[:, 0] * (1 - LV_CAP)

    def epi_len(self) -> np.ndarray:
        """Distance from the AV plane to the epicardial apex, per frame (the apex itself does not move)."""
        return self.lv[:, 0] * (2 - LV_CAP) + self.ta


def sample_targets(rng: np.random.Generator, diagnosis: str, sex: str) -> dict[str, float]:
    """Target phenotypes of one subject, drawn from its class distribution and clipped to plausible bounds."""
    p = {k: rng.normal(m, s) for k, (m, s) in TARGETS[diagnosis].items()}
    size = rng.normal(0, 1)  # one body-size draw drives both ventricles, so they stay matched
    p["lvedv"] = (SEX_LVEDV[sex][0] + size * SEX_LVEDV[sex][1]) * p.pop("lvedv_x")
    p["rvedv"] = (SEX_RVEDV[sex][0] + (0.8 * size + 0.6 * rng.normal()) * SEX_RVEDV[sex][1]) * p.pop("rvedv_x")
    p["lvedv"], p["rvedv"] = max(p["lvedv"], 60.0), max(p["rvedv"], 60.0)
    if sex == "female":
        p["wts"], p["wtl"] = p["wts"] - 0.8, p["wtl"] - 0.7
    for key, (lo, hi) in BOUNDS.items():
        p[key] = float(np.clip(p[key], lo, hi))
    return p


def _ramp(x: np.ndarray) -> np.ndarray:
    """Smooth 0 -> 1 step on [0, 1]."""
    return 0.5 - 0.5 * np.cos(np.pi * np.clip(x, 0, 1))


def volume_curves(p: dict[str, float], diagnosis: str, frames: int) -> dict[str, np.ndarray]:
    """Per-frame chamber volumes (mL) over one R-R interval starting at end-diastole.

    Ventricles eject until end-systole, refill early, rest in diastasis and top up with atrial contraction; the
    atria fill while the ventricles eject (reservoir), empty passively in early filling (conduit) and then
    contract (booster), so their minimum falls at end-diastole.
    """
    rr = 60.0 / p["hr"]
    t = np.arange(frames) / frames * rr  # seconds from end-diastole
    t_es = 0.33 * rr**0.4
    d_early, f_early, f_diast = FILLING[diagnosis]
    t_kick = rr - 0.14
    diastole = (
        f_early * _ramp((t - t_es) / d_early)
        + (f_diast - f_early) * _ramp((t - t_es - d_early) / max(t_kick - t_es - d_early, 1e-3))
        + (1 - f_diast) * _ramp((t - t_kick) / 0.14)
    )
    ventricle = np.where(t <= t_es, 1 - _ramp(t / t_es), diastole)
    atrium = np.where(t <= t_es, _ramp(t / t_es), 1 - diastole)

    def curve(edv: float, ef: float, shape: np.ndarray) -> np.ndarray:
        return edv * (1 - ef / 100 * (1 - shape))

    return {"lv": curve(p["lvedv"], p["lvef"], ventricle), "rv": curve(p["rvedv"], p["rvef"], ventricle),
            "la": curve(p["lav"], p["laef"], atrium), "ra": curve(p["rav"], p["raef"], atrium)}


def _cap_area(cap: float) -> float:
    """Area (over p q) of the part of an ellipse beyond a chord at distance (1 - cap) p from its centre."""
    d = 1 - cap
    return float(np.arccos(d) - d * np.sqrt(1 - d * d))


def _cut_constant(cap: float) -> float:
    """k in V = k p q^2: area-length volume (A^2 / L) of a cut ellipse measured from the cut to the far end."""
    return 8 / (3 * np.pi) * (np.pi - _cap_area(cap)) ** 2 / (2 - cap)


def _axes_for_volume(vol_ml: np.ndarray, ratio: float | np.ndarray, cap: float) -> np.ndarray:
    """Semi-axes (T, 2) of cut ellipses with short/long ratio `ratio` whose area-length volume is `vol_ml`."""
    p = (vol_ml * 1e3 / (_cut_constant(cap) * ratio**2)) ** (1 / 3)
    return np.stack([p, ratio * p], axis=1)


def _halfwidth(u: np.ndarray, centre: np.ndarray, p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Half-width across the long axis of an ellipse (centre u, semi-axes p, q) at distance u from the AV plane."""
    return q * np.sqrt(np.clip(1 - ((u - centre) / p) ** 2, 0, None))


def _septal_boundary(u: np.ndarray, g: Geometry, t: slice | tuple | np.ndarray = slice(None)) -> np.ndarray:
    """v of the septal epicardium at distance u from the AV plane."""
    return _halfwidth(u, g.lv_centre()[t], g.lv[:, 0][t] + g.ta[t], g.lv[:, 1][t] + g.ts[t])


def _epi_area(g_lv: np.ndarray, ta: np.ndarray, ts: np.ndarray, tl: np.ndarray) -> np.ndarray:
    """Area (mm^2) of the epicardial region (cut at the AV plane) for LV semi-axes g_lv and wall parameters."""
    p = g_lv[:, 0] + ta
    d = g_lv[:, 0] * (1 - LV_CAP) / p  # centre distance from the cut, over p
    cap = np.arccos(d) - d * np.sqrt(1 - d * d)
    return p * (2 * g_lv[:, 1] + ts + tl) / 2 * (np.pi - cap)


def chamber_geometry(p: dict[str, float], vols: dict[str, np.ndarray]) -> Geometry:
    """Chamber shapes whose area-length volumes follow the volume curves, with constant myocardial area."""
    ed = _axes_for_volume(vols["lv"][:1], p["sphericity"], LV_CAP)[0]
    long_ = ed[0] * (vols["lv"] / vols["lv"][0]) ** 0.22  # long-axis shortening of about 15-20% at normal EF
    lv = np.stack([long_, np.sqrt(vols["lv"] * 1e3 / (_cut_constant(LV_CAP) * long_))], axis=1)
    walls = np.array([0.75 * p["wtl"], p["wts"], p["wtl"]])
    myo = _epi_area(lv[:1], *walls[:, None]) - lv[0, 0] * lv[0, 1] * (np.pi - _cap_area(LV_CAP))
    cavity = lv[:, 0] * lv[:, 1] * (np.pi - _cap_area(LV_CAP))
    lo, hi = np.full(len(lv), 0.3), np.full(len(lv), 3.0)
    for _ in range(40):  # wall scale k per frame so that the myocardial area stays at its end-diastolic value
        k = (lo + hi) / 2
        big = _epi_area(lv, *(k * walls[:, None])) - cavity > myo
        hi, lo = np.where(big, k, hi), np.where(big, lo, k)
    ta, ts, tl = (lo + hi) / 2 * walls[:, None]
    g = Geometry(lv, ta, ts, tl, 0.85 * lv[:, 0] * (2 - LV_CAP), np.zeros(len(lv)), np.zeros((len(lv), 2)),
                 np.zeros((len(lv), 2)), 0.0, 0.0)
    # RV width from its area-length volume (area pi/4 w a_rv); its length depends weakly on the width, so iterate
    w = np.full(len(lv), 30.0)
    for _ in range(5):
        length = np.hypot(g.a_rv, _septal_boundary(g.a_rv, g) - _septal_boundary(np.zeros(len(lv)), g) - w / 2)
        w = 4 * np.sqrt(vols["rv"] * 1e3 * length * 3 * np.pi / 8) / (np.pi * g.a_rv)
    la = _axes_for_volume(vols["la"], 0.8, ATRIAL_CAP)
    ra = _axes_for_volume(vols["ra"], 0.8, ATRIAL_CAP)
    v_ra = float(_septal_boundary(np.zeros(1), g, slice(0, 1))[0] + w[0] / 2)
    v_la = min(0.0, v_ra - ra[:, 1].max() - la[:, 1].max() - 4.0)
    return Geometry(lv, ta, ts, tl, g.a_rv, w, la, ra, v_la, v_ra)


def _valve_midpoint(lo1: np.ndarray, hi1: np.ndarray, lo2: np.ndarray, hi2: np.ndarray) -> np.ndarray:
    """Centre of the overlap of two intervals across the long axis (the valve between chamber and atrium)."""
    return 0.5 * (np.maximum(lo1, lo2) + np.minimum(hi1, hi2))


def _cut_halfwidth(ax: np.ndarray, cap: float) -> np.ndarray:
    """Half-width of cut ellipses (T, 2) at the AV plane."""
    d = 1 - cap
    return ax[:, 1] * np.sqrt(1 - d * d)


def _farthest(u: np.ndarray, v: np.ndarray, v0: np.ndarray) -> np.ndarray:
    """Largest distance from (0, v0[t]) to the boundary points (u[t], v[t])."""
    return np.hypot(u, v - v0[:, None]).max(1)


def intended_phenotypes(g: Geometry, frame_interval_s: float) -> dict[str, float]:
    """Phenotypes of the continuous geometry by the definitions of `scripts.data.phenotypes` (no rasterisation)."""
    n = len(g.lv)
    theta = np.linspace(-np.pi / 2, np.pi / 2, 4001)[None]
    lv_c = g.lv_centre()[:, None]
    mv = _valve_midpoint(-_cut_halfwidth(g.lv, LV_CAP), _cut_halfwidth(g.lv, LV_CAP),
                         g.v_la - _cut_halfwidth(g.la, ATRIAL_CAP), g.v_la + _cut_halfwidth(g.la, ATRIAL_CAP))
    u_lv = lv_c + g.lv[:, :1] * np.cos(theta)
    keep = u_lv >= 0
    l_lv = _farthest(np.where(keep, u_lv, 0), np.where(keep, g.lv[:, 1:] * np.sin(theta), 0), mv)
    area_lv = g.lv[:, 0] * g.lv[:, 1] * (np.pi - _cap_area(LV_CAP))
    v_lv = 8 / (3 * np.pi) * area_lv**2 / l_lv / 1e3
    es = int(np.argmin(v_lv))
    # RV crescent between the septal epicardium and the width profile
    e0 = _septal_boundary(np.zeros(n), g)
    tv = _valve_midpoint(e0, e0 + g.w_rv, g.v_ra - _cut_halfwidth(g.ra, ATRIAL_CAP), g.v_ra + _cut_halfwidth(g.ra, ATRIAL_CAP))
    us = g.a_rv[:, None] * np.linspace(0, 1, 4001)[None]
    inner = _septal_boundary(us, g, np.arange(n)[:, None])
    outer = inner + g.w_rv[:, None] * np.sqrt(np.clip(1 - (us / g.a_rv[:, None]) ** 2, 0, None))
    l_rv = np.maximum(_farthest(us, inner, tv), _farthest(us, outer, tv))
    v_rv = 8 / (3 * np.pi) * (np.pi / 4 * g.w_rv * g.a_rv) ** 2 / l_rv / 1e3
    atria = {k: _cut_constant(ATRIAL_CAP) * ax[:, 0] * ax[:, 1] ** 2 / 1e3 for k, ax in (("LA", g.la), ("RA", g.ra))}
    # LV mass at ED; wall thickness across the long axis at half the mitral-apex length
    epi_area = _epi_area(g.lv[:1], g.ta[:1], g.ts[:1], g.tl[:1])[0]
    l_epi = g.epi_len()[0] if abs(mv[0]) < 1e-9 else np.hypot(g.epi_len()[0], mv[0])
    v_epi = 8 / (3 * np.pi) * epi_area**2 / l_epi / 1e3
    um = l_lv[0] / 2
    cav = _halfwidth(um, lv_c[0, 0], g.lv[0, 0], g.lv[0, 1])
    wall = [_halfwidth(um, lv_c[0, 0], g.lv[0, 0] + g.ta[0], g.lv[0, 1] + t) - cav for t in (g.ts[0], g.tl[0])]
    hr = 60.0 / (n * frame_interval_s)
    sv = v_lv[0] - v_lv[es]
    out = {
        "LVEDV (mL)": v_lv[0], "LVESV (mL)": v_lv[es], "LVSV (mL)": sv, "LVEF (%)": 100 * sv / v_lv[0],
        "LVCO (L/min)": sv * hr / 1e3, "LVM (g)": 1.05 * (v_epi - v_lv[0]),
        "RVEDV (mL)": v_rv[0], "RVESV (mL)": v_rv.min(), "RVSV (mL)": v_rv[0] - v_rv.min(),
        "RVEF (%)": 100 * (v_rv[0] - v_rv.min()) / v_rv[0],
    }
    for k, v in atria.items():
        out |= {f"{k}V max (mL)": v.max(), f"{k}V min (mL)": v.min(), f"{k}SV (mL)": v.max() - v.min(),
                f"{k}EF (%)": 100 * (v.max() - v.min()) / v.max()}
    out |= {"HR (bpm)": hr, "WT septal (mm)": wall[0], "WT lateral (mm)": wall[1]}
    return {k: float(out[k]) for k in PHENOTYPE_COLUMNS}


# ----------------------------------------------------------------------------------------------------------- render
def _ellipse_sdf(x: np.ndarray, y: np.ndarray, rx: float | np.ndarray, ry: float | np.ndarray) -> np.ndarray:
    """Approximate signed distance (mm, negative inside) to an axis-aligned ellipse centred at the origin."""
    f = (x / rx) ** 2 + (y / ry) ** 2 - 1
    grad = 2 * np.sqrt((x / rx**2) ** 2 + (y / ry**2) ** 2)
    return f / np.maximum(grad, 1e-3)


def _alpha(sdf: np.ndarray, px: float) -> np.ndarray:
    """Partial-volume coverage of a pixel of size px by the region sdf < 0."""
    return np.clip(np.float32(0.5) - sdf * np.float32(1 / px), 0, 1, dtype=np.float32)


def _paint(img: np.ndarray, alpha: np.ndarray, value: float | np.ndarray) -> None:
    """Composite a tissue of intensity `value` over `img` in place."""
    img += alpha * (value - img)


@dataclass(frozen=True)
class Scan:
    """Per-subject acquisition and anatomy draws."""

    spacing: float  # mm per pixel
    apex_dir: np.ndarray  # unit vector (x right, y down) from the AV plane to the apex
    heart_x: float  # x of the AV-plane centre, mm; its y is set so the atria clear the descending aorta
    body: tuple[float, float, float]  # body half-width, half-height and superellipse exponent
    fat: float  # subcutaneous fat thickness, mm
    contrast: dict[str, float]  # tissue intensities relative to atrial blood
    noise: float  # Rician noise sd relative to atrial blood
    gain: float  # scanner scale of the stored integers
    bias: np.ndarray  # coil bias coefficients


def sample_scan(rng: np.random.Generator) -> Scan:
    """Pose, body habitus, contrast, noise and coil bias of one subject."""
    angle = np.deg2rad(rng.normal(38, 6))
    spacing = float(rng.uniform(1.75, 1.9))
    blood = rng.uniform(0.92, 1.0)
    contrast = {
        "lv": blood * rng.uniform(0.85, 0.97), "rv": blood * rng.uniform(0.75, 0.9), "atria": blood,
        "myo": rng.uniform(0.26, 0.38), "fat": rng.uniform(0.85, 1.1), "muscle": rng.uniform(0.26, 0.36),
        "lung": rng.uniform(0.05, 0.1), "liver": rng.uniform(0.3, 0.42), "bone": rng.uniform(0.3, 0.42),
        "aorta": rng.uniform(0.8, 1.0), "csf": rng.uniform(0.8, 1.0),
    }
    return Scan(
        spacing=spacing,
        apex_dir=np.array([np.cos(angle), -np.sin(angle)]),
        heart_x=MATRIX[1] * spacing * rng.uniform(0.47, 0.52),
        body=(MATRIX[1] * spacing * rng.uniform(0.45, 0.5), MATRIX[0] * spacing * rng.uniform(0.41, 0.46),
              rng.uniform(2.4, 3.2)),
        fat=float(rng.uniform(6, 20)),
        contrast=contrast,
        noise=float(rng.uniform(0.02, 0.05)),
        gain=float(rng.uniform(180, 320)),
        bias=rng.normal(0, 0.1, 5),
    )


def _landmarks(scan: Scan) -> dict[str, np.ndarray]:
    """Body centre, spine and descending-aorta centres, mm."""
    centre = np.array([MATRIX[1] * scan.spacing / 2, MATRIX[0] * scan.spacing * 0.5])
    spine = centre + [-0.02 * scan.body[0], scan.body[1] - scan.fat - 32]
    return {"centre": centre, "spine": spine, "aorta": spine + [22, -33]}


def _superellipse_sdf(x: np.ndarray, y: np.ndarray, rx: float, ry: float, n: float) -> np.ndarray:
    """Approximate signed distance (mm) to a superellipse |x/rx|^n + |y/ry|^n = 1."""
    r = (np.abs(x / rx) ** n + np.abs(y / ry) ** n) ** (1 / n)
    return (r - 1) * min(rx, ry)


def _anatomy(scan: Scan, rng: np.random.Generator) -> np.ndarray:
    """Static thorax around the heart: body, fat, chest wall, lungs with vessels, liver, spine, descending aorta."""
    h, w = MATRIX
    s, c = scan.spacing, scan.contrast
    y, x = (np.mgrid[0:h, 0:w] + 0.5) * s
    m = _landmarks(scan)
    bx, by, n = scan.body
    x0, y0 = x - m["centre"][0], y - m["centre"][1]
    img = np.zeros((h, w), np.float32)
    body = _superellipse_sdf(x0, y0, bx, by, n)
    fat = scan.fat * (1 + 0.5 * np.abs(x0) / bx)  # thicker towards the flanks
    _paint(img, _alpha(body, s), c["fat"])
    _paint(img, _alpha(body + fat, s), c["muscle"])
    cavity = _superellipse_sdf(x0, y0 + 6, bx - scan.fat - 22, by - scan.fat - 18, n - 0.4)
    texture = gaussian_filter(rng.normal(0, 1, (h, w)), 2.0).astype(np.float32)
    texture /= texture.std() + 1e-6
    _paint(img, _alpha(cavity, s), c["lung"] * (1 + 0.25 * texture))
    vessels = np.zeros((h, w), np.float32)  # pulmonary vessels: bright dots blurred to 1-3 mm
    vessels[rng.integers(0, h, 90), rng.integers(0, w, 90)] = rng.uniform(2, 7, 90)
    vessels = np.clip(gaussian_filter(vessels, 0.8), 0, 1) * _alpha(cavity + 4, s)
    _paint(img, vessels, c["aorta"])
    liver = _ellipse_sdf(x0 + 0.55 * bx, y0 - 0.42 * by, 0.5 * bx, 0.62 * by)
    _paint(img, _alpha(np.maximum(liver, cavity - 8), s), c["liver"] * (1 + 0.06 * texture))
    sx, sy = m["spine"]
    _paint(img, _alpha(np.maximum(_ellipse_sdf(x - sx, y - sy - 22, 48, 30), body + fat), s), c["muscle"])  # paraspinal
    _paint(img, _alpha(np.hypot(x - sx, y - sy) - 17, s), c["bone"] * 0.6)  # cortex
    _paint(img, _alpha(np.hypot(x - sx, y - sy) - 14, s), c["bone"] * 1.4)  # marrow
    _paint(img, _alpha(np.hypot(x - sx, y - sy - 25) - 6, s), c["csf"])
    ax, ay = m["aorta"]
    _paint(img, _alpha(np.hypot(x - ax, y - ay) - 14, s), c["muscle"])
    _paint(img, _alpha(np.hypot(x - ax, y - ay) - 12, s), c["aorta"])
    return img


def _heart_frame(scan: Scan, g: Geometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fixed epicardial apex (mm in the image) and the unit vectors along (apex) and across (septum) the heart."""
    e_u = scan.apex_dir
    e_v = np.array([e_u[1], -e_u[0]])  # the septum lies on the apex direction's left
    aorta = _landmarks(scan)["aorta"]
    # lowest atrial point below the AV-plane centre (y grows downwards), so that the atria sit on the aorta
    lowest = max(v * e_v[1] - (2 - ATRIAL_CAP) * ax[:, 0].max() * e_u[1] + 0.5 * ax[:, 1].max() * abs(e_u[0])
                 for v, ax in ((g.v_la, g.la), (g.v_ra, g.ra)))
    av = np.array([scan.heart_x, aorta[1] - 16 - lowest])
    return av + g.epi_len()[0] * e_u, e_u, e_v
def _heart_box(apex: np.ndarray, e_u: np.ndarray, e_v: np.ndarray, g: Geometry, s: float) -> tuple[slice, slice]:
    """Pixel box that holds the heart and its surroundings in every frame."""
    reach_u = g.epi_len().max() + (2 - ATRIAL_CAP) * max(g.la[:, 0].max(), g.ra[:, 0].max()) + 20
    reach_v = (min(-g.lv[:, 1].max() - g.tl.max(), g.v_la - g.la[:, 1].max()) - 20,
               max(g.v_ra + g.ra[:, 1].max(), g.lv[:, 1].max() + g.ts.max() + g.w_rv.max()) + 20)
    corners = np.array([apex + 20 * e_u - du * e_u + dv * e_v for du in (0, reach_u + 20) for dv in reach_v])
    lo, hi = np.floor(corners.min(0) / s).astype(int), np.ceil(corners.max(0) / s).astype(int)
    return slice(max(lo[1], 0), min(hi[1], MATRIX[0])), slice(max(lo[0], 0), min(hi[0], MATRIX[1]))


def _chambers(u: np.ndarray, v: np.ndarray, g: Geometry) -> dict[str, np.ndarray]:
    """Approximate signed distances (mm, negative inside), (T, h, w), of every chamber and the epicardium."""
    col = (slice(None), None, None)
    p, q, uc = g.lv[:, 0][col], g.lv[:, 1][col], g.lv_centre()[col]
    out = {"lv": np.maximum(_ellipse_sdf(u - uc, v, p, q), -u)}
    out["myo"] = np.maximum(_ellipse_sdf(u - uc, v, p + g.ta[col], q + np.where(v > 0, g.ts[col], g.tl[col])), -u)
    sept = _septal_boundary(u, g, col)
    a_rv = g.a_rv[col]
    width = g.w_rv[col] * np.sqrt(np.clip(1 - (u / a_rv) ** 2, 0, None))
    out["rv"] = np.maximum.reduce([sept - v, v - sept - width, -u, u - a_rv])
    for name, ax, vc in (("la", g.la, g.v_la), ("ra", g.ra, g.v_ra)):
        pa, qa = ax[:, 0][col], ax[:, 1][col]
        out[name] = np.maximum(_ellipse_sdf(u + pa * (1 - ATRIAL_CAP), v - vc, pa, qa), u)
    return out


def render(scan: Scan, g: Geometry, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Image (T, H, W) int16 and label (T, H, W) uint8 cines of one subject."""
    frames = len(g.lv)
    s, c = scan.spacing, scan.contrast
    apex, e_u, e_v = _heart_frame(scan, g)
    g = Geometry(**{f.name: np.float32(getattr(g, f.name)) for f in fields(Geometry)})  # float32 arithmetic below
    box = _heart_box(apex, e_u, e_v, g, s)
    y, x = (np.mgrid[box] + 0.5) * s
    along = ((x - apex[0]) * e_u[0] + (y - apex[1]) * e_u[1]).astype(np.float32)
    v = ((x - apex[0]) * e_v[0] + (y - apex[1]) * e_v[1]).astype(np.float32)[None]
    u = along[None] + g.epi_len().astype(np.float32)[:, None, None]  # the apex is fixed, the AV plane moves
    d = _chambers(u, v, g)
    label = np.zeros((frames, *MATRIX), np.uint8)
    for value, name in ((5, "ra"), (4, "la"), (3, "rv"), (2, "myo"), (1, "lv")):
        label[(slice(None), *box)][d[name] < 0] = value
    img = np.repeat(_anatomy(scan, rng)[None], frames, axis=0)
    heart = img[(slice(None), *box)]
    blood = np.minimum.reduce([d["lv"], d["rv"], d["la"], d["ra"]])
    whole = np.minimum(blood, d["myo"])
    patch = gaussian_filter(rng.normal(0, 1, heart.shape[1:]), 5)[None]
    patch /= patch.std() + 1e-6
    _paint(heart, _alpha(whole - 3.5 - 3 * patch, s) * 0.85, c["fat"])  # epicardial and AV-groove fat
    _paint(heart, _alpha(whole - 1.8, s), c["myo"])  # pericardium, atrial walls, RV free wall, atrial septum
    _paint(heart, _alpha(d["myo"], s), c["myo"])
    veins = _pulmonary_veins(u, v, g)
    _paint(heart, _alpha(veins - 1.5, s), c["myo"])
    _paint(heart, _alpha(veins, s), c["atria"] * 0.95)
    flow = 1 + 0.04 * patch
    for name, key in (("la", "atria"), ("ra", "atria"), ("rv", "rv"), ("lv", "lv")):
        _paint(heart, _alpha(d[name], s), c[key] * flow)
    _trabeculae(heart, u, v, d["rv"], g, s, c["myo"], rng)
    _valves(heart, u, v, g, s, c["myo"])
    img = gaussian_filter(img, (0, 0.6, 0.6))
    img *= _bias_field(scan)
    noise = rng.standard_normal((2, *img.shape), dtype=np.float32) * np.float32(scan.noise)
    noisy = np.hypot(img + noise[0], noise[1])
    return np.clip(noisy * scan.gain, 0, 32767).astype(np.int16), label


def _pulmonary_veins(u: np.ndarray, v: np.ndarray, g: Geometry) -> np.ndarray:
    """Signed distance (mm) to two pulmonary veins leaving the LA posterolaterally (outside every label)."""
    col = (slice(None), None, None)
    u0, v0 = (-g.la[:, 0] * (1 - ATRIAL_CAP))[col], np.float32(g.v_la)
    length = (g.la[:, 0] + 18)[col]
    veins = []
    for angle in (1.25, 1.8):  # radians from the long axis, towards the lateral side
        du, dv = -np.cos(angle), -np.sin(angle)
        along = np.clip((u - u0) * du + (v - v0) * dv, 0, length)
        veins.append(np.hypot(u - u0 - along * du, v - v0 - along * dv) - 4.5)
    return np.minimum(*veins)


def _trabeculae(heart: np.ndarray, u: np.ndarray, v: np.ndarray, rv: np.ndarray, g: Geometry, s: float,
                tissue: float, rng: np.random.Generator) -> None:
    """Papillary muscle on the LV lateral wall and apical trabeculation, inside the blood pool (labels unchanged)."""
    col = (slice(None), None, None)
    p, q, uc = g.lv[:, 0][col], g.lv[:, 1][col], g.lv_centre()[col]
    pos = uc + 0.35 * p  # towards the apex from mid-cavity
    half = _halfwidth(pos, uc, p, q)
    papillary = _ellipse_sdf(u - pos, v + half * 0.82, 0.3 * p, 0.22 * q)
    _paint(heart, _alpha(papillary, s) * rng.uniform(0.6, 0.9), tissue)
    apical = _ellipse_sdf(u - (2 - LV_CAP) * p, v, 0.28 * p, 0.5 * q)
    _paint(heart, _alpha(apical, s) * rng.uniform(0.3, 0.5), tissue)
    band = np.abs(u - 0.6 * g.a_rv[col]) - 1.2  # moderator band across the RV
    _paint(heart, _alpha(np.maximum(band, rv), s) * 0.6, tissue)


def _valves(heart: np.ndarray, u: np.ndarray, v: np.ndarray, g: Geometry, s: float, tissue: float) -> None:
    """Mitral and tricuspid leaflets: closed across the annulus in systole, swung into the ventricle in diastole."""
    vol = g.lv[:, 0] * g.lv[:, 1] ** 2
    ang = np.deg2rad(75) * np.clip(np.gradient(vol) / np.abs(np.gradient(vol)).max() * 3, 0, 1)
    mv = _cut_halfwidth(g.lv, LV_CAP)
    e0 = _septal_boundary(np.zeros(len(vol), np.float32), g)
    reach = max(mv.max(), g.w_rv.max() / 2) + 2  # leaflets lie within this distance on the ventricular side
    near = np.nonzero((u > -2) & (u < reach))
    t, uu, vv = near[0], u[near], np.broadcast_to(v, u.shape)[near]
    sin, cos = np.sin(ang)[t], np.cos(ang)[t]
    leaflets = []
    for lo, hi in ((-mv, mv), (e0, e0 + g.w_rv)):
        span = (hi - lo)[t]
        for hinge, sign in ((lo[t], 1), (hi[t], -1)):  # two leaflets hinged at the annulus
            along = uu * sin + sign * (vv - hinge) * cos
            across = uu * cos - sign * (vv - hinge) * sin
            leaflets.append(np.maximum(np.abs(across) - 0.7, np.maximum(-along, along - 0.5 * span)))
    values = heart[near]
    _paint(values, _alpha(np.minimum.reduce(leaflets), s) * 0.8, tissue)
    heart[near] = values


def _bias_field(scan: Scan) -> np.ndarray:
    """Smooth multiplicative coil sensitivity, brighter towards the anterior and posterior coils."""
    y, x = np.mgrid[0 : MATRIX[0], 0 : MATRIX[1]] / np.array(MATRIX)[:, None, None]
    y, x = 2 * y - 1, 2 * x - 1
    k = scan.bias
    field = 1 + k[0] * x + k[1] * y + 0.25 * (1 + k[2]) * y**2 + k[3] * x * y + k[4] * x**2
    return np.clip(field, 0.5, 1.8).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------- cohort
def subject_id(index: int) -> str:
    """Folder name and eid of phantom subject `index`."""
    return f"PH{index:06d}"


@dataclass(frozen=True)
class Draw:
    """Everything drawn for one subject: labels row, target phenotypes, geometry, scan and the image noise RNG."""

    eid: str
    row: dict
    targets: dict[str, float]
    geometry: Geometry
    scan: Scan
    rng: np.random.Generator

    @property
    def frame_interval_s(self) -> float:
        return 60.0 / (self.targets["hr"] * len(self.geometry.lv))


def draw_subject(seed: int, index: int, class_weights: tuple[float, ...], frames: int = 50) -> Draw:
    """Deterministic draws of subject `index` of cohort `seed`, independent of every other subject."""
    rng = np.random.default_rng([seed, index])
    weights = np.asarray(class_weights, float) / np.sum(class_weights)
    diagnosis = CLASSES[rng.choice(len(CLASSES), p=weights)]
    sex = "male" if rng.random() < 0.5 else "female"
    p = sample_targets(rng, diagnosis, sex)
    geometry = chamber_geometry(p, volume_curves(p, diagnosis, frames))
    row = {"diagnosis": diagnosis, "diagnosis_index": CLASSES.index(diagnosis), "disease": int(diagnosis != "healthy"),
           "sex": sex}
    return Draw(subject_id(index), row, p, geometry, sample_scan(rng), rng)


def write_nifti(array: np.ndarray, path: Path, spacing: float, frame_interval_s: float) -> None:
    """Write a (T, H, W) cine as NIfTI X x Y x 1 x T with pixel size (mm) and frame interval (s) in the header."""
    data = np.ascontiguousarray(array.transpose(2, 1, 0)[:, :, None, :])
    affine = np.diag([spacing, spacing, 8.0, 1.0])
    image = nib.Nifti1Image(data, affine)
    image.header.set_zooms((spacing, spacing, 8.0, frame_interval_s))
    image.header.set_xyzt_units("mm", "sec")
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    with atomic_write(path) as tmp:
        nib.save(image, tmp)


def make_subject(output_dir: str | Path, seed: int, index: int, class_weights: tuple[float, ...],
                 keep_frames: bool = False) -> dict:
    """Render, write and measure one subject; returns eid, labels row, measured phenotypes (and ED/ES frames)."""
    d = draw_subject(seed, index, class_weights)
    image, label = render(d.scan, d.geometry, d.rng)
    folder = Path(output_dir) / d.eid
    folder.mkdir(parents=True, exist_ok=True)
    write_nifti(image, folder / "la_4ch.nii.gz", d.scan.spacing, d.frame_interval_s)
    write_nifti(label, folder / "seg4_la_4ch.nii.gz", d.scan.spacing, d.frame_interval_s)
    measured = measure_cine(label.transpose(2, 1, 0), (d.scan.spacing, d.scan.spacing), d.frame_interval_s, d.eid)
    es = int(np.argmin(d.geometry.lv[:, 0] * d.geometry.lv[:, 1] ** 2))
    frames = {"ed": image[0], "es": image[es]} if keep_frames else {}
    return {"eid": d.eid, "row": d.row, "phenotypes": measured, **frames}


def make_cohort(
    output_dir: str | Path,
    num_subjects: int,
    seed: int = 0,
    class_weights: tuple[float, ...] = (0.4, 0.2, 0.25, 0.15),
    num_workers: int = 2,
    montage_subjects: int = 8,
) -> dict:
    """Write a phantom cohort in UK Biobank layout plus phenotypes.csv, labels.csv, cohort.json and montage.png."""
    if num_subjects < 1:
        raise ValueError(f"num_subjects must be >= 1, got {num_subjects}")
    if len(class_weights) != len(CLASSES) or min(class_weights) < 0 or sum(class_weights) <= 0:
        raise ValueError(f"class_weights must be {len(CLASSES)} non-negative numbers for {CLASSES}, got {class_weights}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    args = [(out, seed, i, tuple(class_weights), i < montage_subjects) for i in range(num_subjects)]
    pool = ProcessPoolExecutor(max_workers=num_workers) if num_workers > 1 else None
    results = []
    try:
        mapped = pool.map(make_subject, *zip(*args), chunksize=4) if pool else map(make_subject, *zip(*args))
        for k, res in enumerate(mapped, 1):
            results.append(res)
            if k % 50 == 0 or k == num_subjects:
                logger.info("phantom: %d/%d subjects (%.1f s)", k, num_subjects, time.perf_counter() - start)
    finally:
        if pool:
            pool.shutdown()
    write_phenotype_table(out / "phenotypes.csv", PHENOTYPE_COLUMNS, {r["eid"]: r["phenotypes"] for r in results})
    with atomic_write(out / "labels.csv") as tmp:
        _write_labels(tmp, results)
    shown = results[:montage_subjects]
    if shown:
        save_montage(
            [r["ed"] for r in shown] + [r["es"] for r in shown],
            out / "montage.png",
            ncols=len(shown),
            captions=[f"{r['eid']} {r['row']['diagnosis'][:4]} ED" for r in shown] + [f"{r['eid']} ES" for r in shown],
        )
    counts = {c: sum(r["row"]["diagnosis"] == c for r in results) for c in CLASSES}
    summary = {"num_subjects": num_subjects, "seed": seed, "class_weights": list(class_weights), "classes": counts,
               "seconds": round(time.perf_counter() - start, 1)}
    write_json(out / "cohort.json", summary)
    logger.info("phantom cohort written to %s: %s", out, summary)
    return summary


def _write_labels(path: Path, results: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["eid", *LABEL_COLUMNS])
        writer.writerows([r["eid"], *(r["row"][k] for k in LABEL_COLUMNS)] for r in results)
