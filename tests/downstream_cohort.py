"""A small prepared cohort and generated folder in the layouts of configs/prepare.json and configs/generate.json, for
the downstream tests (random cines; labels and phenotypes cycle so that every fold holds every class)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

COLUMNS = ["LVEDV (mL)", "LVEF (%)", "RAEF (%)"]
MEAN, STD = [150.0, 58.0, 35.0], [30.0, 6.0, 8.0]
SHAPE = (1, 50, 96, 96)


def _cine(rng: np.random.Generator, level: float) -> np.ndarray:
    return np.clip(rng.random(SHAPE) * 0.5 + level, 0, 1).astype(np.float16)


def write_cohort(root: Path, counts: tuple[int, int, int] = (12, 8, 8), n_generated: int = 16,
                 first: int = 0) -> tuple[Path, Path]:
    """<root>/prepared (datalist.json with training/validation/test, phenotype_stats.json, images/; subjects
    PH<first>, PH<first + 1>, ...) and <root>/generated (datalist.json of synthetic items with phenotypes, images/);
    returns both folders."""
    rng = np.random.default_rng(0)
    prepared, generated = root / "prepared", root / "generated"
    (prepared / "images").mkdir(parents=True)
    (generated / "images").mkdir(parents=True)
    datalist: dict = {"phenotype_columns": COLUMNS}
    k = first
    for split, n in zip(("training", "validation", "test"), counts):
        datalist[split] = []
        for _ in range(n):
            s, diagnosis = f"PH{k:06d}", k % 4
            np.save(prepared / "images" / f"{s}.npy", _cine(rng, 0.1 * diagnosis))
            values = np.asarray(MEAN) + np.asarray(STD) * (rng.standard_normal(3) + 0.5 * diagnosis)
            datalist[split].append({"image": f"images/{s}.npy", "subject": s, "has_phenotypes": True,
                                    **dict(zip(COLUMNS, map(float, values))), "diagnosis_index": diagnosis,
                                    "disease": int(diagnosis > 0), "sex": "female"})
            k += 1
    (prepared / "datalist.json").write_text(json.dumps(datalist))
    (prepared / "phenotype_stats.json").write_text(json.dumps({"columns": COLUMNS, "mean": MEAN, "std": STD,
                                                               "n": counts[0]}))
    synthetic = []
    for i in range(n_generated):
        s = f"G{i:06d}"
        np.save(generated / "images" / f"{s}.npy", _cine(rng, 0.2))
        values = np.asarray(MEAN) + np.asarray(STD) * rng.standard_normal(3)
        synthetic.append({"image": f"images/{s}.npy", "subject": s, "synthetic": True, "has_phenotypes": True,
                          **dict(zip(COLUMNS, map(float, values)))})
    (generated / "datalist.json").write_text(json.dumps({"training": synthetic, "phenotype_columns": COLUMNS}))
    return prepared, generated
