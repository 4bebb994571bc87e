"""ViT fine-tuning networks (MAE encoder or scratch), their metrics and inference (`configs/train_classifier.json`,
`train_regressor.json`, `inference.json`); the folds they train on: scripts.downstream.folds, docs/downstream.md."""

from __future__ import annotations

import csv
import io
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric
from monai.metrics import compute_roc_auc
from monai.networks.nets import ViT
from monai.utils import CommonKeys, evenly_divisible_all_gather
from torch import nn

from scripts.data.cohort import read_stats
from scripts.data.shapes import IMAGE_SIZE, NUM_FRAMES
from scripts.downstream.folds import TASKS
from scripts.downstream.mae import ENCODER_KEYS, IMAGE, freeze_unused_norms, load_encoder, usable
from scripts.runtime.files import write_text

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------- network
class ViTPredictor(nn.Module):
    """MONAI ViT with a linear head on the [CLS] token: (B, 50, 96, 96) cines, frames as channels -> (B, num_outputs)
    logits or values. ViT returns (output, hidden states); this returns the output, as engines and TorchScript need."""

    def __init__(self, num_outputs: int, patch_size: int = 16, hidden_size: int = 768, num_layers: int = 12,
                 num_heads: int = 12, mlp_dim: int = 3072, dropout_rate: float = 0.0) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.vit = ViT(in_channels=NUM_FRAMES, img_size=IMAGE_SIZE, patch_size=patch_size, hidden_size=hidden_size,
                       mlp_dim=mlp_dim, num_layers=num_layers, num_heads=num_heads, pos_embed_type="sincos",
                       classification=True, num_classes=num_outputs, dropout_rate=dropout_rate, spatial_dims=2,
                       post_activation="none")
        freeze_unused_norms(self.vit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x)[0]


def vit_network(mae: Mapping, num_outputs: int, pretrained: str | Path | None = None) -> ViTPredictor:
    """The fine-tuning network for a profile's `mae` dict (encoder sizes), its encoder loaded from `pretrained`
    (an MAE checkpoint; None or "": from scratch, the paper's ViT baseline)."""
    net = ViTPredictor(num_outputs, **{k: mae[k] for k in ENCODER_KEYS})
    if pretrained:
        load_encoder(net.vit, pretrained, net.num_layers)
    return net


# --------------------------------------------------------------------------------------------------------- metrics
def classification_metrics(probs: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """{"acc", "auc"} of (N, C) class probabilities against (N,) class indices; AUC by MONAI's compute_roc_auc
    (one-vs-rest, macro average over classes; for C = 2 the binary AUC), NaN where a class is absent."""
    onehot = nn.functional.one_hot(target.long(), probs.shape[1])
    acc = (probs.argmax(1) == target).double().mean().item()
    return {"acc": acc, "auc": float(compute_roc_auc(probs.double(), onehot.double(), average="macro"))}


def metric_column(column: str) -> str:
    """A phenotype column as it appears in metric names, in the characters MLflow accepts: "LVEF (%)" -> "LVEF pct",
    "LVEDV (mL)" -> "LVEDV mL"."""
    return " ".join(re.sub(r"[^\w\-. :/]", " ", column.replace("%", "pct")).split())


def regression_metrics(pred: torch.Tensor, target: torch.Tensor, stats: Mapping) -> dict[str, float]:
    """Per phenotype column c: "mae <c>" in its units and "r2 <c>" (c as metric_column writes it), plus "mean_r2",
    from (N, F) z-scored values. (Ignite's R2Score is single-output.)"""
    pred, target = pred.double(), target.double()
    std = torch.as_tensor(stats["std"], dtype=torch.float64)
    mae = (pred - target).abs().mean(0) * std  # the z-score's scale cancels in R^2 but not in MAE
    r2 = 1 - (pred - target).square().sum(0) / (target - target.mean(0)).square().sum(0)
    out = {"mean_r2": r2.mean().item()}
    for c, m, r in zip(stats["columns"], mae.tolist(), r2.tolist()):
        out |= {f"mae {metric_column(c)}": m, f"r2 {metric_column(c)}": r}
    return out


class TaskMetrics(Metric):
    """The epoch's classification or regression metrics over all ranks, as flat "<prefix><name>" entries of
    engine.state.metrics (e.g. val_auc, val_acc; val_mean_r2, "val_r2 LVEF pct", "val_mae LVEF pct")."""

    required_output_keys = (CommonKeys.PRED, CommonKeys.LABEL)

    def __init__(self, task: str, stats_path: str | Path | None = None, prefix: str = "val_") -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.task, self.prefix = task, prefix
        self.stats = read_stats(stats_path) if task == "regression" else None
        super().__init__(metrics_result_mode="flatten")

    def reset(self) -> None:
        self._pred: list[torch.Tensor] = []
        self._label: list[torch.Tensor] = []

    def update(self, output: tuple[torch.Tensor, torch.Tensor]) -> None:
        self._pred.append(output[0].detach().float())  # (B, C) logits or (B, F) values, on the device
        self._label.append(output[1].detach())

    def compute(self) -> dict[str, float]:
        if not self._pred:
            raise NotComputableError("TaskMetrics needs at least one batch")
        pred = evenly_divisible_all_gather(torch.cat(self._pred)).cpu()
        label = evenly_divisible_all_gather(torch.cat(self._label)).cpu()
        values = (classification_metrics(pred.softmax(1), label) if self.task == "classification"
                  else regression_metrics(pred, label, self.stats))
        return {self.prefix + k: v for k, v in values.items()}


# ------------------------------------------------------------------------------------------------------- inference
def input_items(path: str | Path) -> list[dict]:
    """{"image", "file", "subject"} items of a prepared cine (.npy) or of every .npy in a folder (unusable files are
    logged and skipped); "file" keeps the path, as "image" becomes the tensor."""
    path = Path(path)
    files = sorted(path.glob("*.npy")) if path.is_dir() else [path]
    if not files or not files[0].exists():
        raise FileNotFoundError(f"{path}: no prepared cine (.npy of shape 1 x 50 x 96 x 96) found")
    items = usable([{IMAGE: str(f), "file": str(f), "subject": f.stem} for f in files])
    if not items:
        raise ValueError(f"{path}: none of the {len(files)} .npy file(s) is a 1 x 50 x 96 x 96 prepared cine")
    return items


class PredictionsCSV:
    """Writes subject, image, predicted class and one probability column per class of every evaluated cine to `path`
    when the evaluator completes (atomically; MONAI's ClassificationSaver writes in place and without class names)."""

    def __init__(self, path: str | Path, class_names: Sequence[str]) -> None:
        self.path, self.class_names = Path(path), list(class_names)
        self.rows: list[list] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def collect(self, engine: Engine) -> None:
        for item, out in zip(engine.state.batch, engine.state.output):  # decollated: one dict per cine
            probs = out[CommonKeys.PRED].detach().float().cpu().tolist()
            self.rows.append([item["subject"], item["file"], self.class_names[int(np.argmax(probs))],
                              *(f"{p:.6f}" for p in probs)])

    def write(self, engine: Engine) -> None:
        if idist.get_rank() != 0:
            return
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["subject", "file", "predicted", *(f"p_{c}" for c in self.class_names)])
        writer.writerows(self.rows)
        write_text(self.path, buffer.getvalue())
        logger.info("predictions for %d cine(s) written to %s", len(self.rows), self.path)
