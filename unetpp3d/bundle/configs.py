"""Generate a bundle's ``configs/inference.json`` and ``configs/metadata.json`` from a checkpoint."""

from __future__ import annotations

import hashlib
import os
from importlib import metadata as importlib_metadata
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unetpp3d.bundle.components import IMAGE_KEY, NAME_KEY, PRED_KEY
from unetpp3d.config import Preprocessing
from unetpp3d.errors import UserError

BUNDLE_VERSION = "0.1.0"


# What metadata.json claims to follow: MONAI's published schema. Offline checks use ours instead.
MONAI_SCHEMA_URL = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                    "meta_schema_20240725.json")


INTENDED_USE = ("Research only. This model is not a medical device: it is not cleared or approved for diagnosis, "
                "treatment or any clinical decision, and its output must not be used for patient care.")


LIMITATIONS = ("Validated only on the held-out cases of its own training run; performance on other "
               "scanners, protocols, contrast phases, pathologies or populations is unknown. Inputs must be CT in "
               "Hounsfield units. Masks can be wrong without warning and need expert review.")


# Packages the bundle's components import, beside MONAI, PyTorch and NumPy.
REQUIRED_PACKAGES = ("unetpp3d", "SimpleITK", "nibabel", "scipy", "fire")


REFERENCES = ["Zhou Z, Rahman Siddiquee MM, Tajbakhsh N, Liang J. UNet++: A Nested U-Net Architecture for Medical "
              "Image Segmentation. DLMIA 2018. arXiv:1807.10165"]


def preprocessing_specs(prep: Preprocessing) -> list[dict[str, Any]]:
    """``transforms.inference_transforms(prep)`` as ``_target_`` specs for a bundle config."""
    from unetpp3d.data import transforms as T

    spacing, (low, high), mean_std, _ = T._checked(prep)
    keys = [IMAGE_KEY]
    specs: list[dict[str, Any]] = [
        {"_target_": "LoadImaged", "keys": keys, "reader": {"_target_": "unetpp3d.imageio.readers.SitkReader"},
         "image_only": True, "ensure_channel_first": True},
        {"_target_": "EnsureTyped", "keys": keys, "dtype": "float32"},
        {"_target_": "Orientationd", "keys": keys, "axcodes": prep.orientation,
         "labels": [["L", "R"], ["P", "A"], ["I", "S"]]},
        {"_target_": "Spacingd", "keys": keys, "pixdim": spacing, "mode": ["bilinear"]},
    ]
    if prep.crop_foreground:
        specs.append({"_target_": "CropForegroundd", "keys": keys, "source_key": IMAGE_KEY,
                      "select_fn": {"_target_": "unetpp3d.data.transforms.BodyMask", "threshold_hu": prep.body_threshold_hu,
                                    "mode": prep.body_mask, "air_hu": prep.body_air_hu},
                      "margin": T.CROP_MARGIN_VOXELS, "allow_smaller": True})
    specs.append({"_target_": "ScaleIntensityRanged", "keys": IMAGE_KEY, "a_min": low, "a_max": high,
                  "b_min": T._normalised(low, mean_std), "b_max": T._normalised(high, mean_std), "clip": True})
    return specs


def postprocessing_specs(prep: Preprocessing, min_component_ml: float) -> list[dict[str, Any]]:
    """What the predictor does after the windows, as specs: invert, argmax, the task's clean-up, write."""
    labels = sorted(int(k) for k in prep.labels if int(k) != 0)
    specs: list[dict[str, Any]] = [
        {"_target_": "Invertd", "keys": PRED_KEY, "transform": "@preprocessing", "orig_keys": IMAGE_KEY,
         "nearest_interp": False, "to_tensor": True},
        {"_target_": "AsDiscreted", "keys": PRED_KEY, "argmax": True},
    ]
    if prep.task == "liver" and len(labels) > 1:  # liver and tumour: their union (postprocess.largest_component_filled)
        specs += [
            {"_target_": "KeepLargestConnectedComponentd", "keys": PRED_KEY, "applied_labels": labels,
             "is_onehot": False, "independent": False},
            {"_target_": "unetpp3d.inference.postprocess.FillForegroundHolesd", "keys": PRED_KEY, "labels": labels,
             "value": labels[0]},
        ]
    elif prep.task == "liver":
        specs += [
            {"_target_": "KeepLargestConnectedComponentd", "keys": PRED_KEY, "applied_labels": labels,
             "is_onehot": False, "independent": True},
            {"_target_": "FillHolesd", "keys": PRED_KEY, "applied_labels": labels, "connectivity": 1},
        ]
    elif prep.task == "lung_nodule":
        specs.append({"_target_": "unetpp3d.inference.postprocess.RemoveSmallComponentsd", "keys": PRED_KEY,
                      "min_ml": float(min_component_ml), "labels": labels})
    else:
        raise UserError(f"preprocessing.task {prep.task!r}: no post-processing known; expected liver or lung_nodule")
    specs.append({"_target_": "unetpp3d.bundle.components.SaveMaskd", "keys": PRED_KEY, "output_dir": "@output_dir",
                  "meta_key": IMAGE_KEY, "name_key": NAME_KEY})
    return specs


def inference_config(predictor: Any) -> dict[str, Any]:
    """``configs/inference.json`` for a :class:`~unetpp3d.inference.predictor.Predictor` in accurate mode without TTA.

    Args:
        predictor: built from the checkpoint (its preprocessing, window size, overlap, batch
            size and minimum nodule volume are the ones written).
    """
    from unetpp3d.data import transforms as T

    prep = predictor.prep
    return {
        "bundle_root": ".",
        "dataset_dir": "$@bundle_root + '/data'",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": "unetpp3d.model.network.UNetPlusPlus3D", **predictor.network.model_args},
        "network": {"_target_": "unetpp3d.bundle.components.load_network", "network": "@network_def",
                    "weights": "$@bundle_root + '/models/model.pt'", "device": "@device"},
        # Softmax per window (and the 8-flip average with tta), so windows blend probabilities as in `infer`.
        "window_network": {"_target_": "unetpp3d.inference.windows.ProbabilityNet", "net": "@network", "tta": False,
                           "prune_level": None, "amp": True},
        "datalist": {"_target_": "unetpp3d.bundle.components.scan_datalist", "dataset_dir": "@dataset_dir"},
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing_specs(prep)},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [int(v) for v in predictor.roi_size],
                    "sw_batch_size": predictor.sw_batch_size, "overlap": predictor.overlap, "mode": "gaussian",
                    "padding_mode": "constant", "cval": T.pad_value(prep), "progress": False},
        "postprocessing": {"_target_": "Compose",
                           "transforms": postprocessing_specs(prep, predictor.min_component_ml)},
        "evaluator": {"_target_": "unetpp3d.bundle.components.BundleEvaluator", "device": "@device",
                      "val_data_loader": "@dataloader", "network": "@window_network", "inferer": "@inferer",
                      "postprocessing": "@postprocessing"},
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@evaluator.run()"],
        "finalize": [],
    }


def _version(package: str) -> str:
    try:
        return importlib_metadata.version(package)
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def _base_version(version: str) -> str:
    return version.split("+")[0]  # "2.13.0+cpu" -> "2.13.0": the build tag is about the machine


def metadata_config(payload: dict[str, Any], predictor: Any, source: Path) -> dict[str, Any]:
    """``configs/metadata.json``: MONAI's documented fields plus the ``unetpp3d`` section ``infer`` reads."""
    import monai

    from unetpp3d.inference.model_loading import BUNDLE_METADATA_KEY, bundle_metadata

    prep = predictor.prep
    args = predictor.network.model_args
    labels = {str(k): str(v) for k, v in prep.labels.items()}
    targets = ", ".join(v for k, v in labels.items() if int(k) != 0)
    body = (f"HU > {prep.body_threshold_hu:g}" if prep.body_mask == "threshold"
            else f"the filled outline of HU > {prep.body_threshold_hu:g}, lungs included")
    mean_std = [float(v) for v in prep.intensity_stats]
    low, high = (float(v) for v in prep.intensity_range)
    value_range = [(low - mean_std[0]) / mean_std[1], (high - mean_std[0]) / mean_std[1]]
    shape = [int(v) for v in predictor.roi_size]  # the window the sliding-window inferer feeds it
    split = payload.get("split") or {}
    n_train, n_val = len(split.get("training") or []), len(split.get("validation") or [])
    best = payload.get("best_metric")
    metrics = {"mean_dice": float(best)} if isinstance(best, (int, float)) and best >= 0 else {}
    return {
        "schema": MONAI_SCHEMA_URL,
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported by unetpp3d {_version('unetpp3d')} from {source.name}"
                                      f" (epoch {payload.get('epoch', 'unknown')})"},
        "monai_version": _base_version(monai.__version__),
        "pytorch_version": _base_version(torch.__version__),
        "numpy_version": np.__version__,
        "required_packages_version": {p.lower(): _version(p) for p in REQUIRED_PACKAGES},
        "name": f"unetpp3d {prep.task} CT segmentation",
        "task": f"{targets} segmentation in CT",
        "description": (f"3D UNet++ (features {args['features']}, deep supervision "
                        f"{'on' if args['deep_supervision'] else 'off'}) segmenting {targets} in CT scans. Input: "
                        f"CT in HU, reoriented to {prep.orientation}, resampled to {prep.target_spacing} mm, cropped "
                        f"to the body ({body}), clipped to [{low:g}, {high:g}] HU and "
                        f"z-scored with mean {mean_std[0]:g}, std {mean_std[1]:g}; sliding windows of "
                        f"{list(predictor.roi_size)} voxels; output masks on each scan's own grid."),
        "authors": "the model's trainer, with unetpp3d",
        "copyright": "Copyright (c) the model's trainer",
        "data_source": (f"the training run's own manifest ({n_train} training, {n_val} validation cases); "
                        "not distributed with the bundle"),
        "data_type": "nifti, nrrd, mha or a DICOM series folder",
        "image_classes": "single-channel CT in Hounsfield units",
        "label_classes": ", ".join(f"{k} is {v}" for k, v in labels.items()),
        "pred_classes": f"{len(labels)} channels of logits from network_def; one label map per scan from the bundle",
        "eval_metrics": metrics,
        "intended_use": INTENDED_USE,
        "limitations": LIMITATIONS,
        "references": REFERENCES,
        "network_data_format": {
            "inputs": {IMAGE_KEY: {
                "type": "image", "format": "hounsfield", "modality": "CT", "num_channels": int(args["in_channels"]),
                "spatial_shape": shape, "dtype": "float32", "value_range": value_range, "is_patch_data": True,
                "channel_def": {"0": "image"},
            }},
            "outputs": {PRED_KEY: {
                "type": "image", "format": "segmentation", "num_channels": int(args["out_channels"]),
                "spatial_shape": shape, "dtype": "float32", "value_range": [], "is_patch_data": True,
                "channel_def": labels,
            }},
        },
        BUNDLE_METADATA_KEY: bundle_metadata(payload),
    }


def meta_schema_path() -> Path:
    """``unetpp3d/resources/meta_schema.json``: our JSON schema for metadata.json (not MONAI's official one)."""
    return Path(str(resources.files("unetpp3d") / "resources" / "meta_schema.json"))


def verify_metadata(bundle: str | os.PathLike) -> None:
    """Validate a bundle's ``configs/metadata.json`` with ``monai.bundle.verify_metadata``, offline.

    MONAI downloads the schema named in the metadata unless the target file exists; pointing it
    at :func:`meta_schema_path` makes it use unetpp3d's schema, which is written from the fields
    the MONAI Bundle specification documents and is **not** MONAI's official schema file.
    Needs ``jsonschema``.

    Raises:
        ValueError: the metadata does not satisfy the schema.
    """
    from monai.bundle import verify_metadata as monai_verify_metadata

    meta, schema = Path(bundle) / "configs" / "metadata.json", meta_schema_path()
    digest = hashlib.sha256(schema.read_bytes()).hexdigest()  # tells MONAI the existing file is the one meant
    try:
        monai_verify_metadata(meta_file=str(meta), filepath=str(schema), create_dir=False, hash_val=digest,
                              hash_type="sha256")
    except ValueError as exc:
        raise ValueError(f"{meta}: {exc} (checked offline against unetpp3d's schema {schema}, not MONAI's official "
                         "one)") from exc
