"""Read CT scans and label maps into ``(x, y, z)`` arrays plus their geometry, validating as we go.

Every read goes through :func:`read_image`, which accepts NIfTI (``.nii``, ``.nii.gz``), NRRD,
MetaImage (``.mha``, ``.mhd``) and a folder holding a DICOM series (JPEG2000-compressed series
included, through SimpleITK's GDCM). It refuses, with a :class:`~unetpp3d.errors.UserError`
naming the file and the problem, anything that would otherwise load silently with a wrong
geometry or wrong values: truncated NIfTI (which ITK pads with zeros), DICOM series with
unevenly spaced, duplicated or mixed-orientation slices (which ITK stacks with a made-up
spacing), multi-channel files, NaN voxels, non-positive spacing, and images too large to fit in
memory (refused from the header, before any voxel is read).

The array is in SimpleITK *index* order ``(x, y, z)``, i.e.
``sitk.GetArrayFromImage(img).transpose(2, 1, 0)``, and :class:`Geometry` holds SimpleITK's size,
spacing, origin and direction (LPS). :class:`SitkReader` wraps the same function as a MONAI
``ImageReader`` so that ``LoadImaged(..., reader=SitkReader())`` yields MetaTensors whose affine
is :meth:`Geometry.affine_ras`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from monai.data.image_reader import ImageReader
from monai.utils import ensure_tuple

from unetpp3d.errors import UserError
from unetpp3d.geometry import Geometry
from unetpp3d.imageio.dicom import _read_dicom_folder
from unetpp3d.imageio.formats import (
    IMAGE_SUFFIXES,
    _as_label,
    _check_finite,
    _read_file,
)
from unetpp3d.readable import require_file_or_folder


def read_image(path: str | Path, series_uid: str | None = None, is_label: bool = False
               ) -> tuple[np.ndarray, Geometry]:
    """Read and validate a 3D image or label map.

    Args:
        path: a NIfTI, NRRD or MetaImage file, a single (multi-frame) DICOM file, or a folder
            holding a DICOM series.
        series_uid: in a DICOM folder holding several series, the SeriesInstanceUID to read.
        is_label: check that voxel values are whole numbers and return an integer array
            (``uint8`` for 0..255, else ``int16``/``int32``).

    Returns:
        ``(array, geometry)``: the voxels in (x, y, z) index order (the file's own dtype for
        images) and the grid they sit on.

    Raises:
        UserError: ``"<path>: <problem>; <what to do>"`` for a missing, empty, truncated or
            unreadable file, an image that is not a single-channel 3D volume, NaN/Inf voxels,
            non-positive spacing, an image too large for memory, DICOM folders with no or several
            series or with irregular, duplicated or mixed-orientation slices, and label maps
            with non-integer values.
    """
    path = Path(path)
    kind = require_file_or_folder(path, "input")  # a FIFO or device would block or never end
    image = _read_dicom_folder(path, series_uid) if kind == "folder" else _read_file(path)
    geometry = Geometry.from_sitk(image)
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    del image
    _check_finite(array, path)
    if is_label:
        array = _as_label(array, path)
    return array, geometry


@dataclass
class _Loaded:
    array: np.ndarray
    geometry: Geometry
    path: Path


class SitkReader(ImageReader):
    """MONAI ``ImageReader`` over :func:`read_image`: validated SimpleITK reads with our geometry.

    ``LoadImaged(keys=["image", "label"], reader=SitkReader(), image_only=True,
    ensure_channel_first=True)`` gives channel-first MetaTensors whose ``affine`` is
    :meth:`Geometry.affine_ras` and whose meta dict carries ``"geometry"``
    (:meth:`Geometry.to_dict`), ``"filename_or_obj"``, ``"spatial_shape"`` and
    ``"original_affine"``, so ``Orientationd``, ``Spacingd`` and ``Invertd`` work as with
    MONAI's own readers.

    Args:
        series_uid: SeriesInstanceUID to pick in DICOM folders holding several series.

    Label maps read through this reader get the generic checks only (MONAI's loader does not
    say which key a file belongs to); :func:`unetpp3d.commands.check.run_check` verifies labels fully.

    Example::

        >>> from monai.transforms import LoadImaged
        >>> load = LoadImaged(keys=["image"], reader=SitkReader(), image_only=True, ensure_channel_first=True)
        >>> img = load({"image": "ct.nii.gz"})["image"]          # (1, x, y, z) MetaTensor
    """

    def __init__(self, series_uid: str | None = None):
        super().__init__()
        self.series_uid = series_uid

    def verify_suffix(self, filename: Sequence[str | os.PathLike] | str | os.PathLike) -> bool:
        """True for folders (DICOM series) and files with a suffix :func:`read_image` handles."""
        for name in ensure_tuple(filename):
            p = Path(name)
            if not (p.is_dir() or p.name.lower().endswith(IMAGE_SUFFIXES)):
                return False
        return True

    def read(self, data: Sequence[str | os.PathLike] | str | os.PathLike, **kwargs: Any) -> _Loaded | list[_Loaded]:
        """Read one path, or several to be stacked as channels (they must share one grid)."""
        loaded = []
        for name in ensure_tuple(data):
            array, geometry = read_image(name, series_uid=kwargs.get("series_uid", self.series_uid))
            loaded.append(_Loaded(array, geometry, Path(name)))
        return loaded if len(loaded) > 1 else loaded[0]

    def get_data(self, img: _Loaded | Sequence[_Loaded]) -> tuple[np.ndarray, dict]:
        """Return ``(array, meta)``; several inputs are stacked on a new first (channel) axis."""
        items = list(img) if isinstance(img, (list, tuple)) else [img]
        first = items[0]
        for other in items[1:]:
            if not first.geometry.same_grid(other.geometry):
                raise UserError(f"{other.path}: cannot stack as a channel of {first.path}: "
                                f"{first.geometry.differences(other.geometry)}")
        affine = first.geometry.affine_ras()
        meta = {
            "affine": affine,
            "original_affine": affine.copy(),
            "spatial_shape": np.asarray(first.geometry.size),
            "spacing": np.asarray(first.geometry.spacing),
            "space": "RAS",
            "geometry": first.geometry.to_dict(),
            "filename_or_obj": str(first.path),
        }
        if len(items) == 1:
            meta["original_channel_dim"] = float("nan")  # MONAI's marker for "no channel axis"
            return first.array, meta
        meta["original_channel_dim"] = 0
        return np.stack([it.array for it in items], axis=0), meta
