"""Speed benchmark of generation: seconds, peak memory and matmul FLOPs per clip of MAR sampling and decoding, beside
the FLOP-bound limit at this device's fp32 matmul peak (method: docs/README.md, Speed and memory)."""

from __future__ import annotations

import copy
import datetime
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch.utils.flop_counter import FlopCounterMode

from scripts.generation.autoencoder import CineAutoencoderKL
from scripts.generation.mar import MAR
from scripts.runtime.checkpoints import load_weights
from scripts.runtime.files import write_json
from scripts.runtime.timing import device_name, matmul_peak_gflops, peak_memory, timed

logger = logging.getLogger(__name__)
RANDOM_INIT = "random init (timing only: samples are meaningless)"


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


def _phase(name: str, seconds: float, clips: int, flops: int, peak_gflops: float, mem: dict) -> dict:
    """One phase's record, logged as 'measured X s/clip; FLOP limit Y s/clip at Z GFLOP/s peak; efficiency'."""
    per_clip, limit = seconds / clips, flops / (peak_gflops * 1e9)
    logger.info("%s: measured %.3f s/clip; FLOP limit %.3f s/clip at %.1f GFLOP/s peak; efficiency %.2f "
                "(%.3f TFLOP/clip; peak memory %.2f GB, +%.2f GB over the phase start; %s)", name, per_clip, limit,
                peak_gflops, limit / per_clip, flops / 1e12, mem["peak"] / 1e9, mem["increase"] / 1e9, mem["method"])
    return {"seconds_per_clip": per_clip, "seconds": seconds, "clips": clips, "flops_per_clip": flops,
            "flop_limit_seconds_per_clip": limit, "efficiency": limit / per_clip, "peak_memory_bytes": mem["peak"],
            "memory_increase_bytes": mem["increase"], "memory_method": mem["method"]}


def run(profile: str, mar: MAR, autoencoder: CineAutoencoderKL, device: torch.device | str,
        workload: Workload = Workload(), mar_weights: str | None = None, autoencoder_weights: str | None = None,
        output_path: str = "outputs/benchmark/benchmark.json") -> dict:
    """Benchmark sampling with `mar` and decoding with `autoencoder` as `workload` says; write the record to
    `output_path` (JSON) and return it (`profile` names the networks)."""
    device = torch.device(device)
    if workload.threads:
        torch.set_num_threads(int(workload.threads))
    batch_size, num_batches, cfg = workload.batch_size, workload.num_batches, workload.cfg
    num_iter, num_inference_steps = workload.num_iter, workload.num_inference_steps
    decode_batch_size = min(int(workload.decode_batch_size or batch_size), batch_size)
    mar, ae, n_phenotypes = mar.to(device).eval(), autoencoder.to(device).eval(), mar.cond_proj.in_features
    weights = {"mar": load_or_random(mar, mar_weights, f"MAR profile {profile!r}"),
               "autoencoder": load_or_random(ae, autoencoder_weights, f"autoencoder profile {profile!r}")}
    peaks = [matmul_peak_gflops(device)]
    flops = mar_flops_per_clip(mar, n_phenotypes, num_iter, cfg, num_inference_steps)
    decode_flops = decode_flops_per_clip(ae, mar.latent_shape)
    gen = torch.Generator().manual_seed(0)
    phenotypes = [torch.randn(batch_size, n_phenotypes, generator=gen).to(device) for _ in range(num_batches)]
    if workload.warmup:  # one transformer pass and a 1-step head at full batch; a 1-latent-frame decode
        mar.sample_latents(phenotypes[0], seeds=range(batch_size), num_iter=1, cfg=cfg, num_inference_steps=1)
        with torch.no_grad():
            ae.decode(torch.zeros(1, mar.latent_shape[0], 1, *mar.latent_shape[2:], device=device))
    seconds = []
    with peak_memory(device) as sample_mem:
        for i, ph in enumerate(phenotypes):
            seeds = range(i * batch_size, (i + 1) * batch_size)
            t, latents = timed(partial(mar.sample_latents, ph, seeds=seeds, num_iter=num_iter, cfg=cfg,
                                       num_inference_steps=num_inference_steps), device)
            seconds.append(t)
            logger.info("sampling batch %d/%d: %.2f s for %d clips", i + 1, num_batches, t, batch_size)
    with peak_memory(device) as decode_mem, torch.no_grad():
        decode_s, cines = timed(lambda: ae.decode(latents[:decode_batch_size]), device)
    peaks.append(matmul_peak_gflops(device))
    peak = max(peaks)  # best of before and after: a busy machine lowers one of them
    if weights["mar"] == RANDOM_INIT or weights["autoencoder"] == RANDOM_INIT:
        logger.warning("networks with %s", RANDOM_INIT)
    record = {
        "profile": profile, "batch_size": batch_size, "num_batches": num_batches, "decode_batch_size": decode_batch_size,
        "cfg": cfg, "num_iter": num_iter, "num_inference_steps": num_inference_steps, "n_phenotypes": n_phenotypes,
        "weights": weights, "device": device_name(device), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "matmul_peak_gflops": peak, "matmul_gflops_before_after": peaks,
        "params": {"mar": sum(p.numel() for p in mar.parameters()),
                   "mar_head": sum(p.numel() for p in mar.diffloss.parameters()),
                   "autoencoder": sum(p.numel() for p in ae.parameters()),
                   "autoencoder_decoder": sum(p.numel() for p in ae.decoder.parameters())},
        "sampling": {**_phase("sampling", sum(seconds), batch_size * num_batches, flops["total"], peak, sample_mem),
                     "batch_seconds": seconds, "flops_transformer_per_clip": flops["transformer"],
                     "flops_head_per_clip": flops["head"]},
        "decoding": _phase("decoding", decode_s, decode_batch_size, decode_flops, peak, decode_mem),
        "output_shape": list(cines.shape),
    }
    logger.info("%s profile, batch %d, %s, torch %s, %d threads, params MAR %.1fM / autoencoder %.1fM; written to %s",
                profile, batch_size, record["device"], torch.__version__, record["threads"],
                record["params"]["mar"] / 1e6, record["params"]["autoencoder"] / 1e6, output_path)
    write_json(output_path, record)
    return record
