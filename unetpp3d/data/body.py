"""Where the patient's body is in a CT: a HU threshold, or the body's filled outline.

A threshold of -500 HU separates soft tissue and bone from air, but it also calls the lung
parenchyma air (about -850 HU, ground-glass nodules -700 to -300). For a scan that is cropped to
the body, or whose background patches are drawn from the body, the lungs are then lost. The
filled outline keeps them:

1. tissue: voxels above ``threshold_hu``;
2. fill the holes of the tissue slice by slice (axial slices, the last array axis): in each
   slice the chest wall encloses the lungs and airways, so they become body. Slices rather
   than 3D, because in 3D the airways join the lungs to the air outside through the nose and
   mouth;
3. what is still outside is split into connected regions; a region whose median is above
   ``air_hu`` is not the air around the patient but tissue the scan's edge cut open (lung in a
   nodule-centred crop, or where the field of view cuts the chest wall), and joins the body.
   Air outside the patient (about -1000 HU, or the scanner's padding value) stays outside;
   -950 HU is the emphysema threshold, above which normal lung lies;
4. the largest 3D connected region is the body: the table and detached bits drop out.

Where no voxel is tissue, everything counts as body, so a scan is never cropped to nothing.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_data_type, convert_to_dst_type
from scipy import ndimage

from unetpp3d.config import Preprocessing

MODES = ("threshold", "filled")
BODY_KEY = "body"  # training with the filled body mask: the mask, from preprocessing to the patch sampler


def body_mask_array(hu: np.ndarray, threshold_hu: float = -500.0, mode: str = "threshold",
                    air_hu: float = -950.0) -> np.ndarray:
    """The body mask of one CT volume.

    Args:
        hu: (x, y, z) intensities in HU, z the axial (slice) axis.
        threshold_hu: voxels above it are tissue.
        mode: ``"threshold"`` (the tissue voxels) or ``"filled"`` (the filled outline, see the
            module docstring).
        air_hu: ``"filled"`` only: a region outside the outline whose median is at or below this
            is air around the patient.

    Returns:
        A boolean array of ``hu``'s shape; all True where no voxel is tissue.

    Raises:
        ValueError: an unknown mode or an array that is not 3D.
    """
    if mode not in MODES:
        raise ValueError(f"body mask mode {mode!r} is not one of {', '.join(MODES)}")
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"body mask: expected a 3D (x, y, z) array, got shape {hu.shape}")
    tissue = hu > threshold_hu
    if not tissue.any():
        return np.ones(hu.shape, dtype=bool)
    if mode == "threshold":
        return tissue
    body = np.empty_like(tissue)
    for z in range(hu.shape[2]):
        body[..., z] = ndimage.binary_fill_holes(tissue[..., z])
    outside, n = ndimage.label(~body)
    if n:
        # median > air_hu  <=>  fewer than half of the region's voxels are at or below air_hu
        total = np.bincount(outside.ravel(), minlength=n + 1)
        airy = np.bincount(outside[hu <= air_hu], minlength=n + 1)
        cut_open = 2 * airy < total
        cut_open[0] = False  # label 0 is the outline itself
        if cut_open.any():
            body |= cut_open[outside]
    del outside
    parts, n = ndimage.label(body)
    if n > 1:
        sizes = np.bincount(parts.ravel())
        sizes[0] = 0
        body = parts == int(np.argmax(sizes))
    return body


class BodyMask(Transform):
    """The body of a CT in HU: image (C, x, y, z) -> boolean mask of the same shape.

    Also the ``select_fn`` of ``CropForegroundd``. ``mode="threshold"`` is the voxels above
    ``threshold_hu``; ``mode="filled"`` is the body's filled outline, lungs included (see
    :mod:`unetpp3d.data.body`). Where no voxel is tissue every voxel is selected, so the scan is
    left uncropped instead of cropped to nothing. A class with plain arguments rather than a
    lambda, so that pipelines pickle into DataLoader workers and a bundle config can name it.

    Args:
        threshold_hu: voxels above it are tissue.
        mode: ``"threshold"`` or ``"filled"``.
        air_hu: ``"filled"`` only: a region outside the outline with its median at or below this
            is air around the patient.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, threshold_hu: float = -500.0, mode: str = "threshold", air_hu: float = -950.0) -> None:
        if mode not in MODES:
            raise ValueError(f"body mask mode {mode!r} is not one of {', '.join(MODES)}")
        self.threshold_hu = float(threshold_hu)
        self.mode = mode
        self.air_hu = float(air_hu)

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        if self.mode == "threshold":
            mask = img > self.threshold_hu
            if not mask.any():
                return torch.ones_like(mask) if isinstance(mask, torch.Tensor) else np.ones_like(mask)
            return mask
        hu = convert_data_type(img, np.ndarray)[0]
        mask = np.stack([body_mask_array(channel, self.threshold_hu, self.mode, self.air_hu) for channel in hu])
        return convert_to_dst_type(mask, img, dtype=torch.bool if isinstance(img, torch.Tensor) else bool)[0]

    def __repr__(self) -> str:
        return f"BodyMask({self.threshold_hu}, {self.mode!r}, {self.air_hu})"


class BodyMaskd(MapTransform):
    """Dictionary wrapper of :class:`BodyMask`: the mask of ``keys`` (the image) under ``mask_key``, as uint8.

    Training keeps it beside the image through the crop and the padding, and draws background
    patches from it (``RandCropByPosNegLabeld(image_key=mask_key, image_threshold=0.5)``).

    Args:
        keys: the image key (one).
        mask_key: where to store the mask.
        threshold_hu, mode, air_hu: as for :class:`BodyMask`.
    """

    backend = BodyMask.backend

    def __init__(self, keys: KeysCollection, mask_key: str = BODY_KEY, threshold_hu: float = -500.0,
                 mode: str = "threshold", air_hu: float = -950.0) -> None:
        super().__init__(keys)
        self.mask_key = mask_key
        self.mask = BodyMask(threshold_hu, mode, air_hu)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.mask_key] = convert_to_dst_type(self.mask(d[key]), d[key], dtype=torch.uint8)[0]
        return d


def body_mask(prep: Preprocessing) -> BodyMask:
    """The :class:`BodyMask` that ``prep`` crops with (its ``body_*`` fields)."""
    return BodyMask(prep.body_threshold_hu, prep.body_mask, prep.body_air_hu)
