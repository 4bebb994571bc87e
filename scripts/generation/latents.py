"""Latent cache of stage 3: encode a prepared cohort once with the trained autoencoder; MAR trains from the cache.
`<latent_dir>/<split>.pt` per split, `latent_stats.json` (scale factor 1 / std: MAR sees unit-variance latents)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import Dataset
from torch import nn

from scripts.data.cohort import phenotype_matrix, read_datalist, read_stats, split_items
from scripts.runtime.files import atomic_write, write_json
from scripts.runtime.progress import track

logger = logging.getLogger(__name__)


STATS = "latent_stats.json"


@torch.no_grad()
def encode_split(network: nn.Module, prepared_dir: str | Path, split: str, batch_size: int,
                 device: torch.device) -> dict:
    """Encode every cine of `split` -> {"subjects", "mean", "logvar", "phenotypes", "columns"} (CPU tensors)."""
    folder = Path(prepared_dir)
    items = split_items(folder, [split])
    columns = list(read_datalist(folder).get("phenotype_columns") or [])
    if not items:
        raise ValueError(f"{folder / 'datalist.json'}: the {split!r} split is empty")
    stats_path = folder / "phenotype_stats.json"
    stats = read_stats(stats_path) if stats_path.is_file() else None  # none: a cohort without phenotypes
    phenotypes = phenotype_matrix(items, stats) if stats else np.full((len(items), len(columns)), np.nan)
    network.eval()
    means, logvars = [], []
    for start in track(range(0, len(items), batch_size), f"encoding the {split} cines"):
        batch = [np.load(folder / d["image"]).astype(np.float32) for d in items[start:start + batch_size]]
        mean, logvar = network.encode(torch.from_numpy(np.stack(batch)).to(device))  # (b, 16, 25, 12, 12) each
        means.append(mean.float().cpu())
        logvars.append(logvar.float().cpu())
    logger.info("encoded %d %s cines", len(items), split)
    # mean, logvar (N, 16, 25, 12, 12) float32; phenotypes (N, F) float32 normalised, NaN rows for subjects without;
    # the whole dict loads with torch.load(weights_only=True)
    return {"subjects": [d["subject"] for d in items], "mean": torch.cat(means), "logvar": torch.cat(logvars),
            "phenotypes": torch.as_tensor(phenotypes, dtype=torch.float32), "columns": columns}


def scale_factor(mean: torch.Tensor, logvar: torch.Tensor) -> float:
    """1 / std of posterior draws z = mean + exp(logvar / 2) eps over all elements (exact in expectation)."""
    mean, var = mean.double(), logvar.double().exp()
    total_var = var.mean() + mean.pow(2).mean() - mean.mean().pow(2)
    return float(1.0 / total_var.sqrt())


def channel_report(mean: torch.Tensor, logvar: torch.Tensor, used_kl: float = 0.01) -> dict:
    """Per latent channel of (N, C, ...) posteriors: std of the posterior means, mean KL per element (nats) and how many
    channels carry information (mean KL per element > `used_kl`; an unused channel's posterior is N(0, 1), KL 0)."""
    mean, logvar = mean.double().transpose(0, 1).flatten(1), logvar.double().transpose(0, 1).flatten(1)  # (C, N*...)
    kl = (0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)).mean(1)  # (C,)
    return {"mean_std": [round(float(v), 4) for v in mean.std(1)], "kl_per_element": [round(float(v), 4) for v in kl],
            "channels_used": int((kl > used_kl).sum()), "used_kl_threshold": used_kl}


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
                     "autoencoder": str(checkpoint), "profile": profile,
                     "channels": channel_report(cache["mean"], cache["logvar"])}
        with atomic_write(out / f"{split}.pt") as tmp:
            torch.save(cache, tmp)
    write_json(out / STATS, stats)
    logger.info("latent cache in %s: scale factor %.4f over %d training cines; %d of %d channels in use (KL per "
                "element %s)", out, stats["scale_factor"], stats["n_training"], stats["channels"]["channels_used"],
                len(stats["channels"]["kl_per_element"]), stats["channels"]["kl_per_element"])
    return stats


def read_latent_stats(latent_dir: str | Path) -> dict:
    """latent_stats.json of a cache, with a clear error where the cache is missing."""
    path = Path(latent_dir) / STATS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no latent cache; run configs/encode_latents.json first")
    return json.loads(path.read_text(encoding="utf-8"))


def latent_dataset(latent_dir: str | Path, split: str, conditional: bool = True) -> Dataset:
    """MONAI Dataset of {"subject", "mean", "logvar", "phenotypes"} from `<latent_dir>/<split>.pt`; with `conditional`,
    items without phenotypes are left out (logged; ValueError if none is left)."""
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
