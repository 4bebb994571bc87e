"""In-plane orientation of 2D+time cines: the one rule that gives every cine the same array orientation whatever its
NIfTI affine or DICOM ImageOrientationPatient, and the affine of a cine written in that orientation.

The rule, on the affine's world directions in LPS (DICOM patient axes): the slice normal takes its nearest world axis
and keeps its array axis (never moved into the image plane); the stored X and Y axes take the two other world axes,
matched by the larger sum of absolute direction cosines (a tie keeps the stored order); the new X is the one on the
lower world axis (L before P before S), and each new axis runs toward +L, +P or +S. So only the 8 in-plane flips and
transposes occur, and a cine whose X runs toward L and Y toward P (UK Biobank 4-chamber cines; DICOM
ImageOrientationPatient ~[1, 0, 0, 0, 1, 0]) comes out as stored."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])  # NIfTI (RAS) <-> DICOM (LPS) world axes; its own inverse
TOWARD = ("LPS", "RAI")  # world axis letters, pointing toward + and toward -
CANONICAL = "LP"  # the stored directions of an axial-like cine that needs no change (as UK Biobank's)


def in_plane_codes(affine: np.ndarray) -> str:
    """The world directions (LPS letters) the rule matches to the stored X and Y axes, e.g. "LP" (kept), "RA"
    (both flipped), "PL" (swapped); ValueError where the affine's X and Y directions are zero or parallel."""
    axes = RAS_TO_LPS @ np.asarray(affine, float)[:3, :2]  # (world, 2): directions of X and Y in LPS
    normal = np.cross(axes[:, 0], axes[:, 1])
    if not np.linalg.norm(normal) > 1e-6 * np.linalg.norm(axes[:, 0]) * np.linalg.norm(axes[:, 1]):
        raise ValueError(f"the affine's in-plane axes are zero or parallel (X {axes[:, 0].round(4).tolist()}, "
                         f"Y {axes[:, 1].round(4).tolist()} in LPS): header corrupt, cannot orient the cine")
    slice_axis = int(np.argmax(np.abs(normal)))  # ties: the lower world axis
    world = [w for w in range(3) if w != slice_axis]  # the two in-plane world axes, in order
    straight = abs(axes[world[0], 0]) + abs(axes[world[1], 1])
    crossed = abs(axes[world[1], 0]) + abs(axes[world[0], 1])
    matched = world if straight >= crossed else world[::-1]  # world axis of X, of Y
    return "".join(TOWARD[int(axes[w, k] < 0)][w] for k, w in enumerate(matched))


def orientation(codes: str) -> np.ndarray:
    """nibabel orientation (3, 2) [[new axis, flip]] of the stored X, Y and slice axes that turns axes running toward
    `codes` (in_plane_codes) into the canonical order: lower world axis first, each toward +L, +P or +S."""
    world = [max(TOWARD[0].find(c), TOWARD[1].find(c)) for c in codes]
    flips = [1 if c in TOWARD[0] else -1 for c in codes]
    new_axis = [0, 1] if world[0] < world[1] else [1, 0]
    return np.array([[new_axis[0], flips[0]], [new_axis[1], flips[1]], [2, 1]])


def describe(codes: str) -> str:
    """What the rule does to a cine stored toward `codes`, e.g. "X, Y toward R, A: flipped X, flipped Y"."""
    ornt = orientation(codes)
    done = [f"flipped {'XY'[k]}" for k in range(2) if ornt[k, 1] < 0] + (["swapped X and Y"] if ornt[0, 0] else [])
    return f"X, Y toward {codes[0]}, {codes[1]}: {', '.join(done) or 'as stored'}"


def reorient(array: np.ndarray, affine: np.ndarray, spacing_mm: Sequence[float], codes: str
             ) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """An (X, Y, ...) array stored toward `codes`, its affine and (x, y) pixel size, in the canonical orientation
    (the affine still maps each voxel to the same world point)."""
    ornt = orientation(codes)
    oriented = np.ascontiguousarray(apply_orientation(array, ornt[:2]))
    new_affine = np.asarray(affine, float) @ inv_ornt_aff(ornt, (*array.shape[:2], 1))
    stored = np.argsort(ornt[:2, 0])  # stored axis of new X, new Y
    return oriented, new_affine, (float(spacing_mm[stored[0]]), float(spacing_mm[stored[1]]))


def canonical_affine(spacing_mm: Sequence[float], thickness_mm: float) -> np.ndarray:
    """RAS affine of a cine written in the canonical orientation: X toward L, Y toward P, the normal toward S, origin 0
    (the phantom's and the generated cines'; DICOM ImageOrientationPatient [1, 0, 0, 0, 1, 0])."""
    return np.diag([-float(spacing_mm[0]), -float(spacing_mm[1]), float(thickness_mm), 1.0])
