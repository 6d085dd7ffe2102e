"""Components that an exported bundle's ``inference.json`` names; they run inside ``python -m monai.bundle run``."""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import decollate_batch
from monai.transforms import MapTransform
from torch import nn

from unetpp3d.data.manifest import case_name
from unetpp3d.data.transforms import IMAGE_KEY
from unetpp3d.errors import UserError
from unetpp3d.geometry import Geometry
from unetpp3d.imageio.writer import write_mask
from unetpp3d.inference.inputs import expand_inputs
from unetpp3d.inference.pipeline import PRED_KEY
from unetpp3d.model.checkpoint import load_state_dict

log = logging.getLogger("unetpp3d")


NAME_KEY = "name"


def scan_datalist(dataset_dir: str | os.PathLike) -> list[dict[str, str]]:
    """The cases of a folder (or manifest) as ``[{"image": path, "name": case}, ...]``.

    The same expansion and case names as ``unetpp3d infer FOLDER`` (image files and DICOM series
    folders directly inside it), so both write the same ``<case>.nii.gz`` files.

    Raises:
        UserError: the folder is missing, holds no scans, or holds inputs that cannot be read.
    """
    cases = expand_inputs([dataset_dir])
    bad = [c for c in cases if c.error]
    if bad:
        listed = "; ".join(f"{c.path}: {c.error}" for c in bad[:5])
        raise UserError(f"dataset_dir {dataset_dir}: {listed}; pass --dataset_dir with a folder of CT scans")
    return [{IMAGE_KEY: str(c.path), NAME_KEY: c.name} for c in cases]


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
    return network.to(device).eval()


class SaveMaskd(MapTransform):
    """Write a label map on the input scan's own grid, as ``unetpp3d infer`` does.

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
        meta = getattr(d[self.meta_key], "meta", None) or {}
        if "geometry" not in meta:
            raise ValueError(f"{self.meta_key!r} has no 'geometry' in its meta dict; load it with "
                             "LoadImaged(reader=unetpp3d.imageio.readers.SitkReader())")
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
