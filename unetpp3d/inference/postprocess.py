"""Clean-up of predicted label maps on the input's own grid: NumPy functions and MONAI dict transforms.

* **Liver**: keep the largest connected component (26-connectivity) of the liver label and fill
  its enclosed holes (background 6-connectivity, the topological dual of a 26-connected object),
  so that a vessel enclosed by liver is counted as liver. With several foreground labels (MSD
  Task03: 1 liver, 2 tumour) the same is done to their *union*: the largest component of liver
  and tumour together is kept with each voxel's own label (a patient may have many tumours, and
  a per-label largest component would keep one), and background it encloses becomes liver (a
  per-label hole filling would turn every tumour inside the liver into liver).
* **Lung nodules**: drop connected components smaller than ``min_component_ml`` and describe each
  remaining one: centre in world LPS millimetres (the DICOM/ITK patient coordinates that
  SimpleITK reports), volume in mL, longest diameter in mm and mean predicted probability.

Which task gets which clean-up is :mod:`unetpp3d.tasks`' table; the predictor and a bundle run
the steps as MONAI dictionary transforms listed by :func:`unetpp3d.inference.pipeline.cleanup_specs`:
MONAI's ``KeepLargestConnectedComponentd`` and :class:`FillForegroundHolesd` for the liver, and
:class:`RemoveSmallComponentsd` for nodules. The NumPy functions below are what those transforms
compute (:func:`largest_component_filled` is the liver's whole clean-up on an array).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import KeepLargestConnectedComponent, MapTransform
from scipy import ndimage

# 26-connectivity for objects, 6-connectivity for the background they enclose.
_OBJECT_STRUCTURE = ndimage.generate_binary_structure(3, 3)


_HOLE_STRUCTURE = ndimage.generate_binary_structure(3, 1)


# Up to this many surface points, compare every pair; beyond it, only the convex hull's vertices.
_PAIRWISE_LIMIT = 2500


def _foreground_labels(mask: np.ndarray, labels: Iterable[int] | None) -> list[int]:
    if labels is None:
        return [int(v) for v in np.unique(mask) if v != 0]
    return [int(v) for v in labels if int(v) != 0]


def keep_largest_component(mask_xyz: np.ndarray, labels: Iterable[int] | None = None,
                           independent: bool = True) -> np.ndarray:
    """Keep only the largest 26-connected component of each foreground label, or of their union.

    Args:
        mask_xyz: integer label map (x, y, z).
        labels: the labels to clean (default: every non-zero label present).
        independent: True: each label's own largest component. False: the largest component of
            the union of ``labels``, each voxel keeping its label (MONAI's ``independent=False``).

    Returns:
        A new label map of the same shape and dtype; other labels are left untouched.
    """
    applied = _foreground_labels(mask_xyz, labels)
    if not applied:
        return mask_xyz.copy()
    keep = KeepLargestConnectedComponent(applied_labels=applied, is_onehot=False, independent=independent,
                                         connectivity=None)
    out = keep(torch.as_tensor(np.ascontiguousarray(mask_xyz))[None])
    return np.asarray(out[0]).astype(mask_xyz.dtype, copy=False)


def fill_holes(mask_xyz: np.ndarray, labels: Iterable[int] | None = None) -> np.ndarray:
    """Fill the enclosed holes of each foreground label.

    A hole is a 6-connected region of voxels not of that label that does not reach the array's
    border; it is set to the label. This is MONAI's ``FillHoles(connectivity=1)``, computed on
    each label's bounding box with one connected-component pass instead of MONAI's iterated
    dilation, which takes minutes on a 512x512x600 scan.

    Args:
        mask_xyz: integer label map (x, y, z).
        labels: the labels whose holes to fill (default: every non-zero label present).
    """
    out = mask_xyz.copy()
    for label in _foreground_labels(mask_xyz, labels):
        _fill_enclosed(out, out == label, label)
    return out


def fill_foreground_holes(mask_xyz: np.ndarray, labels: Iterable[int], value: int) -> np.ndarray:
    """Set the voxels enclosed by the union of ``labels`` (holes as in :func:`fill_holes`) to ``value``.

    Voxels of ``labels`` keep their own label: a tumour inside the liver stays a tumour, while
    background enclosed by liver and tumour together becomes ``value`` (the liver).
    """
    out = mask_xyz.copy()
    _fill_enclosed(out, np.isin(out, [int(v) for v in labels]), value)
    return out


def _fill_enclosed(out: np.ndarray, binary: np.ndarray, value: int) -> None:
    """In place: voxels outside ``binary`` that it encloses become ``value``, working on its bounding box."""
    box = _bounding_box(binary, margin=1)
    if box is None:
        return
    inside = binary[box]
    # Pad by one voxel of "outside" so that background touching the array border (or the box
    # border, where the box was clipped by the array) is connected to the outside.
    components, _ = ndimage.label(np.pad(~inside, 1, constant_values=True), structure=_HOLE_STRUCTURE)
    holes = (components[1:-1, 1:-1, 1:-1] != components[0, 0, 0]) & ~inside
    out[box][holes] = value


def largest_component_filled(mask_xyz: np.ndarray, labels: Iterable[int] | None = None) -> np.ndarray:
    """The liver post-processing: the largest connected component, holes filled.

    With one foreground label, its largest component with its holes filled. With several (liver
    and tumour), the largest component of their union, each voxel keeping its label, and the
    background that union encloses set to the first label (the organ); see the module docstring.

    Args:
        mask_xyz: integer label map (x, y, z).
        labels: foreground labels to clean (default: every non-zero label present); the first
            (smallest) one is the organ.

    Returns:
        The cleaned label map (a new array).
    """
    applied = sorted(_foreground_labels(mask_xyz, labels))
    if len(applied) <= 1:
        return fill_holes(keep_largest_component(mask_xyz, applied), applied)
    return fill_foreground_holes(keep_largest_component(mask_xyz, applied, independent=False), applied, applied[0])


def _bounding_box(binary: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    if not binary.any():
        return None
    box = []
    for axis in range(binary.ndim):
        other = tuple(a for a in range(binary.ndim) if a != axis)
        idx = np.flatnonzero(binary.any(axis=other))
        box.append(slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + 1 + margin, binary.shape[axis])))
    return tuple(box)


def _voxel_ml(spacing: Sequence[float]) -> float:
    return float(np.prod([float(s) for s in spacing])) / 1000.0


def remove_small_components(mask_xyz: np.ndarray, spacing: Sequence[float], min_ml: float,
                            labels: Iterable[int] | None = None) -> np.ndarray:
    """Set to background every 26-connected component smaller than ``min_ml`` millilitres.

    Components of at least ``min_ml`` are kept, so ``min_ml = 0`` keeps everything.

    Args:
        mask_xyz: integer label map (x, y, z).
        spacing: voxel size in mm, (x, y, z).
        min_ml: the smallest volume kept, in mL.
        labels: labels to filter (default: every non-zero label present).
    """
    out = mask_xyz.copy()
    if min_ml <= 0:
        return out
    min_voxels = min_ml / _voxel_ml(spacing)
    for label in _foreground_labels(mask_xyz, labels):
        components, n = ndimage.label(out == label, structure=_OBJECT_STRUCTURE)
        if n == 0:
            continue
        sizes = np.bincount(components.ravel())
        # A small tolerance so that a component of exactly min_ml survives float rounding.
        small = sizes < min_voxels * (1 - 1e-9)
        small[0] = False
        out[small[components]] = 0
    return out


def _on_first_channel(img: Any, fn: Callable[[np.ndarray], np.ndarray]) -> Any:
    """``fn`` applied to channel 0 of a channel-first label map, returned as the input came: a
    tensor (a MetaTensor keeps its metadata, dtype and device) or a NumPy array."""
    arr = np.asarray(img.detach().cpu() if isinstance(img, torch.Tensor) else img)
    out = fn(arr[0])[None]
    if not isinstance(img, torch.Tensor):
        return out
    new = img.clone()
    new[...] = torch.as_tensor(out, dtype=img.dtype, device=img.device)
    return new


class RemoveSmallComponentsd(MapTransform):
    """MONAI dictionary transform wrapping :func:`remove_small_components`.

    The voxel size comes from each item's ``MetaTensor.pixdim``, so it must run on label maps
    that carry their affine (for example after ``Invertd``), channel first ``(1, x, y, z)``.

    Args:
        keys: keys of the label maps to filter.
        min_ml: the smallest component volume kept, in mL.
        labels: labels to filter (default: every non-zero label present).
        allow_missing_keys: don't raise when a key is absent.
    """

    def __init__(self, keys: KeysCollection, min_ml: float, labels: Sequence[int] | None = None,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.min_ml = float(min_ml)
        self.labels = None if labels is None else [int(v) for v in labels]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            spacing = [float(s) for s in img.pixdim] if hasattr(img, "pixdim") else [1.0, 1.0, 1.0]
            d[key] = _on_first_channel(img, lambda m: remove_small_components(m, spacing, self.min_ml, self.labels))
        return d


class FillForegroundHolesd(MapTransform):
    """MONAI dictionary transform wrapping :func:`fill_foreground_holes` (channel-first label maps).

    Args:
        keys: keys of the label maps to fill.
        labels: the labels whose union encloses the holes.
        value: the label the holes get.
        allow_missing_keys: don't raise when a key is absent.
    """

    def __init__(self, keys: KeysCollection, labels: Sequence[int], value: int,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.labels = [int(v) for v in labels]
        self.value = int(value)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = _on_first_channel(d[key], lambda m: fill_foreground_holes(m, self.labels, self.value))
        return d
