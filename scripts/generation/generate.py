"""Phenotype-conditioned cine generation (`configs/generate.json`): conditions -> MAR latents -> decoded cines.

Sample i is named G{i:06d} and depends only on its condition vector and its seed `sample_seed(seed, i)`, never on the
batch it was generated in, the batch size or the rank: any sample can be regenerated alone. Outputs in `output_dir`:
images/G000000.npy (float16, 1 x 50 x 96 x 96 in [0, 1], the prepared-cine layout), nifti/G000000.nii.gz, manifest.csv,
datalist.json (decathlon form, like a prepared folder's), phenotype_stats.json (a copy, so the folder reads as a
prepared one), conditions.csv (phenotype-VAE draws only), generation.json, montage.png and montage.gif.

Decoded cines are clamped to [0, 1], the range of prepared cines (intensities percentile-normalised per subject,
scripts/data.py), so that downstream configs mix them with real data through the same loader.
"""

from __future__ import annotations

import csv
import fcntl
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch import nn

from scripts.data.cohort import read_stats
from scripts.data.phenotypes import normalise, read_phenotype_table
from scripts.data.prepare import IMAGE_SIZE, NUM_FRAMES
from scripts.generation.phenotype_vae import sample_phenotypes
from scripts.runtime.checkpoints import load_weights
from scripts.runtime.files import atomic_write, save_npy, write_json
from scripts.runtime.montage import save_cine_gif, save_montage

logger = logging.getLogger(__name__)


logger = logging.getLogger(__name__)

SEED_STRIDE = 1_000_003  # prime > any sample count in use: seeds of different base seeds do not collide
FAR_OUT_Z = 5.0
TRAINED_BY = {"phenotype_vae.pt": "configs/train_phenotype_vae.json", "autoencoder.pt": "configs/train_autoencoder.json",
              "mar.pt": "configs/train_mar.json"}
MONTAGE_FRAMES = (0, 20)  # end-diastole and about end-systole


def sample_seed(seed: int, index: int) -> int:
    """Seed of sample `index`: seed * 1_000_003 + index (passed to MAR.sample_latents)."""
    return seed * SEED_STRIDE + index


def sample_name(index: int) -> str:
    return f"G{index:06d}"


def rank_world() -> tuple[int, int]:
    """(rank, world size) of torch.distributed if initialised, else env RANK / WORLD_SIZE (torchrun), else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def require_checkpoint(path: str | Path) -> Path:
    """`path` if it is a file, else FileNotFoundError naming the config that trains it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found; train it with "
                                f"{TRAINED_BY.get(path.name, 'its training config')}")
    return path


# --------------------------------------------------------------------------------------------------------- conditions
def read_conditions(path: str | Path, stats: dict, num_samples: int) -> tuple[list[str], np.ndarray]:
    """(eids, (N, F) physical values) of the first `num_samples` rows of a phenotype CSV holding every stats column.

    Missing columns, empty/NaN or non-numeric cells raise ValueError (PhenotypeTableError) naming file, row, eid and
    column. Rows more than FAR_OUT_Z training standard deviations from the training mean in any column are generated
    but logged: the model extrapolates there and adherence to the condition is not expected.
    """
    _, table = read_phenotype_table(path, stats["columns"])
    eids = list(table)[:num_samples]
    values = np.array([[table[e][c] for c in stats["columns"]] for e in eids], dtype=np.float64)  # (N, F)
    z = np.abs(normalise(values, stats))
    far = {e: [c for c, v in zip(stats["columns"], row) if v > FAR_OUT_Z] for e, row in zip(eids, z)}
    far = {e: cols for e, cols in far.items() if cols}
    if far:
        logger.warning("%s: %d row(s) lie beyond |z| > %g of the training range (the model extrapolates; adherence is "
                       "not expected): %s", path, len(far), FAR_OUT_Z, far)
    return eids, values


def choose_conditions(stats_path: str, output_dir: Path, num_samples: int, seed: int, unconditional: bool,
                      conditions_csv: str | None, phenotype_vae: nn.Module, vae_checkpoint: Path) -> np.ndarray | None:
    """(N, F) physical condition values, or None for `unconditional`; with `conditions_csv`, N = min(rows,
    num_samples), else num_samples draws of the phenotype VAE (seeded by `seed`, written to conditions.csv)."""
    if unconditional:
        return None
    if not conditions_csv:
        conditions_csv = sample_phenotypes(phenotype_vae, vae_checkpoint, stats_path, num_samples, seed,
                                           output_dir / "conditions.csv")
    return read_conditions(conditions_csv, read_stats(stats_path), num_samples)[1]


# ------------------------------------------------------------------------------------------------------------- output
GEOMETRY_RIDGE = 0.1  # ridge penalty on standardised features; the fit below is near-exact for the frame interval
GEOMETRY_MIN_ITEMS = 3  # training items per regression feature (about 2 per column) to fit; fewer: the medians


@dataclass(frozen=True)
class GeometryModel:
    """Pixel size (x, y) in mm and frame interval in s of a generated cine, from its conditioning phenotypes.

    Prepared cines are heart crops resized to 96 x 96 (scripts/data.py), so their pixel size is the crop side / 96 and
    grows with the heart; the frame interval is R-R / 50, i.e. 60 / (50 HR). A ridge regression of their logarithms on
    the z-scored phenotypes and on the standardised logarithms of the positive columns, fitted on the prepared training
    split, predicts both for a condition vector; predictions are clipped to the training range. Unconditional samples,
    and cohorts with too few training items, get the training medians.
    """

    median: np.ndarray  # (3,) log pixel x, log pixel y, log interval
    low: np.ndarray  # (3,) training minimum of the same
    high: np.ndarray  # (3,)
    weights: np.ndarray | None = None  # (1 + F + P, 3), None: medians only
    stats: dict | None = None  # phenotype_stats.json
    log_index: tuple[int, ...] = ()  # columns with positive training values (P of them)
    log_mean: np.ndarray | None = None  # (P,)
    log_std: np.ndarray | None = None  # (P,)
    r2: tuple[float, ...] = ()  # in-sample R^2 per target

    def predict(self, values: np.ndarray | None, n: int) -> np.ndarray:
        """(N, 3) [pixel x mm, pixel y mm, frame interval s] for N condition rows (None: n unconditional samples)."""
        if values is None or self.weights is None:
            return np.tile(np.exp(self.median), (n, 1))
        x = _geometry_features(np.asarray(values, np.float64), self.stats, self.log_index, self.log_mean, self.log_std)
        return np.exp(np.clip(x @ self.weights, self.low, self.high))

    def record(self) -> dict:
        """What generation.json records about the model."""
        return {"method": "training medians" if self.weights is None else "ridge regression on the phenotypes",
                "r2_training": dict(zip(("pixel_x", "pixel_y", "frame_interval"), self.r2)),
                "median_mm_s": np.exp(self.median).tolist()}


def _geometry_features(values: np.ndarray, stats: dict, log_index: tuple[int, ...], log_mean: np.ndarray,
                       log_std: np.ndarray) -> np.ndarray:
    """(N, F) physical values -> (N, 1 + F + P) [1, z-scores, standardised logs of the `log_index` columns]."""
    logs = np.log(np.clip(values[:, list(log_index)], 1e-12, None))
    return np.hstack([np.ones((len(values), 1)), normalise(values, stats), (logs - log_mean) / log_std])


def fit_geometry(datalist_path: str | Path, stats: dict) -> GeometryModel:
    """Fit the GeometryModel on the training items of a prepared datalist (spacing_mm, frame_interval_s, phenotypes)."""
    items = json.loads(Path(datalist_path).read_text(encoding="utf-8")).get("training", [])
    items = [d for d in items if d.get("spacing_mm") and d.get("frame_interval_s")]
    if not items:
        raise ValueError(f"{datalist_path}: no training item with spacing_mm and frame_interval_s (written by "
                         "configs/prepare.json); cannot set the NIfTI pixel size")
    targets = np.log([[*d["spacing_mm"][:2], d["frame_interval_s"]] for d in items])  # (N, 3)
    base = {"median": np.median(targets, 0), "low": targets.min(0), "high": targets.max(0)}
    columns = stats["columns"]
    keep = np.array([bool(d.get("has_phenotypes")) and all(isinstance(d.get(c), (int, float)) and np.isfinite(d[c])
                                                             for c in columns) for d in items])
    if keep.sum() < GEOMETRY_MIN_ITEMS * 2 * len(columns):
        return GeometryModel(**base)
    values = np.array([[d[c] for c in columns] for d, k in zip(items, keep) if k], np.float64)  # (N, F)
    y = targets[keep]
    log_index = tuple(int(k) for k in np.flatnonzero((values > 0).all(0)))
    logs = np.log(values[:, list(log_index)])
    log_mean, log_std = logs.mean(0), np.where(logs.std(0) > 0, logs.std(0), 1.0)
    x = _geometry_features(values, stats, log_index, log_mean, log_std)
    penalty = GEOMETRY_RIDGE * np.eye(x.shape[1])
    penalty[0, 0] = 0.0  # the intercept is not shrunk
    weights = np.linalg.solve(x.T @ x + penalty, x.T @ y)
    r2 = 1.0 - ((x @ weights - y) ** 2).sum(0) / np.maximum(((y - y.mean(0)) ** 2).sum(0), 1e-30)
    return GeometryModel(**base, weights=weights, stats=stats, log_index=log_index, log_mean=log_mean,
                         log_std=log_std, r2=tuple(float(v) for v in r2))


def save_nifti(path: Path, cine: np.ndarray, spacing: tuple[float, float], interval: float) -> None:
    """(1, T, H, W) cine -> 4D NIfTI (X=H, Y=W, 1, T), as the prepared arrays map to NIfTI (scripts/data.py);
    affine diag(px, py, px, 1): the prepared folder records no slice thickness."""
    data = np.asarray(cine[0], np.float32).transpose(1, 2, 0)[:, :, None, :]  # (X, Y, 1, T)
    img = nib.Nifti1Image(data, np.diag([spacing[0], spacing[1], spacing[0], 1.0]))
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_zooms((spacing[0], spacing[1], spacing[0], interval))
    with atomic_write(path) as tmp:
        nib.save(img, tmp)


def paths(output_dir: Path, index: int) -> tuple[Path, Path]:
    name = sample_name(index)
    return output_dir / "images" / f"{name}.npy", output_dir / "nifti" / f"{name}.nii.gz"


def is_done(output_dir: Path, index: int) -> bool:
    """Both files of a sample exist (they are written atomically, so never half-written)."""
    return all(p.is_file() for p in paths(output_dir, index))


def write_index(output_dir: Path, n: int, seed: int, columns: list[str], values: np.ndarray | None,
                geometry: np.ndarray, montage_samples: int) -> int:
    """Rewrite manifest.csv, datalist.json and the montages over the samples 0..n-1 on disk; returns how many.

    Runs under an exclusive lock on <output_dir>/.index.lock: every rank calls it after writing all its samples, so
    the last rank to take the lock sees every sample and leaves a complete index.
    """
    with (output_dir / ".index.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = [i for i in range(n) if is_done(output_dir, i)]
        rows, items = [], []
        for i in done:
            npy, nii = (p.relative_to(output_dir).as_posix() for p in paths(output_dir, i))
            cond = dict(zip(columns, values[i].tolist())) if values is not None else dict.fromkeys(columns)
            rows.append([npy, nii, sample_seed(seed, i), *("" if v is None else repr(v) for v in cond.values())])
            items.append({"image": npy, "subject": sample_name(i), "synthetic": True, "has_phenotypes": values is not
                          None, **cond, "spacing_mm": geometry[i, :2].tolist(),
                          "frame_interval_s": float(geometry[i, 2])})
        with atomic_write(output_dir / "manifest.csv") as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([["file", "nifti", "seed", *columns], *rows])
        write_json(output_dir / "datalist.json", {"training": items, "phenotype_columns": columns,
                                                  "shape": [1, NUM_FRAMES, IMAGE_SIZE, IMAGE_SIZE]})
        write_montages(output_dir, done[:montage_samples], columns, values)
    return len(done)


def _caption(index: int, columns: list[str], values: np.ndarray | None) -> str:
    """e.g. 'G000003 EDV 152 EF 58' from the LVEDV / LVEF columns, where present."""
    short = {"LVEDV": "EDV", "LVEF": "EF"}
    found = [(short[c.split(" (")[0]], values[index][k]) for k, c in enumerate(columns)
             if values is not None and c.split(" (")[0] in short]
    return " ".join([sample_name(index), *(f"{s} {v:.0f}" for s, v in found)])


def write_montages(output_dir: Path, indices: list[int], columns: list[str], values: np.ndarray | None) -> None:
    """montage.png (frames MONTAGE_FRAMES side by side, 4 samples a row) and montage.gif (a 4-column cine grid)."""
    if not indices:
        return
    cines = [np.load(paths(output_dir, i)[0])[0].astype(np.float32) for i in indices]  # (T, H, W) each
    tiles = [c[t] for c in cines for t in MONTAGE_FRAMES]
    captions = [_caption(i, columns, values) if k == 0 else f"t{t}" for i in indices
                for k, t in enumerate(MONTAGE_FRAMES)]
    per_row = min(len(indices), 4)
    save_montage(tiles, output_dir / "montage.png", ncols=per_row * len(MONTAGE_FRAMES), captions=captions)
    save_cine_gif(cines, output_dir / "montage.gif", ncols=per_row)


# ------------------------------------------------------------------------------------------------------------ running
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_settings(output_dir: Path, settings: dict) -> None:
    """ValueError if generation.json records other `settings` (samples already there would not match new ones)."""
    path = output_dir / "generation.json"
    old = json.loads(path.read_text(encoding="utf-8")).get("settings", {}) if path.is_file() else settings
    diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
    if diff:
        raise ValueError(f"{output_dir} holds samples generated with other settings {diff} (old, new); use "
                         "another output_dir or remove it")


def generate(phenotype_vae: nn.Module, autoencoder: nn.Module, mar: nn.Module, ckpt_dir: str, output_dir: str,
             stats_path: str, datalist_path: str, profile: str, num_samples: int = 64, seed: int = 0,
             batch_size: int = 8, conditions_csv: str | None = None, unconditional: bool = False, cfg: float = 3.0,
             cfg_schedule: str = "linear", temperature: float = 1.0, num_iter: int = 16,
             num_inference_steps: int = 100, montage_samples: int = 8) -> dict:
    """Generate this rank's missing samples of 0..N-1 (i % world == rank), then rebuild the index; returns the
    generation.json record. Conditions: none if `unconditional`, else `conditions_csv`, else phenotype-VAE draws."""
    start, (rank, world) = time.perf_counter(), rank_world()
    output_dir, ckpt = Path(output_dir), Path(ckpt_dir)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    stats = read_stats(stats_path)
    columns = stats["columns"]
    vae_ckpt, ae_ckpt, mar_ckpt = (ckpt / name for name in TRAINED_BY)
    used = [ae_ckpt, mar_ckpt] + ([] if unconditional or conditions_csv else [vae_ckpt])
    for path in used:
        require_checkpoint(path)
    geometry_model = fit_geometry(datalist_path, stats)
    source = "unconditional" if unconditional else str(conditions_csv) if conditions_csv else "phenotype_vae"
    settings = {"profile": profile, "seed": seed, "seed_formula": f"seed * {SEED_STRIDE} + index", "cfg": cfg,
                "cfg_schedule": cfg_schedule, "temperature": temperature, "num_iter": num_iter,
                "num_inference_steps": num_inference_steps, "conditions": source}
    check_settings(output_dir, settings)
    values = choose_conditions(stats_path, output_dir, num_samples, seed, unconditional, conditions_csv, phenotype_vae,
                               vae_ckpt)  # (N, F) physical, or None
    write_json(output_dir / "generation.json", {"settings": settings})  # before any sample: guards a resumed run
    write_json(output_dir / "phenotype_stats.json", stats)
    n = len(values) if values is not None else num_samples
    geometry = geometry_model.predict(values, n)  # (n, 3) pixel x, y (mm), frame interval (s)
    run = f"profile {profile!r}"
    load_weights(autoencoder, ae_ckpt, f"autoencoder {run}").eval()
    load_weights(mar, mar_ckpt, f"MAR {run}").eval()
    device = next(mar.parameters()).device
    todo = [i for i in range(rank, n, world) if not is_done(output_dir, i)]
    logger.info("rank %d/%d: %d of its %d samples to generate (%s) into %s", rank, world, len(todo),
                len(range(rank, n, world)), source, output_dir)
    t_sample = t_decode = 0.0
    for b in range(0, len(todo), batch_size):
        batch = todo[b:b + batch_size]
        cond = None if values is None else torch.as_tensor(normalise(values[batch], stats), dtype=torch.float32,
                                                           device=device)  # (B, F)
        t0 = time.perf_counter()
        latents = mar.sample_latents(cond, seeds=[sample_seed(seed, i) for i in batch], num_iter=num_iter, cfg=cfg,
                                     cfg_schedule=cfg_schedule, temperature=temperature,
                                     num_inference_steps=num_inference_steps)  # (B, 16, 25, 12, 12)
        sync(device)
        t1 = time.perf_counter()
        with torch.no_grad():
            cines = autoencoder.decode(latents).clamp(0.0, 1.0).cpu().numpy().astype(np.float16)  # (B, 1, 50, 96, 96)
        t_sample, t_decode = t_sample + t1 - t0, t_decode + time.perf_counter() - t1
        for i, cine in zip(batch, cines):
            npy, nii = paths(output_dir, i)
            save_npy(npy, cine)
            save_nifti(nii, cine, tuple(geometry[i, :2]), float(geometry[i, 2]))
        done = b + len(batch)
        logger.info("rank %d: %d/%d generated, %.2f s/clip sampling, %.2f s/clip decoding", rank, done, len(todo),
                    t_sample / done, t_decode / done)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed:
        torch.distributed.barrier()
    if rank == 0 or not distributed:
        listed = write_index(output_dir, n, seed, columns, values, geometry, montage_samples)
        log = logger.info if listed == n else logger.warning
        log("index lists %d of %d samples%s", listed, n, "" if listed == n else " (other ranks still running?)")
    made = max(len(todo), 1)
    record = {"settings": settings, "num_samples": n, "rank": rank, "world_size": world, "device": str(device),
              "checkpoints": [str(p) for p in used], "geometry": geometry_model.record(), "generated_this_run": len(todo),
              "time_s": time.perf_counter() - start, "sampling_s_per_clip": t_sample / made,
              "decoding_s_per_clip": t_decode / made}
    write_json(output_dir / "generation.json", record)
    return record
