"""The standalone segmentation bundle (configs/export_segmenter_bundle.json) and its MONAI Label serving
(docs/monailabel.md). The default tests need only this repository's environment; the `monailabel` smoke test starts a
MONAI Label server from the environment of scripts/monailabel_env.sh (MONAILABEL_VENV, default .venv-monailabel)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow, verify_metadata
from monai.data import MetaTensor

from scripts.data.cine_files import load_cine
from scripts.data.orientation import in_plane_codes, reorient
from scripts.segmentation.bundle_export import BUNDLE_NAME, export_bundle
from scripts.segmentation.cine_bundle import CanonicalCined, HeartCropd, restore_orientation
from scripts.segmentation.labeller import CineLabeller
from tests.conftest import ONE_THREAD, REPO, run_bundle
from tests.networks import build
from tests.test_io import synthetic_cine, write_nifti

TINY = "configs/profiles/tiny.json"
SCHEMA = REPO / "configs" / "schemas" / "meta_schema_20240725.json"
MONAILABEL_VENV = Path(os.environ.get("MONAILABEL_VENV", REPO / ".venv-monailabel"))
LABEL_RANGE = range(6)


# -------------------------------------------------------------------------------------------------------- fixtures
def _checkpoint(folder: Path, seed: int = 0) -> Path:
    """A tiny-profile segmenter.pt (seeded random weights: labels everywhere, deterministic) with segmenter.json."""
    path = folder / "segmenter.pt"
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        torch.save(build("segmenter_def", "tiny").state_dict(), path)
    path.with_suffix(".json").write_text(json.dumps({"profile": "tiny", "spacing_mm": 2.3}))
    return path


def _cines(folder: Path) -> dict[str, Path]:
    """Test cines: X x Y x 1 x T in the canonical orientation, the same voxels as an X x Y x T file, and stored
    transposed with X and Y flipped (affine to match: the same world, read back canonical by load_cine)."""
    image, _ = synthetic_cine(12, 0)
    canonical = write_nifti(folder / "canonical" / "la_4ch.nii.gz", image)
    flat = write_nifti(folder / "flat" / "la_4ch.nii.gz", image, add_slice_axis=False)
    stored = nib.load(canonical)
    turned = np.ascontiguousarray(np.asarray(stored.dataobj)[::-1, ::-1].transpose(1, 0, 2, 3))
    affine = stored.affine.copy()
    affine[:, 3] = stored.affine @ [image.shape[0] - 1, image.shape[1] - 1, 0, 1]
    affine[:, :2] = -stored.affine[:, 1::-1]
    (folder / "turned").mkdir()
    nib.save(nib.Nifti1Image(turned, affine, stored.header), folder / "turned" / "la_4ch.nii.gz")
    return {"canonical": canonical, "flat": flat, "turned": folder / "turned" / "la_4ch.nii.gz"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny checkpoint exported through the CLI, and the exported inference run on the test cines from the bundle's
    own folder, with nothing of this repository on sys.path."""
    root = tmp_path_factory.mktemp("bundle_export")
    checkpoint = _checkpoint(root / "models")
    run_bundle(["configs/export_segmenter_bundle.json", TINY], env=ONE_THREAD, checkpoint=checkpoint,
               output_dir=root / "out")
    bundle = root / "out" / BUNDLE_NAME
    cines = _cines(root / "cines")
    for n in range(2):
        image, label = synthetic_cine(12, 0, (60.0 - 3 * n, 50.0), seed=n)
        write_nifti(root / "labelled" / f"s{n}" / "la_4ch.nii.gz", image)
        write_nifti(root / "labelled" / f"s{n}" / "seg4_la_4ch.nii.gz", label.astype(np.float32))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | ONE_THREAD
    done = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
                           "--dataset_dir", str(root / "cines"), "--output_dir", str(root / "seg")],
                          cwd=bundle, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"root": root, "checkpoint": checkpoint, "bundle": bundle, "cines": cines}


# ----------------------------------------------------------------------------------------------------------- tests
def test_export_writes_a_standalone_bundle(exported: dict) -> None:
    """The bundle's files, metadata valid against MONAI's schema, the infer and train properties of MONAI's
    ConfigWorkflow, the weights unchanged and only copied code (no module of this repository is needed)."""
    bundle = exported["bundle"]
    for name in ("configs/metadata.json", "configs/inference.json", "configs/train.json", "configs/logging.conf",
                 "models/model.pt",
                 "models/segmenter.json", "docs/README.md", "LICENSE", "scripts/segmentation/cine_bundle.py",
                 "scripts/data/orientation.py", "scripts/runtime/files.py"):
        assert (bundle / name).is_file(), name
    for module in ("segmentation/cine_bundle.py", "data/orientation.py", "runtime/files.py"):
        assert (bundle / "scripts" / module).read_bytes() == (REPO / "scripts" / module).read_bytes()
    verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"), filepath=str(SCHEMA))
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {
        "0": "background", "1": "LV", "2": "Myo", "3": "RV", "4": "LA", "5": "RA"}
    for config, kind, data in (("inference.json", "infer", "cines"), ("train.json", "train", "labelled")):
        workflow = ConfigWorkflow(config_file=str(bundle / "configs" / config), workflow_type=kind,
                                  logging_file=False,  # the bundle's logging.conf would reconfigure pytest's
                                  dataset_dir=str(exported["root"] / data))
        workflow.initialize()
        assert workflow.check_properties() == [], config
    weights = torch.load(bundle / "models" / "model.pt", weights_only=True)
    original = torch.load(exported["checkpoint"], weights_only=True)
    assert weights.keys() == original.keys() and all(torch.equal(weights[k], original[k]) for k in weights)


def test_exported_inference_returns_labels_in_the_input_geometry(exported: dict) -> None:
    """Every cine's label file has the input's shape, affine and header geometry, uint8 values 0..5, and the labels
    of scripts.segmentation.labeller.CineLabeller on the canonical cine, whatever the stored orientation."""
    labeller = CineLabeller(exported["checkpoint"], build("segmenter_def", "tiny"))
    canonical = load_cine(exported["cines"]["canonical"])
    reference = labeller(canonical.array, canonical.spacing_mm)
    assert set(np.unique(reference)) > {0}
    for name, source in exported["cines"].items():
        out = exported["root"] / "seg" / name / "la_4ch_seg.nii.gz"
        image, labels = nib.load(source), nib.load(out)
        assert labels.shape == image.shape and np.array_equal(labels.affine, image.affine), name
        assert labels.get_data_dtype() == np.uint8 and set(np.unique(np.asarray(labels.dataobj))) <= set(LABEL_RANGE)
        assert labels.header.get_zooms() == image.header.get_zooms(), name
        if name == "flat":
            assert np.array_equal(np.asarray(labels.dataobj), reference), name
        else:
            assert np.array_equal(load_cine(out).array.astype(np.uint8), reference), name


def test_exported_fine_tuning_runs(exported: dict, tmp_path: Path) -> None:
    """train.json from the bundle's folder: one epoch on two labelled cines (one for validation) replaces
    models/model.pt with weights of the same keys."""
    bundle = tmp_path / "bundle"
    shutil.copytree(exported["bundle"], bundle)
    before = torch.load(bundle / "models" / "model.pt", weights_only=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | ONE_THREAD
    done = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/train.json",
                           "--dataset_dir", str(exported["root"] / "labelled"), "--max_epochs", "1",
                           "--frames_per_cine", "2"],
                          cwd=bundle, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    after = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert after.keys() == before.keys() and any(not torch.equal(after[k], before[k]) for k in after)


def test_wrong_size_checkpoint_is_a_clear_error(exported: dict, tmp_path: Path) -> None:
    """A tiny checkpoint exported with the cpu-size segmenter_def: an error naming the file and the profile to layer,
    nothing written; an existing bundle is not replaced without --overwrite."""
    with pytest.raises(ValueError, match="segmenter.pt: checkpoint does not match") as error:
        export_bundle(exported["checkpoint"], build("segmenter_def", "cpu"), tmp_path)
    assert "layer configs/profiles/tiny.json" in str(error.value)
    assert not any(tmp_path.iterdir())
    with pytest.raises(FileExistsError, match=BUNDLE_NAME):
        export_bundle(exported["checkpoint"], build("segmenter_def", "tiny"), exported["bundle"].parent)


def test_heart_crop_keeps_the_labelled_frames(exported: dict) -> None:
    """HeartCropd on a cine labelled in 2 of 12 frames: 96 x 96 crops of those 2 frames, the image in [0, 1], the
    labels kept; a label cine without any label is an error naming the file."""
    source = str(exported["root"] / "labelled" / "s0" / "seg4_la_4ch.nii.gz")
    image, label = synthetic_cine(12, 0)
    label[..., 1:6] = 0
    label[..., 7:] = 0
    data = CanonicalCined(["image", "label"])({k: MetaTensor(torch.from_numpy(v[:, :, None]).float(),
                                                              affine=torch.diag(torch.tensor([-1.5, -1.5, 8.0, 1.0])),
                                                              meta={"filename_or_obj": source})
                                               for k, v in (("image", image), ("label", label))})
    out = HeartCropd(["image", "label"])(data)
    assert out["image"].shape == out["label"].shape == (1, 96, 96, 2)
    assert 0.0 <= float(out["image"].min()) and float(out["image"].max()) <= 1.0
    assert set(torch.unique(out["label"]).tolist()) == set(range(6))
    data["label"] = data["label"] * 0
    with pytest.raises(ValueError, match="seg4_la_4ch.nii.gz: label cine has no heart label"):
        HeartCropd(["image", "label"])(data)


@pytest.mark.parametrize("codes", ["LP", "PL", "RA", "AR", "LA", "AL", "RP", "PR"])
def test_restore_orientation_inverts_reorient(codes: str) -> None:
    """`restore_orientation` undoes scripts.data.orientation.reorient's array change for all 8 in-plane cases."""
    array = np.arange(5 * 7 * 3).reshape(5, 7, 3)
    oriented, _, _ = reorient(array, np.eye(4), (1.0, 1.0), codes)
    assert np.array_equal(restore_orientation(oriented, codes), array)


def test_turned_test_cine_is_not_canonical(exported: dict) -> None:
    """The transposed, flipped test cine does exercise the reorientation (its stored axes run toward A and R)."""
    assert in_plane_codes(nib.load(exported["cines"]["turned"]).affine) != "LP"


# --------------------------------------------------------------------------------------------- MONAI Label smoke
def _free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None,
             timeout: float = 600) -> bytes:
    """The body of an HTTP response; AssertionError with the status and body otherwise."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as e:
        raise AssertionError(f"{method} {url}: HTTP {e.code} {e.read()[:2000]!r}") from e


def _multipart(field: str, path: Path) -> tuple[bytes, dict]:
    """A multipart/form-data body with one file field."""
    boundary = uuid.uuid4().hex
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{path.name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode(), {
        "Content-Type": f"multipart/form-data; boundary={boundary}"}


def _wait_for_server(url: str, server: subprocess.Popen, log: Path, timeout_s: float = 300) -> dict:
    """GET /info/ until it answers; AssertionError with the log tail if the server exits or never answers."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"server exited {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            return json.loads(_request(f"{url}/info/", timeout=5))
        except (OSError, AssertionError):
            time.sleep(1)
    raise AssertionError(f"no answer from {url} in {timeout_s} s:\n{log.read_text()[-3000:]}")


@pytest.mark.monailabel
def test_monailabel_server_infers_and_trains(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """MONAI Label 0.8.5's monaibundle app, unchanged, serves the exported bundle of a trained tiny segmenter on
    127.0.0.1: /info/ lists it, /infer/ returns the label cine of an X x Y x T and an X x Y x 1 x T cine (uint8 0..5,
    the input's affine; MONAI Label's ITK writer drops the singleton slice axis), /train/ fine-tunes one epoch on a
    submitted label and inference works with the new weights. The server is stopped in every case."""
    python = MONAILABEL_VENV / "bin" / "python"
    if not python.is_file():
        pytest.skip(f"no MONAI Label environment at {MONAILABEL_VENV}: bash scripts/monailabel_env.sh "
                    "(or MONAILABEL_VENV=<venv>)")
    segmenter_runs = request.getfixturevalue("segmenter_runs")  # a trained tiny segmenter, only where it will run
    app = tmp_path / "app"
    shutil.copytree(MONAILABEL_VENV / "monailabel" / "sample-apps" / "monaibundle", app,
                    ignore=shutil.ignore_patterns("model", "logs", "__pycache__"))
    run_bundle(["configs/export_segmenter_bundle.json", TINY], env=ONE_THREAD,
               checkpoint=segmenter_runs["root"] / "models" / "segmenter.pt", output_dir=app / "model")
    studies = tmp_path / "studies"
    image, label = synthetic_cine(25, 0)
    write_nifti(studies / "cine4d.nii.gz", image)
    write_nifti(studies / "cine3d.nii.gz", image, add_slice_axis=False)
    truth = write_nifti(tmp_path / "truth" / "cine4d.nii.gz", label.astype(np.uint8))
    port, log = _free_port(), tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"
    cmd = [str(python), "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies),
           "--conf", "models", BUNDLE_NAME, "--conf", "zoo_source", "github", "--conf", "sam2", "false",
           "--host", "127.0.0.1", "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | ONE_THREAD
    with log.open("w") as out:
        server = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        start = time.monotonic()
        info = _wait_for_server(url, server, log)
        print(f"MONAI Label server up in {time.monotonic() - start:.1f} s")
        assert info["models"][BUNDLE_NAME]["labels"] == {"lv": 1, "myo": 2, "rv": 3, "la": 4, "ra": 5}
        assert BUNDLE_NAME in info["trainers"]
        model = app / "model" / BUNDLE_NAME / "models" / "model.pt"
        weights = model.read_bytes()

        def infer(image_id: str) -> nib.Nifti1Image:
            begin = time.monotonic()
            body = _request(f"{url}/infer/{BUNDLE_NAME}?image={image_id}&output=image", "POST", b"{}",
                            {"Content-Type": "application/json"})
            print(f"infer {image_id}: {time.monotonic() - begin:.1f} s")
            path = tmp_path / f"{image_id}_{uuid.uuid4().hex}.nii.gz"
            path.write_bytes(body)
            return nib.load(path)

        for image_id, shape in (("cine3d", image.shape), ("cine4d", image.shape)):
            result, source = infer(image_id), nib.load(studies / f"{image_id}.nii.gz")
            assert result.shape == shape and np.allclose(result.affine, source.affine, atol=1e-4), image_id
            assert result.get_data_dtype() == np.uint8
            assert set(np.unique(np.asarray(result.dataobj))) <= set(LABEL_RANGE)
        body, headers = _multipart("label", truth)
        _request(f"{url}/datastore/label?image=cine4d&tag=final", "PUT", body, headers)
        begin = time.monotonic()
        _request(f"{url}/train/{BUNDLE_NAME}?run_sync=true", "POST",
                 json.dumps({"max_epochs": 1, "val_split": 0.0, "device": "cpu", "multi_gpu": False}).encode(),
                 {"Content-Type": "application/json"})
        print(f"train 1 epoch: {time.monotonic() - begin:.1f} s")
        assert model.read_bytes() != weights
        assert infer("cine3d").shape == image.shape
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
