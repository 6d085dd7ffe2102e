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

from unetpp3d.atomic import atomic_path, write_failed
from unetpp3d.errors import UserError
from unetpp3d.geometry import Geometry
from unetpp3d.imageio.formats import _PIXEL_BYTES, _itk_reason
from unetpp3d.imageio.headers import _metaimage_data_complete, _metaimage_precheck, _nrrd_data_complete
from unetpp3d.imageio.nifti import _nifti_complete
from unetpp3d.outputs import NIFTI_MARK

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


def _verify(tmp: Path, path: Path, geometry: Geometry, pixel_id: int, channels: int | None = None) -> None:
    """Read back what was written: its header must give our grid and type, its data must be whole.

    ITK's NIfTI writer does not report a failed write (a full disk leaves a truncated file and
    no error), so a file is trusted only after its header is read back and its voxel data is
    found complete. ``channels``: a 4D file of that many 3D volumes on ``geometry`` (probabilities).
    """
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(tmp))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise write_failed(path, f"the written file cannot be read back: {_itk_reason(exc)}") from None
    dim = 3 if channels is None else 4
    if reader.GetDimension() != dim or (channels is not None and reader.GetSize()[3] != channels):
        raise write_failed(path, f"the written file reads back as a {reader.GetDimension()}D image of size "
                                 f"{reader.GetSize()}")
    direction = np.asarray(reader.GetDirection()).reshape(dim, dim)[:3, :3].ravel()
    written = Geometry(reader.GetSize()[:3], reader.GetSpacing()[:3], reader.GetOrigin()[:3], direction)
    if not written.same_grid(geometry) or reader.GetPixelID() != pixel_id:
        kind = sitk.GetPixelIDValueAsString(reader.GetPixelID())
        raise write_failed(path, f"the written file reads back as {written.describe()} of type {kind}, not the "
                                 "grid and type that were written")
    expected = int(np.prod(geometry.size, dtype=np.int64)) * _PIXEL_BYTES[pixel_id] * (channels or 1)
    name = tmp.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            _nifti_complete(tmp)
        elif name.endswith(".nrrd"):
            _nrrd_data_complete(tmp, expected)
        elif name.endswith(".mha"):
            fields, start = _metaimage_precheck(tmp)
            _metaimage_data_complete(tmp, fields, start, expected)
    except UserError as exc:
        # The reader's message names the temporary and advises re-exporting: keep only the finding.
        finding = str(exc).split(": ", 1)[-1].split(";")[0]
        raise write_failed(path, f"the written file is incomplete: {finding}") from None


def _write(array_xyz: np.ndarray, geometry: Geometry, path: Path, note: str) -> Path:
    # SimpleITK takes (z, y, x) arrays; the transpose puts our (x, y, z) index order back.
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_xyz.transpose(2, 1, 0)))
    geometry.apply_to(image)
    # Becomes the NIfTI descrip field: how a later run tells a file it wrote (which it may
    # replace) from a user's scan or reference (which it must not); see unetpp3d.outputs.
    image.SetMetaData("ITK_FileNotes", f"{NIFTI_MARK} {note}")
    pixel_id = image.GetPixelID()
    with atomic_path(path, verify=lambda tmp: _verify(tmp, path, geometry, pixel_id)) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), useCompression=True)
        except RuntimeError as exc:
            raise write_failed(path, _itk_reason(exc)) from None
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
    return _write(mask.astype(_label_dtype(mask), copy=False), geometry, path, "mask")


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
    return _write(array, geometry, path, "image")


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
    image.SetMetaData("ITK_FileNotes", f"{NIFTI_MARK} probabilities")  # see _write
    channels = probs.shape[0]
    with atomic_path(path, verify=lambda tmp: _verify(tmp, path, geometry, sitk.sitkFloat32, channels)) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), useCompression=True)
        except RuntimeError as exc:
            raise write_failed(path, _itk_reason(exc)) from None
    return path
