"""The labeller of preprocessing: a trained segmenter labels raw full-view cines without a label file
(configs/prepare.json `segmenter_checkpoint`), and how well it stands in for label files on labelled cohorts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from scripts.data.cine import LV_LABEL
from scripts.data.cine_files import load_subject
from scripts.data.heart_crop import box_fraction, heart_box
from scripts.data.prepare import SEGMENTER_ED_SMOOTHING, end_diastole, prepare
from scripts.runtime.progress import track
from scripts.segmentation.cine_bundle import LABELLER_ZOOMS, CineInferer
from scripts.segmentation.segmenter import dice_per_label, load_prepared, load_segmenter, read_info, segment_cines


class CineLabeller:
    """Labels a raw full field-of-view cine (X, Y, T) with a trained segmenter: the window search at the training pixel
    size, then `refine` passes on the heart crop, by the exported bundles' own inferer (CineInferer; the method and
    why not SlidingWindowInferer: docs/segmenter.md)."""

    def __init__(self, checkpoint: str | Path, network: nn.Module, device: torch.device | str = "cpu", refine: int = 2,
                 margin: float = 0.15, stride: int = 16, search_frames: int = 5,
                 zooms: Sequence[float] = LABELLER_ZOOMS) -> None:
        self.checkpoint = str(checkpoint)
        self.inferer = CineInferer(float(read_info(checkpoint)["spacing_mm"]), refine, margin, stride, search_frames,
                                   zooms=zooms)
        self.network = load_segmenter(checkpoint, network, device)

    def __call__(self, image: np.ndarray, spacing_mm: Sequence[float]) -> np.ndarray:
        """(X, Y, T) float image with its pixel size (mm) -> (X, Y, T) uint8 labels."""
        labels = self.inferer.label(self.network, torch.as_tensor(image, dtype=torch.float32), spacing_mm)
        return labels.to(torch.uint8).numpy()


def crop_agreement(dataset_dir: str | Path, checkpoint: str | Path, network: nn.Module, subjects: Sequence[str],
                   margin: float = 0.15, image_name: str = "la_4ch.nii.gz",
                   label_name: str = "seg4_la_4ch.nii.gz", zooms: Sequence[float] = LABELLER_ZOOMS) -> dict[str, dict]:
    """{subject: {"box_iou", "heart_fraction", "side_ratio", "ed_frame_error", "dice"}}: the heart crop of the
    segmenter's full-view labels against the label file's (IoU, true heart voxels inside, side ratio), the cyclic
    distance (frames) between their end-diastoles (largest LV area, as prepare picks each) and the full-view Dice per
    label."""
    labeller, out = CineLabeller(checkpoint, network, zooms=zooms), {}
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
                        "ed_frame_error": _cyclic_distance(*(end_diastole((x == LV_LABEL).sum((0, 1)), k)
                                                             for x, k in ((pred, SEGMENTER_ED_SMOOTHING),
                                                                          (label.array, 0))), pred.shape[2]),
                        "dice": dice_per_label(pred[None], label.array[None])}
    return out


def _cyclic_distance(a: int, b: int, frames: int) -> int:
    return min((a - b) % frames, (b - a) % frames)


def real_subject_dice(dataset_dir: str | Path, checkpoint: str | Path, network: nn.Module, work_dir: str | Path,
                      device: torch.device | str = "cpu",
                      zooms: Sequence[float] = LABELLER_ZOOMS) -> dict[str, dict[str, float]]:
    """Prepare a labelled cohort (e.g. ../shared/data/ukbb_demo) into `work_dir` with the default configs/prepare.json
    settings, segment every prepared cine with `network` (weights from `checkpoint`), averaged over `zooms` (the
    labeller's views by default; (1.0,): the plain network); {subject: Dice per label}."""
    report = prepare(dataset_dir, work_dir, splits=(1.0, 0.0, 0.0), num_workers=0)
    network = load_segmenter(checkpoint, network, device)
    out = {}
    for subject in sorted(report["subjects"]):
        item = {"image": f"images/{subject}.npy", "label": f"labels/{subject}.npy"}
        image, label = load_prepared(work_dir, [item])
        out[subject] = dice_per_label(segment_cines(network, image, zooms=zooms), label)
    return out
