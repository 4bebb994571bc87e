"""Stage 1 of CPGG, the phenotype VAE: network, loss, learning, the training/sampling configs and bad inputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from ignite.exceptions import NotComputableError
from monai.handlers import CheckpointLoader

from scripts.data.cohort import read_stats
from scripts.generation.losses import VAELoss
from scripts.generation.phenotype_vae import (
    FrechetDistance,
    PhenotypeVAE,
    phenotype_dataset,
    phenotype_vectors,
    sample_phenotypes,
)
from scripts.runtime.checkpoints import LatestCheckpoint
from scripts.runtime.features import frechet_distance
from tests.conftest import tensorboard_events
from tests.stage_runs import COLUMNS, correlated, write_phenotype_prepared


def _read_csv(path: Path) -> tuple[list[str], np.ndarray]:
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], np.array([[float(v) for v in r[1:]] for r in rows[1:]])


# ------------------------------------------------------------------------------------------------------------ network
@pytest.mark.parametrize("features", [21, 82])
def test_shapes(features: int) -> None:
    net = PhenotypeVAE(features)
    recon, mu, logvar = net(torch.randn(8, features))
    assert recon.shape == (8, features) and mu.shape == logvar.shape == (8, 32)
    assert net.decode(torch.randn(3, 32)).shape == (3, features)
    assert net.sample(5, torch.Generator().manual_seed(0)).shape == (5, features) and net.training


def test_authors_size_has_about_a_tenth_of_a_million_parameters() -> None:
    count = sum(p.numel() for p in PhenotypeVAE(82, hidden=(128, 128, 128), latent=32).parameters())
    print(f"PhenotypeVAE(82, 128x3, latent 32): {count} parameters")
    assert 60_000 <= count <= 150_000


def test_sampling_is_seeded_and_eval_mode() -> None:
    net = PhenotypeVAE(21)
    a, b = (net.sample(4, torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(a, b) and not torch.equal(a, net.sample(4, torch.Generator().manual_seed(4)))


def test_loss_pieces() -> None:
    x, mu = torch.randn(6, 21), torch.zeros(6, 32)
    out = VAELoss(beta=0.01)(x, x, mu, torch.zeros(6, 32))
    assert out["recon"] == 0 and out["kl"] == 0 and out["loss"] == 0
    out = VAELoss(beta=0.5)(x + 1, x, mu + 1, torch.zeros(6, 32))
    assert out["recon"].item() == pytest.approx(1.0) and out["kl"].item() == pytest.approx(16.0)
    assert out["loss"].item() == pytest.approx(1.0 + 0.5 * 16.0)


def test_training_learns_a_correlated_gaussian() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    train, held_out = correlated(2000, 21, g), correlated(2000, 21, g)
    mean, std = train.mean(0), train.std(0)
    train, held_out = (train - mean) / std, (held_out - mean) / std
    net, loss_fn = PhenotypeVAE(21), VAELoss(beta=0.01)
    fd_untrained = frechet_distance(net.sample(2000, torch.Generator().manual_seed(0)), held_out)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(300):
        x = train[torch.randint(0, len(train), (64,), generator=g)]
        recon, mu, logvar = net(x)
        loss = loss_fn(recon, x, mu, logvar)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    fd_trained = frechet_distance(net.sample(2000, torch.Generator().manual_seed(0)), held_out)
    print(f"loss {np.mean(losses[:20]):.3f} -> {np.mean(losses[-20:]):.3f}; FD {fd_untrained:.2f} -> {fd_trained:.2f} "
          f"(held-out vs train {frechet_distance(train, held_out):.2f})")
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])
    assert fd_trained * 5 < fd_untrained


# ------------------------------------------------------------------------------------------------------------- data
def test_dataset_keeps_items_with_phenotypes_and_uses_the_training_stats(tmp_path: Path) -> None:
    table = write_phenotype_prepared(tmp_path)
    stats = read_stats(tmp_path / "phenotype_stats.json")
    subjects, x = phenotype_vectors(tmp_path, "validation")
    assert len(subjects) == 20 and "NOPHENOvalidation" not in subjects and x.shape == (20, len(COLUMNS))
    raw = np.array([[table[s][c] for c in COLUMNS] for s in subjects])
    np.testing.assert_allclose(x.numpy() * np.array(stats["std"]) + np.array(stats["mean"]), raw, rtol=1e-5)
    assert abs(x.mean().item()) > 1e-3  # validation vectors are not re-standardised on themselves
    dataset = phenotype_dataset(tmp_path, "training")
    assert len(dataset) == 60 and dataset[0]["phenotypes"].dtype == torch.float32


def test_prepared_folder_errors_name_the_folder(tmp_path: Path) -> None:
    write_phenotype_prepared(tmp_path)
    (tmp_path / "phenotype_stats.json").unlink()
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        phenotype_dataset(tmp_path, "training")
    write_phenotype_prepared(tmp_path)
    datalist = json.loads((tmp_path / "datalist.json").read_text())
    for item in datalist["training"]:
        item["has_phenotypes"] = False
    (tmp_path / "datalist.json").write_text(json.dumps(datalist))
    with pytest.raises(ValueError, match=f"{tmp_path}: 0 training item"):
        phenotype_dataset(tmp_path, "training")
    with pytest.raises(FileNotFoundError, match="no datalist.json"):
        phenotype_dataset(tmp_path / "absent", "training")


# -------------------------------------------------------------------------------------------------------- checkpoints
def test_mismatched_checkpoint_is_an_error_naming_file_and_keys(tmp_path: Path) -> None:
    write_phenotype_prepared(tmp_path)
    other = tmp_path / "other_columns.pt"
    torch.save(PhenotypeVAE(10).state_dict(), other)
    with pytest.raises(ValueError, match=r"other_columns\.pt.*shape mismatch.*encoder\.0\.0\.weight"):
        sample_phenotypes(PhenotypeVAE(len(COLUMNS)), other, tmp_path / "phenotype_stats.json", 5, 0,
                          tmp_path / "s.csv")
    assert not (tmp_path / "s.csv").exists()

    net = PhenotypeVAE(len(COLUMNS))
    latest = tmp_path / "latest.pt"
    torch.save({"network": PhenotypeVAE(10).state_dict(), "trainer": {}}, latest)
    engine = Engine(lambda e, b: None)
    with pytest.raises(ValueError, match=r"latest\.pt.*shape mismatch"):
        LatestCheckpoint(latest, {"network": net}).load(engine)
    with pytest.raises(RuntimeError, match="size mismatch"):  # MONAI's loader with strict_shape, the second guard
        CheckpointLoader(str(latest), {"network": net}, map_location="cpu", strict_shape=True)(engine)


# ------------------------------------------------------------------------------------------------------- bundle CLI
def test_cli_training_writes_checkpoints_and_metrics(phenotype_vae_runs: dict) -> None:
    root = phenotype_vae_runs["root"]
    state = torch.load(root / "models" / "phenotype_vae.pt", weights_only=True)
    assert set(state) == set(PhenotypeVAE(len(COLUMNS)).state_dict())  # the network state dict only
    metrics = json.loads((root / "out2" / "metrics.json").read_text())
    assert metrics["epoch"] == 2 and set(metrics) == {"epoch", "val_frechet", "val_recon_mse"}
    assert np.isfinite(metrics["val_frechet"]) and np.isfinite(metrics["val_recon_mse"])
    log = phenotype_vae_runs["first"].stdout
    assert "train_kl" in log and "Epoch[2] Metrics -- val_frechet" in log
    latest = phenotype_vae_runs["latest_after_first"]
    assert latest["trainer"]["iteration"] == 2  # 60 vectors, batch 64: one step per epoch
    events = tensorboard_events(root / "out2" / "tensorboard")  # no iteration loss: log_every 100 iterations
    assert set(events.Tags()["scalars"]) == {"train_loss", "train_recon_mse", "train_kl", "val_frechet", "val_recon_mse"}
    assert [s.step for s in events.Scalars("val_frechet")] == [1, 2]


def test_cli_samples_are_denormalised_and_reproducible(phenotype_vae_runs: dict) -> None:
    root = phenotype_vae_runs["root"]
    out = root / "out4" / "sampled_phenotypes.csv"
    header, values = _read_csv(out)
    assert header == ["eid", *COLUMNS] and values.shape == (300, len(COLUMNS))
    with out.open() as f:
        assert [r[0] for r in csv.reader(f)][1:3] == ["S000000", "S000001"]
    stats = read_stats(root / "prepared" / "phenotype_stats.json")
    mean, std = np.array(stats["mean"]), np.array(stats["std"])
    assert np.all(np.abs(values.mean(0) - mean) < std) and np.all(values.mean(0) > 40)

    again, other = root / "again.csv", root / "other.csv"
    for path, seed in ((again, 7), (other, 8)):
        sample_phenotypes(PhenotypeVAE(len(COLUMNS)), root / "models" / "phenotype_vae.pt",
                          root / "prepared" / "phenotype_stats.json", 300, seed, path)
    assert again.read_bytes() == out.read_bytes() and other.read_bytes() != out.read_bytes()


def test_frechet_metric_needs_two_vectors() -> None:
    """No vectors or one vector: NotComputableError (Ignite's signal), not a crash in torch.cat."""
    metric = FrechetDistance(PhenotypeVAE(len(COLUMNS)))
    with pytest.raises(NotComputableError):
        metric.compute()
    metric.update((torch.zeros(1, len(COLUMNS)),))
    with pytest.raises(NotComputableError):
        metric.compute()
