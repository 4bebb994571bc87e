"""Export of the cine segmenter as a standalone MONAI segmentation bundle (configs/export_segmenter_bundle.json) that
MONAI Label's monaibundle app loads unchanged (docs/monailabel.md): raw full-view cines in, label cines in the
input's geometry out (configs/inference.json), fine-tuning on user labels (configs/train.json). The bundle runs the
code of scripts/segmentation/cine_bundle.py, copied into it with the three modules that imports."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from monai.networks.nets import UNet
from torch import nn

from scripts.runtime.checkpoints import load_weights
from scripts.runtime.files import atomic_folder, write_json
from scripts.segmentation.cine_bundle import IMAGE_SIZE, LABEL_NAMES, LABELLER_ZOOMS
from scripts.segmentation.segmenter import TRAINED_BY, read_info

BUNDLE_NAME = "cardiac_cine_4ch_segmentation"
CODE = ("scripts/data/heart_crop.py", "scripts/data/orientation.py", "scripts/runtime/files.py",
        "scripts/segmentation/cine_bundle.py")
PACKAGES = ("scripts", "scripts/data", "scripts/runtime", "scripts/segmentation")
UNET_ARGS = ("in_channels", "out_channels", "channels", "strides", "kernel_size", "up_kernel_size", "num_res_units",
             "act", "norm", "dropout", "bias", "adn_ordering")
M = "scripts.segmentation.cine_bundle."  # the bundle's code, as its configs name it
ONE_HOT = {"_target_": "AsDiscreted", "keys": ["pred", "label"], "argmax": [True, False],
           "to_onehot": len(LABEL_NAMES)}
MEAN_DICE = {"_target_": "MeanDice", "include_background": False,
             "output_transform": "$monai.handlers.from_engine(['pred', 'label'])"}


def unet_config(network: nn.Module) -> dict:
    """The bundle's network_def: MONAI's UNet with the arguments `network` (a segmenter_def) was built with."""
    if type(network) is not UNet:
        raise ValueError(f"segmenter_def is a {type(network).__name__}; the export knows MONAI's UNet only")
    args = json.loads(json.dumps({k: getattr(network, k) for k in UNET_ARGS}))  # tuples -> JSON lists
    return {"_target_": "monai.networks.nets.UNet", "spatial_dims": network.dimensions, **args}


def _load(keys: list[str]) -> list[dict]:
    """NIfTI loading and the canonical orientation of `keys`."""
    return [{"_target_": "LoadImaged", "keys": keys, "reader": "NibabelReader", "image_only": True},
            {"_target_": M + "CanonicalCined", "keys": keys}]


def _common(network_def: dict) -> dict:
    """The entries inference.json and train.json share."""
    return {"imports": ["$import scripts", "$import scripts.segmentation.cine_bundle"],
            "bundle_root": ".",
            "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
            "dataset_dir": "$@bundle_root + '/data'",
            "image_glob": "*/la_4ch.nii.gz",
            "network_def": network_def,
            "network": "$@network_def.to(@device)"}


def inference_config(network_def: dict, spacing_mm: float, zooms: Sequence[float]) -> dict:
    """configs/inference.json: every cine of `dataset_dir` matching `image_glob` -> <output_dir>/<relative
    folder>/<name>_seg.nii.gz, uint8 labels in the input's shape and affine."""
    return _common(network_def) | {
        "datalist": f"${M}cine_datalist(@dataset_dir, @image_glob)",
        "output_dir": "$@bundle_root + '/eval'",
        "spacing_mm": spacing_mm,
        "zooms": [float(z) for z in zooms],
        "preprocessing": {"_target_": "Compose", "transforms": _load(["image"])},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": M + "CineInferer", "spacing_mm": "@spacing_mm", "zooms": "@zooms"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": M + "RestoreCined", "keys": "pred", "ref_image": "image"},
            {"_target_": M + "SaveCined", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
             "separate_folder": False, "data_root_dir": "@dataset_dir"}]},
        "handlers": [{"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
                      "load_dict": {"model": "@network"}, "map_location": "@device"},
                     {"_target_": "StatsHandler", "iteration_log": False}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": False},
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@evaluator.run()"],
        "finalize": ["$monai.utils.set_determinism(seed=None)"]}


def train_config(network_def: dict) -> dict:
    """configs/train.json: fine-tunes models/model.pt on raw cines with label cines (`dataset_dir` in UK Biobank
    layout, or MONAI Label's datalist through train#dataset#data): frames of each cine's heart crop, validation Dice
    on every frame of the validation cines (the training cines where there are none), best weights to
    models/model.pt."""
    keys = ["image", "label"]
    crop = _load(keys) + [{"_target_": M + "HeartCropd", "keys": keys, "margin": "@margin"}]
    return _common(network_def) | {
        "label_name": "seg4_la_4ch.nii.gz",
        "datalist": f"${M}cine_datalist(@dataset_dir, @image_glob, @label_name)",
        "num_val": "$max(1, len(@datalist) // 5) if len(@datalist) > 1 else 0",
        "margin": 0.15,
        "max_epochs": 20,
        "frames_per_cine": 8,
        "learning_rate": 1e-4,
        "val_interval": 1,
        "loss": {"_target_": "DiceCELoss", "to_onehot_y": True, "softmax": True},
        "optimizer": {"_target_": "torch.optim.AdamW", "params": "$@network.parameters()", "lr": "@learning_rate",
                      "weight_decay": 1e-4},
        "train": {
            "preprocessing": {"_target_": "Compose", "transforms": crop + [
                {"_target_": "RandSpatialCropSamplesd", "keys": keys, "roi_size": [IMAGE_SIZE, IMAGE_SIZE, 1],
                 "num_samples": "@frames_per_cine", "random_size": False},
                {"_target_": "SqueezeDimd", "keys": keys, "dim": -1},
                {"_target_": "RandAffined", "keys": keys, "prob": 0.7, "rotate_range": 0.35,
                 "scale_range": [0.2, 0.2], "translate_range": [8, 8], "mode": ["bilinear", "nearest"],
                 "padding_mode": "zeros"},
                {"_target_": "RandAdjustContrastd", "keys": "image", "prob": 0.5, "gamma": [0.6, 1.6]},
                {"_target_": "RandGaussianNoised", "keys": "image", "prob": 0.3, "std": 0.05},
                {"_target_": "EnsureTyped", "keys": keys, "track_meta": False}]},
            "dataset": {"_target_": "CacheDataset", "data": "$@datalist[@num_val:]",
                        "transform": "@train#preprocessing", "cache_rate": 1.0, "num_workers": 0},
            "dataloader": {"_target_": "DataLoader", "dataset": "@train#dataset", "batch_size": 2, "shuffle": True,
                           "num_workers": 0},
            "inferer": {"_target_": "SimpleInferer"},
            "postprocessing": {"_target_": "Compose", "transforms": [ONE_HOT]},
            "key_metric": {"train_mean_dice": MEAN_DICE},
            "handlers": [
                {"_target_": "ValidationHandler", "validator": "@validate#evaluator", "epoch_level": True,
                 "interval": "@val_interval"},
                {"_target_": "StatsHandler", "tag_name": "train_loss",
                 "output_transform": "$monai.handlers.from_engine(['loss'], first=True)"}],
            "trainer": {"_target_": "SupervisedTrainer", "device": "@device", "max_epochs": "@max_epochs",
                        "train_data_loader": "@train#dataloader", "network": "@network", "optimizer": "@optimizer",
                        "loss_function": "@loss", "inferer": "@train#inferer",
                        "postprocessing": "@train#postprocessing", "key_train_metric": "@train#key_metric",
                        "train_handlers": "@train#handlers", "amp": False}},
        "validate": {
            "preprocessing": {"_target_": "Compose", "transforms": crop + [
                {"_target_": "SplitDimd", "keys": keys, "dim": -1, "keepdim": False, "list_output": True},
                {"_target_": "EnsureTyped", "keys": keys, "track_meta": False}]},
            "dataset": {"_target_": "Dataset", "data": "$@datalist[:@num_val]",
                        "transform": "@validate#preprocessing"},
            "fallback": {"_target_": "Dataset", "data": "@train#dataset#data", "transform": "@validate#preprocessing"},
            "dataloader": {"_target_": "DataLoader",
                           "dataset": "$@validate#dataset if len(@validate#dataset) else @validate#fallback",
                           "batch_size": 1, "shuffle": False, "num_workers": 0},
            "inferer": {"_target_": "SimpleInferer"},
            "postprocessing": {"_target_": "Compose", "transforms": [ONE_HOT]},
            "key_metric": {"val_mean_dice": MEAN_DICE},
            "handlers": [
                {"_target_": "StatsHandler", "iteration_log": False},
                {"_target_": "CheckpointSaver", "save_dir": "$@bundle_root + '/models'",
                 "save_dict": {"model": "@network"}, "save_key_metric": True, "key_metric_filename": "model.pt"}],
            "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device",
                          "val_data_loader": "@validate#dataloader", "network": "@network",
                          "inferer": "@validate#inferer", "postprocessing": "@validate#postprocessing",
                          "key_val_metric": "@validate#key_metric", "val_handlers": "@validate#handlers",
                          "amp": False}},
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@train#trainer.run()"],
        "finalize": ["$monai.utils.set_determinism(seed=None)"]}


def bundle_readme(name: str, info: dict) -> str:
    """docs/README.md of the exported bundle."""
    return f"""# {name}

Labels 4-chamber cardiac MRI cines (NIfTI X x Y x T or X x Y x 1 x T, any in-plane orientation and pixel size) on
every frame: 0 background, 1 LV blood pool, 2 LV myocardium, 3 RV, 4 LA, 5 RA. Exported from the CPGG cine bundle's
segmenter (profile `{info['profile']}`, training pixel size {float(info['spacing_mm']):.3f} mm; `models/segmenter.json`).

- **Network** (`network_def`): MONAI's 2D UNet, trained on 96 x 96 heart crops; `models/model.pt` is its state dict.
- **Inference** (`configs/inference.json`): `LoadImaged` and `CanonicalCined` (the cine in one in-plane orientation),
  then `CineInferer`: 5 frames resampled to the training pixel size, every 96 x 96 window segmented (stride 16),
  the window with the most labels, then labels clear of its edge, then the most heart pixels kept; then twice the
  heart box of the current labels (square, margin 0.15) is resized to 96 x 96 and every frame segmented there
  (largest component per label and frame, one heart per cine; the last pass averaged over the `zooms` views).
  `RestoreCined` returns the labels to the input's orientation; `SaveCined` writes
  `<output_dir>/<folder>/<name>_seg.nii.gz` (uint8) with the input's shape and affine.
- **Fine-tuning** (`configs/train.json`): pairs of raw cines and label cines; each cine's heart crop (from its labels)
  resized to 96 x 96, only frames with labels, `frames_per_cine` random frames per cine and step, augmented,
  DiceCELoss, AdamW (lr `learning_rate`); validation Dice on every frame of the validation cines; the best weights
  replace `models/model.pt`.

```bash
# from this folder: label every <dataset_dir>/*/la_4ch.nii.gz (UK Biobank layout; --image_glob for another)
python -m monai.bundle run --config_file configs/inference.json --dataset_dir /path/to/cines --output_dir seg
# fine-tune on <dataset_dir>/<subject>/la_4ch.nii.gz with seg4_la_4ch.nii.gz beside it
python -m monai.bundle run --config_file configs/train.json --dataset_dir /path/to/labelled --max_epochs 20
```

MONAI Label (0.8.5, monaibundle app): put this folder in `<app>/model/` and start the server with
`--conf models {name} --conf zoo_source github` (no model-zoo lookup).

Needs torch, monai, nibabel, scipy and pytorch-ignite. `scripts/` holds copies of CPGG bundle modules
(`segmentation/cine_bundle.py`, `data/heart_crop.py`, `data/orientation.py`, `runtime/files.py`); changes belong there, then re-export.

Limits: trained on phantom cines unless `models/segmenter.json` says otherwise; on real cines its labels need
checking (the CPGG bundle's docs/segmenter.md gives the measured Dice).
"""


def _metadata(info: dict, version: str) -> dict:
    """configs/metadata.json of the exported bundle (MONAI bundle schema 20240725)."""
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                  "meta_schema_20240725.json",
        "version": version,
        "changelog": {version: f"exported from the CPGG cine bundle's segmenter (profile {info['profile']})"},
        "monai_version": _version("monai"), "pytorch_version": _version("torch"), "numpy_version": _version("numpy"),
        "required_packages_version": {"nibabel": _version("nibabel"), "scipy": _version("scipy"),
                                      "pytorch-ignite": _version("ignite")},
        "supported_apps": {"monai-label": "0.8.5"},
        "name": "Cardiac cine 4-chamber segmentation",
        "task": "Segmentation of 4-chamber cardiac MRI cines (LV blood pool, LV myocardium, RV, LA, RA) on every "
                "frame",
        "description": "A per-frame 2D UNet trained on 96 x 96 heart crops (CPGG cine bundle, "
                       "configs/train_segmenter.json) with a window-search inferer that labels raw full field-of-view "
                       "cines: the label cine comes back in the input file's geometry. train.json fine-tunes it on "
                       "user label cines (MONAI Label's train task drives it).",
        "authors": "CPGG bundle contributors",
        "copyright": "Copyright (c) 2026 CPGG bundle contributors",
        "data_source": "Phantom 4-chamber cines of the CPGG bundle (configs/make_phantom.json) unless noted in "
                       "models/segmenter.json",
        "data_type": "nibabel",
        "image_classes": "single-channel 2D+time cine (NIfTI X x Y x T or X x Y x 1 x T), any intensity range",
        "label_classes": "0 background, 1 LV blood pool, 2 LV myocardium, 3 RV, 4 LA, 5 RA",
        "pred_classes": "label values 0..5 as label_classes",
        "eval_metrics": {"note": "not measured by the export; the Dice of the exported segmenter is in the CPGG bundle's docs/segmenter.md"},
        "intended_use": "Research only; trained on a phantom unless models/segmenter.json says otherwise",
        "references": [("Li et al., Phenotype-Guided Generative Model for High-Fidelity Cardiac MRI Synthesis, "
                        "MICCAI 2025")],
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "num_channels": 1, "spatial_shape": ["*", "*", "*"],
                "dtype": "float32", "value_range": [], "is_patch_data": False,
                "channel_def": {"0": "image"}}},
            "outputs": {"pred": {
                "type": "image", "format": "segmentation", "num_channels": 1, "spatial_shape": ["*", "*", "*"],
                "dtype": "uint8", "value_range": [0, len(LABEL_NAMES) - 1], "is_patch_data": False,
                "channel_def": {str(k): name for k, name in enumerate(LABEL_NAMES)}}},
        },
        "segmenter": info,
    }


def _version(module: str) -> str:
    """Installed version of a module."""
    return str(__import__(module).__version__).split("+")[0]


def export_bundle(checkpoint: str | Path, network: nn.Module, output_dir: str | Path, name: str = BUNDLE_NAME,
                  version: str = "0.1.0", overwrite: bool = False, zooms: Sequence[float] = LABELLER_ZOOMS) -> Path:
    """Write the standalone bundle `<output_dir>/<name>/` of a segmenter.pt (with segmenter.json beside it; weights
    loaded into `network`, the config's segmenter_def, shape-checked; `zooms` the inferer's test-time views) and
    return its path."""
    info = read_info(checkpoint)
    run = (f"configs/export_segmenter_bundle.json's segmenter_def (segmenter.json says profile {info['profile']!r}: "
           f"layer configs/profiles/{info['profile']}.json)")
    network = load_weights(network.cpu(), checkpoint, run, TRAINED_BY).eval()
    target, repo = Path(output_dir) / name, Path(__file__).resolve().parents[2]
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; remove it or pass --overwrite True")
    with atomic_folder(target) as tmp:
        for package in PACKAGES:
            (tmp / package).mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / package / "__init__.py", tmp / package / "__init__.py")
        for module in CODE:
            shutil.copy2(repo / module, tmp / module)
        (tmp / "models").mkdir()
        torch.save(network.state_dict(), tmp / "models" / "model.pt")
        write_json(tmp / "models" / "segmenter.json", info)
        configs = {"metadata.json": _metadata(info, version),
                   "inference.json": inference_config(unet_config(network), float(info["spacing_mm"]), zooms),
                   "train.json": train_config(unet_config(network))}
        for config, obj in configs.items():
            write_json(tmp / "configs" / config, obj)
        shutil.copy2(repo / "configs" / "logging.conf", tmp / "configs" / "logging.conf")
        (tmp / "docs").mkdir()
        shutil.copy2(repo / "LICENSE", tmp / "LICENSE")
        (tmp / "docs" / "README.md").write_text(bundle_readme(name, info), encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
    return target
