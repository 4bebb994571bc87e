"""Corruption sweep of preprocessing (issue 14): seeded random corruptions of a small phantom cohort's files (NIfTI
headers and bytes, truncation, pixel data, DICOM tags and bytes, table cells, a deleted file), each followed by a
prepare run. Checks that a per-subject fault never stops the run, that every skipped subject has a file and a reason,
that a table fault ends in one error naming the table, and that no input file changes. Prints the counts; exit 1 on
any failed check.

    python tests/corruption_sweep.py --n 200 --out /tmp/sweep [--seed 0 --subjects 3]
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import shutil
import sys
import traceback
import warnings
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: the bundle's `scripts` and `tests` packages

import nibabel as nib
import numpy as np
import pydicom
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLSLossless, generate_uid

from scripts.data.phantom import make_cohort
from scripts.data.phenotypes import PhenotypeTableError
from scripts.data.prepare import prepare
from scripts.runtime.files import file_digest
from tests.test_io import write_dicom_series

NIFTI_HEADER = 348  # bytes of a NIfTI-1 header
DICOM_IMAGE, NIFTI_IMAGE, LABEL = "la_4ch_dicom", "la_4ch.nii.gz", "seg4_la_4ch.nii.gz"
TABLES = ("phenotypes.csv", "labels.csv")


# -------------------------------------------------------------------------------------------------------- the cohort
def build_cohort(root: Path, subjects: int, seed: int) -> Path:
    """A phantom cohort whose subjects also hold their image as a DICOM series folder (`DICOM_IMAGE`)."""
    make_cohort(root, subjects, seed=seed, num_workers=1, montage_subjects=0)
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        image = nib.load(folder / NIFTI_IMAGE)
        cine = np.asarray(image.dataobj)[:, :, 0]
        dt_ms = float(image.header.get_zooms()[3]) * 1000.0
        spacing = tuple(float(v) for v in image.header.get_zooms()[:2])
        write_dicom_series(folder / DICOM_IMAGE, cine, spacing, list(range(1, cine.shape[2] + 1)),
                           {"TriggerTime": dt_ms})
    return root


# ------------------------------------------------------------------------------------------------------- corruptions
def _gz_edit(path: Path, edit) -> None:
    raw = bytearray(gzip.decompress(path.read_bytes()))
    edit(raw)
    path.write_bytes(gzip.compress(bytes(raw)))


def _random_bytes(rng: np.random.Generator, raw: bytearray, lo: int, hi: int, count: int) -> None:
    for at in rng.integers(lo, max(hi, lo + 1), count):
        raw[int(at)] = int(rng.integers(0, 256))


def nifti_header(rng: np.random.Generator, path: Path) -> str:
    _gz_edit(path, lambda raw: _random_bytes(rng, raw, 0, NIFTI_HEADER, int(rng.integers(1, 5))))
    return "NIfTI header bytes"


def nifti_pixels(rng: np.random.Generator, path: Path) -> str:
    _gz_edit(path, lambda raw: _random_bytes(rng, raw, NIFTI_HEADER + 4, len(raw), int(rng.integers(1, 200))))
    return "NIfTI pixel bytes"


def raw_bytes(rng: np.random.Generator, path: Path) -> str:
    raw = bytearray(path.read_bytes())
    _random_bytes(rng, raw, 0, min(len(raw), 2048), int(rng.integers(1, 9)))
    path.write_bytes(bytes(raw))
    return "file bytes (first 2 kB)"


def truncate(rng: np.random.Generator, path: Path) -> str:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * rng.uniform(0.0, 0.98))])
    return "truncated"


def delete(rng: np.random.Generator, path: Path) -> str:
    path.unlink()
    return "deleted"


DICOM_TAGS = {
    "ImageOrientationPatient": lambda ds, rng: setattr(ds, "ImageOrientationPatient", [0, 1, 0, 0, 0, -1]),
    "ImagePositionPatient": lambda ds, rng: setattr(ds, "ImagePositionPatient", [0, 0, 8]),
    "TriggerTime": lambda ds, rng: setattr(ds, "TriggerTime", 0.0),
    "InstanceNumber": lambda ds, rng: delattr(ds, "InstanceNumber"),
    "SeriesInstanceUID": lambda ds, rng: setattr(ds, "SeriesInstanceUID", generate_uid()),
    "Rows": lambda ds, rng: setattr(ds, "Rows", int(ds.Rows) + int(rng.integers(1, 50))),
    "BitsAllocated": lambda ds, rng: setattr(ds, "BitsAllocated", 8),
    "TransferSyntaxUID": lambda ds, rng: _jpeg_ls(ds),
}


def _jpeg_ls(ds: pydicom.Dataset) -> None:
    """Mark the file JPEG-LS compressed, its pixel data an encapsulated junk stream that pyjpegls refuses."""
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8 not a JPEG-LS stream \xff\xd9"])
    ds["PixelData"].VR = "OB"


def _non_numeric_spacing(path: Path) -> None:
    """PixelSpacing's first value replaced by 'abc' in the file's bytes (pydicom refuses to set such a value)."""
    old = pydicom.dcmread(path, stop_before_pixels=True).get_item(0x00280030).value  # the raw, unconverted bytes
    path.write_bytes(path.read_bytes().replace(old, b"abc" + old[3:], 1))


def dicom_tag(rng: np.random.Generator, path: Path) -> str:
    tags = [*DICOM_TAGS, "PixelSpacing"]
    tag = tags[int(rng.integers(len(tags)))]
    if tag == "PixelSpacing":
        _non_numeric_spacing(path)
        return f"DICOM tag {tag}"
    ds = pydicom.dcmread(path)
    DICOM_TAGS[tag](ds, rng)
    ds.save_as(path)
    return f"DICOM tag {tag}"


CELLS = ["abc", "", "nan", "1e999", "-", "\x00\xff", "PH000000"]


def table_cell(rng: np.random.Generator, path: Path) -> str:
    lines = path.read_text(encoding="utf-8").splitlines()
    row = int(rng.integers(0, len(lines)))
    cells = lines[row].split(",")
    column = int(rng.integers(0, len(cells)))
    cells[column] = CELLS[int(rng.integers(len(CELLS)))]
    lines[row] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return f"table cell (row {row + 1}, column {column + 1}) = {cells[column]!r}"


def corrupt(rng: np.random.Generator, root: Path, dicom: bool) -> tuple[str, Path]:
    """Apply one random corruption to one file of the cohort `root`; (what was done, the file)."""
    subjects = sorted(p for p in root.iterdir() if p.is_dir())
    subject = subjects[int(rng.integers(len(subjects)))]
    kind = rng.choice(["header", "pixels", "bytes", "truncate", "tag", "table", "delete"])
    if kind == "table":
        path = root / TABLES[int(rng.integers(len(TABLES)))]
        return table_cell(rng, path), path
    if dicom and kind in ("header", "pixels", "tag", "bytes", "truncate") and rng.random() < 0.7:
        files = sorted((subject / DICOM_IMAGE).iterdir())
        path = files[int(rng.integers(len(files)))]
        action = {"tag": dicom_tag, "truncate": truncate}.get(kind, raw_bytes)
        return action(rng, path), path
    path = subject / (LABEL if dicom or rng.random() < 0.3 else NIFTI_IMAGE)  # a DICOM run reads no NIfTI image
    action = {"header": nifti_header, "pixels": nifti_pixels, "bytes": raw_bytes, "truncate": truncate,
              "delete": delete, "tag": nifti_header}[kind]
    return action(rng, path), path


# -------------------------------------------------------------------------------------------------------------- run
def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): file_digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


def trial(base: Path, work: Path, rng: np.random.Generator, dicom: bool) -> tuple[str, str, str, list[str]]:
    """One corruption and prepare run: (outcome, what was corrupted, the first reason or error, failed checks)."""
    shutil.rmtree(work, ignore_errors=True)
    data = work / "cohort"
    shutil.copytree(base, data)
    what, path = corrupt(rng, data, dicom)
    before, failed, reason = digests(data), [], ""
    out = work / "prepared"
    try:
        report = prepare(data, out, num_workers=0, image_name=DICOM_IMAGE if dicom else NIFTI_IMAGE,
                         label_name=LABEL)
        outcome = "skipped" if report["skipped"] else "prepared all"
        reason = report["skipped"][0]["reason"] if report["skipped"] else ""
        saved = json.loads((out / "report.json").read_text())
        text = (out / "report.md").read_text()
        failed += [f"skipped {s['subject']} without a file or reason" for s in saved["skipped"]
                   if not (s.get("file") and s.get("reason") and s["subject"] in s["reason"])]
        failed += [f"skipped {s['subject']} not in report.md" for s in saved["skipped"] if f"`{s['subject']}`" not in text]
    except PhenotypeTableError as error:
        outcome, reason = "table error", str(error)
        if path.name not in TABLES or str(path) not in str(error) or "\n" in str(error):
            failed.append(f"table error that does not name the corrupted table on one line: {error}")
    except Exception as error:  # noqa: BLE001 (a crash is what the sweep counts)
        outcome, reason = "crash", str(error)
        failed.append("".join(traceback.format_exception(error))[-3000:])
    if digests(data) != before:
        failed.append("an input file changed")
    return outcome, what, reason, failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="number of corruptions")
    parser.add_argument("--out", type=Path, required=True, help="work folder (emptied first)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--subjects", type=int, default=3, help="phantom subjects in the cohort")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    warnings.simplefilter("ignore")  # pydicom's and MONAI's warnings about the corrupted files
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE  # write invalid values (the corruption)
    shutil.rmtree(args.out, ignore_errors=True)
    base = build_cohort(args.out / "base", args.subjects, args.seed)
    rng = np.random.default_rng(args.seed)
    outcomes, kinds, examples, failures = Counter(), Counter(), {}, []
    for k in range(args.n):
        outcome, what, reason, failed = trial(base, args.out / "trial", rng, dicom=bool(k % 2))
        outcomes[outcome] += 1
        key = (what.split(" (")[0].split(" = ")[0], outcome)
        kinds[key] += 1
        examples.setdefault(key, reason.split(": ", 2)[-1][:150])
        failures += [f"trial {k} ({what}): {f}" for f in failed]
    shutil.rmtree(args.out / "trial", ignore_errors=True)
    print(f"{args.n} corruptions (seed {args.seed}, {args.subjects} subjects, NIfTI and DICOM runs alternating)")
    print("outcomes:", dict(outcomes))
    for (what, outcome), count in sorted(kinds.items()):
        print(f"  {what:30s} {outcome:13s} {count:4d}  {examples[what, outcome]}")
    print(f"failed checks: {len(failures)}")
    for failure in failures:
        print(" -", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
