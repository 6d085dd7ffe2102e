"""Components that an exported bundle's ``inference.json`` names; they run inside ``python -m monai.bundle run``.

The writer is MONAI's own ``SaveImaged`` (so that MONAI Label's post-filters, which drop it,
apply), given :class:`CaseNames` to name each file as ``unetpp3d infer`` does and
:class:`AtomicNibabelWriter` to write it atomically. :class:`SaveMaskd`, the writer of bundles
exported before, stays importable so that their ``inference.json`` still runs.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import NibabelWriter, decollate_batch
from monai.transforms import MapTransform
from torch import nn

from unetpp3d.atomic import atomic_path
from unetpp3d.data.manifest import case_name
from unetpp3d.data.transforms import IMAGE_KEY
from unetpp3d.errors import UserError
from unetpp3d.geometry import Geometry
from unetpp3d.imageio.writer import write_mask
from unetpp3d.inference.inputs import expand_inputs
from unetpp3d.inference.nodules import nodule_components, write_nodule_report
from unetpp3d.inference.pipeline import PRED_KEY
from unetpp3d.inference.predictor import complete_probabilities
from unetpp3d.model.checkpoint import load_state_dict
from unetpp3d.model.network import on_device

log = logging.getLogger("unetpp3d")


NAME_KEY = "name"
PROB_KEY = "prob"  # the class probabilities on the scan's grid, kept for the nodule report

# A dataset root as the zoo's configs take it (``@dataset_dir/imagesTs/*.nii.gz``): its test scans.
TEST_IMAGES = "imagesTs"


def scan_datalist(dataset_dir: str | os.PathLike) -> list[dict[str, str]]:
    """The cases of a folder (or manifest) as ``[{"image": path, "name": case}, ...]``.

    The same expansion and case names as ``unetpp3d infer FOLDER`` (image files and DICOM series
    folders directly inside it), so both write the same ``<case>.nii.gz`` files. A dataset root
    holding ``imagesTs/`` (the MSD and nnU-Net layout, as the zoo's bundles take
    ``dataset_dir``) gives the scans in ``imagesTs/``.

    Raises:
        UserError: the folder is missing, holds no scans, or holds inputs that cannot be read.
    """
    folder = Path(dataset_dir)
    if (folder / TEST_IMAGES).is_dir():
        log.info("dataset_dir %s: segmenting the scans in its %s/", folder, TEST_IMAGES)
        folder = folder / TEST_IMAGES
    cases = expand_inputs([folder])
    bad = [c for c in cases if c.error]
    if bad:
        listed = "; ".join(f"{c.path}: {c.error}" for c in bad[:5])
        raise UserError(f"dataset_dir {dataset_dir}: {listed}; pass --dataset_dir with a folder of CT scans "
                        f"(or a dataset root holding {TEST_IMAGES}/)")
    return [{IMAGE_KEY: str(c.path), NAME_KEY: c.name} for c in cases]


class CaseNames:
    """``SaveImaged``'s ``output_name_formatter``: each file named after its case, as ``unetpp3d infer`` names it.

    MONAI names an output after its input file (``dicom.nii.gz`` for a series in ``case7/dicom``);
    this looks the input up in the datalist of :func:`scan_datalist`, whose names are those of
    ``unetpp3d infer`` (``case7``, parent folders added where names collide). An input not in the
    datalist (another caller's data) is named after its file, as MONAI would.

    Args:
        datalist: ``[{"image": path, "name": case}, ...]``.
    """

    def __init__(self, datalist: Sequence[Mapping[str, str]]) -> None:
        self.names = {os.path.realpath(d[IMAGE_KEY]): d[NAME_KEY] for d in datalist if NAME_KEY in d}

    def name(self, meta: Mapping[str, Any]) -> str:
        """The case name of the input that ``meta["filename_or_obj"]`` names."""
        source = str(meta.get("filename_or_obj", "case"))
        return self.names.get(os.path.realpath(source)) or case_name(source)

    def __call__(self, metadict: Mapping[str, Any], saver: Any = None) -> dict[str, Any]:
        return {"subject": self.name(metadict), "idx": None}


class AtomicNibabelWriter(NibabelWriter):
    """MONAI's ``NibabelWriter``, writing to a temporary file that is renamed into place once complete.

    A run killed mid-write leaves no truncated mask under the case's name (the project's rule
    for every write, :mod:`unetpp3d.atomic`). Grid and voxels are NibabelWriter's own: on an
    axis-permuted scan, an oblique one and a DICOM series they equal what :class:`SaveMaskd` and
    ``unetpp3d infer`` write (tests/test_bundle.py).
    """

    def write(self, filename: str | os.PathLike, verbose: bool = False, **obj_kwargs: Any) -> None:
        with atomic_path(filename) as tmp:
            super().write(tmp, verbose=False, **obj_kwargs)
        log.info("wrote %s", filename)


def one_line_user_errors() -> None:
    """Report an uncaught exception that a :class:`UserError` caused as that error's one line.

    MONAI's config runner wraps what a component raises in ``RuntimeError`` s, so a user's
    mistake (an empty ``dataset_dir``) would end ``python -m monai.bundle run`` with some 65
    lines of traceback around the one that says what to do. Each config's ``initialize`` calls
    this: it changes only how Python reports an exception that ends the process
    (``sys.excepthook``; the exit status stays 1), so a caller that runs the workflow in its own
    process still gets the exception. Exceptions without a UserError among their causes keep
    their full traceback.
    """
    previous = sys.excepthook
    if getattr(previous, "reports_user_errors", False):
        return

    def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        cause = _user_error_in(exc)
        if cause is None:
            previous(exc_type, exc, tb)
        else:
            sys.stderr.write(f"error: {cause}\n")

    hook.reports_user_errors = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def _user_error_in(exc: BaseException | None) -> UserError | None:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def load_network(network: nn.Module, weights: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Load a state dict into ``network`` (:func:`~unetpp3d.model.checkpoint.load_state_dict`, weights only); return it on ``device`` in eval mode.

    Raises:
        UserError: the weights file is missing, unreadable, or does not fit the network.
    """
    path = Path(weights)
    if not path.is_file():
        raise UserError(f"{path}: no weights file; pass --bundle_root with the bundle folder")
    state = load_state_dict(path)
    try:
        network.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"{path}: does not fit network_def ({str(exc).splitlines()[0]})") from None
    return on_device(network, device).eval()


class NoduleReportd(MapTransform):
    """Measure the nodules of a lung-nodule label map and write ``<case>.nodules.json`` and ``.csv``.

    The same measurement (:func:`~unetpp3d.inference.nodules.nodule_components`) and report
    (:func:`~unetpp3d.inference.nodules.write_nodule_report`) as ``unetpp3d infer``; a bundle
    lists this step when its task's rules ask for a report (:func:`unetpp3d.tasks.task_rules`).
    Expects the cleaned-up ``(1, x, y, z)`` label map under ``keys`` and the class probabilities
    on the same grid under ``prob_key`` (copied before ``AsDiscreted``), which it then drops.

    Args:
        keys: the label-map key.
        output_dir: the folder the masks go to; the reports go beside them.
        names: the case names the masks are written under (:class:`CaseNames`).
        prob_key: the probabilities' key; without it the report's mean probability is empty.
        meta_key: the key whose MetaTensor carries ``"geometry"`` and ``"filename_or_obj"``.
        min_component_ml: the size filter the clean-up applied, recorded in the report.
        allow_missing_keys: don't raise when a key is absent.
    """

    def __init__(self, keys: KeysCollection, output_dir: str | os.PathLike, names: CaseNames,
                 prob_key: str = PROB_KEY, meta_key: str = IMAGE_KEY, min_component_ml: float = 0.0,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir, self.names = Path(output_dir), names
        self.prob_key, self.meta_key, self.min_component_ml = prob_key, meta_key, float(min_component_ml)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        meta = _geometry_meta(d, self.meta_key)
        geometry = Geometry.from_dict(meta["geometry"])
        probs = d.pop(self.prob_key, None)  # as large as the scan several times: not kept past here
        # Completed as the predictor completes them (zero outside the body crop after Invertd), so the
        # report's mean probability is the one `unetpp3d infer` writes.
        probs = None if probs is None else complete_probabilities(_numpy(probs).astype(np.float32, copy=False))
        name = self.names.name(meta)
        for key in self.key_iterator(d):
            mask = _numpy(d[key])
            mask = (mask[0] if mask.ndim == 4 else mask).astype(np.uint8, copy=False)
            # Measurement only: the clean-up before this step dropped the small components.
            _, nodules = nodule_components(mask, geometry, probs)
            json_path, csv_path = (self.output_dir / f"{name}.nodules.{ext}" for ext in ("json", "csv"))
            write_nodule_report(nodules, json_path, csv_path, source=str(meta.get("filename_or_obj", "")),
                                min_volume_ml=self.min_component_ml)
            log.info("%s: %d nodule(s), wrote %s", name, len(nodules), json_path)
        return d


def _geometry_meta(d: Mapping[Hashable, Any], meta_key: str) -> Mapping[str, Any]:
    meta = getattr(d[meta_key], "meta", None) or {}
    if "geometry" not in meta:
        raise ValueError(f"{meta_key!r} has no 'geometry' in its meta dict; load it with "
                         "LoadImaged(reader=unetpp3d.imageio.readers.SitkReader())")
    return meta


def _numpy(x: Any) -> np.ndarray:
    return np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x)


class SaveMaskd(MapTransform):
    """Write a label map on the input scan's own grid, as ``unetpp3d infer`` does.

    The writer of bundles exported before their ``inference.json`` used MONAI's ``SaveImaged``
    (with :class:`CaseNames` and :class:`AtomicNibabelWriter`); kept so that those still run.

    The grid is the :class:`~unetpp3d.geometry.Geometry` that :class:`~unetpp3d.imageio.readers.SitkReader`
    put in the image's meta dict (``"geometry"``); the array is written with
    :func:`unetpp3d.imageio.writer.write_mask` (atomic, compressed, exact size, spacing, origin and
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
        d = dict(data)
        meta = _geometry_meta(d, self.meta_key)
        geometry = Geometry.from_dict(meta["geometry"])
        name = d.get(self.name_key) or case_name(str(meta.get("filename_or_obj", "case")))
        keys = list(self.key_iterator(d))
        for key in keys:
            mask = _numpy(d[key])
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
            the data dict), e.g. ``Invertd``, ``AsDiscreted``, post-processing, ``SaveImaged``.
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
