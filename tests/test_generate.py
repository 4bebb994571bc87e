"""Cine generation (configs/generate.json, scripts/generation.py) with tiny random networks: outputs, per-sample seeds,
resume, sharding, conditions and their errors, checkpoints."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import load_decathlon_datalist

from scripts.data.cine_files import load_cine
from scripts.data.cohort import read_stats
from scripts.data.dicom_export import SCALE
from scripts.data.phenotypes import PhenotypeTableError, normalise
from scripts.generation.acquisition import fit_acquisition, noise_sd
from scripts.generation.autoencoder import CineAutoencoderKL
from scripts.generation.generate import CHECKPOINTS_KEY, Sampling, generate, is_done, read_conditions, sample_seed
from scripts.generation.mar import MAR
from scripts.generation.phenotype_vae import PhenotypeVAE, phenotype_vectors
from scripts.runtime.files import ORPHAN_AGE_S
from tests.conftest import ONE_THREAD, REPO, bundle_command, bundle_env, run_bundle
from tests.networks import def_kwargs

torch.set_num_threads(1)
COLUMNS = ["LVEDV (mL)", "LVEF (%)", "HR (bpm)"]
STATS = {"columns": COLUMNS, "mean": [150.0, 58.0, 65.0], "std": [30.0, 6.0, 10.0], "n": 8}
SPACING, INTERVALS = [[1.9, 2.0], [2.1, 2.2], [2.0, 2.1]], [0.018, 0.02, 0.022]  # medians (2.0, 2.1) mm, 0.02 s
FAST = {"profile": "tiny", "sampling": Sampling(num_iter=2, num_inference_steps=3)}


def _networks() -> dict:
    return {"phenotype_vae": PhenotypeVAE(len(COLUMNS)),
            "autoencoder": CineAutoencoderKL(**def_kwargs("autoencoder_def", "tiny")),
            "mar": MAR(len(COLUMNS), **def_kwargs("mar_def", "tiny"))}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """<root>/prepared (datalist.json, phenotype_stats.json) and <root>/models (random tiny checkpoints)."""
    root = tmp_path_factory.mktemp("generate")
    prepared, models = root / "prepared", root / "models"
    prepared.mkdir()
    models.mkdir()
    items = [{"image": f"images/P{i}.npy", "subject": f"P{i}", "has_phenotypes": True, "spacing_mm": SPACING[i],
              "frame_interval_s": INTERVALS[i], **dict(zip(COLUMNS, STATS["mean"]))} for i in range(len(SPACING))]
    (prepared / "datalist.json").write_text(json.dumps({"training": items, "phenotype_columns": COLUMNS}))
    (prepared / "phenotype_stats.json").write_text(json.dumps(STATS))
    torch.manual_seed(0)
    nets = _networks()
    with torch.no_grad():  # the MAR head is zero-initialised: perturb every weight so that samples depend on z
        for p in nets["mar"].parameters():
            p.add_(0.05 * torch.randn_like(p))
        nets["mar"].latent_scale.fill_(0.5)
        last = [m for m in nets["autoencoder"].decoder.modules() if isinstance(m, torch.nn.Conv3d)][-1]
        last.weight.mul_(20.0)  # decoded values around 0.5 +- 0.2 rather than 0 +- 0.01 (all clamped to 0)
        last.bias.fill_(0.5)
    for name, net in nets.items():
        torch.save(net.state_dict(), models / f"{name}.pt")
    return root


def _run(setup: Path, out: Path, ckpt_dir: Path | None = None, **kwargs) -> dict:
    args = {"ckpt_dir": str(ckpt_dir or setup / "models"), "output_dir": str(out),
            "prepared_dir": str(setup / "prepared"), "stats": read_stats(setup / "prepared" / "phenotype_stats.json"),
            "num_samples": 4, "batch_size": 4,
            **FAST, **kwargs}
    return generate(**_networks(), **args)


def _manifest(out: Path) -> list[dict]:
    with (out / "manifest.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _assert_same_sample(a: np.ndarray, b: np.ndarray) -> None:
    """The same sample up to float32 rounding, which the sampler of these random networks amplifies at a few voxels
    near its x0 clamp (measured: 25 of 460,800 voxels differ by up to 0.0023); different samples differ by > 0.01
    almost everywhere."""
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    assert diff.max() <= 5e-3 and diff.mean() <= 1e-5, (diff.max(), diff.mean())


def _cine(out: Path, i: int) -> np.ndarray:
    return np.load(out / "images" / f"G{i:06d}.npy").astype(np.float32)


@pytest.fixture(scope="module")
def batch4(setup: Path) -> Path:
    """Four samples generated in one batch (phenotype-VAE conditions)."""
    out = setup / "batch4"
    _run(setup, out)
    return out


GENERATE = ["configs/generate.json", "configs/profiles/tiny.json"]


def _bundle_args(setup: Path, out: Path, num_samples: int, batch_size: int, **more: object) -> dict:
    """Overrides of configs/generate.json for the tiny networks of `setup`, few sampling steps, into `out`."""
    return {"prepared_dir": setup / "prepared", "ckpt_dir": setup / "models", "output_dir": out,
            "num_samples": num_samples, "batch_size": batch_size, "num_iter": 2, "num_inference_steps": 3, **more}


def _bundle(setup: Path, out: Path, num_samples: int, batch_size: int, launcher: tuple[str, ...] = (),
            **more: object) -> None:
    """Run configs/generate.json with the tiny profile (through `launcher`, e.g. torchrun) in a subprocess."""
    run_bundle(GENERATE, launcher=launcher, env=ONE_THREAD, timeout=300,
               **_bundle_args(setup, out, num_samples, batch_size, **more))


def test_bundle_run(setup: Path) -> None:
    out = setup / "bundle"
    _bundle(setup, out, num_samples=3, batch_size=2, dicom=True)

    rows = _manifest(out)
    assert list(rows[0]) == ["file", "nifti", "seed", *COLUMNS] and len(rows) == 3
    _, conditions = read_conditions(out / "conditions.csv", STATS, 3)
    for i, row in enumerate(rows):
        assert row["file"] == f"images/G{i:06d}.npy" and int(row["seed"]) == sample_seed(0, i)
        np.testing.assert_array_equal([float(row[c]) for c in COLUMNS], conditions[i])
        cine = np.load(out / row["file"])
        assert cine.dtype == np.float16 and cine.shape == (1, 50, 96, 96) and 0 <= cine.min() <= cine.max() <= 1
        img = nib.load(out / row["nifti"])
        assert img.shape == (96, 96, 1, 50)
        np.testing.assert_allclose(img.header.get_zooms(), (2.0, 2.1, 2.0, 0.02), rtol=1e-6)
        np.testing.assert_allclose(img.affine, np.diag([-2.0, -2.1, 2.0, 1.0]), rtol=1e-6)  # X toward L, Y toward P
        assert img.header["descrip"].item().decode() == f"CPGG synthetic cine, tiny, seed {sample_seed(0, i)}"
        loaded = load_cine(out / row["nifti"])  # the loader prepare uses: H, W of the array are X, Y
        assert loaded.frame_interval_s == pytest.approx(0.02) and loaded.orientation.endswith("as stored")
        np.testing.assert_array_equal(loaded.array, cine[0].astype(np.float32).transpose(1, 2, 0))
        series = load_cine(out / "dicom" / f"G{i:06d}")  # --dicom True: the same cine as a DICOM MR series
        np.testing.assert_allclose(series.array, loaded.array, atol=0.5 / SCALE + 1e-6)
        np.testing.assert_allclose(series.affine, loaded.affine, atol=1e-5)
        assert series.spacing_mm == pytest.approx(loaded.spacing_mm) and series.frame_interval_s == pytest.approx(0.02)
    items = load_decathlon_datalist(str(out / "datalist.json"), False, "training", str(out))
    assert [Path(d["image"]) for d in items] == [out / r["file"] for r in rows]
    assert all(d["synthetic"] and d["has_phenotypes"] for d in items)
    subjects, x = phenotype_vectors(out, "training")  # the folder reads as a prepared one
    assert subjects == ["G000000", "G000001", "G000002"]
    np.testing.assert_allclose(x.numpy(), normalise(conditions, STATS), rtol=1e-5, atol=1e-6)
    record = json.loads((out / "generation.json").read_text())
    assert record["settings"]["profile"] == "tiny" and record["generated_this_run"] == 3
    assert record["dicom_series_this_run"] == 3 and "dicom" not in record["settings"]
    assert record["sampling_s_per_clip"] > 0 and record["decoding_s_per_clip"] > 0
    assert (out / "montage.png").is_file() and (out / "montage.gif").is_file()


def test_sample_alone_equals_sample_in_batch(setup: Path, batch4: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")  # rank 3 of 4 owns only index 3
    out = setup / "alone"
    _run(setup, out)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["G000003.npy"]
    _assert_same_sample(_cine(out, 3), _cine(batch4, 3))
    assert np.abs(_cine(batch4, 3) - _cine(batch4, 2)).max() > 0.01  # samples differ


def test_resume_regenerates_only_missing(setup: Path, batch4: Path) -> None:
    files = sorted(p for d in ("images", "nifti") for p in (batch4 / d).iterdir())
    before = {p: p.stat().st_mtime_ns for p in files}
    old = _cine(batch4, 1)
    (batch4 / "images" / "G000001.npy").unlink()
    record = _run(setup, batch4)
    assert record["generated_this_run"] == 1
    changed = sorted(p.name for p in files if p.stat().st_mtime_ns != before[p])
    assert changed == ["G000001.nii.gz", "G000001.npy"]
    _assert_same_sample(_cine(batch4, 1), old)
    assert len(_manifest(batch4)) == 4
    written = {p: p.stat().st_mtime_ns for p in files}
    record = _run(setup, batch4, dicom=True)  # a first --dicom run on finished samples: their series from the .npy
    assert (record["generated_this_run"], record["dicom_series_this_run"]) == (0, 4)
    assert all(p.stat().st_mtime_ns == written[p] for p in files)  # nothing generated again
    assert sorted(p.name for p in (batch4 / "dicom").iterdir()) == [f"G{i:06d}" for i in range(4)]
    series = {p: p.stat().st_mtime_ns for p in (batch4 / "dicom").rglob("*.dcm")}
    (batch4 / "images" / "G000002.npy").unlink()
    record = _run(setup, batch4, dicom=True)  # a regenerated sample gets a new series, the others are kept
    assert (record["generated_this_run"], record["dicom_series_this_run"]) == (1, 1)
    assert {p.parent.name for p in series if p.stat().st_mtime_ns != series[p]} == {"G000002"}


def test_sharding(setup: Path, batch4: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = setup / "shards"
    monkeypatch.setenv("WORLD_SIZE", "2")
    owned = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        before = {p.name for p in (out / "images").glob("*.npy")} if out.exists() else set()
        _run(setup, out, batch_size=1)
        owned.append({p.name for p in (out / "images").glob("*.npy")} - before)
        assert len(_manifest(out)) == 2 * (rank + 1)  # partial after rank 0, complete after the last rank
    assert owned == [{"G000000.npy", "G000002.npy"}, {"G000001.npy", "G000003.npy"}]
    assert _manifest(out) == _manifest(batch4)
    for i in range(4):
        _assert_same_sample(_cine(out, i), _cine(batch4, i))


def test_other_settings_refused(setup: Path, batch4: Path) -> None:
    with pytest.raises(ValueError, match="other settings.*cfg"):
        _run(setup, batch4, sampling=Sampling(cfg=2.0, num_iter=2, num_inference_steps=3))


def test_a_changed_checkpoint_is_refused_naming_it(setup: Path, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    ckpt, out = tmp_path / "models", tmp_path / "out"
    shutil.copytree(setup / "models", ckpt)
    first = _run(setup, out, ckpt_dir=ckpt, unconditional=True, num_samples=1)
    assert set(first["settings"][CHECKPOINTS_KEY]) == {"autoencoder.pt", "mar.pt"}  # the VAE: not loaded
    state = torch.load(ckpt / "mar.pt", weights_only=True)
    torch.save({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}, ckpt / "mar.pt")  # retrained
    with pytest.raises(ValueError, match=re.escape(f"{out} holds samples generated with other settings or checkpoints")
                       + r" \(mar\.pt changed \(SHA-256 [0-9a-f]{12}\.\.\. then, [0-9a-f]{12}\.\.\. now\)\)"):
        _run(setup, out, ckpt_dir=ckpt, unconditional=True, num_samples=1)
    record = json.loads((out / "generation.json").read_text())
    del record["settings"][CHECKPOINTS_KEY]  # a folder of a version that recorded no digests: resumed, with a warning
    (out / "generation.json").write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING, logger="scripts.generation"):
        again = _run(setup, out, ckpt_dir=ckpt, unconditional=True, num_samples=1)
    assert again["generated_this_run"] == 0 and "records no checkpoint digests" in caplog.text


def test_a_folder_generate_did_not_make_is_refused_unless_overwrite(setup: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    (out / "notes.txt").write_text("a user's file")
    np.save(out / "images" / "G000000.npy", np.zeros(3))  # not a sample of this run
    (out / "nifti").mkdir()
    (out / "nifti" / "G000000.nii.gz").write_bytes(b"")
    message = f"--output_dir {out} holds images/, nifti/, notes.txt but no generation.json: generate would write over"
    with pytest.raises(ValueError, match=re.escape(message) + ".*--overwrite True"):
        _run(setup, out, unconditional=True, num_samples=2)
    assert not (out / "generation.json").exists()
    record = _run(setup, out, unconditional=True, num_samples=2, overwrite=True)
    assert record["generated_this_run"] == 2 and _cine(out, 0).shape == (1, 50, 96, 96)  # the stale file replaced
    assert (out / "notes.txt").read_text() == "a user's file"  # other files are left alone
    assert _run(setup, out, unconditional=True, num_samples=2)["generated_this_run"] == 0  # now it resumes


def _sample_names(out: Path) -> dict[str, list[str]]:
    return {sub: sorted(p.name for p in (out / sub).iterdir()) for sub in ("images", "nifti")}


def _kill_point(out: Path) -> bool:
    """2 samples finished (the NIfTI is written after the .npy) and an atomic write under way, or 8 finished."""
    finished = len(list((out / "nifti").glob("G*.nii.gz")))
    return finished >= 8 or (finished >= 2 and any(out.rglob(".tmp-*")))


def test_kill_9_mid_run_then_a_rerun_leaves_every_sample_once(setup: Path, tmp_path: Path) -> None:
    """SIGKILL once 2 samples are on disk and a file is being written (at the latest once 8 are), then the same
    command again: the samples of an uninterrupted run, each once, no temporary file, an index listing each once."""
    n, killed, reference, log = 12, tmp_path / "killed", tmp_path / "reference", tmp_path / "killed.log"
    with log.open("w") as sink:  # a file, not a pipe: a full pipe would stall the run
        proc = subprocess.Popen(bundle_command(GENERATE, **_bundle_args(setup, killed, n, 2)), cwd=REPO,
                                env=bundle_env(ONE_THREAD), stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: the kill reaches every process
    deadline = time.monotonic() + 300
    while not _kill_point(killed):
        assert proc.poll() is None, f"generate ended before it could be killed:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no sample within 300 s"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    finished = [i for i in range(n) if is_done(killed, i)]
    assert 2 <= len(finished) < n, finished
    left = list(killed.rglob(".tmp-*"))
    print(f"killed with {len(finished)} of {n} samples finished, temporary files left: "
          f"{[p.relative_to(killed).as_posix() for p in left]}")
    hour_ago = time.time() - 2 * ORPHAN_AGE_S  # temporaries younger than an hour may be a running rank's: left alone
    for tmp in left:
        os.utime(tmp, (hour_ago, hour_ago))
    _bundle(setup, killed, n, 2)
    _bundle(setup, reference, n, 2)
    record = json.loads((killed / "generation.json").read_text())
    assert record["generated_this_run"] == n - len(finished)
    assert _sample_names(killed) == _sample_names(reference) == {
        "images": [f"G{i:06d}.npy" for i in range(n)], "nifti": [f"G{i:06d}.nii.gz" for i in range(n)]}
    assert not list(killed.rglob(".tmp-*"))
    assert _manifest(killed) == _manifest(reference) and len(_manifest(killed)) == n
    items = json.loads((killed / "datalist.json").read_text())["training"]
    assert [d["subject"] for d in items] == [f"G{i:06d}" for i in range(n)]
    for i in range(n):  # a batch of other composition after the kill: float32 rounding (_assert_same_sample)
        _assert_same_sample(_cine(killed, i), _cine(reference, i))
        np.testing.assert_array_equal(load_cine(killed / "nifti" / f"G{i:06d}.nii.gz").array,
                                      _cine(killed, i)[0].transpose(1, 2, 0))  # the pair is of one draw


def test_output_overlapping_an_input_refused(setup: Path) -> None:
    datalist = (setup / "prepared" / "datalist.json").read_bytes()
    for out, match in ((setup / "prepared", "--output_dir .* is --prepared_dir"),
                       (setup, "--output_dir .* contains --prepared_dir"),
                       (setup / "models" / "generated", "--output_dir .* lies inside --ckpt_dir")):
        with pytest.raises(ValueError, match=match):
            _run(setup, out)
    assert (setup / "prepared" / "datalist.json").read_bytes() == datalist  # the real datalist untouched
    assert not (setup / "models" / "generated").exists()


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


@pytest.mark.parametrize("header, row, match", [
    (["eid", "LVEDV (mL)", "HR (bpm)"], ["a", 150, 60], r"columns not in the table: \['LVEF \(%\)'\]"),
    (["eid", *COLUMNS], ["a", 150, "nan", 60], r"row 2, eid 'a', column 'LVEF \(%\)': missing value"),
    (["eid", *COLUMNS], ["a", 150, "", 60], r"row 2, eid 'a', column 'LVEF \(%\)': missing value"),
    (["eid", *COLUMNS], ["a", 150, 55, "fast"], r"row 2, eid 'a', column 'HR \(bpm\)': non-numeric"),
])
def test_bad_conditions_csv(setup: Path, tmp_path: Path, header: list[str], row: list, match: str) -> None:
    path = _write_csv(tmp_path / "conditions.csv", header, [row])
    with pytest.raises(PhenotypeTableError, match=match) as err:
        _run(setup, tmp_path / "out", conditions_csv=str(path))
    assert isinstance(err.value, ValueError) and str(path) in str(err.value)


def test_conditions_csv_far_out_warns_and_generates(setup: Path, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    rows = [["normal", 150, 58, 65], ["huge", 150 + 30 * 7, 58, 65], ["unused", 150, 58, 65]]
    path = _write_csv(tmp_path / "conditions.csv", ["eid", "HR (bpm)", *COLUMNS[:2]],
                      [[r[0], r[3], r[1], r[2]] for r in rows])  # any column order
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="scripts.generation"):
        _run(setup, out, conditions_csv=str(path), num_samples=2)  # the first 2 rows only
    assert "huge" in caplog.text and "LVEDV (mL)" in caplog.text and "'normal'" not in caplog.text
    manifest = _manifest(out)
    assert [[float(r[c]) for c in COLUMNS] for r in manifest] == [[float(v) for v in r[1:]] for r in rows[:2]]


def test_unconditional(setup: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _run(setup, out, unconditional=True, num_samples=2, seed=5)
    assert [r[c] for r in _manifest(out) for c in COLUMNS] == [""] * 6
    datalist = json.loads((out / "datalist.json").read_text())
    assert datalist["phenotype_columns"] == COLUMNS
    assert all(not d["has_phenotypes"] and d[COLUMNS[0]] is None for d in datalist["training"])
    nets = _networks()
    for name in ("mar", "autoencoder"):
        nets[name].load_state_dict(torch.load(setup / "models" / f"{name}.pt", weights_only=True))
    latents = nets["mar"].eval().sample_latents(None, seeds=[sample_seed(5, 1)], num_iter=2, num_inference_steps=3)
    with torch.no_grad():
        expected = nets["autoencoder"].eval().decode(latents).clamp(0, 1)[0].numpy()
    _assert_same_sample(_cine(out, 1), expected)


def test_checkpoint_errors(setup: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "models"
    ckpt.mkdir()
    torch.save(CineAutoencoderKL(**def_kwargs("autoencoder_def", "tiny")).state_dict(), ckpt / "autoencoder.pt")
    with pytest.raises(FileNotFoundError, match=r"mar\.pt: checkpoint not found.*configs/train_mar\.json"):
        _run(setup, tmp_path / "out", ckpt_dir=ckpt, unconditional=True)
    torch.save(MAR(len(COLUMNS) + 2, **def_kwargs("mar_def", "tiny")).state_dict(), ckpt / "mar.pt")
    with pytest.raises(ValueError, match=r"mar\.pt: checkpoint does not match MAR of MAR profile 'tiny'.*cond_proj"):
        _run(setup, tmp_path / "out", ckpt_dir=ckpt, unconditional=True)
    with pytest.raises(FileNotFoundError, match=r"phenotype_vae\.pt.*configs/train_phenotype_vae\.json"):
        _run(setup, tmp_path / "out2", ckpt_dir=ckpt)


@pytest.mark.slow  # about 20 s on 2 cores: two processes import MONAI
def test_torchrun_two_ranks(setup: Path, batch4: Path) -> None:
    """Two concurrent ranks under torchrun (env RANK/WORLD_SIZE, no process group): disjoint shards, complete index."""
    out = setup / "torchrun"
    _bundle(setup, out, num_samples=4, batch_size=4,
            launcher=("torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"))
    record = json.loads((out / "generation.json").read_text())  # written last by the last rank to finish
    assert (record["world_size"], record["generated_this_run"]) == (2, 2)
    assert _manifest(out) == _manifest(batch4)
    for i in range(4):
        _assert_same_sample(_cine(out, i), _cine(batch4, i))


def test_geometry_follows_the_conditions(tmp_path: Path) -> None:
    """Pixel size grows with the heart (crop side / 96) and the frame interval is 60 / (50 HR): the geometry model
    recovers both from the phenotypes of training items, clips to the training range, and falls back to medians."""
    rng = np.random.default_rng(0)
    edv, ef, hr = rng.uniform(90, 250, 40), rng.uniform(35, 70, 40), rng.uniform(50, 90, 40)
    pixel = 0.4 * edv ** (1 / 3)  # mm: an exact power law, linear in log(LVEDV)
    items = [{"subject": f"P{i}", "has_phenotypes": True, "LVEDV (mL)": edv[i], "LVEF (%)": ef[i], "HR (bpm)": hr[i],
              "spacing_mm": [pixel[i], pixel[i]], "frame_interval_s": 60.0 / (50 * hr[i])} for i in range(40)]
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": items}))
    stats = {"columns": COLUMNS, "mean": [edv.mean(), ef.mean(), hr.mean()], "std": [edv.std(), ef.std(), hr.std()]}
    model = fit_acquisition(tmp_path, stats)
    assert model.record()["method"] == "ridge regression on the phenotypes" and min(model.r2) > 0.999
    query = np.array([[120.0, 60.0, 60.0], [220.0, 40.0, 80.0], [5000.0, 50.0, 70.0]])  # the last: far out
    pred = model.predict(query, 3)
    np.testing.assert_allclose(pred[:2, 0], 0.4 * query[:2, 0] ** (1 / 3), rtol=0.01)
    np.testing.assert_allclose(pred[:2, 2], 60.0 / (50 * query[:2, 2]), rtol=0.01)
    assert pred[2, 0] == pytest.approx(pixel.max())  # clipped to the training range
    medians = np.exp(np.median(np.log([pixel, pixel, 60 / (50 * hr)]), axis=1))  # medians of the logs
    np.testing.assert_allclose(model.predict(None, 2), [medians, medians])
    path.write_text(json.dumps({"training": items[:5]}))  # 5 items for 3 columns: too few to fit, medians
    few = fit_acquisition(tmp_path, stats)
    assert few.record()["method"] == "training medians"
    np.testing.assert_allclose(few.predict(query, 3), np.tile(np.exp(few.median), (3, 1)))


def _noisy_cine(sd: float, seed: int, frames: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """(T, 96, 96) cine: a static background of two levels, a pulsing disc (label 1), Rician noise of `sd`."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:96, :96]
    clean = np.where(xx < 48, 0.1, 0.4)[None].repeat(frames, 0)
    radius = 15 + 5 * np.sin(np.linspace(0, 2 * np.pi, frames))[:, None, None]
    disc = (yy - 48) ** 2 + (xx - 48) ** 2 < radius ** 2
    clean = np.where(disc, 0.8, clean)
    noisy = np.hypot(clean + rng.normal(0, sd, clean.shape), rng.normal(0, sd, clean.shape))
    return noisy.astype(np.float16), disc.astype(np.uint8)


def test_noise_estimate_measures_the_static_background() -> None:
    for sd in (0.01, 0.03):
        image, label = _noisy_cine(sd, 0)
        assert noise_sd(image.astype(np.float32), label) == pytest.approx(sd, rel=0.1)
    assert noise_sd(np.zeros((5, 96, 96), np.float32), None) == 0.0
    assert noise_sd(_noisy_cine(0.02, 1)[0][:1].astype(np.float32), None) is None  # one frame: no difference
    assert noise_sd(np.zeros((5, 96, 96), np.float32), np.ones((5, 96, 96), np.uint8)) is None  # all heart


def test_acquisition_noise_at_training_levels(setup: Path, tmp_path: Path) -> None:
    """Training cines with known noise: each sample gets one of their levels, drawn with its seed, as Rician noise on
    the decoder's output; acquisition_noise False leaves the output as decoded."""
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    datalist = json.loads((setup / "prepared" / "datalist.json").read_text())
    (prepared / "images").mkdir()
    levels = (0.02, 0.04, 0.06)
    for i, (item, sd) in enumerate(zip(datalist["training"], levels)):
        image, label = _noisy_cine(sd, i)
        np.save(prepared / "images" / f"P{i}.npy", image[None])
        np.save(prepared / "images" / f"P{i}_label.npy", label[None])
        item["label"] = f"images/P{i}_label.npy"
    (prepared / "datalist.json").write_text(json.dumps(datalist))
    (prepared / "phenotype_stats.json").write_text(json.dumps(STATS))
    model = fit_acquisition(prepared, STATS)
    assert len(model.noise_sd) == 3
    np.testing.assert_allclose(sorted(model.noise_sd), levels, rtol=0.1)
    args = {"prepared_dir": str(prepared), "unconditional": True, "num_samples": 3}
    plain, noisy = _run(setup, tmp_path / "plain", acquisition_noise=False, **args), _run(setup, tmp_path / "noisy", **args)
    assert (plain["settings"]["acquisition_noise"], noisy["settings"]["acquisition_noise"]) == (False, True)
    items = json.loads((tmp_path / "noisy" / "datalist.json").read_text())["training"]
    assert all(d["noise_sd"] in model.noise_sd for d in items)
    assert [d["noise_sd"] for d in json.loads((tmp_path / "plain" / "datalist.json").read_text())["training"]] == [0] * 3
    for i, d in enumerate(items):
        a, b = _cine(tmp_path / "plain", i), _cine(tmp_path / "noisy", i)
        bright = a > 0.3  # Rician noise on a bright signal is near Gaussian of the same sd
        assert np.std((b - a)[bright]) == pytest.approx(d["noise_sd"], rel=0.15)
    again = _run(setup, tmp_path / "again", **args)  # the same seeds: the same noise
    assert again["settings"] == noisy["settings"]
    np.testing.assert_array_equal(_cine(tmp_path / "again", 2), _cine(tmp_path / "noisy", 2))
    assert fit_acquisition(prepared, STATS, noise=False).noise_sd == ()  # noise off: no image is read
    (prepared / "images" / "P1.npy").write_bytes(b"not an array")
    with pytest.raises(ValueError, match=r"P1\.npy: image of subject 'P1' cannot be read"):
        fit_acquisition(prepared, STATS)
