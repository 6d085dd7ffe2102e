"""The inference pipeline, described once: what the predictor runs and a bundle's ``inference.json`` lists.

Each stage is a list of ``{"_target_": ..., **arguments}`` specs, plain JSON that MONAI's
``ConfigParser`` instantiates:

* ``preprocessing``: :func:`unetpp3d.data.transforms.preprocessing_specs` on ``"image"``;
* the window network and the sliding-window inferer: :func:`window_network_args` and
  :func:`inferer_args` (arguments only, since their network and devices are objects);
* ``postprocessing``: :func:`postprocessing_specs`: ``Invertd`` back to the scan's grid (linear
  interpolation of the probabilities), ``AsDiscreted(argmax=True)``, then the task's clean-up
  (:func:`cleanup_specs`, chosen by :func:`unetpp3d.tasks.task_rules`).

:class:`~unetpp3d.inference.predictor.Predictor` instantiates :func:`pipeline_config` with
:func:`build_pipeline`; :mod:`unetpp3d.bundle.configs` writes the same dict into
``inference.json`` and adds only the bundle's reader of folders and its writer, so a bundle run
with ``python -m monai.bundle run`` computes what ``unetpp3d infer`` computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from monai.transforms import Compose, Invertd

from unetpp3d.config import Preprocessing
from unetpp3d.data.transforms import (
    IMAGE_KEY,
    instantiate,
    pad_value,
    preprocessing_specs,
)
from unetpp3d.inference.postprocess import FillForegroundHolesd, RemoveSmallComponentsd
from unetpp3d.tasks import task_rules

PRED_KEY = "pred"


_FILL_TARGET = f"{FillForegroundHolesd.__module__}.{FillForegroundHolesd.__qualname__}"
_REMOVE_TARGET = f"{RemoveSmallComponentsd.__module__}.{RemoveSmallComponentsd.__qualname__}"


def foreground_labels(prep: Preprocessing) -> list[int]:
    """The model's non-zero labels, ascending (the first is the organ for the liver task)."""
    return sorted(int(k) for k in prep.labels if int(k) != 0)


def cleanup_specs(task: str, labels: Sequence[int], min_component_ml: float = 0.0,
                  keys: str = PRED_KEY) -> list[dict[str, Any]]:
    """The task's clean-up of a channel-first ``(1, x, y, z)`` label map on the scan's grid, as specs.

    ``largest_component`` tasks (the liver): MONAI's ``KeepLargestConnectedComponentd`` on the
    union of the foreground labels (each voxel keeps its label, so every tumour inside the liver
    stays), then :class:`~unetpp3d.inference.postprocess.FillForegroundHolesd`: background that
    union encloses becomes the first label. With one label this is MONAI's ``FillHolesd`` with
    ``connectivity=1`` (a test checks it), computed on the label's bounding box, which takes
    seconds where MONAI's iterated dilation takes minutes on a 512x512x600 scan.
    ``min_volume`` tasks (lung nodules): :class:`~unetpp3d.inference.postprocess.RemoveSmallComponentsd`.

    Args:
        task: the model's task.
        labels: its foreground labels.
        min_component_ml: smallest component kept, in mL (``min_volume`` tasks).
        keys: the dictionary key of the label map.

    Raises:
        UserError: an unknown task.
    """
    applied = sorted(int(v) for v in labels if int(v) != 0)
    rules = task_rules(task)
    if rules.postprocessing == "largest_component":
        return [
            {"_target_": "KeepLargestConnectedComponentd", "keys": keys, "applied_labels": applied,
             "is_onehot": False, "independent": False},
            {"_target_": _FILL_TARGET, "keys": keys, "labels": applied, "value": applied[0] if applied else 1},
        ]
    return [{"_target_": _REMOVE_TARGET, "keys": keys, "min_ml": float(min_component_ml), "labels": applied}]


def postprocessing_specs(prep: Preprocessing, min_component_ml: float) -> list[dict[str, Any]]:
    """Everything after the windows, as specs: ``Invertd``, ``AsDiscreted(argmax=True)``, the task's clean-up.

    ``Invertd`` names its preprocessing as ``"@preprocessing"``: instantiate these inside a
    config holding that entry (:func:`pipeline_config`).
    """
    return [
        {"_target_": "Invertd", "keys": PRED_KEY, "transform": "@preprocessing", "orig_keys": IMAGE_KEY,
         "nearest_interp": False, "to_tensor": True},
        {"_target_": "AsDiscreted", "keys": PRED_KEY, "argmax": True},
        *cleanup_specs(prep.task, foreground_labels(prep), min_component_ml),
    ]


def pipeline_config(prep: Preprocessing, min_component_ml: float, series_uid: str | None = None) -> dict[str, Any]:
    """``{"preprocessing": Compose spec, "postprocessing": Compose spec}``: the pipeline a model runs.

    Args:
        prep: the model's preprocessing.
        min_component_ml: smallest component kept by a ``min_volume`` task, in mL.
        series_uid: the DICOM series to read from folders holding several.
    """
    return {
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing_specs(prep, (IMAGE_KEY,), series_uid)},
        "postprocessing": {"_target_": "Compose", "transforms": postprocessing_specs(prep, min_component_ml)},
    }


@dataclass
class Pipeline:
    """The instantiated stages of :func:`pipeline_config`.

    Attributes:
        preprocessing: the ``Compose`` whose trace ``invert`` undoes.
        invert: the ``Invertd`` step (first of ``postprocessing``).
        after_invert: the rest of ``postprocessing``: argmax and the task's clean-up.
    """

    preprocessing: Compose
    invert: Invertd
    after_invert: Compose


def build_pipeline(config: dict[str, Any]) -> Pipeline:
    """Instantiate a :func:`pipeline_config` with MONAI's ``ConfigParser``, as a bundle run does."""
    post = list(instantiate(config, "postprocessing").transforms)
    invert = post[0]
    if not isinstance(invert, Invertd):
        raise ValueError(f"postprocessing must start with Invertd, got {type(invert).__name__}")
    # Invertd's "@preprocessing" reference is the very Compose that ConfigParser built for the
    # "preprocessing" entry, so the inversion follows the transforms that ran.
    return Pipeline(preprocessing=invert.transform, invert=invert, after_invert=Compose(post[1:]))


def postprocess_transforms(task: str, labels: Sequence[int], min_component_ml: float = 0.0,
                           keys: str = PRED_KEY) -> list[Any]:
    """The task's clean-up (:func:`cleanup_specs`) instantiated: MONAI dictionary transforms."""
    return instantiate({"cleanup": cleanup_specs(task, labels, min_component_ml, keys)}, "cleanup")


def inferer_args(roi_size: Sequence[int], sw_batch_size: int, overlap: float, prep: Preprocessing) -> dict[str, Any]:
    """The arguments of the ``SlidingWindowInferer`` the predictor and a bundle run (Gaussian blending).

    Inputs smaller than a window are padded as training padded them: with the normalised value
    of the low end of the intensity clip (air), not 0, which is soft tissue after the z-score.
    """
    return {"roi_size": [int(v) for v in roi_size], "sw_batch_size": int(sw_batch_size), "overlap": float(overlap),
            "mode": "gaussian", "padding_mode": "constant", "cval": pad_value(prep)}


def window_network_args(tta: bool, prune_level: int | None, amp: bool) -> dict[str, Any]:
    """The arguments of the :class:`~unetpp3d.inference.windows.ProbabilityNet` each window goes through."""
    return {"tta": bool(tta), "prune_level": None if prune_level is None else int(prune_level), "amp": bool(amp)}
