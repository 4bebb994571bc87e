"""Acquisition of generated cines, fitted on the prepared training split: pixel size and frame interval predicted from
the conditioning phenotypes (written to the NIfTI headers and datalist spacing_mm, frame_interval_s) and the scanner's
thermal noise level, which the autoencoder's decoder smooths away (measured on each training cine, drawn per sample)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from monai.transforms import RandRicianNoise
from scipy.ndimage import binary_dilation

from scripts.data.cohort import has_phenotypes, load_cines, split_items
from scripts.data.phenotypes import normalise
from scripts.runtime.progress import track

RIDGE = 0.1  # ridge penalty on standardised features; the fit below is near-exact for the frame interval
MIN_ITEMS = 3  # training items per regression feature (about 2 per column) to fit; fewer: the medians
HEART_MARGIN = 4  # pixels around the labelled heart left out of the noise estimate (motion, partial volume)
MIN_NOISE_PIXELS = 100  # static background pixels needed for a noise estimate


@dataclass(frozen=True)
class AcquisitionModel:
    """Pixel size (x, y) in mm and frame interval in s of a generated cine: a ridge regression of their logarithms on
    the phenotypes, clipped to the training range; training medians without weights (unconditional, small cohorts)."""

    median: np.ndarray  # (3,) log pixel x, log pixel y, log interval
    low: np.ndarray  # (3,) training minimum of the same
    high: np.ndarray  # (3,)
    weights: np.ndarray | None = None  # (1 + F + P, 3), None: medians only
    stats: dict | None = None  # phenotype_stats.json
    log_index: tuple[int, ...] = ()  # columns with positive training values (P of them)
    log_mean: np.ndarray | None = None  # (P,)
    log_std: np.ndarray | None = None  # (P,)
    r2: tuple[float, ...] = ()  # in-sample R^2 per target
    noise_sd: tuple[float, ...] = ()  # thermal noise sd of each training cine (intensity units of the prepared cines)

    def predict(self, values: np.ndarray | None, n: int) -> np.ndarray:
        """(N, 3) [pixel x mm, pixel y mm, frame interval s] for N condition rows (None: n unconditional samples)."""
        if values is None or self.weights is None:
            return np.tile(np.exp(self.median), (n, 1))
        x = features(np.asarray(values, np.float64), self.stats, self.log_index, self.log_mean, self.log_std)
        return np.exp(np.clip(x @ self.weights, self.low, self.high))

    def noise_levels(self, seeds: list[int]) -> np.ndarray:
        """(N,) noise sd per sample: a training cine's level drawn with the sample's seed (zeros without estimates)."""
        if not self.noise_sd:
            return np.zeros(len(seeds))
        return np.array([np.random.default_rng(s).choice(self.noise_sd) for s in seeds])

    def record(self) -> dict:
        """What generation.json records about the model."""
        noise = np.array(self.noise_sd) if self.noise_sd else np.zeros(1)
        return {"method": "training medians" if self.weights is None else "ridge regression on the phenotypes",
                "r2_training": dict(zip(("pixel_x", "pixel_y", "frame_interval"), self.r2)),
                "median_mm_s": np.exp(self.median).tolist(), "noise_sd_training_cines": len(self.noise_sd),
                "noise_sd_quantiles_5_50_95": np.quantile(noise, [0.05, 0.5, 0.95]).round(5).tolist()}


def features(values: np.ndarray, stats: dict, log_index: tuple[int, ...], log_mean: np.ndarray,
             log_std: np.ndarray) -> np.ndarray:
    """(N, F) physical values -> (N, 1 + F + P) [1, z-scores, standardised logs of the `log_index` columns]."""
    logs = np.log(np.clip(values[:, list(log_index)], 1e-12, None))
    return np.hstack([np.ones((len(values), 1)), normalise(values, stats), (logs - log_mean) / log_std])


def noise_sd(image: np.ndarray, label: np.ndarray | None) -> float | None:
    """Thermal noise sd of a (T, H, W) cine from frame-to-frame differences of its static background: pixels outside
    the dilated heart label, at least as bright as the background's median (where Rician noise is near Gaussian); robust
    scale (1.4826 x MAD) of the differences over sqrt 2. None where too few such pixels remain."""
    heart = (label > 0).any(0) if label is not None else np.zeros(image.shape[1:], bool)
    background = ~binary_dilation(heart, iterations=HEART_MARGIN) if heart.any() else ~heart
    mean = image.mean(0)
    keep = background & (mean >= np.median(mean[background])) if background.any() else background
    if keep.sum() < MIN_NOISE_PIXELS or len(image) < 2:
        return None
    diff = np.diff(image[:, keep].astype(np.float32), axis=0)
    return float(1.4826 * np.median(np.abs(diff - np.median(diff))) / np.sqrt(2))


def training_noise(prepared_dir: str | Path, items: list[dict]) -> tuple[float, ...]:
    """Noise sd (`noise_sd`) of each training cine whose image file exists (with its label file where that exists;
    those with an estimate); an unreadable file is an error naming the subject (cohort.load_cines)."""
    root, levels = Path(prepared_dir), []
    for d in track(items, "acquisition noise levels of the training cines"):
        if not d.get("image") or not (root / d["image"]).is_file():
            continue
        image = load_cines(root, [d])[0, 0].float().numpy()  # (T, H, W)
        has_label = d.get("label") and (root / d["label"]).is_file()
        label = load_cines(root, [d], "label")[0, 0].numpy() if has_label else None
        level = noise_sd(image, label)
        levels += [] if level is None else [level]
    return tuple(levels)


def add_noise(cine: np.ndarray, sd: float, seed: int) -> np.ndarray:
    """(1, T, H, W) cine in [0, 1] with Rician noise of `sd` (MONAI RicianNoise, seeded), clipped to [0, 1]."""
    if sd <= 0:
        return cine
    noise = RandRicianNoise(prob=1.0, mean=0.0, std=float(sd), relative=False, sample_std=False)
    noise.set_random_state(seed)
    return np.clip(np.asarray(noise(cine.astype(np.float32))), 0.0, 1.0).astype(cine.dtype)


def fit_acquisition(prepared_dir: str | Path, stats: dict, noise: bool = True) -> AcquisitionModel:
    """Fit the AcquisitionModel on the training items of a prepared folder (spacing_mm, frame_interval_s,
    phenotypes; with `noise`, the image and label arrays for the noise levels)."""
    training = split_items(prepared_dir, ["training"])
    base = {"noise_sd": training_noise(prepared_dir, training) if noise else ()}
    items = [d for d in training if d.get("spacing_mm") and d.get("frame_interval_s")]
    if not items:
        raise ValueError(f"{Path(prepared_dir) / 'datalist.json'}: no training item with spacing_mm and "
                         "frame_interval_s (written by configs/prepare.json); cannot set the NIfTI pixel size")
    targets = np.log([[*d["spacing_mm"][:2], d["frame_interval_s"]] for d in items])  # (N, 3)
    base |= {"median": np.median(targets, 0), "low": targets.min(0), "high": targets.max(0)}
    columns = stats["columns"]
    keep = np.array([has_phenotypes(d, columns) for d in items])
    if keep.sum() < MIN_ITEMS * 2 * len(columns):
        return AcquisitionModel(**base)
    values = np.array([[d[c] for c in columns] for d, k in zip(items, keep) if k], np.float64)  # (N, F)
    y = targets[keep]
    log_index = tuple(int(k) for k in np.flatnonzero((values > 0).all(0)))
    logs = np.log(values[:, list(log_index)])
    log_mean, log_std = logs.mean(0), np.where(logs.std(0) > 0, logs.std(0), 1.0)
    x = features(values, stats, log_index, log_mean, log_std)
    penalty = RIDGE * np.eye(x.shape[1])
    penalty[0, 0] = 0.0  # the intercept is not shrunk
    weights = np.linalg.solve(x.T @ x + penalty, x.T @ y)
    r2 = 1.0 - ((x @ weights - y) ** 2).sum(0) / np.maximum(((y - y.mean(0)) ** 2).sum(0), 1e-30)
    return AcquisitionModel(**base, weights=weights, stats=stats, log_index=log_index, log_mean=log_mean,
                            log_std=log_std, r2=tuple(float(v) for v in r2))
