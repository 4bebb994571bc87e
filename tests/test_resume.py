"""Resume of each trained stage: the rerun with more epochs continues from the epoch its first run saved."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from scripts.runtime.checkpoints import DATA_KEY
from scripts.runtime.output_dirs import MARKER
from tests.conftest import run_bundle


def _phenotype_metrics_reach_the_last_epoch(runs: dict, latest: dict) -> None:
    assert json.loads((runs["root"] / "out4" / "metrics.json").read_text())["epoch"] == 4


def _mar_ema_and_schedule_count_every_step(runs: dict, latest: dict) -> None:
    assert latest["ema"]["n_averaged"].item() == 12 and latest["lr_scheduler"]["last_epoch"] == 12


# fixture of tests/stage_runs.py, latest checkpoint, epochs resumed from and to, its keys, trainer iterations, extra
STAGES = [
    pytest.param("phenotype_vae_runs", "phenotype_vae_latest.pt", 2, 4, {"network", "optimizer", "best_saver",
                 "trainer"}, 4, _phenotype_metrics_reach_the_last_epoch, id="phenotype_vae"),  # 1 step per epoch
    pytest.param("autoencoder_runs", "autoencoder_latest.pt", 2, 3, {"network", "discriminator", "optimizer",
                 "d_optimizer", "lr_scheduler", "best_saver", "budget", "trainer"}, 6, None, id="autoencoder"),  # 3 epochs of 2 steps
    pytest.param("mar_runs", "mar_latest.pt", 2, 3, {"network", "ema", "optimizer", "lr_scheduler", "best_saver",
                 "budget", "trainer"}, 12, _mar_ema_and_schedule_count_every_step, id="mar"),  # 3 epochs of 4 steps
    pytest.param("segmenter_runs", "segmenter_latest.pt", 2, 3, {"network", "optimizer", "lr_scheduler", "best_saver",
                 "trainer"}, 9, None, id="segmenter"),  # 3 epochs of 3 steps
]


# fixture -> (the output_dir of its second run, the stage its marker names); the rerun of all but the phenotype VAE
# (out2, then out4) went into the folder its first run marked: a resume is accepted
OUTPUT_DIRS = {"phenotype_vae_runs": ("out4", "train_phenotype_vae"), "autoencoder_runs": ("out", "train_autoencoder"),
               "mar_runs": ("out", "train_mar"), "segmenter_runs": ("out", "train_segmenter")}


@pytest.mark.parametrize(("runs_fixture", "latest_name", "start", "end", "keys", "iterations", "extra"), STAGES)
def test_rerun_continues_from_the_saved_epoch(request: pytest.FixtureRequest, runs_fixture: str, latest_name: str,
                                              start: int, end: int, keys: set[str], iterations: int,
                                              extra: Callable[[dict, dict], None] | None) -> None:
    runs = request.getfixturevalue(runs_fixture)
    log = runs["second"].stdout
    assert f"at epoch {start} of {end}" in log and f"Epoch[{start + 1}] Metrics" in log and "Epoch[1] Metrics" not in log
    latest = torch.load(runs["root"] / "models" / latest_name, weights_only=True)
    assert set(latest) == keys | {DATA_KEY} and latest["trainer"]["iteration"] == iterations
    assert len(latest[DATA_KEY]) == 64  # the SHA-256 of the training data's file
    if extra is not None:
        extra(runs, latest)
    folder, stage = OUTPUT_DIRS[runs_fixture]
    assert json.loads((runs["root"] / folder / MARKER).read_text()) == {"stage": stage}


def test_resume_on_other_training_data_is_refused(phenotype_vae_runs: dict, tmp_path: Path) -> None:
    root = phenotype_vae_runs["root"]
    shutil.copytree(root / "models", tmp_path / "models")
    shutil.copytree(root / "prepared", tmp_path / "prepared")
    with (tmp_path / "prepared" / "datalist.json").open("a") as f:
        f.write("\n")  # the same items, another file: the check is by content digest, conservative
    done = run_bundle("configs/train_phenotype_vae.json", expect_failure=True, dataset_dir=tmp_path / "prepared",
                      ckpt_dir=tmp_path / "models", output_dir=tmp_path / "out", num_epochs=5)
    assert "phenotype_vae_latest.pt: trained on other data than" in done.stdout + done.stderr
