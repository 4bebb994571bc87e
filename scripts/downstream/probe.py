"""Frozen-feature linear probe: the pooled tokens of a ViT encoder (an MAE's, or randomly initialised for the scratch
row) for every cine, then scikit-learn logistic regression (classification) or ridge regression (phenotypes) on the
standardised features of a training fold only, scored on its validation fold with the fine-tuning metrics."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader

from scripts.downstream.finetune import classification_metrics, regression_metrics, vit_network
from scripts.downstream.folds import CrossValidation
from scripts.downstream.mae import IMAGE, LABEL, cine_dataset

logger = logging.getLogger(__name__)

# after the encoder's final LayerNorm: every patch token in grid order (N_patches x hidden_size values; keeps where
# things are, which sizes and volumes need), their mean, or the [CLS] token
POOLINGS = ("tokens", "mean", "cls")


def encoder_features(mae: Mapping, weights: str | None, items: Sequence[dict], pooling: str = "tokens",
                     batch_size: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    """{image path: float32 feature (N_patches x hidden_size for "tokens", else hidden_size)} of `items` through the ViT encoder of the MAE checkpoint `weights`
    (loaded as fine-tuning loads it; None or "": initialised with `seed`, the scratch row)."""
    if pooling not in POOLINGS:
        raise ValueError(f"probe#pooling must be one of {POOLINGS}, got {pooling!r}")
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    vit = vit_network(mae, 1, weights).vit.to(device).eval()
    loader = DataLoader(cine_dataset(items, cache_rate=0.0), batch_size=batch_size)
    out = []
    with torch.no_grad():
        for batch in loader:
            _, hidden = vit(batch[IMAGE].to(device))  # the last block's (B, 1 + patches, hidden_size) tokens
            tokens = vit.norm(hidden[-1])
            pooled = {"tokens": tokens[:, 1:].flatten(1), "mean": tokens[:, 1:].mean(1), "cls": tokens[:, 0]}[pooling]
            out.append(pooled.float().cpu().numpy())
    return dict(zip((d[IMAGE] for d in items), np.concatenate(out) if out else np.zeros((0, mae["hidden_size"]))))


def fit_predict(task: str, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, probe: Mapping,
                num_classes: int | None = None) -> np.ndarray:
    """Validation predictions of a probe fitted on the training part only (features standardised with its statistics):
    (N, num_classes) probabilities of LogisticRegression(C=probe#logistic_c), or (N, F) values of
    RidgeCV(alphas=probe#ridge_alphas) (alpha by leave-one-out on the training part)."""
    if task == "regression":
        model = make_pipeline(StandardScaler(), RidgeCV(alphas=probe["ridge_alphas"]))
        return model.fit(x_train, y_train).predict(x_val)
    if len(np.unique(y_train)) < 2:
        raise ValueError(f"a linear probe needs training cines of at least 2 classes, got only class "
                         f"{int(y_train[0])}: give a larger labelled cohort or a larger label fraction")
    model = make_pipeline(StandardScaler(), LogisticRegression(C=probe["logistic_c"], max_iter=probe["max_iter"]))
    model.fit(x_train, y_train)
    probs = np.zeros((len(x_val), num_classes))
    probs[:, model.classes_] = model.predict_proba(x_val)  # a class absent from the training part: probability 0
    return probs


def score(task: str, pred: np.ndarray, target: np.ndarray, stats: Mapping | None) -> dict[str, float]:
    """The fine-tuning metrics (val_acc, val_auc; val_mean_r2, "val_r2 <column>", "val_mae <column>") of predictions."""
    pred_t, target_t = torch.as_tensor(pred), torch.as_tensor(target)
    values = (classification_metrics(pred_t, target_t) if task == "classification"
              else regression_metrics(pred_t, target_t, stats))
    return {"val_" + k: v for k, v in values.items()}


def probe_task(task: Mapping, items: Sequence[dict], features: Mapping[str, np.ndarray], cv: CrossValidation,
               fractions: Sequence[float], probe: Mapping, stats: Mapping | None = None,
               synthetic: Sequence[dict] = (), mix_star: float = 0.0) -> list[dict]:
    """Every unit of one task: {"repeat", "fold", "fraction", "training_subjects", "training", "synthetic",
    "validation", "metrics"}; with `mix_star` > 0, the first round(mix_star x training count) of the labelled
    `synthetic` cines join each training part (mix*), never a validation part."""
    kind, num_classes = task["task"], task["overrides"].get("num_classes")
    units = []
    for repeat, fold, fraction in cv.units(fractions):
        train, val = cv.split(items, repeat, fold, fraction)
        extra = list(synthetic[:round(mix_star * len(train))])
        if len(extra) < round(mix_star * len(train)):
            raise ValueError(f"mix* {mix_star:g} needs {round(mix_star * len(train))} synthetic cines, {len(extra)} given")
        x = np.stack([features[d[IMAGE]] for d in train + extra])
        y = np.stack([np.asarray(d[LABEL]) for d in train + extra])
        pred = fit_predict(kind, x, y, np.stack([features[d[IMAGE]] for d in val]), probe, num_classes)
        units.append({"repeat": repeat, "fold": fold, "fraction": fraction,
                      "training_subjects": len({d["subject"] for d in train}), "training": len(train),
                      "synthetic": len(extra), "validation": len(val),
                      "metrics": score(kind, pred, np.stack([np.asarray(d[LABEL]) for d in val]), stats)})
    logger.info("linear probe %s: %d units", task["name"], len(units))
    return units
