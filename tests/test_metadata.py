"""configs/metadata.json against what the configs and code serve: class names, generator inputs and outputs."""

from __future__ import annotations

import json
from pathlib import Path

from monai.bundle import ConfigParser

from scripts.data.phenotypes import PHENOTYPE_COLUMNS

REPO = Path(__file__).resolve().parents[1]
META = json.loads((REPO / "configs" / "metadata.json").read_text())


def test_classifier_classes_match_the_inference_config() -> None:
    names = ConfigParser.load_config_file(REPO / "configs" / "inference.json")["class_names"]
    pred = META["network_data_format"]["outputs"]["pred"]
    assert pred["num_channels"] == len(names)
    assert [pred["channel_def"][str(i)] for i in range(len(names))] == names


def test_generator_format_names_the_phenotypes_and_the_cine_shape() -> None:
    fmt = META["generator_data_format"]
    phenotypes = fmt["inputs"]["phenotypes"]
    assert phenotypes["num_channels"] == len(PHENOTYPE_COLUMNS)
    assert [phenotypes["channel_def"][str(i)] for i in range(len(PHENOTYPE_COLUMNS))] == PHENOTYPE_COLUMNS
    cine = fmt["outputs"]["cine"]
    assert (cine["num_channels"], cine["spatial_shape"], cine["value_range"]) == (1, [50, 96, 96], [0, 1])


def test_eval_metrics_say_where_they_were_measured() -> None:
    for network, metrics in META["eval_metrics"].items():
        assert "measured" in metrics and "docs/" in metrics["measured"], network
        assert any(isinstance(v, (int, float)) for v in metrics.values()), network
