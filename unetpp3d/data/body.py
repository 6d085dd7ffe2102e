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

import numpy as np
from scipy import ndimage

MODES = ("threshold", "filled")


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
