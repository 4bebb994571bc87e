"""The code of the standalone cine segmentation bundle (configs/export_segmenter_bundle.json,
scripts/segmentation/bundle_export.py, docs/monailabel.md): NIfTI cines to and from the canonical in-plane
orientation, the labeller's window-search inferer, the fine-tuning heart crop and datalists.

Copied unchanged into every exported bundle (scripts/segmentation/cine_bundle.py there) with the three modules it
imports (scripts/data/heart_crop.py, scripts/data/orientation.py, scripts/runtime/files.py), so it imports nothing
else of this repository. `CineInferer` holds the labeller's method as a MONAI Inferer; the repository's own labeller
(scripts.segmentation.labeller.CineLabeller, preprocessing without label files) calls it."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.networks import eval_mode
from monai.transforms import MapTransform, SaveImaged
from nibabel.orientations import apply_orientation
from torch import nn
from torch.nn import functional as F

from scripts.data.heart_crop import crop_pad, heart_box, keep_largest_per_label, largest_component_3d, uncrop
from scripts.data.orientation import in_plane_codes, orientation, reorient
from scripts.runtime.files import atomic_write

IMAGE_SIZE = 96  # the segmenter's frame size (scripts/data/shapes.py)
LABEL_NAMES = ("background", "LV", "Myo", "RV", "LA", "RA")  # channel k = label value k
LABELLER_ZOOMS = (1.0,)  # the labeller's test-time views: plain for networks trained on larger hearts (docs/segmenter.md)


# ------------------------------------------------------------------------------------------------------- transforms
def _xyt(array: torch.Tensor, where: str) -> torch.Tensor:
    """An (X, Y, T) view of a loaded (X, Y, T) or (X, Y, 1, T) cine; ValueError naming the file otherwise."""
    dims = list(array.shape)
    if len(dims) == 4 and dims[2] == 1:
        return array[:, :, 0]
    if len(dims) == 3:
        return array
    raise ValueError(f"{where}: shape {tuple(dims)}; expected a 2D cine X x Y x T or X x Y x 1 x T")


def _file_affine(meta: Mapping) -> np.ndarray:
    """The affine the cine's file gives (MONAI's loaders keep it as original_affine)."""
    return np.asarray(meta.get("original_affine", meta.get("affine")), float)


def _codes(meta: Mapping) -> str:
    """In-plane directions of the stored axes (orientation.in_plane_codes); as stored ("LP") where the NIfTI header
    has no orientation (qform_code and sform_code 0), as scripts.data.cine_files reads such files."""
    if int(meta.get("qform_code", 1)) == 0 and int(meta.get("sform_code", 1)) == 0:
        return "LP"
    return in_plane_codes(_file_affine(meta))


class CanonicalCined(MapTransform):
    """A loaded NIfTI cine (X, Y, T) or (X, Y, 1, T) -> (1, X', Y', T) float32 in the canonical in-plane orientation
    (scripts/data/orientation.py), its affine to match; the meta keeps what `RestoreCined` needs to go back:
    "orientation_codes", "original_affine" and "spatial_shape" (the stored X, Y, T, as MONAI Label's Restored reads
    it)."""

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            meta = dict(image.meta) if isinstance(image, MetaTensor) else dict(d.get(f"{key}_meta_dict", {}))
            where = str(meta.get("filename_or_obj", key))
            array = _xyt(torch.as_tensor(image), where).float().numpy()
            codes, affine = _codes(meta), _file_affine(meta)
            oriented, new_affine, _ = reorient(array, affine, _spacing(affine), codes)
            meta.update(orientation_codes=codes, original_affine=affine, spatial_shape=np.asarray(array.shape))
            meta.pop("affine", None)
            d[key] = MetaTensor(torch.from_numpy(oriented)[None], affine=torch.as_tensor(new_affine), meta=meta)
        return d


def restore_orientation(array: np.ndarray, codes: str) -> np.ndarray:
    """Inverse of orientation.reorient's array change: a canonical (X', Y', ...) array back to the stored axes."""
    ornt = orientation(codes)[:2]
    inverse = np.zeros_like(ornt)
    inverse[ornt[:, 0].astype(int)] = np.stack([np.arange(2), ornt[:, 1]], 1)
    return np.ascontiguousarray(apply_orientation(array, inverse))


class RestoreCined(MapTransform):
    """Labels (1, X', Y', T) of a `CanonicalCined` image -> (1, X, Y, T) uint8 in the stored orientation with the
    file's affine (MONAI Label's Restored and Writer then find nothing to resample)."""

    def __init__(self, keys: Sequence[str], ref_image: str = "image") -> None:
        super().__init__(keys)
        self.ref_image = ref_image

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        meta = d[self.ref_image].meta
        codes, affine = str(np.ravel(meta["orientation_codes"])[0]), _file_affine(meta)
        for key in self.key_iterator(d):
            labels = torch.as_tensor(d[key])[0].round().clamp(0, len(LABEL_NAMES) - 1).to(torch.uint8).numpy()
            stored = restore_orientation(labels, codes)[None]
            d[key] = MetaTensor(torch.from_numpy(stored), affine=torch.as_tensor(affine),
                                meta={"filename_or_obj": meta.get("filename_or_obj"), "original_affine": affine})
        return d


class SaveCined(SaveImaged):
    """Writes (1, X, Y, T) labels of `RestoreCined` as uint8 NIfTI with the input file's header (shape, affine, pixel
    size, frame interval) where SaveImaged would put them (output_dir, output_postfix, data_root_dir; MONAI's writers
    refuse an X x Y x 1 x T cine). A SaveImaged, so MONAI Label, which writes the result itself, leaves it out."""

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            source = str(np.ravel(d[key].meta["filename_or_obj"])[0])
            stored = nib.load(source)
            labels = torch.as_tensor(d[key])[0].numpy().astype(np.uint8).reshape(stored.shape)
            image = nib.Nifti1Image(labels, stored.affine, stored.header)
            image.set_data_dtype(np.uint8)
            image.header.set_slope_inter(1.0, 0.0)
            path = Path(self.saver.folder_layout.filename(subject=source))
            with atomic_write(path) as tmp:
                nib.save(image, tmp)
        return d


class HeartCropd(MapTransform):
    """Image and label (1, X', Y', T) of `CanonicalCined` -> (1, 96, 96, T') heart crops of the T' frames that have
    labels (a partially labelled cine, e.g. only end-diastole and end-systole drawn, trains on those): the label's
    heart box (square in mm, `margin`) as preprocessing and the labeller take it, resized (image bilinear with
    antialiasing, labels nearest) and the image scaled by its 0.5/99.5 percentiles to [0, 1], as `CineInferer` sees
    a crop."""

    def __init__(self, keys: Sequence[str] = ("image", "label"), margin: float = 0.15) -> None:
        super().__init__(keys)
        self.margin = margin

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        image, label = (torch.as_tensor(d[k]) for k in self.keys)
        if image.shape != label.shape:
            raise ValueError(f"{d[self.keys[1]].meta.get('filename_or_obj')}: label shape {tuple(label.shape)} "
                             f"differs from the image's {tuple(image.shape)} (after orientation)")
        labelled = (label[0] > 0).flatten(0, 1).any(0)  # (T,)
        if not labelled.any():
            raise ValueError(f"{d[self.keys[1]].meta.get('filename_or_obj')}: label cine has no heart label")
        box = heart_box((label[0] > 0).any(-1).numpy(), _spacing(d[self.keys[0]].affine), self.margin)
        views = [crop_pad(x[0].permute(2, 0, 1)[labelled, None].float(), box) for x in (image, label)]  # (T', 1, ...)
        d[self.keys[0]] = scale_percentiles(resize(views[0])).permute(1, 2, 3, 0)  # (1, 96, 96, T)
        d[self.keys[1]] = F.interpolate(views[1], size=[IMAGE_SIZE] * 2, mode="nearest-exact").permute(1, 2, 3, 0)
        return d


# -------------------------------------------------------------------------------------- the labeller's method
def _spacing(affine: torch.Tensor | np.ndarray) -> np.ndarray:
    """(x, y) pixel size (mm) of an affine: the lengths of its first two columns."""
    return np.linalg.norm(np.asarray(affine, float)[:3, :2], axis=0)


def resize(view: torch.Tensor) -> torch.Tensor:
    """(T, 1, h, w) -> (T, 1, 96, 96), bilinear with antialiasing."""
    return F.interpolate(view, size=[IMAGE_SIZE] * 2, mode="bilinear", antialias=True, align_corners=False)


def scale_percentiles(x: torch.Tensor) -> torch.Tensor:
    """`x` scaled by its own 0.5/99.5 percentiles to [0, 1]."""
    lo, hi = np.percentile(x.numpy(), [0.5, 99.5])
    return ((x - lo) / max(hi - lo, 1e-6)).clamp(0.0, 1.0)


def _warp(x: torch.Tensor, zoom: float) -> torch.Tensor:
    """(N, C, H, W) sampled on a field `zoom` times as wide about the centre (> 1: content shrunk, zero-padded)."""
    if zoom == 1.0:
        return x
    theta = torch.tensor([[zoom, 0.0, 0.0], [0.0, zoom, 0.0]], dtype=x.dtype, device=x.device).expand(len(x), 2, 3)
    return F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)


@torch.no_grad()
def segment_frames(network: nn.Module, frames: torch.Tensor, zooms: Sequence[float] = (1.0,),
                   frame_batch: int = 64) -> torch.Tensor:
    """(N, 1, H, W) frames -> (N, H, W) int64 labels on the CPU: the argmax of the softmax averaged over views zoomed
    out by each factor of `zooms` (each view's probabilities mapped back to the frame); (1.0,) is the plain network.
    Test-time zooming: torch's grid_sample because MONAI's TestTimeAugmentation inverts random draws per item."""
    device = next(network.parameters()).device
    labels = []
    with eval_mode(network):
        for batch in frames.split(frame_batch):
            x = batch.to(device, torch.float32)
            probs = sum(_warp(network(_warp(x, z)).float().softmax(1), 1.0 / z) for z in zooms)
            labels.append(probs.argmax(1).cpu())
    return torch.cat(labels)


def _window_score(labels: torch.Tensor) -> tuple[int, bool, int]:
    """(T, h, w) labels of a search window -> (labels present, heart clear of the window's edge, labelled area):
    ranks a whole heart above a larger labelled area cut by the edge (a network trained on larger hearts over-labels
    off-centre windows)."""
    heart = labels > 0
    edge = heart[:, [0, -1], :].any() or heart[:, :, [0, -1]].any()
    return len(torch.unique(labels[heart])), not bool(edge), int(heart.sum())


class CineInferer(Inferer):
    """The labeller's method as a MONAI Inferer around the per-frame UNet: (B, 1, X, Y, T)
    canonical cines (MetaTensor, pixel size from the affine) -> (B, 1, X, Y, T) labels 0..5. A window search at the
    training pixel size `spacing_mm`, then `refine` passes on the heart crop, the last averaged over views zoomed out
    by `zooms` (the search and the passes that place the box use the plain network) (docs/segmenter.md)."""

    def __init__(self, spacing_mm: float, refine: int = 2, margin: float = 0.15, stride: int = 16,
                 search_frames: int = 5, frame_batch: int = 64, zooms: Sequence[float] = LABELLER_ZOOMS) -> None:
        super().__init__()
        self.spacing_mm, self.refine, self.margin = float(spacing_mm), refine, margin
        self.stride, self.search_frames, self.frame_batch = stride, search_frames, frame_batch
        self.zooms = tuple(float(z) for z in zooms)

    def segment(self, network: nn.Module, view: torch.Tensor, zooms: Sequence[float] = (1.0,)) -> torch.Tensor:
        """(T, 1, h, w) view -> (T, h, w) labels, the view segmented at 96 x 96 (largest components kept)."""
        labels = segment_frames(network, scale_percentiles(resize(view)), zooms, self.frame_batch).numpy()
        kept = keep_largest_per_label(labels)
        kept = kept * largest_component_3d(kept > 0)
        return F.interpolate(torch.from_numpy(kept).float()[:, None], size=list(view.shape[-2:]),
                             mode="nearest-exact")[:, 0]

    def locate(self, network: nn.Module, x: torch.Tensor, spacing_mm: Sequence[float]) -> list[list[int]]:
        """Box [[x0, x1], [y0, y1]] (input pixels) of the best 96 x 96 training-size window of a (T, 1, X, Y) cine."""
        factor = np.asarray(spacing_mm, float) / self.spacing_mm
        frames = x[:: max(1, len(x) // self.search_frames)][: self.search_frames]
        size = [max(1, round(n * f)) for n, f in zip(x.shape[-2:], factor)]
        view = F.interpolate(frames, size=size, mode="bilinear", antialias=True, align_corners=False)
        starts = [sorted({*range(0, max(n - IMAGE_SIZE, 0) + 1, self.stride), max(n - IMAGE_SIZE, 0)}) for n in size]
        best, box = (-1, -1), None
        for i in starts[0]:
            for j in starts[1]:
                window = [[i, i + IMAGE_SIZE], [j, j + IMAGE_SIZE]]
                score = _window_score(self.segment(network, crop_pad(view, window)))
                if score > best:
                    best, box = score, window
        return [[round(a / f), round(b / f)] for (a, b), f in zip(box, factor)]

    def label(self, network: nn.Module, cine: torch.Tensor, spacing_mm: Sequence[float]) -> torch.Tensor:
        """(X, Y, T) float cine with its pixel size (mm) -> (X, Y, T) float labels."""
        x = cine.float().permute(2, 0, 1)[:, None]  # (T, 1, X, Y)
        box, labels = self.locate(network, x, spacing_mm), torch.zeros(x.shape[0], *x.shape[-2:])
        passes = max(self.refine, 1)
        for k in range(passes):  # the box from plain views (zoomed-out ones widen the labels' rim), the labels zoomed
            zooms = self.zooms if k == passes - 1 else (1.0,)
            labels = uncrop(self.segment(network, crop_pad(x, box), zooms), box, labels.shape)
            if not labels.any():
                break
            box = heart_box((labels > 0).any(0).numpy(), spacing_mm, self.margin)
        return labels.permute(1, 2, 0)

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args, **kwargs) -> torch.Tensor:
        """(B, 1, X, Y, T) cines (MetaTensor with their affines) -> (B, 1, X, Y, T) labels."""
        affine = inputs.affine if isinstance(inputs, MetaTensor) else None
        if affine is None:
            raise ValueError("CineInferer needs a MetaTensor input (its affine gives the pixel size): load the cine "
                             "with LoadImaged and CanonicalCined")
        cines = inputs.as_tensor().cpu()
        out = [self.label(network, cine[0], _spacing(affine[b] if affine.ndim == 3 else affine))
               for b, cine in enumerate(cines)]
        return torch.stack(out)[:, None].to(inputs.device)


# ------------------------------------------------------------------------------------------------------ datalists
def cine_datalist(dataset_dir: str | Path, image_glob: str = "*/la_4ch.nii.gz",
                  label_name: str | None = None) -> list[dict[str, str]]:
    """[{"image"[, "label"]}] of the cines under `dataset_dir` matching `image_glob` (UK Biobank layout by default),
    the label file `label_name` beside each where given; ValueError naming the folder where none match."""
    images = sorted(Path(dataset_dir).glob(image_glob))
    if not images:
        raise ValueError(f"{dataset_dir}: no cine matches {image_glob!r}")
    if label_name is None:
        return [{"image": str(p)} for p in images]
    items = [{"image": str(p), "label": str(p.parent / label_name)} for p in images]
    missing = [d["label"] for d in items if not Path(d["label"]).exists()]
    if missing:
        raise ValueError(f"{dataset_dir}: {len(missing)} label file(s) missing, e.g. {missing[0]}")
    return items
