"""The labeller of preprocessing: a trained segmenter labels raw full-view cines without a label file
(configs/prepare.json `segmenter_checkpoint`), and how well it stands in for label files on labelled cohorts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch import nn
from torch.nn import functional as F

from scripts.data.cine_files import LV_LABEL, load_subject
from scripts.data.prepare import box_fraction, crop_pad, heart_box, prepare
from scripts.data.shapes import IMAGE_SIZE
from scripts.runtime.progress import track
from scripts.segmentation.segmenter import dice_per_label, load_prepared, load_segmenter, read_info, segment_cines


class CineLabeller:
    """Labels a raw full field-of-view cine (X, Y, T) with a trained segmenter: a window search at the training pixel
    size, then `refine` passes on the heart crop (the method and why not SlidingWindowInferer: docs/segmenter.md)."""

    def __init__(self, checkpoint: str | Path, network: nn.Module, device: torch.device | str = "cpu", refine: int = 2,
                 margin: float = 0.15, stride: int = 16, search_frames: int = 5) -> None:
        info = read_info(checkpoint)
        self.checkpoint, self.spacing_mm = str(checkpoint), float(info["spacing_mm"])
        self.network = load_segmenter(checkpoint, network, device)
        self.refine, self.margin, self.stride, self.search_frames = refine, margin, stride, search_frames

    def _segment(self, view: torch.Tensor) -> torch.Tensor:
        """(T, 1, h, w) view -> (T, h, w) labels, the view segmented at 96 x 96."""
        x = F.interpolate(view, size=[IMAGE_SIZE] * 2, mode="bilinear", antialias=True, align_corners=False)
        lo, hi = np.percentile(x.numpy(), [0.5, 99.5])
        x = ((x - lo) / max(hi - lo, 1e-6)).clamp(0.0, 1.0)
        labels = segment_cines(self.network, x.transpose(0, 1)[None])[0]  # (T, 96, 96)
        labels = labels * torch.from_numpy(_largest_components_3d(labels.numpy() > 0))
        return F.interpolate(labels.float()[:, None], size=list(view.shape[-2:]), mode="nearest-exact")[:, 0]

    def locate(self, x: torch.Tensor, spacing_mm: Sequence[float]) -> list[list[int]]:
        """Box [[x0, x1], [y0, y1]] (input pixels) of the best 96 x 96 training-size window of a (T, 1, X, Y) cine."""
        factor = np.asarray(spacing_mm, float) / self.spacing_mm  # input pixels -> training pixels
        frames = x[:: max(1, len(x) // self.search_frames)][: self.search_frames]
        size = [max(1, round(n * f)) for n, f in zip(x.shape[-2:], factor)]
        view = F.interpolate(frames, size=size, mode="bilinear", antialias=True, align_corners=False)
        starts = [sorted({*range(0, max(n - IMAGE_SIZE, 0) + 1, self.stride), max(n - IMAGE_SIZE, 0)}) for n in size]
        best, box = (-1, -1), None
        for i in starts[0]:
            for j in starts[1]:
                window = [[i, i + IMAGE_SIZE], [j, j + IMAGE_SIZE]]
                labels = self._segment(crop_pad(view, window))
                score = (len(torch.unique(labels[labels > 0])), int((labels > 0).sum()))
                if score > best:
                    best, box = score, window
        return [[round(a / f), round(b / f)] for (a, b), f in zip(box, factor)]

    def __call__(self, image: np.ndarray, spacing_mm: Sequence[float]) -> np.ndarray:
        """(X, Y, T) float image with its pixel size (mm) -> (X, Y, T) uint8 labels."""
        x = torch.as_tensor(image, dtype=torch.float32).permute(2, 0, 1)[:, None]  # (T, 1, X, Y)
        box, labels = self.locate(x, spacing_mm), torch.zeros(x.shape[0], *x.shape[-2:])
        for _ in range(max(self.refine, 1)):
            labels = _uncrop(self._segment(crop_pad(x, box)), box, labels.shape)
            if not labels.any():
                break
            box = heart_box((labels > 0).any(0).numpy(), spacing_mm, self.margin)
        return labels.permute(1, 2, 0).to(torch.uint8).numpy()


def _uncrop(crop: torch.Tensor, box: Sequence[Sequence[int]], shape: Sequence[int]) -> torch.Tensor:
    """The inverse of scripts.data.prepare.crop_pad: `crop` (..., bx, by) placed at `box` in zeros of `shape`."""
    (x0, x1), (y0, y1) = box
    out = torch.zeros(tuple(shape), dtype=crop.dtype)
    ax, ay = (max(x0, 0), min(x1, shape[-2])), (max(y0, 0), min(y1, shape[-1]))
    out[..., ax[0]:ax[1], ay[0]:ay[1]] = crop[..., ax[0] - x0:ax[1] - x0, ay[0] - y0:ay[1] - y0]
    return out


def _largest_components_3d(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of a (T, X, Y) mask, frames connected through time (one heart per cine)."""
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == np.argmax(sizes)


def crop_agreement(dataset_dir: str | Path, checkpoint: str | Path, network: nn.Module, subjects: Sequence[str],
                   margin: float = 0.15, image_name: str = "la_4ch.nii.gz",
                   label_name: str = "seg4_la_4ch.nii.gz") -> dict[str, dict]:
    """{subject: {"box_iou", "heart_fraction", "side_ratio", "ed_frame_error", "dice"}}: the heart crop of the
    segmenter's full-view labels against the label file's (IoU, true heart voxels inside, side ratio), the cyclic
    distance (frames) between their end-diastoles (largest LV area) and the full-view Dice per label."""
    labeller, out = CineLabeller(checkpoint, network), {}
    for subject in track(subjects, "crop agreement"):
        folder = Path(dataset_dir) / subject
        image, label = load_subject(folder / image_name, folder / label_name, subject)
        pred = labeller(image.array, image.spacing_mm)  # (X, Y, T)
        boxes = [np.array(heart_box((x > 0).any(2), image.spacing_mm, margin), float) for x in (pred, label.array)]
        lo, hi = np.maximum(boxes[0][:, 0], boxes[1][:, 0]), np.minimum(boxes[0][:, 1], boxes[1][:, 1])
        inter, areas = np.prod(np.clip(hi - lo, 0, None)), [np.prod(b[:, 1] - b[:, 0]) for b in boxes]
        out[subject] = {"box_iou": float(inter / (areas[0] + areas[1] - inter)),
                        "heart_fraction": box_fraction((label.array > 0).sum(2), boxes[0].astype(int).tolist()),
                        "side_ratio": float((boxes[0][0, 1] - boxes[0][0, 0]) / (boxes[1][0, 1] - boxes[1][0, 0])),
                        "ed_frame_error": _cyclic_distance(*(end_diastole(x) for x in (pred, label.array)),
                                                           pred.shape[2]),
                        "dice": dice_per_label(pred[None], label.array[None])}
    return out


def end_diastole(labels: np.ndarray) -> int:
    """Frame of largest LV area of an (X, Y, T) label cine (the rule of scripts.data.prepare.AlignEndDiastoled)."""
    return int(np.argmax((labels == LV_LABEL).sum((0, 1))))


def _cyclic_distance(a: int, b: int, frames: int) -> int:
    return min((a - b) % frames, (b - a) % frames)


def real_subject_dice(dataset_dir: str | Path, checkpoint: str | Path, network: nn.Module, work_dir: str | Path,
                      device: torch.device | str = "cpu") -> dict[str, dict[str, float]]:
    """Prepare a labelled cohort (e.g. ../shared/data/ukbb_demo) into `work_dir` with the default configs/prepare.json
    settings, segment every prepared cine with `network` (weights from `checkpoint`); {subject: Dice per label}."""
    report = prepare(dataset_dir, work_dir, splits=(1.0, 0.0, 0.0), num_workers=0)
    network = load_segmenter(checkpoint, network, device)
    out = {}
    for subject in sorted(report["subjects"]):
        item = {"image": f"images/{subject}.npy", "label": f"labels/{subject}.npy"}
        image, label = load_prepared(work_dir, [item])
        out[subject] = dice_per_label(segment_cines(network, image), label)
    return out
