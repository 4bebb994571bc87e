"""Downstream stage: synthetic mixing, fold splitting and nested labelled subsets, metrics (against scikit-learn), the
linear probe, paired differences (against scipy), MAE pieces and encoder transfer, the labelled cohort's disjointness,
the tiny configs end to end (pretraining, classification, regression with mix*, inference, TorchScript export) and the
comparison table (on a purpose-built cohort, and through the CLI on the tiny pipeline's own output)."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import run
from monai.networks.blocks import PatchEmbeddingBlock
from scipy import stats as scipy_stats
from sklearn.metrics import accuracy_score, mean_absolute_error, r2_score, roc_auc_score

from scripts.data.phantom import make_cohort
from scripts.downstream.finetune import (
    TaskMetrics,
    classification_metrics,
    metric_column,
    regression_metrics,
    vit_network,
)
from scripts.downstream.folds import (
    CrossValidation,
    cv_folds,
    fold_datalists,
    labelled_subset,
    mix_star_items,
    task_items,
)
from scripts.downstream.labelled import check_disjoint_subjects
from scripts.downstream.mae import MaskedPatchLoss, mae_network, patchify, pretrain_datalist, unpatchify
from scripts.downstream.probe import encoder_features, fit_predict, probe_task
from scripts.downstream.runs import Workspace
from scripts.downstream.statistics import paired_difference, t_interval
from scripts.downstream.table import Cohort, Protocol, run_table
from scripts.runtime.checkpoints import load_weights
from tests.conftest import ONE_THREAD, REPO, run_bundle, tensorboard_events
from tests.downstream_cohort import COLUMNS, MEAN, STD, write_cohort
from tests.networks import layered

torch.set_num_threads(1)
TINY = str(REPO / "configs" / "profiles" / "tiny.json")
TINY_MAE = layered("pretrain_mae.json", "tiny")["mae"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(prepared, generated): 12/8/8 real cines (4 classes, 3 phenotypes), 16 synthetic ones."""
    return write_cohort(tmp_path_factory.mktemp("downstream"))


# ------------------------------------------------------------------------------------------------------- mixing
@pytest.mark.parametrize("ratio", [0, 1, 1.5])
def test_pretraining_mix_draws_ratio_times_the_real_count(cohort: tuple[Path, Path], ratio: float) -> None:
    prepared, generated = cohort
    lists = pretrain_datalist(prepared, generated, ratio, ["training"], None, val_count=2, seed=0)
    real = [d for d in lists["training"] if not d.get("synthetic")]
    synthetic = [d for d in lists["training"] if d.get("synthetic")]
    assert len(real) == 10 and len(synthetic) == round(ratio * 10)
    assert all(d["subject"].startswith("G") for d in synthetic) and not any(d.get("synthetic") for d in lists["validation"])
    training_split = {d["subject"] for d in json.loads((prepared / "datalist.json").read_text())["training"]}
    assert {d["subject"] for d in real + lists["validation"]} == training_split  # only the generator's split
    assert not {d["subject"] for d in real} & {d["subject"] for d in lists["validation"]}
    assert [d["subject"] for d in synthetic] == [f"G{i:06d}" for i in range(len(synthetic))]  # a mix holds smaller ones
    capped = pretrain_datalist(prepared, generated, ratio, ["training"], 4, 2, 0)["training"]
    assert len(capped) == 4 + round(ratio * 4)


def test_cines_flagged_as_copies_never_enter_pretraining_or_mix_star(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    prepared, generated = write_cohort(tmp_path)
    with caplog.at_level(logging.WARNING):
        unaudited = pretrain_datalist(prepared, generated, 1, ["training"], None, 2, 0)["training"]
    assert "no privacy audit" in caplog.text and "G000003" in {d["subject"] for d in unaudited}
    (generated / "privacy_audit.json").write_text(json.dumps({"flagged": ["G000003", "G000007"]}))
    lists = pretrain_datalist(prepared, generated, 1, ["training"], None, 2, 0)["training"]
    synthetic = [d["subject"] for d in lists if d.get("synthetic")]
    assert len(synthetic) == 10 and not {"G000003", "G000007"} & set(synthetic)
    assert synthetic == [f"G{i:06d}" for i in range(12) if i not in (3, 7)]
    mix_star = [d["subject"] for d in mix_star_items(prepared, generated, 14)]  # fine-tuning and probe labels
    assert mix_star == [f"G{i:06d}" for i in range(16) if i not in (3, 7)]
    audited = [f"G{i:06d}" for i in range(12)]  # an audit made before G000012.. were generated
    (generated / "privacy_audit.json").write_text(json.dumps({"flagged": ["G000003"], "audited": audited}))
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        mix_star_items(prepared, generated, 14)
    assert "3 of the 14 synthetic cines used were generated after its privacy audit" in caplog.text
    assert "first: G000012" in caplog.text
    (generated / "privacy_audit.json").write_text("{}")
    with pytest.raises(ValueError, match=r"privacy_audit.json: not a privacy audit record"):
        pretrain_datalist(prepared, generated, 1, ["training"], None, 2, 0)


def test_too_few_synthetic_cines_names_the_command(cohort: tuple[Path, Path]) -> None:
    prepared, generated = cohort
    with pytest.raises(ValueError, match=r"16 usable synthetic cines, 20 needed.*configs/generate.json.*--num_samples 20"):
        pretrain_datalist(prepared, generated, 2, ["training"], None, 2, 0)
    with pytest.raises(ValueError, match="needs a generated folder"):
        pretrain_datalist(prepared, None, 1, ["training"], None, 2, 0)


def test_bad_cines_are_skipped_and_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    prepared, _ = write_cohort(tmp_path, n_generated=0)
    np.save(prepared / "images" / "PH000001.npy", np.zeros((1, 40, 96, 96), np.float16))
    (prepared / "images" / "PH000002.npy").unlink()
    with caplog.at_level(logging.WARNING):
        lists = pretrain_datalist(prepared, None, 0, ["training"], None, 2, 0)
    subjects = {d["subject"] for d in lists["training"] + lists["validation"]}
    assert len(subjects) == 10 and not {"PH000001", "PH000002"} & subjects
    assert "PH000001" in caplog.text and "shape (1, 40, 96, 96)" in caplog.text and "PH000002" in caplog.text


# -------------------------------------------------------------------------------------------------------- folds
def test_folds_keep_subjects_together_and_the_class_mix() -> None:
    rng = np.random.default_rng(1)
    labels = rng.choice(4, size=83, p=[0.4, 0.25, 0.2, 0.15])
    items = [{"subject": f"S{i}", "diagnosis_index": int(c)} for i, c in enumerate(labels)]
    items += [{**items[3], "image": "second cine"}, {**items[40], "image": "second cine"}]  # two cines of a subject
    folds = cv_folds(items, 5, seed=0, stratify_key="diagnosis_index")
    by_subject: dict[str, set] = {}
    for d, k in zip(items, folds):
        by_subject.setdefault(d["subject"], set()).add(int(k))
    assert all(len(v) == 1 for v in by_subject.values())  # no subject in two folds
    subject_fold = {s: v.pop() for s, v in by_subject.items()}
    for c in range(4):
        per_fold = np.bincount([subject_fold[f"S{i}"] for i in np.flatnonzero(labels == c)], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1, (c, per_fold)  # stratified
    np.testing.assert_array_equal(folds, cv_folds(items, 5, 0, "diagnosis_index"))  # deterministic
    assert not np.array_equal(folds, cv_folds(items, 5, 1, "diagnosis_index"))


def test_too_few_labelled_cines_are_refused_saying_what_is_needed(cohort: tuple[Path, Path], tmp_path: Path) -> None:
    items = [{"subject": f"S{i}", "disease": i % 2} for i in range(6)]
    with pytest.raises(ValueError, match=r"need at least 4 subjects of a class; subjects per class: \{0: 3, 1: 3\}"):
        cv_folds(items, 4, 0, "disease")
    with pytest.raises(ValueError, match="6 labelled subjects for 8 folds"):
        cv_folds(items, 8, 0, None)
    small = tmp_path / "prepared"
    shutil.copytree(cohort[0], small)
    datalist = json.loads((small / "datalist.json").read_text())
    (small / "datalist.json").write_text(json.dumps({**datalist, "validation": datalist["validation"][:2]}))
    with pytest.raises(ValueError, match=r"fold 0 of 2: 1 training and 1 validation cines of the 2 labelled .* at "
                                         r"least 2 training and 1 validation cine per fold"):
        fold_datalists(small, ["validation"], "regression", 2, 0, 0)  # the tiny pipeline's case: an empty epoch
    with pytest.raises(ValueError, match=r"fold 0 of 2: 1 training .* label fraction 0.1; .*a larger label fraction"):
        fold_datalists(cohort[0], ["validation"], "regression", 2, 0, 0, label_fraction=0.1)  # 4 subjects: 1 kept


def test_fold_datalists_put_synthetic_cines_in_training_folds_only(cohort: tuple[Path, Path]) -> None:
    prepared, generated = cohort
    seen = []
    for fold in range(2):
        lists = fold_datalists(prepared, ["validation", "test"], "regression", 2, fold, 0,
                               stratify_key="diagnosis_index", generated_dir=generated, mix_ratio=1)
        real = [d for d in lists["training"] if not d.get("synthetic")]
        assert len(lists["training"]) - len(real) == len(real) == 8
        assert not any(d.get("synthetic") or d["subject"].startswith("G") for d in lists["validation"])
        assert not {d["subject"] for d in real} & {d["subject"] for d in lists["validation"]}
        synthetic = [d for d in lists["training"] if d.get("synthetic")]
        expected = (np.array([[d[c] for c in COLUMNS] for d in synthetic]) - MEAN) / STD  # conditioning phenotypes
        np.testing.assert_allclose(np.stack([d["label"] for d in synthetic]), expected, rtol=1e-5)
        seen += [d["subject"] for d in lists["validation"]]
    assert sorted(seen) == sorted(d["subject"] for d in task_items(prepared, ["validation", "test"], "regression"))
    with pytest.raises(ValueError, match="regression only"):
        fold_datalists(prepared, ["validation"], "classification", 2, 0, label_key="disease", num_classes=2,
                       generated_dir=generated, mix_ratio=1)
    with pytest.raises(ValueError, match="class indices 0..1"):
        task_items(prepared, ["validation"], "classification", "diagnosis_index", 2)


def test_labelled_subsets_are_nested_stratified_and_seeded() -> None:
    rng = np.random.default_rng(2)
    items = [{"subject": f"S{i}", "diagnosis_index": int(c)} for i, c in enumerate(rng.choice(4, 200, p=[.4, .2, .25, .15]))]
    items.append({**items[5], "image": "second cine"})  # a subject's cines stay together
    counts = np.bincount([d["diagnosis_index"] for d in items[:200]], minlength=4)
    previous: set[str] = set()
    for fraction in (0.05, 0.1, 0.25, 0.5, 1.0):
        subset = labelled_subset(items, fraction, seed=3, stratify_key="diagnosis_index")
        subjects = {d["subject"] for d in subset}
        assert previous <= subjects  # nested: a smaller labelled set lies inside a larger one
        per_class = np.bincount([d["diagnosis_index"] for d in subset if d.get("image") is None], minlength=4)
        np.testing.assert_array_equal(per_class, np.maximum(1, np.round(fraction * counts)))  # stratified
        assert ("S5" in subjects) == (sum(d["subject"] == "S5" for d in subset) == 2)
        previous = subjects
    assert len(previous) == 200
    other = {d["subject"] for d in labelled_subset(items, 0.25, seed=4, stratify_key="diagnosis_index")}
    assert other != {d["subject"] for d in labelled_subset(items, 0.25, 3, "diagnosis_index")}  # seeded
    with pytest.raises(ValueError, match=r"a label fraction must be in \(0, 1\], got 0"):
        labelled_subset(items, 0, 0)


def test_repeats_split_differently_and_units_pair_across_rows() -> None:
    items = [{"subject": f"S{i}", "diagnosis_index": i % 3} for i in range(30)]
    cv = CrossValidation(num_folds=3, repeats=2, seed=5, stratify_key="diagnosis_index")
    units = cv.units([0.5, 1.0])
    assert len(units) == 2 * 2 * 3 and units[0] == (0, 0, 0.5) and units[-1] == (1, 2, 1.0)
    for repeat in range(2):
        val = [{d["subject"] for d in cv.split(items, repeat, k, 1.0)[1]} for k in range(3)]
        assert set().union(*val) == {d["subject"] for d in items} and sum(map(len, val)) == 30  # a partition
        for k in range(3):
            train = {d["subject"] for d in cv.split(items, repeat, k, 1.0)[0]}
            half = {d["subject"] for d in cv.split(items, repeat, k, 0.5)[0]}
            assert not train & val[k] and half < train
    first = [d["subject"] for d in cv.split(items, 0, 0, 1.0)[1]]
    assert first != [d["subject"] for d in cv.split(items, 1, 0, 1.0)[1]]  # repeats use other splits
    assert first == [d["subject"] for d in cv.split(list(items), 0, 0, 1.0)[1]]  # the same unit: the same split


# --------------------------------------------------------------------------------------------------- statistics
def test_paired_differences_match_scipy_and_the_corrected_interval_is_wider() -> None:
    rng = np.random.default_rng(0)
    units = [{"repeat": r, "fold": k, "fraction": 0.5} for r in range(3) for k in range(5)]
    base = [{**u, "metrics": {"val_auc": 0.7 + 0.05 * rng.standard_normal()}} for u in units]
    row = [{**u, "metrics": {"val_auc": b["metrics"]["val_auc"] + 0.03 + 0.02 * rng.standard_normal()}}
           for u, b in zip(units, base)]
    row.append({"repeat": 9, "fold": 0, "fraction": 0.5, "metrics": {"val_auc": 1.0}})  # unpaired: left out
    got = paired_difference(row, base, correction=1 / 4)["val_auc"]
    a, b = [u["metrics"]["val_auc"] for u in row[:15]], [u["metrics"]["val_auc"] for u in base]
    ci = scipy_stats.ttest_rel(a, b).confidence_interval(0.95)
    assert got["n"] == 15 and got["mean"] == pytest.approx(np.mean(np.subtract(a, b)))
    assert (got["low"], got["high"]) == pytest.approx((ci.low, ci.high))
    ratio = (got["high_corrected"] - got["low_corrected"]) / (got["high"] - got["low"])
    assert ratio == pytest.approx(np.sqrt(1 + 15 / 4))  # variance x (1/n + n_test/n_train) over variance / n
    shuffled = paired_difference(row, [{**u, "fold": (u["fold"] + 1) % 5} for u in base], 0.25)["val_auc"]
    assert shuffled["std"] > 1.5 * got["std"]  # paired by (repeat, fold, fraction), not by position
    assert np.isnan(t_interval([0.5])["low"]) and t_interval([0.5, float("nan"), 0.7])["n"] == 2


# ---------------------------------------------------------------------------------------------------- the probe
def test_linear_probe_learns_a_linear_signal_from_training_folds_only() -> None:
    rng = np.random.default_rng(0)
    items, features = [], {}
    for i in range(60):
        c = i % 4
        items.append({"subject": f"S{i}", "image": f"S{i}.npy", "diagnosis_index": c, "label": int(c > 0)})
        features[f"S{i}.npy"] = rng.standard_normal(16) + 3.0 * (c > 0) * np.eye(16)[0]
    task = {"name": "disease", "task": "classification", "overrides": {"num_classes": 2}}
    probe = {"logistic_c": 1.0, "max_iter": 1000, "ridge_alphas": [1.0, 10.0]}
    cv = CrossValidation(3, repeats=2, seed=0, stratify_key="diagnosis_index")
    units = probe_task(task, items, features, cv, [0.25, 1.0], probe)
    assert len(units) == 12 and {u["validation"] for u in units} == {20}
    assert {u["training_subjects"] for u in units if u["fraction"] == 0.25} == {8}  # 4 classes x round(0.25 x 10)
    assert np.mean([u["metrics"]["val_auc"] for u in units if u["fraction"] == 1.0]) > 0.85
    noise = [{**d, "label": int(rng.random() < 0.5)} for d in items]  # labels the features do not carry
    assert np.mean([u["metrics"]["val_auc"] for u in probe_task(task, noise, features, cv, [1.0], probe)]) < 0.75
    x = np.stack(list(features.values()))
    y = np.array([d["label"] for d in items])
    full = fit_predict("classification", x[:40], y[:40], x[40:], probe, 2)
    np.testing.assert_allclose(fit_predict("classification", x[:40], y[:40], x[40:41], probe, 2), full[:1])
    with pytest.raises(ValueError, match="at least 2 classes"):
        fit_predict("classification", x[:5], np.zeros(5, int), x[40:], probe, 2)


def test_encoder_features_come_from_the_pretrained_encoder(cohort: tuple[Path, Path], tmp_path: Path) -> None:
    items = task_items(cohort[0], ["validation"], "regression")
    torch.manual_seed(1)
    torch.save(mae_network(TINY_MAE).state_dict(), tmp_path / "mae.pt")
    mean = encoder_features(TINY_MAE, str(tmp_path / "mae.pt"), items, "mean", batch_size=3)
    assert list(mean) == [d["image"] for d in items] and mean[items[0]["image"]].shape == (TINY_MAE["hidden_size"],)
    again = encoder_features(TINY_MAE, str(tmp_path / "mae.pt"), items[:2], "mean", batch_size=1)
    np.testing.assert_allclose(again[items[1]["image"]], mean[items[1]["image"]], atol=1e-5)  # per cine, any batch
    cls = encoder_features(TINY_MAE, str(tmp_path / "mae.pt"), items, "cls")
    tokens = encoder_features(TINY_MAE, str(tmp_path / "mae.pt"), items, batch_size=2)  # the default: patch tokens
    patches = (96 // TINY_MAE["patch_size"]) ** 2
    assert tokens[items[0]["image"]].shape == (patches * TINY_MAE["hidden_size"],)
    np.testing.assert_allclose(tokens[items[0]["image"]].reshape(patches, -1).mean(0), mean[items[0]["image"]], atol=1e-5)
    scratch = encoder_features(TINY_MAE, "", items, "mean", seed=0)
    assert not np.allclose(cls[items[0]["image"]], mean[items[0]["image"]])
    assert not np.allclose(scratch[items[0]["image"]], mean[items[0]["image"]])
    with pytest.raises(ValueError, match="probe#pooling"):
        encoder_features(TINY_MAE, "", items, "max")


# ---------------------------------------------------------------------------------------------- labelled cohort
def test_labelled_cohort_must_be_disjoint_from_the_generators_training_split(tmp_path: Path) -> None:
    prepared, _ = write_cohort(tmp_path / "generator", n_generated=0)
    labelled, _ = write_cohort(tmp_path / "labelled", n_generated=0, first=1000)
    splits = ["training", "validation", "test"]
    assert check_disjoint_subjects(str(labelled), splits, str(prepared), ["training"]) == 28
    with pytest.raises(ValueError, match=r"12 subjects of the labelled cohort .* \['PH000000', 'PH000001'"):
        check_disjoint_subjects(str(prepared), splits, str(prepared), ["training"])  # the old protocol's mistake
    assert check_disjoint_subjects(str(prepared), ["validation", "test"], str(prepared), ["training"]) == 16


def test_phantom_cohorts_numbered_from_first_subject_share_no_id(tmp_path: Path) -> None:
    make_cohort(tmp_path / "a", 2, seed=1, num_workers=1, montage_subjects=0, first_subject=100_000)
    assert sorted(p.name for p in (tmp_path / "a").glob("PH*")) == ["PH100000", "PH100001"]
    record = json.loads((tmp_path / "a" / "cohort.json").read_text())
    assert record["first_subject"] == 100_000
    (tmp_path / "a" / "cohort.json").write_text(json.dumps({k: v for k, v in record.items() if k != "first_subject"}))
    with pytest.raises(ValueError, match="a phantom cohort of other settings"):  # recorded: subjects from 0
        make_cohort(tmp_path / "a", 2, seed=1, num_workers=1, montage_subjects=0, first_subject=100_000)
    with pytest.raises(ValueError, match=r"first_subject in 0..999998"):
        make_cohort(tmp_path / "b", 2, seed=1, num_workers=1, first_subject=999_999)


# ------------------------------------------------------------------------------------------------------ metrics
@pytest.mark.parametrize("classes", [2, 4])
def test_classification_metrics_match_scikit_learn(classes: int) -> None:
    g = torch.Generator().manual_seed(classes)
    target = torch.arange(60) % classes
    logits = torch.randn(60, classes, generator=g) + 1.5 * nn_onehot(target, classes)
    probs = logits.softmax(1)
    got = classification_metrics(probs, target)
    auc = roc_auc_score(target, probs[:, 1]) if classes == 2 else roc_auc_score(target, probs, multi_class="ovr")
    assert got["acc"] == pytest.approx(accuracy_score(target, probs.argmax(1)))
    assert got["auc"] == pytest.approx(auc) and 0.5 < auc < 1.0


def nn_onehot(target: torch.Tensor, classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(target, classes).float()


def test_regression_metrics_match_scikit_learn(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.randn(40, 3, generator=g)
    pred = target + 0.5 * torch.randn(40, 3, generator=g)
    stats = {"columns": COLUMNS, "mean": MEAN, "std": STD}
    got = regression_metrics(pred, target, stats)
    units = [x.numpy() * np.asarray(STD) + np.asarray(MEAN) for x in (pred, target)]
    r2 = r2_score(units[1], units[0], multioutput="raw_values")
    mae = mean_absolute_error(units[1], units[0], multioutput="raw_values")
    for c, r, m in zip(COLUMNS, r2, mae):
        assert got[f"r2 {metric_column(c)}"] == pytest.approx(r) and got[f"mae {metric_column(c)}"] == pytest.approx(m)
    assert got["mean_r2"] == pytest.approx(r2.mean())

    (tmp_path / "stats.json").write_text(json.dumps(stats))
    metric = TaskMetrics("regression", tmp_path / "stats.json")  # the Ignite metric over two batches: the same
    metric.reset()
    for half in (slice(0, 25), slice(25, 40)):
        metric.update((pred[half], target[half]))
    assert metric.compute()["val_mean_r2"] == pytest.approx(r2.mean())


# --------------------------------------------------------------------------------------------- MAE and transfer
def test_patch_order_matches_monai_patch_embedding_and_loss_counts_masked_patches_only() -> None:
    x = torch.rand(2, 50, 96, 96)
    tokens = patchify(x, 16)  # (2, 36, 12800)
    torch.testing.assert_close(unpatchify(tokens, 16, 50, 96, 96), x)
    embed = PatchEmbeddingBlock(50, 96, 16, hidden_size=4, num_heads=1, proj_type="conv", pos_embed_type="none",
                                spatial_dims=2)
    with torch.no_grad():  # hidden unit 0 reads channel 0, pixel (0, 0) of its patch: token value 0 in our layout
        embed.patch_embeddings.weight.zero_()
        embed.patch_embeddings.bias.zero_()
        embed.patch_embeddings.weight[0, 0, 0, 0] = 1.0
        torch.testing.assert_close(embed(x)[..., 0], tokens[..., 0])
    mask = (torch.arange(36) % 4 != 0).int().expand(2, 36)  # 27 of 36 masked, as a 0.75 ratio
    loss = MaskedPatchLoss()
    pred = tokens.clone()
    assert loss(pred, tokens, mask) == 0
    pred[:, 0] += 1.0  # a visible patch: no change
    assert loss(pred, tokens, mask) == 0
    pred[:, 1] += 1.0  # a masked patch: its squared error over the masked ones
    assert loss(pred, tokens, mask).item() == pytest.approx(2 / (2 * 27))


def test_encoder_transfer_loads_every_key_or_fails(tmp_path: Path) -> None:
    torch.manual_seed(0)
    mae = mae_network(TINY_MAE)
    state = mae.state_dict()
    torch.save(state, tmp_path / "mae.pt")
    net = vit_network(TINY_MAE, 3, tmp_path / "mae.pt")
    vit = net.vit.state_dict()
    encoder = [k for k in vit if not k.startswith("classification_head.")]
    for key in encoder:
        source = key.replace("norm.", f"blocks.{TINY_MAE['num_layers']}.") if key.startswith("norm.") else key
        torch.testing.assert_close(vit[key], state[source])
    torch.save({k: v for k, v in state.items() if k != "blocks.0.attn.qkv.weight"}, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"missing keys \['blocks.0.attn.qkv.weight'\]"):
        vit_network(TINY_MAE, 3, tmp_path / "missing.pt")
    torch.save(mae_network({**TINY_MAE, "hidden_size": 64}).state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match="shape mismatch"):
        vit_network(TINY_MAE, 3, tmp_path / "other.pt")
    torch.save({**state, "extra.weight": torch.zeros(1)}, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match="unexpected MaskedAutoEncoderViT key 'extra.weight'"):
        vit_network(TINY_MAE, 3, tmp_path / "extra.pt")


# ------------------------------------------------------------------------------------------------- end to end
def _bundle(configs: list[str], **overrides: object) -> None:
    run(config_file=[str(REPO / c) for c in configs] + [TINY], bundle_root=str(REPO), **overrides)


def test_tiny_pretrain_finetune_infer_and_export(cohort: tuple[Path, Path], tmp_path: Path) -> None:
    prepared, generated = cohort
    data = {"dataset_dir": str(prepared), "generated_dir": str(generated), "ckpt_dir": str(tmp_path / "models")}
    _bundle(["configs/pretrain_mae.json"], **data, mix_ratio=1, output_dir=str(tmp_path / "mae"))
    report = json.loads((tmp_path / "mae" / "metrics.json").read_text())
    assert report["complete"] and report["info"]["real_pretraining"] == report["info"]["synthetic_pretraining"] == 10
    assert report["metrics"]["val_loss"] > 0 and (tmp_path / "mae" / "reconstruction.png").is_file()
    events = tensorboard_events(tmp_path / "mae" / "tensorboard")
    assert {"train_loss", "val_loss"} <= set(events.Tags()["scalars"]) and events.Tags()["images"] == ["reconstruction"]

    _bundle(["configs/train_classifier.json"], **data, output_dir=str(tmp_path / "ft"), label_key="diagnosis_index",
            num_classes=4, fold=1)
    result = json.loads((tmp_path / "ft" / "classifier_diagnosis_index_fold1.json").read_text())
    assert 0 <= result["metrics"]["val_acc"] <= 1 and 0 <= result["metrics"]["val_auc"] <= 1
    assert result["info"]["training_cines"] == 8 and len(result["info"]["validation_subjects"]) == 8
    events = tensorboard_events(tmp_path / "ft" / "tensorboard" / "classifier_diagnosis_index_fold1")  # per run
    assert {"iteration_loss", "train_loss", "val_acc", "val_auc"} <= set(events.Tags()["scalars"])

    _bundle(["configs/train_classifier.json", "configs/train_regressor.json"], **data, output_dir=str(tmp_path / "ft"),
            mix_ratio=1)
    result = json.loads((tmp_path / "ft" / "regressor_fold0.json").read_text())
    assert result["info"]["synthetic_training_cines"] == 8 and {f"val_r2 {metric_column(c)}" for c in COLUMNS} <= set(result["metrics"])

    # inference of the classifier on prepared cines, then its TorchScript export with the MONAI CLI
    names = "['healthy','dilated','hypertrophic','restrictive']"
    ckpt = tmp_path / "models" / "classifier_diagnosis_index_fold1.pt"
    _bundle(["configs/inference.json"], dataset_dir=str(prepared), output_dir=str(tmp_path / "inf"),
            ckpt_path=str(ckpt), class_names=eval(names))
    with (tmp_path / "inf" / "predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 28 and rows[0]["subject"] == "PH000000"
    assert all(abs(sum(float(r[f"p_{c}"]) for c in eval(names)) - 1) < 1e-4 for r in rows)
    ts = tmp_path / "classifier.ts"
    done = subprocess.run([sys.executable, "-m", "monai.bundle", "ckpt_export", "--net_id", "network_def", "--filepath",
                           str(ts), "--ckpt_file", str(ckpt), "--config_file",
                           str(["configs/inference.json", "configs/profiles/tiny.json"]), "--class_names", names],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    x = torch.as_tensor(np.load(prepared / "images" / "PH000003.npy")[0], dtype=torch.float32)[None]  # (1, 50, 96, 96)
    net = load_weights(vit_network(TINY_MAE, 4), ckpt).eval()
    with torch.no_grad():
        logits = net(x)
        torch.testing.assert_close(torch.jit.load(str(ts))(x), logits)  # every weight made it into the export
    row = next(r for r in rows if r["subject"] == "PH000003")
    np.testing.assert_allclose([float(row[f"p_{c}"]) for c in eval(names)], logits.softmax(1)[0], atol=1e-5)


def test_tiny_table_writes_the_comparison_and_resumes(cohort: tuple[Path, Path], tmp_path: Path) -> None:
    prepared, generated = cohort
    labelled, _ = write_cohort(tmp_path / "labelled", n_generated=0, first=1000)  # other subjects than the generator's
    config = json.loads((REPO / "configs" / "downstream_table.json").read_text())
    tasks = [t for t in config["tasks"] if t["name"] in ("disease", "phenotypes")]
    kwargs = {"cohort": Cohort(str(prepared), str(generated), str(labelled)),
              "protocol": Protocol(label_fractions=[0.5, 1.0], finetune_fractions=[0.5], repeats=2,
                                   mix_ratios=[1], mix_star_ratios=[1], generate_missing=False),
              "workspace": Workspace(str(tmp_path / "table"), str(REPO), TINY), "mae": TINY_MAE,
              "finetune": layered("train_classifier.json", "tiny")["finetune"], "probe": config["probe"],
              "tasks": tasks, "table_phenotypes": ["LVEF (%)", "LVM (g)"]}
    summary = run_table(**kwargs)
    runs = summary["seconds"]["runs"]
    assert sum(name.startswith("pretrain_") for name in runs) == 2 and sum(name.startswith("probe_") for name in runs) == 4
    assert len(runs) == 2 + 4 + (3 * 2 + 1) * 2  # 2 MAEs; 4 probed rows; (3 rows x 2 tasks + mix*) x 2 folds
    units = summary["units"]
    assert len(units["probe"]["MAE (real)"]["disease"]) == 2 * 2 * 2  # fractions x repeats x folds
    assert {(u["repeat"], u["fraction"]) for u in units["finetune"]["MAE (real)"]["phenotypes"]} == {(0, 0.5)}
    assert units["probe"]["- mix* 100%"].keys() == {"phenotypes"} and all(
        u["synthetic"] == u["training"] > 0 for u in units["probe"]["- mix* 100%"]["phenotypes"])  # mix* 100%
    disease = summary["results"]["probe"]["1"]["MAE (real)"]["disease"]["val_auc"]
    values = [u["metrics"]["val_auc"] for u in units["probe"]["MAE (real)"]["disease"] if u["fraction"] == 1.0]
    assert disease["n"] == 4 and disease["mean"] == pytest.approx(np.mean(values))
    difference = summary["paired_differences"]["probe"]["0.5"]["- mix 100%"]["disease"]["val_auc"]
    assert difference["n"] == 4 and difference["low"] <= difference["mean"] <= difference["high"]
    assert "MAE (real)" not in summary["paired_differences"]["probe"]["0.5"]
    table = (tmp_path / "table" / "table.md").read_text()
    for method in ("ViT (scratch)", "MAE (real)", "- mix 100%", "- mix* 100%"):
        assert f"| {method} |" in table
    assert "## linear probe, 100% of each training fold" in table and "## fine-tuning, 50% of each" in table
    assert "LVEF (%) MAE" in table and "LVM (g)" not in table  # a column the cohort lacks is left out
    with (tmp_path / "table" / "paired_differences.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["row"] for r in rows} == {"ViT (scratch)", "- mix 100%", "- mix* 100%"}
    assert all(float(r["low_corrected"]) <= float(r["low"]) for r in rows if r["n"] != "1" and r["low"] != "nan")
    assert (tmp_path / "table" / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    latest = sorted(p.name for p in (tmp_path / "table").rglob("*_latest.pt"))
    assert latest == ["mae_mix0_latest.pt", "mae_mix1_latest.pt"]  # fine-tuning resume files removed
    assert not list((tmp_path / "table" / "runs").rglob("*.pt"))  # and the fine-tuned weights: metrics are kept

    again = run_table(**kwargs)  # every run finished with the same settings: nothing runs again
    assert again["seconds"]["runs"] == runs and again["results"] == summary["results"]
    with pytest.raises(ValueError, match="needs 20.*--downstream#generate_missing True"):
        run_table(**{**kwargs, "protocol": replace(kwargs["protocol"], mix_ratios=[1, 2])})
    with pytest.raises(ValueError, match=r"mix_star_ratios \[2\] need the same ratios"):
        run_table(**{**kwargs, "protocol": replace(kwargs["protocol"], mix_star_ratios=[2])})
    with pytest.raises(ValueError, match=r"finetune_fractions \[0.25\] must be among"):
        run_table(**{**kwargs, "protocol": replace(kwargs["protocol"], finetune_fractions=[0.25])})
    with pytest.raises(ValueError, match="12 subjects of the labelled cohort"):  # cross-validating the MAE's cines
        run_table(**{**kwargs, "cohort": replace(kwargs["cohort"], labelled_dir=str(prepared))})

    table_dir = tmp_path / "table"
    before = {p: p.stat().st_mtime_ns for p in table_dir.glob("*/**/*.json")}
    weights = table_dir / "models" / "mae_mix1.pt"  # a remade encoder: its probes and fine-tunes are stale
    torch.save({k: v + 0.01 if v.is_floating_point() else v for k, v in
                torch.load(weights, weights_only=True).items()}, weights)
    run_table(**kwargs)
    redone = sorted({p.relative_to(table_dir).parts[:2] for p, t in before.items() if p.stat().st_mtime_ns != t})
    assert redone == [("probe", "mix1.json"), ("probe", "mixstar1.json"), ("runs", "mix1"), ("runs", "mixstar1")]


def test_tiny_pipeline_table_through_the_cli(tiny_pipeline: Path, tmp_path: Path) -> None:
    """The table on the tiny pipeline's own output, as a user runs it: its labelled cohort made by make_phantom and
    prepare (20 subjects numbered from 100000), 2 folds, label fractions 0.5 and 1, the missing synthetic cines
    generated."""
    out = tmp_path / "pipeline"
    shutil.copytree(tiny_pipeline, out)
    run_bundle(["configs/downstream_table.json", "configs/profiles/tiny.json"], env=ONE_THREAD, output_dir=out,
               ckpt_dir=out / "models", seed=2)
    summary = json.loads((out / "downstream" / "summary.json").read_text())
    labelled = Path(summary["cohort"]["labelled_dir"])
    assert labelled == out / "downstream" / "cohort_20_seed1_from100000" / "prepared"
    generator = {d["subject"] for d in json.loads((out / "prepared" / "datalist.json").read_text())["training"]}
    cross_validated = {d["subject"] for s in ("training", "validation", "test")
                       for d in json.loads((labelled / "datalist.json").read_text())[s]}
    assert len(cross_validated) == summary["cohort"]["labelled_subjects"] == 20 and not cross_validated & generator
    assert summary["cohort"]["synthetic_available"] >= summary["cohort"]["synthetic_needed"] > 4  # 4 made by the pipeline
    assert set(summary["results"]) == {"probe", "finetune"} and set(summary["results"]["probe"]) == {"1", "0.5"}
    units = summary["units"]["finetune"]["- mix* 100%"]["phenotypes"]
    assert len(units) == 2 and all(u["synthetic"] == u["training"] for u in units)
    for name in ("table.md", "table.csv", "paired_differences.md", "paired_differences.csv", "learning_curve.png"):
        assert (out / "downstream" / name).stat().st_size > 0, name
    differences = (out / "downstream" / "paired_differences.md").read_text()
    assert "| - mix 100% | " in differences and "| - mix* 100% | " in differences


@pytest.mark.slow
def test_paper_profile_networks_build_and_take_a_step() -> None:
    """MAE-base (12 x 768 encoder, 8 x 512 decoder) on 50-channel 96 x 96 cines and its ViT: sizes and one step each."""
    paper = layered("pretrain_mae.json", "paper")["mae"]
    mae, vit = mae_network(paper), vit_network(paper, 4)
    count = lambda net: sum(p.numel() for p in net.parameters())
    encoder = sum(p.numel() for n, p in mae.named_parameters() if not n.startswith(("decoder_", "mask_tokens")))
    assert count(vit) - encoder == 768 * 4 + 4  # the same encoder plus a linear head
    assert 90e6 < encoder < 100e6  # ViT-Base blocks (85M) + a 12,800 x 768 patch embedding (9.8M)
    x = torch.rand(2, 50, 96, 96)
    pred, mask = mae(x)
    MaskedPatchLoss()(pred, patchify(x, 16), mask).backward()
    torch.nn.functional.cross_entropy(vit(x), torch.tensor([0, 3])).backward()
    assert int(mask.sum()) == 2 * 27 and all(p.grad is not None for p in vit.parameters() if p.requires_grad)
