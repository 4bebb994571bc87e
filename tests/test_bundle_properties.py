"""MONAI bundle properties (monai.bundle.properties): every training config, with the layers it runs with (tiny
profile, configs/train_regressor.json, configs/multi_gpu.json), passes `ConfigWorkflow.check_properties()` as a "train"
workflow and configs/inference.json as an "infer" one: no required property missing, no optional one under a wrong id."""

from __future__ import annotations

import socket
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import ignite.distributed as idist
import pytest
import torch
from monai.bundle import ConfigWorkflow
from monai.inferers import SimpleInferer

from scripts.generation.autoencoder import CineAutoencoderKL
from scripts.generation.latents import encode_cohort
from tests.conftest import REPO
from tests.downstream_cohort import write_cohort
from tests.networks import def_kwargs

TINY, MULTI = "configs/profiles/tiny.json", "configs/multi_gpu.json"
FINETUNE = {"pretrained": ""}  # from scratch: no MAE checkpoint needed
# training config: (config files before the profile, input data of dataset_dir, other overrides)
TRAINING = {
    "train_phenotype_vae": (["configs/train_phenotype_vae.json"], "prepared", {}),
    "train_autoencoder": (["configs/train_autoencoder.json"], "prepared", {}),
    "train_mar": (["configs/train_mar.json"], "latents", {}),
    "train_segmenter": (["configs/train_segmenter.json"], "labelled", {}),
    "pretrain_mae": (["configs/pretrain_mae.json"], "prepared", {}),
    "train_classifier": (["configs/train_classifier.json"], "prepared", FINETUNE),
    "train_regressor": (["configs/train_classifier.json", "configs/train_regressor.json"], "prepared", FINETUNE),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, segmenter_prepared: Path) -> dict[str, Path]:
    """Input folders: a prepared cohort (4/4/4 cines, 4 classes, phenotypes), its latent cache under an untrained
    tiny autoencoder, a prepared cohort with label cines (the segmenter's) and an empty generated folder."""
    root = tmp_path_factory.mktemp("properties")
    prepared, generated = write_cohort(root, counts=(4, 4, 4), n_generated=0)
    torch.manual_seed(0)
    encode_cohort(CineAutoencoderKL(**def_kwargs("autoencoder_def", "tiny")), prepared, root / "latents", "none", "tiny")
    return {"prepared": prepared, "latents": root / "latents", "labelled": segmenter_prepared, "generated": generated}


@pytest.fixture
def single_rank(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """torchrun's variables for a world of one process, so configs/multi_gpu.json joins a gloo group of one; after
    the test (whose finalize destroyed the group) Ignite's distributed helpers are told it is gone."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    yield
    idist.sync()


def workflow(configs: Sequence[str], workflow_type: str, **overrides: object) -> ConfigWorkflow:
    """The initialised ConfigWorkflow of `configs` (repository paths) with `overrides`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Can't merge entry")  # a profile's sections other configs lack
        flow = ConfigWorkflow(config_file=[str(REPO / c) for c in configs], workflow_type=workflow_type,
                              logging_file=False, **overrides)
    flow.initialize()
    return flow


@pytest.mark.parametrize("layers", [(TINY,), (TINY, MULTI)], ids=["tiny", "tiny+multi_gpu"])
@pytest.mark.parametrize("name", sorted(TRAINING))
def test_training_configs_have_the_train_properties(name: str, layers: tuple[str, ...], data: dict[str, Path],
                                                    tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if MULTI in layers:
        request.getfixturevalue("single_rank")
    configs, source, extra = TRAINING[name]
    flow = workflow([*configs, *layers], "train", dataset_dir=str(data[source]), generated_dir=str(data["generated"]),
                    output_dir=str(tmp_path / "out"), ckpt_dir=str(tmp_path / "models"), **extra)
    try:
        assert flow.check_properties() == []
        assert flow.dataset_dir == str(data[source]) and flow.max_epochs >= 1 and flow.val_interval >= 1
        assert isinstance(flow.train_inferer, SimpleInferer) and flow.trainer.inferer is flow.train_inferer
        assert flow.evaluator is not None and flow.val_key_metric and flow.train_key_metric
    finally:
        flow.finalize()


def test_inference_config_has_the_infer_properties(data: dict[str, Path], tmp_path: Path) -> None:
    checkpoint = tmp_path / "classifier.pt"
    flow = workflow(["configs/inference.json", TINY], "infer", dataset_dir=str(data["prepared"]),
                    ckpt_path=str(checkpoint), output_dir=str(tmp_path / "out"))
    torch.save(flow.parser.get_parsed_content("network_def").state_dict(), checkpoint)
    assert flow.check_properties() == []
    assert flow.dataset_dir == str(data["prepared"]) and len(flow.dataset) == 12  # every prepared cine
    assert flow.evaluator.inferer is flow.inferer
