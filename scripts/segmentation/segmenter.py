"""Cine segmenter: a per-frame 2D MONAI UNet for the 5 labels of 4-chamber cines (LV, Myo, RV, LA, RA).

The independent instrument that measures generated cines (scripts.evaluation) and labels cines that come without a
label file for preprocessing (configs/prepare.json `segmenter_checkpoint`). Trained by configs/train_segmenter.json on
prepared cines (1 x 50 x 96 x 96 heart crops); next to the best weights (`segmenter.pt`) it writes `segmenter.json`
with the profile and the prepared pixel sizes it was trained on, so full field-of-view cines can be resampled to them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine
from monai.handlers import MeanDice
from monai.metrics import DiceMetric
from monai.networks import eval_mode
from monai.networks.nets import UNet
from monai.networks.utils import one_hot
from monai.transforms import DivisiblePad
from monai.utils import CommonKeys
from scipy import ndimage
from torch import nn
from torch.nn import functional as F

from scripts.data.cine_files import load_subject
from scripts.data.cohort import load_cines
from scripts.data.phenotypes import LABELS, _largest_components
from scripts.data.prepare import IMAGE_SIZE, box_fraction, crop_pad, heart_box, prepare
from scripts.runtime.checkpoints import load_weights
from scripts.runtime.files import atomic_write, write_json
from scripts.runtime.handlers import ReconstructionMontage
from scripts.runtime.montage import _grid, to_uint8

logger = logging.getLogger(__name__)


logger = logging.getLogger(__name__)

LABEL_NAMES: tuple[str, ...] = tuple(LABELS)  # LV, Myo, RV, LA, RA (labels 1..5)
NUM_CLASSES = len(LABEL_NAMES) + 1
TRAINED_BY = "configs/train_segmenter.json"

_PROFILES: dict[str, dict] = {
    "tiny": {"channels": (4, 8, 16), "strides": (2, 2), "num_res_units": 0},
    "cpu": {"channels": (16, 32, 64, 128), "strides": (2, 2, 2), "num_res_units": 1},
    "paper": {"channels": (32, 64, 128, 256, 512), "strides": (2, 2, 2, 2), "num_res_units": 2},
}


# ----------------------------------------------------------------------------------------------------------- network
def build_segmenter(profile: str) -> nn.Module:
    """MONAI 2D UNet, 1 input channel -> 6 class logits, sized by the profile ("tiny", "cpu" or "paper")."""
    if profile not in _PROFILES:
        raise ValueError(f"unknown segmenter profile {profile!r}; choose one of {sorted(_PROFILES)}")
    return UNet(spatial_dims=2, in_channels=1, out_channels=NUM_CLASSES, **_PROFILES[profile])


def load_segmenter(path: str | Path, profile: str, device: torch.device | str) -> nn.Module:
    """The profile's segmenter with the weights of `path` (weights_only, shape-checked), on `device`, in eval mode."""
    network = build_segmenter(profile).to(device)
    load_weights(network, path, run=f"segmenter profile {profile!r}", trained_by=TRAINED_BY)
    return network.eval()


def keep_largest_components(labels: torch.Tensor) -> torch.Tensor:
    """(N, H, W) integer labels: only the largest 8-connected component of every label in every frame is kept."""
    x = labels.cpu().numpy()
    out = np.zeros_like(x)
    for value in range(1, NUM_CLASSES):
        if (mask := x == value).any():
            out[_largest_components(mask)] = value  # the measurement's own component rule (scripts.data.phenotypes)
    return torch.from_numpy(out)


@torch.no_grad()
def segment_cines(network: nn.Module, cines: torch.Tensor, frame_batch: int = 64,
                  largest_component: bool = True) -> torch.Tensor:
    """(B, 1, T, H, W) float cines in [0, 1] -> (B, T, H, W) uint8 labels 0..5 on the CPU.

    Frames are segmented `frame_batch` at a time on the network's device (zero-padded at the end to a multiple of 16
    pixels, any size); with `largest_component` only the largest component of each label per frame is kept.
    """
    b, _, t, h, w = cines.shape
    device = next(network.parameters()).device
    frames = DivisiblePad(k=16, method="end")(cines.transpose(1, 2).reshape(b * t, h, w))  # (B*T, H', W')
    with eval_mode(network):
        labels = torch.cat([network(x[:, None].to(device, torch.float32)).argmax(1).cpu()
                            for x in torch.as_tensor(frames).split(frame_batch)])[:, :h, :w]  # (B*T, H, W)
    labels = keep_largest_components(labels) if largest_component else labels
    return labels.to(torch.uint8).reshape(b, t, h, w)


# ----------------------------------------------------------------------------------------------------------- metrics
def dice_per_label(pred: torch.Tensor | np.ndarray, truth: torch.Tensor | np.ndarray) -> dict[str, float]:
    """{LV, Myo, RV, LA, RA, mean (of the five): Dice} of integer label arrays (B, ...), one volume per item (e.g.
    whole cines (B, T, H, W)), averaged over the items where the label is present (MONAI DiceMetric; NaN if none)."""
    p, y = (torch.as_tensor(np.asarray(a)).long()[:, None] for a in (pred, truth))
    if p.shape != y.shape:
        raise ValueError(f"prediction {tuple(p.shape[::2])} and truth {tuple(y.shape[::2])} shapes differ")
    metric = DiceMetric(include_background=False, reduction="none")
    values = metric(one_hot(p, NUM_CLASSES), one_hot(y, NUM_CLASSES))  # (B, 5), NaN where the truth lacks a label
    per_label = values.nanmean(0)  # not metric.aggregate(): it turns a label absent from every item into 0
    return {name: float(v) for name, v in zip(LABEL_NAMES, per_label)} | {"mean": float(per_label.nanmean())}


def dice_handlers(prefix: str = "val_dice_") -> dict[str, MeanDice]:
    """{`<prefix><label>`: MeanDice of that label's channel of the one-hot "pred" and "label"} for LV..RA."""
    def channel(k: int):
        return lambda out: (out[CommonKeys.PRED][:, [k]], out[CommonKeys.LABEL][:, [k]])

    return {prefix + name: MeanDice(output_transform=channel(k)) for k, name in enumerate(LABEL_NAMES, 1)}


# ------------------------------------------------------------------------------------------------------ engine steps
def segmenter_eval_step(engine: Engine, batch: dict) -> dict[str, torch.Tensor]:
    """`iteration_update` of SupervisedEvaluator on whole cines: {"image" (B, 1, T, H, W), "pred", "label" one-hot
    (B, 6, T, H, W)}, the prediction from `segment_cines` without the component filter (the raw network output)."""
    x, y = batch[CommonKeys.IMAGE], batch[CommonKeys.LABEL].long()  # (B, 1, T, H, W) each
    pred = segment_cines(engine.network, x, largest_component=False).long()[:, None]  # (B, 1, T, H, W)
    device = engine.state.device
    return {CommonKeys.IMAGE: x, CommonKeys.PRED: one_hot(pred, NUM_CLASSES).to(device),
            CommonKeys.LABEL: one_hot(y, NUM_CLASSES).to(device)}


class SegmentationMontage(ReconstructionMontage):
    """After each evaluation, a PNG of `frames` of the first `num` validation cines: image, truth, prediction rows
    (labels drawn as grey levels). A ReconstructionMontage, so multi-GPU runs write it on rank 0 only."""

    def collect(self, engine: Engine) -> None:
        out = engine.state.output
        need = self.num - len(self.cines)
        labels = [out[k][:need].argmax(1).cpu().float() for k in (CommonKeys.LABEL, CommonKeys.PRED)]  # (b, T, H, W)
        self.cines += list(zip(out[CommonKeys.IMAGE][:need, 0].cpu().float(), *labels))

    def write(self, engine: Engine) -> None:
        rows = [[cine[row][t].numpy() for cine in self.cines for t in self.frames] for row in range(3)]
        tiles = [to_uint8(f) for f in rows[0]] + [to_uint8(f, 0.0, NUM_CLASSES - 1.0) for r in rows[1:] for f in r]
        captions = [f"{name} {k} t{t}" for name in ("image", "truth", "pred") for k in range(len(self.cines))
                    for t in self.frames]
        image = _grid(tiles, len(rows[0]), captions, scale=2)  # labels on one fixed grey scale, images windowed
        with atomic_write(self.path) as tmp:
            image.save(tmp, format="PNG")


# ------------------------------------------------------------------------------------------------- run-level steps
def _datalist(prepared_dir: str | Path) -> dict:
    path = Path(prepared_dir) / "datalist.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; {Path(prepared_dir)} must be a folder of configs/prepare.json")
    return json.loads(path.read_text(encoding="utf-8"))


def info_path(checkpoint: str | Path) -> Path:
    """The JSON beside a segmenter checkpoint (segmenter.pt -> segmenter.json)."""
    return Path(checkpoint).with_suffix(".json")


def write_info(checkpoint: str | Path, prepared_dir: str | Path, profile: str) -> dict:
    """Write `segmenter.json` beside `checkpoint` (rank 0): profile and the training split's prepared pixel sizes."""
    items = _datalist(prepared_dir)["training"]
    if not items or not all(isinstance(d.get("spacing_mm"), list) for d in items):
        raise ValueError(f"{prepared_dir}: datalist.json training items need 'spacing_mm' (configs/prepare.json writes "
                         "it), the pixel size the segmenter learns")
    spacing = [float(np.mean(d["spacing_mm"])) for d in items]
    info = {"profile": profile, "labels": dict(LABELS), "prepared_dir": str(prepared_dir),
            "spacing_mm": float(np.median(spacing)), "spacing_mm_range": [min(spacing), max(spacing)]}
    if idist.get_rank() == 0:
        write_json(info_path(checkpoint), info)
    return info


def read_info(checkpoint: str | Path) -> dict:
    """segmenter.json beside `checkpoint`, with a clear error where it is missing or malformed."""
    path = info_path(checkpoint)
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        if not (info["profile"] in _PROFILES and float(info["spacing_mm"]) > 0):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: missing or malformed segmenter info (profile, spacing_mm) for the checkpoint "
                         f"{checkpoint}; {TRAINED_BY} writes it beside segmenter.pt") from e
    return info


def load_prepared(prepared_dir: str | Path, items: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 1, T, H, W) float32 images and (N, T, H, W) uint8 labels of datalist items of a prepared folder."""
    return load_cines(prepared_dir, items).float(), load_cines(prepared_dir, items, "label")[:, 0]


def split_dice(network: nn.Module, prepared_dir: str | Path, split: str = "test",
               batch_size: int = 4) -> dict[str, float]:
    """Dice per label (and mean) of the segmenter on every cine of a split, cines segmented as `segment_cines`."""
    items = _datalist(prepared_dir).get(split) or []
    if not items:
        raise ValueError(f"{prepared_dir}: the datalist has no {split!r} items to measure the segmenter on")
    preds, truths = [], []
    for start in range(0, len(items), batch_size):
        images, labels = load_prepared(prepared_dir, items[start:start + batch_size])
        preds.append(segment_cines(network, images))
        truths.append(labels)
    return dice_per_label(torch.cat(preds), torch.cat(truths)) | {"n": len(items)}


def write_test_metrics(checkpoint: str | Path, profile: str, device: torch.device | str, prepared_dir: str | Path,
                       output_dir: str | Path, split: str = "test") -> dict:
    """Dice per label of the best checkpoint on `split`, written to `<output_dir>/<split>_metrics.json` (rank 0)."""
    if idist.get_rank() != 0:
        return {}
    metrics = split_dice(load_segmenter(checkpoint, profile, device), prepared_dir, split)
    write_json(Path(output_dir) / f"{split}_metrics.json", {"checkpoint": str(checkpoint), "split": split, **metrics})
    logger.info("segmenter %s Dice: %s", split, {k: round(v, 4) for k, v in metrics.items()})
    return metrics


def real_subject_dice(dataset_dir: str | Path, checkpoint: str | Path, work_dir: str | Path,
                      device: torch.device | str = "cpu") -> dict[str, dict[str, float]]:
    """Prepare a labelled cohort (e.g. ../shared/data/ukbb_demo) into `work_dir` with the default configs/prepare.json
    settings, segment every prepared cine and return {subject: Dice per label} (profile from segmenter.json)."""
    report = prepare(dataset_dir, work_dir, splits=(1.0, 0.0, 0.0), num_workers=0)
    network = load_segmenter(checkpoint, read_info(checkpoint)["profile"], device)
    out = {}
    for subject in sorted(report["subjects"]):
        item = {"image": f"images/{subject}.npy", "label": f"labels/{subject}.npy"}
        image, label = load_prepared(work_dir, [item])
        out[subject] = dice_per_label(segment_cines(network, image), label)
    return out


# -------------------------------------------------------------------------------------- labelling full-view cines
class CineLabeller:
    """Labels a raw full field-of-view cine (X, Y, T) with a trained segmenter, for preprocessing without labels.

    The segmenter knows heart crops, 96 x 96 pixels of the median prepared pixel size it was trained on
    (segmenter.json), so the heart is first located with such windows: the view is resampled to that pixel size and
    `search_frames` frames of every 96 x 96 window (stride `stride`) are segmented; the window with the most labels
    present, then the most heart pixels, wins. Each of `refine` passes then crops the heart box of the labels so far as
    preprocessing does (square in mm, `margin`; the first pass takes the window), resizes it to 96 x 96 and segments
    it there; labels outside the box are 0. Every view is scaled to [0, 1] by its 0.5 / 99.5 percentiles as in
    preprocessing and keeps only its largest connected heart component (labels 1..5 together, over the whole cine);
    labels return to the input grid by nearest resampling. Own search: MONAI's SlidingWindowInferer blends windows
    with one intensity scaling, where a heart crop needs its own.
    """

    def __init__(self, checkpoint: str | Path, device: torch.device | str = "cpu", refine: int = 2,
                 margin: float = 0.15, stride: int = 16, search_frames: int = 5) -> None:
        info = read_info(checkpoint)
        self.checkpoint, self.spacing_mm = str(checkpoint), float(info["spacing_mm"])
        self.network = load_segmenter(checkpoint, info["profile"], device)
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


def crop_agreement(dataset_dir: str | Path, checkpoint: str | Path, subjects: Sequence[str], margin: float = 0.15,
                   image_name: str = "la_4ch.nii.gz", label_name: str = "seg4_la_4ch.nii.gz") -> dict[str, dict]:
    """How well the segmenter's full-view labels stand in for label files in preprocessing, on labelled subjects.

    Per subject: "box_iou" of the heart crop from the segmenter's labels and the one from the label file (as
    configs/prepare.json computes them), "heart_fraction" of the true heart voxels inside the segmenter's box, its
    "side_ratio" to the true box side, and the full field-of-view Dice per label of the segmenter's labels.
    """
    labeller, out = CineLabeller(checkpoint), {}
    for subject in subjects:
        folder = Path(dataset_dir) / subject
        image, label = load_subject(folder / image_name, folder / label_name, subject)
        pred = labeller(image.array, image.spacing_mm)  # (X, Y, T)
        boxes = [np.array(heart_box((x > 0).any(2), image.spacing_mm, margin), float) for x in (pred, label.array)]
        lo, hi = np.maximum(boxes[0][:, 0], boxes[1][:, 0]), np.minimum(boxes[0][:, 1], boxes[1][:, 1])
        inter, areas = np.prod(np.clip(hi - lo, 0, None)), [np.prod(b[:, 1] - b[:, 0]) for b in boxes]
        out[subject] = {"box_iou": float(inter / (areas[0] + areas[1] - inter)),
                        "heart_fraction": box_fraction((label.array > 0).sum(2), boxes[0].astype(int).tolist()),
                        "side_ratio": float((boxes[0][0, 1] - boxes[0][0, 0]) / (boxes[1][0, 1] - boxes[1][0, 0])),
                        "dice": dice_per_label(pred[None], label.array[None])}
    return out
