"""Ignite handlers and engine helpers shared by the training configs: metrics JSON, montages, the TensorBoard writer,
seeded draws, autocast."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.utils import CommonKeys
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from scripts.runtime import precision
from scripts.runtime.files import write_json
from scripts.runtime.montage import montage, save_png


# --------------------------------------------------------------------------------------------------------- handlers
class MetricsJSON:
    """After each evaluation, write {"epoch", metric: value..., **info} of the evaluator to `path` (atomically)."""

    def __init__(self, path: str | Path, info: Mapping[str, object] | None = None) -> None:
        self.path, self.info = Path(path), dict(info or {})

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        metrics = {k: float(v) for k, v in engine.state.metrics.items()}
        write_json(self.path, {"epoch": engine.state.epoch, **metrics, **self.info})


def tensorboard_writer(log_dir: str | Path, enabled: bool = True) -> SummaryWriter | None:
    """The run's one TensorBoard writer (event files in `log_dir`) on rank 0 where `enabled`; None otherwise, which
    disables the configs' TensorBoard handlers."""
    return SummaryWriter(log_dir=str(log_dir)) if enabled and idist.get_rank() == 0 else None


@contextmanager
def seeded(device: torch.device | str, seed: int) -> Iterator[None]:
    """The global CPU RNG (and `device`'s CUDA RNG) seeded with `seed` inside the block, restored after it."""
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def frames_as_images(output: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluator output {"pred", "label"} (B, C, T, H, W) -> (pred, label) as (B * T, C, H, W) frames (2D metrics)."""
    return tuple(output[k].transpose(1, 2).flatten(0, 1) for k in (CommonKeys.PRED, CommonKeys.LABEL))


def autocast(engine: Engine) -> torch.autocast:
    """bf16 autocast on the engine's device (CUDA or CPU) where it runs with AMP; a no-op context elsewhere."""
    return precision.autocast(engine.state.device, engine.amp)


class ReconstructionMontage:
    """After each evaluation, write a PNG of `frames` of the first `num` cines: input row over reconstruction row; with
    a TensorBoard `writer`, also log it as the image named after the PNG at the evaluation's (the trainer's) epoch."""

    def __init__(self, path: str | Path, num: int = 4, frames: Sequence[int] = (0, 20),
                 writer: SummaryWriter | None = None) -> None:
        self.path, self.num, self.frames, self.writer = Path(path), num, tuple(frames), writer
        self.cines: list[tuple[torch.Tensor, ...]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self.cines.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def collect(self, engine: Engine) -> None:
        out = engine.state.output
        need = self.num - len(self.cines)
        self.cines += list(zip(out[CommonKeys.LABEL][:need, 0].cpu(), out[CommonKeys.PRED][:need, 0].cpu()))

    def image(self) -> Image.Image:
        """The montage of the collected cines."""
        rows = [[cine[pair][t].float().numpy() for cine in self.cines for t in self.frames] for pair in (0, 1)]
        captions = [f"{'in' if row == 0 else 'rec'} {k} t{t}" for row in (0, 1)
                    for k in range(len(self.cines)) for t in self.frames]
        return montage(rows[0] + rows[1], ncols=len(rows[0]), captions=captions)

    def write(self, engine: Engine) -> None:
        image = self.image()
        save_png(image, self.path)
        if self.writer is not None:
            self.writer.add_image(self.path.stem, np.asarray(image), engine.state.epoch, dataformats="HW")
            self.writer.flush()
