"""Rendering of the cardiac phantom: balanced-SSFP 4-chamber frames of a subject's chamber geometry with thoracic
anatomy, coil bias field and Rician noise, and its exact label cine."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from scipy.ndimage import gaussian_filter

from scripts.data.phantom_shapes import ATRIAL_CAP, LV_CAP, ChamberShapes, cut_halfwidth, halfwidth, septal_boundary

MATRIX = (180, 208)  # display rows (anterior at the top) x columns, as UK Biobank's 208 x 180 4-chamber cines


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


def _heart_frame(scan: Scan, g: ChamberShapes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fixed epicardial apex (mm in the image) and the unit vectors along (apex) and across (septum) the heart."""
    e_u = scan.apex_dir
    e_v = np.array([e_u[1], -e_u[0]])  # the septum lies on the apex direction's left
    aorta = _landmarks(scan)["aorta"]
    # lowest atrial point below the AV-plane centre (y grows downwards), so that the atria sit on the aorta
    lowest = max(v * e_v[1] - (2 - ATRIAL_CAP) * ax[:, 0].max() * e_u[1] + 0.5 * ax[:, 1].max() * abs(e_u[0])
                 for v, ax in ((g.v_la, g.la), (g.v_ra, g.ra)))
    av = np.array([scan.heart_x, aorta[1] - 16 - lowest])
    return av + g.epi_len()[0] * e_u, e_u, e_v


def _heart_box(apex: np.ndarray, e_u: np.ndarray, e_v: np.ndarray, g: ChamberShapes, s: float) -> tuple[slice, slice]:
    """Pixel box that holds the heart and its surroundings in every frame."""
    reach_u = g.epi_len().max() + (2 - ATRIAL_CAP) * max(g.la[:, 0].max(), g.ra[:, 0].max()) + 20
    reach_v = (min(-g.lv[:, 1].max() - g.tl.max(), g.v_la - g.la[:, 1].max()) - 20,
               max(g.v_ra + g.ra[:, 1].max(), g.lv[:, 1].max() + g.ts.max() + g.w_rv.max()) + 20)
    corners = np.array([apex + 20 * e_u - du * e_u + dv * e_v for du in (0, reach_u + 20) for dv in reach_v])
    lo, hi = np.floor(corners.min(0) / s).astype(int), np.ceil(corners.max(0) / s).astype(int)
    return slice(max(lo[1], 0), min(hi[1], MATRIX[0])), slice(max(lo[0], 0), min(hi[0], MATRIX[1]))


def _chambers(u: np.ndarray, v: np.ndarray, g: ChamberShapes) -> dict[str, np.ndarray]:
    """Approximate signed distances (mm, negative inside), (T, h, w), of every chamber and the epicardium."""
    col = (slice(None), None, None)
    p, q, uc = g.lv[:, 0][col], g.lv[:, 1][col], g.lv_centre()[col]
    out = {"lv": np.maximum(_ellipse_sdf(u - uc, v, p, q), -u)}
    out["myo"] = np.maximum(_ellipse_sdf(u - uc, v, p + g.ta[col], q + np.where(v > 0, g.ts[col], g.tl[col])), -u)
    sept = septal_boundary(u, g, col)
    a_rv = g.a_rv[col]
    width = g.w_rv[col] * np.sqrt(np.clip(1 - (u / a_rv) ** 2, 0, None))
    out["rv"] = np.maximum.reduce([sept - v, v - sept - width, -u, u - a_rv])
    for name, ax, vc in (("la", g.la, g.v_la), ("ra", g.ra, g.v_ra)):
        pa, qa = ax[:, 0][col], ax[:, 1][col]
        out[name] = np.maximum(_ellipse_sdf(u + pa * (1 - ATRIAL_CAP), v - vc, pa, qa), u)
    return out


def render(scan: Scan, g: ChamberShapes, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Image (T, H, W) int16 and label (T, H, W) uint8 cines of one subject."""
    frames = len(g.lv)
    s, c = scan.spacing, scan.contrast
    apex, e_u, e_v = _heart_frame(scan, g)
    # float32 arithmetic below
    g = ChamberShapes(**{f.name: np.float32(getattr(g, f.name)) for f in fields(ChamberShapes)})
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


def _pulmonary_veins(u: np.ndarray, v: np.ndarray, g: ChamberShapes) -> np.ndarray:
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


def _trabeculae(heart: np.ndarray, u: np.ndarray, v: np.ndarray, rv: np.ndarray, g: ChamberShapes, s: float,
                tissue: float, rng: np.random.Generator) -> None:
    """Papillary muscle on the LV lateral wall and apical trabeculation, inside the blood pool (labels unchanged)."""
    col = (slice(None), None, None)
    p, q, uc = g.lv[:, 0][col], g.lv[:, 1][col], g.lv_centre()[col]
    pos = uc + 0.35 * p  # towards the apex from mid-cavity
    half = halfwidth(pos, uc, p, q)
    papillary = _ellipse_sdf(u - pos, v + half * 0.82, 0.3 * p, 0.22 * q)
    _paint(heart, _alpha(papillary, s) * rng.uniform(0.6, 0.9), tissue)
    apical = _ellipse_sdf(u - (2 - LV_CAP) * p, v, 0.28 * p, 0.5 * q)
    _paint(heart, _alpha(apical, s) * rng.uniform(0.3, 0.5), tissue)
    band = np.abs(u - 0.6 * g.a_rv[col]) - 1.2  # moderator band across the RV
    _paint(heart, _alpha(np.maximum(band, rv), s) * 0.6, tissue)


def _valves(heart: np.ndarray, u: np.ndarray, v: np.ndarray, g: ChamberShapes, s: float, tissue: float) -> None:
    """Mitral and tricuspid leaflets: closed across the annulus in systole, swung into the ventricle in diastole."""
    vol = g.lv[:, 0] * g.lv[:, 1] ** 2
    ang = np.deg2rad(75) * np.clip(np.gradient(vol) / np.abs(np.gradient(vol)).max() * 3, 0, 1)
    mv = cut_halfwidth(g.lv, LV_CAP)
    e0 = septal_boundary(np.zeros(len(vol), np.float32), g)
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

