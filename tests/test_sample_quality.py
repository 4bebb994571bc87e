"""Sample-quality tracking of MAR training: FJD on toy sets, the handler's records, checkpoint selection and resume,
the CFG choice and generate.json's cfg "auto"."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser
from torch.optim.swa_utils import AveragedModel

from scripts.generation.sample_quality import (
    CRITERION,
    DEFAULT_CFG,
    SAMPLING_FILE,
    Reference,
    SampleQuality,
    pooled_features,
    quality,
    rank,
    sampling_cfg,
)
from scripts.runtime.checkpoints import load_weights
from scripts.runtime.files import file_digest
from tests.networks import build

torch.set_num_threads(1)
SHAPE = (4, 5, 4, 4)  # a small latent: 4 tokens of 5 x 2 x 2 patches


def toy_latents(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 4, 5, 6, 6) latents whose spatial patterns follow (n, 3) phenotypes, plus noise."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(3, 4, 5, 6, 6, generator=torch.Generator().manual_seed(99))
    phenotypes = torch.randn(n, 3, generator=g)
    latents = torch.einsum("np,pcthw->ncthw", phenotypes, patterns) + 0.5 * torch.randn(n, 4, 5, 6, 6, generator=g)
    return latents, phenotypes.double()


def test_fjd_is_zero_for_the_same_set_and_grows_with_shuffled_features_or_pairing() -> None:
    reference = Reference.fit(pooled_features(toy_latents(300, 0)[0]), toy_latents(300, 0)[1], components=8)
    latents, phenotypes = toy_latents(120, 1)
    real = pooled_features(latents)
    same = quality(reference, real, real, phenotypes)
    assert abs(same["fjd"]) < 1e-6 and abs(same["fd"]) < 1e-6 and same["adherence"] > 0.9
    pairing = quality(reference, real, real[torch.randperm(120, generator=torch.Generator().manual_seed(2))],
                      phenotypes)  # the same latents, given to other conditions
    assert pairing["fd"] == pytest.approx(same["fd"], abs=1e-6) and pairing["fjd"] > 1.0
    assert abs(pairing["adherence"]) < 0.3
    shuffled = real[:, torch.randperm(real.shape[1], generator=torch.Generator().manual_seed(3))]  # other features
    features = quality(reference, real, shuffled, phenotypes)
    assert features["fd"] > 1.0 and features["fjd"] > 1.0
    assert same["calibration"] == pytest.approx(1.0)
    exaggerated = quality(reference, real, real.mean(0) + 2.0 * (real - real.mean(0)), phenotypes)
    assert exaggerated["calibration"] == pytest.approx(2.0) and exaggerated["adherence"] == pytest.approx(
        same["adherence"])  # r cannot see the doubled spread; calibration does


def _items(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"mean": torch.randn(SHAPE, generator=g), "phenotypes": torch.randn(3, generator=g)} for _ in range(n)]


def _trainer(ema: AveragedModel, step: float = 0.0) -> Engine:
    """A stand-in trainer: one iteration per epoch that shifts the EMA network's null embedding by `step`."""
    def update(engine: Engine, batch: object) -> None:
        with torch.no_grad():
            ema.module.null_cond.add_(step)

    engine = Engine(update)
    engine.amp = False
    engine.add_event_handler(Events.STARTED, lambda e: setattr(e.state, "device", torch.device("cpu")))
    return engine


def _handler(tmp_path: Path, ema: AveragedModel, **kwargs) -> SampleQuality:
    args = {"interval": 1, "num_samples": 4, "num_iter": 2, "num_inference_steps": 3, "cfg_candidates": [1.0, 2.0]}
    return SampleQuality(ema, _items(8, 0), _items(3, 1), tmp_path / "models", tmp_path / "out", **(args | kwargs))


def _ema() -> AveragedModel:
    """A tiny MAR's EMA, its zero-initialised weights made small random ones (else the condition has no effect)."""
    torch.manual_seed(0)
    network = build("mar_def", "tiny", n_phenotypes=3, latent_shape=SHAPE, latent_scale=1.0)
    with torch.no_grad():
        for p in (p for p in network.parameters() if not p.any()):
            p.normal_(std=0.02)
    return AveragedModel(network)


def test_rank_puts_adherence_within_the_fd_band_before_fjd() -> None:
    inside, better = {"fjd": 9.0, "fd": 1.9, "adherence": 0.3}, {"fjd": 12.0, "fd": 2.0, "adherence": 0.4}
    outside = {"fjd": 0.5, "fd": 2.1, "adherence": 0.9}
    assert rank(better, 2.0) > rank(inside, 2.0) > rank(outside, 2.0)
    assert rank(outside, 2.0) > rank({"fjd": 3.0, "fd": 2.5, "adherence": 0.95}, 2.0)  # both outside: lower FJD
    assert rank({"fjd": float("inf"), "fd": float("inf"), "adherence": float("nan")}, 2.0) < rank(outside, 2.0)
    assert rank(inside, 1.0) < rank(outside, 1.0)  # the band decides which rule applies


def test_rank_with_a_calibration_bound_puts_exaggerating_scales_after_the_others() -> None:
    strong = {"fjd": 9.0, "fd": 1.9, "adherence": 0.5, "calibration": 1.5}
    calm = {"fjd": 9.0, "fd": 1.9, "adherence": 0.4, "calibration": 1.1}
    stronger = {**strong, "adherence": 0.6, "calibration": 1.7}
    outside = {"fjd": 0.5, "fd": 2.1, "adherence": 0.9, "calibration": 1.0}
    assert rank(strong, 2.0) > rank(calm, 2.0)  # no bound: adherence alone, as for checkpoints
    assert rank(calm, 2.0, 1.2) > rank(strong, 2.0, 1.2) > rank(stronger, 2.0, 1.2)  # over it: less calibration first
    assert rank(stronger, 2.0, 1.2) > rank(outside, 2.0, 1.2)  # the FD band still comes first
    assert rank({**strong, "calibration": float("nan")}, 2.0, 1.2) == rank(strong, 2.0)  # unmeasured: no bound


def test_rank_with_the_membership_bound_keeps_a_generator_that_does_not_know_its_training_subjects() -> None:
    private = {"fjd": 9.0, "fd": 1.9, "adherence": 0.44, "membership_auc": 0.52, "membership_null_95": 0.62}
    leaking = {**private, "adherence": 0.60, "membership_auc": 1.0}
    less = {**leaking, "adherence": 0.55, "membership_auc": 0.8}
    outside = {"fjd": 0.5, "fd": 2.1, "adherence": 0.9, "membership_auc": 0.5, "membership_null_95": 0.62}
    assert rank(leaking, 2.0) > rank(private, 2.0)  # no bound: adherence alone
    assert rank(private, 2.0, membership_bound=True) > rank(less, 2.0, membership_bound=True) \
        > rank(leaking, 2.0, membership_bound=True) > rank(outside, 2.0, membership_bound=True)
    unmeasured = {k: v for k, v in leaking.items() if not k.startswith("membership")}  # a 0.9 checkpoint's record
    assert rank(unmeasured, 2.0, membership_bound=True) == rank(unmeasured, 2.0)


def test_cfg_choice_keeps_within_the_calibration_bound(tmp_path: Path, monkeypatch) -> None:
    scores = {1.0: (5.0, 1.0, 0.3, 0.8), 2.0: (6.0, 1.2, 0.4, 1.1), 3.0: (7.0, 1.5, 0.5, 1.4)}
    monkeypatch.setattr(SampleQuality, "measure", lambda self, engine, network, cfg: dict(
        zip(("fjd", "fd", "adherence", "calibration"), scores[cfg])))
    monkeypatch.setattr(SampleQuality, "fd_limit", lambda self: 2.0)
    for bound, chosen in ((None, 3.0), (1.2, 2.0), (0.5, 1.0)):
        ema = _ema()
        handler = _handler(tmp_path / str(bound), ema, cfg_candidates=[1.0, 2.0, 3.0], cfg_calibration_max=bound)
        trainer = _trainer(ema)
        handler.attach(trainer)
        trainer.run([0], max_epochs=1)
        choice = json.loads((tmp_path / str(bound) / "models" / SAMPLING_FILE).read_text())
        assert choice["cfg"] == chosen and choice["settings"]["cfg_calibration_max"] == bound
        assert choice["calibration_by_cfg"] == {"1.0": 0.8, "2.0": 1.1, "3.0": 1.4}
        assert (choice["criterion"] == CRITERION) == (bound is None)
        assert bound is None or f"calibration <= {bound:g}" in choice["criterion"]


def test_handler_saves_on_improvement_only_and_resumes_its_record(tmp_path: Path, monkeypatch, caplog) -> None:
    ema = _ema()
    handler = _handler(tmp_path, ema, cfg_candidates=[])
    scripted = iter([(5.0, 3.0, 0.9), (7.0, 1.0, 0.3), (3.0, 1.5, 0.5), (0.1, 2.5, 0.99), (9.0, 1.0, 0.4)])
    monkeypatch.setattr(SampleQuality, "measure", lambda self, engine, network, cfg: dict(
        zip(("fjd", "fd", "adherence"), next(scripted))))
    monkeypatch.setattr(SampleQuality, "fd_limit", lambda self: 2.0)
    trainer, saved = _trainer(ema, step=1.0), []
    handler.attach(trainer)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: saved.append(
        torch.load(tmp_path / "models" / "mar.pt", weights_only=True)["null_cond"][0, 0].item()))
    start = ema.module.null_cond[0, 0].item()
    trainer.run([0], max_epochs=4)
    # epoch 1 (FD outside the band) saved as the first; 2 is inside; 3 has higher adherence; 4 is outside again
    assert [round(v - start) for v in saved] == [1, 2, 3, 3]
    record = json.loads((tmp_path / "out" / "sample_quality.json").read_text())
    assert [r["saved"] for r in record["history"]] == [True, True, True, False]
    assert record["best_epoch"] == 3 and {k: record["best"][k] for k in ("fjd", "fd", "adherence")} == {
        "fjd": 3.0, "fd": 1.5, "adherence": 0.5} and "membership_auc" in record["best"]
    assert record["criterion"] == CRITERION and record["fd_limit"] == 2.0 and record["fd_floor"] > 0

    torch.save({"best_saver": handler.state_dict()}, tmp_path / "latest.pt")
    resumed = _handler(tmp_path, ema, cfg_candidates=[])
    resumed.load_state_dict(torch.load(tmp_path / "latest.pt", weights_only=True)["best_saver"])
    assert resumed.history == handler.history and (resumed.best, resumed.best_epoch) == (handler.best, 3)
    trainer = _trainer(ema, step=1.0)
    resumed.attach(trainer)
    trainer.run([0], max_epochs=1)  # adherence 0.4 < 0.5: mar.pt stays
    assert torch.load(tmp_path / "models" / "mar.pt", weights_only=True)["null_cond"][0, 0].item() == saved[-1]
    assert len(json.loads((tmp_path / "out" / "sample_quality.json").read_text())["history"]) == 5

    old = {"history": handler.history[:2], "best": 7.0, "best_epoch": 2}  # a 0.5.0 record: the best FJD only
    resumed.load_state_dict(old)
    assert resumed.best == {"fjd": 7.0, "fd": 1.0, "adherence": 0.3}
    with caplog.at_level(logging.WARNING):
        resumed.load_state_dict({"saved": [(0.1, "mar.pt")]})  # a best_saver record from before FJD selection
    assert "starts afresh" in caplog.text and len(resumed.history) == 2


def test_membership_bound_keeps_the_last_check_within_its_band(tmp_path: Path, monkeypatch) -> None:
    """Adherence rises every check while the membership AUC leaves its band at check 3: with the bound mar.pt keeps
    check 2 (and check 5, back within it, replaces it); without it the last check."""
    adherence, auc = [0.3, 0.4, 0.5, 0.6, 0.45], [0.5, 0.55, 0.8, 1.0, 0.6]
    for bound, kept in ((True, [1, 2, 2, 2, 5]), (False, [1, 2, 3, 4, 4])):
        ema = _ema()
        monkeypatch.setattr(SampleQuality, "measure", lambda self, engine, network, cfg: {
            "fjd": 5.0, "fd": 1.0, "adherence": adherence[len(self.history)]})
        monkeypatch.setattr(SampleQuality, "membership", lambda self, network: {
            "membership_auc": auc[len(self.history)], "membership_null_95": 0.62})
        monkeypatch.setattr(SampleQuality, "fd_limit", lambda self: 2.0)
        handler = _handler(tmp_path / str(bound), ema, cfg_candidates=[], membership_bound=bound)
        trainer, best = _trainer(ema), []
        handler.attach(trainer)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e, h=handler, b=best: b.append(h.best_epoch))
        trainer.run([0], max_epochs=5)
        assert best == kept
        record = json.loads((tmp_path / str(bound) / "out" / "sample_quality.json").read_text())
        assert ("membership AUC" in record["criterion"]) == bound
        assert record["settings"]["membership_bound"] == bound


def test_handler_samples_scores_saves_and_chooses_cfg(tmp_path: Path) -> None:
    ema = _ema()
    handler = _handler(tmp_path, ema)
    trainer = _trainer(ema)
    handler.attach(trainer)
    trainer.run([0], max_epochs=2)
    history = json.loads((tmp_path / "out" / "sample_quality.json").read_text())["history"]
    assert [r["epoch"] for r in history] == [1, 2] and history[0]["fjd"] == history[1]["fjd"]  # same weights, seeds
    assert history[0]["fjd"] > 0 and [r["saved"] for r in history] == [True, False]
    assert 0.0 <= history[0]["membership_auc"] <= 1.0 and history[0]["membership_null_95"] >= 0.5
    assert history[0]["membership_auc"] == history[1]["membership_auc"]  # same weights, same seeded loss draws
    ckpt = tmp_path / "models" / "mar.pt"
    load_weights(build("mar_def", "tiny", n_phenotypes=3, latent_shape=SHAPE, latent_scale=1.0), ckpt)
    choice = json.loads((tmp_path / "models" / SAMPLING_FILE).read_text())
    assert choice["cfg"] in (1.0, 2.0) and set(choice["fjd_by_cfg"]) == {"1.0", "2.0"}
    assert choice["fjd_by_cfg"]["1.0"] != choice["fjd_by_cfg"]["2.0"]
    scores = {float(c): {k: choice[f"{k}_by_cfg"][c] for k in ("fjd", "fd", "adherence")} for c in ("1.0", "2.0")}
    assert choice["cfg"] == max(scores, key=lambda c: rank(scores[c], choice["fd_limit"]))
    assert choice["criterion"] == CRITERION and choice["settings"]["num_samples"] == 4
    assert choice["checkpoint_sha256"] == file_digest(ckpt)
    assert sampling_cfg("auto", tmp_path / "models") == choice["cfg"]


def test_cfg_auto_reads_the_choice_and_falls_back_to_3(tmp_path: Path, caplog) -> None:
    assert sampling_cfg(2, tmp_path) == 2.0 and sampling_cfg("1.5", tmp_path) == 1.5
    with caplog.at_level(logging.WARNING):
        assert sampling_cfg("auto", tmp_path) == DEFAULT_CFG == 3.0
    assert "no " in caplog.text and SAMPLING_FILE in caplog.text
    (tmp_path / "mar.pt").write_bytes(b"weights")
    record = {"cfg": 1.5, "criterion": "FJD on validation", "checkpoint_sha256": file_digest(tmp_path / "mar.pt")}
    (tmp_path / SAMPLING_FILE).write_text(json.dumps(record))
    assert sampling_cfg("auto", tmp_path) == 1.5
    parser = ConfigParser()
    parser.read_config(Path(__file__).resolve().parents[1] / "configs" / "generate.json")
    parser.update({"ckpt_dir": str(tmp_path)})
    assert parser.get_parsed_content("generator#sampling#cfg") == 1.5  # generate.json's default cfg is "auto"
    parser.update({"cfg": 4.0})
    assert parser.get_parsed_content("generator#sampling#cfg", lazy=False) == 4.0
    (tmp_path / "mar.pt").write_bytes(b"other weights")  # mar.pt retrained: the recorded choice no longer applies
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert sampling_cfg("auto", tmp_path) == 3.0
    assert "another" in caplog.text
