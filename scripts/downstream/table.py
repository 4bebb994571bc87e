"""The downstream Table 2 of `configs/downstream_table.json`: scratch / MAE real / MAE real+synthetic ViTs, k-fold
fine-tuned per task; finished runs are skipped, so a killed table resumes (protocol: docs/downstream.md)."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from scripts.data.cohort import read_stats, split_items
from scripts.downstream.finetune import cv_folds, metric_column, task_items
from scripts.downstream.mae import pretrain_datalist, usable
from scripts.runtime.files import file_digest, write_json, write_text
from scripts.runtime.progress import track
from scripts.runtime.stages import run_stages
from scripts.runtime.timing import device_name

logger = logging.getLogger(__name__)


CLASSIFICATION_METRICS = (("val_acc", "ACC"), ("val_auc", "AUC"))


@dataclass(frozen=True)
class Cohort:
    """The cines of the table: the prepared and generated folders, the splits of MAE pretraining (`real_splits`) and
    of cross-validation (`cv_splits`), the key folds are stratified by and the seed."""

    prepared_dir: str
    generated_dir: str
    seed: int = 0
    real_splits: Sequence[str] = ("training",)
    cv_splits: Sequence[str] = ("validation", "test")
    stratify_key: str | None = "diagnosis_index"


@dataclass(frozen=True)
class Mixing:
    """The mixed rows of the table (the config's "downstream" section): MAE pretraining mix ratios, mix* ratios and
    whether missing synthetic cines are generated."""

    mix_ratios: Sequence[float] = (1, 2, 3, 4, 5)
    mix_star_ratios: Sequence[float] = (1, 2, 3, 4, 5)
    generate_missing: bool = True


@dataclass(frozen=True)
class Workspace:
    """Where and how runs are made: `table_dir` (outputs), `bundle_root` (configs), the profile layered on every
    run, the config's `stages` (its "generate" stage) and the sections forwarded into every run."""

    table_dir: str
    bundle_root: str
    profile_file: str | None = None
    stages: Sequence[dict] = ()
    forward: Mapping | None = None


def synthetic_needed(cohort: Cohort, mae: Mapping, finetune: Mapping, mix_ratios: Sequence[float],
                     mix_star_ratios: Sequence[float]) -> int:
    """Synthetic cines the table draws at most: mix r pretrains on r x the real pretraining count; mix* r fine-tunes
    on r x the largest regression training fold."""
    prepared_dir, seed = cohort.prepared_dir, cohort.seed
    real = pretrain_datalist(prepared_dir, None, 0, cohort.real_splits, mae["real_count"], mae["val_count"],
                             seed)["training"]
    need = [round(r * len(real)) for r in mix_ratios]
    if mix_star_ratios:
        folds = cv_folds(task_items(prepared_dir, cohort.cv_splits, "regression"), finetune["num_folds"], seed,
                         cohort.stratify_key)
        largest = max(int((folds != k).sum()) for k in range(finetune["num_folds"]))
        need += [round(r * largest) for r in mix_star_ratios]
    return max(need, default=0)


def synthetic_available(generated_dir: str | Path) -> int:
    """Usable synthetic cines in a generated folder (0 where it has no datalist yet)."""
    if not (Path(generated_dir) / "datalist.json").is_file():
        return 0
    return len(usable([d for d in split_items(generated_dir, ["training"], absolute=True) if d.get("synthetic")]))


def ensure_synthetic(need: int, generated_dir: str | Path, workspace: Workspace, generate_missing: bool) -> float:
    """Generate synthetic cines until `need` exist (the "generate" stage of the workspace's stages, resumable);
    returns seconds."""
    have = synthetic_available(generated_dir)
    if have >= need:
        logger.info("downstream: %d synthetic cines in %s, %d needed", have, generated_dir, need)
        return 0.0
    if not generate_missing:
        raise ValueError(f"{generated_dir}: {have} synthetic cines, the table needs {need}. Generate them (resumable) "
                         "with: python -m monai.bundle run --config_file \"['configs/generate.json','configs/profiles/"
                         f"<profile>.json']\" --output_dir {generated_dir} --num_samples {need}, or run this config "
                         "with --downstream#generate_missing True")
    stage = next((s for s in workspace.stages if s["name"] == "generate"), None)
    if stage is None:
        raise ValueError("downstream_table.json: no 'generate' stage in `stages` to make the missing synthetic cines")
    logger.info("downstream: %d synthetic cines listed in %s, %d needed: generating the rest (samples already "
                "written by an interrupted run are kept)", have, generated_dir, need)
    start = time.perf_counter()
    run_stages([{**stage, "overrides": {**stage["overrides"], "num_samples": need}}], Path(workspace.table_dir), None,
               workspace.forward, workspace.profile_file)
    return time.perf_counter() - start


def finished(metrics_path: Path, settings: Mapping) -> dict | None:
    """The run's metrics JSON where it is complete and records `settings` (those of its keys it records), else None."""
    if not metrics_path.is_file():
        return None
    result = json.loads(metrics_path.read_text(encoding="utf-8"))
    info = result.get("info", {})
    same = all(json.loads(json.dumps(settings[k])) == info[k] for k in settings.keys() & info.keys())
    return result if result.get("complete") and same else None


class Runner:
    """Runs bundle configs as stages (`run_stages`), skipping finished runs and recording wall and CPU seconds."""

    def __init__(self, workspace: Workspace) -> None:
        self.bundle_root, self.profile_file = workspace.bundle_root, workspace.profile_file
        self.forward = workspace.forward
        self.times_path = Path(workspace.table_dir) / "times.json"
        self.times = json.loads(self.times_path.read_text()) if self.times_path.is_file() else {}

    def __call__(self, name: str, configs: Sequence[str], settings: dict, metrics_path: Path,
                 recorded: Mapping | None = None) -> dict:
        """`settings` go to the run; they and `recorded` (values the run records but is not given) must match."""
        expected = {**settings, **(recorded or {})}
        result = finished(metrics_path, expected)
        if result is None:
            logger.info("downstream: run %s", name)
            start, cpu = time.perf_counter(), time.process_time()
            stage = {"name": name, "config_file": [f"{self.bundle_root}/{c}" for c in configs],
                     "overrides": {"bundle_root": self.bundle_root, **settings}}
            run_stages([stage], forward=self.forward, profile_file=self.profile_file)
            self.times[name] = {"wall_s": round(time.perf_counter() - start, 1),
                                "cpu_s": round(time.process_time() - cpu, 1)}  # all threads: busy-machine proof
            write_json(self.times_path, self.times)
            result = finished(metrics_path, expected)
            if result is None:
                raise RuntimeError(f"run {name} finished without a complete {metrics_path} recording its settings")
        return result


def command_line() -> str:
    """This process's command, `python -m monai.bundle ...` for a bundle run."""
    args = sys.argv[1:] if sys.argv[0].replace("\\", "/").endswith("monai/bundle/__main__.py") else sys.argv
    return " ".join(["python -m monai.bundle", *args] if args is not sys.argv else args)


def variants(mix_ratios: Sequence[float], mix_star_ratios: Sequence[float]) -> list[dict]:
    """Rows of the table: {"method", "slug", "pretrain" (mix ratio of the MAE, None: scratch), "mix_star"}."""
    rows = [{"method": "ViT (scratch)", "slug": "vit", "pretrain": None, "mix_star": 0},
            {"method": "MAE (real)", "slug": "mae_real", "pretrain": 0, "mix_star": 0}]
    rows += [{"method": f"- mix {100 * r:g}%", "slug": f"mix{r:g}", "pretrain": r, "mix_star": 0} for r in mix_ratios]
    rows += [{"method": f"- mix* {100 * r:g}%", "slug": f"mixstar{r:g}", "pretrain": r, "mix_star": r}
             for r in mix_star_ratios]
    return rows


def finetune_runs(tasks: Sequence[dict], rows: Sequence[dict], num_folds: int) -> list[tuple[dict, dict, int]]:
    """(task, row, fold) of every fine-tuning run; mix* rows only for regression, where synthetic cines have targets
    (their conditioning phenotypes)."""
    return [(t, r, k) for t in tasks for r in rows if not r["mix_star"] or t["task"] == "regression"
            for k in range(num_folds)]


def aggregate(folds: Sequence[Mapping]) -> dict[str, dict]:
    """{metric: {"mean", "std" (sample std over folds, ddof 1), "folds": [...]}} of fold results."""
    out = {}
    for key in folds[0]["metrics"]:
        values = np.array([f["metrics"][key] for f in folds], dtype=float)
        out[key] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                    "folds": values.tolist()}
    return out


def _cell(stat: Mapping | None, digits: int = 3) -> str:
    return "–" if stat is None else f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def render(results: Mapping, rows: Sequence[dict], tasks: Sequence[dict], phenotypes: Sequence[str]) -> tuple[str, str]:
    """(markdown, CSV) of the results: classification tasks above (ACC, AUC), regression below (MAE in units and R^2
    of `phenotypes`, mean R^2 over every column)."""
    cls = [t for t in tasks if t["task"] == "classification"]
    reg = [t for t in tasks if t["task"] == "regression"]
    md = []
    if cls:
        head = [f"{t['title']} {m}" for t in cls for _, m in CLASSIFICATION_METRICS]
        md += ["| Method | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
        for row in rows:
            if row["mix_star"]:
                continue
            cells = [_cell(results[row["method"]].get(t["name"], {}).get(k)) for t in cls for k, _ in CLASSIFICATION_METRICS]
            md.append(f"| {row['method']} | " + " | ".join(cells) + " |")
        md.append("")
    for t in reg:
        head = [f"{c} {m}" for c in phenotypes for m in ("MAE", "R²")] + ["mean R²"]
        md += ["| Method | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
        for row in rows:
            stats = results[row["method"]].get(t["name"], {})
            cells = [_cell(stats.get(f"val_{m} {metric_column(c)}"), 2 if m == "mae" else 3) for c in phenotypes for m in ("mae", "r2")]
            md.append(f"| {row['method']} | " + " | ".join(cells + [_cell(stats.get("val_mean_r2"))]) + " |")
        md.append("")
    csv_rows = ["method,task,metric,mean,std,folds"] + [
        f"\"{method}\",{task},\"{metric}\",{s['mean']:.6g},{s['std']:.6g},{len(s['folds'])}"
        for method, by_task in results.items() for task, metrics in by_task.items() for metric, s in metrics.items()]
    return "\n".join(md), "\n".join(csv_rows) + "\n"


def run_table(cohort: Cohort, mixing: Mixing, workspace: Workspace, mae: dict, finetune: dict,
              tasks: Sequence[dict], table_phenotypes: Sequence[str] = ()) -> dict:
    """Generate missing cines, pretrain an MAE per mix ratio, fine-tune every row x task x fold; write table.md,
    table.csv and summary.json into the table folder and return the summary."""
    start, table, profile_file = time.perf_counter(), Path(workspace.table_dir), workspace.profile_file
    prepared_dir, generated_dir, seed = cohort.prepared_dir, cohort.generated_dir, cohort.seed
    real_splits, cv_splits, stratify_key = cohort.real_splits, cohort.cv_splits, cohort.stratify_key
    if not isinstance(mixing.generate_missing, bool):  # fire passes `--x false` as the string 'false'
        raise TypeError(f"downstream#generate_missing must be a boolean, got {mixing.generate_missing!r} "
                         "(on the command line: True or False)")
    mix, mix_star = list(mixing.mix_ratios), list(mixing.mix_star_ratios)
    if set(mix_star) - set(mix):  # a mix* row fine-tunes the encoder of the same mix ratio
        raise ValueError(f"downstream#mix_star_ratios {sorted(set(mix_star) - set(mix))} need the same ratios in "
                         f"downstream#mix_ratios {mix}")
    need = synthetic_needed(cohort, mae, finetune, mix, mix_star)
    gen_s = ensure_synthetic(need, generated_dir, workspace, mixing.generate_missing)
    runner = Runner(workspace)
    common = {"dataset_dir": prepared_dir, "generated_dir": generated_dir, "seed": seed, "mae": mae}

    encoders: dict[float, str] = {}
    pretrain_info = {}
    for r in track(sorted({0, *mix}), "downstream: MAE pretraining runs"):
        slug = f"mix{r:g}"
        weights = str(table / "models" / f"mae_{slug}.pt")
        settings = {**common, "mix_ratio": r, "real_splits": list(real_splits), "weights_path": weights,
                    "latest_checkpoint": str(table / "models" / f"mae_{slug}_latest.pt"),
                    "output_dir": str(table / "pretrain" / slug)}
        result = runner(f"pretrain_{slug}", ["configs/pretrain_mae.json"], settings,
                        table / "pretrain" / slug / "metrics.json")
        encoders[r], pretrain_info[slug] = weights, result

    digests = {None: "", **{r: file_digest(w) for r, w in encoders.items()}}
    rows = variants(mix, mix_star)
    folds: dict[tuple[str, str], list[dict]] = {}
    for task, row, fold in track(finetune_runs(tasks, rows, finetune["num_folds"]), "downstream: fine-tuning runs"):
        out = table / "runs" / row["slug"] / task["name"]
        settings = {**common, **task["overrides"], "task": task["task"], "finetune": finetune, "fold": fold,
                    "cv_splits": list(cv_splits), "stratify_key": stratify_key,
                    "pretrained": "" if row["pretrain"] is None else encoders[row["pretrain"]],  # "": scratch
                    "mix_ratio": row["mix_star"], "run_name": f"{task['name']}_fold{fold}",
                    "output_dir": str(out), "ckpt_dir": str(out / "models")}
        run_name = settings["run_name"]
        encoder = {"pretrained_digest": digests[row["pretrain"]]}  # a remade MAE invalidates its fine-tunes
        folds.setdefault((row["method"], task["name"]), []).append(
            runner(f"{row['slug']}_{run_name}", task["configs"], settings, out / f"{run_name}.json", encoder))
        (out / "models" / f"{run_name}_latest.pt").unlink(missing_ok=True)  # the table resumes per run
    results: dict[str, dict] = {row["method"]: {} for row in rows}
    for (method, task_name), fold_results in folds.items():
        results[method][task_name] = aggregate(fold_results)

    summary = {
        "command": command_line(), "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{device_name(torch.device('cpu'))}, "
                   f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}",
        "profile_file": profile_file, "folds": finetune["num_folds"], "seed": seed,
        "cohort": {"real_pretraining": pretrain_info["mix0"]["info"]["real_pretraining"],
                   "synthetic_needed": need, "synthetic_available": synthetic_available(generated_dir),
                   "cv_splits": list(cv_splits), "real_splits": list(real_splits)},
        "seconds": {"generation": round(gen_s, 1), "runs": runner.times, "this_call": round(time.perf_counter() - start, 1)},
        "pretraining": {slug: r["metrics"] for slug, r in pretrain_info.items()},
        "results": results,
    }
    columns = read_stats(Path(prepared_dir) / "phenotype_stats.json")["columns"] if any(
        t["task"] == "regression" for t in tasks) else []
    markdown, csv_text = render(results, rows, tasks, [c for c in table_phenotypes if c in columns])
    header = (f"Command: `{summary['command']}`  \nFinished {summary['finished_utc']} on {summary['machine']}; "
              f"{finetune['num_folds']}-fold cross-validation, mean ± std (ddof 1) over folds; "
              f"{sum(t['wall_s'] for t in runner.times.values()) + gen_s:.0f} s of runs and generation in all.\n\n")
    write_text(table / "table.md", header + markdown)
    write_text(table / "table.csv", csv_text)
    write_json(table / "summary.json", summary)
    logger.info("downstream: table written to %s\n%s", table / "table.md", markdown)
    return summary
