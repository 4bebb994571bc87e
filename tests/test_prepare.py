"""scripts.data.prepare.prepare on a small synthetic cohort, on the real demo subject, and through the bundle CLI."""

from __future__ import annotations

import csv
import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.data import load_decathlon_datalist
from test_io import synthetic_cine, write_nifti

from scripts.data.phenotypes import PhenotypeTableError
from scripts.data.prepare import prepare, split_counts, split_subjects
from scripts.runtime.files import file_digest
from tests.conftest import run_bundle
from tests.stage_runs import prepared_folder

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ["LVEDV (mL)", "LVEF (%)"]
# subject: (frames, ED frame, heart centre); s3 starts mid-cycle, s4's heart box leaves the field of view
COHORT = {"s1": (25, 0, (60.0, 50.0)), "s2": (25, 0, (55.0, 45.0)), "s3": (30, 11, (60.0, 50.0)),
          "s4": (25, 0, (40.0, 24.0)), "s5": (20, 0, (62.0, 52.0)), "s6": (25, 0, (60.0, 50.0)),
          "s7": (25, 0, (58.0, 48.0))}
BAD, NO_PHENOTYPES = "s6", "s5"


def _write_table(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """7 subjects: s6 has NaN voxels, s5 has no phenotype row; phenotypes.csv and labels.csv."""
    root = tmp_path_factory.mktemp("cohort")
    for n, (name, (frames, ed, centre)) in enumerate(COHORT.items()):
        image, label = synthetic_cine(frames, ed, centre, seed=n)
        if name == BAD:
            image[5, 5, 3] = np.nan
        write_nifti(root / name / "la_4ch.nii.gz", image, dt=0.9 / frames)
        write_nifti(root / name / "seg4_la_4ch.nii.gz", label.astype(np.float32), dt=0.9 / frames)
    rows = [[name, 100.0 + 10 * n, 50.0 + n * n] for n, name in enumerate(COHORT) if name != NO_PHENOTYPES]
    _write_table(root / "phenotypes.csv", ["eid", *COLUMNS], rows)
    _write_table(root / "labels.csv", ["eid", "diagnosis", "sex"], [[name, "healthy", n % 2] for n, name in
                                                                    enumerate(COHORT)])
    return root


@pytest.fixture(scope="module")
def prepared(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepared_folder(cohort, tmp_path_factory.mktemp("prepared"))


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _heart_fraction(label_path: Path, box: list[list[int]]) -> float:
    """Independent check: share of the original heart voxels (all frames) inside the recorded box."""
    heart = np.asarray(nib.load(label_path).dataobj)[:, :, 0] > 0
    (x0, x1), (y0, y1) = box
    return heart[max(x0, 0):x1, max(y0, 0):y1].sum() / heart.sum()


def _lv_area(label: np.ndarray) -> np.ndarray:
    return (label[0] == 1).sum(axis=(1, 2))


def test_bad_subject_reported(prepared: Path) -> None:
    report = _report(prepared)
    assert report["found"] == 7 and report["prepared"] == 6
    assert [s["subject"] for s in report["skipped"]] == [BAD]
    assert "1 NaN and 0 infinite voxel(s)" in report["skipped"][0]["reason"]
    assert "la_4ch.nii.gz" in report["skipped"][0]["reason"] and BAD in (prepared / "report.md").read_text()
    assert not (prepared / "images" / f"{BAD}.npy").exists()


def test_outputs_shapes_and_end_diastole(prepared: Path) -> None:
    report = _report(prepared)
    for name, record in report["subjects"].items():
        image, label = np.load(prepared / "images" / f"{name}.npy"), np.load(prepared / "labels" / f"{name}.npy")
        assert image.shape == label.shape == (1, 50, 96, 96)
        assert image.dtype == np.float16 and label.dtype == np.uint8
        assert image.min() == 0.0 and image.max() == 1.0 and set(np.unique(label)) == {0, 1, 2, 3, 4, 5}
        assert np.argmax(_lv_area(label)) == 0, name
        frames, ed = COHORT[name][:2]
        assert record["ed_shift"] == ed and record["original_shape"] == [120, 100, frames]
        assert record["frame_interval_s"] == pytest.approx(0.9 / 50)
        side = [(b - a) * 1.5 for a, b in record["crop_box"]]
        assert side[0] == side[1] and record["spacing_mm"] == pytest.approx([side[0] / 96] * 2)


def test_crop_keeps_heart(prepared: Path, cohort: Path) -> None:
    boxes = {name: r["crop_box"] for name, r in _report(prepared)["subjects"].items()}
    assert min(boxes["s4"][1]) < 0  # this box leaves the field of view: zero padding
    for name, box in boxes.items():
        assert _heart_fraction(cohort / name / "seg4_la_4ch.nii.gz", box) >= 0.99


def test_splits_and_phenotype_stats(prepared: Path, cohort: Path) -> None:
    datalist = json.loads((prepared / "datalist.json").read_text())
    names = {k: [item["subject"] for item in datalist[k]] for k in ("training", "validation", "test")}
    flat = [s for subjects in names.values() for s in subjects]
    assert sorted(flat) == sorted(set(COHORT) - {BAD}) and len(flat) == len(set(flat))
    assert [len(v) for v in names.values()] == split_counts(6, (0.8, 0.1, 0.1)) == [4, 1, 1]
    assert datalist["phenotype_columns"] == COLUMNS and datalist["label_columns"] == ["diagnosis", "sex"]
    items = {item["subject"]: item for split in names for item in datalist[split]}
    assert items[NO_PHENOTYPES]["has_phenotypes"] is False and items[NO_PHENOTYPES][COLUMNS[0]] is None
    assert items["s1"]["has_phenotypes"] is True and items["s1"][COLUMNS[0]] == 100.0 and items["s2"]["sex"] == 1

    with (cohort / "phenotypes.csv").open() as f:
        values = {r["eid"]: [float(r[c]) for c in COLUMNS] for r in csv.DictReader(f)}
    stats = json.loads((prepared / "phenotype_stats.json").read_text())
    train = [values[s] for s in names["training"] if s in values]
    assert stats["n"] == len(train) and stats["columns"] == COLUMNS
    assert stats["mean"] == pytest.approx(np.mean(train, axis=0).tolist())
    everyone = [values[s] for s in flat if s in values]
    assert stats["mean"] != pytest.approx(np.mean(everyone, axis=0).tolist())
    with (prepared / "phenotypes.csv").open() as f:
        assert sorted(r["eid"] for r in csv.DictReader(f)) == sorted(set(flat) - {NO_PHENOTYPES})


def test_decathlon_datalist(prepared: Path) -> None:
    for key, n in (("training", 4), ("validation", 1), ("test", 1)):
        items = load_decathlon_datalist(prepared / "datalist.json", data_list_key=key)
        assert len(items) == n and all(Path(i["image"]).is_file() and Path(i["label"]).is_file() for i in items)


def test_bundle_cli_matches_in_process_run(prepared: Path, cohort: Path, tmp_path: Path) -> None:
    """The bundle config, with 2 worker processes, gives the same files as the in-process run."""
    result = run_bundle("configs/prepare.json", timeout=300, dataset_dir=cohort, output_dir=tmp_path, num_workers=2)
    assert "prepared 6/7 subjects" in result.stdout + result.stderr
    files = sorted(p.relative_to(prepared) for p in prepared.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    for f in files:
        assert (prepared / f).read_bytes() == (tmp_path / f).read_bytes(), f


def test_malformed_phenotypes_stop_the_run(cohort: Path, tmp_path: Path) -> None:
    bad = _write_table(tmp_path / "bad.csv", ["eid", *COLUMNS], [["s1", "12", "abc"]])
    with pytest.raises(PhenotypeTableError, match=r"bad\.csv.*non-numeric value 'abc'"):
        prepare(cohort, tmp_path / "out", phenotypes_csv=bad, num_workers=0)
    assert not (tmp_path / "out").exists()


def test_no_subject_prepared(cohort: Path, tmp_path: Path) -> None:
    root = tmp_path / "cohort"
    (root / BAD).mkdir(parents=True)
    for name in ("la_4ch.nii.gz", "seg4_la_4ch.nii.gz"):
        (root / BAD / name).symlink_to(cohort / BAD / name)
    with pytest.raises(ValueError, match="no subject could be prepared"):
        prepare(root, tmp_path / "out", num_workers=0)
    assert _report(tmp_path / "out")["skipped"][0]["subject"] == BAD


@pytest.mark.parametrize("n, counts", [(1, [1, 0, 0]), (2, [2, 0, 0]), (3, [1, 1, 1]), (10, [8, 1, 1]),
                                       (11, [9, 1, 1])])
def test_split_counts(n: int, counts: list[int]) -> None:
    assert split_counts(n, (0.8, 0.1, 0.1)) == counts


def test_split_subjects_seeded() -> None:
    subjects = [f"x{i}" for i in range(20)]
    first = split_subjects(subjects, (0.8, 0.1, 0.1), seed=3)
    assert first == split_subjects(subjects[::-1], (0.8, 0.1, 0.1), seed=3)
    assert first != split_subjects(subjects, (0.8, 0.1, 0.1), seed=4)


def test_real_demo_subject(ukbb_demo: Path, tmp_path: Path) -> None:
    report = prepare(ukbb_demo, tmp_path, num_workers=0)
    record = report["subjects"]["1"]
    assert np.load(tmp_path / "images" / "1.npy").shape == (1, 50, 96, 96)
    assert np.argmax(_lv_area(np.load(tmp_path / "labels" / "1.npy"))) == 0
    assert _heart_fraction(ukbb_demo / "1" / "seg4_la_4ch.nii.gz", record["crop_box"]) >= 0.99
    assert record["original_shape"] == [208, 180, 50] and record["frame_interval_s"] == pytest.approx(0.01752)


# ---------------------------------------------------------------------------------- reliability (issue 14)
def _small_cohort(cohort: Path, root: Path, names: tuple[str, ...] = ("s1", "s2")) -> Path:
    """Links to `names` of the module cohort (no tables) in a new folder."""
    for name in names:
        (root / name).mkdir(parents=True)
        for file in ("la_4ch.nii.gz", "seg4_la_4ch.nii.gz"):
            (root / name / file).symlink_to(cohort / name / file)
    return root


def test_any_subject_error_skips_only_that_subject(cohort: Path, tmp_path: Path) -> None:
    """An invalid NIfTI datatype code (nibabel's HeaderDataError, once re-raised, stopping the run) and a DICOM folder
    without a decodable series are skipped, with subject, file and reason in report.json and report.md."""
    root = _small_cohort(cohort, tmp_path / "cohort")
    raw = bytearray(gzip.decompress((cohort / "s3" / "la_4ch.nii.gz").read_bytes()))
    raw[70:72] = np.int16(1234).tobytes()  # NIfTI datatype code: no such type
    (root / "bad_type").mkdir()
    (root / "bad_type" / "la_4ch.nii.gz").write_bytes(gzip.compress(bytes(raw)))
    (root / "bad_type" / "seg4_la_4ch.nii.gz").symlink_to(cohort / "s3" / "seg4_la_4ch.nii.gz")
    (root / "empty_dicom" / "la_4ch.nii.gz").mkdir(parents=True)  # a folder: read as a DICOM series, none there
    (root / "no_image").mkdir()
    report = prepare(root, tmp_path / "out", num_workers=0)
    assert report["prepared"] == 2 and report["skipped_by_error"] == {"CineError": 2}
    assert report["folders_without_image"] == ["no_image"]
    skipped = {s["subject"]: s for s in _report(tmp_path / "out")["skipped"]}
    assert skipped["bad_type"]["file"] == str(root / "bad_type" / "la_4ch.nii.gz")
    assert "cannot read the image" in skipped["bad_type"]["reason"]
    assert "no DICOM file in the folder" in skipped["empty_dicom"]["reason"]
    text = (tmp_path / "out" / "report.md").read_text()
    assert all(f"`{s}` ({skipped[s]['file']})" in text for s in skipped)


def test_unexpected_errors_are_subject_errors_too(cohort: Path, tmp_path: Path, monkeypatch) -> None:
    """An error of any type inside the transforms skips the subject (named with its file and the error type); running
    out of memory stops the run."""
    def fail(*args: object) -> float:
        raise ZeroDivisionError("boom")

    monkeypatch.setattr("scripts.data.prepare.box_fraction", fail)
    root = _small_cohort(cohort, tmp_path / "cohort")
    with pytest.raises(ValueError, match="no subject could be prepared"):
        prepare(root, tmp_path / "out", num_workers=0)
    report = _report(tmp_path / "out")
    assert report["skipped_by_error"] == {"ZeroDivisionError": 2}
    assert report["skipped"][0]["reason"] == (f"subject 's1': {root / 's1' / 'la_4ch.nii.gz'}: preprocessing failed "
                                              "(ZeroDivisionError: boom)")
    assert "ZeroDivisionError: boom" in (tmp_path / "out" / "report.md").read_text()

    def out_of_memory(*args: object) -> float:
        raise MemoryError

    monkeypatch.setattr("scripts.data.prepare.box_fraction", out_of_memory)
    with pytest.raises(RuntimeError) as error:
        prepare(root, tmp_path / "out2", num_workers=0)
    assert isinstance(error.value.__cause__, MemoryError)


@pytest.mark.parametrize("where", ["same", "inside", "containing"])
def test_output_overlapping_the_dataset_is_refused(cohort: Path, tmp_path: Path, where: str) -> None:
    """prepare with --output_dir = --dataset_dir rewrote the source phenotypes.csv, exit 0."""
    root = tmp_path / "data" / "cohort"
    shutil.copytree(cohort, root, symlinks=True)
    before = {p: file_digest(p) for p in root.rglob("*") if p.is_file()}
    out = {"same": root, "inside": root / "prepared", "containing": tmp_path / "data"}[where]
    with pytest.raises(ValueError, match=f"--output_dir {out} .* --dataset_dir {root}"):
        prepare(root, out, num_workers=0)
    assert {p: file_digest(p) for p in root.rglob("*") if p.is_file()} == before
