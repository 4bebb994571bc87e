"""Evaluation of generated cines (`configs/evaluate_generation.json`): fidelity, phenotype adherence, privacy, speed.

Every generated set (by default the CFG cines of `generate.json` and its `--unconditional true` cines) is compared with
real held-out cines of the prepared cohort, and every number is reported beside a floor computed the same way on
real data: real-vs-real Frechet distances (scripts.evaluation.fidelity), the segmenter's own error on real held-out cines
(adherence), held-out-to-training similarity (copies) and chance (membership inference, scripts.evaluation.privacy).
Outputs in `evaluation_dir`: metrics.json, report.md, adherence_<set>.png, closest_pairs_<set>.png and
<set>_datalist_private.json (the set without the cines flagged as copies). Seeded throughout: a rerun gives the same
numbers on the same inputs.
"""

from __future__ import annotations

import csv
import datetime
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from scripts.data.cohort import load_cines, phenotype_matrix, read_datalist, read_stats, split_items
from scripts.data.phenotypes import LABELS, PHENOTYPE_COLUMNS, PhenotypeError, measure_cine, normalise
from scripts.evaluation import fidelity, privacy
from scripts.evaluation.report import adherence_plot, write_report
from scripts.generation.generate import sample_seed
from scripts.runtime.checkpoints import load_weights
from scripts.runtime.files import atomic_write, write_json
from scripts.runtime.timing import device_name, peak_memory, timed
from scripts.segmentation import segmenter as segmentation

logger = logging.getLogger(__name__)


HELDOUT = "heldout"  # name of the real held-out set in the privacy audit
ED_TOLERANCE = 2  # frames: the end-diastole frame of a cine counts as aligned within this distance of frame 0
Segment = Callable[[torch.Tensor], np.ndarray]  # (B, 1, T, H, W) float [0, 1] on the device -> (B, T, H, W) uint8
DEFAULTS = {"fid_frame_step": 10, "batch_size": 8, "max_heldout": None, "mia_draws": 4, "mia_max_subjects": None,
            "mia_permutations": 1000, "privacy_quantile": 0.95, "closest_pairs": 8, "speed_clips": 4}


# ------------------------------------------------------------------------------------------------------------- inputs
def subset(items: Sequence[dict], max_items: int | None, seed: int) -> list[dict]:
    """At most `max_items` of `items` (a seeded subset, in their order); all of them for None."""
    if max_items is None or len(items) <= max_items:
        return list(items)
    keep = np.sort(np.random.default_rng(seed).choice(len(items), max_items, replace=False))
    return [items[i] for i in keep]


def read_sets(sets: Mapping[str, str]) -> dict[str, dict]:
    """name -> {"dir", "status" ("ok", "missing" or "empty"), "items", "record" (generation.json or {})}."""
    out = {}
    for name, folder in sets.items():
        datalist = read_datalist(folder, required=False)
        items = (datalist or {}).get("training", [])
        status = "missing" if datalist is None else "ok" if items else "empty"
        record_path = Path(folder) / "generation.json"
        record = json.loads(record_path.read_text(encoding="utf-8")) if record_path.is_file() else {}
        out[name] = {"dir": str(folder), "status": status, "items": items, "record": record,
                     "columns": (datalist or {}).get("phenotype_columns", [])}
        if status != "ok":
            logger.warning("generated set %r: %s (%s)", name, status, Path(folder) / "datalist.json")
    return out


def value_rows(items: Sequence[dict], columns: Sequence[str]) -> np.ndarray:
    """(N, F) float values of `columns` (NaN where an item has none: unconditional or no phenotypes)."""
    rows = np.full((len(items), len(columns)), np.nan)
    for i, d in enumerate(items):
        if d.get("has_phenotypes"):
            rows[i] = [d[c] if isinstance(d.get(c), (int, float)) else np.nan for c in columns]
    return rows


# ---------------------------------------------------------------------------------------------------------- adherence
def segment_all(segment: Segment, cines: torch.Tensor, batch_size: int, device: torch.device | str) -> np.ndarray:
    """(N, 1, T, H, W) -> (N, T, H, W) uint8 label cines."""
    if not len(cines):
        return np.zeros((0,) + tuple(cines.shape[2:]), np.uint8)
    return np.concatenate([np.asarray(segment(x), np.uint8) for x in fidelity.batches(cines, batch_size, device)])


def measure_labels(labels: np.ndarray, items: Sequence[dict]) -> tuple[np.ndarray, list[dict]]:
    """Phenotypes (N, len(PHENOTYPE_COLUMNS)) of (N, T, H, W) label cines with each item's geometry; a NaN row and a
    {"subject", "reason"} entry for every cine that cannot be measured."""
    values = np.full((len(items), len(PHENOTYPE_COLUMNS)), np.nan)
    failures = []
    for i, (label, d) in enumerate(zip(labels, items)):
        try:
            if not (d.get("spacing_mm") and d.get("frame_interval_s")):
                raise PhenotypeError(f"subject {d.get('subject')!r}: no spacing_mm / frame_interval_s in the datalist")
            m = measure_cine(np.asarray(label).transpose(1, 2, 0), d["spacing_mm"], d["frame_interval_s"], d["subject"])
            values[i] = [m[c] for c in PHENOTYPE_COLUMNS]
        except PhenotypeError as e:
            failures.append({"subject": d.get("subject"), "reason": str(e)})
    return values, failures


def adherence_stats(target: np.ndarray, measured: np.ndarray, columns: Sequence[str]) -> dict[str, dict]:
    """Per column {"n", "pearson_r", "mae", "r2"} of measured vs target (N, F), over rows where both are finite;
    r2 = 1 - SS(measured - target) / SS(target - mean target). None where fewer than 3 rows or no spread."""
    out = {}
    for k, c in enumerate(columns):
        t, m = target[:, k], measured[:, k]
        ok = np.isfinite(t) & np.isfinite(m)
        t, m = t[ok], m[ok]
        spread = len(t) >= 3 and t.std() > 0 and m.std() > 0
        out[c] = {"n": int(ok.sum()), "pearson_r": float(np.corrcoef(t, m)[0, 1]) if spread else None,
                  "mae": float(np.abs(m - t).mean()) if len(t) else None,
                  "r2": float(1 - ((m - t) ** 2).sum() / ((t - t.mean()) ** 2).sum()) if spread else None}
    return out


def adherence(measured: np.ndarray, failures: list[dict], target: np.ndarray | None, columns: Sequence[str]) -> dict:
    """{"n", "unmeasurable_share", "unmeasurable", "phenotypes"} for one set; target None: no conditioning values."""
    n = len(measured)
    index = [PHENOTYPE_COLUMNS.index(c) for c in columns]
    stats = adherence_stats(target, measured[:, index], columns) if target is not None else {}
    return {"n": n, "unmeasurable_share": len(failures) / n if n else None, "unmeasurable": failures,
            "phenotypes": stats}


def median_geometry(items: Sequence[dict]) -> list[dict]:
    """The items with every pixel size and frame interval set to their medians over the items (those that have them)."""
    known = [d for d in items if d.get("spacing_mm") and d.get("frame_interval_s")]
    if not known:
        return list(items)
    spacing = np.median([d["spacing_mm"] for d in known], axis=0).tolist()
    interval = float(np.median([d["frame_interval_s"] for d in known]))
    return [{**d, "spacing_mm": spacing, "frame_interval_s": interval} for d in items]


def ed_frames(labels: np.ndarray) -> np.ndarray:
    """(N,) frame of the largest LV blood-pool area of each (N, T, H, W) label cine: prepare's end-diastole rule
    (scripts/data.py AlignEndDiastoled), which puts it at frame 0 of every prepared cine."""
    return (labels == LABELS["LV"]).sum((2, 3)).argmax(1) if len(labels) else np.zeros(0, int)


def ed_aligned_share(frames: np.ndarray, num_frames: int, tolerance: int = ED_TOLERANCE) -> float | None:
    """Share of cines whose end-diastole frame lies within `tolerance` frames of frame 0, cyclically."""
    distance = np.minimum(frames % num_frames, -frames % num_frames)
    return float((distance <= tolerance).mean()) if len(frames) else None


def set_adherence(labels: np.ndarray, items: Sequence[dict], target: np.ndarray | None,
                  columns: Sequence[str]) -> tuple[dict, np.ndarray]:
    """(adherence() of (N, T, H, W) label cines measured with each item's geometry, with "median_geometry": the
    phenotype statistics when every item has the set's median pixel size and frame interval, i.e. what the image
    alone carries, and "ed_aligned_share" (ed_aligned_share of ed_frames); the measured (N, len(PHENOTYPE_COLUMNS))
    values)."""
    measured, failures = measure_labels(labels, items)
    entry = adherence(measured, failures, target, columns)
    entry["ed_aligned_share"] = ed_aligned_share(ed_frames(labels), labels.shape[1])
    entry["ed_tolerance_frames"] = ED_TOLERANCE
    if target is not None:
        entry["median_geometry"] = adherence(measure_labels(labels, median_geometry(items))[0], [], target,
                                             columns)["phenotypes"]
    return entry, measured


# -------------------------------------------------------------------------------------------------------------- speed
def measure_speed(mar: nn.Module, autoencoder: nn.Module, settings: dict, conditions: torch.Tensor | None,
                  clips: int, device: torch.device) -> dict:
    """Seconds per clip and peak memory of latent sampling and of decoding `clips` clips with a set's generation
    settings (generation.json "settings"); conditions (clips, F) normalised, or None (unconditional)."""
    kwargs = {k: settings[k] for k in ("cfg", "cfg_schedule", "temperature", "num_iter", "num_inference_steps")}
    load = os.getloadavg()[0]  # a busy shared machine slows every phase: recorded beside the timings
    seeds = [sample_seed(int(settings.get("seed", 0)), i) for i in range(clips)]
    with peak_memory(device) as mem_sample:
        t_sample, latents = timed(lambda: mar.sample_latents(conditions, seeds=seeds, **kwargs), device)
    with peak_memory(device) as mem_decode, torch.no_grad():
        t_decode, _ = timed(lambda: autoencoder.decode(latents), device)
    return {"clips": clips, "sampling_s_per_clip": t_sample / clips, "decoding_s_per_clip": t_decode / clips,
            "sampling_peak_bytes": mem_sample["peak"], "decoding_peak_bytes": mem_decode["peak"],
            "memory_method": mem_sample["method"], "device": str(device), "device_name": device_name(device),
            "load_average_1min": load, "cpu_count": os.cpu_count()}


# ---------------------------------------------------------------------------------------------------------- sections
def fidelity_section(heldout: torch.Tensor, cines: Mapping[str, torch.Tensor], means: Mapping[str, torch.Tensor],
                     settings: dict, i3d_path: str | None, seed: int, device: torch.device) -> dict:
    """{"fid", "fvd", "vae_fd"} -> set name -> fd_with_floor result (or {"skipped": reason})."""
    halves = fidelity.disjoint_halves(len(heldout), seed)
    bs = settings["batch_size"]
    features: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    inception = fidelity.load_torchscript(fidelity.inception_path(), device, "Inception-v3")
    features["fid"] = lambda x: fidelity.inception_features(inception, x, settings["fid_frame_step"], bs, device)
    if i3d_path:
        i3d = fidelity.load_torchscript(i3d_path, device, "i3d_path")
        features["fvd"] = lambda x: fidelity.i3d_features(i3d, x, bs, device)
    out = {}
    for metric, extract in features.items():
        logger.info("evaluation: %s features of %d held-out and %d set(s)", metric, len(heldout), len(cines))
        real = extract(heldout)  # only the first n <= half of each set enter a distance
        out[metric] = {name: fidelity.fd_with_floor(real, extract(x[:len(halves[0])]), halves)
                       for name, x in cines.items()}
    if not i3d_path:
        out["fvd"] = {name: {"skipped": "no I3D TorchScript file given (i3d_path null): FVD not computed"}
                      for name in cines}
    out["vae_fd"] = {name: fidelity.fd_with_floor(fidelity.pool_latents(means[HELDOUT]), fidelity.pool_latents(m),
                                                  halves) for name, m in means.items() if name != HELDOUT}
    return out


def training_pass(prepared_dir: Path, items: Sequence[dict], queries: Mapping[str, torch.Tensor],
                  autoencoder: nn.Module, mar: nn.Module, phenotypes: Mapping[str, np.ndarray],
                  settings: dict, seed: int, device: torch.device) -> tuple[dict, torch.Tensor, np.ndarray]:
    """One pass over the training cines in chunks: (pixel nearest neighbours of every query set, (N, D) pooled
    latent embeddings, (M,) MAR losses of the training subjects with phenotypes)."""
    nearest = privacy.NearestNeighbours({k: privacy.unit_rows(v) for k, v in queries.items()})
    embeddings, losses = [], []
    chunk = max(settings["batch_size"], 32)
    for start in range(0, len(items), chunk):
        part = items[start:start + chunk]
        cines = load_cines(prepared_dir, part)
        nearest.update(privacy.unit_rows(cines))
        means = fidelity.latent_means(autoencoder, cines, settings["batch_size"], device)
        embeddings.append(fidelity.pool_latents(means))
        with_phen = [i for i, d in enumerate(part) if d["subject"] in phenotypes]
        if with_phen:
            cond = torch.as_tensor(np.stack([phenotypes[part[i]["subject"]] for i in with_phen]), dtype=torch.float32)
            losses.append(privacy.mar_losses(mar, means[with_phen], cond, settings["mia_draws"], seed))
        logger.info("evaluation: training pass %d/%d cines", start + len(part), len(items))
    return nearest.result(), torch.cat(embeddings), np.concatenate(losses) if losses else np.zeros(0)


def condition_table(items: Sequence[dict], stats: dict) -> dict[str, np.ndarray]:
    """subject -> normalised phenotype vector, for items with every stats column."""
    return {d["subject"]: row for d, row in zip(items, phenotype_matrix(items, stats)) if np.isfinite(row).all()}


def privacy_section(prepared_dir: Path, training: Sequence[dict], heldout: Sequence[dict],
                    cines: Mapping[str, torch.Tensor], means: Mapping[str, torch.Tensor], sets: Mapping[str, dict],
                    autoencoder: nn.Module, mar: nn.Module, stats: dict, settings: dict, seed: int,
                    device: torch.device, evaluation_dir: Path, drop: bool) -> dict:
    """Copy audit of every set (the held-out set as its floor), closest-pair images, private datalists and the
    membership-inference result."""
    if not (training and heldout):
        return {"skipped": f"{len(training)} training and {len(heldout)} held-out cines: the audit needs both"}
    members = subset(training, settings["mia_max_subjects"], seed)  # training subjects of the MIA
    train_cond, held_cond = condition_table(members, stats), condition_table(heldout, stats)
    pixel, train_emb, train_loss = training_pass(prepared_dir, training, cines, autoencoder, mar, train_cond,
                                                 settings, seed, device)
    emb = privacy.NearestNeighbours({k: privacy.unit_rows(privacy.zscore(fidelity.pool_latents(m), train_emb))
                                     for k, m in means.items()})
    emb.update(privacy.unit_rows(privacy.zscore(train_emb, train_emb)))
    subjects = {HELDOUT: [d["subject"] for d in heldout]} | {k: [d["subject"] for d in sets[k]["items"]]
                                                              for k in cines if k != HELDOUT}
    audit = privacy.copy_audit({"pixel": pixel, "embedding": emb.result()}, subjects, HELDOUT,
                               [d["subject"] for d in training],
                               settings["privacy_quantile"])
    for name in subjects:
        if name == HELDOUT:
            continue
        image = privacy.closest_pairs_image(audit["sets"][name], cines[name],
                                            lambda i: np.load(prepared_dir / training[i]["image"]),
                                            evaluation_dir / f"closest_pairs_{name}.png", settings["closest_pairs"])
        audit["sets"][name]["closest_pairs_image"] = image.name if image else None
        if drop:
            out = privacy.drop_flagged(Path(sets[name]["dir"]) / "datalist.json", audit["sets"][name]["flagged"],
                                       evaluation_dir / f"{name}_datalist_private.json", audit)
            audit["sets"][name]["private_datalist"] = out.name
    held = [i for i, d in enumerate(heldout) if d["subject"] in held_cond]
    cond = torch.as_tensor(np.stack([held_cond[heldout[i]["subject"]] for i in held]), dtype=torch.float32) \
        if held else torch.zeros(0, len(stats["columns"]))
    held_loss = privacy.mar_losses(mar, means[HELDOUT][held], cond, settings["mia_draws"], seed)
    audit["membership_inference"] = privacy.membership_inference(train_loss, held_loss,
                                                                 settings["mia_permutations"], seed)
    return audit


def write_measurements(path: Path, items: Sequence[dict], ed: np.ndarray, target: np.ndarray | None,
                       measured: np.ndarray, columns: Sequence[str]) -> Path:
    """CSV, one row per cine: subject, end-diastole frame, then requested (empty without conditions) and measured
    (empty where unmeasurable) value of every column."""
    index = [PHENOTYPE_COLUMNS.index(c) for c in columns]
    with atomic_write(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        rows = csv.writer(f)
        rows.writerow(["subject", "ed_frame", *(f"requested {c}" for c in columns), *(f"measured {c}" for c in columns)])
        for i, d in enumerate(items):
            requested = target[i] if target is not None else [None] * len(columns)
            rows.writerow([d.get("subject"), int(ed[i]), *map(_cell, requested), *map(_cell, measured[i, index])])
    return path


def _cell(value: float | None) -> str:
    return "" if value is None or not np.isfinite(value) else repr(float(value))


def adherence_section(segment: Segment | None, heldout: Sequence[dict], heldout_cines: torch.Tensor,
                      prepared_dir: Path, cines: Mapping[str, torch.Tensor], sets: Mapping[str, dict],
                      stats: dict, settings: dict, device: torch.device, evaluation_dir: Path, reason: str) -> dict:
    """Adherence of every set (segmenter + measurement vs its conditioning values) beside the real held-out floors:
    segmenter + measurement, and measurement of the true labels, against the held-out phenotype table."""
    columns = [c for c in PHENOTYPE_COLUMNS if c in stats["columns"]]
    truth = value_rows(heldout, columns)
    labelled = [d for d in heldout if d.get("label")]
    out = {"columns": columns}
    if len(labelled) == len(heldout):
        measured, failures = measure_labels(load_cines(prepared_dir, heldout, "label")[:, 0].numpy(), heldout)
        out["heldout_true_labels"] = adherence(measured, failures, truth, columns)
    if segment is None:
        return out | {"skipped": reason}
    bs = settings["batch_size"]
    out["heldout_segmented"], measured = set_adherence(segment_all(segment, heldout_cines, bs, device), heldout,
                                                       truth, columns)
    plots = {"real held-out (segmented)": (truth, measured[:, [PHENOTYPE_COLUMNS.index(c) for c in columns]])}
    out["sets"] = {}
    for name, x in cines.items():
        logger.info("evaluation: segmenting and measuring the %d cines of %s", len(x), name)
        items = sets[name]["items"]
        target = value_rows(items, columns) if any(d.get("has_phenotypes") for d in items) else None
        labels = segment_all(segment, x, bs, device)
        out["sets"][name], measured = set_adherence(labels, items, target, columns)
        out["sets"][name]["table"] = write_measurements(evaluation_dir / f"adherence_{name}.csv", items,
                                                        ed_frames(labels), target, measured, columns).name
        if target is not None:
            index = [PHENOTYPE_COLUMNS.index(c) for c in columns]
            path = adherence_plot(evaluation_dir / f"adherence_{name}.png", columns,
                                  {f"generated {name}": (target, measured[:, index]), **plots})
            out["sets"][name]["plot"] = path.name if path else None
    return out


def speed_section(mar: nn.Module, autoencoder: nn.Module, sets: Mapping[str, dict], stats: dict, settings: dict,
                  device: torch.device) -> dict:
    """Per set: the generation run's own timings (generation.json) and a timed batch of `speed_clips` clips here."""
    out = {}
    for name, s in sets.items():
        record = s["record"]
        if s["status"] != "ok" or "settings" not in record:
            out[name] = {"skipped": f"set {s['status']}" if s["status"] != "ok" else "no generation.json"}
            continue
        clips = min(settings["speed_clips"], len(s["items"]))
        rows = value_rows(s["items"][:clips], stats["columns"])
        cond = torch.as_tensor(normalise(rows, stats), dtype=torch.float32, device=device) \
            if np.isfinite(rows).all() else None
        out[name] = {"generation_run": {k: record.get(k) for k in ("sampling_s_per_clip", "decoding_s_per_clip",
                                                                     "device", "generated_this_run")},
                     "measured": measure_speed(mar, autoencoder, record["settings"], cond, clips, device)}
    return out


# ---------------------------------------------------------------------------------------------------------------- run
def segmenter_callable(path: str | Path | None, network: nn.Module | None,
                       device: torch.device) -> tuple[Segment | None, str]:
    """(segment callable, "") from a trained segmenter checkpoint loaded into `network` (a segmenter_def), or
    (None, reason) where there is none."""
    if not path or not Path(path).is_file():
        return None, f"segmenter checkpoint {path} not found: train it with {segmentation.TRAINED_BY}"
    if network is None:
        return None, "no segmenter network (segmenter_def) given"
    network = segmentation.load_segmenter(path, network, device)
    return (lambda cines: segmentation.segment_cines(network, cines).numpy()), ""


def evaluate(output_dir: str, prepared_dir: str, sets: Mapping[str, str], autoencoder: nn.Module,
             mar: nn.Module, ckpt_dir: str, profile: str, device: torch.device | str, evaluation_dir: str,
             heldout_splits: Sequence[str] = ("validation", "test"), settings: dict | None = None,
             i3d_path: str | None = None, segmenter_path: str | None = None, drop_flagged: bool = True,
             seed: int = 0, segment: Segment | None = None, command: str = "",
             segmenter: nn.Module | None = None) -> dict:
    """Evaluate every generated set of `sets` (name -> generate.json output folder) against the prepared cohort;
    writes metrics.json and report.md into `evaluation_dir` and returns the metrics. `segment` overrides the
    segmenter loaded from `segmenter_path` into `segmenter` (tests)."""
    settings = DEFAULTS | dict(settings or {})
    device, prepared, out_dir = torch.device(device), Path(prepared_dir), Path(evaluation_dir)
    training = split_items(prepared, ["training"])
    stats = read_stats(prepared / "phenotype_stats.json")
    ckpt = Path(ckpt_dir)
    load_weights(autoencoder, ckpt / "autoencoder.pt", f"autoencoder profile {profile!r}",
                 "configs/train_autoencoder.json").eval()
    load_weights(mar, ckpt / "mar.pt", f"MAR profile {profile!r}", "configs/train_mar.json").eval()
    heldout = subset(split_items(prepared, heldout_splits), settings["max_heldout"], seed)
    found = read_sets(sets)
    ok = {k: v for k, v in found.items() if v["status"] == "ok"}
    cines = {k: load_cines(v["dir"], v["items"]) for k, v in ok.items()}
    heldout_cines = load_cines(prepared, heldout)
    means = {k: fidelity.latent_means(autoencoder, x, settings["batch_size"], device)
             for k, x in {HELDOUT: heldout_cines, **cines}.items()}
    logger.info("evaluation: %d held-out and %d training cines; sets %s", len(heldout), len(training),
                {k: v["status"] for k, v in found.items()})
    if segment is None:
        segment, reason = segmenter_callable(segmenter_path, segmenter, device)
    else:
        reason = ""
    metrics = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "command": command,
        "device": device_name(device), "output_dir": str(output_dir), "seed": seed, "settings": settings,
        "heldout": {"splits": list(heldout_splits), "n": len(heldout)}, "n_training": len(training),
        "sets": {k: {"dir": v["dir"], "status": v["status"], "n": len(v["items"]),
                     "generation_settings": v["record"].get("settings")} for k, v in found.items()},
        "fidelity": fidelity_section(heldout_cines, cines, means, settings, i3d_path, seed, device)
        if len(heldout) >= 2 else {"skipped": f"{len(heldout)} held-out cine(s); need >= 2 for two halves"},
        "adherence": adherence_section(segment, heldout, heldout_cines, prepared, cines, ok, stats, settings, device,
                                       out_dir, reason),
        "privacy": privacy_section(prepared, training, heldout, {HELDOUT: heldout_cines, **cines}, means, ok,
                                   autoencoder, mar, stats, settings, seed, device, out_dir, drop_flagged),
        "speed": speed_section(mar, autoencoder, found, stats, settings, device),
    }
    write_json(out_dir / "metrics.json", metrics)
    write_report(out_dir / "report.md", metrics)
    logger.info("evaluation: metrics.json and report.md written to %s", out_dir)
    return metrics
