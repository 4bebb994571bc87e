"""MAE pretraining (MONAI MaskedAutoEncoderViT, the 50 frames as channels) on real plus synthetic cines, and the
MAE -> ViT encoder transfer (`configs/pretrain_mae.json`); cines are images/<name>.npy (1, 50, 96, 96) in [0, 1]."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import CacheDataset
from monai.networks import eval_mode
from monai.networks.blocks import TransformerBlock
from monai.networks.nets import MaskedAutoEncoderViT
from monai.transforms import Compose, EnsureTyped, LoadImaged, SqueezeDimd
from monai.utils import CommonKeys
from torch import nn

from scripts.data.cohort import AUDIT, copy_audit, split_items
from scripts.data.shapes import IMAGE_SIZE, NUM_FRAMES
from scripts.runtime.checkpoints import check_state_dict
from scripts.runtime.distributed import unwrap
from scripts.runtime.files import atomic_write, write_json
from scripts.runtime.handlers import seeded
from scripts.runtime.optim_steps import FiniteSteps

logger = logging.getLogger(__name__)


IMAGE = "image"
LABEL = "label"  # the fine-tuning target (a prepared datalist's "label" path is not read here)
CINE_SHAPE = (1, NUM_FRAMES, IMAGE_SIZE, IMAGE_SIZE)  # a prepared or generated .npy
ENCODER_KEYS = ("patch_size", "hidden_size", "num_layers", "num_heads", "mlp_dim")
DECODER_KEYS = ("decoder_hidden_size", "decoder_num_layers", "decoder_num_heads", "decoder_mlp_dim", "masking_ratio")
DECODER_PREFIXES = ("decoder_", "mask_tokens")  # MAE keys with no counterpart in the ViT encoder


# ------------------------------------------------------------------------------------------------------------- data
def usable(items: Sequence[dict]) -> list[dict]:
    """The items whose image is a readable .npy of shape 1 x 50 x 96 x 96; each other one is logged and skipped."""
    kept = []
    for d in items:
        try:
            shape = np.load(d[IMAGE], mmap_mode="r").shape
            problem = "" if tuple(shape) == CINE_SHAPE else f"shape {tuple(shape)}, expected {CINE_SHAPE}"
        except (OSError, ValueError) as e:  # missing, truncated or not an .npy
            problem = f"unreadable ({type(e).__name__}: {e})"
        if problem:
            logger.warning("skipped subject %s: %s: %s", d.get("subject"), d[IMAGE], problem)
        else:
            kept.append(d)
    return kept


def synthetic_items(generated_dir: str | Path, n: int) -> list[dict]:
    """The first `n` usable synthetic cines (by name) of a generated folder, without those its privacy audit flagged
    as copies (cohort.copy_audit; cines it did not examine are named in a warning); an error naming the command if
    too few."""
    if n <= 0:
        return []
    audit = copy_audit(generated_dir)
    flagged, audited = audit or (set(), None)
    if audit is None:
        logger.warning("%s has no privacy audit (%s): its cines are used unaudited; run configs/evaluate_generation.json "
                       "first to keep copies of training cines out", generated_dir, AUDIT)
    items = [d for d in split_items(generated_dir, ["training"], absolute=True)
             if d.get("synthetic") and d["subject"] not in flagged]
    if flagged:
        logger.info("%s: %d cine(s) flagged as copies by its privacy audit left out", generated_dir, len(flagged))
    items = usable(sorted(items, key=lambda d: d["subject"]))
    if len(items) < n:
        raise ValueError(
            f"{generated_dir}: {len(items)} usable synthetic cines, {n} needed. Generate more into the same folder "
            "(generation resumes and adds samples; use the settings recorded in its generation.json): python -m "
            "monai.bundle run --config_file \"['configs/generate.json','configs/profiles/<profile>.json']\" "
            f"--output_dir {generated_dir} --prepared_dir <prepared folder> --num_samples {n}")
    unaudited = [d["subject"] for d in items[:n] if audited is not None and d["subject"] not in audited]
    if unaudited:
        logger.warning("%s: %d of the %d synthetic cines used were generated after its privacy audit (%s) and are used "
                       "unaudited (first: %s); rerun configs/evaluate_generation.json to audit them", generated_dir,
                       len(unaudited), n, AUDIT, unaudited[0])
    return [{**d, "synthetic": True} for d in items[:n]]


def pretrain_datalist(prepared_dir: str | Path, generated_dir: str | Path | None, mix_ratio: float,
                      real_splits: Sequence[str] = ("training",), real_count: int | None = None, val_count: int = 20,
                      seed: int = 0) -> dict[str, list[dict]]:
    """{"training": real + synthetic, "validation": real}: `real_splits` shuffled with `seed`, the first `val_count` to
    validate, the next `real_count` (None: all) to pretrain, plus round(mix_ratio x that) synthetic cines."""
    if mix_ratio < 0:
        raise ValueError(f"mix_ratio must be >= 0, got {mix_ratio}")
    real = usable(split_items(prepared_dir, real_splits, absolute=True))
    order = np.random.default_rng(seed).permutation(len(real))
    val, train = [real[i] for i in order[:val_count]], [real[i] for i in order[val_count:]]
    train = train[:real_count] if real_count else train
    if not train or not val:
        raise ValueError(f"{prepared_dir}: {len(real)} usable cines in {list(real_splits)}: too few for val_count "
                         f"{val_count} plus at least one pretraining cine")
    n_syn = round(mix_ratio * len(train))
    if n_syn and generated_dir is None:
        raise ValueError(f"mix_ratio {mix_ratio} needs a generated folder (generated_dir)")
    train += synthetic_items(generated_dir, n_syn) if n_syn else []
    logger.info("MAE pretraining: %d real + %d synthetic cines, %d real for validation", len(train) - n_syn, n_syn,
                len(val))
    return {"training": train, "validation": val}


def cine_transform() -> Compose:
    """Load a prepared/generated .npy and give the (50, 96, 96) float32 tensor of its frames as channels."""
    return Compose([LoadImaged(IMAGE, reader="NumpyReader", image_only=True),
                    SqueezeDimd(IMAGE, dim=0),
                    EnsureTyped(IMAGE, dtype=torch.float32, track_meta=False)])


def cine_dataset(items: Sequence[dict], label: bool = False, cache_rate: float = 1.0,
                 num_workers: int = 0) -> CacheDataset:
    """A MONAI CacheDataset of {"image", "subject", "synthetic"} (and "label" with `label`) of each item, through
    `cine_transform` (deterministic, so all cached). Only these keys, so that real and synthetic items collate."""
    data = [{IMAGE: d[IMAGE], "subject": d["subject"], "synthetic": bool(d.get("synthetic")),
             **({LABEL: d[LABEL]} if label else {})} for d in items]
    return CacheDataset(data, cine_transform(), cache_rate=cache_rate, num_workers=num_workers or None, progress=False)


# ---------------------------------------------------------------------------------------------------- MAE network
def freeze_unused_norms(network: nn.Module) -> nn.Module:
    """Freeze the `norm_cross_attn` LayerNorm that MONAI's TransformerBlock builds even without cross-attention and
    never uses: DistributedDataParallel fails on parameters without gradients. The weights stay in the state dict."""
    for block in network.modules():
        if isinstance(block, TransformerBlock) and not block.with_cross_attention:
            block.norm_cross_attn.requires_grad_(False)
    return network


def mae_network(mae: Mapping) -> MaskedAutoEncoderViT:
    """MONAI's MaskedAutoEncoderViT for (B, 50, 96, 96) cines from a profile's `mae` dict (encoder + decoder sizes)."""
    return freeze_unused_norms(MaskedAutoEncoderViT(in_channels=NUM_FRAMES, img_size=IMAGE_SIZE, spatial_dims=2,
                                                    **{k: mae[k] for k in ENCODER_KEYS + DECODER_KEYS}))


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, C * p * p): tokens row-major over the patch grid, as MONAI's conv embedding."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: torch.Tensor, p: int, c: int, h: int, w: int) -> torch.Tensor:
    """The inverse of `patchify`: (B, N, C * p * p) -> (B, C, H, W)."""
    b = tokens.shape[0]
    return tokens.reshape(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


class MaskedPatchLoss(nn.Module):
    """Mean squared error over the masked patches only (He et al. 2022); with `norm_pix`, each target patch is first
    standardised by its own mean and variance (their norm_pix_loss)."""

    def __init__(self, norm_pix: bool = False) -> None:
        super().__init__()
        self.norm_pix = norm_pix

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """pred, target (B, N, D) patches; mask (B, N), 1 where the patch was hidden from the encoder."""
        if self.norm_pix:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        per_patch = (pred - target).square().mean(-1)  # (B, N)
        mask = mask.to(per_patch.dtype)
        return (per_patch * mask).sum() / mask.sum().clamp(min=1.0)


class MAETrainStep:
    """`iteration_update` of SupervisedTrainer: random masking (the network's own), masked-patch loss, one step that is
    skipped when its gradients are not finite; returns MONAI's decollated output [{"loss"}]."""

    def __init__(self) -> None:
        self.steps = FiniteSteps("MAE pretraining")

    def __call__(self, engine: Engine, batch: dict) -> list[dict[str, float]]:
        x = batch[IMAGE].to(engine.state.device, non_blocking=engine.non_blocking)  # (B, 50, 96, 96)
        engine.network.train()
        pred, mask = engine.inferer(x, engine.network)  # (B, 36, 50 * 16 * 16), (B, 36)
        loss = engine.loss_function(pred, patchify(x, unwrap(engine.network).patch_size[0]), mask)
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        loss.backward()
        self.steps.step(engine.optimizer, engine.network.parameters(), iteration=engine.state.iteration)
        return [{"loss": loss.item()}]


class MAEEvalStep:
    """`iteration_update` of SupervisedEvaluator: masked-patch `loss` (masks seeded by iteration), and {"pred", "label"}
    (B, 1, 50, 96, 96): the reconstruction with the visible patches pasted back, and the input."""

    def __init__(self, loss: nn.Module) -> None:
        self.loss = loss

    def __call__(self, engine: Engine, batch: dict) -> dict[str, torch.Tensor]:
        x = batch[IMAGE].to(engine.state.device, non_blocking=engine.non_blocking)
        p = unwrap(engine.network).patch_size[0]
        with seeded(x.device, engine.state.iteration), eval_mode(engine.network):  # ViT masks: global CPU RNG
            pred, mask = engine.inferer(x, engine.network)
        target = patchify(x, p)
        keep = mask.unsqueeze(-1).to(pred.dtype)  # 1 = masked: show the prediction there, the input elsewhere
        recon = unpatchify(keep * pred + (1 - keep) * target, p, *x.shape[1:]).clamp(0, 1)
        return {"loss": self.loss(pred, target, mask), CommonKeys.PRED: recon.unsqueeze(1),
                CommonKeys.LABEL: x.unsqueeze(1)}


# ------------------------------------------------------------------------------------------- encoder transfer
def encoder_state(mae_state: Mapping[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """MaskedAutoEncoderViT state -> MONAI ViT state without the head (blocks.<num_layers>.* -> norm.*, decoder keys
    dropped); ValueError for a key that is neither encoder nor decoder."""
    out = {}
    for key, value in mae_state.items():
        if key.startswith(DECODER_PREFIXES):
            continue
        if key.startswith(f"blocks.{num_layers}."):
            out["norm." + key.split(".", 2)[2]] = value
        elif key == "cls_token" or key.startswith(("patch_embedding.", "blocks.")):
            out[key] = value
        else:
            raise ValueError(f"unexpected MaskedAutoEncoderViT key {key!r}: not an encoder or decoder entry")
    return out


def load_encoder(vit: nn.Module, path: str | Path, num_layers: int, head_prefix: str = "classification_head.") -> None:
    """Load the encoder of an MAE checkpoint (`configs/pretrain_mae.json`'s mae.pt) into a MONAI ViT, in place; every
    non-head key must match in name and shape (ValueError names what differs), the head keeps its initialisation."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: MAE checkpoint not found; pretrain it with configs/pretrain_mae.json")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise TypeError(f"{path}: not a network state dict (found {type(state).__name__})")
    head = {k: v for k, v in vit.state_dict().items() if k.startswith(head_prefix)}
    mapped = encoder_state(state, num_layers) | head
    check_state_dict(mapped, vit, path, run="the ViT encoder of this mae profile")
    vit.load_state_dict(mapped)
    logger.info("loaded %d encoder tensors from %s (head %s initialised)", len(mapped) - len(head), path, head_prefix)


# -------------------------------------------------------------------------------------------------------- report
class FinalReport:
    """At completion: evaluate the last epoch if not done, then (rank 0) atomically write the weights to `weights_path`
    and {"complete": true, "epoch", metrics..., "info"} to `metrics_path` (absent after a killed run)."""

    def __init__(self, network: nn.Module, weights_path: str | Path, metrics_path: str | Path,
                 evaluator: Engine | None = None, info: Mapping | None = None) -> None:
        self.network, self.weights_path, self.metrics_path = network, Path(weights_path), Path(metrics_path)
        self.evaluator, self.info = evaluator, dict(info or {})

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        metrics = {}
        if self.evaluator is not None:
            if self.evaluator.state.epoch != epoch:  # ValidationHandler did not run on the last epoch (or resumed)
                self.evaluator.run(epoch)
            metrics = {k: float(v) for k, v in self.evaluator.state.metrics.items()}
        if idist.get_rank() != 0:
            return
        with atomic_write(self.weights_path) as tmp:
            torch.save(unwrap(self.network).state_dict(), tmp)
        bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
        if bad:
            logger.warning("%s: non-finite metrics %s (e.g. a class absent from the validation fold)", self.metrics_path,
                           bad)
        write_json(self.metrics_path, {"complete": True, "epoch": epoch, "weights": str(self.weights_path),
                                       "metrics": metrics, "info": self.info})
