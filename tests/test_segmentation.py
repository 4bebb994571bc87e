"""The cine segmenter: segment_cines shapes, Dice per label, the training config (checkpoints, metrics, resume,
wrong shapes), preprocessing of cines without labels, and Dice on the real demo subject."""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.nets import UNet
from PIL import Image

from scripts.data.heart_crop import crop_pad, uncrop
from scripts.data.prepare import prepare
from scripts.segmentation.cine_bundle import CineInferer, segment_frames
from scripts.segmentation.features import SegmenterFeatures, export_features
from scripts.segmentation.labeller import CineLabeller, crop_agreement, real_subject_dice
from scripts.segmentation.randomise import RandLabelRenderd, RandTrabeculated
from scripts.segmentation.segmenter import (
    LABEL_NAMES,
    NUM_CLASSES,
    SelectLabelledFramesd,
    dice_per_label,
    load_segmenter,
    read_info,
    segment_cines,
    split_dice,
    validation_batch_size,
)
from tests.conftest import ONE_THREAD, REPO, run_bundle, tensorboard_events
from tests.networks import build, def_kwargs
from tests.test_io import synthetic_cine

torch.set_num_threads(1)
CONFIG = "configs/train_segmenter.json"
TRAINED = Path(os.environ.get("SEGMENTER_CHECKPOINT", REPO / "models" / "segmenter.pt"))  # a trained segmenter


_bundle = partial(run_bundle, [CONFIG, "configs/profiles/tiny.json"], env=ONE_THREAD, timeout=300)


# ---------------------------------------------------------------------------------------------- network and Dice
@pytest.mark.parametrize("size", [(96, 96), (70, 53)])
def test_segment_cines_shapes_and_labels(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    labels = segment_cines(build("segmenter_def", "tiny"), torch.rand(2, 1, 3, *size), frame_batch=4)
    assert labels.shape == (2, 3, *size) and labels.dtype == torch.uint8 and labels.device.type == "cpu"
    assert int(labels.max()) < NUM_CLASSES


class Threshold(torch.nn.Module):
    """A stand-in network that answers 'LV' where the input is above 0.5."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 1, H, W) -> (N, 6, H, W): class 1 where x > 0.5
        return torch.cat([0.5 - x, x - 0.5, *[torch.full_like(x, -1.0)] * 4], 1)


def test_segment_cines_keeps_the_largest_component_per_label() -> None:
    """A network that answers 'LV' on two blobs of the input: only the larger blob stays."""
    cine = torch.zeros(1, 1, 2, 32, 32)
    cine[..., 2:10, 2:10], cine[..., 20:23, 20:23] = 1.0, 1.0
    kept, raw = (segment_cines(Threshold(), cine, largest_component=k) for k in (True, False))
    assert int((raw == 1).sum()) == 2 * (64 + 9) and int((kept == 1).sum()) == 2 * 64
    assert kept[0, :, 2:10, 2:10].eq(1).all() and kept[0, :, 20:23, 20:23].eq(0).all()


def test_zoomed_out_views_are_mapped_back_onto_the_frame() -> None:
    """segment_frames: a view zoomed out by 1.2 sees a disk 1/1.2 as wide and its labels land back on the disk (a
    missing or inverted back-mapping would shrink it 1.44x or 2.1x in area); [1.0] is the plain network."""
    yy, xx = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
    radius = ((yy - 23.5) ** 2 + (xx - 23.5) ** 2).sqrt()
    frames = (radius < 10).float()[None, None].repeat(2, 1, 1, 1)  # (2, 1, 48, 48)
    plain = segment_frames(Threshold(), frames)
    assert torch.equal(plain, Threshold()(frames).argmax(1)) and int(plain[0].sum()) == int((radius < 10).sum())
    zoomed = segment_frames(Threshold(), frames, zooms=(1.2,))
    assert abs(int(zoomed[0].sum()) - int(plain[0].sum())) < 0.1 * int(plain[0].sum())
    both = segment_frames(Threshold(), frames, zooms=(1.0, 1.2), frame_batch=1)
    away = (radius - 10).abs() > 1.5  # the disk's rim may move by a resampling pixel
    assert torch.equal(both[:, away], plain[:, away])


def test_window_search_prefers_a_whole_heart_to_a_larger_area_cut_by_the_edge() -> None:
    """CineInferer.locate on a view holding a disk (a whole 'heart') and a wide band running off every window (more
    labelled area in any window that cuts it): the chosen window holds the disk (ranking by area alone picks the
    band)."""
    yy, xx = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
    frame = (((yy - 150) ** 2 + (xx - 60) ** 2).sqrt() < 20).float()
    frame[:, 190:250] = 1.0  # the band: 60 columns, every row
    box = CineInferer(spacing_mm=1.0, stride=16).locate(Threshold(), frame[None, None].repeat(5, 1, 1, 1), (1.0, 1.0))
    (x0, x1), (y0, y1) = box
    assert x0 <= 130 and x1 >= 170 and y0 <= 40 and y1 >= 80, box


def test_labeller_places_the_box_with_plain_views_and_zooms_only_the_final_labels(monkeypatch) -> None:
    """CineInferer.label with zooms (1.0, 1.2) and 2 refine passes: the window search and the first pass segment plain
    views, the last pass the zoomed ones; the labelled disk comes back in place."""
    yy, xx = torch.meshgrid(torch.arange(128.0), torch.arange(128.0), indexing="ij")
    disk = ((yy - 70) ** 2 + (xx - 50) ** 2).sqrt() < 15
    calls, segment = [], CineInferer.segment
    monkeypatch.setattr(CineInferer, "segment",
                        lambda self, net, view, zooms=(1.0,): calls.append(tuple(zooms)) or segment(self, net, view, zooms))
    labels = CineInferer(spacing_mm=1.0, refine=2, zooms=(1.0, 1.2)).label(
        Threshold(), disk.float()[..., None].repeat(1, 1, 3), (1.0, 1.0))
    assert calls[-2:] == [(1.0,), (1.0, 1.2)] and set(calls[:-1]) == {(1.0,)}
    assert labels.shape == (128, 128, 3) and int((labels[..., 0] > 0).ne(disk).sum()) < 0.05 * int(disk.sum())


def test_dice_per_label_against_hand_counts() -> None:
    truth = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)  # (B, T, H, W)
    pred = torch.zeros_like(truth)
    truth[0, 0, :2, :2], pred[0, 0, :2, :1] = 1, 1  # LV: |A| 4, |B| 2, overlap 2 -> 4 / 6
    truth[1, 0, 2:, 2:], pred[1, 0, 2:, 2:] = 1, 1  # LV in item 1: exact -> 1
    truth[0, 0, 3, 0], pred[0, 0, 3, 1] = 2, 2  # Myo: no overlap -> 0 (item 1 has none: left out)
    truth[:, 0, 0, 3], pred[0, 0, 0, 3] = 3, 3  # RV: item 0 exact, item 1 missed -> (1 + 0) / 2
    truth[:, 0, 1, 3], pred[:, 0, 1, 3] = 4, 4  # LA exact in both; RA absent everywhere -> NaN
    dice = dice_per_label(pred, truth)
    assert dice["LV"] == pytest.approx((4 / 6 + 1) / 2) and dice["Myo"] == 0.0 and dice["RV"] == pytest.approx(0.5)
    assert dice["LA"] == 1.0 and np.isnan(dice["RA"])
    assert dice["mean"] == pytest.approx(np.mean([(4 / 6 + 1) / 2, 0.0, 0.5, 1.0]))
    with pytest.raises(ValueError, match="shapes differ"):
        dice_per_label(pred[:, :, :3], truth)


def test_segmenter_features_weigh_every_level_alike_and_export_to_torchscript(tmp_path: Path) -> None:
    """The encoder levels of a UNet, unit-normalised over channels, each level's share of the mean the same; the
    exported TorchScript gives the same features; a checkpoint of another profile is an error naming the file."""
    unet = build("segmenter_def", "tiny")
    features = SegmenterFeatures(unet, frame_size=32).eval()
    x = torch.rand(3, 1, 32, 32)
    levels = features._levels(x)  # (N, C_l * H_l * W_l) each
    channels = def_kwargs("segmenter_def", "tiny")["channels"]
    for f, c in zip(levels, channels):  # every pixel's feature vector has unit length: squares sum to H_l * W_l
        assert torch.allclose(f.pow(2).sum(1), torch.full((3,), f.shape[1] / c), rtol=1e-3)
    sizes = [f.shape[1] for f in levels]
    weights = [s * n for s, n in zip(features.scales, sizes)]  # a level's weight in the mean over all features
    assert len(set(sizes)) > 1 and max(weights) == pytest.approx(min(weights))
    checkpoint = tmp_path / "segmenter.pt"
    torch.save(unet.state_dict(), checkpoint)
    path = export_features(checkpoint, build("segmenter_def", "tiny"), tmp_path / "out" / "features.pt")
    scripted = torch.jit.load(str(path))
    assert torch.allclose(scripted(x), features(x), atol=1e-6) and [p.name for p in path.parent.iterdir()] == [path.name]
    with pytest.raises(ValueError, match="segmenter.pt"):
        export_features(checkpoint, build("segmenter_def", "cpu"), tmp_path / "wrong.pt")
    assert not (tmp_path / "wrong.pt").exists()


# ------------------------------------------------------------------------------------------ domain randomisation
def _label_map() -> torch.Tensor:
    """(1, 48, 48) label map: the five labels as touching blocks of 8 rows over a background."""
    label = torch.zeros(1, 48, 48, dtype=torch.uint8)
    for value in range(1, 6):
        label[0, 8 * value - 4:8 * value + 4, 6:40] = value
    return label


def test_label_render_gives_each_region_one_random_intensity_and_keeps_the_label() -> None:
    label = _label_map()
    image = torch.linspace(0, 1, 48)[None, :, None].expand(1, 48, 48).clone()  # background: a ramp across rows
    render = RandLabelRenderd(prob=1.0, background_classes=3, max_texture_sd=0.0, blur_sigma=(0.0, 0.0),
                              blood_pool_prob=0.0, wall_prob=0.0)
    render.set_random_state(0)
    out = render({"image": image, "label": label})
    x = out["image"]
    assert out["label"] is label and x.shape == image.shape and x.dtype == image.dtype
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    means = [x[label == v] for v in range(1, 6)]
    assert all(float(m.std()) < 1e-6 for m in means)  # one intensity per label
    assert len({round(float(m[0]), 4) for m in means}) == 5  # drawn independently
    background = x[label == 0]
    assert len(torch.unique(background.round(decimals=4))) == 3  # the background's intensity thirds
    render.set_random_state(0)
    assert torch.equal(render({"image": image, "label": label})["image"], x)  # seeded
    render.set_random_state(1)
    assert not torch.equal(render({"image": image, "label": label})["image"], x)


def test_label_render_blood_pools_share_one_intensity_and_walls_part_them() -> None:
    label = _label_map()  # LV, Myo, RV, LA, RA blocks: RV touches LA, LA touches RA
    kwargs = {"prob": 1.0, "max_texture_sd": 0.0, "blur_sigma": (0.0, 0.0), "blood_pool_prob": 1.0, "blood_jitter": 0.0}
    render = RandLabelRenderd(**kwargs, wall_prob=0.0)
    render.set_random_state(0)
    x = render({"image": torch.rand(1, 48, 48), "label": label})["image"]
    pools = [x[label == v] for v in (1, 3, 4, 5)]
    assert len({round(float(p[0]), 5) for p in pools}) == 1 and all(float(p.std()) < 1e-6 for p in pools)
    walled = RandLabelRenderd(**kwargs, wall_prob=1.0)
    walled.set_random_state(0)
    y = walled({"image": torch.rand(1, 48, 48), "label": label})["image"]
    blood = torch.isin(label[0], torch.tensor([1, 3, 4, 5], dtype=torch.uint8))
    pool = y[0][blood].mode().values  # the shared blood intensity (rescaling may move it)
    wall = blood & (y[0] != pool)
    rows = torch.nonzero(wall)[:, 0].unique().tolist()
    assert rows and set(rows) <= {26, 27, 28, 29, 34, 35, 36, 37}  # only beside the RV/LA and LA/RA edges (rows 28, 36)
    assert len(torch.unique(y[0][wall])) == 1 and float(y[0][label[0] == 2].std()) < 1e-6  # one wall value


def test_label_render_probability_zero_and_shape_errors() -> None:
    label, image = _label_map(), torch.rand(1, 48, 48)
    assert RandLabelRenderd(prob=0.0)({"image": image, "label": label})["image"] is image
    with pytest.raises(ValueError, match=r"expects \(1, H, W\) image and label"):
        RandLabelRenderd(prob=1.0)({"image": image[None], "label": label[None]})


def test_trabeculation_darkens_only_the_chosen_ventricle_near_its_wall_and_keeps_the_label() -> None:
    """RandTrabeculated on an LV disk in a myocardial ring and an RV block: RV pixels within the band move towards the
    myocardium's intensity, the deep cavity and every other pixel stay as they were, the label is untouched."""
    yy, xx = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
    radius = ((yy - 24) ** 2 + (xx - 14) ** 2).sqrt()
    label = torch.zeros(1, 48, 48, dtype=torch.uint8)
    label[0][radius < 12], label[0][radius < 8], label[0, 8:40, 28:46] = 2, 1, 3
    image = torch.tensor([0.0, 1.0, 0.2, 0.8, 0.0, 0.0])[label.long()]
    trab = RandTrabeculated(prob=1.0, chambers=("RV",), depth_px=(3.0, 3.0), fill=(0.5, 0.5), strength=(1.0, 1.0))
    trab.set_random_state(0)
    out = trab({"image": image, "label": label})
    x, rv = out["image"][0], label[0] == 3
    assert out["label"] is label and out["image"].shape == image.shape and x.dtype == image.dtype
    assert torch.equal(x[~rv], image[0][~rv])  # LV, myocardium and background untouched
    depth = torch.minimum(torch.minimum(yy - 8, 39 - yy), torch.minimum(xx - 28, 45 - xx))  # px inside the RV
    assert torch.equal(x[rv & (depth >= 6)], image[0][rv & (depth >= 6)])  # the deep cavity stays blood
    band = x[rv & (depth == 0)]
    assert float(band.min()) < 0.5 and float(band.min()) >= 0.2 - 1e-6 and float((band < 0.75).float().mean()) > 0.2
    trab.set_random_state(0)
    assert torch.equal(trab({"image": image, "label": label})["image"], out["image"])  # seeded
    with pytest.raises(ValueError, match="chambers must be among"):
        RandTrabeculated(chambers=("Myo",))
    with pytest.raises(ValueError, match=r"RandTrabeculated expects \(1, H, W\) image and label"):
        trab({"image": image[None], "label": label[None]})


def test_partially_labelled_cines_keep_only_their_labelled_frames() -> None:
    image, label = torch.rand(1, 50, 8, 8), torch.randint(0, 6, (1, 50, 8, 8))
    out = SelectLabelledFramesd(["image", "label"])({"image": image, "label": label, "labelled_frames": [0, 25]})
    assert "labelled_frames" not in out and torch.equal(out["image"], image[:, [0, 25]])
    assert torch.equal(out["label"], label[:, [0, 25]])
    assert SelectLabelledFramesd(["image", "label"])({"image": image, "label": label})["image"] is image
    assert validation_batch_size([{}, {"labelled_frames": [0]}], 4) == 1 and validation_batch_size([{}], 4) == 4


# ------------------------------------------------------------------------------------------------------ bundle CLI
def test_cli_training_writes_checkpoints_metrics_montage_and_test_dice(segmenter_runs: dict,
                                                                      segmenter_prepared: Path) -> None:
    root, metrics = segmenter_runs["root"], segmenter_runs["metrics_first"]
    state = torch.load(root / "models" / "segmenter.pt", weights_only=True)
    assert set(state) == set(build("segmenter_def", "tiny").state_dict())  # network only
    names = {f"val_dice_{n}" for n in LABEL_NAMES}
    assert metrics["epoch"] == 2 and set(metrics) == {"epoch", "precision", "val_mean_dice", *names}
    assert metrics["precision"] == "fp32"  # bf16 autocast is CUDA-only for the segmenter
    assert all(0.0 <= metrics[k] <= 1.0 for k in names | {"val_mean_dice"})
    assert set(segmenter_runs["latest_first"]) == {"network", "optimizer", "lr_scheduler", "best_saver", "trainer", "data_sha256"}
    assert segmenter_runs["latest_first"]["trainer"]["iteration"] == 6  # 6 cines, batch 2, 2 epochs
    info = read_info(root / "models" / "segmenter.pt")
    datalist = json.loads((segmenter_prepared / "datalist.json").read_text())
    spacing = [np.mean(d["spacing_mm"]) for d in datalist["training"]]
    assert info["profile"] == "tiny" and info["spacing_mm"] == pytest.approx(float(np.median(spacing)))
    test = json.loads((root / "out" / "test_metrics.json").read_text())
    assert test["n"] == 1 and set(LABEL_NAMES) <= set(test)
    network = load_segmenter(root / "models" / "segmenter.pt", build("segmenter_def", "tiny"), "cpu")
    best = split_dice(network, segmenter_prepared, "test")
    assert test["mean"] == pytest.approx(best["mean"])  # the best checkpoint's
    with Image.open(root / "out" / "montage.png") as png:  # image/truth/prediction rows x (1 cine x 2 frames), x2
        assert png.size == (2 * 96 * 2, 3 * 96 * 2)
    events = tensorboard_events(root / "out" / "tensorboard")
    assert {"iteration_loss", "train_loss", "val_mean_dice", *names} == set(events.Tags()["scalars"])
    assert [(i.step, i.width, i.height) for i in events.Images("montage")][-1] == (3, 2 * 96 * 2, 3 * 96 * 2)


def test_wrong_shape_checkpoint_is_an_error_naming_the_file(segmenter_runs: dict, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    wider = UNet(2, 1, NUM_CLASSES, channels=(8, 16, 32), strides=(2, 2), num_res_units=0)  # tiny's layout, wider
    torch.save({**segmenter_runs["latest_first"], "network": wider.state_dict()}, models / "segmenter_latest.pt")
    done = _bundle(*segmenter_runs["common"][:2], "--ckpt_dir", str(models), "--output_dir", str(tmp_path / "out"),
                   expect_failure=True)
    log = done.stdout + done.stderr
    assert done.returncode != 0 and "shape mismatch" in log
    assert f"{models / 'segmenter_latest.pt'}: checkpoint does not match UNet of segmenter profile 'tiny'" in log
    with pytest.raises(ValueError, match="segmenter.pt: checkpoint does not match UNet of this segmenter_def"):
        load_segmenter(segmenter_runs["root"] / "models" / "segmenter.pt", build("segmenter_def", "cpu"), "cpu")


def test_fine_tuning_starts_from_init_checkpoint(segmenter_runs: dict, segmenter_prepared: Path,
                                                 tmp_path: Path) -> None:
    """--init_checkpoint loads a trained segmenter before training: at learning rate 0 the best checkpoint of the
    fine-tune holds exactly its weights (a run from scratch would hold fresh random ones)."""
    init = segmenter_runs["root"] / "models" / "segmenter.pt"
    _bundle("--dataset_dir", str(segmenter_prepared), "--ckpt_dir", str(tmp_path / "models"), "--output_dir",
            str(tmp_path / "out"), "--init_checkpoint", str(init), "--segmenter#learning_rate", "0.0",
            "--segmenter#num_epochs", "1")
    tuned, start = (torch.load(p, weights_only=True) for p in (tmp_path / "models" / "segmenter.pt", init))
    assert set(tuned) == set(start) and all(torch.equal(tuned[k], start[k]) for k in start)


# -------------------------------------------------------------------------------------- preprocessing without labels
class _TruthLabeller(CineLabeller):
    """Stand-in segmenter: returns the subject's true label cine (the mechanism, not accuracy), records its calls."""

    def __init__(self, truth: dict[bytes, np.ndarray]) -> None:
        self.truth, self.calls, self.checkpoint = truth, [], "stand-in.pt"

    def __call__(self, image: np.ndarray, spacing_mm: tuple[float, float]) -> np.ndarray:
        self.calls.append(tuple(spacing_mm))
        return self.truth[image.tobytes()]


def test_prepare_labels_subjects_without_a_label_file(segmenter_cohort: Path, segmenter_prepared: Path,
                                                      tmp_path: Path) -> None:
    import nibabel as nib

    root = tmp_path / "cohort"
    truth = {}
    for n in range(8):
        (root / f"s{n}").mkdir(parents=True)
        (root / f"s{n}" / "la_4ch.nii.gz").symlink_to(segmenter_cohort / f"s{n}" / "la_4ch.nii.gz")
        label = segmenter_cohort / f"s{n}" / "seg4_la_4ch.nii.gz"
        image = nib.load(segmenter_cohort / f"s{n}" / "la_4ch.nii.gz").get_fdata(dtype=np.float32)[:, :, 0]
        truth[image.tobytes()] = np.asarray(nib.load(label).dataobj)[:, :, 0].astype(np.uint8)
        if n % 2 == 0:
            (root / f"s{n}" / "seg4_la_4ch.nii.gz").symlink_to(label)

    without = prepare(root, tmp_path / "plain", num_workers=0)  # no segmenter: a missing label is a subject error
    assert without["prepared"] == 4 and without["segmenter_checkpoint"] is None
    assert all("seg4_la_4ch.nii.gz: file not found" in s["reason"] for s in without["skipped"])

    stand_in = _TruthLabeller(truth)
    report = prepare(root, tmp_path / "out", num_workers=0, labeller=stand_in)
    assert report["prepared"] == 8 and report["labelled_by_segmenter"] == ["s1", "s3", "s5", "s7"]
    assert len(stand_in.calls) == 4 and set(stand_in.calls) == {(1.5, 1.5)}
    assert {s: r["labels"] for s, r in report["subjects"].items()} == {f"s{n}": "file" if n % 2 == 0 else "segmenter"
                                                                       for n in range(8)}
    assert "Labelled by the segmenter stand-in.pt (no label file): s1, s3, s5, s7" in (tmp_path / "out" /
                                                                                       "report.md").read_text()
    reference = json.loads((segmenter_prepared / "report.json").read_text())["subjects"]
    for s, record in report["subjects"].items():  # the same labels give the same crop and the same tensors
        assert record["crop_box"] == reference[s]["crop_box"]
        for kind in ("images", "labels"):
            assert np.array_equal(np.load(tmp_path / "out" / kind / f"{s}.npy"),
                                  np.load(segmenter_prepared / kind / f"{s}.npy"))


@pytest.mark.parametrize("box", [[[10, 40], [5, 25]], [[-6, 30], [20, 44]]])  # inside; leaving the view
def test_uncrop_inverts_crop_pad(box: list[list[int]]) -> None:
    x = torch.rand(3, 32, 40)
    back = uncrop(crop_pad(x, box), box, x.shape)
    inside = torch.zeros_like(x, dtype=torch.bool)
    inside[:, max(box[0][0], 0):box[0][1], max(box[1][0], 0):box[1][1]] = True
    assert torch.equal(back[inside], x[inside]) and not back[~inside].any()


def test_crop_agreement_of_a_perfect_and_a_shifted_labeller(segmenter_cohort: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import nibabel as nib

    truth = {}
    for n in (0, 1):
        image = nib.load(segmenter_cohort / f"s{n}" / "la_4ch.nii.gz").get_fdata(dtype=np.float32)[:, :, 0]
        label = nib.load(segmenter_cohort / f"s{n}" / "seg4_la_4ch.nii.gz")
        truth[image.tobytes()] = np.asarray(label.dataobj)[:, :, 0]
    stand_in = _TruthLabeller({k: v.astype(np.uint8) for k, v in truth.items()})
    monkeypatch.setattr("scripts.segmentation.labeller.CineLabeller", lambda checkpoint, network, **options: stand_in)
    exact = crop_agreement(segmenter_cohort, "stand-in.pt", None, ["s0", "s1"])
    assert all(r["box_iou"] == 1.0 and r["heart_fraction"] == 1.0 and r["side_ratio"] == 1.0 for r in exact.values())
    assert all(r["dice"][name] == 1.0 for r in exact.values() for name in LABEL_NAMES)
    stand_in.truth = {k: np.roll(v, 20, axis=0).astype(np.uint8) for k, v in truth.items()}  # 20 px off along X
    shifted = crop_agreement(segmenter_cohort, "stand-in.pt", None, ["s0"])["s0"]
    assert 0.3 < shifted["box_iou"] < 0.9 and shifted["heart_fraction"] < 1.0 and shifted["dice"]["LV"] < 1.0


def test_cine_labeller_resamples_to_the_training_pixel_size(segmenter_runs: dict, tmp_path: Path) -> None:
    """The real labeller on a full field of view: (X, Y, T) uint8 back at the input size, a clear error without
    segmenter.json (no accuracy claim: the tiny network is barely trained)."""
    checkpoint = segmenter_runs["root"] / "models" / "segmenter.pt"
    image, _ = synthetic_cine(12, 0)
    network = build("segmenter_def", "tiny")
    labels = CineLabeller(checkpoint, network)(image, (1.5, 1.5))
    assert labels.shape == image.shape and labels.dtype == np.uint8 and labels.max() < NUM_CLASSES
    lone = tmp_path / "segmenter.pt"
    lone.write_bytes(checkpoint.read_bytes())
    with pytest.raises(ValueError, match="segmenter.json: missing or malformed segmenter info"):
        CineLabeller(lone, network)


# ------------------------------------------------------------------------------------------------- real subject
def test_real_subject_dice(ukbb_demo: Path, tmp_path: Path) -> None:
    """Dice per label of a trained segmenter, with the labeller's views, on the real demo subject (reported, not a
    target)."""
    if not TRAINED.is_file():
        pytest.skip(f"no trained segmenter at {TRAINED} (set SEGMENTER_CHECKPOINT, or train {CONFIG})")
    dice = real_subject_dice(ukbb_demo, TRAINED, build("segmenter_def", read_info(TRAINED)["profile"]), tmp_path)
    print(f"real subject Dice ({TRAINED}): {dice}")
    assert set(dice) == {"1"} and all(0.0 <= dice["1"][n] <= 1.0 for n in LABEL_NAMES)
