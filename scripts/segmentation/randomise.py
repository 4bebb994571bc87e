"""Domain randomisation of the segmenter's training frames in the spirit of SynthSeg (Billot et al., 2023): a frame is
re-rendered from its label map with random per-region intensities, texture and blur, so that the network learns shapes
rather than the phantom's contrast; and trabeculation drawn into the ventricles, which real cines have and the
phantom barely. MONAI has no label-to-image renderer (RandHistogramShift and friends remap the existing image's
intensities) and nothing label-aware that paints inside a region, hence these transforms; the spatial, bias, noise
and resolution augmentations around them are MONAI's (configs/train_segmenter.json)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from scipy.ndimage import binary_dilation, distance_transform_edt, gaussian_filter

from scripts.data.phenotypes import LABELS

BLOOD_POOLS = ("LV", "RV", "LA", "RA")


def _interfaces(label: np.ndarray, width: int) -> np.ndarray:
    """(H, W) mask of the pixels of a blood pool within `width` - 1 px of another blood pool (1: the pixel pairs that
    touch, 2: a band of 2 px on each side)."""
    masks = [label == LABELS[name] for name in BLOOD_POOLS]
    near = [binary_dilation(m, iterations=width) for m in masks]
    return np.logical_or.reduce([a & b for i, a in enumerate(masks) for j, b in enumerate(near) if i != j])


class _LabelledFrameTransform(RandomizableTransform, MapTransform):
    """With probability `prob`, a (1, H, W) "image" replaced by `render` of it and its (1, H, W) "label" (unchanged)."""

    def __init__(self, keys: KeysCollection, prob: float) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.image_key, self.label_key = self.keys

    def render(self, image: np.ndarray, label: np.ndarray) -> np.ndarray:
        """(H, W) float image and int64 label -> (H, W) float32 image (the draws of `self.R`)."""
        raise NotImplementedError

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        image, label = (torch.as_tensor(d[k]) for k in (self.image_key, self.label_key))
        if image.ndim != 3 or image.shape != label.shape or image.shape[0] != 1:
            raise ValueError(f"{type(self).__name__} expects (1, H, W) image and label, got {tuple(image.shape)} and "
                             f"{tuple(label.shape)}")
        out = self.render(image[0].float().numpy(), label[0].numpy().astype(np.int64))
        d[self.image_key] = torch.from_numpy(out)[None].to(image.dtype)
        return d


class RandLabelRenderd(_LabelledFrameTransform):
    """With probability `prob`, replace a (1, H, W) "image" by a rendering of its (1, H, W) "label": background split
    into `background_classes` regions by the smoothed image's own intensity quantiles (lung, muscle, fat, ... of the
    phantom keep their shapes), every region a random mean in [0, 1] with a random Gaussian texture (sd up to `max_texture_sd`,
    correlation length `texture_sigma` px), then a Gaussian blur of `blur_sigma` px (partial volume), rescaled to
    [0, 1]. As in bSSFP, where blood is blood, with probability `blood_pool_prob` the four blood pools share one mean
    (each jittered by sd `blood_jitter`), so that chambers must be told apart by shape and walls; with probability
    `wall_prob` the interfaces between different blood pools (valve planes, atrial septum) are drawn 1-2 px wide with
    a random intensity of their own. The label is unchanged."""

    def __init__(self, keys: KeysCollection = ("image", "label"), prob: float = 0.5, background_classes: int = 4,
                 max_texture_sd: float = 0.12, texture_sigma: Sequence[float] = (0.5, 3.0),
                 blur_sigma: Sequence[float] = (0.0, 1.2), blood_pool_prob: float = 0.5, blood_jitter: float = 0.05,
                 wall_prob: float = 0.5) -> None:
        super().__init__(keys, prob)
        if background_classes < 1:
            raise ValueError(f"background_classes must be >= 1, got {background_classes}")
        self.background_classes, self.max_texture_sd = background_classes, max_texture_sd
        self.texture_sigma, self.blur_sigma = tuple(texture_sigma), tuple(blur_sigma)
        self.blood_pool_prob, self.blood_jitter, self.wall_prob = blood_pool_prob, blood_jitter, wall_prob

    def _regions(self, image: np.ndarray, label: np.ndarray) -> np.ndarray:
        """(H, W) region index: background classes 0..K-1 by intensity quantile, labels 1..5 as K..K+4."""
        k, background = self.background_classes, label == 0
        if k == 1 or not background.any():
            return np.where(background, 0, label + k - 1)
        smooth = gaussian_filter(image, 1.0)  # regions of anatomy, not of pixel noise
        edges = np.quantile(smooth[background], np.linspace(0, 1, k + 1)[1:-1])
        return np.where(background, np.digitize(smooth, edges), label + k - 1)

    def render(self, image: np.ndarray, label: np.ndarray) -> np.ndarray:
        """(H, W) float image and integer label -> (H, W) float32 rendering in [0, 1] (the random draws of `self.R`)."""
        regions = self._regions(image, label)
        n = self.background_classes + len(LABELS)
        means = self.R.uniform(0.0, 1.0, n)
        blood = [self.background_classes - 1 + LABELS[name] for name in BLOOD_POOLS]
        if self.R.uniform() < self.blood_pool_prob:
            means[blood] = self.R.uniform(0.0, 1.0) + self.R.normal(0.0, self.blood_jitter, len(blood))
        sds = self.R.uniform(0.0, self.max_texture_sd, n)
        texture = gaussian_filter(self.R.standard_normal(image.shape), self.R.uniform(*self.texture_sigma))
        texture /= texture.std() + 1e-6
        out = means[regions] + sds[regions] * texture
        if self.R.uniform() < self.wall_prob:
            out[_interfaces(label, self.R.randint(1, 3))] = self.R.uniform(0.0, 1.0)
        out = gaussian_filter(out, self.R.uniform(*self.blur_sigma))
        lo, hi = out.min(), out.max()
        return ((out - lo) / max(hi - lo, 1e-6)).astype(np.float32)


class RandTrabeculated(_LabelledFrameTransform):
    """With probability `prob`, trabeculation drawn into each ventricle of `chambers` of a (1, H, W) "image": within a
    random depth (`depth_px`) of the blood pool's wall (myocardium or background; a valve plane to another blood pool is
    no wall), blobs of the frame's myocardium intensity (its median on the label; a smooth random field of correlation
    length `sigma_px` thresholded to cover a random `fill` of the band) blended in with a random `strength` that fades
    towards the cavity. The label is unchanged: as in UK Biobank's contours, trabeculae belong to the blood pool
    (real RVs and apices are trabeculated to ~1 cm; the phantom's are smooth, docs/segmenter.md)."""

    def __init__(self, keys: KeysCollection = ("image", "label"), prob: float = 0.5,
                 chambers: Sequence[str] = ("LV", "RV"), depth_px: Sequence[float] = (2.0, 7.0),
                 fill: Sequence[float] = (0.2, 0.6), strength: Sequence[float] = (0.4, 1.0),
                 sigma_px: Sequence[float] = (0.6, 1.5)) -> None:
        super().__init__(keys, prob)
        unknown = set(chambers) - set(BLOOD_POOLS)
        if unknown:
            raise ValueError(f"chambers must be among {BLOOD_POOLS}, got {sorted(unknown)}")
        self.chambers, self.depth_px, self.fill = tuple(chambers), tuple(depth_px), tuple(fill)
        self.strength, self.sigma_px = tuple(strength), tuple(sigma_px)

    def render(self, image: np.ndarray, label: np.ndarray) -> np.ndarray:
        """(H, W) float image and int64 label -> (H, W) float32 image with trabeculae (the draws of `self.R`)."""
        pools = np.isin(label, [LABELS[name] for name in BLOOD_POOLS])
        depth = distance_transform_edt(pools)  # px to the nearest wall or background pixel
        myo = label == LABELS["Myo"]
        tissue = float(np.median(image[myo])) if myo.any() else float(np.percentile(image, 20))
        out = image.astype(np.float32)
        for name in self.chambers:
            chamber = label == LABELS[name]
            if not chamber.any():
                continue
            field = gaussian_filter(self.R.standard_normal(image.shape), self.R.uniform(*self.sigma_px))
            blobs = field > np.quantile(field, 1.0 - self.R.uniform(*self.fill))
            fade = np.clip(1.0 - (depth - 1.0) / self.R.uniform(*self.depth_px), 0.0, 1.0)
            weight = gaussian_filter((blobs & chamber) * fade, 0.5) * chamber * self.R.uniform(*self.strength)
            out = out * (1.0 - weight) + tissue * weight
        return out.astype(np.float32)
