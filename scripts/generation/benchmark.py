"""Speed benchmark of generation: seconds, peak memory and matmul FLOPs per clip of MAR sampling and decoding, in one
or more precisions (fp32, bf16 autocast, or what the start-up probe picks), each beside the FLOP-bound limit at this
device's matmul peak in that precision (method: docs/README.md, Speed and memory)."""

from __future__ import annotations

import copy
import datetime
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch.utils.flop_counter import FlopCounterMode

from scripts.generation.autoencoder import CineAutoencoderKL
from scripts.generation.mar import MAR
from scripts.runtime import precision
from scripts.runtime.checkpoints import load_weights
from scripts.runtime.files import write_json
from scripts.runtime.timing import device_name, matmul_peak_gflops, peak_memory, timed

logger = logging.getLogger(__name__)
RANDOM_INIT = "random init (timing only: samples are meaningless)"
PRECISIONS = ("auto", "fp32", "bf16")  # a `precisions` entry: the probe's choice (precision.use_bf16), or forced


@dataclass(frozen=True)
class Workload:
    """What is timed: `num_batches` sampled batches (after one untimed warm-up if `warmup`), then
    `decode_batch_size` (None: batch_size) decoded latents, on `threads` CPU threads (None: torch's default)."""

    batch_size: int = 16
    num_batches: int = 1
    decode_batch_size: int | None = None
    warmup: bool = True
    cfg: float = 3.0
    num_iter: int = 16
    num_inference_steps: int = 100
    threads: int | None = None


def _sdpa_flops(q: tuple, k: tuple, v: tuple, *args, out_shape: tuple | None = None, **kwargs) -> int:
    """Q K^T and A V of attention, any number of leading dims (the CPU kernel is not in torch's table)."""
    return 2 * math.prod(q[:-2]) * q[-2] * k[-2] * (q[-1] + v[-1])


def count_flops(fn: Callable[[], object]) -> int:
    """Matmul-type FLOPs of fn() (run once, under no_grad)."""
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def mar_flops_per_clip(mar: MAR, n_phenotypes: int, num_iter: int, cfg: float, steps: int) -> dict[str, int]:
    """FLOPs of sampling one clip: transformer (all passes, both CFG halves) and head (all `steps`).
    Exact from two reduced calls: transformer = F1 - H (batch-1 sample, 1-step head), head = steps x H (1-step head)."""
    device = mar.mask_token.device
    phenotypes = torch.zeros(1, n_phenotypes, device=device)
    f1 = count_flops(lambda: mar.sample_latents(phenotypes, seeds=[0], num_iter=num_iter, cfg=cfg,
                                                num_inference_steps=1))
    z = torch.randn((2 if cfg > 1 else 1) * mar.seq_len, mar.diffloss.net.cond_embed.in_features, device=device)
    h = count_flops(lambda: mar.diffloss.sample(z, cfg=cfg, num_inference_steps=1))
    return {"transformer": f1 - h, "head": steps * h, "total": f1 - h + steps * h}


def decode_flops_per_clip(autoencoder: CineAutoencoderKL, latent_shape: tuple[int, ...]) -> int:
    """FLOPs of decoding one latent, counted on a meta-device copy of the autoencoder (shapes only)."""
    ae = copy.deepcopy(autoencoder).to("meta")
    return count_flops(lambda: ae.decode(torch.zeros(1, *latent_shape, device="meta")))


def load_or_random(network: torch.nn.Module, path: str | None, run: str) -> str:
    """Load a checkpoint into `network` (load_weights: shape-checked) and return its path; RANDOM_INIT without one."""
    if not path:
        return RANDOM_INIT
    load_weights(network, path, run)
    return str(path)


def precision_label(amp: bool) -> str:
    """'bf16 autocast' or 'fp32': the precision a row ran in (precision.precision_name, autocast spelled out)."""
    return f"{precision.precision_name(amp)} autocast" if amp else precision.precision_name(amp)


def resolve_precision(setting: str, device: torch.device) -> bool:
    """bf16 autocast for a `precisions` entry? 'auto': precision.use_bf16's start-up probe; 'fp32'/'bf16': forced. A
    forced bf16 runs anyway where the device lacks fast bf16 (a CPU whose probe prefers fp32, CUDA without native
    bf16), with a warning that it is emulated or slow."""
    if setting not in PRECISIONS:
        raise ValueError(f"precisions entries must be one of {PRECISIONS}, got {setting!r}")
    if setting != "bf16":
        return setting == "auto" and precision.use_bf16(device, "auto")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        logger.warning("bf16 forced on %s, which has no native bf16: it runs emulated, likely slower than fp32",
                       device_name(device))
    elif device.type != "cuda" and not precision.use_bf16(device, "auto"):
        logger.warning("bf16 forced on %s, where the start-up probe finds bf16 no faster than fp32: it runs, "
                       "likely slower than fp32", device_name(device))
    return True


def _peaks(device: torch.device, dtypes: Sequence[torch.dtype], peaks: dict[torch.dtype, list[float]]) -> None:
    """Append one matmul peak measurement per dtype to `peaks`."""
    for dtype in dtypes:
        peaks.setdefault(dtype, []).append(matmul_peak_gflops(device, dtype=dtype))


def _table(rows: list[dict]) -> str:
    """The per-precision summary printed at the end: s/clip, FLOP limit and efficiency of each phase."""
    head = (f"{'precision':<14} {'setting':<7} {'peak GFLOP/s':>12} | {'sampling s/clip':>15} {'limit':>8} "
            f"{'eff':>5} | {'decoding s/clip':>15} {'limit':>8} {'eff':>5}")
    lines = [head]
    for r in rows:
        s, d = r["sampling"], r["decoding"]
        lines.append(f"{r['precision']:<14} {r['setting']:<7} {r['matmul_peak_gflops']:>12.1f} | "
                     f"{s['seconds_per_clip']:>15.4f} {s['flop_limit_seconds_per_clip']:>8.4f} {s['efficiency']:>5.2f} | "
                     f"{d['seconds_per_clip']:>15.4f} {d['flop_limit_seconds_per_clip']:>8.4f} {d['efficiency']:>5.2f}")
    return "\n".join(lines)


def _phase(name: str, seconds: float, clips: int, flops: int, peak_gflops: float, mem: dict) -> dict:
    """One phase's record, logged as 'measured X s/clip; FLOP limit Y s/clip at Z GFLOP/s peak; efficiency'."""
    per_clip, limit = seconds / clips, flops / (peak_gflops * 1e9)
    logger.info("%s: measured %.3f s/clip; FLOP limit %.3f s/clip at %.1f GFLOP/s peak; efficiency %.2f "
                "(%.3f TFLOP/clip; peak memory %.2f GB, +%.2f GB over the phase start; %s)", name, per_clip, limit,
                peak_gflops, limit / per_clip, flops / 1e12, mem["peak"] / 1e9, mem["increase"] / 1e9, mem["method"])
    return {"seconds_per_clip": per_clip, "seconds": seconds, "clips": clips, "flops_per_clip": flops,
            "flop_limit_seconds_per_clip": limit, "efficiency": limit / per_clip, "peak_memory_bytes": mem["peak"],
            "memory_increase_bytes": mem["increase"], "memory_method": mem["method"]}


def _time_precision(mar: MAR, ae: CineAutoencoderKL, device: torch.device, workload: Workload, amp: bool,
                    phenotypes: list[torch.Tensor], decode_batch_size: int) -> dict:
    """Warm-up, timed sampling of every batch and one timed decode, all under `amp`'s autocast: the raw timings."""
    batch_size, cfg, label = workload.batch_size, workload.cfg, precision_label(amp)
    sample = partial(mar.sample_latents, num_iter=workload.num_iter, cfg=cfg,
                     num_inference_steps=workload.num_inference_steps)
    if workload.warmup:  # one transformer pass and a 1-step head at full batch; a 1-latent-frame decode
        with precision.autocast(device, amp), torch.no_grad():
            mar.sample_latents(phenotypes[0], seeds=range(batch_size), num_iter=1, cfg=cfg, num_inference_steps=1)
            ae.decode(torch.zeros(1, mar.latent_shape[0], 1, *mar.latent_shape[2:], device=device))
    seconds = []
    with peak_memory(device) as sample_mem, precision.autocast(device, amp):
        for i, ph in enumerate(phenotypes):
            seeds = range(i * batch_size, (i + 1) * batch_size)
            t, latents = timed(partial(sample, ph, seeds=seeds), device)
            seconds.append(t)
            logger.info("%s sampling batch %d/%d: %.2f s for %d clips", label, i + 1, len(phenotypes), t, batch_size)
    with peak_memory(device) as decode_mem, torch.no_grad(), precision.autocast(device, amp):
        decode_s, cines = timed(lambda: ae.decode(latents[:decode_batch_size].float()), device)
    return {"seconds": seconds, "sample_mem": sample_mem, "decode_s": decode_s, "decode_mem": decode_mem,
            "output_shape": list(cines.shape)}


def run(profile: str, mar: MAR, autoencoder: CineAutoencoderKL, device: torch.device | str,
        workload: Workload = Workload(), mar_weights: str | None = None, autoencoder_weights: str | None = None,
        output_path: str = "outputs/benchmark/benchmark.json", precisions: Sequence[str] | str = ("auto",)) -> dict:
    """Benchmark sampling with `mar` and decoding with `autoencoder` as `workload` says, once per `precisions` entry
    ('auto', 'fp32', 'bf16'); write the record to `output_path` (JSON) and return it (`profile` names the networks).
    The record's `runs` hold one row per entry; its top-level `sampling`/`decoding`/`precision` repeat the first row."""
    device = torch.device(device)
    if workload.threads:
        torch.set_num_threads(int(workload.threads))
    settings = [precisions] if isinstance(precisions, str) else list(precisions)
    if not settings:
        raise ValueError("precisions must name at least one of 'auto', 'fp32', 'bf16'")
    amps = [resolve_precision(str(p), device) for p in settings]
    auto = precision_label(precision.use_bf16(device, "auto"))
    batch_size, num_batches, cfg = workload.batch_size, workload.num_batches, workload.cfg
    num_iter, num_inference_steps = workload.num_iter, workload.num_inference_steps
    decode_batch_size = min(int(workload.decode_batch_size or batch_size), batch_size)
    mar, ae, n_phenotypes = mar.to(device).eval(), autoencoder.to(device).eval(), mar.cond_proj.in_features
    weights = {"mar": load_or_random(mar, mar_weights, f"MAR profile {profile!r}"),
               "autoencoder": load_or_random(ae, autoencoder_weights, f"autoencoder profile {profile!r}")}
    dtypes = [torch.float32] + ([torch.bfloat16] if any(amps) else [])
    peaks: dict[torch.dtype, list[float]] = {}
    _peaks(device, dtypes, peaks)
    flops = mar_flops_per_clip(mar, n_phenotypes, num_iter, cfg, num_inference_steps)
    decode_flops = decode_flops_per_clip(ae, mar.latent_shape)
    gen = torch.Generator().manual_seed(0)
    phenotypes = [torch.randn(batch_size, n_phenotypes, generator=gen).to(device) for _ in range(num_batches)]
    raw = [_time_precision(mar, ae, device, workload, amp, phenotypes, decode_batch_size) for amp in amps]
    _peaks(device, dtypes, peaks)
    peak = {dt: max(v) for dt, v in peaks.items()}  # best of before and after: a busy machine lowers one of them
    rows = []
    for setting, amp, r in zip(settings, amps, raw):
        label, row_peak = precision_label(amp), peak[torch.bfloat16 if amp else torch.float32]
        rows.append({"precision": label, "setting": setting, "amp": amp, "matmul_peak_gflops": row_peak,
                     "sampling": {**_phase(f"{label} sampling", sum(r["seconds"]), batch_size * num_batches,
                                           flops["total"], row_peak, r["sample_mem"]),
                                  "batch_seconds": r["seconds"], "flops_transformer_per_clip": flops["transformer"],
                                  "flops_head_per_clip": flops["head"]},
                     "decoding": _phase(f"{label} decoding", r["decode_s"], decode_batch_size, decode_flops,
                                        row_peak, r["decode_mem"])})
    if weights["mar"] == RANDOM_INIT or weights["autoencoder"] == RANDOM_INIT:
        logger.warning("networks with %s", RANDOM_INIT)
    record = {
        "profile": profile, "batch_size": batch_size, "num_batches": num_batches, "decode_batch_size": decode_batch_size,
        "cfg": cfg, "num_iter": num_iter, "num_inference_steps": num_inference_steps, "n_phenotypes": n_phenotypes,
        "weights": weights, "device": device_name(device), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "matmul_peak_gflops": peak[torch.float32], "matmul_gflops_before_after": peaks[torch.float32],
        "bf16_matmul_peak_gflops": peak.get(torch.bfloat16), "bf16_matmul_gflops_before_after": peaks.get(torch.bfloat16),
        "auto_precision": auto, "precisions": settings,
        "params": {"mar": sum(p.numel() for p in mar.parameters()),
                   "mar_head": sum(p.numel() for p in mar.diffloss.parameters()),
                   "autoencoder": sum(p.numel() for p in ae.parameters()),
                   "autoencoder_decoder": sum(p.numel() for p in ae.decoder.parameters())},
        "runs": rows, "precision": rows[0]["precision"], "sampling": rows[0]["sampling"],
        "decoding": rows[0]["decoding"], "output_shape": raw[0]["output_shape"],
    }
    logger.info("%s profile, batch %d, %s, torch %s, %d threads, params MAR %.1fM / autoencoder %.1fM; 'auto' "
                "precision here: %s; written to %s\n%s", profile, batch_size, record["device"], torch.__version__,
                record["threads"], record["params"]["mar"] / 1e6, record["params"]["autoencoder"] / 1e6, auto,
                output_path, _table(rows))
    write_json(output_path, record)
    return record
