"""Latent cache of stage 3: encode a prepared cohort once with the trained autoencoder; MAR trains from the cache.

`<latent_dir>/<split>.pt` holds, for the items of one datalist split, {"subjects": [str], "mean", "logvar":
(N, 16, 25, 12, 12) float32 posterior moments, "phenotypes": (N, F) float32 normalised (NaN rows where a subject has
none), "columns": [str]}; `<latent_dir>/latent_stats.json` holds the scale factor 1 / std of posterior draws over the
training split (the SD/MAR convention: MAR sees unit-variance latents), with the autoencoder file and profile it came
from. Everything loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import Dataset
from torch import nn

from scripts.data.cohort import read_stats
from scripts.data.phenotypes import normalise
from scripts.runtime.files import atomic_write, write_json

logger = logging.getLogger(__name__)


logger = logging.getLogger(__name__)

STATS = "latent_stats.json"


def _split_items(prepared_dir: Path, split: str) -> tuple[list[dict], list[str]]:
    """(datalist items of `split`, phenotype columns) from a prepared folder."""
    path = prepared_dir / "datalist.json"
    if not path.is_file():
        raise FileNotFoundError(f"{prepared_dir}: not a prepared folder (no datalist.json); run configs/prepare.json")
    datalist = json.loads(path.read_text(encoding="utf-8"))
    if split not in datalist:
        raise ValueError(f"{path}: no {split!r} list (has {sorted(datalist)})")
    return datalist[split], list(datalist.get("phenotype_columns") or [])


def _phenotype_rows(items: Sequence[dict], columns: list[str], stats: dict | None) -> torch.Tensor:
    """(N, F) normalised phenotypes; a row of NaN for an item without (complete) phenotypes."""
    rows = np.full((len(items), len(columns)), np.nan)
    for i, d in enumerate(items):
        values = [d.get(c) for c in columns]
        if stats and d.get("has_phenotypes") and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            rows[i] = normalise([values], stats)[0]
    return torch.as_tensor(rows, dtype=torch.float32)


@torch.no_grad()
def encode_split(network: nn.Module, prepared_dir: str | Path, split: str, batch_size: int,
                 device: torch.device) -> dict:
    """Encode every cine of `split` -> {"subjects", "mean", "logvar", "phenotypes", "columns"} (CPU tensors)."""
    folder = Path(prepared_dir)
    items, columns = _split_items(folder, split)
    if not items:
        raise ValueError(f"{folder / 'datalist.json'}: the {split!r} split is empty")
    stats_path = folder / "phenotype_stats.json"
    stats = read_stats(stats_path) if stats_path.is_file() else None
    network.eval()
    means, logvars = [], []
    for start in range(0, len(items), batch_size):
        batch = [np.load(folder / d["image"]).astype(np.float32) for d in items[start:start + batch_size]]
        mean, logvar = network.encode(torch.from_numpy(np.stack(batch)).to(device))  # (b, 16, 25, 12, 12) each
        means.append(mean.float().cpu())
        logvars.append(logvar.float().cpu())
    logger.info("encoded %d %s cines", len(items), split)
    return {"subjects": [d["subject"] for d in items], "mean": torch.cat(means), "logvar": torch.cat(logvars),
            "phenotypes": _phenotype_rows(items, columns, stats), "columns": columns}


def scale_factor(mean: torch.Tensor, logvar: torch.Tensor) -> float:
    """1 / std of posterior draws z = mean + exp(logvar / 2) eps over all elements (exact in expectation)."""
    mean, var = mean.double(), logvar.double().exp()
    total_var = var.mean() + mean.pow(2).mean() - mean.mean().pow(2)
    return float(1.0 / total_var.sqrt())


def encode_cohort(network: nn.Module, prepared_dir: str | Path, latent_dir: str | Path, checkpoint: str | Path,
                  profile: str, splits: Sequence[str] = ("training", "validation"), batch_size: int = 8,
                  device: torch.device | str = "cpu") -> dict:
    """Encode `splits` of a prepared cohort into `latent_dir` (one .pt per split, written atomically) and write
    latent_stats.json with the training split's scale factor. `network` holds the weights of `checkpoint`."""
    out = Path(latent_dir)
    if "training" not in splits:
        raise ValueError(f"splits {list(splits)} must include 'training' (the scale factor is fitted on it)")
    stats: dict = {}
    for split in splits:
        cache = encode_split(network, prepared_dir, split, batch_size, torch.device(device))
        if split == "training":
            stats = {"scale_factor": scale_factor(cache["mean"], cache["logvar"]), "n_training": len(cache["subjects"]),
                     "latent_shape": list(cache["mean"].shape[1:]), "columns": cache["columns"],
                     "autoencoder": str(checkpoint), "profile": profile}
        with atomic_write(out / f"{split}.pt") as tmp:
            torch.save(cache, tmp)
    write_json(out / STATS, stats)
    logger.info("latent cache in %s: scale factor %.4f over %d training cines", out, stats["scale_factor"],
                stats["n_training"])
    return stats


def read_latent_stats(latent_dir: str | Path) -> dict:
    """latent_stats.json of a cache, with a clear error where the cache is missing."""
    path = Path(latent_dir) / STATS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no latent cache; run configs/encode_latents.json first")
    return json.loads(path.read_text(encoding="utf-8"))


def latent_dataset(latent_dir: str | Path, split: str, conditional: bool = True) -> Dataset:
    """MONAI Dataset of {"subject", "mean", "logvar", "phenotypes"} from `<latent_dir>/<split>.pt`.

    With `conditional`, items without phenotypes are left out (logged): a conditional MAR needs every condition.
    """
    path = Path(latent_dir) / f"{split}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no latent cache for {split!r}; run configs/encode_latents.json first")
    cache = torch.load(path, weights_only=True)
    keep = [i for i in range(len(cache["subjects"]))
            if not conditional or bool(torch.isfinite(cache["phenotypes"][i]).all())]
    if len(keep) < len(cache["subjects"]):
        logger.warning("%s: %d of %d cines have no phenotypes and are left out", path,
                       len(cache["subjects"]) - len(keep), len(cache["subjects"]))
    if not keep:
        raise ValueError(f"{path}: no cine with phenotypes to train a conditional model on")
    return Dataset([{"subject": cache["subjects"][i], "mean": cache["mean"][i], "logvar": cache["logvar"][i],
                     "phenotypes": cache["phenotypes"][i]} for i in keep])
