"""Downstream stage: synthetic mixing, fold splitting, metrics (against scikit-learn), MAE pieces and encoder transfer,
the tiny configs end to end (pretraining, classification, regression with mix*, inference, TorchScript export) and the
comparison table."""

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
from sklearn.metrics import accuracy_score, mean_absolute_error, r2_score, roc_auc_score

from scripts.downstream.finetune import (
    TaskMetrics,
    classification_metrics,
    cv_folds,
    fold_datalists,
    metric_column,
    regression_metrics,
    task_items,
    vit_network,
)
from scripts.downstream.mae import MaskedPatchLoss, mae_network, patchify, pretrain_datalist, unpatchify
from scripts.downstream.table import Cohort, Mixing, Workspace, run_table
from scripts.runtime.checkpoints import load_weights
from tests.conftest import REPO, tensorboard_events
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


def test_cines_flagged_as_copies_never_enter_pretraining(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    prepared, generated = write_cohort(tmp_path)
    with caplog.at_level(logging.WARNING):
        unaudited = pretrain_datalist(prepared, generated, 1, ["training"], None, 2, 0)["training"]
    assert "no privacy audit" in caplog.text and "G000003" in {d["subject"] for d in unaudited}
    (generated / "privacy_audit.json").write_text(json.dumps({"flagged": ["G000003", "G000007"]}))
    lists = pretrain_datalist(prepared, generated, 1, ["training"], None, 2, 0)["training"]
    synthetic = [d["subject"] for d in lists if d.get("synthetic")]
    assert len(synthetic) == 10 and not {"G000003", "G000007"} & set(synthetic)
    assert synthetic == [f"G{i:06d}" for i in range(12) if i not in (3, 7)]
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
    config = json.loads((REPO / "configs" / "downstream_table.json").read_text())
    tasks = [t for t in config["tasks"] if t["name"] in ("disease", "phenotypes")]
    kwargs = {"cohort": Cohort(str(prepared), str(generated)),
              "mixing": Mixing(mix_ratios=[1], mix_star_ratios=[1], generate_missing=False),
              "workspace": Workspace(str(tmp_path / "table"), str(REPO), TINY), "mae": TINY_MAE,
              "finetune": layered("train_classifier.json", "tiny")["finetune"], "tasks": tasks,
              "table_phenotypes": ["LVEF (%)", "LVM (g)"]}
    summary = run_table(**kwargs)
    assert len(summary["seconds"]["runs"]) == 2 + 3 * 2 * 2 + 2  # 2 MAEs; 3 rows x 2 tasks x 2 folds; mix* x 2 folds
    table = (tmp_path / "table" / "table.md").read_text()
    for method in ("ViT (scratch)", "MAE (real)", "- mix 100%", "- mix* 100%"):
        assert f"| {method} |" in table
    assert "LVEF (%) MAE" in table and "LVM (g)" not in table  # a column the cohort lacks is left out
    assert summary["results"]["- mix* 100%"].keys() == {"phenotypes"}
    disease = summary["results"]["MAE (real)"]["disease"]["val_auc"]
    assert len(disease["folds"]) == 2 and disease["mean"] == pytest.approx(np.mean(disease["folds"]))
    with (tmp_path / "table" / "table.csv").open(newline="") as f:
        assert len(list(csv.DictReader(f))) == sum(len(m) for t in summary["results"].values() for m in t.values())
    latest = sorted(p.name for p in (tmp_path / "table").rglob("*_latest.pt"))
    assert latest == ["mae_mix0_latest.pt", "mae_mix1_latest.pt"]  # fine-tuning resume files removed

    again = run_table(**kwargs)  # every run finished with the same settings: nothing runs again
    assert again["seconds"]["runs"] == summary["seconds"]["runs"] and again["results"] == summary["results"]
    with pytest.raises(ValueError, match="needs 20.*--downstream#generate_missing True"):
        run_table(**{**kwargs, "mixing": replace(kwargs["mixing"], mix_ratios=[1, 2])})
    with pytest.raises(ValueError, match=r"mix_star_ratios \[2\] need the same ratios"):
        run_table(**{**kwargs, "mixing": replace(kwargs["mixing"], mix_star_ratios=[2])})

    runs = tmp_path / "table" / "runs"
    before = {p: p.stat().st_mtime_ns for p in runs.rglob("*.json")}
    weights = tmp_path / "table" / "models" / "mae_mix1.pt"  # a remade encoder: its fine-tunes are stale
    torch.save({k: v + 0.01 if v.is_floating_point() else v for k, v in
                torch.load(weights, weights_only=True).items()}, weights)
    run_table(**kwargs)
    redone = sorted({p.relative_to(runs).parts[0] for p, t in before.items() if p.stat().st_mtime_ns != t})
    assert redone == ["mix1", "mixstar1"]


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
