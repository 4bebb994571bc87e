"""Device-synchronised timing, peak memory and device names, for benchmarks and evaluation."""

from __future__ import annotations

import platform
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """(wall seconds, result) of fn(), device-synchronised."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def matmul_peak_gflops(device: torch.device, n: int = 2048, reps: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Best of `reps` n x n matmuls in `dtype` (fp32 by default; torch.bfloat16 for the bf16 autocast peak; 2 n^3
    FLOPs each) after one warm-up, in GFLOP/s."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    return 2 * n**3 / min(timed(lambda: a @ b, device)[0] for _ in range(reps)) / 1e9


def _proc_bytes(field: str) -> int:
    """A kB field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(field + ":"))
    return int(line.split()[1]) * 1024


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict]:
    """Yield a dict filled at exit with the block's 'peak' bytes, 'increase' (peak - usage at entry) and 'method':
    CUDA max_memory_allocated (tensors), or the CPU process's peak RSS (VmHWM, else ru_maxrss since process start)."""
    rec: dict = {}
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        rec["method"], usage = "torch.cuda.max_memory_allocated (tensors, reset per phase)", torch.cuda.memory_allocated
        peak = torch.cuda.max_memory_allocated
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            rec["method"], usage, peak = "process peak RSS (VmHWM, reset per phase)", _proc_bytes, _proc_bytes
        except OSError:
            rec["method"] = "process ru_maxrss (peak since process start)"
            usage = peak = lambda _: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = usage(device if device.type == "cuda" else "VmRSS")
    yield rec
    sync(device)
    rec["peak"] = peak(device if device.type == "cuda" else "VmHWM")
    rec["increase"] = max(rec["peak"] - start, 0)


def device_name(device: torch.device) -> str:
    """GPU name, or the CPU model from /proc/cpuinfo (platform.processor() elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        models = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
        return f"{models[0]} ({len(models)} logical CPUs)"
    except (OSError, IndexError):
        return platform.processor() or platform.machine()


