"""Geometry of the heart crop on label masks: the square heart box in mm, crop/pad and its inverse, the share of heart
voxels in a box, and largest connected components. It imports nothing of this repository, so that exported
segmentation bundles carry it unchanged (scripts/segmentation/bundle_export.py)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

_IN_PLANE_8 = np.zeros((3, 3, 3), bool)
_IN_PLANE_8[1] = True  # (T, X, Y) arrays: 8-connected within a frame, never across frames


def heart_box(heart: np.ndarray, spacing_mm: Sequence[float], margin: float) -> list[list[int]]:
    """[[x0, x1], [y0, y1]] (pixels, end exclusive, may leave the image): a square in mm around a 2D mask's bounding
    box, its side the larger mm extent times (1 + 2 * margin)."""
    idx = np.nonzero(heart)
    lo = np.array([i.min() for i in idx], float)
    hi = np.array([i.max() + 1 for i in idx], float)
    spacing = np.asarray(spacing_mm, float)
    side_mm = ((hi - lo) * spacing).max() * (1.0 + 2.0 * margin)
    size = np.ceil(side_mm / spacing - 1e-6)
    start = np.floor((lo + hi - size) / 2.0 + 0.5)
    return [[int(a), int(a + n)] for a, n in zip(start, size)]


def crop_pad(x: torch.Tensor, box: Sequence[Sequence[int]]) -> torch.Tensor:
    """Crop the last two axes of `x` to `box`, with zeros where the box leaves the array."""
    (x0, x1), (y0, y1) = box
    nx, ny = x.shape[-2:]
    pads = [max(0, -y0), max(0, y1 - ny), max(0, -x0), max(0, x1 - nx)]
    x = torch.nn.functional.pad(torch.as_tensor(x), pads)
    return x[..., x0 + pads[2]:x1 + pads[2], y0 + pads[0]:y1 + pads[0]]


def uncrop(crop: torch.Tensor, box: Sequence[Sequence[int]], shape: Sequence[int]) -> torch.Tensor:
    """The inverse of `crop_pad`: `crop` (..., bx, by) placed at `box` in zeros of `shape`."""
    (x0, x1), (y0, y1) = box
    out = torch.zeros(tuple(shape), dtype=crop.dtype)
    ax, ay = (max(x0, 0), min(x1, shape[-2])), (max(y0, 0), min(y1, shape[-1]))
    out[..., ax[0]:ax[1], ay[0]:ay[1]] = crop[..., ax[0] - x0:ax[1] - x0, ay[0] - y0:ay[1] - y0]
    return out


def box_fraction(heart_counts: np.ndarray, box: Sequence[Sequence[int]]) -> float:
    """Share of the (X, Y) per-pixel heart voxel counts that lies inside the box."""
    (x0, x1), (y0, y1) = box
    inside = heart_counts[max(x0, 0):max(x1, 0), max(y0, 0):max(y1, 0)].sum()
    return float(inside / heart_counts.sum())


def largest_components(mask: np.ndarray) -> np.ndarray:
    """Largest 8-connected component of every frame of a (T, X, Y) boolean mask."""
    lab, n = ndimage.label(mask, structure=_IN_PLANE_8)
    t = np.nonzero(mask)[0]
    comp = lab[mask]
    sizes = np.bincount(comp, minlength=n + 1)
    frame_of = np.zeros(n + 1, np.int64)
    frame_of[comp] = t
    order = np.lexsort((sizes[1:], frame_of[1:])) + 1  # by frame, then by size
    last = np.r_[frame_of[order][1:] != frame_of[order][:-1], True]
    keep = np.zeros(n + 1, bool)
    keep[order[last]] = True
    return keep[lab]


def keep_largest_per_label(labels: np.ndarray) -> np.ndarray:
    """(T, X, Y) integer labels with only the largest 8-connected component of every label (> 0) in every frame."""
    out = np.zeros_like(labels)
    for value in np.unique(labels[labels > 0]):
        out[largest_components(labels == value)] = value
    return out


def largest_component_3d(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of a (T, X, Y) mask, frames connected through time (one heart per cine)."""
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == np.argmax(sizes)
