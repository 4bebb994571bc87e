"""Summaries of the table's units: per row the mean, sample std and 95% t-interval of each metric over its units,
and per mixing row the paired difference to MAE (real) over the same (repeat, fold, label fraction) units, with the
plain paired t-interval and the corrected one of Nadeau & Bengio (2003) for units that share training cines."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats as scipy_stats

CONFIDENCE = 0.95


def unit_key(unit: Mapping) -> tuple[int, int, float]:
    """The pairing key of a unit: (repeat, fold, label fraction)."""
    return unit["repeat"], unit["fold"], unit["fraction"]


def t_interval(values: Sequence[float], correction: float = 0.0) -> dict[str, float]:
    """{"mean", "std" (ddof 1), "n", "low", "high"} of the finite `values`: the 95% t-interval of their mean, its
    variance s^2 (1/n + correction); correction n_test/n_train gives the corrected resampled t-interval (Nadeau &
    Bengio 2003, for cross-validation units), 0 the plain one. NaN bounds for fewer than 2 values."""
    x = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    n = len(x)
    mean = float(x.mean()) if n else math.nan
    std = float(x.std(ddof=1)) if n > 1 else math.nan
    half = float(scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * std * math.sqrt(1 / n + correction)) if n > 1 \
        else math.nan
    return {"mean": mean, "std": std, "n": n, "low": mean - half, "high": mean + half}


def summarise(units: Sequence[Mapping]) -> dict[str, dict[str, float]]:
    """{metric: t_interval over the units} for every metric of the units."""
    metrics = dict.fromkeys(k for u in units for k in u["metrics"])
    return {m: t_interval([u["metrics"].get(m, math.nan) for u in units]) for m in metrics}


def paired_difference(units: Sequence[Mapping], baseline: Sequence[Mapping], correction: float
                      ) -> dict[str, dict[str, float]]:
    """{metric: {"mean", "std", "n", "low", "high" (plain 95% t-interval), "low_corrected", "high_corrected"}} of
    row minus baseline over the units both have (by unit_key); a unit where either value is not finite is left out."""
    base = {unit_key(u): u["metrics"] for u in baseline}
    pairs = [(u["metrics"], base[unit_key(u)]) for u in units if unit_key(u) in base]
    out = {}
    for metric in dict.fromkeys(k for row, _ in pairs for k in row):
        diffs = [row.get(metric, math.nan) - ref.get(metric, math.nan) for row, ref in pairs]
        plain, corrected = t_interval(diffs), t_interval(diffs, correction)
        out[metric] = {**plain, "low_corrected": corrected["low"], "high_corrected": corrected["high"]}
    return out
