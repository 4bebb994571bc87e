"""The repository as a MONAI bundle: metadata, large files, command-line guard and the pipeline config."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from scripts.runtime import cli
from tests import networks
from tests.conftest import REPO, run_bundle
from tests.stage_runs import write_phenotype_prepared

BUNDLE_RUN = ["/x/monai/bundle/__main__.py", "run"]  # sys.argv of `python -m monai.bundle run`
# MONAI's MLflow handlers need mlflow and, for its default SQLite store, sqlalchemy and alembic (optional packages)
MLFLOW = all(importlib.util.find_spec(name) for name in ("mlflow", "sqlalchemy", "alembic"))


def _bundle(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monai.bundle", *args], check=False, cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_metadata_verifies_against_the_vendored_schema() -> None:
    done = _bundle("verify_metadata", "--meta_file", "configs/metadata.json",
                   "--filepath", "configs/schemas/meta_schema_20240725.json")
    assert done.returncode == 0 and "metadata is verified with no error" in done.stdout + done.stderr


def test_metadata_records_the_installed_versions() -> None:
    import monai
    import numpy
    import torch

    meta = json.loads((REPO / "configs" / "metadata.json").read_text())
    assert meta["monai_version"] == monai.__version__
    assert meta["pytorch_version"] == torch.__version__.split("+")[0]
    assert meta["numpy_version"].split(".")[:2] == numpy.__version__.split(".")[:2]


def test_large_files_lists_only_existing_files() -> None:
    spec = yaml.safe_load((REPO / "large_files.yml").read_text())
    assert isinstance(spec["large_files"], list)
    for entry in spec["large_files"]:
        assert {"path", "url"} <= set(entry) and (REPO / entry["path"]).is_file()


@pytest.mark.parametrize("name", ["phenotype_vae_def", "autoencoder_def", "mar_def", "segmenter_def"])
def test_every_config_builds_the_network_its_training_config_trains(name: str) -> None:
    """Each stage config carries its networks' defs in full (model-zoo style); they must not drift apart: every
    argument equals the training config's, except data-dependent ones (a `$`/`@` expression in either config, such as
    MAR's latent scale read from the latent cache there and from the checkpoint elsewhere)."""
    configs = {p.name: json.loads(p.read_text()) for p in sorted((REPO / "configs").glob("*.json"))}
    trained = configs[networks.DEF_CONFIG[name]][name]
    users = {f: c[name] for f, c in configs.items() if c.get(name)}  # pipeline.json's {} layers nothing
    assert len(users) >= 3
    for config, entry in users.items():
        assert set(entry) == set(trained), config
        drift = {k: (v, trained[k]) for k, v in entry.items()
                 if v != trained[k] and not (networks.is_expression(v) or networks.is_expression(trained[k]))}
        assert not drift, f"{config}: {name} differs from {networks.DEF_CONFIG[name]}: {drift}"


def test_unknown_keys_parsing() -> None:
    argv = ["--config_file", "['configs/make_phantom.json','configs/prepare.json']", "--num_subjects", "3",
            "--dataset_dir=/x", "--typo_key", "1", "--run_id", "run"]
    bad, known = cli.unknown_keys(argv)
    assert bad == ["typo_key"] and "num_subjects" in known and "dataset_dir" in known
    cli.check_overrides(["pytest", "--typo_key", "1"])  # not a bundle run: nothing to check
    with pytest.raises(ValueError, match=r"--typo_key"):
        cli.check_overrides(["/x/monai/bundle/__main__.py", "run", *argv])


def test_monai_run_options_and_tracking_settings_pass_the_guard() -> None:
    argv = [*BUNDLE_RUN, "--config_file", "configs/train_mar.json", "--workflow_type", "train", "--meta_file",
            "configs/metadata.json", "--logging_file", "configs/logging.conf"]
    cli.check_overrides(argv)
    tracking = ["--tracking", "mlflow", "--tracking_uri", "sqlite:///x.db", "--experiment_name", "e", "--run_name", "r",
                "--save_execute_config", "False"]
    cli.check_overrides(argv + tracking)
    with pytest.raises(ValueError, match=r"--tracking_uri .*--experiment_name"):  # MONAI adds them with --tracking only
        cli.check_overrides(argv + tracking[2:])


@pytest.mark.parametrize("config, old", [("train_autoencoder", "prepared_dir"), ("train_segmenter", "prepared_dir"),
                                         ("pretrain_mae", "prepared_dir"), ("train_mar", "latent_dir")])
def test_a_renamed_key_names_the_model_zoo_id(config: str, old: str) -> None:
    with pytest.raises(ValueError, match=rf"--{old} \(renamed: use --dataset_dir\)"):
        cli.check_overrides([*BUNDLE_RUN, "--config_file", f"configs/{config}.json", f"--{old}", "/data"])
    cli.check_overrides([*BUNDLE_RUN, "--config_file", "configs/encode_latents.json", "--prepared_dir", "/data",
                         "--latent_dir", "/cache"])  # still the ids of the latent cache config


@pytest.mark.skipif(not MLFLOW, reason="optional tracking packages not installed (pip install -e '.[tracking]'): "
                                       "MONAI's --tracking mlflow needs them")
def test_mlflow_tracking_through_monai_run_option(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    write_phenotype_prepared(tmp_path / "prepared", n_train=8, n_val=4, n_test=2)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"  # MONAI 1.6 refuses MLflow's retired file store (file://)
    run_bundle("configs/train_phenotype_vae.json", "--tracking", "mlflow", "--tracking_uri", uri, "--experiment_name",
               "cpgg_test", dataset_dir=tmp_path / "prepared", ckpt_dir=tmp_path / "models",
               output_dir=tmp_path / "out", num_epochs=2, timeout=300)
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("cpgg_test").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert {"train_loss", "train_kl", "val_frechet", "val_recon_mse"} <= set(runs[0].data.metrics)
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_frechet")] == [1, 2]


def test_a_user_error_ends_in_one_line_unless_debugging() -> None:
    args = ("configs/make_phantom.json", "--num_subjects", "abc")
    short = run_bundle(*args, expect_failure=True, env={cli.DEBUG_ENV: "0"}).stderr
    assert "error: wrong kind of value on the command line: --num_subjects takes a whole number (default 500), got " \
           "'abc' (set CPGG_DEBUG=1 for the traceback)" in short and "Traceback" not in short
    full = run_bundle(*args, expect_failure=True, env={cli.DEBUG_ENV: "1"}).stderr
    assert "Traceback" in full and "ValueError: wrong kind of value" in full
    chained = RuntimeError("Failed to evaluate")
    chained.__cause__ = FileNotFoundError("x.csv: not found")
    assert cli.user_error(chained) is chained.__cause__ and cli.user_error(RuntimeError("a bug")) is None
    clear = ValueError("segmenter.json: missing or malformed segmenter info")  # ours, raised from the raw OSError
    clear.__cause__ = FileNotFoundError("[Errno 2] No such file or directory: 'segmenter.json'")
    chained.__cause__ = clear
    assert cli.user_error(chained) is clear


@pytest.mark.parametrize("key, value, write, passes", [
    ("resume", "false", "False", "False"), ("resume", "true", "True", "True"),
    ("mar#time_budget_s", "null", "'$None'", "$None"), ("mar#time_budget_s", "None", "'$None'", "$None")])
def test_json_literals_and_none_on_the_command_line_are_refused(key: str, value: str, write: str, passes: str) -> None:
    """python-fire passes `--resume false` on as the text 'false' (true in Python), and monai.bundle run drops a None
    value: refused, naming the spelling that works."""
    argv = ["/x/monai/bundle/__main__.py", "run", "--config_file", "configs/train_mar.json", f"--{key}", value]
    with pytest.raises(ValueError, match=re.escape(f"--{key} {value} (write --{key} {write})")):
        cli.check_overrides(argv)
    cli.check_overrides(argv[:-1] + [passes])  # the spelling given passes (the shell strips the quotes)


def test_monai_run_drops_a_none_override_and_keeps_the_none_expression() -> None:
    """Why the guard refuses None: MONAI's run merges overrides with update_kwargs, which ignores None values, while
    '$None' is kept and resolves to None."""
    from monai.bundle import ConfigParser
    from monai.bundle.scripts import update_kwargs

    for value, expected in ((None, 1800), ("$None", None)):
        parser = ConfigParser({"mar": {"time_budget_s": 1800}})
        parser.update(pairs=update_kwargs({}, **{"mar#time_budget_s": value}))  # as monai.bundle run applies them
        assert parser.get_parsed_content("mar#time_budget_s") == expected


@pytest.mark.parametrize("key, value, message", [
    ("num_subjects", "abc", "--num_subjects takes a whole number (default 500), got 'abc'"),
    ("num_subjects", "2.5", "--num_subjects takes a whole number"),
    ("resume", "FALSE", "--resume takes True or False, got 'FALSE'"),
    ("mar#ema_decay", "fast", "--mar#ema_decay takes a number (default 0.995)"),
])
def test_values_of_the_wrong_kind_are_refused_naming_the_key(key: str, value: str, message: str) -> None:
    configs = "['configs/make_phantom.json','configs/train_mar.json']"
    argv = ["/x/monai/bundle/__main__.py", "run", "--config_file", configs, f"--{key}", value]
    with pytest.raises(ValueError, match=re.escape(message)):
        cli.check_overrides(argv)
    for fine in ("1", "$None", "$@seed + 1"):  # a number where a float is expected, expressions: passed on
        cli.check_overrides([*argv[:-2], "--mar#ema_decay", fine, "--num_subjects", "3.0", "--resume", "True"])


def test_tiny_pipeline_runs_the_whole_chain(tmp_path) -> None:
    """phantom -> prepare -> phenotype VAE, autoencoder, latents, MAR -> generate, tiny profile (about 2 minutes)."""
    start = time.perf_counter()
    done = _bundle("run", "--config_file", "['configs/pipeline.json','configs/profiles/tiny.json']",
                   "--output_dir", str(tmp_path), "--ckpt_dir", str(tmp_path / "models"), "--seed", "2")
    elapsed = time.perf_counter() - start
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    print(f"tiny pipeline: {elapsed:.1f} s")  # a time, not a check: a busy CI machine may be slower
    datalist = json.loads((tmp_path / "prepared" / "datalist.json").read_text())
    assert sum(len(datalist[k]) for k in ("training", "validation", "test")) == 16
    times = json.loads((tmp_path / "stage_times.json").read_text())
    assert list(times) == ["make_phantom", "prepare", "train_phenotype_vae", "train_autoencoder", "encode_latents",
                           "train_mar", "generate"]
    generated = tmp_path / "generated"
    with (generated / "manifest.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and all((generated / r["file"]).is_file() and (generated / r["nifti"]).is_file() for r in rows)
    assert np.load(generated / rows[0]["file"]).shape == (1, 50, 96, 96)
    assert (generated / "montage.png").is_file() and (generated / "montage.gif").is_file()
    for name in ("phenotype_vae.pt", "autoencoder.pt", "mar.pt"):
        assert (tmp_path / "models" / name).is_file()


def test_pipeline_runs_only_the_stages_asked(tmp_path) -> None:
    done = _bundle("run", "--config_file", "configs/pipeline.json", "--output_dir", str(tmp_path),
                   "--num_subjects", "4", "--only", "['make_phantom','prepare']")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    first = json.loads((tmp_path / "stage_times.json").read_text())
    assert set(first) == {"make_phantom", "prepare"}
    again = _bundle("run", "--config_file", "configs/pipeline.json", "--output_dir", str(tmp_path),
                    "--num_subjects", "4", "--only", "['prepare']")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    times = json.loads((tmp_path / "stage_times.json").read_text())  # the rerun stage updated, the other kept
    assert list(times) == ["make_phantom", "prepare"] and times["make_phantom"] == first["make_phantom"]
    bad = _bundle("run", "--config_file", "configs/pipeline.json", "--output_dir", str(tmp_path), "--only", "['train']")
    assert bad.returncode != 0 and "unknown stages ['train']" in bad.stdout + bad.stderr
