"""Stage 1 of CPGG: the phenotype VAE (joint distribution of the phenotype vector), its data, Ignite steps, validation
metric and sampling. Linear + MONAI `ADN` stacks: docs/README.md says why not MONAI's VarFullyConnectedNet."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric
from monai.data import Dataset
from monai.networks import eval_mode
from monai.networks.blocks import ADN
from monai.utils import CommonKeys, evenly_divisible_all_gather
from torch import nn

from scripts.data.cohort import has_phenotypes, phenotype_matrix, read_datalist, read_stats, split_items
from scripts.data.phenotypes import denormalise, write_phenotype_table
from scripts.runtime.checkpoints import load_weights
from scripts.runtime.distributed import unwrap
from scripts.runtime.features import frechet_distance

logger = logging.getLogger(__name__)


PHENOTYPES = "phenotypes"  # dataset key of the normalised phenotype vector


def phenotype_vectors(prepared_dir: str | Path, split: str) -> tuple[list[str], torch.Tensor]:
    """(subjects, (N, F) float32 vectors normalised with the folder's phenotype_stats.json, never refitted) of the
    `split` items that have phenotypes; ValueError on mismatched columns, missing values or fewer than 2 items."""
    folder = Path(prepared_dir)
    datalist = read_datalist(folder)
    stats = read_stats(folder / "phenotype_stats.json")
    columns = stats["columns"]
    if datalist.get("phenotype_columns") != columns:
        raise ValueError(f"{folder}: datalist.json phenotype_columns {datalist.get('phenotype_columns')} differ from "
                         f"phenotype_stats.json columns {columns}")
    items = [d for d in split_items(folder, [split]) if d.get("has_phenotypes")]
    bad = [d.get("subject") for d in items if not has_phenotypes(d, columns)]
    if bad:
        raise ValueError(f"{folder}: {split} items flagged has_phenotypes with missing or non-numeric values: "
                         f"{bad[:10]}")
    if len(items) < 2:
        raise ValueError(f"{folder}: {len(items)} {split} item(s) have phenotypes (has_phenotypes true); the phenotype "
                         "VAE needs at least 2 per split. Prepare the cohort with a phenotype table.")
    return [d["subject"] for d in items], torch.as_tensor(phenotype_matrix(items, stats), dtype=torch.float32)


def phenotype_dataset(prepared_dir: str | Path, split: str) -> Dataset:
    """MONAI Dataset of {"subject", "phenotypes": (F,) float32 normalised vector} for one split."""
    subjects, x = phenotype_vectors(prepared_dir, split)
    return Dataset([{"subject": s, PHENOTYPES: v} for s, v in zip(subjects, x)])


def train_step(engine: Engine, batch: dict) -> list[dict[str, float]]:
    """`iteration_update` of SupervisedTrainer: one optimiser step; returns the loss pieces as MONAI's decollated
    output, [{"loss", "recon", "kl"}]."""
    x = batch[PHENOTYPES].to(engine.state.device, non_blocking=engine.non_blocking)  # (B, F)
    engine.network.train()
    engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
    recon, mu, logvar = engine.inferer(x, engine.network)
    losses = engine.loss_function(recon, x, mu, logvar)
    losses["loss"].backward()
    engine.optimizer.step()
    return [{k: v.item() for k, v in losses.items()}]


def eval_step(engine: Engine, batch: dict) -> dict[str, torch.Tensor]:
    """`iteration_update` of SupervisedEvaluator: {"pred": reconstruction from z = mu, "label": input}, (B, F) each."""
    x = batch[PHENOTYPES].to(engine.state.device, non_blocking=engine.non_blocking)
    with eval_mode(engine.network):
        recon, _, _ = engine.inferer(x, engine.network)
    return {CommonKeys.PRED: recon, CommonKeys.LABEL: x}


class FrechetDistance(Metric):
    """Frechet distance between the epoch's real vectors ("label") and as many vectors sampled from `network`, with
    the same `seed` at every evaluation, so epochs are compared on the same z."""

    required_output_keys = (CommonKeys.LABEL,)  # Ignite passes (output["label"],) to `update`

    def __init__(self, network: nn.Module, seed: int = 0) -> None:
        self.network, self.seed = network, seed
        super().__init__()

    def reset(self) -> None:
        self._real: list[torch.Tensor] = []

    def update(self, output: tuple[torch.Tensor]) -> None:
        self._real.append(output[0].detach())  # (B, F), on the device (NCCL gathers CUDA tensors)

    def compute(self) -> float:
        if not self._real:  # this rank saw no batch (torch.cat of nothing would raise a bare RuntimeError)
            raise NotComputableError("FrechetDistance needs at least 2 vectors")
        real = evenly_divisible_all_gather(torch.cat(self._real)).double().cpu()  # (N, F) over all ranks
        if len(real) < 2:
            raise NotComputableError("FrechetDistance needs at least 2 vectors")
        fake = unwrap(self.network).sample(len(real), torch.Generator().manual_seed(self.seed))  # (N, F)
        return frechet_distance(fake, real)


# --------------------------------------------------------------------------------------------------------- sampling
def draw_phenotypes(network: nn.Module, checkpoint: str | Path, stats: dict, n: int, seed: int) -> np.ndarray:
    """(n, F) physical phenotype vectors (columns of `stats`) decoded from z ~ N(0, I) seeded with `seed`;
    `checkpoint`: phenotype_vae.pt or a latest checkpoint (its "network" entry), checked against the network."""
    if n < 1:
        raise ValueError(f"num_samples must be >= 1, got {n}")
    load_weights(network, checkpoint, trained_by="configs/train_phenotype_vae.json")
    z = network.sample(n, torch.Generator().manual_seed(seed))  # (n, F) normalised
    if z.shape[1] != len(stats["columns"]):
        raise ValueError(f"the network gives {z.shape[1]} values, the statistics have {len(stats['columns'])} columns")
    return denormalise(z.double().cpu().numpy(), stats)


def draw_eids(n: int) -> list[str]:
    """eids S000000... of `n` drawn vectors."""
    return [f"S{i:06d}" for i in range(n)]


def write_draws(out_csv: str | Path, values: np.ndarray, stats: dict, columns: Sequence[str]) -> Path:
    """Write (n, F) drawn vectors as a phenotype CSV: `eid` S000000... then `columns` (a subset of the stats')."""
    index = [stats["columns"].index(c) for c in columns]
    rows = {e: {c: float(row[k]) for c, k in zip(columns, index)} for e, row in zip(draw_eids(len(values)), values)}
    write_phenotype_table(out_csv, columns, rows)
    return Path(out_csv)


def sample_phenotypes(network: nn.Module, checkpoint: str | Path, stats_path: str | Path, n: int, seed: int,
                      out_csv: str | Path, columns: Sequence[str] | None = None) -> Path:
    """Sample `n` phenotype vectors (`draw_phenotypes`) and write them as CSV (`write_draws`); `columns` default to
    every column of the statistics at `stats_path`, in their order. Returns `out_csv`."""
    stats = read_stats(stats_path)
    columns = list(stats["columns"] if columns is None else columns)
    absent = [c for c in columns if c not in stats["columns"]]
    if absent or not columns:
        raise ValueError(f"columns {absent or columns} not in the phenotype statistics {stats_path} (it has "
                         f"{stats['columns']})")
    values = draw_phenotypes(network, checkpoint, stats, n, seed)
    logger.info("sampled %d phenotype vectors (seed %d) from %s into %s", n, seed, checkpoint, out_csv)
    return write_draws(out_csv, values, stats, columns)


def _mlp(sizes: Sequence[int], negative_slope: float, dropout: float) -> nn.Sequential:
    """Linear -> BatchNorm1d -> LeakyReLU (-> Dropout) for each consecutive pair of `sizes`."""
    layers = [nn.Sequential(nn.Linear(a, b), ADN(ordering="NAD", in_channels=b, norm="BATCH", norm_dim=1,
                                                  act=("leakyrelu", {"negative_slope": negative_slope}),
                                                  dropout=dropout or None, dropout_dim=1))
              for a, b in pairwise(sizes)]
    return nn.Sequential(*layers)



class PhenotypeVAE(nn.Module):
    """MLP VAE over a normalised phenotype vector of `in_features` columns: in_features -> hidden... -> (mu, logvar)
    of size `latent`; the decoder mirrors it and ends linear (the inputs are z-scores)."""

    def __init__(self, in_features: int, hidden: Sequence[int] = (128, 128, 128), latent: int = 32,
                 negative_slope: float = 0.01, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = list(hidden)
        if in_features < 1 or latent < 1 or not hidden:
            raise ValueError(f"PhenotypeVAE needs in_features >= 1, latent >= 1 and hidden layers; got "
                             f"in_features={in_features}, latent={latent}, hidden={hidden}")
        self.in_features, self.latent = in_features, latent
        self.encoder = _mlp([in_features, *hidden], negative_slope, dropout)
        self.mu = nn.Linear(hidden[-1], latent)
        self.logvar = nn.Linear(hidden[-1], latent)
        self.decoder = nn.Sequential(*_mlp([latent, *hidden[::-1]], negative_slope, dropout),
                                     nn.Linear(hidden[0], in_features))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, in_features) -> mu, logvar, each (B, latent)."""
        h = self.encoder(x)  # (B, hidden[-1])
        return self.mu(h), self.logvar(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent) -> (B, in_features) normalised phenotypes."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, in_features) -> (recon (B, in_features), mu (B, latent), logvar (B, latent)); training decodes
        z = mu + eps * exp(logvar / 2), evaluation z = mu."""
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu  # (B, latent)
        return self.decode(z), mu, logvar

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Decode z ~ N(0, I): (n, in_features) normalised vectors, in eval mode; `generator` is a CPU generator."""
        z = torch.randn(n, self.latent, generator=generator)  # (n, latent) on the CPU: the same draws on any device
        with eval_mode(self):
            return self.decode(z.to(self.mu.weight.device))
