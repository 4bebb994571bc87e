"""Ignite handlers and engine helpers shared by the training configs: metrics JSON, montages, seeded draws, autocast."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from monai.utils import CommonKeys

from scripts.runtime import precision
from scripts.runtime.files import write_json
from scripts.runtime.montage import save_montage


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
    """After each evaluation, write a PNG of `frames` of the first `num` cines: input row over reconstruction row."""

    def __init__(self, path: str | Path, num: int = 4, frames: Sequence[int] = (0, 20)) -> None:
        self.path, self.num, self.frames = Path(path), num, tuple(frames)
        self.cines: list[tuple[torch.Tensor, torch.Tensor]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self.cines.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def collect(self, engine: Engine) -> None:
        out = engine.state.output
        need = self.num - len(self.cines)
        self.cines += list(zip(out[CommonKeys.LABEL][:need, 0].cpu(), out[CommonKeys.PRED][:need, 0].cpu()))

    def write(self, engine: Engine) -> None:
        rows = [[cine[pair][t].float().numpy() for cine in self.cines for t in self.frames] for pair in (0, 1)]
        captions = [f"{'in' if row == 0 else 'rec'} {k} t{t}" for row in (0, 1)
                    for k in range(len(self.cines)) for t in self.frames]
        save_montage(rows[0] + rows[1], self.path, ncols=len(rows[0]), captions=captions)


