"""Chamber shapes of the cardiac phantom (class targets, volume curves, per-frame geometry, intended phenotypes) in
heart coordinates, mm: `u` from the atrioventricular (AV) plane to the apex, `v` across it, + towards the septum/RV."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scripts.data.phenotypes import PHENOTYPE_COLUMNS

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
class ChamberShapes:
    """Per-frame chamber geometry in mm (arrays over T): LV cavity, LA and RA are ellipses cut by the AV plane (u = 0),
    the epicardium the LV ellipse grown by the wall thicknesses, the RV a crescent on the septal epicardium."""

    lv: np.ndarray  # (T, 2) semi-axes (along u, across) of the LV cavity ellipse
    ta: np.ndarray  # wall thickness at the apex
    ts: np.ndarray  # septal wall thickness
    tl: np.ndarray  # lateral wall thickness
    a_rv: np.ndarray  # RV length along u
    w_rv: np.ndarray  # RV crescent width (its profile narrows towards a_rv)
    la: np.ndarray  # (T, 2) semi-axes of the LA ellipse
    ra: np.ndarray  # (T, 2) semi-axes of the RA ellipse
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
    """Per-frame chamber volumes (mL) over one R-R interval from end-diastole: ventricles eject, refill, rest and top
    up; atria fill in systole (reservoir), empty early (conduit), then contract (booster): minimum at end-diastole."""
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


def halfwidth(u: np.ndarray, centre: np.ndarray, p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Half-width across the long axis of an ellipse (centre u, semi-axes p, q) at distance u from the AV plane."""
    return q * np.sqrt(np.clip(1 - ((u - centre) / p) ** 2, 0, None))


def septal_boundary(u: np.ndarray, g: ChamberShapes, t: slice | tuple | np.ndarray = slice(None)) -> np.ndarray:
    """v of the septal epicardium at distance u from the AV plane."""
    return halfwidth(u, g.lv_centre()[t], g.lv[:, 0][t] + g.ta[t], g.lv[:, 1][t] + g.ts[t])


def _epi_area(g_lv: np.ndarray, ta: np.ndarray, ts: np.ndarray, tl: np.ndarray) -> np.ndarray:
    """Area (mm^2) of the epicardial region (cut at the AV plane) for LV semi-axes g_lv and wall parameters."""
    p = g_lv[:, 0] + ta
    d = g_lv[:, 0] * (1 - LV_CAP) / p  # centre distance from the cut, over p
    cap = np.arccos(d) - d * np.sqrt(1 - d * d)
    return p * (2 * g_lv[:, 1] + ts + tl) / 2 * (np.pi - cap)


def chamber_geometry(p: dict[str, float], vols: dict[str, np.ndarray]) -> ChamberShapes:
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
    g = ChamberShapes(lv, ta, ts, tl, 0.85 * lv[:, 0] * (2 - LV_CAP), np.zeros(len(lv)), np.zeros((len(lv), 2)),
                 np.zeros((len(lv), 2)), 0.0, 0.0)
    # RV width from its area-length volume (area pi/4 w a_rv); its length depends weakly on the width, so iterate
    w = np.full(len(lv), 30.0)
    for _ in range(5):
        length = np.hypot(g.a_rv, septal_boundary(g.a_rv, g) - septal_boundary(np.zeros(len(lv)), g) - w / 2)
        w = 4 * np.sqrt(vols["rv"] * 1e3 * length * 3 * np.pi / 8) / (np.pi * g.a_rv)
    la = _axes_for_volume(vols["la"], 0.8, ATRIAL_CAP)
    ra = _axes_for_volume(vols["ra"], 0.8, ATRIAL_CAP)
    v_ra = float(septal_boundary(np.zeros(1), g, slice(0, 1))[0] + w[0] / 2)
    v_la = min(0.0, v_ra - ra[:, 1].max() - la[:, 1].max() - 4.0)
    return ChamberShapes(lv, ta, ts, tl, g.a_rv, w, la, ra, v_la, v_ra)


def _valve_midpoint(lo1: np.ndarray, hi1: np.ndarray, lo2: np.ndarray, hi2: np.ndarray) -> np.ndarray:
    """Centre of the overlap of two intervals across the long axis (the valve between chamber and atrium)."""
    return 0.5 * (np.maximum(lo1, lo2) + np.minimum(hi1, hi2))


def cut_halfwidth(ax: np.ndarray, cap: float) -> np.ndarray:
    """Half-width of cut ellipses (T, 2) at the AV plane."""
    d = 1 - cap
    return ax[:, 1] * np.sqrt(1 - d * d)


def _farthest(u: np.ndarray, v: np.ndarray, v0: np.ndarray) -> np.ndarray:
    """Largest distance from (0, v0[t]) to the boundary points (u[t], v[t])."""
    return np.hypot(u, v - v0[:, None]).max(1)


def intended_phenotypes(g: ChamberShapes, frame_interval_s: float) -> dict[str, float]:
    """Phenotypes of the continuous geometry by the definitions of `scripts.data.phenotypes` (no rasterisation)."""
    n = len(g.lv)
    theta = np.linspace(-np.pi / 2, np.pi / 2, 4001)[None]
    lv_c = g.lv_centre()[:, None]
    mv = _valve_midpoint(-cut_halfwidth(g.lv, LV_CAP), cut_halfwidth(g.lv, LV_CAP),
                         g.v_la - cut_halfwidth(g.la, ATRIAL_CAP), g.v_la + cut_halfwidth(g.la, ATRIAL_CAP))
    u_lv = lv_c + g.lv[:, :1] * np.cos(theta)
    keep = u_lv >= 0
    l_lv = _farthest(np.where(keep, u_lv, 0), np.where(keep, g.lv[:, 1:] * np.sin(theta), 0), mv)
    area_lv = g.lv[:, 0] * g.lv[:, 1] * (np.pi - _cap_area(LV_CAP))
    v_lv = 8 / (3 * np.pi) * area_lv**2 / l_lv / 1e3
    es = int(np.argmin(v_lv))
    # RV crescent between the septal epicardium and the width profile
    e0 = septal_boundary(np.zeros(n), g)
    tv = _valve_midpoint(e0, e0 + g.w_rv, g.v_ra - cut_halfwidth(g.ra, ATRIAL_CAP), g.v_ra + cut_halfwidth(g.ra, ATRIAL_CAP))
    us = g.a_rv[:, None] * np.linspace(0, 1, 4001)[None]
    inner = septal_boundary(us, g, np.arange(n)[:, None])
    outer = inner + g.w_rv[:, None] * np.sqrt(np.clip(1 - (us / g.a_rv[:, None]) ** 2, 0, None))
    l_rv = np.maximum(_farthest(us, inner, tv), _farthest(us, outer, tv))
    v_rv = 8 / (3 * np.pi) * (np.pi / 4 * g.w_rv * g.a_rv) ** 2 / l_rv / 1e3
    atria = {k: _cut_constant(ATRIAL_CAP) * ax[:, 0] * ax[:, 1] ** 2 / 1e3 for k, ax in (("LA", g.la), ("RA", g.ra))}
    # LV mass at ED; wall thickness across the long axis at half the mitral-apex length
    epi_area = _epi_area(g.lv[:1], g.ta[:1], g.ts[:1], g.tl[:1])[0]
    l_epi = g.epi_len()[0] if abs(mv[0]) < 1e-9 else np.hypot(g.epi_len()[0], mv[0])
    v_epi = 8 / (3 * np.pi) * epi_area**2 / l_epi / 1e3
    um = l_lv[0] / 2
    cav = halfwidth(um, lv_c[0, 0], g.lv[0, 0], g.lv[0, 1])
    wall = [halfwidth(um, lv_c[0, 0], g.lv[0, 0] + g.ta[0], g.lv[0, 1] + t) - cav for t in (g.ts[0], g.tl[0])]
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

