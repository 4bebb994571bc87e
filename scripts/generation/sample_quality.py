"""Sample quality of MAR during training: seeded samples on the validation conditions, scored against the validation
latent cache, select mar.pt and the CFG scale (<ckpt_dir>/mar_sampling.json, read by generate.json's cfg "auto").
Rule (`rank`): among candidates whose FD is within fd_tolerance x the real floor, the highest latent adherence; the
others after them, by lowest FJD. Checkpoints can also be bounded by membership (a check whose loss-based membership
AUC exceeds its permutation 95th percentile ranks after those within it: a generator that knows its training subjects
better than new ones is not kept while one that does not is at hand), the CFG choice by calibration (high CFG scales
exaggerate the requested spread, which correlation cannot see): within the band, over-calibrated scales rank after the
others."""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import ignite.distributed as idist
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from torch import nn
from torch.optim.swa_utils import AveragedModel

from scripts.generation.membership import mar_losses, membership_inference
from scripts.runtime.checkpoints import load_weights
from scripts.runtime.distributed import unwrap
from scripts.runtime.features import frechet_distance, slopes
from scripts.runtime.files import atomic_write, file_digest, write_json
from scripts.runtime.handlers import autocast
from scripts.runtime.precision import precision_name
from scripts.runtime.progress import track

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

logger = logging.getLogger(__name__)

SAMPLING_FILE = "mar_sampling.json"  # the CFG scale chosen at the end of training, beside mar.pt
CRITERION = "latent adherence within the FD band on validation, else FJD"
DEFAULT_CFG = 3.0


# --------------------------------------------------------------------------------------------------------- features
def pooled_features(latents: torch.Tensor, grid: Sequence[int] = (5, 3, 3)) -> torch.Tensor:
    """(N, C, T, H, W) latents -> (N, C * prod(grid)) channel means over an adaptive grid, float64 on the CPU."""
    return F.adaptive_avg_pool3d(latents.float(), tuple(grid)).flatten(1).double().cpu()


def dataset_arrays(data: Sequence[dict], grid: Sequence[int], count: int | None = None,
                   chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Cache items {"mean" (C, T, H, W), "phenotypes" (P,)} -> pooled posterior means (N, D) and phenotypes (N, P),
    float64; `count`: the first `count` items, cycled where there are fewer."""
    index = list(range(len(data))) if count is None else [i % len(data) for i in range(count)]
    features = [pooled_features(torch.stack([data[i]["mean"] for i in index[s:s + chunk]]), grid)
                for s in range(0, len(index), chunk)]
    return torch.cat(features), torch.stack([torch.as_tensor(data[i]["phenotypes"]) for i in index]).double()


@dataclass(frozen=True)
class Reference:
    """Standardisation, whitened PCA basis and ridge regression of pooled latent features (the training cache)."""

    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,)
    basis: torch.Tensor  # (D, k): principal axes over their standard deviations (unit variance on the training set)
    weights: torch.Tensor  # (D, P): ridge coefficients of standardised features -> phenotypes
    bias: torch.Tensor  # (P,)

    @classmethod
    def fit(cls, features: torch.Tensor, phenotypes: torch.Tensor, components: int = 16,
            alpha: float = 0.1) -> Reference:
        """Fit on (N, D) features and (N, P) phenotypes: top min(components, N - 1) axes; ridge penalty alpha * N."""
        if len(features) < 2:
            raise ValueError(f"the sample-quality reference needs >= 2 training latents, got {len(features)}")
        mean, std = features.mean(0), features.std(0).clamp_min(1e-8)
        x = (features - mean) / std  # (N, D)
        k = min(components, len(x) - 1, x.shape[1])
        _, s, vh = torch.linalg.svd(x, full_matrices=False)  # vh (min(N, D), D)
        basis = vh[:k].T / (s[:k] / math.sqrt(len(x) - 1)).clamp_min(1e-8)  # (D, k)
        gram = x.T @ x + alpha * len(x) * torch.eye(x.shape[1], dtype=x.dtype)  # (D, D)
        weights = torch.linalg.solve(gram, x.T @ (phenotypes - phenotypes.mean(0)))  # (D, P)
        return cls(mean, std, basis, weights, phenotypes.mean(0))

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) pooled features -> (N, k) whitened principal components."""
        return (features - self.mean) / self.std @ self.basis

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) pooled features -> (N, P) ridge prediction of the normalised phenotypes."""
        return (features - self.mean) / self.std @ self.weights + self.bias


def mean_pearson(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over columns of Pearson r between (N, P) predictions and targets (constant columns left out; NaN if all)."""
    p, t = pred - pred.mean(0), target - target.mean(0)
    denom = p.norm(dim=0) * t.norm(dim=0)  # (P,)
    ok = denom > 1e-12
    return float(((p * t).sum(0)[ok] / denom[ok]).mean()) if ok.any() else math.nan


def calibration(reference: Reference, real: torch.Tensor, generated: torch.Tensor, phenotypes: torch.Tensor) -> float:
    """Median over phenotypes of the ridge prediction's slope on the request, generated over real (1: the requested
    spread; above 1: exaggerated, as high CFG scales do); columns the real latents barely predict are left out."""
    real_slope, gen_slope = slopes(reference.predict(real), phenotypes), slopes(reference.predict(generated), phenotypes)
    ok = real_slope.abs() > 0.05  # NaN compares False
    return float((gen_slope[ok] / real_slope[ok]).median()) if ok.any() else math.nan


def quality(reference: Reference, real: torch.Tensor, generated: torch.Tensor,
            phenotypes: torch.Tensor) -> dict[str, float]:
    """FJD of [components, phenotypes] and FD of components between real and generated (N, D) pooled features
    paired with the same (N, P) phenotypes; adherence: mean Pearson r of the ridge prediction from `generated`;
    calibration: `calibration` (logged, not ranked)."""
    if not torch.isfinite(generated).all():
        return {"fjd": math.inf, "fd": math.inf, "adherence": math.nan, "calibration": math.nan}
    zr, zg = reference.project(real), reference.project(generated)  # (N, k) each
    return {"fjd": frechet_distance(torch.cat([zr, phenotypes], 1), torch.cat([zg, phenotypes], 1)),
            "fd": frechet_distance(zr, zg), "adherence": mean_pearson(reference.predict(generated), phenotypes),
            "calibration": calibration(reference, real, generated, phenotypes)}


# ---------------------------------------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample_latents(network: nn.Module, phenotypes: torch.Tensor, batch_size: int = 64, **sampling) -> torch.Tensor:
    """Latents (N, C, T, H, W) float32 on the CPU from MAR conditioned on (N, P) normalised phenotypes, sample i with
    seed i (the same noise at every call); `sampling`: keywords of MAR.sample_latents."""
    device, out = next(network.parameters()).device, []
    for start in track(range(0, len(phenotypes), batch_size), "sample quality: sampling"):
        cond = phenotypes[start:start + batch_size].float().to(device)  # (b, P); eval mode inside sample_latents
        out.append(network.sample_latents(cond, seeds=range(start, start + len(cond)), **sampling).float().cpu())
    return torch.cat(out)


def sampling_cfg(cfg: float | str, ckpt_dir: str | Path, checkpoint: str = "mar.pt") -> float:
    """generate.json's cfg: a number forces it; "auto" reads <ckpt_dir>/mar_sampling.json, whose choice must belong
    to the current <ckpt_dir>/<checkpoint>; else 3.0 with a warning."""
    if not isinstance(cfg, str) or cfg.strip() != "auto":
        return float(cfg)
    path, ckpt = Path(ckpt_dir) / SAMPLING_FILE, Path(ckpt_dir) / checkpoint
    record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if "cfg" not in record:
        logger.warning("cfg 'auto': no %s (train_mar.json writes it), using cfg %.1f", path, DEFAULT_CFG)
        return DEFAULT_CFG
    if ckpt.is_file() and record.get("checkpoint_sha256") not in (None, file_digest(ckpt)):
        logger.warning("cfg 'auto': %s was chosen for another %s, using cfg %.1f", path, ckpt, DEFAULT_CFG)
        return DEFAULT_CFG
    logger.info("cfg 'auto': %.2f from %s (%s)", record["cfg"], path, record.get("criterion", CRITERION))
    return float(record["cfg"])


def rank(scores: dict[str, float], fd_limit: float, calibration_max: float | None = None,
         membership_bound: bool = False) -> tuple[int, float]:
    """Sort key of a candidate (higher is better): (2, adherence) when its FD is within fd_limit and it keeps the
    bounds asked for; within fd_limit but over one, (1, -calibration) when its calibration exceeds `calibration_max`,
    or with `membership_bound` (1, -membership AUC) when its membership AUC exceeds its permutation 95th percentile
    (`membership_null_95`); else (0, -FJD). An unmeasured score (NaN or absent) bounds nothing."""
    if not (math.isfinite(scores["fd"]) and scores["fd"] <= fd_limit and math.isfinite(scores["adherence"])):
        return 0, -scores["fjd"] if math.isfinite(scores["fjd"]) else -math.inf
    calibration = scores.get("calibration", math.nan)
    if calibration_max is not None and math.isfinite(calibration) and calibration > calibration_max:
        return 1, -calibration
    auc, chance = scores.get("membership_auc", math.nan), scores.get("membership_null_95", math.nan)
    if membership_bound and math.isfinite(auc) and math.isfinite(chance) and auc > chance:
        return 1, -auc
    return 2, scores["adherence"]


def _json_number(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no inf or NaN


def _json_scores(record: dict | None) -> dict | None:
    return None if record is None else {k: _json_number(v) if isinstance(v, float) else v for k, v in record.items()}


# ----------------------------------------------------------------------------------------------------------- handler
@dataclass(frozen=True)
class ValidationSet:
    """The fitted reference and the real side of the comparison: validation posterior means and their phenotypes."""

    reference: Reference
    real: torch.Tensor  # (N, D) pooled validation posterior means
    phenotypes: torch.Tensor  # (N, P) their normalised phenotypes: the conditions of the samples
    adherence_real: float  # mean Pearson r of the ridge prediction from the real validation latents
    fd_floor: float  # mean FD of as many real training latents (other subjects) against `real`
    members: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # (posterior means, phenotypes) of n training, n validation


class SampleQuality:
    """Ignite handler of the MAR trainer: every `interval` epochs and at the last, FJD, FD and latent adherence of
    `num_samples` seeded EMA samples on the validation conditions (rank 0), and the loss-based membership AUC of up to
    `membership_subjects` training vs as many validation subjects (a bound of the choice with `membership_bound`);
    saves <ckpt_dir>/<filename> when they rank
    above the saved ones (`rank`, FD limit fd_tolerance x the real floor) and, when training completes, writes the
    best-ranked CFG scale to <ckpt_dir>/mar_sampling.json; with `summary_writer` also its scores as TensorBoard scalars
    (sample_quality/fjd, fd, fd_limit, adherence, calibration, membership_auc, membership_null_95, at the
    trainer's epoch)."""

    def __init__(self, ema: AveragedModel, train_data: Sequence[dict], val_data: Sequence[dict],
                 ckpt_dir: str | Path, output_dir: str | Path, interval: int = 10, num_samples: int = 50,
                 num_iter: int = 8, num_inference_steps: int = 25, cfg: float = 3.0, temperature: float = 1.0,
                 cfg_schedule: str = "linear", cfg_candidates: Sequence[float] = (1.0, 1.5, 2.0, 3.0, 4.0),
                 batch_size: int = 64, grid: Sequence[int] = (5, 3, 3), components: int = 16,
                 ridge_alpha: float = 0.1, fd_tolerance: float = 1.5, cfg_calibration_max: float | None = None,
                 membership_bound: bool = False, membership_subjects: int = 100, filename: str = "mar.pt",
                 summary_writer: SummaryWriter | None = None) -> None:
        self.ema, self.train_data, self.val_data, self.writer = ema, train_data, val_data, summary_writer
        self.ckpt, self.record_path = Path(ckpt_dir) / filename, Path(output_dir) / "sample_quality.json"
        self.interval, self.num_samples, self.batch_size = max(1, interval), num_samples, batch_size
        self.sampling = {"num_iter": num_iter, "num_inference_steps": num_inference_steps,
                         "temperature": temperature, "cfg_schedule": cfg_schedule}
        self.cfg, self.cfg_candidates = float(cfg), [float(c) for c in cfg_candidates]
        self.fit_args = {"grid": list(grid), "components": components, "alpha": ridge_alpha}
        self.fd_tolerance = float(fd_tolerance)
        self.cfg_calibration_max = None if cfg_calibration_max is None else float(cfg_calibration_max)
        self.membership_bound, self.membership_subjects = bool(membership_bound), int(membership_subjects)
        self.history, self.best, self.best_epoch = [], None, 0  # evaluations; scores of mar.pt and its epoch
        self.validation: ValidationSet | None = None  # fitted at the first evaluation

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.evaluate)
        engine.add_event_handler(Events.COMPLETED, self.choose_cfg)

    def state_dict(self) -> dict:
        return {"history": copy.deepcopy(self.history), "best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict) -> None:
        if "history" not in state:  # a checkpoint from before FJD selection: its best_saver held the val-loss record
            logger.warning("no sample-quality record in the checkpoint: sample-quality selection starts afresh")
            return
        self.history, self.best_epoch = list(state["history"]), state["best_epoch"]
        best = state["best"]  # 0.5.0 checkpoints hold the best FJD only: take its full scores from the history
        self.best = best if isinstance(best, dict) or best is None else next(
            ({k: r[k] for k in ("fjd", "fd", "adherence")} for r in self.history if r["epoch"] == self.best_epoch),
            None)

    def settings(self, amp: bool) -> dict:
        """How the samples are drawn (recorded beside every result)."""
        return {"num_samples": self.num_samples, "seeds": f"0..{self.num_samples - 1}", **self.sampling,
                "precision": precision_name(amp), **self.fit_args, "fd_tolerance": self.fd_tolerance,
                "membership_bound": self.membership_bound, "membership_subjects": self.membership_subjects}

    def fit(self) -> ValidationSet:
        """Reference from the training cache, real features of the first `num_samples` validation items and the
        membership sets (`members`), once."""
        if self.validation is None:
            grid, components, alpha = self.fit_args.values()
            reference = Reference.fit(*dataset_arrays(self.train_data, grid), components, alpha)
            real, phenotypes = dataset_arrays(self.val_data, grid, self.num_samples)
            n = min(self.membership_subjects, len(self.train_data), len(self.val_data))
            members = tuple((torch.stack([d[i]["mean"] for i in range(n)]).float(),
                             torch.stack([torch.as_tensor(d[i]["phenotypes"]) for i in range(n)]).float())
                            for d in (self.train_data, self.val_data))
            self.validation = ValidationSet(reference, real, phenotypes,
                                            mean_pearson(reference.predict(real), phenotypes),
                                            self.real_floor(reference, real), members)
        return self.validation

    def real_floor(self, reference: Reference, real: torch.Tensor, chunks: int = 8) -> float:
        """Mean FD of up to `chunks` disjoint sets of num_samples training latents against `real` (one FD of 32
        samples varies by about 20%: the mean steadies the band)."""
        n = max(1, min(chunks, len(self.train_data) // self.num_samples))
        features = dataset_arrays(self.train_data, self.fit_args["grid"], n * self.num_samples)[0]
        target = reference.project(real)
        return sum(frechet_distance(reference.project(f), target) for f in features.split(self.num_samples)) / n

    def fd_limit(self) -> float:
        """Largest FD of a candidate ranked on adherence: fd_tolerance x the real training-vs-validation FD."""
        return self.fd_tolerance * self.fit().fd_floor

    def measure(self, engine: Engine, network: nn.Module, cfg: float) -> dict[str, float]:
        """FJD, FD and adherence of `network`'s seeded samples at `cfg` (autocast as the trainer runs)."""
        val = self.fit()
        with autocast(engine):
            latents = sample_latents(network, val.phenotypes, self.batch_size, cfg=cfg, **self.sampling)
        return quality(val.reference, val.real, pooled_features(latents, self.fit_args["grid"]), val.phenotypes)

    def membership(self, network: nn.Module, draws: int = 2, permutations: int = 200) -> dict[str, float]:
        """Membership AUC of `network`'s losses on the first n training vs the first n validation subjects (n =
        membership_subjects or fewer; the same seeded draws for all) and its permutation 95th percentile."""
        losses = [mar_losses(network, means, phenotypes, draws, 0) for means, phenotypes in self.fit().members]
        mia = membership_inference(*losses, permutations=permutations)
        return {"membership_auc": mia.get("auc", math.nan), "membership_null_95": mia.get("null_auc_95", math.nan)}

    def evaluate(self, engine: Engine) -> None:
        """Every `interval` epochs and at the last (rank 0): measure, save the EMA network on improvement, record."""
        epoch = engine.state.epoch
        if idist.get_rank() != 0 or (epoch % self.interval and epoch != engine.state.max_epochs):
            return
        network, val, limit = unwrap(self.ema.module), self.fit(), self.fd_limit()
        scores = {**self.measure(engine, network, self.cfg), **self.membership(network)}
        bound = self.membership_bound
        improved = self.best is None or rank(scores, limit, membership_bound=bound) > rank(self.best, limit,
                                                                                             membership_bound=bound)
        if improved:
            with atomic_write(self.ckpt) as tmp:
                torch.save(network.state_dict(), tmp)  # a plain MAR state dict, as load_weights reads it
            self.best, self.best_epoch = scores, epoch
        self.history.append({"epoch": epoch, **scores, "saved": improved})
        if self.writer is not None:
            for name, value in {**scores, "fd_limit": limit}.items():
                self.writer.add_scalar(f"sample_quality/{name}", value, epoch)
        logger.info("sample quality epoch %d: FJD %.4g, FD %.4g (limit %.4g), latent adherence r %.3f (real "
                    "validation %.3f), calibration %.2f, membership AUC %.3f (chance up to %.3f)%s", epoch, scores["fjd"],
                    scores["fd"], limit, scores["adherence"], val.adherence_real, scores.get("calibration", math.nan),
                    scores["membership_auc"],
                    scores["membership_null_95"],
                    f"; saved {self.ckpt}" if improved else f"; kept epoch {self.best_epoch}")
        write_json(self.record_path, {
            "criterion": self.checkpoint_criterion(), "settings": {"cfg": self.cfg, **self.settings(engine.amp)},
            "adherence_real": _json_number(val.adherence_real), "fd_floor": _json_number(val.fd_floor),
            "fd_limit": _json_number(limit), "best_epoch": self.best_epoch, "best": _json_scores(self.best),
            "history": [_json_scores(r) for r in self.history]})

    def checkpoint_criterion(self) -> str:
        """The checkpoint rule, in words (CRITERION with the membership bound)."""
        if not self.membership_bound:
            return CRITERION
        return ("latent adherence within the FD band and membership AUC within its permutation 95th percentile on "
                "validation, else the least membership AUC within the band, else FJD")

    def cfg_criterion(self) -> str:
        """The CFG choice's rule, in words (CRITERION with the calibration bound)."""
        if self.cfg_calibration_max is None:
            return CRITERION
        return (f"latent adherence within the FD band and calibration <= {self.cfg_calibration_max:g} on validation, "
                "else the least calibration within the band, else FJD")

    def choose_cfg(self, engine: Engine) -> None:
        """At the end of training (rank 0): the best EMA weights scored at each candidate cfg; the best-ranked one
        (`rank`) -> mar_sampling.json."""
        if idist.get_rank() != 0 or not self.cfg_candidates:
            return
        if not self.ckpt.is_file():
            logger.warning("no %s: no CFG scale chosen (generate.json's cfg 'auto' will use 3.0)", self.ckpt)
            return
        path, digest = self.ckpt.parent / SAMPLING_FILE, file_digest(self.ckpt)
        settings = {**self.settings(engine.amp), "cfg_candidates": self.cfg_candidates,
                    "cfg_calibration_max": self.cfg_calibration_max}
        old = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        if old.get("checkpoint_sha256") == digest and old.get("settings") == settings:
            logger.info("%s already holds the CFG choice for %s: cfg %s", path, self.ckpt, old["cfg"])
            return
        network = load_weights(copy.deepcopy(unwrap(self.ema.module)), self.ckpt)
        scores = {c: self.measure(engine, network, c) for c in self.cfg_candidates}
        finite = [c for c in self.cfg_candidates if math.isfinite(scores[c]["fjd"])]
        if not finite:
            logger.warning("no finite FJD at any cfg in %s: no CFG scale chosen", self.cfg_candidates)
            return
        limit = self.fd_limit()
        best = max(finite, key=lambda c: rank(scores[c], limit, self.cfg_calibration_max))  # ties: the first listed
        by = {f"{key}_by_cfg": {str(c): _json_number(scores[c][key]) for c in self.cfg_candidates}
              for key in ("fjd", "fd", "adherence", "calibration")}
        write_json(path, {"cfg": best, "criterion": self.cfg_criterion(), **by, "fd_limit": _json_number(limit),
                          "settings": settings,
                          "best_epoch": self.best_epoch, "checkpoint": str(self.ckpt), "checkpoint_sha256": digest})
        logger.info("CFG scale %s chosen (%s): adherence by cfg %s, FD by cfg %s (limit %.4g), calibration by cfg %s;"
                    " written to %s", best, self.cfg_criterion(), by["adherence_by_cfg"], by["fd_by_cfg"], limit,
                    by["calibration_by_cfg"], path)
