"""Cine segmenter (configs/train_segmenter.json): a per-frame 2D MONAI UNet for the 5 labels of 4-chamber cines
(LV, Myo, RV, LA, RA), the instrument of the evaluation and of the labeller; writes segmenter.pt and segmenter.json."""

from __future__ import annotations

import json
import logging
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine
from monai.handlers import MeanDice
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from monai.transforms import DivisiblePad, MapTransform
from monai.utils import CommonKeys
from PIL import Image
from torch import nn

from scripts.data.cohort import load_cines, split_items
from scripts.data.heart_crop import keep_largest_per_label
from scripts.data.phenotypes import LABELS
from scripts.runtime.checkpoints import load_weights
from scripts.runtime.files import write_json
from scripts.runtime.handlers import ReconstructionMontage
from scripts.runtime.montage import grid, to_uint8
from scripts.runtime.progress import track
from scripts.segmentation.cine_bundle import segment_frames

logger = logging.getLogger(__name__)

LABEL_NAMES: tuple[str, ...] = tuple(LABELS)  # LV, Myo, RV, LA, RA (labels 1..5)
NUM_CLASSES = len(LABEL_NAMES) + 1
TRAINED_BY = "configs/train_segmenter.json"


# ----------------------------------------------------------------------------------------------------------- network
def load_segmenter(path: str | Path, network: nn.Module, device: torch.device | str) -> nn.Module:
    """`network` (a config's segmenter_def) with the weights of `path` (weights_only, shape-checked), on `device`, in
    eval mode."""
    load_weights(network.to(device), path, run="this segmenter_def", trained_by=TRAINED_BY)
    return network.eval()


@torch.no_grad()
def segment_cines(network: nn.Module, cines: torch.Tensor, frame_batch: int = 64,
                  largest_component: bool = True, zooms: Sequence[float] = (1.0,)) -> torch.Tensor:
    """(B, 1, T, H, W) float cines in [0, 1], any H, W -> (B, T, H, W) uint8 labels 0..5 on the CPU, `frame_batch`
    frames at a time, averaged over views zoomed out by `zooms` (`segment_frames`); with `largest_component` only
    the largest component of each label per frame is kept."""
    b, _, t, h, w = cines.shape
    frames = DivisiblePad(k=16, method="end")(cines.transpose(1, 2).reshape(b * t, h, w))  # (B*T, H', W')
    labels = segment_frames(network, torch.as_tensor(frames)[:, None], zooms, frame_batch)[:, :h, :w]  # (B*T, H, W)
    labels = torch.from_numpy(keep_largest_per_label(labels.numpy())) if largest_component else labels
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


# -------------------------------------------------------------------------------------------------------- transforms
class SelectLabelledFramesd(MapTransform):
    """Keep only an item's "labelled_frames" (datalist key of partially labelled cines, scripts.data.prepare) of its
    (C, T, H, W) arrays, so that unlabelled frames never count as background; items without the key pass unchanged."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        frames = d.pop("labelled_frames", None)
        if frames is not None:
            for key in self.key_iterator(d):
                d[key] = d[key][:, list(frames)]
        return d


def validation_batch_size(datalist: Sequence[dict], batch_size: int) -> int:
    """`batch_size`, or 1 where some item is partially labelled (whole cines of unequal frame counts)."""
    return 1 if any("labelled_frames" in d for d in datalist) else batch_size


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

    def image(self) -> Image.Image:
        """The montage of the collected cines: labels on one fixed grey scale, images windowed."""
        rows = [[cine[row][t].numpy() for cine in self.cines for t in self.frames] for row in range(3)]
        tiles = [to_uint8(f) for f in rows[0]] + [to_uint8(f, 0.0, NUM_CLASSES - 1.0) for r in rows[1:] for f in r]
        captions = [f"{name} {k} t{t}" for name in ("image", "truth", "pred") for k in range(len(self.cines))
                    for t in self.frames]
        return grid(tiles, len(rows[0]), captions, scale=2)


# ------------------------------------------------------------------------------------------------- run-level steps
def info_path(checkpoint: str | Path) -> Path:
    """The JSON beside a segmenter checkpoint (segmenter.pt -> segmenter.json)."""
    return Path(checkpoint).with_suffix(".json")


def write_info(checkpoint: str | Path, prepared_dir: str | Path, profile: str) -> dict:
    """Write `segmenter.json` beside `checkpoint` (rank 0): profile and the training split's prepared pixel sizes."""
    items = split_items(prepared_dir, ["training"])
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
        if not (isinstance(info["profile"], str) and float(info["spacing_mm"]) > 0):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: missing or malformed segmenter info (profile, spacing_mm) for the checkpoint "
                         f"{checkpoint}; {TRAINED_BY} writes it beside segmenter.pt") from e
    return info


def load_prepared(prepared_dir: str | Path, items: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 1, T, H, W) float32 images and (N, T, H, W) uint8 labels of datalist items of a prepared folder."""
    return load_cines(prepared_dir, items).float(), load_cines(prepared_dir, items, "label")[:, 0]


def split_dice(network: nn.Module, prepared_dir: str | Path, split: str = "test",
               batch_size: int = 4, zooms: Sequence[float] = (1.0,)) -> dict[str, float]:
    """Dice per label (and mean) of the segmenter on every cine of a split, cines segmented as `segment_cines`."""
    items = split_items(prepared_dir, [split])
    if not items:
        raise ValueError(f"{prepared_dir}: the datalist has no {split!r} items to measure the segmenter on")
    preds, truths = [], []
    for start in track(range(0, len(items), batch_size), f"segmenter Dice on {split}"):
        images, labels = load_prepared(prepared_dir, items[start:start + batch_size])
        preds.append(segment_cines(network, images, zooms=zooms))
        truths.append(labels)
    return dice_per_label(torch.cat(preds), torch.cat(truths)) | {"n": len(items)}


def write_test_metrics(checkpoint: str | Path, network: nn.Module, device: torch.device | str,
                       prepared_dir: str | Path, output_dir: str | Path, split: str = "test") -> dict:
    """Dice per label of the best checkpoint (loaded into `network`) on `split`, written to
    `<output_dir>/<split>_metrics.json` (rank 0)."""
    if idist.get_rank() != 0:
        return {}
    metrics = split_dice(load_segmenter(checkpoint, network, device), prepared_dir, split)
    write_json(Path(output_dir) / f"{split}_metrics.json", {"checkpoint": str(checkpoint), "split": split, **metrics})
    logger.info("segmenter %s Dice: %s", split, {k: round(v, 4) for k, v in metrics.items()})
    return metrics
