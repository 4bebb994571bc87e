"""Phenotype-conditioned cine generation (`configs/generate.json`): conditions -> MAR latents -> decoded cines.
Sample i (G{i:06d}) depends only on its condition and `sample_seed(seed, i)`; outputs are listed in docs/README.md
(with `dicom`, also a DICOM MR series per sample: scripts.data.dicom_export)."""

from __future__ import annotations

import csv
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from scripts.data.cine_files import write_cine
from scripts.data.dicom_export import remove_series, write_dicom_cine
from scripts.data.orientation import canonical_affine
from scripts.data.phenotypes import normalise, read_phenotype_table
from scripts.data.shapes import IMAGE_SIZE, NUM_FRAMES
from scripts.generation.acquisition import add_noise, fit_acquisition
from scripts.generation.phenotype_vae import draw_eids, draw_phenotypes, write_draws
from scripts.runtime.checkpoints import load_weights
from scripts.runtime.cli import as_bool
from scripts.runtime.files import atomic_write, check_disjoint, file_digest, remove_orphans, save_npy, write_json
from scripts.runtime.montage import save_cine_gif, save_montage
from scripts.runtime.output_dirs import entries, refuse_foreign
from scripts.runtime.precision import autocast, precision_name
from scripts.runtime.progress import track
from scripts.runtime.timing import sync

logger = logging.getLogger(__name__)

SEED_STRIDE = 1_000_003  # prime > any sample count in use: seeds of different base seeds do not collide
FAR_OUT_Z = 5.0
TRAINED_BY = {"phenotype_vae.pt": "configs/train_phenotype_vae.json", "autoencoder.pt": "configs/train_autoencoder.json",
              "mar.pt": "configs/train_mar.json"}
MONTAGE_FRAMES = (0, 20)  # end-diastole and about end-systole
CHECKPOINTS_KEY = "checkpoint_sha256"  # generation.json settings: checkpoint name -> SHA-256 of the file loaded


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
def warn_far_out(source: str | Path, eids: list[str], values: np.ndarray, stats: dict) -> None:
    """Log the rows more than FAR_OUT_Z training standard deviations from the training mean in any column: they are
    generated, but the model extrapolates there and adherence to the condition is not expected."""
    z = np.abs(normalise(values, stats))
    far = {e: [c for c, v in zip(stats["columns"], row) if v > FAR_OUT_Z] for e, row in zip(eids, z)}
    far = {e: cols for e, cols in far.items() if cols}
    if far:
        logger.warning("%s: %d row(s) lie beyond |z| > %g of the training range (the model extrapolates; adherence is "
                       "not expected): %s", source, len(far), FAR_OUT_Z, far)


def read_conditions(path: str | Path, stats: dict, num_samples: int) -> tuple[list[str], np.ndarray]:
    """(eids, (N, F) physical values) of the first `num_samples` rows of a phenotype CSV holding every stats column.
    Bad columns or cells raise PhenotypeTableError (a ValueError); far-out rows are logged (`warn_far_out`)."""
    _, table = read_phenotype_table(path, stats["columns"])
    eids = list(table)[:num_samples]
    values = np.array([[table[e][c] for c in stats["columns"]] for e in eids], dtype=np.float64)  # (N, F)
    warn_far_out(path, eids, values, stats)
    return eids, values


def choose_conditions(stats: dict, output_dir: Path, num_samples: int, seed: int, unconditional: bool,
                      conditions_csv: str | None, phenotype_vae: nn.Module, vae_checkpoint: Path) -> np.ndarray | None:
    """(N, F) physical condition values, or None for `unconditional`; with `conditions_csv`, N = min(rows,
    num_samples), else num_samples draws of the phenotype VAE (seeded by `seed`, recorded in conditions.csv)."""
    if unconditional:
        return None
    if conditions_csv:
        return read_conditions(conditions_csv, stats, num_samples)[1]
    values = draw_phenotypes(phenotype_vae, vae_checkpoint, stats, num_samples, seed)
    path = write_draws(output_dir / "conditions.csv", values, stats, stats["columns"])
    warn_far_out(path, draw_eids(len(values)), values, stats)
    return values


# ------------------------------------------------------------------------------------------------------------- output
def sample_affine(geometry: np.ndarray) -> np.ndarray:
    """NIfTI (RAS) affine of a sample with (3+,) pixel x, y (mm), ...: the canonical orientation (X toward L, Y toward
    P, as the prepared arrays' H, W), origin 0; slice thickness = pixel x (the prepared folder records none)."""
    return canonical_affine(geometry[:2], geometry[0])


def description(profile: str, seed: int) -> str:
    """What a generated file says it is: NIfTI descrip (80 bytes at most) and DICOM SeriesDescription (64)."""
    return f"CPGG synthetic cine, {profile}, seed {seed}"


def paths(output_dir: Path, index: int) -> tuple[Path, Path]:
    name = sample_name(index)
    return output_dir / "images" / f"{name}.npy", output_dir / "nifti" / f"{name}.nii.gz"


def is_done(output_dir: Path, index: int) -> bool:
    """Both files of a sample exist (they are written atomically, so never half-written)."""
    return all(p.is_file() for p in paths(output_dir, index))


def write_index(output_dir: Path, n: int, seed: int, columns: list[str], values: np.ndarray | None,
                geometry: np.ndarray, montage_samples: int) -> int:
    """Rewrite manifest.csv, datalist.json and the montages over the samples 0..n-1 on disk; returns how many.
    `geometry` (n, 4): pixel x, y (mm), frame interval (s), noise sd."""
    with (output_dir / ".index.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # every rank calls this when done: the last one to lock sees every sample
        done = [i for i in range(n) if is_done(output_dir, i)]
        rows, items = [], []
        for i in done:
            npy, nii = (p.relative_to(output_dir).as_posix() for p in paths(output_dir, i))
            cond = dict(zip(columns, values[i].tolist())) if values is not None else dict.fromkeys(columns)
            rows.append([npy, nii, sample_seed(seed, i), *("" if v is None else repr(v) for v in cond.values())])
            items.append({"image": npy, "subject": sample_name(i), "synthetic": True, "has_phenotypes": values is not
                          None, **cond, "spacing_mm": geometry[i, :2].tolist(),
                          "frame_interval_s": float(geometry[i, 2]), "noise_sd": float(geometry[i, 3])})
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
@dataclass(frozen=True)
class Sampling:
    """How MAR samples latents (keywords of MAR.sample_latents), recorded in generation.json's settings."""

    cfg: float = 3.0
    cfg_schedule: str = "linear"
    temperature: float = 1.0
    num_iter: int = 16
    num_inference_steps: int = 100


def required_checkpoints(ckpt_dir: str | Path, needs_vae: bool) -> dict[str, Path]:
    """name -> path of the checkpoints this run loads (the phenotype VAE only when `needs_vae`), each checked."""
    names = ["autoencoder.pt", "mar.pt"] + (["phenotype_vae.pt"] if needs_vae else [])
    return {n: require_checkpoint(Path(ckpt_dir) / n) for n in names}


def setting_changes(old: dict, new: dict) -> list[str]:
    """How `new` settings differ from the `old` ones of generation.json: each checkpoint whose SHA-256 changed, by
    name, then each other setting (a checkpoint `old` does not record is not compared)."""
    digests = old.get(CHECKPOINTS_KEY) or {}
    remade = [f"{name} changed (SHA-256 {digests[name][:12]}... then, {digest[:12]}... now)"
              for name, digest in new[CHECKPOINTS_KEY].items() if digests.get(name, digest) != digest]
    return remade + [f"{k} {old.get(k)!r} then, {v!r} now" for k, v in new.items()
                     if k != CHECKPOINTS_KEY and old.get(k) != v]


def check_settings(output_dir: Path, settings: dict) -> None:
    """ValueError naming what differs where generation.json records other `settings` or checkpoints (samples already
    there would not match new ones)."""
    path = output_dir / "generation.json"
    old = json.loads(path.read_text(encoding="utf-8")).get("settings", {})
    if CHECKPOINTS_KEY not in old:
        logger.warning("%s records no checkpoint digests (an earlier version): unchanged checkpoints assumed", path)
    changes = setting_changes(old, settings)
    if changes:
        raise ValueError(f"{output_dir} holds samples generated with other settings or checkpoints "
                         f"({'; '.join(changes)}): rerun with the same ones, give another --output_dir, or "
                         "--overwrite True to generate every sample again")


def check_output_dir(output_dir: Path, settings: dict, overwrite: bool) -> None:
    """Refuse (ValueError) a non-empty `output_dir` that generate did not make (no generation.json) or made with
    other settings or checkpoints (`check_settings`), unless `overwrite`."""
    if overwrite:
        return
    if (output_dir / "generation.json").is_file():
        check_settings(output_dir, settings)
    else:
        refuse_foreign(output_dir, "generate", entries(output_dir), "no generation.json", overwrite=False)


def remove_samples(output_dir: Path, indices: range) -> None:
    """Delete the files (.npy, NIfTI, DICOM series) of the samples `indices` that exist: --overwrite generates them
    again, and none of them may pass for a finished sample of the new settings if the run is killed."""
    for i in indices:
        for path in paths(output_dir, i):
            path.unlink(missing_ok=True)
        remove_series(output_dir / "dicom" / sample_name(i))


def shard(output_dir: Path, n: int) -> tuple[int, int, list[int]]:
    """(rank, world size, this rank's samples i % world == rank of 0..n-1 not yet on disk)."""
    rank, world = rank_world()
    todo = [i for i in range(rank, n, world) if not is_done(output_dir, i)]
    logger.info("rank %d/%d: %d of its %d samples to generate into %s", rank, world, len(todo),
                len(range(rank, n, world)), output_dir)
    return rank, world, todo


def write_sample(output_dir: Path, index: int, cine: np.ndarray, geometry: np.ndarray, profile: str, seed: int
                 ) -> None:
    """Sample `index` ((1, T, H, W)) as .npy and as NIfTI X=H, Y=W with its (3+,) pixel x, y (mm) and frame interval
    (s) and its sample `seed` in the description; a DICOM series of an earlier draw of the sample is removed."""
    npy, nii = paths(output_dir, index)
    remove_series(output_dir / "dicom" / sample_name(index))  # stale: write_missing_dicom makes it again
    save_npy(npy, cine)
    write_cine(nii, cine[0].astype(np.float32).transpose(1, 2, 0), sample_affine(geometry), float(geometry[2]),
               description(profile, seed))


def write_missing_dicom(output_dir: Path, indices: range, geometry: np.ndarray, profile: str, seed: int) -> int:
    """DICOM series dicom/<sample>/ of the finished samples among `indices` that have none yet, from their .npy (so a
    resumed run, or a first run with dicom on an existing folder, finishes them); returns how many were written."""
    folder = output_dir / "dicom"
    remove_orphans(folder)  # unfinished series of a killed run
    missing = [i for i in indices if is_done(output_dir, i) and not (folder / sample_name(i)).is_dir()]
    for i in track(missing, "DICOM series"):
        cine = np.load(paths(output_dir, i)[0])[0].astype(np.float32).transpose(1, 2, 0)  # (X, Y, T)
        write_dicom_cine(folder / sample_name(i), cine, sample_affine(geometry[i]), float(geometry[i, 2]),
                         description(profile, sample_seed(seed, i)), sample_name(i))
    return len(missing)


def generate_batches(mar: nn.Module, autoencoder: nn.Module, todo: list[int], cond: torch.Tensor | None, seed: int,
                     sampling: Sampling, batch_size: int, write: Callable[[int, np.ndarray], None],
                     amp: bool = False) -> tuple[float, float]:
    """Sample and decode the `todo` samples in batches (bf16 autocast if `amp`), passing each cine to
    write(index, cine); returns the (sampling, decoding) seconds. `cond`: (N, F) normalised conditions, or None."""
    device = next(mar.parameters()).device
    t_sample = t_decode = 0.0
    batches = [todo[b:b + batch_size] for b in range(0, len(todo), batch_size)]
    for batch in track(batches, f"generating {len(todo)} samples, batches"):
        t0 = time.perf_counter()
        with autocast(device, amp):
            latents = mar.sample_latents(None if cond is None else cond[batch].to(device),
                                         seeds=[sample_seed(seed, i) for i in batch], **asdict(sampling)).float()
        sync(device)  # (B, 16, 25, 12, 12) latents
        t1 = time.perf_counter()
        with torch.no_grad(), autocast(device, amp):
            cines = autoencoder.decode(latents).float().clamp(0.0, 1.0).cpu().numpy().astype(np.float16)
        t_sample, t_decode = t_sample + t1 - t0, t_decode + time.perf_counter() - t1
        for i, cine in zip(batch, cines):
            write(i, cine)
    if todo:
        logger.info("%d generated: %.2f s/clip sampling, %.2f s/clip decoding", len(todo), t_sample / len(todo),
                    t_decode / len(todo))
    return t_sample, t_decode


def finish_index(output_dir: Path, n: int, seed: int, columns: list[str], values: np.ndarray | None,
                 geometry: np.ndarray, montage_samples: int) -> None:
    """After every rank's samples (a barrier where torch.distributed runs), rank 0, or each rank under torchrun
    without a process group, rebuilds the index (`write_index`, under its lock)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed:
        torch.distributed.barrier()
    if distributed and torch.distributed.get_rank() != 0:
        return
    listed = write_index(output_dir, n, seed, columns, values, geometry, montage_samples)
    log = logger.info if listed == n else logger.warning
    log("index lists %d of %d samples%s", listed, n, "" if listed == n else " (other ranks still running?)")


def generate(phenotype_vae: nn.Module, autoencoder: nn.Module, mar: nn.Module, ckpt_dir: str, output_dir: str,
             prepared_dir: str, stats: dict, profile: str, num_samples: int = 64, seed: int = 0, batch_size: int = 8,
             conditions_csv: str | None = None, unconditional: bool = False, sampling: Sampling = Sampling(),
             montage_samples: int = 8, amp: bool = False, acquisition_noise: bool = True, dicom: bool = False,
             overwrite: bool | str = False) -> dict:
    """Generate this rank's missing samples of 0..N-1 (i % world == rank) with `stats` (read once by the config),
    then rebuild the index (bf16 autocast if `amp`); returns the generation.json record (conditions: none,
    `conditions_csv` or VAE draws). `acquisition_noise`: Rician noise at a training cine's level, drawn per sample;
    `dicom`: also a DICOM series of each of this rank's samples that has none (write_missing_dicom); `overwrite`:
    into any folder, this rank's samples generated again (`check_output_dir`, `remove_samples`)."""
    start, output_dir = time.perf_counter(), Path(output_dir)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    check_disjoint({"--prepared_dir": prepared_dir, "--ckpt_dir": ckpt_dir, "--conditions_csv": conditions_csv},
                   {"--output_dir": output_dir})
    ckpts = required_checkpoints(ckpt_dir, not (unconditional or conditions_csv))
    acquisition = fit_acquisition(prepared_dir, stats, noise=acquisition_noise)
    source = "unconditional" if unconditional else str(conditions_csv) if conditions_csv else "phenotype_vae"
    settings = {"profile": profile, "seed": seed, "seed_formula": f"seed * {SEED_STRIDE} + index", **asdict(sampling),
                "conditions": source, "precision": precision_name(amp), "acquisition_noise": acquisition_noise,
                CHECKPOINTS_KEY: {name: file_digest(path) for name, path in ckpts.items()}}
    overwrite = as_bool(overwrite, "overwrite")
    check_output_dir(output_dir, settings, overwrite)
    for folder in (output_dir, output_dir / "images", output_dir / "nifti"):
        remove_orphans(folder)  # unfinished writes of a killed run
    if overwrite:
        rank, world = rank_world()
        remove_samples(output_dir, range(rank, num_samples, world))  # num_samples >= the samples of any source
    write_json(output_dir / "generation.json", {"settings": settings})  # before any other file: marks the folder
    values = choose_conditions(stats, output_dir, num_samples, seed, unconditional, conditions_csv, phenotype_vae,
                               Path(ckpt_dir) / "phenotype_vae.pt")  # (N, F) physical, or None
    write_json(output_dir / "phenotype_stats.json", stats)
    n = len(values) if values is not None else num_samples
    seeds = [sample_seed(seed, i) for i in range(n)]
    noise = acquisition.noise_levels(seeds)  # zeros without acquisition_noise
    geometry = np.hstack([acquisition.predict(values, n), noise[:, None]])  # (n, 4) pixel x, y, interval, noise sd
    load_weights(autoencoder, ckpts["autoencoder.pt"], f"autoencoder profile {profile!r}").eval()
    load_weights(mar, ckpts["mar.pt"], f"MAR profile {profile!r}").eval()
    rank, world, todo = shard(output_dir, n)
    cond = None if values is None else torch.as_tensor(normalise(values, stats), dtype=torch.float32)  # (N, F)
    t_sample, t_decode = generate_batches(mar, autoencoder, todo, cond, seed, sampling, batch_size,
                                          lambda i, cine: write_sample(output_dir, i, add_noise(cine, noise[i], seeds[i]),
                                                                       geometry[i], profile, seeds[i]), amp)
    exported = write_missing_dicom(output_dir, range(rank, n, world), geometry, profile, seed) if dicom else 0
    finish_index(output_dir, n, seed, stats["columns"], values, geometry, montage_samples)
    made = max(len(todo), 1)
    record = {"settings": settings, "num_samples": n, "rank": rank, "world_size": world,
              "device": str(next(mar.parameters()).device), "checkpoints": [str(p) for p in ckpts.values()],
              "geometry": acquisition.record(), "generated_this_run": len(todo), "time_s": time.perf_counter() - start,
              "sampling_s_per_clip": t_sample / made, "decoding_s_per_clip": t_decode / made,
              "dicom_series_this_run": exported}
    write_json(output_dir / "generation.json", record)
    return record
