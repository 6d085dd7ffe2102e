"""Export a trained model as a MONAI Bundle (``unetpp3d export-bundle``).

The bundle follows the layout the MONAI Bundle specification documents
(https://docs.monai.io/en/latest/mb_specification.html)::

    BUNDLE/
      configs/metadata.json    versions, task, intended use, network_data_format, and the
                               ``unetpp3d`` section (model_args, preprocessing, config) that
                               ``unetpp3d infer --model BUNDLE`` reads as plain data
      configs/inference.json   the same pipeline as ``unetpp3d infer``, for ``python -m monai.bundle run``
      configs/logging.conf     console logging for MONAI's runner
      models/model.pt          the state dict
      models/model.ts          TorchScript (traced in eval mode), with metadata.json and inference.json inside
      docs/README.md           what it segments, how it was trained, its validation figures, how to run it
      LICENSE                  a short licence notice

``inference.json`` is generated here, at export time, from the checkpoint's
:class:`~unetpp3d.config.Preprocessing`: each step is a ``{"_target_": ..., **arguments}`` spec
naming a MONAI class or a unetpp3d one (the reader, the body mask, the post-processing, the
writer), so the file reads as a list of components rather than a program. Before anything is
written, the specs are instantiated with MONAI's ``ConfigParser`` and compared, attribute by
attribute, with the objects the :class:`~unetpp3d.predictor.Predictor` builds from
:mod:`unetpp3d.transforms` and :mod:`unetpp3d.postprocess`; a difference stops the export (a bug
in this module, not a user error), so the bundle cannot drift from ``unetpp3d infer``.

Run it with MONAI alone::

    python -m monai.bundle run --config_file BUNDLE/configs/inference.json --bundle_root BUNDLE \\
        --dataset_dir SCANS --output_dir MASKS

which writes ``MASKS/<case>.nii.gz`` on each scan's own grid, as ``unetpp3d infer SCANS --out MASKS``
does (TTA: ``--window_network#tta True``; fast mode: ``--window_network#prune_level 2``; fp32
where ``infer`` would use bf16: ``--window_network#amp False``, as ``--no-amp``).
The ``$`` expressions are kept to what MONAI's runner needs: the device, the default folders,
the weights path, ``"initialize"`` (seeding) and ``"run": ["$@evaluator.run()"]``. The workflow is
:class:`BundleEvaluator`, a small loop with ``SupervisedEvaluator``'s argument names, because
MONAI's own evaluator needs pytorch-ignite, which unetpp3d does not depend on.

Metadata schema: ``metadata.json`` names MONAI's official schema URL in its ``schema`` field.
:func:`verify_metadata` checks it offline against ``unetpp3d/resources/meta_schema.json``, a
schema **written for unetpp3d from the metadata fields MONAI documents; it is our schema, not
MONAI's official schema file**, so passing it does not prove conformance to MONAI's.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import shutil
import uuid
from collections.abc import Hashable, Mapping, Sequence
from importlib import metadata as importlib_metadata
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from torch import nn

from unetpp3d.config import Preprocessing
from unetpp3d.errors import UserError

__all__ = [
    "BundleEvaluator",
    "SaveMaskd",
    "export_bundle",
    "inference_config",
    "load_network",
    "meta_schema_path",
    "metadata_config",
    "postprocessing_specs",
    "preprocessing_specs",
    "scan_datalist",
    "verify_metadata",
]

log = logging.getLogger("unetpp3d")

BUNDLE_VERSION = "0.1.0"
# What metadata.json claims to follow: MONAI's published schema. Offline checks use ours instead.
MONAI_SCHEMA_URL = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                    "meta_schema_20240725.json")
IMAGE_KEY, PRED_KEY, NAME_KEY = "image", "pred", "name"
INTENDED_USE = ("Research only. This model is not a medical device: it is not cleared or approved for diagnosis, "
                "treatment or any clinical decision, and its output must not be used for patient care.")
LIMITATIONS = ("Validated only on the held-out cases of its own training run; performance on other "
               "scanners, protocols, contrast phases, pathologies or populations is unknown. Inputs must be CT in "
               "Hounsfield units. Masks can be wrong without warning and need expert review.")
# Packages the bundle's components import, beside MONAI, PyTorch and NumPy.
REQUIRED_PACKAGES = ("unetpp3d", "SimpleITK", "nibabel", "scipy", "fire")
REFERENCES = ["Zhou Z, Rahman Siddiquee MM, Tajbakhsh N, Liang J. UNet++: A Nested U-Net Architecture for Medical "
              "Image Segmentation. DLMIA 2018. arXiv:1807.10165"]


# --------------------------------------------------------------------------------------------
# Components that inference.json names (run inside `python -m monai.bundle run`)
# --------------------------------------------------------------------------------------------


def scan_datalist(dataset_dir: str | os.PathLike) -> list[dict[str, str]]:
    """The cases of a folder (or manifest) as ``[{"image": path, "name": case}, ...]``.

    The same expansion and case names as ``unetpp3d infer FOLDER`` (image files and DICOM series
    folders directly inside it), so both write the same ``<case>.nii.gz`` files.

    Raises:
        UserError: the folder is missing, holds no scans, or holds inputs that cannot be read.
    """
    from unetpp3d.predictor import expand_inputs

    cases = expand_inputs([dataset_dir])
    bad = [c for c in cases if c.error]
    if bad:
        listed = "; ".join(f"{c.path}: {c.error}" for c in bad[:5])
        raise UserError(f"dataset_dir {dataset_dir}: {listed}; pass --dataset_dir with a folder of CT scans")
    return [{IMAGE_KEY: str(c.path), NAME_KEY: c.name} for c in cases]


def load_network(network: nn.Module, weights: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Load a state dict (``weights_only=True``) into ``network``; return it on ``device`` in eval mode.

    Raises:
        UserError: the weights file is missing, unreadable, or does not fit the network.
    """
    path = Path(weights)
    if not path.is_file():
        raise UserError(f"{path}: no weights file; pass --bundle_root with the bundle folder")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for unsafe or corrupt files
        raise UserError(f"{path}: cannot load as weights only ({type(exc).__name__})") from None
    try:
        network.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"{path}: does not fit network_def ({str(exc).splitlines()[0]})") from None
    return network.to(device).eval()


class SaveMaskd(MapTransform):
    """Write a label map on the input scan's own grid, as ``unetpp3d infer`` does.

    The grid is the :class:`~unetpp3d.readers.Geometry` that :class:`~unetpp3d.readers.SitkReader`
    put in the image's meta dict (``"geometry"``); the array is written with
    :func:`unetpp3d.writer.write_mask` (atomic, compressed, exact size, spacing, origin and
    direction). Expects channel-first ``(1, x, y, z)`` label maps, i.e. after ``Invertd`` and
    ``AsDiscreted(argmax=True)``.

    Args:
        keys: label-map keys to write (one file each; a second key gets ``_<key>`` in its name).
        output_dir: folder receiving ``<case>.nii.gz``.
        meta_key: the key whose MetaTensor carries ``"geometry"`` and ``"filename_or_obj"``.
        name_key: the key holding the case name (from :func:`scan_datalist`); when absent the
            name comes from the file name, as in ``unetpp3d infer``.
        suffix: file suffix, ``.nii.gz`` by default.
        allow_missing_keys: don't raise when a key is absent.
    """

    def __init__(self, keys: KeysCollection, output_dir: str | os.PathLike, meta_key: str = IMAGE_KEY,
                 name_key: str = NAME_KEY, suffix: str = ".nii.gz", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir = Path(output_dir)
        self.meta_key, self.name_key, self.suffix = meta_key, name_key, suffix

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from unetpp3d.manifest import case_name
        from unetpp3d.readers import Geometry
        from unetpp3d.writer import write_mask

        d = dict(data)
        meta = getattr(d[self.meta_key], "meta", None) or {}
        if "geometry" not in meta:
            raise ValueError(f"{self.meta_key!r} has no 'geometry' in its meta dict; load it with "
                             "LoadImaged(reader=unetpp3d.readers.SitkReader())")
        geometry = Geometry.from_dict(meta["geometry"])
        name = d.get(self.name_key) or case_name(str(meta.get("filename_or_obj", "case")))
        keys = list(self.key_iterator(d))
        for key in keys:
            mask = d[key]
            mask = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask)
            if mask.ndim == 4 and mask.shape[0] == 1:
                mask = mask[0]
            path = self.output_dir / f"{name}{'' if len(keys) == 1 else '_' + str(key)}{self.suffix}"
            write_mask(mask, geometry, path)
            log.info("%s: wrote %s", name, path)
        return d


class BundleEvaluator:
    """The inference loop ``inference.json`` runs: windows, then post-processing per case.

    Takes the arguments of MONAI's ``SupervisedEvaluator`` that inference uses (which needs
    pytorch-ignite), so a bundle user with ignite installed can swap it in.

    Args:
        device: where the batches go.
        val_data_loader: yields preprocessed batches with ``"image"``.
        network: returns what ``postprocessing`` expects (here class probabilities).
        inferer: called as ``inferer(image, network)``, e.g. ``SlidingWindowInferer``.
        postprocessing: applied to each case's dict (``"image"``, ``"pred"`` and the rest of
            the data dict), e.g. ``Invertd``, ``AsDiscreted``, post-processing, :class:`SaveMaskd`.
    """

    def __init__(self, device: str | torch.device, val_data_loader: Any, network: nn.Module, inferer: Any,
                 postprocessing: Any = None) -> None:
        self.device = torch.device(device)
        self.val_data_loader = val_data_loader
        self.network = network
        self.inferer = inferer
        self.postprocessing = postprocessing

    @torch.no_grad()
    def run(self) -> int:
        """Segment every case; return how many were done."""
        from monai.data import decollate_batch

        self.network.eval()
        done = 0
        for batch in self.val_data_loader:
            preds = self.inferer(batch[IMAGE_KEY].to(self.device), self.network)
            for item, pred in zip(decollate_batch(batch), decollate_batch(preds)):
                item[PRED_KEY] = pred
                if self.postprocessing is not None:
                    self.postprocessing(item)
                done += 1
        log.info("segmented %d case(s)", done)
        return done


# --------------------------------------------------------------------------------------------
# Generating inference.json and metadata.json
# --------------------------------------------------------------------------------------------


def preprocessing_specs(prep: Preprocessing) -> list[dict[str, Any]]:
    """``transforms.inference_transforms(prep)`` as ``_target_`` specs for a bundle config."""
    from unetpp3d import transforms as T

    spacing, (low, high), mean_std, _ = T._checked(prep)
    keys = [IMAGE_KEY]
    specs: list[dict[str, Any]] = [
        {"_target_": "LoadImaged", "keys": keys, "reader": {"_target_": "unetpp3d.readers.SitkReader"},
         "image_only": True, "ensure_channel_first": True},
        {"_target_": "EnsureTyped", "keys": keys, "dtype": "float32"},
        {"_target_": "Orientationd", "keys": keys, "axcodes": prep.orientation,
         "labels": [["L", "R"], ["P", "A"], ["I", "S"]]},
        {"_target_": "Spacingd", "keys": keys, "pixdim": spacing, "mode": ["bilinear"]},
    ]
    if prep.crop_foreground:
        specs.append({"_target_": "CropForegroundd", "keys": keys, "source_key": IMAGE_KEY,
                      "select_fn": {"_target_": "unetpp3d.transforms.BodyMask", "threshold_hu": prep.body_threshold_hu},
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
            {"_target_": "unetpp3d.postprocess.FillForegroundHolesd", "keys": PRED_KEY, "labels": labels,
             "value": labels[0]},
        ]
    elif prep.task == "liver":
        specs += [
            {"_target_": "KeepLargestConnectedComponentd", "keys": PRED_KEY, "applied_labels": labels,
             "is_onehot": False, "independent": True},
            {"_target_": "FillHolesd", "keys": PRED_KEY, "applied_labels": labels, "connectivity": 1},
        ]
    elif prep.task == "lung_nodule":
        specs.append({"_target_": "unetpp3d.postprocess.RemoveSmallComponentsd", "keys": PRED_KEY,
                      "min_ml": float(min_component_ml), "labels": labels})
    else:
        raise UserError(f"preprocessing.task {prep.task!r}: no post-processing known; expected liver or lung_nodule")
    specs.append({"_target_": "unetpp3d.bundle.SaveMaskd", "keys": PRED_KEY, "output_dir": "@output_dir",
                  "meta_key": IMAGE_KEY, "name_key": NAME_KEY})
    return specs


def inference_config(predictor: Any) -> dict[str, Any]:
    """``configs/inference.json`` for a :class:`~unetpp3d.predictor.Predictor` in accurate mode without TTA.

    Args:
        predictor: built from the checkpoint (its preprocessing, window size, overlap, batch
            size and minimum nodule volume are the ones written).
    """
    from unetpp3d import transforms as T

    prep = predictor.prep
    return {
        "bundle_root": ".",
        "dataset_dir": "$@bundle_root + '/data'",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": "unetpp3d.network.UNetPlusPlus3D", **predictor.network.model_args},
        "network": {"_target_": "unetpp3d.bundle.load_network", "network": "@network_def",
                    "weights": "$@bundle_root + '/models/model.pt'", "device": "@device"},
        # Softmax per window (and the 8-flip average with tta), so windows blend probabilities as in `infer`.
        "window_network": {"_target_": "unetpp3d.predictor.ProbabilityNet", "net": "@network", "tta": False,
                           "prune_level": None, "amp": True},
        "datalist": {"_target_": "unetpp3d.bundle.scan_datalist", "dataset_dir": "@dataset_dir"},
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing_specs(prep)},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [int(v) for v in predictor.roi_size],
                    "sw_batch_size": predictor.sw_batch_size, "overlap": predictor.overlap, "mode": "gaussian",
                    "padding_mode": "constant", "cval": T.pad_value(prep), "progress": False},
        "postprocessing": {"_target_": "Compose",
                           "transforms": postprocessing_specs(prep, predictor.min_component_ml)},
        "evaluator": {"_target_": "unetpp3d.bundle.BundleEvaluator", "device": "@device",
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

    from unetpp3d.predictor import BUNDLE_METADATA_KEY, bundle_metadata

    prep = predictor.prep
    args = predictor.network.model_args
    labels = {str(k): str(v) for k, v in prep.labels.items()}
    targets = ", ".join(v for k, v in labels.items() if int(k) != 0)
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
                        f"to the body (HU > {prep.body_threshold_hu:g}), clipped to [{low:g}, {high:g}] HU and "
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


# --------------------------------------------------------------------------------------------
# The check that inference.json rebuilds what `unetpp3d infer` runs
# --------------------------------------------------------------------------------------------

# Attributes that say where or how visibly a transform runs, not what it computes.
_RUNTIME_ATTRS = {"sw_device", "device", "progress"}


def _state(obj: Any, depth: int = 0) -> Any:
    """A comparable picture of what an object computes: plain values, recursing into ``__dict__``."""
    if depth > 12:
        return type(obj).__qualname__
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (torch.dtype, np.dtype)):
        return str(obj).replace("torch.", "")
    if isinstance(obj, (np.ndarray, np.generic, torch.Tensor)):
        return np.asarray(obj.detach().cpu() if isinstance(obj, torch.Tensor) else obj).tolist()
    if isinstance(obj, (list, tuple)):
        return [_state(v, depth + 1) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): _state(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, type) or not hasattr(obj, "__dict__"):
        return getattr(obj, "__qualname__", repr(obj))
    return {"class": f"{type(obj).__module__}.{type(obj).__qualname__}",
            **{k: _state(v, depth + 1) for k, v in vars(obj).items() if k not in _RUNTIME_ATTRS}}


def _first_difference(a: Any, b: Any, where: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{where}.{k}: only in {'the bundle' if k in a else 'the predictor'}"
            found = _first_difference(a[k], b[k], f"{where}.{k}")
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{where}: {len(a)} items in the bundle, {len(b)} in the predictor"
        for i, (x, y) in enumerate(zip(a, b)):
            found = _first_difference(x, y, f"{where}[{i}]")
            if found:
                return found
        return None
    if isinstance(a, float) or isinstance(b, float):
        numbers = isinstance(a, (int, float)) and isinstance(b, (int, float))
        same = numbers and (math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) or (math.isnan(a) and math.isnan(b)))
    else:
        same = a == b
    return None if same else f"{where}: {a!r} in the bundle, {b!r} in the predictor"


def _check_matches_predictor(config: dict[str, Any], predictor: Any) -> None:
    """Instantiate the generated pipeline and compare it with the predictor's own objects."""
    from monai.bundle import ConfigParser

    parser = ConfigParser({**config, "bundle_root": "."})
    preprocessing = parser.get_parsed_content("preprocessing").transforms
    post = parser.get_parsed_content("postprocessing").transforms[2:-1]  # between argmax and the writer
    pairs = [("preprocessing", preprocessing, predictor.transforms.transforms),
             ("postprocessing", post, predictor.postprocess_transforms(PRED_KEY)),
             ("inferer", parser.get_parsed_content("inferer"), predictor.inferer("cpu"))]
    for name, ours, theirs in pairs:
        found = _first_difference(_state(ours), _state(theirs), name)
        if found:
            raise RuntimeError(f"the generated inference.json no longer matches what `unetpp3d infer` runs ({found}); "
                               "update unetpp3d/bundle.py to follow unetpp3d/transforms.py and postprocess.py")


def _check_plain_strings(obj: Any, where: str) -> None:
    """MONAI's ConfigParser reads strings starting with $, @ or % as code, references or macros."""
    if isinstance(obj, str):
        if obj[:1] in ("$", "@", "%"):
            raise UserError(f"{where}: {obj!r} starts with {obj[0]!r}, which MONAI bundle configs read as code or a "
                            "reference; rename it in the model's config before exporting")
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            _check_plain_strings(str(k), where)
            _check_plain_strings(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain_strings(v, f"{where}[{i}]")


# --------------------------------------------------------------------------------------------
# README, licence, TorchScript
# --------------------------------------------------------------------------------------------


def _validation_rows(source: Path) -> list[dict[str, str]]:
    """Rows of the run's metrics.csv (beside the checkpoint) that have a validation score."""
    path = source.parent / "metrics.csv"
    if not path.is_file():
        return []
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return [r for r in csv.DictReader(fh) if r.get("val_dice")]
    except (OSError, csv.Error, UnicodeDecodeError):
        return []


def _readme(payload: dict[str, Any], predictor: Any, meta: dict[str, Any], source: Path) -> str:
    prep = predictor.prep
    cfg = payload.get("config") or {}
    train, data = cfg.get("train") or {}, cfg.get("data") or {}
    args = predictor.network.model_args
    targets = meta["task"].replace(" segmentation in CT", "")
    best = payload.get("best_metric")
    has_best = isinstance(best, (int, float)) and best >= 0
    split = payload.get("split") or {}
    lines = [
        f"# {meta['name']}",
        "",
        f"A 3D UNet++ that segments **{targets}** in CT scans, exported from `{source.parent.name}/{source.name}` "
        "by unetpp3d "
        f"{_version('unetpp3d')}.",
        "",
        "> **Research use only.** " + INTENDED_USE[len("Research only. "):],
        "",
        "## What it segments",
        "",
        "| label | class |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in prep.labels.items()],
        "",
        "Post-processing: " + ("largest connected component of the foreground (all labels together, each voxel "
                               "keeping its label), enclosed background filled as the first label."
                               if prep.task == "liver" and prep.num_classes > 2 else
                               "largest connected component of each label, enclosed holes filled."
                               if prep.task == "liver" else
                               f"components smaller than {predictor.min_component_ml:g} mL removed."),
        "",
        "## How it was trained",
        "",
        f"- network: UNet++ with features {args['features']}, strides {args['strides']}, {args['norm']} norm, "
        f"{args['act']}, deep supervision {'on' if args['deep_supervision'] else 'off'}",
        f"- input: reoriented to {prep.orientation}, resampled to {prep.target_spacing} mm, "
        + ("cropped to the body, " if prep.crop_foreground else "")
        + f"clipped to {prep.intensity_range} HU, z-scored with mean/std {prep.intensity_stats}",
        f"- patches of {prep.patch_size} voxels"
        + (f", batch size {data['batch_size']}" if data.get("batch_size", "auto") != "auto" else ""),
    ]
    if train:
        lines.append(f"- {train.get('epochs')} epochs of {train.get('iterations_per_epoch')} iterations, "
                     f"{train.get('optimizer')} lr {train.get('lr')} ({train.get('schedule')} schedule), "
                     f"loss {train.get('loss')}, seed {train.get('seed')}")
    lines.append(f"- this checkpoint: epoch {payload.get('epoch', 'unknown')}")
    if split:
        lines.append(f"- cases: {len(split.get('training') or [])} training, "
                     f"{len(split.get('validation') or [])} validation")
    lines += ["", "## Validation", ""]
    if has_best:
        lines.append(f"Best mean validation Dice: **{best:.4f}** (the run's validation cases, whole volumes, "
                     "before post-processing).")
    else:
        lines.append("No validation score was recorded for this checkpoint.")
    rows = _validation_rows(source)
    if rows:
        best_row = max(rows, key=lambda r: float(r["val_dice"]) if r["val_dice"] else -1.0)
        cols = [c for c in best_row if c.startswith("dice_") or c in ("epoch", "val_dice")]
        lines += ["", "Best validated epoch in `metrics.csv`:", "",
                  "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols),
                  "| " + " | ".join(best_row[c] for c in cols) + " |"]
    lines += [
        "",
        "Figures from one run's own validation split; they say nothing about other scanners, protocols or "
        "populations.",
        "",
        "## Limitations",
        "",
        LIMITATIONS,
        "",
        "## How to run it",
        "",
        "With MONAI alone (unetpp3d must be installed, since the configs name its network and transforms):",
        "",
        "```bash",
        "python -m monai.bundle run --config_file BUNDLE/configs/inference.json --bundle_root BUNDLE \\",
        "    --dataset_dir SCANS --output_dir MASKS",
        "```",
        "",
        "`SCANS` holds NIfTI/NRRD/MHA files or DICOM series folders; each mask is written as "
        "`MASKS/<case>.nii.gz` on its scan's own grid. Test-time augmentation: add `--window_network#tta True`; "
        "the faster pruned network: `--window_network#prune_level 2`. Like `unetpp3d infer`, windows run in bf16 on GPUs "
        "and on CPUs that compute bf16 natively; `--window_network#amp False` keeps fp32. A DICOM folder holding several series: "
        "`--preprocessing#transforms#0#reader#series_uid UID`.",
        "",
        "With unetpp3d (also writes nodule reports and previews):",
        "",
        "```bash",
        "unetpp3d infer SCANS --out MASKS --model BUNDLE",
        "```",
        "",
        "`models/model.ts` is the network alone, traced with TorchScript in eval mode: input "
        f"`(B, {args['in_channels']}, x, y, z)` preprocessed as above, each size a multiple of "
        f"{list(predictor.network.size_divisor)}; output the mean of the heads' logits "
        f"`(B, {args['out_channels']}, x, y, z)`.",
        "",
        "## Licence",
        "",
        "See `LICENSE`.",
        "",
    ]
    return "\n".join(lines)


# configs/logging.conf, which MONAI's runner applies: the cases written are logged to the console.
LOGGING_CONF = """\
[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""

LICENSE_TEXT = """\
Licence notice

The weights in models/ and the configuration in configs/ are made available under the Apache
License, Version 2.0, unless the model's author states otherwise. You may obtain a copy of the
licence at https://www.apache.org/licenses/LICENSE-2.0

Unless required by applicable law or agreed to in writing, this bundle is distributed on an
"AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.

The code it runs (unetpp3d, MONAI, PyTorch) is under those projects' own licences. The data the
model was trained on may carry its own terms, which can restrict how the model may be used.

This model is for research only. It is not a medical device.
"""


def _torchscript(network: nn.Module, roi_size: Sequence[int], meta: dict[str, Any], inference: dict[str, Any],
                 path: Path) -> None:
    """Trace the network in eval mode on one window; store metadata.json and inference.json inside."""
    import warnings

    from monai.data import save_net_with_metadata

    network = network.eval()
    example = torch.zeros(1, int(network.model_args["in_channels"]), *(int(v) for v in roi_size))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on Python-side shape checks, which hold for any window
        traced = torch.jit.trace(network, example, check_trace=False)
    save_net_with_metadata(traced, str(path.with_suffix("")), include_config_vals=False, append_timestamp=False,
                           meta_values=meta, more_extra_files={"inference.json": json.dumps(inference).encode()})


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def _check_target(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; give a folder for the bundle")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out}: folder is not empty; pass --force to write the bundle into it, "
                        "or pick a new folder")


def _load_payload(model: Path) -> tuple[dict[str, Any], Path]:
    from unetpp3d.checkpoint import load_checkpoint, resolve_model_path

    ckpt = resolve_model_path(model)
    payload = load_checkpoint(ckpt)
    if "preprocessing" not in payload:
        raise UserError(f"{ckpt}: has no preprocessing, so the bundle's input pipeline is unknown; export a "
                        "checkpoint written by `unetpp3d train` (best.pt or last.pt)")
    return payload, ckpt


def _predictor(payload: dict[str, Any], ckpt: Path) -> Any:
    from unetpp3d.network import UNetPlusPlus3D
    from unetpp3d.predictor import Predictor

    try:
        net = UNetPlusPlus3D.from_checkpoint(payload)
        prep = Preprocessing.from_dict(payload["preprocessing"])
    except (TypeError, ValueError, RuntimeError, KeyError) as exc:
        raise UserError(f"{ckpt}: model arguments, weights or preprocessing do not fit ({exc})") from None
    infer = (payload.get("config") or {}).get("infer") or {}
    return Predictor(net, prep, device="cpu", amp=False, progress=False, source=str(ckpt),
                     overlap=float(infer.get("overlap", 0.5)), sw_batch_size=int(infer.get("sw_batch_size", 2)),
                     min_component_ml=float(infer.get("min_component_ml", 0.0)))


def export_bundle(model: str | os.PathLike, out: str | os.PathLike, force: bool = False) -> Path:
    """Write a trained model as a MONAI Bundle folder (``unetpp3d export-bundle``).

    The bundle is built in a temporary folder beside ``out`` and moved into place once
    complete. With ``force``, its files replace those of the same name in ``out``; other files
    there are left alone.

    Args:
        model: a checkpoint written by ``unetpp3d train`` or a run folder (its ``best.pt``, else ``last.pt``).
        out: the bundle folder; must be absent or empty unless ``force``.
        force: write into a non-empty folder.

    Returns:
        The bundle folder.

    Raises:
        UserError: the model cannot be loaded or lacks its preprocessing, or ``out`` is a file
            or a non-empty folder without ``force``.
    """
    out = Path(out)
    _check_target(out, force)
    payload, ckpt = _load_payload(Path(model))
    predictor = _predictor(payload, ckpt)
    inference = inference_config(predictor)
    meta = metadata_config(payload, predictor, ckpt)
    # Everything inference.json takes from the checkpoint is in the metadata too.
    _check_plain_strings({k: v for k, v in meta.items() if k != "schema"}, "metadata.json")
    _check_matches_predictor(inference, predictor)

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.part"  # mkdir, unlike mkdtemp, honours the umask
    stage.mkdir()
    try:
        for sub in ("configs", "models", "docs"):
            (stage / sub).mkdir()
        (stage / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        (stage / "configs" / "inference.json").write_text(json.dumps(inference, indent=2) + "\n", encoding="utf-8")
        (stage / "configs" / "logging.conf").write_text(LOGGING_CONF, encoding="utf-8")
        torch.save(predictor.network.state_dict(), stage / "models" / "model.pt")
        _torchscript(predictor.network, predictor.roi_size, meta, inference, stage / "models" / "model.ts")
        (stage / "docs" / "README.md").write_text(_readme(payload, predictor, meta, ckpt), encoding="utf-8")
        (stage / "LICENSE").write_text(LICENSE_TEXT, encoding="utf-8")
        if not out.exists():
            os.replace(stage, out)
        else:
            for path in sorted(p for p in stage.rglob("*") if p.is_file()):
                target = out / path.relative_to(stage)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    log.info("bundle written to %s", out)
    return out


# --------------------------------------------------------------------------------------------
# Offline metadata check
# --------------------------------------------------------------------------------------------


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
