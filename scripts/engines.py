"""Training, validation and sampling pieces that MONAI and Ignite do not provide, for every training config.

Used by `configs/train_phenotype_vae.json` and `configs/sample_phenotypes.json`: a dataset of normalised phenotype
vectors from a prepared folder, the VAE loss, iteration functions for `SupervisedTrainer`/`SupervisedEvaluator`, a
Frechet-distance metric, a metrics-JSON handler, checkpoint handlers for resuming, and phenotype sampling to CSV.

Used by `configs/train_autoencoder.json` (stage 2): the cine autoencoder's reconstruction loss, its GAN iteration
(generator and discriminator steps), an evaluation step, a reconstruction-montage handler and a resumable checkpoint
whose errors name the autoencoder profile.

Used by `configs/train_mar.json` (stage 3): the MAR iteration (posterior draw, loss, clipped step, EMA update) and a
seeded validation loss, so epochs are compared on the same masks and noise.

Used by `configs/multi_gpu.json` (layered on any training config): rank-aware device, process-group set-up,
DistributedDataParallel wrapping and the per-rank handler list.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import ignite.distributed as idist
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric
from monai.data import Dataset
from monai.handlers import CheckpointLoader, CheckpointSaver, StatsHandler
from monai.metrics import FIDMetric
from monai.networks import eval_mode
from monai.utils import CommonKeys, evenly_divisible_all_gather
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from scripts.autoencoder import CineAutoencoderKL
from scripts.io import atomic_write, write_json
from scripts.montage import save_montage
from scripts.networks import gaussian_kl
from scripts.phenotypes import denormalise, normalise, write_phenotype_table

logger = logging.getLogger(__name__)

PHENOTYPES = "phenotypes"  # dataset key of the normalised phenotype vector


# ------------------------------------------------------------------------------------------------------ distributed
def rank_device() -> torch.device:
    """cuda:LOCAL_RANK (torchrun's variable, 0 without it) where CUDA is available, else the CPU."""
    return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu")


def init_distributed(device: torch.device) -> int:
    """Join torchrun's process group once (NCCL on CUDA, gloo on CPU), pin the CUDA device; returns the rank."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return dist.get_rank()


def distributed(network: nn.Module, device: torch.device) -> nn.Module:
    """`network` in DistributedDataParallel where a process group is initialised; the network itself otherwise."""
    if not (dist.is_available() and dist.is_initialized()):
        return network
    return DistributedDataParallel(network, device_ids=[device] if device.type == "cuda" else None)


def unwrap(network: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper; any other network as it is."""
    return network.module if isinstance(network, DistributedDataParallel) else network


def rank_handlers(handlers: Sequence) -> list:
    """Every handler on rank 0; on other ranks, those that only log or write files are dropped (MONAI model zoo's
    multi-GPU convention). Validation, learning-rate and resume handlers run on every rank."""
    if idist.get_rank() == 0:
        return list(handlers)
    writers = (StatsHandler, CheckpointSaver, MetricsJSON, ReconstructionMontage)
    return [h for h in handlers if not isinstance(h, writers)]


# ------------------------------------------------------------------------------------------------------------- data
def read_stats(path: str | Path) -> dict:
    """Read and check a phenotype_stats.json ({"columns", "mean", "std", "n"}) written by configs/prepare.json."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: phenotype statistics not found; the prepared folder {path.parent} needs a "
                                "phenotype_stats.json (configs/prepare.json writes it when the cohort has a phenotype "
                                "table and training subjects with phenotypes)")
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
        ok = (len(stats["columns"]) == len(stats["mean"]) == len(stats["std"]) > 0
              and all(math.isfinite(m) for m in stats["mean"]) and all(math.isfinite(s) and s > 0 for s in stats["std"]))
    except (ValueError, TypeError, KeyError):  # invalid JSON, wrong types, missing keys
        ok = False
    if not ok:
        raise ValueError(f"{path}: malformed statistics: need equal-length, non-empty 'columns', 'mean' and 'std' "
                         "(finite values, std > 0)")
    return stats


def phenotype_vectors(prepared_dir: str | Path, split: str) -> tuple[list[str], torch.Tensor]:
    """(subjects, (N, F) float32 normalised vectors) of the `split` items that have phenotypes.

    Normalised with the folder's phenotype_stats.json (fitted on the training split by prepare; never refitted).
    """
    folder = Path(prepared_dir)
    datalist_path = folder / "datalist.json"
    if not datalist_path.is_file():
        raise FileNotFoundError(f"{folder}: not a prepared folder (no datalist.json); run configs/prepare.json first")
    stats = read_stats(folder / "phenotype_stats.json")
    datalist = json.loads(datalist_path.read_text(encoding="utf-8"))
    columns = stats["columns"]
    if datalist.get("phenotype_columns") != columns:
        raise ValueError(f"{folder}: datalist.json phenotype_columns {datalist.get('phenotype_columns')} differ from "
                         f"phenotype_stats.json columns {columns}")
    if split not in datalist:
        raise ValueError(f"{folder}: datalist.json has no {split!r} list (has {sorted(datalist)})")
    items = [d for d in datalist[split] if d.get("has_phenotypes")]
    bad = [d.get("subject") for d in items
           if not all(isinstance(d.get(c), (int, float)) and math.isfinite(d[c]) for c in columns)]
    if bad:
        raise ValueError(f"{folder}: {split} items flagged has_phenotypes with missing or non-numeric values: {bad[:10]}")
    if len(items) < 2:
        raise ValueError(f"{folder}: {len(items)} {split} item(s) have phenotypes (has_phenotypes true); the phenotype "
                         "VAE needs at least 2 per split. Prepare the cohort with a phenotype table.")
    values = normalise([[d[c] for c in columns] for d in items], stats)
    return [d["subject"] for d in items], torch.as_tensor(values, dtype=torch.float32)


def phenotype_dataset(prepared_dir: str | Path, split: str) -> Dataset:
    """MONAI Dataset of {"subject", "phenotypes": (F,) float32 normalised vector} for one split."""
    subjects, x = phenotype_vectors(prepared_dir, split)
    return Dataset([{"subject": s, PHENOTYPES: v} for s, v in zip(subjects, x)])


# ------------------------------------------------------------------------------------------------- loss and steps
class VAELoss(nn.Module):
    """MSE (mean over elements) + beta * KL(q(z|x) || N(0, I)) (summed over latent dims, mean over the batch).

    beta 0.01 as in the authors' code. Returns {"loss", "recon", "kl"} (scalar tensors).
    """

    def __init__(self, beta: float = 0.01) -> None:
        super().__init__()
        self.beta = beta

    def forward(self, recon: torch.Tensor, target: torch.Tensor, mu: torch.Tensor,
                logvar: torch.Tensor) -> dict[str, torch.Tensor]:
        """recon, target (B, F); mu, logvar (B, latent)."""
        mse = nn.functional.mse_loss(recon, target)
        kl = gaussian_kl(mu, logvar)
        return {"loss": mse + self.beta * kl, "recon": mse, "kl": kl}


def train_step(engine: Engine, batch: dict) -> dict[str, float]:
    """`iteration_update` of SupervisedTrainer: one optimiser step; returns the loss pieces for logging/metrics."""
    x = batch[PHENOTYPES].to(engine.state.device, non_blocking=engine.non_blocking)  # (B, F)
    engine.network.train()
    engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
    recon, mu, logvar = engine.network(x)
    losses = engine.loss_function(recon, x, mu, logvar)
    losses["loss"].backward()
    engine.optimizer.step()
    return {k: v.item() for k, v in losses.items()}


def eval_step(engine: Engine, batch: dict) -> dict[str, torch.Tensor]:
    """`iteration_update` of SupervisedEvaluator: {"pred": reconstruction from z = mu, "label": input}, (B, F) each."""
    x = batch[PHENOTYPES].to(engine.state.device, non_blocking=engine.non_blocking)
    with eval_mode(engine.network):
        recon, _, _ = engine.network(x)
    return {CommonKeys.PRED: recon, CommonKeys.LABEL: x}


# ---------------------------------------------------------------------------------------------------------- metrics
def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Gaussian Frechet distance between two sets of (N, F) vectors (MONAI FIDMetric, float64)."""
    return float(FIDMetric()(a.double().cpu(), b.double().cpu()))


class FrechetDistance(Metric):
    """Frechet distance between the epoch's real vectors ("label") and as many vectors sampled from `network`.

    Samples are drawn with a generator seeded by `seed` at every evaluation, so epochs are compared on the same z.
    """

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


# --------------------------------------------------------------------------------------------------------- handlers
class MetricsJSON:
    """After each evaluation, write {"epoch", metric: value...} of the evaluator to `path` (atomically)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        write_json(self.path, {"epoch": engine.state.epoch, **{k: float(v) for k, v in engine.state.metrics.items()}})


class BestCheckpointSaver(CheckpointSaver):
    """MONAI CheckpointSaver whose best-key-metric record has a `state_dict`, so a resumed run keeps its best model."""

    def state_dict(self) -> dict:
        return self._key_metric_checkpoint.state_dict()


def check_state_dict(state: object, network: nn.Module, path: str | Path, run: str = "") -> None:
    """Raise ValueError naming `path` and the keys where `state` does not match `network`'s names and shapes.

    `run` describes this run's configuration for the message (e.g. "autoencoder profile 'tiny'"). TypeError where
    `state` is not a mapping at all.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"{path}: not a network state dict (found {type(state).__name__})")
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(getattr(state[k], 'shape', ()))} vs network {tuple(v.shape)}"
              for k, v in expected.items() if k in state and tuple(getattr(state[k], "shape", ())) != tuple(v.shape)]
    if missing or unexpected or shapes:
        found = [f"{name} {keys}" for name, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                                     ("shape mismatch", shapes)) if keys]
        raise ValueError(f"{path}: checkpoint does not match {type(network).__name__}{f' of {run}' if run else ''} "
                         f"({'; '.join(found)}); it was written with another configuration (columns, sizes or "
                         "profile): use that configuration, or move the file away to start afresh")


def load_weights(network: nn.Module, path: str | Path, run: str = "", trained_by: str = "") -> nn.Module:
    """Load a network state dict (or a latest checkpoint's "network" entry) from `path` into `network`.

    weights_only, mapped to the network's device, shape-checked first (`check_state_dict`); a missing file is an
    error that names `trained_by`, the config that writes it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found" + (f"; train it with {trained_by}" if trained_by else ""))
    device = next(iter(network.parameters()), torch.empty(0)).device
    state = torch.load(path, map_location=device, weights_only=True)
    if isinstance(state, Mapping) and isinstance(state.get("network"), Mapping):
        state = state["network"]
    check_state_dict(state, network, path, run)
    network.load_state_dict(state)
    return network


class LatestCheckpoint:
    """One resumable checkpoint at `path`: the state dicts of `save_dict` plus the trainer state ("trainer").

    Rewritten atomically every `interval` epochs (MONAI's CheckpointSaver names interval checkpoints by epoch, so there
    is no fixed file to resume from, and writes them non-atomically). With `resume`, an existing `path` is loaded when
    the trainer starts, through MONAI's CheckpointLoader (`map_location`, strict shapes, weights_only), after a shape
    check that names the file; training then continues from the saved epoch up to the trainer's `max_epochs`.
    Attach it after the ValidationHandler, so that a checkpoint holds its epoch's best-model record. Under
    torch.distributed every rank loads and rank 0 writes, without the DistributedDataParallel wrapper.
    """

    def __init__(self, path: str | Path, save_dict: dict, resume: bool = True, interval: int = 1,
                 map_location: str | torch.device | None = None, run: str = "") -> None:
        self.path, self.save_dict, self.resume = Path(path), save_dict, resume
        self.interval, self.map_location, self.run = interval, map_location, run

    def attach(self, engine: Engine) -> None:
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self.save)

    def load(self, engine: Engine) -> None:
        if not self.path.is_file():
            logger.info("no checkpoint at %s: training from scratch", self.path)
            return
        state = torch.load(self.path, map_location=self.map_location, weights_only=True)
        for key, obj in self.save_dict.items():
            if isinstance(obj, nn.Module):
                check_state_dict(state.get(key) if isinstance(state, Mapping) else state, unwrap(obj), self.path,
                                 self.run)
        CheckpointLoader(str(self.path), {**self.save_dict, "trainer": engine}, map_location=self.map_location,
                         strict_shape=True)(engine)
        logger.info("resumed from %s at epoch %d of %d", self.path, engine.state.epoch, engine.state.max_epochs)

    def save(self, engine: Engine) -> None:
        if idist.get_rank() != 0:
            return
        state = {k: unwrap(v).state_dict() for k, v in self.save_dict.items()} | {"trainer": engine.state_dict()}
        with atomic_write(self.path) as tmp:
            torch.save(state, tmp)


# --------------------------------------------------------------------------------------------------------- sampling
def sample_phenotypes(network: nn.Module, checkpoint: str | Path, stats_path: str | Path, n: int, seed: int,
                      out_csv: str | Path, columns: Sequence[str] | None = None) -> Path:
    """Sample `n` phenotype vectors (z ~ N(0, I), seeded) from a trained `network` and write them as CSV.

    `checkpoint`: a network state dict (phenotype_vae.pt) or a latest checkpoint (its "network" entry), loaded with
    weights_only and checked against the network's shapes. Values are de-normalised with `stats_path`; the CSV has
    `eid` S000000... then `columns` (default: every column of the statistics, in their order). Returns `out_csv`.
    """
    stats = read_stats(stats_path)
    columns = list(stats["columns"] if columns is None else columns)
    absent = [c for c in columns if c not in stats["columns"]]
    if absent or not columns:
        raise ValueError(f"columns {absent or columns} not in the phenotype statistics {stats_path} (it has "
                         f"{stats['columns']})")
    if n < 1:
        raise ValueError(f"num_samples must be >= 1, got {n}")
    load_weights(network, checkpoint, trained_by="configs/train_phenotype_vae.json")
    z = network.sample(n, torch.Generator().manual_seed(seed))  # (n, F) normalised
    if z.shape[1] != len(stats["columns"]):
        raise ValueError(f"the network gives {z.shape[1]} values, {stats_path} has {len(stats['columns'])} columns")
    values = denormalise(z.double().cpu().numpy(), stats)
    index = [stats["columns"].index(c) for c in columns]
    rows = {f"S{i:06d}": {c: float(row[k]) for c, k in zip(columns, index)} for i, row in enumerate(values)}
    write_phenotype_table(out_csv, columns, rows)
    logger.info("sampled %d phenotype vectors (seed %d) from %s into %s", n, seed, checkpoint, out_csv)
    return Path(out_csv)


# ------------------------------------------------------------------------------------- cine autoencoder (stage 2)
IMAGE = "image"  # dataset key of a (1, T, H, W) float32 cine in [0, 1]


def load_feature_network(path: str | Path, what: str = "perceptual_weights") -> nn.Module:
    """A local TorchScript feature network in eval mode without gradients, on the CPU (`what` names it in errors):
    the perceptual term's (N, 1, H, W) frames -> features, or the evaluation's Inception and I3D.

    Only a local file: MONAI's PerceptualLoss downloads its weights, which cannot happen here.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} file not found (a TorchScript feature network)")
    network = torch.jit.load(str(path), map_location="cpu").eval()
    for parameter in network.parameters():  # a loaded ScriptModule rejects requires_grad_
        parameter.requires_grad_(False)
    return network


@contextmanager
def seeded(device: torch.device | str, seed: int) -> Iterator[None]:
    """The global CPU RNG (and `device`'s CUDA RNG) seeded with `seed` inside the block, restored after it."""
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file ("" for an empty path): tells a rerun whether an input checkpoint was remade."""
    if not str(path):
        return ""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def frames_as_images(output: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluator output {"pred", "label"} (B, C, T, H, W) -> (pred, label) as (B * T, C, H, W) frames (2D metrics)."""
    return tuple(output[k].transpose(1, 2).flatten(0, 1) for k in (CommonKeys.PRED, CommonKeys.LABEL))


class CineReconLoss(nn.Module):
    """L1 + perceptual_weight x per-frame feature L1 (only with a `feature_network`) + kl_weight x KL.

    Returns {"loss", "nll" (L1 + perceptual: the term the adaptive GAN weight balances), "l1", "perceptual", "kl"}.
    """

    def __init__(self, kl_weight: float = 1e-6, feature_network: nn.Module | None = None,
                 perceptual_weight: float = 0.1) -> None:
        super().__init__()
        self.kl_weight, self.feature_network, self.perceptual_weight = kl_weight, feature_network, perceptual_weight

    def forward(self, recon: torch.Tensor, target: torch.Tensor, mean: torch.Tensor,
                logvar: torch.Tensor) -> dict[str, torch.Tensor]:
        """recon, target (B, C, T, H, W); mean, logvar the posterior (B, latent, t, h, w)."""
        l1 = (recon - target).abs().mean()
        perceptual = torch.zeros_like(l1)
        if self.feature_network is not None:
            fake, real = frames_as_images({CommonKeys.PRED: recon, CommonKeys.LABEL: target})
            perceptual = (self.feature_network(fake) - self.feature_network(real)).abs().mean()
        nll = l1 + self.perceptual_weight * perceptual
        kl = gaussian_kl(mean, logvar)
        return {"loss": nll + self.kl_weight * kl, "nll": nll, "l1": l1, "perceptual": perceptual, "kl": kl}


def _autocast(engine: Engine) -> torch.autocast:
    """bf16 autocast where the engine runs with AMP (CUDA only); a no-op context elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=bool(engine.amp))


class AutoencoderGANStep:
    """`iteration_update` of SupervisedTrainer for the cine autoencoder: a generator step, then a discriminator step.

    The generator minimises `engine.loss_function` and, from iteration `gan_start_step` on (1-based; authors 10,001),
    adds the hinge generator loss -D(recon) times the adaptive weight (the ratio of the reconstruction and GAN
    gradient norms at the decoder's last layer, clamped to [0, 1e4]) x `adversarial_weight`. The discriminator
    (its last output is the patch logits) then takes a hinge step on the input vs the detached reconstruction.
    """

    def __init__(self, discriminator: nn.Module, d_optimizer: torch.optim.Optimizer, gan_start_step: int = 10001,
                 adversarial_weight: float = 0.05) -> None:
        self.discriminator, self.d_optimizer = discriminator, d_optimizer
        self.gan_start_step, self.adversarial_weight = gan_start_step, adversarial_weight

    def adaptive_weight(self, nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
        """adversarial_weight x |d nll / d w| / (|d g_loss / d w| + 1e-4), detached."""
        nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        ratio = nll_grad.norm() / (g_grad.norm() + 1e-4)
        return self.adversarial_weight * ratio.clamp(0.0, 1e4).detach()

    def __call__(self, engine: Engine, batch: dict) -> dict[str, float]:
        x = batch[IMAGE].to(engine.state.device, non_blocking=engine.non_blocking)  # (B, 1, T, H, W)
        net, disc = engine.network, self.discriminator
        gan_on = engine.state.iteration >= self.gan_start_step
        net.train()
        disc.train()
        with _autocast(engine):
            recon, mean, logvar = net(x)
            losses = engine.loss_function(recon, x, mean, logvar)
            total = losses["loss"]
            if gan_on:
                losses["g_loss"] = -disc(recon)[-1].float().mean()
                last_layer = [p for p in unwrap(net).decoder.parameters() if p.ndim == 5][-1]
                losses["d_weight"] = self.adaptive_weight(losses["nll"], losses["g_loss"], last_layer)
                total = total + losses["d_weight"] * losses["g_loss"]
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        total.backward()
        engine.optimizer.step()
        if gan_on:
            self.d_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
            halves = []
            for target, sign in ((x, 1.0), (recon.detach(), -1.0)):  # a backward per forward, as DDP requires
                with _autocast(engine):
                    halves.append(0.5 * F.relu(1.0 - sign * disc(target)[-1].float()).mean())
                halves[-1].backward()
            losses["d_loss"] = halves[0].detach() + halves[1].detach()
            self.d_optimizer.step()
        return {k: v.item() for k, v in losses.items()}


def autoencoder_eval_step(engine: Engine, batch: dict) -> dict[str, torch.Tensor]:
    """`iteration_update` of SupervisedEvaluator: {"pred": reconstruction from the posterior mean in [0, 1], "label"}."""
    x = batch[IMAGE].to(engine.state.device, non_blocking=engine.non_blocking)
    with eval_mode(engine.network), _autocast(engine):
        recon = engine.network(x)[0]
    return {CommonKeys.PRED: recon.float().clamp(0.0, 1.0), CommonKeys.LABEL: x}


class ReconstructionMontage:
    """After each evaluation, write a PNG of `frames` of the first `num` cines: input row over reconstruction row."""

    def __init__(self, path: str | Path, num: int = 4, frames: Sequence[int] = (0, 20)) -> None:
        self.path, self.num, self.frames = Path(path), num, tuple(frames)
        self.cines: list[tuple[torch.Tensor, torch.Tensor]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self.cines.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def collect(self, engine: Engine) -> None:
        out = engine.state.output
        need = self.num - len(self.cines)
        self.cines += list(zip(out[CommonKeys.LABEL][:need, 0].cpu(), out[CommonKeys.PRED][:need, 0].cpu()))

    def write(self, engine: Engine) -> None:
        rows = [[cine[pair][t].float().numpy() for cine in self.cines for t in self.frames] for pair in (0, 1)]
        captions = [f"{'in' if row == 0 else 'rec'} {k} t{t}" for row in (0, 1)
                    for k in range(len(self.cines)) for t in self.frames]
        save_montage(rows[0] + rows[1], self.path, ncols=len(rows[0]), captions=captions)


# ---------------------------------------------------------------------------------------------------- MAR (stage 3)
def ema_model(network: nn.Module, decay: float) -> AveragedModel:
    """Exponential moving average of `network`'s parameters and buffers (torch's AveragedModel), decay per step."""
    return AveragedModel(unwrap(network), multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


class MARStep:
    """`iteration_update` of SupervisedTrainer for MAR: a posterior draw of each cached latent, the MAR loss (the
    network's forward), an optimiser step with the gradient norm clipped to `grad_clip` (authors 3.0) and an EMA update.
    """

    def __init__(self, ema: AveragedModel, grad_clip: float = 3.0) -> None:
        self.ema, self.grad_clip = ema, grad_clip

    def __call__(self, engine: Engine, batch: dict) -> dict[str, float]:
        device = engine.state.device
        mean, logvar = batch["mean"].to(device), batch["logvar"].to(device)  # (B, 16, 25, 12, 12) each
        z = CineAutoencoderKL.sample(mean, logvar)
        engine.network.train()
        with _autocast(engine):
            loss = engine.network(z, batch["phenotypes"].to(device))  # phenotypes (B, F) normalised
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(engine.network.parameters(), self.grad_clip)
        engine.optimizer.step()
        self.ema.update_parameters(unwrap(engine.network))
        return {"loss": loss.item(), "grad_norm": grad_norm.item()}


def mar_eval_step(engine: Engine, batch: dict) -> dict[str, torch.Tensor]:
    """`iteration_update` of SupervisedEvaluator: the MAR loss of the posterior means, with masks, timesteps and noise
    drawn from a generator state seeded by the iteration (the same draws at every evaluation)."""
    device = engine.state.device
    with seeded(device, engine.state.iteration), eval_mode(engine.network), _autocast(engine):
        loss = engine.network(batch["mean"].to(device), batch["phenotypes"].to(device))
    return {"loss": loss.float()}
