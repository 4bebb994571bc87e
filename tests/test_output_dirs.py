"""Output folders of the training stages (scripts/runtime/output_dirs.py): a new or empty folder is claimed with a
stage.json marker and a rerun resumes in it; a folder of another stage, or of none, is refused unless --overwrite True;
a folder of a version before the marker that holds only the stage's own outputs is claimed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from scripts.runtime import cli, output_dirs
from scripts.runtime.output_dirs import MARKER, claim_output_dir, listing
from tests.conftest import run_bundle
from tests.stage_runs import write_phenotype_prepared

OWN = ("metrics.json", "tensorboard")
# training config: (config files, the stage its marker names; the regressor is a layer of the classifier)
TRAINING = {
    "train_phenotype_vae": (["configs/train_phenotype_vae.json"], "train_phenotype_vae"),
    "train_autoencoder": (["configs/train_autoencoder.json"], "train_autoencoder"),
    "train_mar": (["configs/train_mar.json"], "train_mar"),
    "train_segmenter": (["configs/train_segmenter.json"], "train_segmenter"),
    "pretrain_mae": (["configs/pretrain_mae.json"], "pretrain_mae"),
    "train_classifier": (["configs/train_classifier.json"], "train_classifier"),
    "train_regressor": (["configs/train_classifier.json", "configs/train_regressor.json"], "train_classifier"),
}


def _stage(folder: Path) -> str:
    return json.loads((folder / MARKER).read_text())["stage"]


def _refusal(folder: Path, stage: str, found: str, why: str) -> str:
    return re.escape(f"--output_dir {folder} holds {found} but {why}: {stage} would write over it; give a new or "
                     "empty --output_dir, or --overwrite True to write into it anyway")


def test_a_new_or_empty_folder_is_claimed_and_a_rerun_resumes_in_it(tmp_path: Path) -> None:
    new, empty = tmp_path / "new", tmp_path / "empty"
    empty.mkdir()
    for folder in (new, empty):
        assert claim_output_dir(folder, "train_x") == folder and _stage(folder) == "train_x"
    (new / "metrics.json").write_text("{}")
    (new / "anything.txt").write_text("written by the stage's first run")
    assert claim_output_dir(new, "train_x") == new  # a resume: the marker names this stage


def test_a_folder_of_another_stage_or_of_none_is_refused_unless_overwrite(tmp_path: Path) -> None:
    folder = tmp_path / "user"
    folder.mkdir()
    (folder / "notes.txt").write_text("a user's file")
    (folder / f".tmp-{'0' * 32}-metrics.json").write_text("")  # an unfinished atomic write: not counted
    with pytest.raises(ValueError, match=_refusal(folder, "train_x", "notes.txt", f"has no {MARKER} of train_x")):
        claim_output_dir(folder, "train_x", own=OWN)
    assert not (folder / MARKER).exists()
    claim_output_dir(folder, "train_x", overwrite=True)
    assert _stage(folder) == "train_x" and (folder / "notes.txt").read_text() == "a user's file"
    with pytest.raises(ValueError, match=_refusal(folder, "train_y", f"notes.txt, {MARKER}",
                                                  f"was made by train_x ({MARKER})")):
        claim_output_dir(folder, "train_y", own=OWN)
    (folder / MARKER).write_text("not JSON")
    with pytest.raises(ValueError, match=re.escape(f"{folder / MARKER}: not a stage marker")):
        claim_output_dir(folder, "train_x")


def test_a_folder_of_an_earlier_version_is_claimed_where_it_holds_only_the_stage_outputs(tmp_path: Path) -> None:
    legacy, mixed = tmp_path / "legacy", tmp_path / "mixed"
    for folder in (legacy, mixed):
        (folder / "tensorboard").mkdir(parents=True)
        (folder / "metrics.json").write_text("{}")
    (mixed / "scan.nii.gz").write_bytes(b"")
    claim_output_dir(legacy, "train_x", own=OWN)
    assert _stage(legacy) == "train_x"
    with pytest.raises(ValueError, match=_refusal(mixed, "train_x", "scan.nii.gz", f"has no {MARKER} of train_x")):
        claim_output_dir(mixed, "train_x", own=OWN)


def test_a_concurrent_claim_by_another_rank_of_the_same_stage_is_accepted(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ranks claim at once: rank 1's marker lands after rank 0 read none and before it lists the folder (a 2-rank
    CI run failed so, 2026-12-04); a marker of another stage landing so is still refused."""
    folder = tmp_path / "out"
    folder.mkdir()
    read = output_dirs.marked_stage
    for stage, other in (("train_x", "train_x"), ("train_x", "train_y")):
        (folder / MARKER).unlink(missing_ok=True)
        calls: list[int] = []

        def late_marker(path: Path, other: str = other, calls: list[int] = calls) -> str | None:
            calls.append(1)
            if len(calls) == 1:  # the first read sees no marker; the other rank writes it right after
                (folder / MARKER).write_text(json.dumps({"stage": other}))
                return None
            return read(path)

        monkeypatch.setattr(output_dirs, "marked_stage", late_marker)
        if other == stage:
            assert claim_output_dir(folder, stage, own=OWN) == folder and _stage(folder) == stage
        else:
            with pytest.raises(ValueError, match=_refusal(folder, stage, MARKER, f"has no {MARKER} of {stage}")):
                claim_output_dir(folder, stage, own=OWN)


def test_listing_names_the_first_few() -> None:
    assert listing(["a", "b/"]) == "a, b/" and listing(list("abcdef")) == "a, b, c, d and 2 more"


@pytest.mark.parametrize("layers", [(), ("configs/multi_gpu.json",)], ids=["single", "multi_gpu"])
@pytest.mark.parametrize("name", sorted(TRAINING))
def test_every_training_config_claims_its_output_dir(name: str, layers: tuple[str, ...]) -> None:
    """Also with configs/multi_gpu.json layered, which replaces the second initialize entry only."""
    files, stage = TRAINING[name]
    initialize = ConfigParser.load_config_files([*files, *layers])["initialize"]
    assert [x.split("(")[0] for x in initialize] == ["$scripts.runtime.cli.check_overrides",
                                                     "$monai.utils.set_determinism",
                                                     "$scripts.runtime.output_dirs.claim_output_dir"]
    assert initialize[2].startswith(f"$scripts.runtime.output_dirs.claim_output_dir(@output_dir, '{stage}', @overwrite")
    assert ("init_distributed" in initialize[1]) == bool(layers)


@pytest.mark.parametrize("files", [f for f, _ in TRAINING.values()] + [["configs/generate.json"]], ids=str)
def test_overwrite_passes_the_override_guard(files: list[str]) -> None:
    argv = ["/x/monai/bundle/__main__.py", "run", "--config_file", str(files), "--overwrite"]
    cli.check_overrides([*argv, "True"])
    with pytest.raises(ValueError, match="--overwrite takes True or False, got 'yes'"):
        cli.check_overrides([*argv, "yes"])


def test_a_training_run_refuses_a_foreign_folder_in_one_line_and_trains_with_overwrite(tmp_path: Path) -> None:
    write_phenotype_prepared(tmp_path / "prepared")
    out, models = tmp_path / "out", tmp_path / "models"
    out.mkdir()
    (out / "notes.txt").write_text("a user's file")
    args = {"dataset_dir": tmp_path / "prepared", "ckpt_dir": models, "output_dir": out, "num_epochs": 1}
    done = run_bundle("configs/train_phenotype_vae.json", expect_failure=True, env={cli.DEBUG_ENV: "0"}, **args)
    message = (f"error: --output_dir {out} holds notes.txt but has no {MARKER} of train_phenotype_vae: "
               "train_phenotype_vae would write over it; give a new or empty --output_dir, or --overwrite True to "
               f"write into it anyway (set {cli.DEBUG_ENV}=1 for the traceback)")
    assert done.stderr.strip().splitlines()[-1] == message and "Traceback" not in done.stderr
    assert not models.exists()  # refused before anything was trained
    run_bundle("configs/train_phenotype_vae.json", overwrite=True, timeout=300, **args)
    assert _stage(out) == "train_phenotype_vae" and (out / "metrics.json").is_file()
    assert (models / "phenotype_vae.pt").is_file() and (out / "notes.txt").read_text() == "a user's file"
