"""Who sees what in the downstream protocol: the labelled real cines of a task, subject-level stratified k-fold
splits, nested labelled subsets of a training fold (the learning curve) and the fold datalists of fine-tuning, with
mix* synthetic cines in training folds only (docs/downstream.md, Protocol)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedKFold

from scripts.data.cohort import has_phenotypes, read_stats, split_items
from scripts.data.phenotypes import normalise
from scripts.downstream.mae import LABEL, synthetic_items, usable

logger = logging.getLogger(__name__)

TASKS = ("classification", "regression")
MIN_TRAINING = 2  # a lone training cine is dropped by the loader (drop_last when one is left over): an empty epoch


def task_items(prepared_dir: str | Path, splits: Sequence[str], task: str, label_key: str | None = None,
               num_classes: int | None = None) -> list[dict]:
    """Usable real cines of `splits` with their target as "label": the class index `label_key` (classification) or
    the z-scored phenotype vector of phenotype_stats.json (regression). Items without the target are left out."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    items = usable(split_items(prepared_dir, splits, absolute=True))
    if any(d.get("synthetic") for d in items):
        raise ValueError(f"{prepared_dir}: holds synthetic items; the cross-validation cohort must be real cines")
    if task == "regression":
        stats = read_stats(Path(prepared_dir) / "phenotype_stats.json")
        kept = [d for d in items if has_phenotypes(d, stats["columns"])]
        return with_phenotype_labels(kept, stats)
    kept = [d for d in items if d.get(label_key) is not None]
    bad = [(d["subject"], d[label_key]) for d in kept
           if not (isinstance(d[label_key], int) and 0 <= d[label_key] < num_classes)]
    if bad:
        raise ValueError(f"{prepared_dir}: label_key {label_key!r} must hold class indices 0..{num_classes - 1}; found "
                         f"{bad[:5]} (subject, value); for the phantom use 'disease' (2 classes) or 'diagnosis_index' "
                         "(4 classes)")
    logger.info("%s: %d of %d cines in %s have %r", prepared_dir, len(kept), len(items), list(splits), label_key)
    return [{**d, LABEL: d[label_key]} for d in kept]


def with_phenotype_labels(items: Sequence[dict], stats: Mapping) -> list[dict]:
    """Items with "label" = their phenotypes of stats["columns"], z-scored with `stats`, as float32 (F,) arrays."""
    if not items:
        return []
    values = normalise([[d[c] for c in stats["columns"]] for d in items], stats)
    return [{**d, LABEL: np.asarray(v, dtype=np.float32)} for d, v in zip(items, values)]


def subject_classes(items: Sequence[dict], stratify_key: str | None) -> dict[str, object]:
    """{subject: its first item's `stratify_key` value (0 for all without a key)}, in order of first appearance."""
    first = {d["subject"]: d for d in reversed(items)}
    classes = {s: first[s][stratify_key] if stratify_key else 0 for s in dict.fromkeys(d["subject"] for d in items)}
    if stratify_key and any(v is None for v in classes.values()):
        raise ValueError(f"stratify_key {stratify_key!r} is missing for some subjects; set it to null or to a key "
                         "every item has")
    return classes


def cv_folds(items: Sequence[dict], num_folds: int, seed: int, stratify_key: str | None = None) -> np.ndarray:
    """The fold index (0..num_folds-1) of each item: StratifiedKFold over subjects (shuffled with `seed`), so no
    subject is in two folds and each fold keeps the class mix of `stratify_key` (a subject's first item's value)."""
    classes = subject_classes(items, stratify_key)
    subjects, y = list(classes), list(classes.values())
    if len(subjects) < num_folds:
        raise ValueError(f"{len(subjects)} labelled subjects for {num_folds} folds: give a larger labelled cohort "
                         "or fewer folds (finetune#num_folds)")
    counts = dict(sorted(Counter(y).items()))
    few = {c: n for c, n in counts.items() if n < num_folds}
    if stratify_key and len(few) == len(counts):
        raise ValueError(f"{num_folds} folds stratified by {stratify_key!r} need at least {num_folds} subjects of a "
                         f"class; subjects per class: {counts}. Give a larger labelled cohort or fewer folds "
                         "(finetune#num_folds)")
    if stratify_key and few:
        logger.warning("classes %s have fewer subjects than the %d folds (%s): some validation folds miss them",
                       sorted(few), num_folds, counts)
    fold_of = {}
    splitter = StratifiedKFold(n_splits=num_folds, shuffle=True, random_state=seed)
    for k, (_, val) in enumerate(splitter.split(np.zeros(len(subjects)), y)):
        fold_of |= {subjects[i]: k for i in val}
    return np.array([fold_of[d["subject"]] for d in items])


def labelled_subset(items: Sequence[dict], fraction: float, seed: int, stratify_key: str | None = None) -> list[dict]:
    """The items of a labelled subset of subjects: per class of `stratify_key`, the first max(1, round(fraction x
    its subjects)) in one order shuffled with `seed`, so a smaller fraction's subset lies inside a larger one's."""
    if not 0 < fraction <= 1:
        raise ValueError(f"a label fraction must be in (0, 1], got {fraction}")
    classes = subject_classes(items, stratify_key)
    subjects = list(classes)
    order = [subjects[i] for i in np.random.default_rng(seed).permutation(len(subjects))]
    kept = set()
    for c, n in Counter(classes.values()).items():
        kept |= set([s for s in order if classes[s] == c][:max(1, round(fraction * n))])
    return [d for d in items if d["subject"] in kept]


def fold_split(items: Sequence[dict], num_folds: int, fold: int, seed: int, stratify_key: str | None = None,
               label_fraction: float = 1.0) -> tuple[list[dict], list[dict]]:
    """(training, validation) items of `fold`: the other folds cut to their `label_fraction` subset (labelled_subset,
    seeded with `seed`), and the whole fold; ValueError where a part is too small to train or validate."""
    if not 0 <= fold < num_folds:
        raise ValueError(f"fold must be in 0..{num_folds - 1}, got {fold}")
    folds = cv_folds(items, num_folds, seed, stratify_key)
    train = [d for d, k in zip(items, folds) if k != fold]
    val = [d for d, k in zip(items, folds) if k == fold]
    train = labelled_subset(train, label_fraction, seed, stratify_key)
    if len(train) < MIN_TRAINING or not val:
        raise ValueError(f"fold {fold} of {num_folds}: {len(train)} training and {len(val)} validation cines of the "
                         f"{len(items)} labelled real cines at label fraction {label_fraction:g}; training needs at "
                         f"least {MIN_TRAINING} training and 1 validation cine per fold: give a larger labelled cohort, "
                         "a larger label fraction or fewer folds (finetune#num_folds)")
    return train, val


def fold_datalists(prepared_dir: str | Path, cv_splits: Sequence[str], task: str, num_folds: int, fold: int,
                   seed: int = 0, label_key: str | None = None, num_classes: int | None = None,
                   stratify_key: str | None = None, generated_dir: str | Path | None = None,
                   mix_ratio: float = 0.0, label_fraction: float = 1.0) -> dict[str, list[dict]]:
    """{"training", "validation"} items of one fold (fold_split); with `mix_ratio` > 0 (regression only),
    round(mix_ratio x the real training count) synthetic cines labelled with their conditioning phenotypes join the
    training part."""
    if mix_ratio > 0 and task != "regression":
        raise ValueError("mix_ratio > 0 in fine-tuning (mix*) is for regression only: synthetic cines have "
                         "phenotypes but no diagnosis label")
    items = task_items(prepared_dir, cv_splits, task, label_key, num_classes)
    train, val = fold_split(items, num_folds, fold, seed, stratify_key, label_fraction)
    if mix_ratio > 0:
        train += mix_star_items(prepared_dir, generated_dir, round(mix_ratio * len(train)))
    if any(d.get("synthetic") for d in val):  # by construction never; a guard against future edits
        raise AssertionError("a synthetic cine is in a validation fold")
    logger.info("fold %d of %d at label fraction %g: %d training (%d synthetic), %d validation cines", fold, num_folds,
                label_fraction, len(train), sum(bool(d.get("synthetic")) for d in train), len(val))
    return {"training": train, "validation": val}


def mix_star_items(prepared_dir: str | Path, generated_dir: str | Path | None, n: int) -> list[dict]:
    """The first `n` synthetic cines (synthetic_items: audited copies left out) labelled with their conditioning
    phenotypes, z-scored with the statistics of the labelled cohort `prepared_dir`."""
    if n and generated_dir is None:
        raise ValueError("mix* needs a generated folder (generated_dir)")
    stats = read_stats(Path(prepared_dir) / "phenotype_stats.json")
    return with_phenotype_labels(synthetic_items(generated_dir, n), stats) if n else []


@dataclass(frozen=True)
class CrossValidation:
    """Repeated stratified k-fold over subjects: repeat r splits with seed + r; a unit is (repeat, fold, label
    fraction), the same for every row of the table, so rows pair unit by unit."""

    num_folds: int
    repeats: int = 1
    seed: int = 0
    stratify_key: str | None = None

    def units(self, fractions: Sequence[float]) -> list[tuple[int, int, float]]:
        """(repeat, fold, fraction) of every unit, fractions outermost."""
        return [(r, k, f) for f in fractions for r in range(self.repeats) for k in range(self.num_folds)]

    def split(self, items: Sequence[dict], repeat: int, fold: int, fraction: float) -> tuple[list[dict], list[dict]]:
        """(training, validation) items of a unit (fold_split with seed + repeat)."""
        return fold_split(items, self.num_folds, fold, self.seed + repeat, self.stratify_key, fraction)
