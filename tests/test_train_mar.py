"""Stage 3 training: the latent cache (encode_latents.json) and MAR training (train_mar.json), wrong profiles."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from monai.inferers import SimpleInferer

from scripts.generation.autoencoder import CineAutoencoderKL
from scripts.generation.latents import latent_dataset, read_latent_stats, scale_factor
from scripts.generation.mar import MAR
from scripts.generation.mar_training import ema_decay, ema_model, mar_eval_step
from tests.conftest import ONE_THREAD, run_bundle, tensorboard_events
from tests.networks import def_kwargs
from tests.stage_runs import COLUMNS, TINY

torch.set_num_threads(1)


def _bundle(config: str, *args: str, expect_failure: bool = False) -> subprocess.CompletedProcess:
    return run_bundle([config, TINY], *args, expect_failure=expect_failure, env=ONE_THREAD, timeout=300)


def test_cache_holds_posteriors_phenotypes_and_scale(mar_runs: dict) -> None:
    stats = read_latent_stats(mar_runs["latents"])
    train = torch.load(mar_runs["latents"] / "training.pt", weights_only=True)
    assert train["mean"].shape == train["logvar"].shape == (9, 16, 25, 12, 12)  # 8 + one without phenotypes
    assert train["subjects"][-1] == "NOPHENOtraining" and torch.isnan(train["phenotypes"][-1]).all()
    assert torch.isfinite(train["phenotypes"][:-1]).all() and train["columns"] == COLUMNS
    assert stats["scale_factor"] == pytest.approx(scale_factor(train["mean"], train["logvar"]))
    assert stats["latent_shape"] == [16, 25, 12, 12] and stats["profile"] == "tiny"
    # the cached moments are the autoencoder's own encoding of the prepared cine
    net = CineAutoencoderKL(**def_kwargs("autoencoder_def", "tiny"))
    net.load_state_dict(torch.load(mar_runs["models"] / "autoencoder.pt", weights_only=True))
    x = torch.from_numpy(np.load(mar_runs["prepared"] / "images" / f"{train['subjects'][0]}.npy").astype(np.float32))
    with torch.no_grad():
        mean = net.eval().encode(x[None])[0][0]
    torch.testing.assert_close(train["mean"][0], mean, atol=1e-5, rtol=1e-4)
    assert len(latent_dataset(mar_runs["latents"], "training")) == 8  # the cine without phenotypes is left out


def test_scale_factor_is_one_over_the_std_of_posterior_draws() -> None:
    g = torch.Generator().manual_seed(0)
    mean = 3.0 * torch.randn(64, 4, 5, 5, generator=g) + 1.0
    logvar = torch.full_like(mean, np.log(4.0))
    draws = mean + 2.0 * torch.randn(mean.shape, generator=g)
    assert scale_factor(mean, logvar) == pytest.approx(1.0 / draws.std().item(), rel=0.03)
    assert 1.0 / scale_factor(mean, logvar) == pytest.approx(np.sqrt(9 + 4), rel=0.05)


def test_training_writes_ema_checkpoint_with_the_scale(mar_runs: dict) -> None:
    stats = read_latent_stats(mar_runs["latents"])
    state = torch.load(mar_runs["models"] / "mar.pt", weights_only=True)
    model = MAR(len(COLUMNS), **def_kwargs("mar_def", "tiny"))
    model.load_state_dict(state)  # a plain MAR state dict (the EMA network)
    assert model.latent_scale.item() == pytest.approx(stats["scale_factor"])
    latest = mar_runs["latest_first"]
    assert set(latest) == {"network", "ema", "optimizer", "lr_scheduler", "best_saver", "budget", "trainer", "data_sha256"}
    assert latest["trainer"]["iteration"] == 8  # 8 latents with phenotypes, batch 2, 2 epochs
    assert latest["ema"]["n_averaged"].item() == 8
    metrics = json.loads((mar_runs["root"] / "out" / "metrics.json").read_text())
    assert metrics["epoch"] == 3 and np.isfinite(metrics["val_loss"])
    events = tensorboard_events(mar_runs["root"] / "out" / "tensorboard")  # both runs: 3 epochs of 4 iterations
    quality = {f"sample_quality/{k}" for k in ("fjd", "fd", "fd_limit", "adherence", "calibration", "membership_auc",
                                                "membership_null_95")}
    assert set(events.Tags()["scalars"]) == {"iteration_loss", "train_loss", "val_loss"} | quality
    assert len(events.Scalars("iteration_loss")) == 12 and [s.step for s in events.Scalars("val_loss")] == [1, 2, 3]
    record = json.loads((mar_runs["root"] / "out" / "sample_quality.json").read_text())
    assert [s.value for s in events.Scalars("sample_quality/adherence")] == pytest.approx(
        [r["adherence"] for r in record["history"]])  # every check, quality_interval 1 in tiny
    assert "1 of 9 cines have no phenotypes" in mar_runs["first"].stderr + mar_runs["first"].stdout


def test_validation_loss_is_seeded() -> None:
    model = MAR(3, **def_kwargs("mar_def", "tiny"))
    batch = {"mean": torch.randn(2, 16, 25, 12, 12), "phenotypes": torch.randn(2, 3)}
    engine = SimpleNamespace(state=SimpleNamespace(device="cpu", iteration=5), network=model, inferer=SimpleInferer(),
                             amp=False)
    first, second = mar_eval_step(engine, batch)["loss"], mar_eval_step(engine, batch)["loss"]
    assert first == second and model.training  # the same draws each time; the mode is restored
    engine.state.iteration = 6
    assert mar_eval_step(engine, batch)["loss"] != first


def test_wrong_profile_checkpoint_is_an_error_naming_the_file(mar_runs: dict, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    latest = mar_runs["latest_first"]
    cpu = MAR(len(COLUMNS), **def_kwargs("mar_def", "cpu")).state_dict()
    torch.save({**latest, "network": cpu}, models / "mar_latest.pt")
    done = _bundle("configs/train_mar.json", "--dataset_dir", str(mar_runs["latents"]), "--ckpt_dir", str(models),
                   "--output_dir", str(tmp_path / "out"), expect_failure=True)
    log = done.stdout + done.stderr
    assert done.returncode != 0
    assert f"{models / 'mar_latest.pt'}: checkpoint does not match MAR of MAR profile 'tiny'" in log


def test_encode_without_autoencoder_names_the_training_config(tmp_path: Path) -> None:
    done = _bundle("configs/encode_latents.json", "--ckpt_dir", str(tmp_path), expect_failure=True)
    assert done.returncode != 0
    assert f"{tmp_path / 'autoencoder.pt'}: checkpoint not found; train it with configs/train_autoencoder.json" in (
        done.stdout + done.stderr)


def test_ema_warms_up_and_forgets_the_initial_weights() -> None:
    """The EMA decay ramps (1 + n) / (10 + n) up to its setting: after 300 steps at decay 0.995 a fixed-decay average
    would still hold 0.995 ** 300 = 22% of the first weights; the warmed-up one holds under 1%."""
    assert ema_decay(0.995, 0) == pytest.approx(0.1) and ema_decay(0.995, 10_000) == 0.995
    network = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(network.weight)
    ema = ema_model(network, 0.995)
    ema.update_parameters(network)  # the first update copies the (zero) weights
    with torch.no_grad():
        network.weight.fill_(1.0)
    for _ in range(300):
        ema.update_parameters(network)
    assert 0.99 < ema.module.weight.item() < 1.0
