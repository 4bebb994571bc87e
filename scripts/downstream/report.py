"""The table's outputs: the paper's Table 2 layout in markdown (classification above: ACC, AUC; regression below: MAE
and R^2 per phenotype, mean R^2), the paired-difference tables, long-format CSVs and the learning-curve figure."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from scripts.downstream.finetune import metric_column
from scripts.runtime.files import atomic_write

CLASSIFICATION_METRICS = (("val_acc", "ACC"), ("val_auc", "AUC"))
METHODS = {"probe": "linear probe", "finetune": "fine-tuning"}
Column = tuple[str, str, str, int]  # (task name, metric, heading, decimals)


def table_groups(tasks: Sequence[Mapping], phenotypes: Sequence[str]) -> list[tuple[list[Column], bool]]:
    """(columns, regression) of each table: the classification tasks' ACC and AUC together, then per regression task
    MAE and R^2 of `phenotypes` and the mean R^2 over all its columns."""
    cls = [(t["name"], k, f"{t['title']} {m}", 3) for t in tasks if t["task"] == "classification"
           for k, m in CLASSIFICATION_METRICS]
    groups = [(cls, False)] if cls else []
    for t in (t for t in tasks if t["task"] == "regression"):
        columns = [(t["name"], f"val_{m} {metric_column(c)}", f"{c} {title}", 2 if m == "mae" else 3)
                   for c in phenotypes for m, title in (("mae", "MAE"), ("r2", "R²"))]
        groups.append((columns + [(t["name"], "val_mean_r2", "mean R²", 3)], True))
    return groups


def mean_std(stat: Mapping | None, digits: int) -> str:
    """"mean ± std" of a summary (the mean alone for one unit; "–" for none)."""
    if not stat or not stat["n"]:
        return "–"
    return f"{stat['mean']:.{digits}f}" + (f" ± {stat['std']:.{digits}f}" if stat["n"] > 1 else "")


def difference(stat: Mapping | None, digits: int) -> str:
    """"+mean [low, high]" of a paired difference (plain 95% t-interval), with † where the corrected interval also
    excludes zero."""
    if not stat or not stat["n"]:
        return "–"
    text = f"{stat['mean']:+.{digits}f}"
    if math.isnan(stat["low"]):
        return text
    excludes = stat["low_corrected"] > 0 or stat["high_corrected"] < 0
    return f"{text} [{stat['low']:+.{digits}f}, {stat['high']:+.{digits}f}]" + (" †" if excludes else "")


def markdown_tables(stats: Mapping, rows: Sequence[Mapping], tasks: Sequence[Mapping], phenotypes: Sequence[str],
                    cell: Callable[[Mapping | None, int], str]) -> str:
    """The markdown tables of `stats` ({row method: {task: {metric: summary}}}) for the `rows` it has, cells written by
    `cell` (mean_std or difference); mix* rows only in regression tables."""
    lines = []
    for columns, regression in table_groups(tasks, phenotypes):
        lines += ["| Method | " + " | ".join(c[2] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for row in (r for r in rows if r["method"] in stats and (regression or not r["mix_star"])):
            by_task = stats[row["method"]]
            cells = [cell(by_task.get(task, {}).get(metric), digits) for task, metric, _, digits in columns]
            lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def nested_csv(nested: Mapping, fields: Sequence[str]) -> str:
    """CSV of {method: {fraction: {row: {task: {metric: {field: value}}}}}}, one line per metric."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["method", "label_fraction", "row", "task", "metric", *fields])
    for method, by_fraction in nested.items():
        for fraction, by_row in by_fraction.items():
            for row, by_task in by_row.items():
                for task, by_metric in by_task.items():
                    writer.writerows([method, fraction, row, task, metric, *(f"{s[f]:.6g}" for f in fields)]
                                     for metric, s in by_metric.items())
    return buffer.getvalue()


def curve_panels(tasks: Sequence[Mapping], phenotypes: Sequence[str]) -> list[tuple[str, str, str]]:
    """(task name, metric, title) of each learning-curve panel: every classification task's AUC, then per regression
    task the mean R^2 and the R^2 of the first table phenotype."""
    panels = [(t["name"], "val_auc", f"{t['title']} AUC") for t in tasks if t["task"] == "classification"]
    for t in (t for t in tasks if t["task"] == "regression"):
        panels.append((t["name"], "val_mean_r2", "mean R²"))
        panels += [(t["name"], f"val_r2 {metric_column(c)}", f"{c} R²") for c in phenotypes[:1]]
    return panels


def learning_curve(path: str | Path, results: Mapping, sizes: Mapping, rows: Sequence[Mapping],
                   panels: Sequence[tuple[str, str, str]]) -> Path:
    """PNG: per method (a figure row) and panel, the mean metric against the labelled training subjects (sizes:
    {method: {fraction: {"subjects": mean count}}}), one line per table row, error bars the 95% t-interval of the
    mean."""
    import matplotlib

    matplotlib.use("Agg")  # headless; chosen before pyplot is imported
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), len(panels), figsize=(4 * len(panels), 3.4 * len(results)), squeeze=False)
    for axes_row, (method, by_fraction) in zip(axes, results.items()):
        fractions = sorted(by_fraction, key=float)
        for ax, (task, metric, title) in zip(axes_row, panels):
            for row in rows:
                points = [(sizes[method][f]["subjects"], by_fraction[f].get(row["method"], {}).get(task, {}).get(metric))
                          for f in fractions]
                points = [(x, s) for x, s in points if s and s["n"]]
                if points:
                    x = [p[0] for p in points]
                    y = [p[1]["mean"] for p in points]
                    err = [[max(0.0, p[1]["mean"] - p[1]["low"]) if p[1]["n"] > 1 else 0.0 for p in points],
                           [max(0.0, p[1]["high"] - p[1]["mean"]) if p[1]["n"] > 1 else 0.0 for p in points]]
                    ax.errorbar(x, y, yerr=err, marker="o", ms=3, capsize=2, lw=1, label=row["method"])
            ticks = [sizes[method][f]["subjects"] for f in fractions]
            ax.set(xscale="log", xlabel="labelled training subjects", title=f"{METHODS[method]}: {title}")
            ax.set_xticks(ticks, [f"{t:.0f}" for t in ticks])
            ax.minorticks_off()
    handles = {label: h for ax in axes.flat for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(list(handles.values()), list(handles), loc="upper center", ncol=max(1, min(len(handles), 6)), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return Path(path)
