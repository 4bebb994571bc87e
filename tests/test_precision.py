"""The precision switch: forced settings, the CPU probe's decision, and autocast on the CPU."""

from __future__ import annotations

import pytest
import torch

from scripts.runtime import precision


def test_forced_settings_and_bad_setting() -> None:
    assert precision.use_bf16("cpu", True) is True and precision.use_bf16("cpu", False) is False
    assert precision.precision_name(True) == "bf16" and precision.precision_name(False) == "fp32"
    with pytest.raises(ValueError, match="amp must be"):
        precision.use_bf16("cpu", "fast")


@pytest.mark.parametrize(("fp32", "bf16", "expected"), [(2.0, 1.0, True), (1.0, 1.0, False), (1.0, 300.0, False)])
def test_cpu_probe_decides_on_the_measured_speedup(monkeypatch: pytest.MonkeyPatch, fp32: float, bf16: float,
                                                   expected: bool) -> None:
    monkeypatch.setattr(precision, "_PROBED", {})
    monkeypatch.setattr(precision, "_matmul_seconds", lambda n, rounds: (fp32, bf16))
    assert precision.use_bf16("cpu") is expected
    monkeypatch.setattr(precision, "_matmul_seconds", lambda n, rounds: pytest.fail("probed twice"))
    assert precision.use_bf16(torch.device("cpu")) is expected  # once per process


def test_real_probe_returns_a_decision_and_autocast_runs_bf16_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "_PROBED", {})
    assert isinstance(precision.use_bf16("cpu"), bool)
    layer = torch.nn.Linear(8, 8)
    with precision.autocast("cpu", True):
        assert layer(torch.randn(2, 8)).dtype == torch.bfloat16
    with precision.autocast("cpu", False):
        assert layer(torch.randn(2, 8)).dtype == torch.float32
