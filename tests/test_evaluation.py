"""The evaluation suite: metrics that are right, not just present (FID/FD math and floors, the Inception and I3D
protocols, adherence of real phantom cines, copy detection, membership inference) and the config end to end."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.metrics import FIDMetric
from torch import nn

from scripts.data.cohort import copy_audit, load_cines
from scripts.data.phantom import make_cohort
from scripts.data.phenotypes import PHENOTYPE_COLUMNS
from scripts.data.prepare import prepare
from scripts.evaluation import adherence, fidelity, privacy
from scripts.evaluation.protocol import value_rows
from scripts.generation import membership
from scripts.generation.autoencoder import CineAutoencoderKL
from scripts.generation.mar import MAR
from scripts.runtime.features import frechet_distance, load_feature_network
from scripts.runtime.files import file_digest
from scripts.runtime.stages import section_overrides, select
from tests.conftest import run_bundle
from tests.networks import build, def_kwargs

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """12 prepared phantom subjects: (prepared folder, all datalist items in split order)."""
    root = tmp_path_factory.mktemp("eval_cohort")
    make_cohort(root / "phantom", 12, seed=3, num_workers=1, montage_subjects=0)
    prepare(root / "phantom", root / "prepared", num_workers=0)
    datalist = json.loads((root / "prepared" / "datalist.json").read_text())
    return root / "prepared", [d for s in ("training", "validation", "test") for d in datalist[s]]


class StandInI3D(nn.Module):
    """Stand-in for the I3D TorchScript: (N, 400) features that record the input's layout and range."""

    def forward(self, x: torch.Tensor, rescale: bool = True, resize: bool = True,
                return_features: bool = False) -> torch.Tensor:
        out = torch.zeros(x.shape[0], 400)
        for k in range(5):
            out[:, k] = x.shape[k]
        out[:, 5], out[:, 6] = x.amin((1, 2, 3, 4)), x.amax((1, 2, 3, 4))
        out[:, 7], out[:, 8], out[:, 9] = float(rescale), float(resize), float(return_features)
        out[:, 10:10 + x.shape[2]] = x[:, 0].mean((2, 3))  # per-frame means
        return out


@pytest.fixture(scope="module")
def i3d_stand_in(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("i3d") / "i3d_stand_in.pt"
    torch.jit.save(torch.jit.script(StandInI3D()), str(path))
    return path


# ----------------------------------------------------------------------------------------------------------- fidelity
def test_frechet_distance_is_zero_on_itself_grows_with_noise_and_matches_monai() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 160, generator=g), torch.randn(40, 160, generator=g) * 1.5 + 0.2
    assert abs(frechet_distance(a, a)) < 1e-8
    assert frechet_distance(a, b) == pytest.approx(float(FIDMetric()(a.double(), b.double())), rel=1e-6)  # n < D path
    noise = torch.randn(a.shape, generator=g)
    d = [frechet_distance(a, a + s * noise) for s in (0.1, 0.3, 1.0)]
    assert 0 < d[0] < d[1] < d[2]
    big = torch.randn(200, 8, generator=g)  # n >= D: MONAI's path; a unit shift of the mean in 8 dims adds 8
    assert frechet_distance(big, big + 1) == pytest.approx(8.0, rel=1e-6)
    with pytest.raises(ValueError, match=">= 2 vectors"):
        frechet_distance(a[:1], b)


def test_floors_use_disjoint_seeded_halves_of_the_same_size() -> None:
    a, b = fidelity.disjoint_halves(11, seed=4)
    assert len(a) == len(b) == 5 and not set(a) & set(b)
    assert all(np.array_equal(x, y) for x, y in zip((a, b), fidelity.disjoint_halves(11, seed=4)))
    assert not np.array_equal(a, fidelity.disjoint_halves(11, seed=5)[0])
    g = torch.Generator().manual_seed(1)
    real, like = torch.randn(20, 3, 8, generator=g), torch.randn(12, 3, 8, generator=g)
    halves = fidelity.disjoint_halves(20, seed=0)
    same, shifted = (fidelity.fd_with_floor(real, x, halves) for x in (like, like + 2.0))
    assert same["n_cines"] == 10 and same["n_vectors"] == 30 and same["floor"] == shifted["floor"]
    assert shifted["value"] > 4 * same["floor"] and shifted["value"] > 4 * same["value"]
    assert "skipped" in fidelity.fd_with_floor(real[:3, 0], like[:, 0], fidelity.disjoint_halves(3, 0))


class Spy(nn.Module):
    """Records the Inception input; returns zeros of the real network's feature size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x
        return torch.zeros(len(x), 2048)


def test_inception_protocol_and_fid_of_a_set_against_itself(cohort: tuple[Path, list[dict]]) -> None:
    prepared, items = cohort
    spy = Spy()
    cines = torch.zeros(2, 1, 50, 96, 96)
    cines[1] = 1.0
    assert fidelity.inception_features(spy, cines, 25, 8, "cpu").shape == (2, 2, 2048)
    assert spy.seen.shape == (4, 3, 299, 299)
    assert spy.seen[:2].unique().tolist() == [-1.0] and spy.seen[2:].unique().tolist() == [0.9921875]

    net = fidelity.load_torchscript(fidelity.inception_path(), "cpu")
    real = load_cines(prepared, items[:3]).float()
    g = torch.Generator().manual_seed(0)
    feats = [fidelity.inception_features(net, (real + s * torch.randn(real.shape, generator=g)).clamp(0, 1), 25, 8,
                                         "cpu").flatten(0, 1) for s in (0.0, 0.05, 0.3)]  # (6, 2048) each
    assert abs(frechet_distance(feats[0], feats[0])) < 1e-6
    d = [frechet_distance(feats[0], f) for f in feats[1:]]
    assert 0 < d[0] < d[1]


def test_fvd_path_with_a_stand_in_i3d(cohort: tuple[Path, list[dict]], i3d_stand_in: Path) -> None:
    prepared, items = cohort
    cines = load_cines(prepared, items[:2])
    feats = fidelity.i3d_features(fidelity.load_torchscript(i3d_stand_in, "cpu"), cines, 2, "cpu")
    assert feats.shape == (2, 400)
    assert feats[:, :5].tolist() == [[2, 3, 16, 224, 224]] * 2  # (batch, RGB, 16 frames, 224, 224)
    assert feats[:, 5].min() >= -1 and feats[:, 6].max() <= 1 and feats[:, 7:10].tolist() == [[0, 0, 1]] * 2
    expected = cines[:, 0, fidelity.i3d_frames(50)].float().mean((2, 3)) * 2 - 1  # (2, 16) per-frame means
    assert torch.allclose(feats[:, 10:26], expected, atol=0.02)


# ---------------------------------------------------------------------------------------------------------- adherence
def test_adherence_of_phantom_cines_from_their_true_labels_is_high(cohort: tuple[Path, list[dict]]) -> None:
    prepared, items = cohort
    labels = load_cines(prepared, items, "label")[:, 0].numpy()
    measured, failures = adherence.measure_labels(labels, items)
    assert not failures
    stats = adherence.adherence_stats(value_rows(items, PHENOTYPE_COLUMNS), measured, PHENOTYPE_COLUMNS)
    for c in ("LVEDV (mL)", "LVEF (%)", "LVM (g)", "RAV max (mL)"):
        assert stats[c]["n"] == 12 and stats[c]["pearson_r"] > 0.95 and stats[c]["r2"] > 0.8, (c, stats[c])

    cols = ["LVEDV (mL)", "LVEF (%)"]
    entry, _ = adherence.set_adherence(labels, items, value_rows(items, cols), cols)
    fixed = entry["median_geometry"]  # every item at the median pixel size: volumes lose the crop's size cue
    assert fixed["LVEF (%)"]["pearson_r"] == pytest.approx(entry["phenotypes"]["LVEF (%)"]["pearson_r"], abs=0.01)
    assert fixed["LVEDV (mL)"]["pearson_r"] < entry["phenotypes"]["LVEDV (mL)"]["pearson_r"]

    frames = adherence.ed_frames(labels)  # phantom cines are prepared: the largest LV area is at frame 0
    assert (frames == 0).all() and adherence.ed_aligned_share(frames, labels.shape[1]) == 1.0
    shifted = adherence.ed_frames(np.stack([np.roll(labels[k], s, axis=0) for k, s in enumerate((2, -2, 10))]))
    assert shifted.tolist() == [2, 48, 10] and adherence.ed_aligned_share(shifted, 50) == pytest.approx(2 / 3)

    t = np.linspace(1, 10, 6)[:, None]
    perfect, scaled = (adherence.adherence_stats(t, m, ["x"])["x"] for m in (t, 2 * t))
    assert perfect == {"n": 6, "pearson_r": pytest.approx(1.0), "mae": 0.0, "r2": 1.0, "slope": pytest.approx(1.0)}
    assert scaled["pearson_r"] == pytest.approx(1.0) and scaled["mae"] == pytest.approx(5.5) and scaled["r2"] < 0
    assert scaled["slope"] == pytest.approx(2.0)  # twice the requested spread

    empty = np.zeros_like(labels[:1])
    measured, failures = adherence.measure_labels(np.concatenate([labels[:1], empty]), items[:2])
    assert [f["subject"] for f in failures] == [items[1]["subject"]] and np.isnan(measured[1]).all()
    assert adherence.summarise(measured, failures, None, ["LVEF (%)"])["unmeasurable_share"] == 0.5


# ------------------------------------------------------------------------------------------------------------ privacy
def test_a_copied_training_cine_is_flagged_and_a_fresh_one_is_not(cohort: tuple[Path, list[dict]],
                                                                   tmp_path: Path) -> None:
    prepared, items = cohort
    train, held = items[:6], items[6:11]
    cines = load_cines(prepared, items)
    synthetic = [0, 11]  # a training cine copied, and a subject neither trained on nor held out
    moved = torch.stack([cines[1].roll((4, -4), (-2, -1)), cines[2].flip(-1)])  # copies shifted 4 px, or mirrored
    torch.manual_seed(0)
    emb = fidelity.pool_latents(fidelity.latent_means(CineAutoencoderKL(**def_kwargs("autoencoder_def", "tiny")),
                                                      torch.cat([cines, moved]), 4, "cpu"))
    queries = torch.cat([cines[synthetic], moved])
    pixel = privacy.NearestNeighbours({"heldout": privacy.pixel_rows(cines[6:11]), "syn": privacy.pixel_rows(queries)})
    for part in (cines[:4], cines[4:6]):  # streamed in chunks
        pixel.update(privacy.pixel_rows(part, variants=True))
    whole = privacy.NearestNeighbours(pixel.queries)
    whole.update(privacy.pixel_rows(cines[:6], variants=True))
    assert whole.result() == pixel.result()
    plain = privacy.NearestNeighbours({"syn": privacy.pixel_rows(moved)})
    plain.update(privacy.pixel_rows(cines[:6]))  # without the variants the moved copies look like other cines
    assert max(plain.result()["syn"]["similarity"]) < 0.95
    z = privacy.zscore(emb, emb[:6])
    embedding = privacy.NearestNeighbours({"heldout": privacy.unit_rows(z[6:11]),
                                           "syn": privacy.unit_rows(z[[*synthetic, -2, -1]])})
    embedding.update(privacy.unit_rows(z[:6]))
    names = ["G000000", "G000001", "G000002", "G000003"]
    audit = privacy.copy_audit({"pixel": pixel.result(), "embedding": embedding.result()},
                               {"heldout": [d["subject"] for d in held], "syn": names},
                               "heldout", [d["subject"] for d in train])
    syn = audit["sets"]["syn"]
    assert syn["flagged"] == ["G000000", "G000002", "G000003"] and syn["memorised_share"] == pytest.approx(3 / 6)
    assert [syn["nearest"][i]["training_index"] for i in (2, 3)] == [1, 2]
    assert min(syn["nearest"][i]["pixel_similarity"] for i in (2, 3)) == pytest.approx(1.0, abs=1e-4)
    assert syn["nearest"][0]["training_subject"] == train[0]["subject"] and syn["nearest"][0]["pixel_similarity"] == pytest.approx(1.0, abs=1e-4)
    assert syn["nearest"][1]["pixel_similarity"] < audit["thresholds"]["pixel"] or \
        syn["nearest"][1]["embedding_similarity"] < audit["thresholds"]["embedding"]
    assert audit["sets"]["heldout"]["flagged_share"]["pixel"] <= 0.2  # 95% quantile of 5: at most one above

    generated = tmp_path / "generated"
    for name, k in zip(("G000000", "G000001"), synthetic):
        (generated / "images").mkdir(parents=True, exist_ok=True)
        np.save(generated / "images" / f"{name}.npy", cines[k].numpy())
    gen_items = [{"image": f"images/{n}.npy", "subject": n, "synthetic": True} for n in ("G000000", "G000001")]
    (generated / "datalist.json").write_text(json.dumps({"training": gen_items, "phenotype_columns": []}))
    out = privacy.drop_flagged(generated / "datalist.json", syn["flagged"], tmp_path / "eval" / "private.json", audit)
    kept = json.loads(out.read_text())
    assert [d["subject"] for d in kept["training"]] == ["G000001"] and kept["dropped_as_copies"] == syn["flagged"]
    assert np.array_equal(np.load(out.parent / kept["training"][0]["image"]), cines[11].numpy())
    image = privacy.closest_pairs_image(syn, queries, lambda i: cines[i].numpy(), tmp_path / "pairs.png", 2)
    assert image.is_file()


def test_membership_inference_auc() -> None:
    separated = membership.membership_inference([0.1, 0.2, 0.3], [0.5, 0.6, 0.7, 0.8], permutations=200, seed=0)
    assert separated["auc"] == 1.0 and separated["tpr_at_fpr"] == 1.0 and 0.5 < separated["null_auc_95"] < 1.0
    assert membership.membership_inference([0.9, 1.0], [0.1, 0.2], permutations=0)["auc"] == 0.0
    rng = np.random.default_rng(0)
    chance = membership.membership_inference(rng.normal(size=200), rng.normal(size=200), permutations=100, seed=1)
    assert 0.4 < chance["auc"] < 0.6 and chance["auc"] < chance["null_auc_95"] + 0.05
    assert "skipped" in membership.membership_inference([0.1], [], permutations=10)


def test_mar_losses_are_seeded_per_subject_not_per_batch() -> None:
    torch.manual_seed(0)
    mar = MAR(n_phenotypes=3, **def_kwargs("mar_def", "tiny"))
    means, cond = torch.randn(3, 16, 25, 12, 12), torch.randn(3, 3)
    losses = membership.mar_losses(mar, means, cond, draws=2, seed=7)
    assert losses.shape == (3,) and np.isfinite(losses).all()
    assert np.array_equal(losses[1:], membership.mar_losses(mar, means[1:], cond[1:], draws=2, seed=7))
    assert not np.array_equal(losses, membership.mar_losses(mar, means, cond, draws=2, seed=8))


def test_segmenter_callable_from_a_checkpoint(tmp_path: Path) -> None:
    network = build("segmenter_def", "tiny")
    assert adherence.segmenter_callable(tmp_path / "none.pt", network, torch.device("cpu"))[0] is None
    torch.save(network.state_dict(), tmp_path / "segmenter.pt")
    segment, reason = adherence.segmenter_callable(tmp_path / "segmenter.pt", network, torch.device("cpu"))
    labels = adherence.segment_all(segment, torch.rand(3, 1, 50, 96, 96).half(), 2, "cpu")
    assert reason == "" and labels.shape == (3, 50, 96, 96) and labels.dtype == np.uint8 and labels.max() <= 5


def test_stage_runner_selects_by_name_and_forwards_sections_key_by_key() -> None:
    stages = [{"name": "train_segmenter"}, {"name": "generate_unconditional"}]
    assert select(stages, ["generate_unconditional"]) == stages[1:] and select(stages, None) == stages
    assert select(stages, []) == []
    with pytest.raises(ValueError, match="unknown stages"):
        select(stages, ["train"])
    forward = {"profile": "tiny", "segmenter": {"num_epochs": 3}, "mar_def": {"width": 64}}
    config = {"profile": "cpu", "segmenter": {"num_epochs": 16, "batch_size": 8}}
    assert section_overrides(forward, config) == {"profile": "tiny", "segmenter#num_epochs": 3}
    with pytest.raises(TypeError, match="built network"):
        section_overrides({"segmenter": torch.nn.Linear(1, 1)}, config)


# --------------------------------------------------------------------------------------------------------- end to end
def test_evaluation_config_on_a_tiny_pipeline_run(tiny_pipeline: Path, i3d_stand_in: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_pipeline, run)
    sets = {"cfg": str(run / "generated"), "unconditional": str(run / "generated_unconditional"),
            "absent": str(run / "nowhere")}
    run_bundle(["configs/evaluate_generation.json", "configs/profiles/tiny.json"], output_dir=run,
               ckpt_dir=run / "models", i3d_path=i3d_stand_in, sets=json.dumps(sets))
    out = run / "evaluation"
    metrics = json.loads((out / "metrics.json").read_text())
    assert {k: v["status"] for k, v in metrics["sets"].items()} == {"cfg": "ok", "unconditional": "ok",
                                                                     "absent": "missing"}
    assert set(json.loads((out / "stage_times.json").read_text())) == {"train_segmenter", "generate_unconditional"}
    assert (run / "models" / "evaluation" / "segmenter.pt").is_file()  # the instrument, apart from the labeller's
    assert not (run / "models" / "segmenter.pt").exists()
    assert len(list((run / "generated_unconditional" / "images").glob("G*.npy"))) == 4
    for metric in ("fid", "fvd", "vae_fd"):
        for name in ("cfg", "unconditional"):
            entry = metrics["fidelity"][metric][name]
            assert ("value" in entry and "floor" in entry) or "cine(s) per set" in entry["skipped"], (metric, entry)
    assert "value" in metrics["fidelity"]["fid"]["cfg"]
    ceiling = metrics["fidelity"]["fid"]["autoencoder reconstructions"]  # held-out half B through the autoencoder
    assert ceiling["floor"] == metrics["fidelity"]["fid"]["cfg"]["floor"] and ceiling["value"] > 0
    assert "autoencoder reconstructions" not in metrics["fidelity"]["vae_fd"]
    assert "| autoencoder reconstructions |" in (out / "report.md").read_text()
    measured = metrics["adherence"]
    assert measured["sets"]["cfg"]["phenotypes"]["LVEDV (mL)"]["n"] + \
        len(measured["sets"]["cfg"]["unmeasurable"]) == 4 and measured["heldout_true_labels"]["n"] == 3
    with (out / measured["sets"]["cfg"]["table"]).open(newline="") as f:  # one row per cine, requested beside measured
        table = list(csv.DictReader(f))
    assert [r["subject"] for r in table] == [f"G{i:06d}" for i in range(4)]
    assert all(0 <= int(r["ed_frame"]) < 50 and float(r["requested LVEF (%)"]) > 0 for r in table)
    assert 0.0 <= measured["sets"]["cfg"]["ed_aligned_share"] <= 1.0
    audit = metrics["privacy"]
    assert set(audit["sets"]) == {"heldout", "cfg", "unconditional"} and audit["membership_inference"]["n_training"] == 13
    private = json.loads((out / "cfg_datalist_private.json").read_text())
    assert len(private["training"]) == 4 - len(audit["sets"]["cfg"]["flagged"])
    for name in ("cfg", "unconditional"):  # the audit beside each set, where downstream stages read it
        assert copy_audit(Path(sets[name])) == (set(audit["sets"][name]["flagged"]), {f"G{i:06d}" for i in range(4)})
    assert {"measured", "generation_run"} <= set(metrics["speed"]["cfg"]) and "skipped" in metrics["speed"]["absent"]
    report = (out / "report.md").read_text()
    assert "real-vs-real FID" in report and "real held-out (floor)" in report and "chance" in report


def test_a_pinned_torchscript_file_loads_only_with_its_digest(tmp_path: Path) -> None:
    path = tmp_path / "features.ts"
    torch.jit.script(nn.Conv2d(1, 2, 3)).save(str(path))
    digest = file_digest(path)
    network = load_feature_network(path, "i3d_path", sha256=digest.upper())  # hex in either case
    assert network(torch.zeros(1, 1, 8, 8)).shape == (1, 2, 6, 6)
    with pytest.raises(ValueError, match=rf"features\.ts: i3d_path has SHA-256 {digest}, not the pinned 0+: not loaded"):
        load_feature_network(path, "i3d_path", sha256="0" * 64)
