"""The voxel grid of a 3D image (:class:`Geometry`) and the grid maths every stage shares.

A leaf module: no reading or writing here, so the writer, synthetic data, planning,
post-processing and previews use it without importing the readers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from unetpp3d.errors import UserError

# Two grids are "the same" when every voxel centre agrees to within this fraction of the
# smallest voxel edge: float32 NIfTI headers and 6-digit NRRD spacings stay far below it, while a
# half-voxel shift (a real mistake) is far above it.
GRID_TOL = 0.01


_ORIENTATION_TOL = 1e-4


@dataclass(frozen=True)
class Geometry:
    """The voxel grid of a 3D image, exactly as SimpleITK reports it (LPS physical space).

    Attributes:
        size: voxels along x, y, z (index order).
        spacing: voxel edge lengths in mm along x, y, z.
        origin: physical position (mm, LPS) of voxel (0, 0, 0)'s centre.
        direction: 3x3 direction cosines, row-major, as ``sitk.Image.GetDirection()``; column
            ``k`` is the physical direction of index axis ``k``.
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    def __post_init__(self) -> None:
        # Coerce so that equality, hashing and JSON never trip over numpy scalars or lists.
        object.__setattr__(self, "size", tuple(int(v) for v in self.size))
        object.__setattr__(self, "spacing", tuple(float(v) for v in self.spacing))
        object.__setattr__(self, "origin", tuple(float(v) for v in self.origin))
        object.__setattr__(self, "direction", tuple(float(v) for v in self.direction))
        if len(self.size) != 3 or len(self.spacing) != 3 or len(self.origin) != 3 or len(self.direction) != 9:
            raise ValueError(f"a 3D geometry needs 3 sizes, spacings and origins and 9 direction values, got {self}")

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> Geometry:
        """The geometry of a 3D SimpleITK image."""
        return cls(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Set this geometry's spacing, origin and direction on ``image`` (in place) and return it."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def to_dict(self) -> dict[str, list]:
        """Plain lists, for JSON and MONAI meta dicts."""
        return {"size": list(self.size), "spacing": list(self.spacing), "origin": list(self.origin),
                "direction": list(self.direction)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Geometry:
        """Inverse of :meth:`to_dict`.

        Also accepts one item's geometry after MONAI's collate, which turns each list into a list
        of one-element tensors.

        Raises:
            UserError: a key is missing or a value has the wrong length.
        """
        try:
            return cls(*(np.asarray(data[k], dtype=float).reshape(-1).tolist()
                         for k in ("size", "spacing", "origin", "direction")))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"geometry {data!r}: incomplete or malformed ({exc})") from None

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    def affine_lps(self) -> np.ndarray:
        """4x4 voxel-index-to-LPS-mm matrix."""
        affine = np.eye(4)
        affine[:3, :3] = self.direction_matrix @ np.diag(self.spacing)
        affine[:3, 3] = self.origin
        return affine

    def affine_ras(self) -> np.ndarray:
        """4x4 voxel-index-to-RAS-mm matrix, the ``affine`` a MONAI MetaTensor carries.

        LPS and RAS differ by the sign of the first two world axes, so the first two rows flip.
        """
        affine = self.affine_lps()
        affine[:2, :] *= -1.0
        return affine

    def index_to_physical(self, index: np.ndarray) -> np.ndarray:
        """Physical LPS positions (N, 3) of voxel indices (N, 3) in (x, y, z) order."""
        index = np.atleast_2d(np.asarray(index, dtype=float))
        return index @ (self.direction_matrix @ np.diag(self.spacing)).T + np.asarray(self.origin)

    def corners(self) -> np.ndarray:
        """Physical positions (8, 3) of the centres of the grid's eight corner voxels."""
        hi = [n - 1 for n in self.size]
        idx = np.array([[i, j, k] for i in (0, hi[0]) for j in (0, hi[1]) for k in (0, hi[2])])
        return self.index_to_physical(idx)

    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    def describe(self) -> str:
        """Short text such as ``122x101x30 voxels of 3x3x3 mm``."""
        return f"{'x'.join(map(str, self.size))} voxels of {'x'.join(f'{s:.4g}' for s in self.spacing)} mm"

    def same_grid(self, other: Geometry, tol: float = GRID_TOL) -> bool:
        """True when both describe the same voxel grid index for index.

        Args:
            other: the geometry to compare with.
            tol: allowed disagreement of any voxel centre, as a fraction of the smallest voxel
                edge of either grid. Checking each axis vector times the axis length bounds the
                disagreement at every corner, including grids one voxel thick along an axis.
        """
        if self.size != other.size:
            return False
        tol_mm = tol * min(min(self.spacing), min(other.spacing))
        a, b = self.affine_lps(), other.affine_lps()
        if np.linalg.norm(a[:3, 3] - b[:3, 3]) > tol_mm:
            return False
        for k in range(3):
            if np.linalg.norm(a[:3, k] - b[:3, k]) * max(self.size[k] - 1, 1) > tol_mm:
                return False
        return True

    def differences(self, other: Geometry) -> str:
        """Human-readable list of how ``other`` differs from this grid (empty when it does not)."""
        parts = []
        if self.size != other.size:
            parts.append(f"size {'x'.join(map(str, self.size))} vs {'x'.join(map(str, other.size))}")
        if not np.allclose(self.spacing, other.spacing, rtol=1e-4, atol=0):
            parts.append(f"spacing {fmt_values(self.spacing)} vs {fmt_values(other.spacing)} mm")
        shift = float(np.linalg.norm(np.subtract(self.origin, other.origin)))
        if shift > GRID_TOL * min(min(self.spacing), min(other.spacing)):
            parts.append(f"origin {fmt_values(self.origin)} vs {fmt_values(other.origin)} ({shift:.3g} mm apart)")
        ddir = float(np.abs(self.direction_matrix - other.direction_matrix).max())
        if ddir > _ORIENTATION_TOL:
            parts.append(f"direction {fmt_values(self.direction)} vs {fmt_values(other.direction)}")
        return "; ".join(parts)

    def reoriented(self, perm: Sequence[int], flips: Sequence[bool]) -> Geometry:
        """Geometry of ``np.flip(array.transpose(perm), axes=[k for k in range(3) if flips[k]])``.

        New axis ``k`` is old axis ``perm[k]``, reversed when ``flips[k]``; the physical grid is
        unchanged, only its indexing.
        """
        d = self.direction_matrix
        cols = [d[:, perm[k]] * (-1.0 if flips[k] else 1.0) for k in range(3)]
        origin = np.asarray(self.origin, dtype=float).copy()
        for k in range(3):
            if flips[k]:
                j = perm[k]
                origin += (self.size[j] - 1) * self.spacing[j] * d[:, j]
        return Geometry(
            size=[self.size[p] for p in perm],
            spacing=[self.spacing[p] for p in perm],
            origin=origin,
            direction=np.stack(cols, axis=1).reshape(-1),
        )

    def ras_axes(self) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
        """``(perm, flips)`` that turn this grid's array into the one ``Orientation("RAS")`` makes.

        Uses nibabel's ``io_orientation`` on :meth:`affine_ras`, as MONAI does, so the two agree
        for oblique scans too.
        """
        import nibabel as nib

        ornt = nib.orientations.io_orientation(self.affine_ras())
        perm, flips = [0, 0, 0], [False, False, False]
        for voxel_axis, (world_axis, sign) in enumerate(ornt):
            perm[int(world_axis)] = voxel_axis
            flips[int(world_axis)] = bool(sign < 0)
        return tuple(perm), tuple(flips)  # type: ignore[return-value]

    def to_ras(self) -> Geometry:
        """This grid indexed as the RAS-oriented array: spacing and size in RAS (x, y, z) order."""
        return self.reoriented(*self.ras_axes())


def fmt_values(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def axis_mapping(src: Geometry, dst: Geometry, tol: float = GRID_TOL
                 ) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]] | None:
    """How to index ``src``'s array so that it lands on ``dst``'s grid by flips and transposes.

    Returns:
        ``(perm, flips)`` with ``src.reoriented(perm, flips).same_grid(dst, tol)``, or None when
        no axis permutation and flip makes the two grids coincide.
    """
    ds, dd = src.direction_matrix, dst.direction_matrix
    perm, flips = [], []
    for k in range(3):
        dots = dd[:, k] @ ds  # cosine between dst axis k and every src axis
        j = int(np.argmax(np.abs(dots)))
        if abs(dots[j]) < 1.0 - 1e-3 or j in perm:
            return None
        perm.append(j)
        flips.append(bool(dots[j] < 0))
    if not src.reoriented(perm, flips).same_grid(dst, tol):
        return None
    return tuple(perm), tuple(flips)  # type: ignore[return-value]


def check_pair(image_geometry: Geometry, label_geometry: Geometry, image_path: str | Path,
               label_path: str | Path, tol: float = GRID_TOL) -> None:
    """Refuse a label map whose voxel grid is not the image's.

    A label stored with its axes flipped or permuted relative to the image (the same physical
    voxels, indexed differently) is accepted: :func:`align_label_to_image` or MONAI's
    ``Orientationd`` bring it onto the image's indexing.

    Raises:
        UserError: naming both files and what differs (size, spacing, origin, direction).
    """
    if axis_mapping(label_geometry, image_geometry, tol) is not None:
        return
    # Compare in RAS order so that the message lists real differences, not an axis swap.
    diff = image_geometry.to_ras().differences(label_geometry.to_ras()) or image_geometry.differences(label_geometry)
    raise UserError(
        f"{label_path}: label grid does not match image {image_path}: {diff or 'voxel centres disagree'}; "
        "resample the label onto the image grid (nearest neighbour) or pair it with the right image"
    )


def align_label_to_image(label_xyz: np.ndarray, label_geom: Geometry, image_geom: Geometry) -> np.ndarray:
    """Re-index a label array onto the image's index grid, by axis flips and transposes only.

    Args:
        label_xyz: label array in the label file's (x, y, z) index order.
        label_geom: the label file's geometry.
        image_geom: the image's geometry.

    Returns:
        A contiguous array of ``image_geom.size`` whose voxel ``[i, j, k]`` is the label of image
        voxel ``[i, j, k]``.

    Raises:
        UserError: the grids differ by more than a flip or permutation (no resampling is done).
    """
    if tuple(label_xyz.shape) != label_geom.size:
        raise ValueError(f"label array shape {label_xyz.shape} does not match its geometry size {label_geom.size}")
    mapping = axis_mapping(label_geom, image_geom)
    if mapping is None:
        raise UserError(f"label grid ({label_geom.describe()}) cannot be aligned to the image grid "
                        f"({image_geom.describe()}) by flips and transposes: {image_geom.differences(label_geom)}")
    perm, flips = mapping
    out = label_xyz.transpose(perm)
    axes = [k for k in range(3) if flips[k]]
    if axes:
        out = np.flip(out, axis=axes)
    return np.ascontiguousarray(out)
