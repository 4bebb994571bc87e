"""Compute precision: a start-up probe that turns bf16 autocast on where it is faster (CUDA with bf16, or a CPU whose
bf16 matmul beats fp32), and the autocast context the training and sampling steps share."""

from __future__ import annotations

import logging
import time

import torch

logger = logging.getLogger(__name__)
_PROBED: dict[str, bool] = {}


def _matmul_seconds(n: int, rounds: int) -> tuple[float, float]:
    """Best fp32 and bf16 times of an n x n matmul over `rounds` interleaved trials (a load burst hits both alike)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    pairs = {torch.float32: (a, b), torch.bfloat16: (a.bfloat16(), b.bfloat16())}
    best = dict.fromkeys(pairs, float("inf"))
    for trial in range(rounds + 1):  # trial 0 warms up (oneDNN picks its kernels)
        for dtype, (x, y) in pairs.items():
            start = time.perf_counter()
            x @ y
            if trial:
                best[dtype] = min(best[dtype], time.perf_counter() - start)
        if trial == 1 and best[torch.bfloat16] > 10 * best[torch.float32]:
            break  # emulated bf16 (hundreds of times slower on some CPUs): no need to wait for more trials
    return best[torch.float32], best[torch.bfloat16]


def use_bf16(device: torch.device | str, setting: bool | str = "auto", min_speedup: float = 1.2) -> bool:
    """bf16 autocast on `device`? setting True/False forces it; "auto": CUDA if it supports bf16; a CPU if a 768 x 768
    bf16 matmul is at least `min_speedup` x faster than fp32 (best of 8 interleaved trials, once per process, < 1 s)."""
    if not isinstance(setting, str):
        return bool(setting)
    if setting != "auto":
        raise ValueError(f"amp must be true, false or 'auto', got {setting!r}")
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    if "cpu" not in _PROBED:
        fp32, bf16 = _matmul_seconds(768, 8)
        _PROBED["cpu"] = fp32 / bf16 >= min_speedup
        logger.info("precision probe: 768x768 matmul fp32 %.2f ms, bf16 %.2f ms -> %s", fp32 * 1e3, bf16 * 1e3,
                    "bf16 autocast" if _PROBED["cpu"] else "fp32")
    return _PROBED["cpu"]


def precision_name(amp: bool) -> str:
    """'bf16' (autocast) or 'fp32': what each stage records in its outputs."""
    return "bf16" if amp else "fp32"


def autocast(device: torch.device | str, enabled: bool) -> torch.autocast:
    """bf16 autocast on `device`'s type (CUDA or CPU) when `enabled`; a no-op context otherwise."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bool(enabled))
