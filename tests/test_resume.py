"""Resume of each trained stage: the rerun with more epochs continues from the epoch its first run saved."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from scripts.runtime.checkpoints import DATA_KEY
from scripts.runtime.files import TMP_PATTERN
from scripts.runtime.output_dirs import MARKER
from tests.conftest import ONE_THREAD, bundle_env, run_bundle


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


def _temporary(models: Path) -> set[str]:
    """Names of atomic_write's temporary files in `models`."""
    return {p.name for p in models.iterdir() if TMP_PATTERN.fullmatch(p.name)}


def _checkpoints(models: Path) -> list[Path]:
    """The checkpoint files of `models`, without temporary ones."""
    return [p for p in models.glob("*.pt") if not TMP_PATTERN.fullmatch(p.name)]


def _kill_at_first_save(cmd: list[str], models: Path, timeout_s: float = 240.0) -> str:
    """Start `cmd` in its own process group, SIGKILL it as soon as a temporary checkpoint file appears in `models`
    (mid-save), else once a checkpoint's mtime changes (just after a save); returns which happened."""
    before = {p: p.stat().st_mtime_ns for p in _checkpoints(models)}
    orphans = _temporary(models)  # left by an earlier kill: not this run's save
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1], env=bundle_env(ONE_THREAD),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline, when = time.monotonic() + timeout_s, ""
    while not when and time.monotonic() < deadline and proc.poll() is None:
        if _temporary(models) - orphans:
            when = "mid-save"
        elif any(p.stat().st_mtime_ns != before.get(p) for p in _checkpoints(models)):
            when = "after a save"
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert when, f"no checkpoint save seen within {timeout_s} s (exit {proc.returncode})"
    return when


@pytest.mark.slow
@pytest.mark.parametrize(("runs_fixture", "latest_name", "start", "end", "keys", "iterations", "extra"), STAGES)
def test_kill_9_during_a_save_leaves_loadable_checkpoints(request: pytest.FixtureRequest, tmp_path: Path,
                                                         runs_fixture: str, latest_name: str, start: int, end: int,
                                                         keys: set[str], iterations: int, extra: object) -> None:
    """Three SIGKILLs at checkpoint saves of a resumed run (each rerun resumes from what the last kill left), then a
    rerun to the end: every checkpoint loads (weights_only) after each kill and the rerun trains each epoch once."""
    runs = request.getfixturevalue(runs_fixture)
    root = tmp_path / "root"
    shutil.copytree(runs["root"], root, symlinks=True)
    second = runs["second"].args  # the fixture's resumed command, retargeted at the copy
    cmd = [str(a).replace(str(runs["root"]), str(root)) for a in second]
    epochs_flag = next(i for i, a in enumerate(cmd) if a.endswith("num_epochs"))
    cmd[epochs_flag + 1] = str(end + 6)
    models = root / "models"
    for _ in range(3):
        print(f"{runs_fixture}: killed {_kill_at_first_save(cmd, models)}")
        for path in _checkpoints(models):
            torch.load(path, weights_only=True)  # a truncated or half-written file would raise here
    left = _temporary(models)  # the kills' (removed by a run an hour later: they may be a running writer's)
    done = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=bundle_env(ONE_THREAD),
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    latest = torch.load(models / latest_name, weights_only=True)
    assert latest["trainer"]["iteration"] == iterations // end * (end + 6)  # every epoch to the end, once
    assert _temporary(models) <= left  # the rerun's saves left none
