"""Checkpoint loading with shape checks (weights_only) and resumable latest/best checkpoints for the trainers."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointLoader, CheckpointSaver
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from scripts.runtime.distributed import unwrap
from scripts.runtime.files import atomic_write, file_digest, remove_orphans

logger = logging.getLogger(__name__)
POSITION = ("last_epoch", "_step_count", "_last_lr")  # where a learning-rate scheduler is, whatever its class


class AtomicFileSaver(BaseSaveHandler):
    """Ignite save handler of one fixed file, replaced atomically (rank 0): the previous best stays whole until the
    new one is complete, so `remove` (called by ignite before each save) does nothing."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        if idist.get_rank() == 0:
            with atomic_write(self.path) as tmp:
                torch.save(checkpoint, tmp)

    def remove(self, filename: str) -> None:
        pass


class BestCheckpointSaver(CheckpointSaver):
    """MONAI CheckpointSaver of the best key metric whose file is replaced atomically (MONAI deletes the old best
    first and writes in place) and whose record has a `state_dict`, so a resumed run keeps its best model."""

    def __init__(self, save_dir: str, save_dict: dict, key_metric_filename: str, **kwargs) -> None:
        super().__init__(save_dir, save_dict, key_metric_filename=key_metric_filename, **kwargs)
        if self._key_metric_checkpoint is not None:
            self._key_metric_checkpoint.save_handler = AtomicFileSaver(Path(save_dir) / key_metric_filename)

    def state_dict(self) -> dict:
        return self._key_metric_checkpoint.state_dict()


def check_state_dict(state: object, network: nn.Module, path: str | Path, run: str = "") -> None:
    """Raise ValueError naming `path` and the keys where `state` does not match `network` (TypeError if not a mapping).
    `run` names this run's configuration in the message (e.g. "autoencoder profile 'tiny'")."""
    if not isinstance(state, Mapping):
        raise TypeError(f"{path}: not a network state dict (found {type(state).__name__})")
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(getattr(state[k], 'shape', ()))} vs network {tuple(v.shape)}"
              for k, v in expected.items() if k in state and tuple(getattr(state[k], "shape", ())) != tuple(v.shape)]
    if missing or unexpected or shapes:
        found = [f"{name} {keys}" for name, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                                     ("shape mismatch", shapes)) if keys]
        raise ValueError(f"{path}: checkpoint does not match {type(network).__name__}{f' of {run}' if run else ''} "
                         f"({'; '.join(found)}); it was written with another configuration (columns, sizes or "
                         "profile): use that configuration, or move the file away to start afresh")


def load_weights(network: nn.Module, path: str | Path, run: str = "", trained_by: str = "") -> nn.Module:
    """Load a state dict (or a latest checkpoint's "network" entry) from `path` into `network`, shape-checked.
    weights_only, on the network's device; FileNotFoundError names `trained_by`, the config that writes the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found" + (f"; train it with {trained_by}" if trained_by else ""))
    device = next(iter(network.parameters()), torch.empty(0)).device
    state = torch.load(path, map_location=device, weights_only=True)
    if isinstance(state, Mapping) and isinstance(state.get("network"), Mapping):
        state = state["network"]
    check_state_dict(state, network, path, run)
    network.load_state_dict(state)
    return network


DATA_KEY = "data_sha256"  # LatestCheckpoint: digest of the file standing for the training data


def scheduler_state(saved: Mapping, scheduler: LRScheduler, path: str | Path, key: str) -> dict:
    """`saved` as `scheduler` loads it: a state written by another scheduler class (an earlier version's, e.g. a
    LinearLR warm-up where LambdaLR now runs) keeps this scheduler's settings and takes the saved position."""
    own = scheduler.state_dict()
    if set(own) <= set(saved):
        return dict(saved)
    logger.warning("%s: its %s state was written by another scheduler (no %s): resumed at iteration %s with this "
                   "version's schedule", path, key, sorted(set(own) - set(saved)), saved.get("last_epoch"))
    return {**own, **{k: saved[k] for k in POSITION if k in saved}}


class LatestCheckpoint:
    """Resumable checkpoint at `path` (state dicts of `save_dict` plus "trainer"), rewritten every `interval` epochs.
    With `resume` an existing file is loaded at start; attach after the ValidationHandler (keeps the best record).
    `data`: a file standing for the training data (a datalist, a latent cache); its SHA-256 is saved, and a resume
    on other data is refused."""

    def __init__(self, path: str | Path, save_dict: dict, resume: bool = True, interval: int = 1,
                 map_location: str | torch.device | None = None, run: str = "", data: str | Path | None = None) -> None:
        self.path, self.save_dict, self.resume = Path(path), save_dict, resume
        self.interval, self.map_location, self.run = interval, map_location, run
        self.data = Path(data) if data else None
        self.data_sha256 = file_digest(self.data) if self.data and self.data.is_file() else ""

    def attach(self, engine: Engine) -> None:
        # not MONAI's CheckpointSaver: it names interval files by epoch (no fixed file to resume) and is not atomic
        if idist.get_rank() == 0:
            remove_orphans(self.path.parent)
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self.save)

    def load(self, engine: Engine) -> None:
        # every rank loads; training continues from the saved epoch up to the trainer's max_epochs
        if not self.path.is_file():
            logger.info("no checkpoint at %s: training from scratch", self.path)
            return
        state = torch.load(self.path, map_location=self.map_location, weights_only=True)
        saved = state.get(DATA_KEY, "") if isinstance(state, Mapping) else ""
        if saved and self.data_sha256 and saved != self.data_sha256:
            raise ValueError(f"{self.path}: trained on other data than {self.data} (SHA-256 {saved[:12]}... then, "
                             f"{self.data_sha256[:12]}... now): resume with the same dataset_dir, or start afresh with "
                             "--resume False or another ckpt_dir")
        for key, obj in self.save_dict.items():
            if isinstance(obj, nn.Module):
                check_state_dict(state.get(key) if isinstance(state, Mapping) else state, unwrap(obj), self.path,
                                 self.run)
        schedulers = {k: v for k, v in self.save_dict.items()
                      if isinstance(v, LRScheduler) and isinstance(state, Mapping) and k in state}
        rest = {k: v for k, v in self.save_dict.items() if k not in schedulers}
        CheckpointLoader(str(self.path), {**rest, "trainer": engine}, map_location=self.map_location,
                         strict_shape=True)(engine)
        for key, scheduler in schedulers.items():
            scheduler.load_state_dict(scheduler_state(state[key], scheduler, self.path, key))
        logger.info("resumed from %s at epoch %d of %d", self.path, engine.state.epoch, engine.state.max_epochs)

    def save(self, engine: Engine) -> None:
        # rank 0 writes, without the DistributedDataParallel wrapper
        if idist.get_rank() != 0:
            return
        state = {k: unwrap(v).state_dict() for k, v in self.save_dict.items()} | {"trainer": engine.state_dict(),
                                                                                  DATA_KEY: self.data_sha256}
        with atomic_write(self.path) as tmp:
            torch.save(state, tmp)


