"""Stage 2 training, the cine autoencoder: GAN iteration, profiles, the training config and wrong profiles."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.inferers import SimpleInferer
from monai.networks.nets import PatchDiscriminator
from PIL import Image

from scripts.generation.autoencoder import CineAutoencoderKL
from scripts.generation.autoencoder_training import AutoencoderGANStep
from scripts.generation.losses import CineReconLoss
from tests.conftest import ONE_THREAD, REPO, run_bundle, tensorboard_events
from tests.networks import def_kwargs

torch.set_num_threads(1)
CONFIG = "configs/train_autoencoder.json"
PROFILES = ("tiny", "cpu", "paper")


_bundle = partial(run_bundle, [CONFIG, "configs/profiles/tiny.json"], env=ONE_THREAD, timeout=300)


# ----------------------------------------------------------------------------------------------------- GAN iteration
def _engine(net: torch.nn.Module, iteration: int) -> SimpleNamespace:
    """The attributes of a SupervisedTrainer that AutoencoderGANStep reads."""
    return SimpleNamespace(state=SimpleNamespace(device="cpu", iteration=iteration), non_blocking=False, network=net,
                           inferer=SimpleInferer(), loss_function=CineReconLoss(),
                           optimizer=torch.optim.AdamW(net.parameters(), 8e-4),
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
    [out] = step(_engine(net, iteration), {"image": x})  # MONAI's decollated form of the batch's losses
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
    assert out["l1"].item() == pytest.approx(0.25) and out["kl"].item() == pytest.approx(0.5)  # per latent element
    assert out["loss"].item() == pytest.approx(0.25 + 0.5 * 0.5) and out["perceptual"] == 0
    features = torch.nn.Conv2d(1, 3, 3)
    with_perceptual = CineReconLoss(feature_network=features, perceptual_weight=0.1)(x + 0.25, x, zeros, zeros)
    assert with_perceptual["perceptual"] > 0
    assert with_perceptual["nll"].item() == pytest.approx(0.25 + 0.1 * with_perceptual["perceptual"].item())


def test_perceptual_term_on_chosen_frames() -> None:
    """perceptual_frames random frames per cine go through the feature network, the same ones for both cines."""
    seen = []

    def features(frames: torch.Tensor) -> torch.Tensor:  # (N, 1, H, W) -> (N, 1): records each frame's value
        seen.append(frames[:, 0, 0, 0].clone())
        return frames.mean((2, 3))

    target = torch.arange(10.0).reshape(1, 1, 10, 1, 1).expand(2, 1, 10, 4, 4)  # frame t holds t
    recon, zeros = target + 100.0, torch.zeros(2, 2, 5, 1, 1)
    torch.manual_seed(0)
    out = CineReconLoss(feature_network=features, perceptual_weight=1.0, perceptual_frames=3)(recon, target, zeros,
                                                                                             zeros)
    fake, real = seen
    assert len(fake) == len(real) == 2 * 3 and torch.equal(fake - 100.0, real)  # 3 frames of each of the 2 cines
    assert len(set(real.tolist())) == 3 and out["perceptual"].item() == pytest.approx(100.0)
    seen.clear()
    CineReconLoss(feature_network=features, perceptual_frames=None)(recon, target, zeros, zeros)
    assert len(seen[0]) == 2 * 10  # None: every frame


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
def test_cli_training_writes_checkpoints_metrics_and_montage(autoencoder_runs: dict) -> None:
    root, metrics = autoencoder_runs["root"], autoencoder_runs["metrics_first"]
    state = torch.load(root / "models" / "autoencoder.pt", weights_only=True)
    assert set(state) == set(CineAutoencoderKL(**def_kwargs("autoencoder_def", "tiny")).state_dict())  # network only
    assert metrics["epoch"] == 2 and set(metrics) == {"epoch", "val_psnr", "val_ssim", "precision"}
    assert np.isfinite(metrics["val_psnr"]) and np.isfinite(metrics["val_ssim"]) and -1 <= metrics["val_ssim"] <= 1
    latest = autoencoder_runs["latest_first"]
    assert set(latest) == {"network", "discriminator", "optimizer", "d_optimizer", "lr_scheduler", "best_saver", "budget", "trainer", "data_sha256"}
    assert latest["trainer"]["iteration"] == 4  # 4 cines, batch 2
    assert "d_weight" in autoencoder_runs["first"].stdout  # the GAN started at step 3 (tiny profile)
    with Image.open(root / "out" / "reconstruction.png") as png:  # 2 rows x (2 cines x 2 frames) of 96 px, x2
        assert png.size == (4 * 96 * 2, 2 * 96 * 2)
    events = tensorboard_events(root / "out" / "tensorboard")  # the first run's and its resumed rerun's
    assert set(events.Tags()["scalars"]) == {"iteration_loss", "train_loss", "train_l1", "val_psnr", "val_ssim"}
    assert [s.step for s in events.Scalars("iteration_loss")] == [1, 2, 3, 4, 5, 6]  # tiny: every iteration
    assert [s.step for s in events.Scalars("val_psnr")] == [1, 2, 3]  # at the trainer's epochs
    assert metrics["val_psnr"] == pytest.approx(events.Scalars("val_psnr")[1].value)
    assert [(i.step, i.width, i.height) for i in events.Images("reconstruction")] == [
        (epoch, 4 * 96 * 2, 2 * 96 * 2) for epoch in (1, 2, 3)]  # the PNG montage, every validation


def test_cli_wrong_profile_checkpoint_is_an_error_naming_the_file(autoencoder_runs: dict, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    cpu_net = CineAutoencoderKL(**def_kwargs("autoencoder_def", "cpu"))
    latest = autoencoder_runs["latest_first"]
    torch.save({**latest, "network": cpu_net.state_dict()}, models / "autoencoder_latest.pt")
    done = _bundle(*autoencoder_runs["common"][:2], "--ckpt_dir", str(models), "--output_dir", str(tmp_path / "out"),
                   expect_failure=True)
    log = done.stdout + done.stderr
    assert done.returncode != 0
    assert f"{models / 'autoencoder_latest.pt'}: checkpoint does not match CineAutoencoderKL of autoencoder profile 'tiny'" in log
    assert "shape mismatch" in log

