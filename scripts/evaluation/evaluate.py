"""Evaluation of generated cines (`configs/evaluate_generation.json`): fidelity, adherence, privacy and speed, each
beside its real-vs-real floor, seeded; outputs and protocol in docs/evaluation.md."""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from scripts.data.cohort import load_cines, phenotype_matrix
from scripts.data.phenotypes import normalise
from scripts.evaluation import fidelity, privacy
from scripts.evaluation.adherence import adherence_section, segmenter_callable
from scripts.evaluation.protocol import (
    HELDOUT,
    RECONSTRUCTION,
    Inputs,
    Loaded,
    Networks,
    Protocol,
    load,
    subset,
    value_rows,
)
from scripts.evaluation.report import write_report
from scripts.generation import membership
from scripts.generation.generate import sample_seed
from scripts.runtime.checkpoints import load_weights
from scripts.runtime.files import write_json
from scripts.runtime.progress import track
from scripts.runtime.timing import device_name, peak_memory, timed

logger = logging.getLogger(__name__)


# -------------------------------------------------------------------------------------------------------------- speed
def measure_speed(mar: nn.Module, autoencoder: nn.Module, settings: dict, conditions: torch.Tensor | None,
                  clips: int, device: torch.device) -> dict:
    """Seconds per clip and peak memory of latent sampling and of decoding `clips` clips with a set's generation
    settings (generation.json "settings"); conditions (clips, F) normalised, or None (unconditional)."""
    kwargs = {k: settings[k] for k in ("cfg", "cfg_schedule", "temperature", "num_iter", "num_inference_steps")}
    load_average = os.getloadavg()[0]  # a busy shared machine slows every phase: recorded beside the timings
    seeds = [sample_seed(int(settings.get("seed", 0)), i) for i in range(clips)]
    with peak_memory(device) as mem_sample:
        t_sample, latents = timed(lambda: mar.sample_latents(conditions, seeds=seeds, **kwargs), device)
    with peak_memory(device) as mem_decode, torch.no_grad():
        t_decode, _ = timed(lambda: autoencoder.decode(latents), device)
    return {"clips": clips, "sampling_s_per_clip": t_sample / clips, "decoding_s_per_clip": t_decode / clips,
            "sampling_peak_bytes": mem_sample["peak"], "decoding_peak_bytes": mem_decode["peak"],
            "memory_method": mem_sample["method"], "device": str(device), "device_name": device_name(device),
            "load_average_1min": load_average, "cpu_count": os.cpu_count()}


# ---------------------------------------------------------------------------------------------------------- sections
def fidelity_section(data: Loaded, autoencoder: nn.Module, protocol: Protocol, inputs: Inputs, seed: int,
                     device: torch.device) -> dict:
    """{"fid", "fvd", "vae_fd"} -> set name -> fd_with_floor result (or {"skipped": reason}); FID and FVD also of
    RECONSTRUCTION, half B's cines through the autoencoder (what a generator decoded by it can reach)."""
    heldout, means = data.heldout_cines, data.means
    halves = fidelity.disjoint_halves(len(heldout), seed)
    bs = protocol.batch_size
    recon = fidelity.reconstruct(autoencoder, means[HELDOUT][halves[1]], bs, device,
                                 "evaluation: reconstructing held-out half B") if len(halves[1]) else None
    cines = data.cines | ({RECONSTRUCTION: recon} if recon is not None else {})
    features: dict[str, Callable[[torch.Tensor, str], torch.Tensor]] = {}
    inception = fidelity.load_torchscript(fidelity.inception_path(), device, "Inception-v3")
    features["fid"] = lambda x, desc: fidelity.inception_features(inception, x, protocol.fid_frame_step, bs, device,
                                                                  desc)
    if inputs.i3d_path:
        i3d = fidelity.load_torchscript(inputs.i3d_path, device, "i3d_path", inputs.i3d_sha256)
        features["fvd"] = lambda x, desc: fidelity.i3d_features(i3d, x, bs, device, desc)
    out = {}
    for metric, extract in features.items():
        logger.info("evaluation: %s features of %d held-out and %d set(s)", metric, len(heldout), len(cines))
        real = extract(heldout, f"evaluation: {metric} features of {HELDOUT}")  # the first n <= half of each set enter
        out[metric] = {name: fidelity.fd_with_floor(real, extract(x[:len(halves[0])],
                                                                  f"evaluation: {metric} features of {name}"), halves)
                       for name, x in cines.items()}
    if not inputs.i3d_path:
        out["fvd"] = {name: {"skipped": "no I3D TorchScript file given (i3d_path null): FVD not computed"}
                      for name in cines}
    out["vae_fd"] = {name: fidelity.fd_with_floor(fidelity.pool_latents(means[HELDOUT]), fidelity.pool_latents(m),
                                                  halves) for name, m in means.items() if name != HELDOUT}
    return out


def training_pass(data: Loaded, networks: Networks, queries: Mapping[str, torch.Tensor],
                  phenotypes: Mapping[str, np.ndarray], protocol: Protocol,
                  seed: int) -> tuple[dict, torch.Tensor, np.ndarray]:
    """One pass over the training cines in chunks: (pixel nearest neighbours of every query set, (N, D) pooled
    latent embeddings, (M,) MAR losses of the training subjects with phenotypes)."""
    items = data.training
    nearest = privacy.NearestNeighbours({k: privacy.pixel_rows(v) for k, v in queries.items()})
    embeddings, losses = [], []
    chunk = max(protocol.batch_size, 32)
    for start in track(range(0, len(items), chunk), "evaluation: training pass (chunks of training cines)"):
        part = items[start:start + chunk]
        cines = load_cines(data.prepared, part)
        nearest.update(privacy.pixel_rows(cines, variants=True))
        means = fidelity.latent_means(networks.autoencoder, cines, protocol.batch_size, networks.device)
        embeddings.append(fidelity.pool_latents(means))
        with_phen = [i for i, d in enumerate(part) if d["subject"] in phenotypes]
        if with_phen:
            cond = torch.as_tensor(np.stack([phenotypes[part[i]["subject"]] for i in with_phen]), dtype=torch.float32)
            losses.append(membership.mar_losses(networks.mar, means[with_phen], cond, protocol.mia_draws, seed))
    return nearest.result(), torch.cat(embeddings), np.concatenate(losses) if losses else np.zeros(0)


def condition_table(items: Sequence[dict], stats: dict) -> dict[str, np.ndarray]:
    """subject -> normalised phenotype vector, for items with every stats column."""
    return {d["subject"]: row for d, row in zip(items, phenotype_matrix(items, stats)) if np.isfinite(row).all()}


def privacy_section(data: Loaded, networks: Networks, protocol: Protocol, seed: int, evaluation_dir: Path,
                    drop: bool) -> dict:
    """Copy audit of every set (the held-out set as its floor), closest-pair images, private datalists (where
    `drop`) and the membership-inference result."""
    training, heldout, means, sets = data.training, data.heldout, data.means, data.sets
    if not (training and heldout):
        return {"skipped": f"{len(training)} training and {len(heldout)} held-out cines: the audit needs both"}
    cines = {HELDOUT: data.heldout_cines, **data.cines}
    members = subset(training, protocol.mia_max_subjects, seed)  # training subjects of the MIA
    train_cond, held_cond = condition_table(members, data.stats), condition_table(heldout, data.stats)
    pixel, train_emb, train_loss = training_pass(data, networks, cines, train_cond, protocol, seed)
    emb = privacy.NearestNeighbours({k: privacy.unit_rows(privacy.zscore(fidelity.pool_latents(m), train_emb))
                                     for k, m in means.items()})
    emb.update(privacy.unit_rows(privacy.zscore(train_emb, train_emb)))
    subjects = {HELDOUT: [d["subject"] for d in heldout]} | {k: [d["subject"] for d in sets[k]["items"]]
                                                              for k in cines if k != HELDOUT}
    audit = privacy.copy_audit({"pixel": pixel, "embedding": emb.result()}, subjects, HELDOUT,
                               [d["subject"] for d in training],
                               protocol.privacy_quantile)
    for name in subjects:
        if name == HELDOUT:
            continue
        image = privacy.closest_pairs_image(audit["sets"][name], cines[name],
                                            lambda i: np.load(data.prepared / training[i]["image"]),
                                            evaluation_dir / f"closest_pairs_{name}.png", protocol.closest_pairs)
        audit["sets"][name]["closest_pairs_image"] = image.name if image else None
        privacy.record_audit(sets[name]["dir"], audit["sets"][name]["flagged"], subjects[name], audit, evaluation_dir)
        if drop:
            out = privacy.drop_flagged(Path(sets[name]["dir"]) / "datalist.json", audit["sets"][name]["flagged"],
                                       evaluation_dir / f"{name}_datalist_private.json", audit)
            audit["sets"][name]["private_datalist"] = out.name
    held = [i for i, d in enumerate(heldout) if d["subject"] in held_cond]
    cond = torch.as_tensor(np.stack([held_cond[heldout[i]["subject"]] for i in held]), dtype=torch.float32) \
        if held else torch.zeros(0, len(data.stats["columns"]))
    held_loss = membership.mar_losses(networks.mar, means[HELDOUT][held], cond, protocol.mia_draws, seed,
                                   "evaluation: MAR losses of the held-out cines")
    audit["membership_inference"] = membership.membership_inference(train_loss, held_loss,
                                                                 protocol.mia_permutations, seed)
    return audit


def speed_section(data: Loaded, networks: Networks, speed_clips: int) -> dict:
    """Per set: the generation run's own timings (generation.json) and a timed batch of `speed_clips` clips here."""
    out = {}
    for name, s in track(data.found.items(), "evaluation: speed per set"):
        record = s["record"]
        if s["status"] != "ok" or "settings" not in record:
            out[name] = {"skipped": f"set {s['status']}" if s["status"] != "ok" else "no generation.json"}
            continue
        clips = min(speed_clips, len(s["items"]))
        rows = value_rows(s["items"][:clips], data.stats["columns"])
        cond = torch.as_tensor(normalise(rows, data.stats), dtype=torch.float32, device=networks.device) \
            if np.isfinite(rows).all() else None
        out[name] = {"generation_run": {k: record.get(k) for k in ("sampling_s_per_clip", "decoding_s_per_clip",
                                                                     "device", "generated_this_run")},
                     "measured": measure_speed(networks.mar, networks.autoencoder, record["settings"], cond, clips,
                                               networks.device)}
    return out


# ---------------------------------------------------------------------------------------------------------------- run
def evaluate(inputs: Inputs, networks: Networks, protocol: Protocol, seed: int = 0,
             drop_flagged: bool = True, command: str = "") -> dict:
    """Evaluate every generated set of `inputs` against the prepared cohort with the checkpoints of
    `inputs.ckpt_dir`; writes metrics.json and report.md into `inputs.evaluation_dir` and returns the metrics."""
    device, out_dir, ckpt = networks.device, Path(inputs.evaluation_dir), Path(inputs.ckpt_dir)
    load_weights(networks.autoencoder, ckpt / "autoencoder.pt", f"autoencoder profile {inputs.profile!r}",
                 "configs/train_autoencoder.json").eval()
    load_weights(networks.mar, ckpt / "mar.pt", f"MAR profile {inputs.profile!r}", "configs/train_mar.json").eval()
    data = load(inputs, networks.autoencoder, protocol, seed, device)
    segment, reason = segmenter_callable(inputs.segmenter_path, networks.segmenter, device)
    heldout = data.heldout
    metrics = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "command": command,
        "device": device_name(device), "output_dir": str(inputs.output_dir), "seed": seed,
        "settings": asdict(protocol),
        "heldout": {"splits": list(inputs.heldout_splits), "n": len(heldout)}, "n_training": len(data.training),
        "sets": {k: {"dir": v["dir"], "status": v["status"], "n": len(v["items"]),
                     "generation_settings": v["record"].get("settings")} for k, v in data.found.items()},
        "fidelity": fidelity_section(data, networks.autoencoder, protocol, inputs, seed, device)
        if len(heldout) >= 2 else {"skipped": f"{len(heldout)} held-out cine(s); need >= 2 for two halves"},
        "adherence": adherence_section(data, segment, reason, protocol.batch_size, device, out_dir),
        "privacy": privacy_section(data, networks, protocol, seed, out_dir, drop_flagged),
        "speed": speed_section(data, networks, protocol.speed_clips),
    }
    write_json(out_dir / "metrics.json", metrics)
    write_report(out_dir / "report.md", metrics)
    logger.info("evaluation: metrics.json and report.md written to %s", out_dir)
    return metrics
