"""The speed benchmark (configs/benchmark.json): a tiny run end to end in fp32 and bf16, its FLOP counts against hand
estimates, and the precisions setting (defaults per profile, forced bf16 without fast bf16)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from torch import nn

from scripts.generation import benchmark
from scripts.generation.benchmark import count_flops, decode_flops_per_clip
from scripts.generation.mar import MAR, masking_schedule
from scripts.runtime import precision
from tests.conftest import ONE_THREAD, run_bundle
from tests.networks import build, def_kwargs, layered

N_PHENOTYPES, BATCH, NUM_ITER, STEPS, CFG = 21, 2, 2, 2, 3.0


def _weights(module: nn.Module) -> int:
    """Multiply-adds per row of every Linear in `module` (its weight elements)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def _hand_estimate(mar: MAR, num_iter: int, steps: int, rows: int = 2) -> tuple[float, float]:
    """(transformer, head) FLOPs per clip from parameter counts: 2 x weights x tokens per pass, plus attention
    (Q K^T and A V: 4 n^2 width per block) and the token projection (all tokens, each iteration); `rows` = 2 with CFG."""
    width, buf, seq = mar.mask_token.shape[-1], mar.buffer_size, mar.seq_len
    block = _weights(mar.encoder_blocks[0])
    masked_before = [seq] + masking_schedule(seq, num_iter)[:-1]
    transformer = 0.0
    for n_masked in masked_before:
        for tokens, depth in ((buf + seq - n_masked, len(mar.encoder_blocks)), (buf + seq, len(mar.decoder_blocks))):
            transformer += rows * depth * (2 * block * tokens + 4 * tokens**2 * width)
        transformer += rows * 2 * seq * _weights(mar.z_proj)
    head = rows * seq * steps * 2 * _weights(mar.diffloss)  # every head Linear runs on every token at every step
    return transformer, head


def test_benchmark_tiny_run(tmp_path: Path) -> None:
    """fp32 and bf16 side by side: one row each, named, with positive times, each against its own matmul peak. On a
    CPU without fast bf16 (emulated: hundreds of times slower, minutes even for the tiny profile) the second row is
    'auto', which the probe resolves to fp32 there."""
    fast_bf16 = precision.use_bf16("cpu", "auto")
    second = "bf16" if fast_bf16 else "auto"
    out = tmp_path / "bench.json"
    configs = str(["configs/benchmark.json", "configs/profiles/tiny.json"])
    args = ["--batch_size", str(BATCH), "--num_iter", str(NUM_ITER), "--num_inference_steps", str(STEPS),
            "--n_phenotypes", str(N_PHENOTYPES), "--output_path", str(out), "--precisions", f"['fp32','{second}']"]
    done = run_bundle(configs, *args, env=ONE_THREAD, timeout=300)
    log = done.stdout + done.stderr
    assert "FLOP limit" in log and "fp32 decoding" in log and ("bf16 autocast sampling" in log) == fast_bf16
    rec = json.loads(out.read_text())
    assert rec["profile"] == "tiny" and rec["batch_size"] == BATCH and rec["threads"] == 1
    assert rec["weights"]["mar"].startswith("random init") and rec["matmul_peak_gflops"] > 0
    if fast_bf16:  # measured only where a row runs in bf16
        assert rec["bf16_matmul_peak_gflops"] > 0 and len(rec["bf16_matmul_gflops_before_after"]) == 2
    else:
        assert rec["bf16_matmul_peak_gflops"] is None
    assert rec["output_shape"] == [BATCH, 1, 50, 96, 96]
    assert rec["precisions"] == ["fp32", second] and rec["auto_precision"] == ("bf16 autocast" if fast_bf16 else "fp32")
    runs = rec["runs"]
    expected = ("bf16", "bf16 autocast", True) if fast_bf16 else ("auto", "fp32", False)
    assert [(r["setting"], r["precision"], r["amp"]) for r in runs] == [("fp32", "fp32", False), expected]
    assert runs[0]["matmul_peak_gflops"] == rec["matmul_peak_gflops"]
    assert runs[1]["matmul_peak_gflops"] == rec["bf16_matmul_peak_gflops" if fast_bf16 else "matmul_peak_gflops"]
    for row in runs:
        for phase in ("sampling", "decoding"):
            r = row[phase]
            for key in ("seconds_per_clip", "flops_per_clip", "flop_limit_seconds_per_clip", "efficiency",
                        "peak_memory_bytes"):
                assert r[key] > 0, (row["precision"], phase, key, r[key])
            assert abs(r["flop_limit_seconds_per_clip"] - r["flops_per_clip"] / row["matmul_peak_gflops"] / 1e9) < 1e-9
    # the top-level phases (the pre-precision layout) repeat the first row
    assert rec["precision"] == "fp32" and rec["sampling"] == runs[0]["sampling"] and rec["decoding"] == runs[0]["decoding"]
    assert all(v > 0 for v in rec["params"].values())

    mar = MAR(N_PHENOTYPES, **def_kwargs("mar_def", "tiny"))
    transformer, head = _hand_estimate(mar, NUM_ITER, STEPS)
    s = rec["sampling"]
    assert s["flops_transformer_per_clip"] + s["flops_head_per_clip"] == s["flops_per_clip"]
    assert 0.5 < s["flops_per_clip"] / (transformer + head) < 2.0, (s["flops_per_clip"], transformer + head)
    assert 0.5 < s["flops_transformer_per_clip"] / transformer < 2.0, (s["flops_transformer_per_clip"], transformer)
    # the head is Linear layers only: the count must match 2 x weights x rows x tokens x steps almost exactly
    assert abs(s["flops_head_per_clip"] / head - 1) < 0.01, (s["flops_head_per_clip"], head)


def test_decode_flops_match_a_convolution_hand_count() -> None:
    """One 3x3x3 convolution counted on the meta device, and the tiny decoder's count is positive and shape-exact."""
    conv = nn.Conv3d(4, 8, 3, padding=1)
    x = torch.zeros(1, 4, 5, 6, 7)
    assert count_flops(lambda: conv(x)) == 2 * 4 * 8 * 27 * 5 * 6 * 7
    tiny = build("autoencoder_def", "tiny")
    one = decode_flops_per_clip(tiny, (16, 25, 12, 12))
    two = decode_flops_per_clip(tiny, (16, 50, 12, 12))  # no attention in tiny: linear in frames
    assert one > 0 and two == 2 * one


@pytest.mark.parametrize(("profile", "expected"), [("tiny", ["auto"]), ("cpu", ["auto"]), ("paper", ["fp32", "bf16"])])
def test_default_precisions_per_profile(profile: str, expected: list[str]) -> None:
    parser = ConfigParser(layered("benchmark.json", profile))
    assert parser.get_parsed_content("precisions") == expected


def test_forced_bf16_without_fast_bf16_runs_with_a_warning(monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """A CPU whose probe prefers fp32: 'auto' gives fp32, a forced 'bf16' still runs bf16 and says it is slow."""
    monkeypatch.setattr(benchmark.precision, "use_bf16", lambda device, setting="auto": False)
    cpu = torch.device("cpu")
    with caplog.at_level(logging.WARNING, logger=benchmark.__name__):
        assert benchmark.resolve_precision("auto", cpu) is False and not caplog.records
        assert benchmark.resolve_precision("fp32", cpu) is False and not caplog.records
        assert benchmark.resolve_precision("bf16", cpu) is True
    assert "bf16 forced" in caplog.text and "slower than fp32" in caplog.text
    with pytest.raises(ValueError, match="precisions entries"):
        benchmark.resolve_precision("fp16", cpu)
