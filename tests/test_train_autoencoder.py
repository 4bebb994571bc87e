"""Stage 2 training, the cine autoencoder: GAN iteration, profiles, the training config, resume and wrong profiles."""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.networks.nets import PatchDiscriminator
from PIL import Image

from scripts.generation.autoencoder import CineAutoencoderKL
from scripts.generation.autoencoder_training import AutoencoderGANStep
from scripts.generation.losses import CineReconLoss
from tests.conftest import ONE_THREAD, REPO, run_bundle
from tests.networks import def_kwargs

torch.set_num_threads(1)
CONFIG = "configs/train_autoencoder.json"
PROFILES = ("tiny", "cpu", "paper")


def _blob_cine(rng: np.random.Generator, frames: int = 50, size: int = 96) -> np.ndarray:
    """(1, T, H, W) float16 in [0, 1]: a bright Gaussian blob moving and pulsing over a dim background."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    cy, cx, r = rng.uniform(30, 66, 2).tolist() + [rng.uniform(8, 14)]
    t = np.arange(frames, dtype=np.float32)[:, None, None]
    phase = np.sin(2 * np.pi * t / frames)
    dist2 = (yy - cy - 6 * phase) ** 2 + (xx - cx) ** 2
    cine = 0.1 + 0.8 * np.exp(-dist2 / (2 * (r * (1 - 0.3 * phase)) ** 2))
    return cine[None].astype(np.float16)


def _write_prepared(folder: Path, n_train: int = 4, n_val: int = 2) -> Path:
    """A prepared folder with what the autoencoder reads: datalist.json and images/*.npy."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    datalist: dict[str, list[dict]] = {"training": [], "validation": [], "test": []}
    for i in range(n_train + n_val):
        subject = f"AE{i:04d}"
        np.save(folder / "images" / f"{subject}.npy", _blob_cine(rng))
        split = "training" if i < n_train else "validation"
        datalist[split].append({"image": f"images/{subject}.npy", "subject": subject, "has_phenotypes": False,
                                "LVEDV": None})
    (folder / "datalist.json").write_text(json.dumps(datalist))
    return folder


_bundle = partial(run_bundle, [CONFIG, "configs/profiles/tiny.json"], env=ONE_THREAD, timeout=300)


# ----------------------------------------------------------------------------------------------------- GAN iteration
def _engine(net: torch.nn.Module, iteration: int) -> SimpleNamespace:
    """The attributes of a SupervisedTrainer that AutoencoderGANStep reads."""
    return SimpleNamespace(state=SimpleNamespace(device="cpu", iteration=iteration), non_blocking=False, network=net,
                           loss_function=CineReconLoss(), optimizer=torch.optim.AdamW(net.parameters(), 8e-4),
                           optim_set_to_none=False, amp=False)


def _grads(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


@pytest.mark.parametrize("iteration", [4, 5])
def test_gan_step_trains_both_networks_from_gan_start_step(iteration: int) -> None:
    torch.manual_seed(0)
    net = CineAutoencoderKL(**def_kwargs("autoencoder_def", "tiny"))
    disc = PatchDiscriminator(spatial_dims=3, channels=8, in_channels=1, num_layers_d=2)
    step = AutoencoderGANStep(disc, torch.optim.AdamW(disc.parameters(), 8e-4), gan_start_step=5)
    x = torch.rand(2, 1, 20, 32, 32)
    before = [p.detach().clone() for p in disc.parameters()]
    out = step(_engine(net, iteration), {"image": x})
    assert _grads(net) > 0
    if iteration < 5:  # before gan_start_step: reconstruction and KL only, the discriminator untouched
        assert set(out) == {"loss", "nll", "l1", "perceptual", "kl"} and _grads(disc) == 0
        assert all(torch.equal(a, b) for a, b in zip(before, disc.parameters()))
        return
    assert np.isfinite(out["d_weight"]) and out["d_weight"] > 0 and np.isfinite(out["d_loss"])
    assert _grads(disc) > 0 and not all(torch.equal(a, b) for a, b in zip(before, disc.parameters()))


def test_generator_gets_the_adversarial_gradient() -> None:
    """With the GAN on, the decoder's gradient differs from the reconstruction-only one from the same start."""
    torch.manual_seed(0)
    start = CineAutoencoderKL(**def_kwargs("autoencoder_def", "tiny"))
    disc = PatchDiscriminator(spatial_dims=3, channels=8, in_channels=1, num_layers_d=2)
    x = torch.rand(2, 1, 20, 32, 32)
    grads = []
    for gan_start in (10**9, 1):
        net = CineAutoencoderKL(**def_kwargs("autoencoder_def", "tiny"))
        net.load_state_dict(start.state_dict())
        torch.manual_seed(1)  # the same posterior draw in both runs
        AutoencoderGANStep(disc, torch.optim.AdamW(disc.parameters(), 0.0), gan_start_step=gan_start)(
            _engine(net, 1), {"image": x})
        grads.append(net.decoder[-1].conv.weight.grad.clone())  # the last convolution (of the refinement)
    assert not torch.allclose(grads[0], grads[1])


def test_recon_loss_pieces_and_perceptual_term() -> None:
    x = torch.rand(2, 1, 4, 16, 16)
    zeros = torch.zeros(2, 16, 2, 2, 2)
    out = CineReconLoss(kl_weight=0.5)(x + 0.25, x, zeros + 1, zeros)
    assert out["l1"].item() == pytest.approx(0.25) and out["kl"].item() == pytest.approx(0.5 * 128)
    assert out["loss"].item() == pytest.approx(0.25 + 0.5 * 64) and out["perceptual"] == 0
    features = torch.nn.Conv2d(1, 3, 3)
    with_perceptual = CineReconLoss(feature_network=features, perceptual_weight=0.1)(x + 0.25, x, zeros, zeros)
    assert with_perceptual["perceptual"] > 0
    assert with_perceptual["nll"].item() == pytest.approx(0.25 + 0.1 * with_perceptual["perceptual"].item())


# ---------------------------------------------------------------------------------------------------------- profiles
@pytest.mark.parametrize("name", PROFILES)
def test_profiles_set_every_stage_tunable(name: str) -> None:
    base = json.loads((REPO / CONFIG).read_text())["autoencoder"]
    profile = json.loads((REPO / "configs" / "profiles" / f"{name}.json").read_text())
    assert profile["profile"] == name and set(profile.get("+autoencoder", {})) <= set(base)
    with torch.device("meta"):
        CineAutoencoderKL(**def_kwargs("autoencoder_def", name))  # the profile's network builds


def test_paper_profile_has_the_authors_settings() -> None:
    parser = ConfigParser(ConfigParser.load_config_files([str(REPO / CONFIG), str(REPO / "configs/profiles/paper.json")]))
    ae = parser["autoencoder"]
    assert (ae["num_epochs"], ae["batch_size"], ae["learning_rate"], ae["gan_start_step"]) == (100, 10, 8e-4, 10001)
    disc = parser.get_parsed_content("discriminator_def")
    count = sum(p.numel() for p in disc.parameters())
    assert 3.5e6 < count < 5e6  # authors: a 4.2M-parameter 3D PatchGAN


# ------------------------------------------------------------------------------------------------------- bundle CLI
@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Tiny profile: train 2 epochs, then resume to 3, through `python -m monai.bundle run`."""
    root = tmp_path_factory.mktemp("ae")
    prepared = _write_prepared(root / "prepared")
    common = ["--prepared_dir", str(prepared), "--ckpt_dir", str(root / "models"), "--output_dir", str(root / "out")]
    start = time.perf_counter()
    first = _bundle(*common)
    print(f"tiny CLI run (2 epochs, 4 training cines, process start included): {time.perf_counter() - start:.1f} s")
    metrics_first = json.loads((root / "out" / "metrics.json").read_text())
    print(f"tiny run validation: {metrics_first}")
    latest_first = torch.load(root / "models" / "autoencoder_latest.pt", weights_only=True)
    second = _bundle(*common, "--autoencoder#num_epochs", "3")
    return {"root": root, "common": common, "first": first, "second": second, "metrics_first": metrics_first,
            "latest_first": latest_first}


def test_cli_training_writes_checkpoints_metrics_and_montage(runs: dict) -> None:
    root, metrics = runs["root"], runs["metrics_first"]
    state = torch.load(root / "models" / "autoencoder.pt", weights_only=True)
    assert set(state) == set(CineAutoencoderKL(**def_kwargs("autoencoder_def", "tiny")).state_dict())  # network only
    assert metrics["epoch"] == 2 and set(metrics) == {"epoch", "val_psnr", "val_ssim"}
    assert np.isfinite(metrics["val_psnr"]) and np.isfinite(metrics["val_ssim"]) and -1 <= metrics["val_ssim"] <= 1
    latest = runs["latest_first"]
    assert set(latest) == {"network", "discriminator", "optimizer", "d_optimizer", "best_saver", "trainer"}
    assert latest["trainer"]["iteration"] == 4  # 4 cines, batch 2
    assert "d_weight" in runs["first"].stdout  # the GAN started at step 3 (tiny profile)
    with Image.open(root / "out" / "reconstruction.png") as png:  # 2 rows x (2 cines x 2 frames) of 96 px, x2
        assert png.size == (4 * 96 * 2, 2 * 96 * 2)


def test_cli_resume_continues_from_the_saved_epoch(runs: dict) -> None:
    log = runs["second"].stdout + runs["second"].stderr
    assert "at epoch 2 of 3" in log and "Epoch[3] Metrics" in log and "Epoch[1] Metrics" not in log
    latest = torch.load(runs["root"] / "models" / "autoencoder_latest.pt", weights_only=True)
    assert latest["trainer"]["iteration"] == 6  # 3 epochs of 2 steps


def test_cli_wrong_profile_checkpoint_is_an_error_naming_the_file(runs: dict, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    cpu_net = CineAutoencoderKL(**def_kwargs("autoencoder_def", "cpu"))
    latest = runs["latest_first"]
    torch.save({**latest, "network": cpu_net.state_dict()}, models / "autoencoder_latest.pt")
    done = _bundle(*runs["common"][:2], "--ckpt_dir", str(models), "--output_dir", str(tmp_path / "out"),
                   expect_failure=True)
    log = done.stdout + done.stderr
    assert done.returncode != 0
    assert f"{models / 'autoencoder_latest.pt'}: checkpoint does not match CineAutoencoderKL of autoencoder profile 'tiny'" in log
    assert "shape mismatch" in log
