"""The downstream Table 2 of `configs/downstream_table.json`: scratch / MAE real / MAE real+synthetic encoders,
measured by a linear probe and by fine-tuning over repeated k-fold cross-validation of a labelled cohort at several
labelled-set sizes, with paired differences to MAE (real); finished runs are skipped, so a killed table resumes
(protocol: docs/downstream.md)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from scripts.data.cohort import read_stats
from scripts.downstream.folds import CrossValidation, mix_star_items, task_items
from scripts.downstream.labelled import GENERATOR_SPLITS, check_disjoint_subjects, ensure_labelled
from scripts.downstream.mae import pretrain_datalist
from scripts.downstream.probe import encoder_features, probe_task
from scripts.downstream.report import (
    METHODS,
    curve_panels,
    difference,
    learning_curve,
    markdown_tables,
    mean_std,
    nested_csv,
)
from scripts.downstream.runs import Runner, Workspace, command_line, ensure_synthetic, synthetic_available
from scripts.downstream.statistics import paired_difference, summarise
from scripts.runtime.files import file_digest, write_json, write_text
from scripts.runtime.progress import track
from scripts.runtime.timing import device_name

logger = logging.getLogger(__name__)

BASELINE = "MAE (real)"  # the row every other row is paired against


@dataclass(frozen=True)
class Cohort:
    """The cines of the table: the generator's prepared folder (`real_splits` pretrain the MAEs), the generated folder,
    the labelled cohort cross-validated over its `cv_splits` (None: made by the config's labelled stages), the key
    folds and labelled subsets are stratified by, and the seed (repeat r splits with seed + r)."""

    prepared_dir: str
    generated_dir: str
    labelled_dir: str | None = None
    seed: int = 0
    real_splits: Sequence[str] = ("training",)
    cv_splits: Sequence[str] = ("training", "validation", "test")
    stratify_key: str | None = "diagnosis_index"


@dataclass(frozen=True)
class Protocol:
    """The measurements: label fractions of each training fold (the learning curve), cross-validation repeats (the
    probe runs at every fraction and repeat, fine-tuning at `finetune_fractions` in the first `finetune_repeats`), the
    MAE mix ratios, mix* ratios and whether missing synthetic cines are generated."""

    label_fractions: Sequence[float] = (0.1, 0.25, 1.0)
    finetune_fractions: Sequence[float] = (1.0,)
    repeats: int = 1
    finetune_repeats: int = 1
    mix_ratios: Sequence[float] = (1, 2, 3, 4, 5)
    mix_star_ratios: Sequence[float] = (1, 2, 3, 4, 5)
    generate_missing: bool = True

    def check(self) -> None:
        """ValueError (TypeError) naming the downstream# key whose value cannot make a table."""
        if not isinstance(self.generate_missing, bool):  # fire passes `--x false` as the string 'false'
            raise TypeError(f"downstream#generate_missing must be a boolean, got {self.generate_missing!r} "
                            "(on the command line: True or False)")
        if not self.label_fractions or any(not 0 < f <= 1 for f in self.label_fractions):
            raise ValueError(f"downstream#label_fractions must be fractions in (0, 1], got {self.label_fractions}")
        if set(self.finetune_fractions) - set(self.label_fractions):
            raise ValueError(f"downstream#finetune_fractions {sorted(set(self.finetune_fractions))} must be among "
                             f"downstream#label_fractions {list(self.label_fractions)}")
        if not isinstance(self.repeats, int) or self.repeats < 1:
            raise ValueError(f"downstream#repeats must be a whole number >= 1, got {self.repeats!r}")
        if not isinstance(self.finetune_repeats, int) or not 1 <= self.finetune_repeats <= self.repeats:
            raise ValueError(f"downstream#finetune_repeats must be a whole number in 1..downstream#repeats "
                             f"({self.repeats}), got {self.finetune_repeats!r}")
        if set(self.mix_star_ratios) - set(self.mix_ratios):  # a mix* row uses the encoder of the same mix ratio
            raise ValueError(f"downstream#mix_star_ratios {sorted(set(self.mix_star_ratios) - set(self.mix_ratios))} "
                             f"need the same ratios in downstream#mix_ratios {list(self.mix_ratios)}")


def variants(mix_ratios: Sequence[float], mix_star_ratios: Sequence[float]) -> list[dict]:
    """Rows of the table: {"method", "slug", "pretrain" (mix ratio of the MAE, None: scratch), "mix_star"}."""
    rows = [{"method": "ViT (scratch)", "slug": "vit", "pretrain": None, "mix_star": 0},
            {"method": BASELINE, "slug": "mae_real", "pretrain": 0, "mix_star": 0}]
    rows += [{"method": f"- mix {100 * r:g}%", "slug": f"mix{r:g}", "pretrain": r, "mix_star": 0} for r in mix_ratios]
    rows += [{"method": f"- mix* {100 * r:g}%", "slug": f"mixstar{r:g}", "pretrain": r, "mix_star": r}
             for r in mix_star_ratios]
    return rows


def row_tasks(row: Mapping, tasks: Sequence[dict]) -> list[dict]:
    """The tasks of a row: mix* rows regression only, where synthetic cines have targets (conditioning phenotypes)."""
    return [t for t in tasks if not row["mix_star"] or t["task"] == "regression"]


def largest_training(items: Sequence[dict], cv: CrossValidation, fractions: Sequence[float]) -> int:
    """The most real training cines any unit at the largest of `fractions` has (what mix* ratios multiply)."""
    return max(len(cv.split(items, r, k, f)[0]) for r, k, f in cv.units([max(fractions)]))


def synthetic_needed(cohort: Cohort, mae: Mapping, protocol: Protocol, cv: CrossValidation,
                     regression_items: Sequence[dict] | None) -> int:
    """Synthetic cines the table draws at most: mix r pretrains on r x the real pretraining count; mix* r adds r x
    the real training cines of a unit, at most at the largest label fraction."""
    real = pretrain_datalist(cohort.prepared_dir, None, 0, cohort.real_splits, mae["real_count"], mae["val_count"],
                             cohort.seed)["training"]
    need = [round(r * len(real)) for r in protocol.mix_ratios]
    if protocol.mix_star_ratios and regression_items:
        largest = largest_training(regression_items, cv, protocol.label_fractions)
        need += [round(r * largest) for r in protocol.mix_star_ratios]
    return max(need, default=0)


def pretrain(runner: Runner, cohort: Cohort, ratios: Sequence[float], mae: dict, table: Path) -> dict[float, dict]:
    """{mix ratio: {"weights", "digest", "result"}} of an MAE per ratio (0: real only), pretrained or reused."""
    encoders = {}
    for r in track(sorted({0, *ratios}), "downstream: MAE pretraining runs"):
        slug = f"mix{r:g}"
        weights = str(table / "models" / f"mae_{slug}.pt")
        settings = {"dataset_dir": cohort.prepared_dir, "generated_dir": cohort.generated_dir, "seed": cohort.seed,
                    "mae": mae, "mix_ratio": r, "real_splits": list(cohort.real_splits), "weights_path": weights,
                    "latest_checkpoint": str(table / "models" / f"mae_{slug}_latest.pt"),
                    "output_dir": str(table / "pretrain" / slug)}
        result = runner(f"pretrain_{slug}", ["configs/pretrain_mae.json"], settings,
                        table / "pretrain" / slug / "metrics.json")
        encoders[r] = {"weights": weights, "digest": file_digest(weights), "result": result}
    return encoders


def probe_rows(runner: Runner, rows: Sequence[dict], encoders: Mapping, items: Mapping[str, list[dict]],
               context: Mapping) -> dict[str, dict[str, list[dict]]]:
    """{row method: {task: units}} of the linear probe; each row's units are kept in <table>/probe/<slug>.json and
    reused while the encoder (by digest) and the settings are the same."""
    cohort, protocol, cv, probe = context["cohort"], context["protocol"], context["cv"], context["probe"]
    every = list({d["image"]: d for task_list in items.values() for d in task_list}.values())  # each cine once
    stats_path = Path(context["labelled_dir"]) / "phenotype_stats.json"
    stats = read_stats(stats_path) if stats_path.is_file() else None
    out = {}
    for row in rows:
        tasks = row_tasks(row, context["tasks"])
        encoder = encoders.get(row["pretrain"], {"weights": "", "digest": ""})
        settings = {"labelled_dir": context["labelled_dir"], "cv_splits": list(cohort.cv_splits), "cv": asdict(cv),
                    "label_fractions": list(protocol.label_fractions), "probe": probe,
                    "mae": context["mae"], "encoder_digest": encoder["digest"], "mix_star": row["mix_star"],
                    "generated_dir": cohort.generated_dir, "tasks": [t["name"] for t in tasks]}

        def make(row: Mapping = row, tasks: Sequence[dict] = tasks, weights: str = encoder["weights"]) -> dict:
            synthetic = []
            if row["mix_star"]:
                largest = max(largest_training(items[t["name"]], cv, protocol.label_fractions) for t in tasks)
                synthetic = mix_star_items(context["labelled_dir"], cohort.generated_dir,
                                           round(row["mix_star"] * largest))
            features = encoder_features(context["mae"], weights, every + synthetic, probe["pooling"],
                                        probe["batch_size"], cohort.seed)
            return {"units": {t["name"]: probe_task(t, items[t["name"]], features, cv, protocol.label_fractions,
                                                    probe, stats, synthetic, row["mix_star"]) for t in tasks}}

        out[row["method"]] = runner.computed(f"probe_{row['slug']}", runner.table_dir / "probe" / f"{row['slug']}.json",
                                             settings, make)["units"]
    return out


def finetune_rows(runner: Runner, rows: Sequence[dict], encoders: Mapping, context: Mapping
                  ) -> dict[str, dict[str, list[dict]]]:
    """{row method: {task: units}} of fine-tuning at the protocol's finetune_fractions and first finetune_repeats,
    one bundle run per unit; a run's weights and resume file are deleted once it is complete."""
    cohort, protocol, finetune = context["cohort"], context["protocol"], context["finetune"]
    cv = replace(context["cv"], repeats=protocol.finetune_repeats)  # the first repeats: units pair with the probe's
    runs = [(t, row, unit) for row in rows for t in row_tasks(row, context["tasks"])
            for unit in cv.units(protocol.finetune_fractions)]
    out: dict[str, dict[str, list[dict]]] = {}
    for task, row, (repeat, fold, fraction) in track(runs, "downstream: fine-tuning runs"):
        folder = runner.table_dir / "runs" / row["slug"] / task["name"]
        name = f"{task['name']}_rep{repeat}_frac{fraction:g}_fold{fold}"
        encoder = encoders.get(row["pretrain"], {"weights": "", "digest": ""})  # "": scratch
        settings = {**task["overrides"], "dataset_dir": context["labelled_dir"], "generated_dir": cohort.generated_dir,
                    "mae": context["mae"], "task": task["task"], "finetune": finetune, "fold": fold,
                    "seed": cohort.seed + repeat, "label_fraction": fraction, "cv_splits": list(cohort.cv_splits),
                    "stratify_key": cohort.stratify_key, "pretrained": encoder["weights"],
                    "mix_ratio": row["mix_star"], "run_name": name, "output_dir": str(folder),
                    "ckpt_dir": str(folder / "models")}
        result = runner(f"{row['slug']}_{name}", task["configs"], settings, folder / f"{name}.json",
                        {"pretrained_digest": encoder["digest"]})  # a remade MAE invalidates its fine-tunes
        for suffix in ("_latest.pt", ".pt"):  # the table resumes per run and reads only the metrics
            (folder / "models" / f"{name}{suffix}").unlink(missing_ok=True)
        info = result["info"]
        out.setdefault(row["method"], {}).setdefault(task["name"], []).append(
            {"repeat": repeat, "fold": fold, "fraction": fraction, "training_subjects": info["training_subjects"],
             "training": info["training_cines"] - info["synthetic_training_cines"],  # real, as the probe's
             "synthetic": info["synthetic_training_cines"],
             "validation": len(info["validation_subjects"]), "metrics": result["metrics"]})
    return out


def summaries(units: Mapping, correction: float) -> tuple[dict, dict, dict]:
    """(results, paired differences to BASELINE, sizes: mean labelled training subjects and units), each {method:
    {fraction: ...}}."""
    results: dict = {}
    differences: dict = {}
    sizes: dict = {}
    for method, by_row in units.items():
        fractions = sorted({u["fraction"] for tasks in by_row.values() for us in tasks.values() for u in us},
                           reverse=True)
        for f in fractions:
            at = {row: {task: [u for u in us if u["fraction"] == f] for task, us in tasks.items()}
                  for row, tasks in by_row.items()}
            key = f"{f:g}"
            results.setdefault(method, {})[key] = {row: {t: summarise(us) for t, us in tasks.items()}
                                                   for row, tasks in at.items()}
            differences.setdefault(method, {})[key] = {
                row: {t: paired_difference(us, at[BASELINE].get(t, []), correction) for t, us in tasks.items()}
                for row, tasks in at.items() if row != BASELINE and BASELINE in at}
            first = next(iter(at.get(BASELINE, next(iter(at.values()))).values()))  # a row's first task's units
            sizes.setdefault(method, {})[key] = {"subjects": float(np.mean([u["training_subjects"] for u in first])),
                                                 "units": len(first)}
    return results, differences, sizes


def sections(nested: Mapping, sizes: Mapping, render: Callable[[Mapping], str]) -> str:
    """Markdown: per method and label fraction (largest first) a heading and `render(stats)`."""
    parts = []
    for method, by_fraction in nested.items():
        for key, stats in by_fraction.items():
            size = sizes[method][key]
            heading = (f"## {METHODS[method]}, {100 * float(key):g}% of each training fold (mean "
                       f"{size['subjects']:.1f} labelled subjects; {size['units']} units: repeat x fold)")
            parts += [heading, "", render(stats)]
    return "\n".join(parts)


def run_table(cohort: Cohort, protocol: Protocol, workspace: Workspace, mae: dict, finetune: dict, probe: dict,
              tasks: Sequence[dict], table_phenotypes: Sequence[str] = ()) -> dict:
    """Make the labelled cohort, generate missing cines, pretrain an MAE per mix ratio, probe and fine-tune every row x
    task x unit; write table.md, table.csv, paired_differences.md/.csv, learning_curve.png and summary.json into the
    table folder and return the summary."""
    start, table = time.perf_counter(), Path(workspace.table_dir)
    protocol.check()
    labelled_dir, labelled_s = (cohort.labelled_dir, 0.0) if cohort.labelled_dir else ensure_labelled(workspace)
    subjects = check_disjoint_subjects(labelled_dir, cohort.cv_splits, cohort.prepared_dir,
                                       sorted({*GENERATOR_SPLITS, *cohort.real_splits}))
    cv = CrossValidation(finetune["num_folds"], protocol.repeats, cohort.seed, cohort.stratify_key)
    items = {t["name"]: task_items(labelled_dir, cohort.cv_splits, t["task"], t["overrides"].get("label_key"),
                                   t["overrides"].get("num_classes")) for t in tasks}
    regression = next((items[t["name"]] for t in tasks if t["task"] == "regression"), None)
    need = synthetic_needed(cohort, mae, protocol, cv, regression)
    gen_s = ensure_synthetic(need, cohort.generated_dir, workspace, protocol.generate_missing)
    runner = Runner(workspace)
    encoders = pretrain(runner, cohort, protocol.mix_ratios, mae, table)
    rows = variants(protocol.mix_ratios, protocol.mix_star_ratios)
    context = {"cohort": cohort, "protocol": protocol, "cv": cv, "labelled_dir": labelled_dir, "tasks": tasks,
               "mae": mae, "finetune": finetune, "probe": probe}
    units = {"probe": probe_rows(runner, rows, encoders, items, context)}
    if protocol.finetune_fractions:
        units["finetune"] = finetune_rows(runner, rows, encoders, context)
    results, differences, sizes = summaries(units, 1 / (cv.num_folds - 1))

    summary = {
        "command": command_line(), "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{device_name(torch.device('cpu'))}, "
                   f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}",
        "profile_file": workspace.profile_file, "protocol": asdict(protocol), "cross_validation": asdict(cv),
        "cohort": {"labelled_dir": labelled_dir, "labelled_subjects": subjects, "cv_splits": list(cohort.cv_splits),
                   "prepared_dir": cohort.prepared_dir, "real_splits": list(cohort.real_splits),
                   "real_pretraining": encoders[0]["result"]["info"]["real_pretraining"],
                   "synthetic_needed": need, "synthetic_available": synthetic_available(cohort.generated_dir)},
        "seconds": {"labelled_cohort": round(labelled_s, 1), "generation": round(gen_s, 1), "runs": runner.times,
                    "this_call": round(time.perf_counter() - start, 1)},
        "pretraining": {f"mix{r:g}": e["result"]["metrics"] for r, e in encoders.items()},
        "labelled_training_subjects": sizes, "results": results, "paired_differences": differences, "units": units,
    }
    write_outputs(table, summary, rows, tasks, table_phenotypes, cv, labelled_dir)
    return summary


def write_outputs(table: Path, summary: Mapping, rows: Sequence[dict], tasks: Sequence[dict],
                  table_phenotypes: Sequence[str], cv: CrossValidation, labelled_dir: str) -> None:
    """table.md, table.csv, paired_differences.md/.csv, learning_curve.png and summary.json of a finished table."""
    columns = read_stats(Path(labelled_dir) / "phenotype_stats.json")["columns"] if any(
        t["task"] == "regression" for t in tasks) else []
    phenotypes = [c for c in table_phenotypes if c in columns]
    results, differences = summary["results"], summary["paired_differences"]
    sizes = summary["labelled_training_subjects"]
    header = (f"Command: `{summary['command']}`  \nFinished {summary['finished_utc']} on {summary['machine']}; "
              f"{cv.repeats} x {cv.num_folds}-fold cross-validation over {summary['cohort']['labelled_subjects']} "
              f"labelled subjects; {sum(t['wall_s'] for t in summary['seconds']['runs'].values()):.0f} s of runs, "
              f"{summary['seconds']['generation'] + summary['seconds']['labelled_cohort']:.0f} s of generation and "
              "labelled cohort in all.\n\n")
    write_text(table / "table.md", header + "Mean ± sample std (ddof 1) over the units (repeat x fold).\n\n" + sections(
        results, sizes, lambda s: markdown_tables(s, rows, tasks, phenotypes, mean_std)))
    write_text(table / "paired_differences.md", header + (
        f"Row minus {BASELINE} over the same (repeat, fold) units: mean [95% paired t-interval]; † where the corrected "
        "interval (Nadeau & Bengio 2003: variance x (1/n + 1/(folds - 1)), for folds that share training cines) "
        "also excludes zero.\n\n") + sections(
        differences, sizes, lambda s: markdown_tables(s, rows, tasks, phenotypes, difference)))
    write_text(table / "table.csv", nested_csv(results, ("mean", "std", "n", "low", "high")))
    write_text(table / "paired_differences.csv",
               nested_csv(differences, ("mean", "std", "n", "low", "high", "low_corrected", "high_corrected")))
    learning_curve(table / "learning_curve.png", results, sizes, rows, curve_panels(tasks, phenotypes))
    write_json(table / "summary.json", summary)
    logger.info("downstream: table written to %s", table / "table.md")
