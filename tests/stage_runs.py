"""Session fixtures that train a stage twice through `python -m monai.bundle run` (a first run, then a rerun with more
epochs that resumes), once per test session, and the synthetic prepared data they train on."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from scripts.data.phenotypes import fit_normaliser
from scripts.data.prepare import prepare
from scripts.generation.autoencoder import CineAutoencoderKL
from tests.conftest import ONE_THREAD, run_bundle
from tests.networks import def_kwargs
from tests.test_io import synthetic_cine, write_nifti

TINY = "configs/profiles/tiny.json"
COLUMNS = ["LVEDV", "LVESV", "LVSV", "LVEF", "LVCO", "LVM", "RVEDV", "RVESV", "RVSV", "RVEF", "LAV_max", "LAV_min",
           "LASV", "LAEF", "RAV_max", "RAV_min", "RASV", "RAEF", "HR", "WT_septal", "WT_lateral"]


# ------------------------------------------------------------------------------------------------------------- data
def correlated(n: int, f: int, generator: torch.Generator) -> torch.Tensor:
    """(n, f) samples of a fixed correlated Gaussian: 4 shared factors plus independent noise."""
    loadings = torch.randn(f, 4, generator=torch.Generator().manual_seed(1))
    return torch.randn(n, 4, generator=generator) @ loadings.T + 0.3 * torch.randn(n, f, generator=generator)


def write_phenotype_prepared(folder: Path, n_train: int = 60, n_val: int = 20, n_test: int = 10) -> dict:
    """A prepared folder with only what the VAE reads: datalist.json (plus items without phenotypes) and stats."""
    n = n_train + n_val + n_test
    values = correlated(n, len(COLUMNS), torch.Generator().manual_seed(0)).numpy()
    values = values * np.linspace(2, 20, len(COLUMNS)) + np.linspace(50, 150, len(COLUMNS))
    subjects = [f"PH{i:06d}" for i in range(n)]
    table = {s: dict(zip(COLUMNS, map(float, v))) for s, v in zip(subjects, values)}

    def item(s: str) -> dict:
        return {"image": f"images/{s}.npy", "subject": s, "has_phenotypes": s in table,
                **{c: table[s][c] if s in table else None for c in COLUMNS}}

    split = {"training": subjects[:n_train], "validation": subjects[n_train:n_train + n_val],
             "test": subjects[n_train + n_val:]}
    datalist = {k: [item(s) for s in v] + [item(f"NOPHENO{k}")] for k, v in split.items()}
    datalist["phenotype_columns"] = COLUMNS
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "datalist.json").write_text(json.dumps(datalist))
    (folder / "phenotype_stats.json").write_text(json.dumps(fit_normaliser(table, split["training"], COLUMNS)))
    return table


def blob_cine(rng: np.random.Generator, frames: int = 50, size: int = 96) -> np.ndarray:
    """(1, T, H, W) float16 in [0, 1]: a bright Gaussian blob moving and pulsing over a dim background."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    cy, cx, r = rng.uniform(30, 66, 2).tolist() + [rng.uniform(8, 14)]
    t = np.arange(frames, dtype=np.float32)[:, None, None]
    phase = np.sin(2 * np.pi * t / frames)
    dist2 = (yy - cy - 6 * phase) ** 2 + (xx - cx) ** 2
    cine = 0.1 + 0.8 * np.exp(-dist2 / (2 * (r * (1 - 0.3 * phase)) ** 2))
    return cine[None].astype(np.float16)


def write_cine_prepared(folder: Path, n_train: int = 4, n_val: int = 2) -> Path:
    """A prepared folder with what the autoencoder reads: datalist.json and images/*.npy of blob cines."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    datalist: dict[str, list[dict]] = {"training": [], "validation": [], "test": []}
    for i in range(n_train + n_val):
        subject = f"AE{i:04d}"
        np.save(folder / "images" / f"{subject}.npy", blob_cine(rng))
        split = "training" if i < n_train else "validation"
        datalist[split].append({"image": f"images/{subject}.npy", "subject": subject, "has_phenotypes": False,
                                "LVEDV": None})
    (folder / "datalist.json").write_text(json.dumps(datalist))
    return folder


@pytest.fixture(scope="session")
def segmenter_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 synthetic subjects (5 moving ellipses, scripts' test cine) in UK Biobank layout."""
    root = tmp_path_factory.mktemp("segcohort")
    for n in range(8):
        image, label = synthetic_cine(25, 0, (60.0 - n, 50.0 + n), seed=n)
        write_nifti(root / f"s{n}" / "la_4ch.nii.gz", image, dt=0.036)
        write_nifti(root / f"s{n}" / "seg4_la_4ch.nii.gz", label.astype(np.float32), dt=0.036)
    return root


@pytest.fixture(scope="session")
def segmenter_prepared(segmenter_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """segmenter_cohort prepared (6 / 1 / 1 subjects)."""
    return prepared_folder(segmenter_cohort, tmp_path_factory.mktemp("segprepared"))


def prepared_folder(cohort: Path, out: Path) -> Path:
    """`cohort` prepared into `out` in this process (no workers); returns `out`."""
    prepare(cohort, out, num_workers=0)
    return out


# ------------------------------------------------------------------------------------------------------ stage runs
@pytest.fixture(scope="session")
def phenotype_vae_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Train 2 epochs, resume to 4 epochs, then sample, all through `python -m monai.bundle run`."""
    root = tmp_path_factory.mktemp("pvae")
    table = write_phenotype_prepared(root / "prepared")
    models = ["--ckpt_dir", str(root / "models")]
    common = ["--dataset_dir", str(root / "prepared"), *models]
    start = time.perf_counter()
    first = run_bundle("configs/train_phenotype_vae.json", *common, "--output_dir", str(root / "out2"),
                       "--num_epochs", "2", timeout=300)
    seconds = time.perf_counter() - start
    print(f"CLI training run (2 epochs, 60 vectors, process start included): {seconds:.1f} s")
    latest_after_first = torch.load(root / "models" / "phenotype_vae_latest.pt", weights_only=True)
    second = run_bundle("configs/train_phenotype_vae.json", *common, "--output_dir", str(root / "out4"),
                        "--num_epochs", "4", timeout=300)
    run_bundle("configs/sample_phenotypes.json", "--prepared_dir", str(root / "prepared"), *models, "--output_dir",
               str(root / "out4"), "--num_samples", "300",
               "--seed", "7", timeout=300)
    return {"root": root, "table": table, "first": first, "second": second, "latest_after_first": latest_after_first}


@pytest.fixture(scope="session")
def autoencoder_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Tiny profile: train 2 epochs, then resume to 3, through `python -m monai.bundle run`."""
    root = tmp_path_factory.mktemp("ae")
    prepared = write_cine_prepared(root / "prepared")
    common = ["--dataset_dir", str(prepared), "--ckpt_dir", str(root / "models"), "--output_dir", str(root / "out")]
    configs = ["configs/train_autoencoder.json", TINY]
    start = time.perf_counter()
    first = run_bundle(configs, *common, env=ONE_THREAD, timeout=300)
    print(f"tiny CLI run (2 epochs, 4 training cines, process start included): {time.perf_counter() - start:.1f} s")
    metrics_first = json.loads((root / "out" / "metrics.json").read_text())
    print(f"tiny run validation: {metrics_first}")
    latest_first = torch.load(root / "models" / "autoencoder_latest.pt", weights_only=True)
    second = run_bundle(configs, *common, "--autoencoder#num_epochs", "3", env=ONE_THREAD, timeout=300)
    return {"root": root, "common": common, "first": first, "second": second, "metrics_first": metrics_first,
            "latest_first": latest_first}


@pytest.fixture(scope="session")
def mar_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 8/4/2-cine prepared cohort (plus one cine per split without phenotypes), a tiny autoencoder, its latent
    cache, 2 epochs of tiny MAR training and a resumed third epoch, all through `python -m monai.bundle run`."""
    root = tmp_path_factory.mktemp("mar")
    prepared = root / "prepared"
    write_phenotype_prepared(prepared, n_train=8, n_val=4, n_test=2)
    rng = np.random.default_rng(0)
    (prepared / "images").mkdir()
    for items in json.loads((prepared / "datalist.json").read_text()).values():
        for d in items if isinstance(items, list) and items and isinstance(items[0], dict) else []:
            np.save(prepared / d["image"], rng.random((1, 50, 96, 96)).astype(np.float16))
    models = root / "models"
    models.mkdir()
    torch.manual_seed(0)
    torch.save(CineAutoencoderKL(**def_kwargs("autoencoder_def", "tiny")).state_dict(), models / "autoencoder.pt")
    latents = root / "latents"
    encode = run_bundle(["configs/encode_latents.json", TINY], "--prepared_dir", str(prepared), "--latent_dir",
                        str(latents), "--ckpt_dir", str(models), env=ONE_THREAD, timeout=300)
    common = ["--dataset_dir", str(latents), "--ckpt_dir", str(models), "--output_dir", str(root / "out")]
    first = run_bundle(["configs/train_mar.json", TINY], *common, env=ONE_THREAD, timeout=300)
    latest_first = torch.load(models / "mar_latest.pt", weights_only=True)
    second = run_bundle(["configs/train_mar.json", TINY], *common, "--mar#num_epochs", "3", env=ONE_THREAD,
                        timeout=300)
    return {"root": root, "prepared": prepared, "latents": latents, "models": models, "common": common,
            "encode": encode, "first": first, "second": second, "latest_first": latest_first}


@pytest.fixture(scope="session")
def segmenter_runs(segmenter_prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Tiny profile: train 2 epochs, then resume to 3, through `python -m monai.bundle run`."""
    root = tmp_path_factory.mktemp("seg")
    common = ["--dataset_dir", str(segmenter_prepared), "--ckpt_dir", str(root / "models"), "--output_dir",
              str(root / "out")]
    configs = ["configs/train_segmenter.json", TINY]
    start = time.perf_counter()
    first = run_bundle(configs, *common, env=ONE_THREAD, timeout=300)
    print(f"tiny segmenter CLI run (2 epochs, 6 cines, process start included): {time.perf_counter() - start:.1f} s")
    metrics_first = json.loads((root / "out" / "metrics.json").read_text())
    latest_first = torch.load(root / "models" / "segmenter_latest.pt", weights_only=True)
    second = run_bundle(configs, *common, "--segmenter#num_epochs", "3", env=ONE_THREAD, timeout=300)
    return {"root": root, "common": common, "first": first, "second": second, "metrics_first": metrics_first,
            "latest_first": latest_first}
