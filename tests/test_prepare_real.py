"""Real-data behaviour of scripts.data.prepare: any frame count >= 10 starting at any phase, partial labels (a label
cine with unlabelled frames, per-frame label files), labelling by the segmenter (a stand-in here) and its
plausibility check."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_io import synthetic_cine, write_nifti

from scripts.data.heart_crop import heart_box
from scripts.data.labels import frame_sources, implausible
from scripts.data.orientation import canonical_affine
from scripts.data.prepare import end_diastole, prepare

FRAME_COUNTS = (10, 25, 30, 50, 64)
PHASES = dict(zip(FRAME_COUNTS, np.random.default_rng(7).integers(0, FRAME_COUNTS)))  # ED frame of each cine
ED, ES = 11, 26  # of the 30-frame cines of the partial-label subjects (ES: the smallest LV, half a cycle from ED)


def _lv_area(label: np.ndarray) -> np.ndarray:
    return (label[0] == 1).sum(axis=(1, 2))


def _dropped_frame() -> int:
    """A frame of a 64-frame cine (relative to ED) that nearest resampling to 50 frames drops."""
    return min(set(range(20, 40)) - set(frame_sources(64).tolist()))


def _subject(root: Path, name: str, frames: int, ed: int, seed: int, labelled: list[int] | None = None,
             label: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic subject: image and, with `label`, a label cine (only the `labelled` frames, where given)."""
    image, truth = synthetic_cine(frames, ed, seed=seed)
    write_nifti(root / name / "la_4ch.nii.gz", image, dt=0.9 / frames)
    partial = truth.copy()
    if labelled is not None:
        partial[..., [t for t in range(frames) if t not in labelled]] = 0
    if label:
        write_nifti(root / name / "seg4_la_4ch.nii.gz", partial.astype(np.float32), dt=0.9 / frames)
    return image, truth


def _frame_file(path: Path, frame: np.ndarray, shape: tuple[int, ...]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(frame.astype(np.float32).reshape(shape), canonical_affine((1.5, 1.5), 8.0)), path)


class StandIn:
    """Stand-in segmenter: the label cine stored for an image (its bytes), else a KeyError."""

    checkpoint = "stand-in.pt"

    def __init__(self, outputs: dict[bytes, np.ndarray]) -> None:
        self.outputs = outputs

    def __call__(self, image: np.ndarray, spacing_mm: tuple[float, float]) -> np.ndarray:
        return self.outputs[image.tobytes()]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, StandIn]:
    """Subjects of every frame count; partial labels as a label cine and as frame files; subjects without labels;
    the stand-in segmenter's output for each image (truth; none or random pixels for no_heart, speckle, bad_fill)."""
    root, outputs = tmp_path_factory.mktemp("real"), {}
    for n, frames in enumerate(FRAME_COUNTS):
        image, truth = _subject(root, f"f{frames}", frames, PHASES[frames], seed=n)
        outputs[image.tobytes()] = truth
    image, truth = _subject(root, "partial", 30, ED, seed=10, labelled=[ED, ES])
    outputs[image.tobytes()] = truth
    _subject(root, "full", 30, ED, seed=10)
    _subject(root, "ed_unlabelled", 30, ED, seed=10, labelled=[ED + 2, ES])
    _subject(root, "files", 30, ED, seed=10, label=False)
    _frame_file(root / "files" / f"seg4_la_4ch_frame{ED}.nii.gz", truth[..., ED], truth.shape[:2])
    _frame_file(root / "files" / f"seg4_la_4ch_frame{ES}.nii.gz", truth[..., ES], (*truth.shape[:2], 1, 1))
    es64 = (40 + _dropped_frame()) % 64
    image, truth = _subject(root, "partial64", 64, 40, seed=11, labelled=[40, es64])
    outputs[image.tobytes()] = truth
    image, truth = _subject(root, "no_label", 25, 3, seed=12, label=False)
    outputs[image.tobytes()] = truth
    image, _ = _subject(root, "no_heart", 25, 3, seed=13, label=False)
    outputs[image.tobytes()] = np.zeros_like(truth)
    image, _ = _subject(root, "speckle", 25, 3, seed=14, label=False)
    rng, speckle = np.random.default_rng(0), np.zeros_like(truth)
    speckle[tuple(rng.integers(0, n, 30) for n in speckle.shape)] = rng.integers(1, 6, 30)
    outputs[image.tobytes()] = speckle
    image, _ = _subject(root, "bad_fill", 30, ED, seed=15, labelled=[ED, ES])
    outputs[image.tobytes()] = np.zeros((*image.shape[:2], 30), np.uint8)
    return root, StandIn(outputs)


@pytest.fixture(scope="module")
def runs(cohort: tuple[Path, StandIn], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The cohort prepared without a segmenter ("plain") and with the stand-in ("segmenter")."""
    root, stand_in = cohort
    out = {"plain": tmp_path_factory.mktemp("plain"), "segmenter": tmp_path_factory.mktemp("segmenter")}
    prepare(root, out["plain"], splits=(1.0, 0.0, 0.0), num_workers=0)
    prepare(root, out["segmenter"], splits=(1.0, 0.0, 0.0), num_workers=0, labeller=stand_in)
    return out


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _items(out: Path) -> dict[str, dict]:
    return {d["subject"]: d for d in json.loads((out / "datalist.json").read_text())["training"]}


def _arrays(out: Path, subject: str) -> tuple[np.ndarray, np.ndarray]:
    return np.load(out / "images" / f"{subject}.npy"), np.load(out / "labels" / f"{subject}.npy")


# ----------------------------------------------------------------------------------------- frame counts and phases
@pytest.mark.parametrize("frames", FRAME_COUNTS)
def test_any_frame_count_from_any_phase(runs: dict[str, Path], frames: int) -> None:
    record = _report(runs["plain"])["subjects"][f"f{frames}"]
    image, label = _arrays(runs["plain"], f"f{frames}")
    assert image.shape == label.shape == (1, 50, 96, 96)
    assert record["ed_shift"] == PHASES[frames] and record["original_shape"] == [120, 100, frames]
    assert np.argmax(_lv_area(label)) == 0 and (label > 0).any(axis=(0, 2, 3)).all()
    assert record["frame_interval_s"] == pytest.approx(0.9 / 50) and "labelled_frames" not in record


def test_frame_sources() -> None:
    assert frame_sources(50).tolist() == list(range(50))
    for frames in FRAME_COUNTS:  # the nearest input frame in cyclic time, every frame used where frames <= 50
        sources, time = frame_sources(frames), np.arange(50) * frames / 50
        assert np.abs((time - sources + frames / 2) % frames - frames / 2).max() <= 0.5 + 1e-9
        assert frames > 50 or set(sources.tolist()) == set(range(frames))
    dropped = _dropped_frame()
    keep = np.zeros(64, bool)
    keep[[0, dropped]] = True
    kept = frame_sources(64, keep)
    changed = np.flatnonzero(kept != frame_sources(64))
    assert kept[changed].tolist() == [dropped] and abs(changed[0] - dropped * 50 / 64) < 1


# ------------------------------------------------------------------------------------------------- partial labels
def test_partial_label_cine(runs: dict[str, Path], cohort: tuple[Path, StandIn]) -> None:
    """Only ED and ES labelled: ED found among them, the crop from their union, unlabelled frames 0 and the labelled
    ones listed in the datalist."""
    report, root = _report(runs["plain"]), cohort[0]
    record = report["subjects"]["partial"]
    _, label = _arrays(runs["plain"], "partial")
    assert record["labels"] == "file" and record["ed_shift"] == ED
    # 30 frames: output frame j at input time 0.6 j; only j = 0 is nearest to ED, j = 25 to ES (input 15 after the roll)
    assert record["original_labelled_frames"] == [ED, ES] and record["labelled_frames"] == [0, 25]
    assert np.flatnonzero(label.any(axis=(0, 2, 3))).tolist() == [0, 25]
    assert np.argmax(_lv_area(label)) == 0 and _lv_area(label)[25] < _lv_area(label)[0]
    truth = np.asarray(nib.load(root / "partial" / "seg4_la_4ch.nii.gz").dataobj)[:, :, 0]
    assert record["crop_box"] == heart_box(truth[..., [ED, ES]].any(axis=2), (1.5, 1.5), 0.15)
    assert _items(runs["plain"])["partial"]["labelled_frames"] == [0, 25]
    assert "labelled_frames" not in _items(runs["plain"])["full"]
    assert "labels in 2 of 30 frames (11, 26): end-diastole is the labelled frame" in report["notes"]["partial"]
    assert "partial" in report["partially_labelled"] and "full" not in report["partially_labelled"]
    assert "Partial labels (end-diastole chosen among the labelled frames only" in (runs["plain"] /
                                                                                   "report.md").read_text()


def test_end_diastole_is_chosen_among_labelled_frames(runs: dict[str, Path]) -> None:
    record = _report(runs["plain"])["subjects"]["ed_unlabelled"]
    assert record["ed_shift"] == ED + 2 and record["labelled_frames"][0] == 0


def test_frame_files_equal_a_partial_label_cine(runs: dict[str, Path]) -> None:
    report = _report(runs["plain"])["subjects"]
    for kind in range(2):
        assert np.array_equal(_arrays(runs["plain"], "files")[kind], _arrays(runs["plain"], "partial")[kind])
    keys = ("labels", "ed_shift", "crop_box", "labelled_frames", "original_labelled_frames", "spacing_mm")
    assert {k: report["files"][k] for k in keys} == {k: report["partial"][k] for k in keys}


def test_a_labelled_frame_dropped_by_resampling_is_kept(runs: dict[str, Path]) -> None:
    record = _report(runs["plain"])["subjects"]["partial64"]
    _, label = _arrays(runs["plain"], "partial64")
    es = _dropped_frame() * 50 / 64
    assert record["ed_shift"] == 40 and len(record["labelled_frames"]) == 2
    assert record["labelled_frames"][0] == 0 and abs(record["labelled_frames"][1] - es) < 1
    assert np.flatnonzero(label.any(axis=(0, 2, 3))).tolist() == record["labelled_frames"]


def test_segmenter_labels_unlabelled_frames(runs: dict[str, Path]) -> None:
    """With the true labels from the stand-in, a partial label cine prepares exactly as the fully labelled one."""
    report = _report(runs["segmenter"])
    record = report["subjects"]["partial"]
    assert record["labels"] == "file+segmenter" and record["labelled_frames"] == [0, 25]
    assert sorted(record["labelled_frames"] + record["segmenter_frames"]) == list(range(50))
    for kind in range(2):
        assert np.array_equal(_arrays(runs["segmenter"], "partial")[kind], _arrays(runs["plain"], "full")[kind])
    assert "labelled_frames" not in _items(runs["segmenter"])["partial"]
    assert "partial" in report["completed_by_segmenter"]
    assert "the other 28 frames labelled by the segmenter" in report["notes"]["partial"]
    assert "Unlabelled frames of partial labels labelled by the segmenter: ed_unlabelled, files, partial, partial64" in (
        runs["segmenter"] / "report.md").read_text()


def test_implausible_segmenter_labels_leave_partial_labels(runs: dict[str, Path]) -> None:
    record = _report(runs["segmenter"])["subjects"]["bad_fill"]
    assert record["labels"] == "file" and record["labelled_frames"] == [0, 25]
    assert "the segmenter's labels are implausible (LV (label 1) in 0 of 30 frames" in record["note"]
    assert _items(runs["segmenter"])["bad_fill"]["labelled_frames"] == [0, 25]


# ---------------------------------------------------------------------------------------- labels from the segmenter
def test_missing_labels_without_a_segmenter_name_the_option(runs: dict[str, Path], cohort: tuple[Path, StandIn]
                                                            ) -> None:
    skipped = {s["subject"]: s for s in _report(runs["plain"])["skipped"]}
    assert set(skipped) == {"no_label", "no_heart", "speckle"}
    label = cohort[0] / "no_label" / "seg4_la_4ch.nii.gz"
    assert skipped["no_label"]["file"] == str(label)
    assert skipped["no_label"]["reason"] == (
        f"subject 'no_label': {label}: file not found, nor per-frame label files seg4_la_4ch_frame<k>.nii.gz; a "
        "segmenter would label this cine: pass --segmenter_checkpoint <segmenter.pt> (configs/train_segmenter.json, "
        "docs/segmenter.md)")


def test_no_heart_found_is_skipped(runs: dict[str, Path], cohort: tuple[Path, StandIn]) -> None:
    """The stand-in returns nothing (no_heart), a few random pixels (speckle) or the truth (no_label)."""
    report = _report(runs["segmenter"])
    assert report["subjects"]["no_label"]["labels"] == "segmenter" and report["labelled_by_segmenter"] == ["no_label"]
    skipped = {s["subject"]: s for s in report["skipped"]}
    assert set(skipped) == {"no_heart", "speckle"}
    for name in skipped:
        image = cohort[0] / name / "la_4ch.nii.gz"
        assert skipped[name]["file"] == str(image) and skipped[name]["reason"].startswith(
            f"subject {name!r}: {image}: no label file, and the segmenter stand-in.pt finds no plausible heart: LV")
        assert f"`{name}` ({image})" in (runs["segmenter"] / "report.md").read_text()
    assert "LV (label 1) in 0 of 25 frames, expected in at least half" in skipped["no_heart"]["reason"]


def test_plausibility_check() -> None:
    _, truth = synthetic_cine(25, 0)
    assert implausible(truth, (1.5, 1.5)) == ""
    assert implausible(np.where(truth == 5, 0, truth), (1.5, 1.5)) == "RA (5) in no frame, expected each of the 5 labels"
    assert implausible(truth, (0.5, 0.5)).startswith("heart extent 36 mm, outside the plausible 40-250 mm")
    assert implausible(truth, (4.0, 4.0)).startswith("heart extent 288 mm")
    few = truth.copy()
    few[..., :13][few[..., :13] == 1] = 2
    assert implausible(few, (1.5, 1.5)) == "LV (label 1) in 12 of 25 frames, expected in at least half"


# ------------------------------------------------------------------------------------------------ bad frame files
@pytest.mark.parametrize("name, shape, reason", [
    ("seg4_la_4ch_frame30.nii.gz", (120, 100), "frame 30 named in the file name, but the image"),
    ("seg4_la_4ch_frame3.nii.gz", (120, 100, 2), "found shape (120, 100, 2); expected one label frame (120, 100)"),
    ("seg4_la_4ch_frame011.nii.gz", (120, 100), "several label files name one frame: seg4_la_4ch_frame011.nii.gz"),
])
def test_bad_frame_file_skips_the_subject(cohort: tuple[Path, StandIn], tmp_path: Path, name: str,
                                          shape: tuple[int, ...], reason: str) -> None:
    root = tmp_path / "cohort"
    for subject in ("full", "files"):
        (root / subject).mkdir(parents=True)
        for path in (cohort[0] / subject).iterdir():
            (root / subject / path.name).symlink_to(path)
    _frame_file(root / "files" / name, np.ones(shape), shape)
    report = prepare(root, tmp_path / "out", num_workers=0)
    file = root / "files" / ("" if "several" in reason else name)
    assert report["prepared"] == 1 and report["skipped"][0]["file"] == str(file).rstrip("/")
    assert reason in report["skipped"][0]["reason"]


def test_end_diastole_smoothing_finds_the_broad_peak() -> None:
    """A one-frame spike beside a broad plateau: the raw argmax takes the spike, the cyclic +-2-frame mean the
    plateau (across the wrap: frames 48, 49, 0, 1, 2)."""
    area = np.full(50, 100.0)
    area[[48, 49, 0, 1, 2]] = [900, 950, 960, 940, 910]
    area[20] = 1000
    assert end_diastole(area) == 20 and end_diastole(area, 2) == 0
