"""torch.distributed helpers for `configs/multi_gpu.json`: rank device, process group, DDP wrapping, rank-0 handlers."""

from __future__ import annotations

import os
from collections.abc import Sequence

import ignite.distributed as idist
import torch
import torch.distributed as dist
from monai.handlers import CheckpointSaver, StatsHandler
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from scripts.runtime.handlers import MetricsJSON, ReconstructionMontage
from scripts.runtime.progress import EngineProgress


# ------------------------------------------------------------------------------------------------------ distributed
def rank_device() -> torch.device:
    """cuda:LOCAL_RANK (torchrun's variable, 0 without it) where CUDA is available, else the CPU."""
    return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu")


def init_distributed(device: torch.device) -> int:
    """Join torchrun's process group once (NCCL on CUDA, gloo on CPU), pin the CUDA device; returns the rank."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return dist.get_rank()


def distributed(network: nn.Module, device: torch.device) -> nn.Module:
    """`network` in DistributedDataParallel where a process group is initialised; the network itself otherwise."""
    if not (dist.is_available() and dist.is_initialized()):
        return network
    return DistributedDataParallel(network, device_ids=[device] if device.type == "cuda" else None)


def unwrap(network: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper; any other network as it is."""
    return network.module if isinstance(network, DistributedDataParallel) else network


def rank_handlers(handlers: Sequence) -> list:
    """Every handler on rank 0; on other ranks, those that only log or write files are dropped (MONAI model zoo's
    multi-GPU convention; the TensorBoard handlers are disabled there already). Validation, learning-rate and resume
    handlers run on every rank."""
    if idist.get_rank() == 0:
        return list(handlers)
    writers = (StatsHandler, CheckpointSaver, MetricsJSON, ReconstructionMontage, EngineProgress)
    return [h for h in handlers if not isinstance(h, writers)]


