"""Write masks, class probabilities (and synthetic images) on an exact voxel grid, atomically.

:func:`write_mask` is the inverse of :func:`unetpp3d.imageio.readers.read_image`: it takes an ``(x, y, z)``
array and the :class:`~unetpp3d.geometry.Geometry` it was computed on, and writes a file that
SimpleITK and nibabel both read back with that size, spacing, origin and direction. The file
appears under its final name only once complete (see :mod:`unetpp3d.atomic`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from unetpp3d.atomic import atomic_path
from unetpp3d.errors import UserError
from unetpp3d.geometry import Geometry

# .mhd is left out on purpose: it writes a second (.raw) file that one atomic rename cannot cover.
WRITE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")

# What `unetpp3d infer --output-type` writes each mask as, and the file suffixes it accepts
# (the first is the one a folder's ``<case>`` files get).
OUTPUT_TYPES: dict[str, tuple[str, ...]] = {
    "nifti": (".nii.gz", ".nii"),  # write_mask
    "dicom-seg": (".dcm",),  # unetpp3d.imageio.dicom_seg.write_dicom_seg
}


def _check_target(path: Path) -> None:
    if not path.name.lower().endswith(WRITE_SUFFIXES):
        raise UserError(f"{path}: cannot write this format; name the file .nii.gz (or {', '.join(WRITE_SUFFIXES[1:])})")
    if path.is_dir():
        raise UserError(f"{path}: is a folder; give a file name such as {path / 'mask.nii.gz'}")


def _check_shape(array: np.ndarray, geometry: Geometry, path: Path) -> None:
    if array.ndim != 3 or tuple(array.shape) != geometry.size:
        raise ValueError(f"{path}: array of shape {tuple(array.shape)} does not match the geometry's size "
                         f"{geometry.size} (both in (x, y, z) order)")


def _write(array_xyz: np.ndarray, geometry: Geometry, path: Path) -> Path:
    # SimpleITK takes (z, y, x) arrays; the transpose puts our (x, y, z) index order back.
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_xyz.transpose(2, 1, 0)))
    geometry.apply_to(image)
    with atomic_path(path) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), useCompression=True)
        except RuntimeError as exc:
            raise UserError(f"{path}: cannot write ({str(exc).strip().splitlines()[-1][:200]})") from None
    return path


def _label_dtype(mask: np.ndarray) -> type:
    if mask.size == 0:
        return np.uint8
    lo, hi = int(mask.min()), int(mask.max())
    if lo >= 0 and hi <= 255:
        return np.uint8
    if -32768 <= lo and hi <= 32767:
        return np.int16
    raise ValueError(f"label values {lo}..{hi} do not fit a 16-bit integer")


def write_mask(mask_xyz: np.ndarray, geometry: Geometry, path: str | Path) -> Path:
    """Write an integer label map on ``geometry``'s grid as a compressed file, atomically.

    Args:
        mask_xyz: labels in (x, y, z) index order, shaped ``geometry.size``; bool or whole-number
            values. Stored as ``uint8`` (values 0..255) or ``int16``.
        geometry: the grid of the image the mask was computed for.
        path: target file, ``.nii.gz`` (or ``.nii``, ``.nrrd``, ``.mha``); parent folders are
            created.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        UserError: unsupported suffix, or the file cannot be written.
        ValueError: the array does not match the geometry or holds non-integer values (a bug in
            the caller, not a user mistake).
    """
    path = Path(path)
    _check_target(path)
    mask = np.asarray(mask_xyz)
    _check_shape(mask, geometry, path)
    if mask.dtype == bool:
        mask = mask.astype(np.uint8)
    elif np.issubdtype(mask.dtype, np.floating):
        if not np.all(np.isfinite(mask)) or np.any(mask != np.round(mask)):
            raise ValueError(f"{path}: a mask must hold whole class numbers; round or argmax it first")
    elif not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"{path}: a mask must be integer or bool, got {mask.dtype}")
    return _write(mask.astype(_label_dtype(mask), copy=False), geometry, path)


def write_image(array_xyz: np.ndarray, geometry: Geometry, path: str | Path) -> Path:
    """Write an intensity image (e.g. a synthetic CT) on ``geometry``'s grid, atomically.

    Integer arrays keep their type (``int16`` HU stays ``int16``); floating arrays are stored as
    ``float32``; bool as ``uint8``.

    Args:
        array_xyz: voxels in (x, y, z) index order, shaped ``geometry.size``.
        geometry: the grid to write them on.
        path: target file, ``.nii.gz`` (or ``.nii``, ``.nrrd``, ``.mha``).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    _check_target(path)
    array = np.asarray(array_xyz)
    _check_shape(array, geometry, path)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating) and array.dtype != np.float32:
        array = array.astype(np.float32)
    elif not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.float32):
        raise ValueError(f"{path}: cannot write an image of type {array.dtype}")
    return _write(array, geometry, path)


def write_probabilities(probabilities: np.ndarray, geometry: Geometry, path: str | Path) -> Path:
    """Write class probabilities as one 4D float32 image on ``geometry``'s grid, atomically.

    The file is ``(x, y, z, class)``: nibabel reads it with that shape and the scan's affine,
    SimpleITK as a 4D image whose first three axes carry the scan's spacing, origin and direction.

    Args:
        probabilities: ``(C, x, y, z)``, one channel per class (background first), each channel
            shaped ``geometry.size``.
        geometry: the grid of the scan they were computed for.
        path: target file, ``.nii.gz`` (or ``.nii``, ``.nrrd``, ``.mha``); parent folders are created.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        UserError: unsupported suffix, or the file cannot be written.
        ValueError: the array is not ``(C, *geometry.size)`` (a bug in the caller).
    """
    path = Path(path)
    _check_target(path)
    probs = np.asarray(probabilities)
    if probs.ndim != 4 or tuple(probs.shape[1:]) != geometry.size:
        raise ValueError(f"{path}: probabilities of shape {tuple(probs.shape)} are not (classes, *{geometry.size})")
    # One 3D image per class on the scan's grid, joined along a fourth axis.
    channels = [geometry.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(c.transpose(2, 1, 0), dtype=np.float32)))
                for c in probs]
    image = sitk.JoinSeries(channels)
    del channels
    with atomic_path(path) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), useCompression=True)
        except RuntimeError as exc:
            raise UserError(f"{path}: cannot write ({str(exc).strip().splitlines()[-1][:200]})") from None
    return path
