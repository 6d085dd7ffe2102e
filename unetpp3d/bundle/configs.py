"""Generate a bundle's ``configs/inference.json`` and ``configs/metadata.json`` from a checkpoint."""

from __future__ import annotations

import hashlib
import os
from importlib import metadata as importlib_metadata
from importlib import resources
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch
from monai.bundle import verify_metadata as monai_verify_metadata

import unetpp3d
from unetpp3d.bundle.components import (
    PROB_KEY,
    AtomicNibabelWriter,
    BundleEvaluator,
    CaseNames,
    NoduleReportd,
    load_network,
    one_line_user_errors,
    scan_datalist,
)
from unetpp3d.data.transforms import IMAGE_KEY
from unetpp3d.errors import UserError
from unetpp3d.inference.model_loading import BUNDLE_METADATA_KEY, bundle_metadata
from unetpp3d.inference.pipeline import PRED_KEY, inferer_args, window_network_args
from unetpp3d.inference.predictor import Predictor
from unetpp3d.inference.windows import ProbabilityNet
from unetpp3d.model.network import UNetPlusPlus3D

BUNDLE_VERSION = "0.1.0"


# What metadata.json follows: MONAI's official schema (meta_schema_20240725.json, also served at
# https://project-monai.github.io/schema/). It is not shipped with unetpp3d; see verify_metadata.
MONAI_SCHEMA_URL = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                    "meta_schema_20240725.json")


# The bundle's copy of unetpp3d/bundle/check_unetpp3d.py, which every config's initialize runs first.
CHECK_SCRIPT = "scripts/check_unetpp3d.py"


INTENDED_USE = ("Research only. This model is not a medical device: it is not cleared or approved for diagnosis, "
                "treatment or any clinical decision, and its output must not be used for patient care.")


LIMITATIONS = ("Validated only on the held-out cases of its own training run; performance on other "
               "scanners, protocols, contrast phases, pathologies or populations is unknown. Inputs must be CT in "
               "Hounsfield units. Masks can be wrong without warning and need expert review.")


# Packages the bundle's components import, beside MONAI, PyTorch and NumPy.
REQUIRED_PACKAGES = ("unetpp3d", "SimpleITK", "nibabel", "scipy", "fire")


# The lowest float32 value: the floor of the network's log-probabilities (log 0 is not reached).
LOG_PROB_MIN = float(np.finfo(np.float32).min)


REFERENCES = ["Zhou Z, Rahman Siddiquee MM, Tajbakhsh N, Liang J. UNet++: A Nested U-Net Architecture for Medical "
              "Image Segmentation. DLMIA 2018. arXiv:1807.10165"]


def inference_config(predictor: Predictor) -> dict[str, Any]:
    """``configs/inference.json``: the predictor's own pipeline, plus the bundle's folder reader and writer.

    ``preprocessing`` and the ``postprocessing`` up to the writer are the predictor's
    :attr:`~unetpp3d.inference.predictor.Predictor.pipeline_config`, the specs it instantiated
    itself; the window network and the inferer take the same arguments as the predictor's
    (:mod:`unetpp3d.inference.pipeline`). TTA and fast mode are the model's own settings.

    Args:
        predictor: built from the checkpoint with the model's own inference settings.
    """
    pipeline = predictor.pipeline_config
    window = window_network_args(predictor.tta, predictor.prune_level, amp=True)
    return {
        "imports": ["$import runpy"],
        "bundle_root": ".",
        "dataset_dir": "$@bundle_root + '/data'",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": _target(UNetPlusPlus3D), **predictor.network.model_args},
        "network": {"_target_": _target(load_network), "network": "@network_def",
                    "weights": "$@bundle_root + '/models/model.pt'", "device": "@device"},
        # Softmax per window (and the 8-flip average with tta), so windows blend probabilities as in `infer`.
        "window_network": {"_target_": _target(ProbabilityNet), "net": "@network", **window},
        "datalist": {"_target_": _target(scan_datalist), "dataset_dir": "@dataset_dir"},
        "preprocessing": pipeline["preprocessing"],
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SlidingWindowInferer",
                    **inferer_args(predictor.roi_size, predictor.sw_batch_size, predictor.overlap, predictor.prep),
                    "progress": False},
        "case_names": {"_target_": _target(CaseNames), "datalist": "@datalist"},
        "postprocessing": {"_target_": "Compose",
                           "transforms": bundle_postprocessing(pipeline["postprocessing"]["transforms"], predictor)},
        "evaluator": {"_target_": _target(BundleEvaluator), "device": "@device",
                      "val_data_loader": "@dataloader", "network": "@window_network", "inferer": "@inferer",
                      "postprocessing": "@postprocessing"},
        "initialize": initialize_steps(seed=0),
        "run": ["$@evaluator.run()"],
        "finalize": [],
    }


def bundle_postprocessing(specs: list[dict[str, Any]], predictor: Predictor) -> list[dict[str, Any]]:
    """The predictor's post-processing specs, plus what a bundle writes: the nodule report and the mask.

    Where the task's rules ask for a nodule report (:attr:`~unetpp3d.tasks.TaskRules.nodule_report`),
    MONAI's ``CopyItemsd`` keeps the probabilities that ``Invertd`` put on the scan's grid before
    ``AsDiscreted`` replaces them, and :class:`~unetpp3d.bundle.components.NoduleReportd` writes
    the report ``unetpp3d infer`` writes. The mask goes last, through MONAI's ``SaveImaged``
    (MONAI Label's post-filters drop it and write their own), named as ``infer`` names it.
    """
    steps = list(specs)
    if predictor.rules.nodule_report:
        steps.insert(1, {"_target_": "CopyItemsd", "keys": PRED_KEY, "times": 1, "names": PROB_KEY})
        steps.append({"_target_": _target(NoduleReportd), "keys": PRED_KEY, "output_dir": "@output_dir",
                      "names": "@case_names", "prob_key": PROB_KEY, "meta_key": IMAGE_KEY,
                      "min_component_ml": float(predictor.min_component_ml)})
    top_label = max(int(k) for k in predictor.prep.labels)
    steps.append({"_target_": "SaveImaged", "keys": PRED_KEY, "output_dir": "@output_dir", "output_postfix": "",
                  "output_ext": ".nii.gz", "resample": False, "separate_folder": False,
                  "output_dtype": "uint8" if top_label <= 255 else "int16",
                  "writer": _target(AtomicNibabelWriter), "output_name_formatter": "@case_names",
                  "print_log": False})
    return steps


def initialize_steps(seed: int) -> list[Any]:
    """The ``initialize`` of every config: refuse a missing or old unetpp3d, report user errors briefly, seed.

    The first step runs the bundle's ``scripts/check_unetpp3d.py`` (a copy of
    :mod:`unetpp3d.bundle.check_unetpp3d`, which imports nothing from unetpp3d) before anything
    names a unetpp3d component, so that a missing package is one line, not MONAI's
    "Cannot locate" traceback.
    """
    return [f"$runpy.run_path(@bundle_root + '/{CHECK_SCRIPT}', run_name='__main__')",
            {"_target_": _target(one_line_user_errors)},
            f"$monai.utils.set_determinism(seed={int(seed)})"]


def _target(obj: Any) -> str:
    """The dotted path a config names a unetpp3d class or function by (followed when it moves)."""
    return f"{obj.__module__}.{obj.__qualname__}"


def _version(package: str) -> str:
    try:
        return importlib_metadata.version(package)
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def _base_version(version: str) -> str:
    return version.split("+")[0]  # "2.13.0+cpu" -> "2.13.0": the build tag is about the machine


def metadata_config(payload: dict[str, Any], predictor: Predictor, source: Path) -> dict[str, Any]:
    """``configs/metadata.json``: MONAI's documented fields plus the ``unetpp3d`` section ``infer`` reads."""
    prep = predictor.prep
    args = predictor.network.model_args
    labels = {str(k): str(v) for k, v in prep.labels.items()}
    max_label = max(int(k) for k in labels)
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
        "changelog": {BUNDLE_VERSION: f"exported by unetpp3d {unetpp3d.__version__} from {source.name}"
                                      f" (epoch {payload.get('epoch', 'unknown')})"},
        "monai_version": _base_version(monai.__version__),
        "pytorch_version": _base_version(torch.__version__),
        "numpy_version": np.__version__,
        # unetpp3d at the version that exported the bundle: the oldest the bundle's check accepts.
        "required_packages_version": {p.lower(): unetpp3d.__version__ if p == "unetpp3d" else _version(p)
                                      for p in REQUIRED_PACKAGES},
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
        "pred_classes": (f"{len(labels)} channels from network_def in eval mode: log-probabilities (<= 0) whose softmax "
                         "is the mean of the heads' probabilities and whose argmax is the label; inference.json writes "
                         f"one label map per scan with values {', '.join(f'{k} ({v})' for k, v in labels.items())}"),
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
            # network_def in eval mode: log(mean of the heads' softmax) per class, so <= 0 and
            # bounded below only by float32; its argmax is the label ("labels" in MONAI's formats).
            "outputs": {PRED_KEY: {
                "type": "image", "format": "labels", "num_channels": int(args["out_channels"]),
                "spatial_shape": shape, "dtype": "float32", "value_range": [LOG_PROB_MIN, 0.0],
                "is_patch_data": True, "channel_def": labels,
            }},
            # What inference.json writes: one label map per scan, on the scan's own grid.
            "post_processed_outputs": {PRED_KEY: {
                "type": "image", "format": "segmentation", "num_channels": 1,
                "spatial_shape": ["*", "*", "*"], "dtype": "uint8" if max_label <= 255 else "int16",
                "value_range": [0, max_label], "is_patch_data": False,
                "channel_def": {"0": ", ".join(f"{k} {v}" for k, v in labels.items())},
            }},
        },
        BUNDLE_METADATA_KEY: bundle_metadata(payload),
    }


def meta_schema_path() -> Path:
    """``unetpp3d/resources/meta_schema.json``: our JSON schema for metadata.json (not MONAI's official one)."""
    return Path(str(resources.files("unetpp3d") / "resources" / "meta_schema.json"))


def verify_metadata(bundle: str | os.PathLike, schema: str | os.PathLike | None = None) -> None:
    """Validate a bundle's ``configs/metadata.json`` with ``monai.bundle.verify_metadata``, offline.

    MONAI downloads the schema the metadata names unless the target file exists; this gives it
    an existing file. By default that is :func:`meta_schema_path`, unetpp3d's own schema, which
    asks for everything MONAI's official schema (``meta_schema_20240725.json``) requires plus
    what ``unetpp3d infer`` reads; it is **not** the official file. Pass ``schema`` with a local
    copy of the official file to validate against it: unetpp3d does not ship that file (code
    and data of other projects stay out of its repository). Needs ``jsonschema``.

    Args:
        bundle: the bundle folder.
        schema: a JSON schema file; default unetpp3d's.

    Raises:
        ValueError: the metadata does not satisfy the schema.
        UserError: ``schema`` is not a file.
    """
    meta = Path(bundle) / "configs" / "metadata.json"
    path = meta_schema_path() if schema is None else Path(schema)
    if not path.is_file():
        raise UserError(f"{path}: no such schema file; give a local copy of MONAI's meta_schema_20240725.json")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()  # tells MONAI the existing file is the one meant
    which = "unetpp3d's schema, not MONAI's official one" if schema is None else "the schema file given"
    try:
        monai_verify_metadata(meta_file=str(meta), filepath=str(path), create_dir=False, hash_val=digest,
                              hash_type="sha256")
    except ValueError as exc:
        raise ValueError(f"{meta}: {exc} (checked offline against {which}: {path})") from exc
