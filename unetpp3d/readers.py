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

import gzip
import math
import mmap
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from monai.data.image_reader import ImageReader
from monai.utils import ensure_tuple

from unetpp3d.errors import UserError

__all__ = [
    "Geometry",
    "SitkReader",
    "read_image",
    "check_pair",
    "align_label_to_image",
    "axis_mapping",
    "SUPPORTED_SUFFIXES",
]

SUPPORTED_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")

# Two grids are "the same" when every voxel centre agrees to within this fraction of the
# smallest voxel edge: float32 NIfTI headers and 6-digit NRRD spacings stay far below it, while a
# half-voxel shift (a real mistake) is far above it.
GRID_TOL = 0.01

# Slice gaps may deviate from the median gap by this much before a DICOM series is refused:
# DS strings carry rounding noise of ~1e-6 mm, a missing slice deviates by a whole gap.
_GAP_TOL_MM = 0.01
_GAP_TOL_REL = 0.01
_ORIENTATION_TOL = 1e-4

# GetArrayFromImage copies the ITK buffer, so a read briefly holds two copies of the voxels.
_READ_COPIES = 2

_PIXEL_BYTES = {
    sitk.sitkUInt8: 1, sitk.sitkInt8: 1, sitk.sitkUInt16: 2, sitk.sitkInt16: 2,
    sitk.sitkUInt32: 4, sitk.sitkInt32: 4, sitk.sitkUInt64: 8, sitk.sitkInt64: 8,
    sitk.sitkFloat32: 4, sitk.sitkFloat64: 8,
}


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


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
            parts.append(f"spacing {_fmt(self.spacing)} vs {_fmt(other.spacing)} mm")
        shift = float(np.linalg.norm(np.subtract(self.origin, other.origin)))
        if shift > GRID_TOL * min(min(self.spacing), min(other.spacing)):
            parts.append(f"origin {_fmt(self.origin)} vs {_fmt(other.origin)} ({shift:.3g} mm apart)")
        ddir = float(np.abs(self.direction_matrix - other.direction_matrix).max())
        if ddir > _ORIENTATION_TOL:
            parts.append(f"direction {_fmt(self.direction)} vs {_fmt(other.direction)}")
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


def _fmt(values: Sequence[float]) -> str:
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


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


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
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    image = _read_dicom_folder(path, series_uid) if path.is_dir() else _read_file(path)
    geometry = Geometry.from_sitk(image)
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    del image
    _check_finite(array, path)
    if is_label:
        array = _as_label(array, path)
    return array, geometry


def _available_memory() -> int | None:
    """Bytes of memory available to a new allocation, or None where the OS does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} PiB"


def _check_memory(path: Path, n_voxels: int, bytes_per_voxel: int) -> None:
    need = n_voxels * bytes_per_voxel * _READ_COPIES
    available = _available_memory()
    if available is not None and need > available:
        raise UserError(f"{path}: reading it needs about {_human_bytes(need)} of memory ({n_voxels:,} voxels of "
                        f"{bytes_per_voxel} bytes, held twice while converting) but only {_human_bytes(available)} "
                        "is available; crop or downsample the image, or use a machine with more memory")


def _itk_reason(exc: Exception) -> str:
    """The informative last line of an ITK exception (they run to a dozen lines of C++ context)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for line in reversed(lines):
        if "ERROR" in line or "error" in line or "Reason" in line:
            text = line.split("ERROR:", 1)[-1].strip()
            return text[:200]
    return (lines[-1] if lines else type(exc).__name__)[:200]


def _check_header(path: Path, dim: int, size: Sequence[int], spacing: Sequence[float], components: int) -> None:
    """Refuse from the header alone what cannot be a single-channel 3D volume."""
    shape = "x".join(map(str, size))
    if dim < 3:
        raise UserError(f"{path}: is a {dim}D image (size {shape}); a 3D volume is needed")
    if dim > 3 and any(n > 1 for n in size[3:]):
        raise UserError(f"{path}: is a {dim}D image (size {shape}) with {int(np.prod(size[3:]))} channels or "
                        "time points; give one single-channel 3D volume per file")
    if components > 1:
        raise UserError(f"{path}: has {components} components per voxel (colour or vector image); "
                        "give a single-channel 3D volume")
    if any(n < 2 for n in size[:3]):
        raise UserError(f"{path}: is a single 2D slice (size {'x'.join(map(str, size[:3]))}); a 3D volume is needed"
                        " (for a DICOM series, give the folder holding all its slices)")
    if any(not math.isfinite(s) or s <= 0 for s in spacing[:3]):
        raise UserError(f"{path}: voxel spacing {_fmt(spacing[:3])} is not positive; fix the file's header")


def _nifti_complete(path: Path) -> None:
    """Refuse a truncated NIfTI file, which ITK would otherwise read with the missing end zero-filled."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        header = img.header
        # The offset of the file's own header (vox_offset): nibabel resets img.header's to 0.
        expected = int(img.dataobj.offset) + int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
    except Exception as exc:  # nibabel raises several types for damaged headers
        raise UserError(f"{path}: cannot read the NIfTI header ({type(exc).__name__}: {exc}); "
                        "the file is damaged or not NIfTI") from None
    if path.name.lower().endswith(".gz"):
        # The gzip trailer stores the uncompressed length (mod 2**32): one seek checks it. Only
        # when it disagrees (truncation, or a rare multi-member file) is the stream decompressed.
        with open(path, "rb") as fh:
            fh.seek(-4, os.SEEK_END)
            isize = int.from_bytes(fh.read(4), "little")
        if isize == expected % 2**32:
            return
        total = 0
        try:
            with gzip.open(path, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    total += len(chunk)
        except (OSError, EOFError, gzip.BadGzipFile):
            total = -1
        if total < expected:
            raise UserError(f"{path}: the compressed NIfTI is truncated or corrupt (its data stream ends early); "
                            "copy or export the file again")
    elif path.stat().st_size < expected:
        raise UserError(f"{path}: the NIfTI file is truncated ({path.stat().st_size:,} bytes, its header needs "
                        f"{expected:,}); copy or export the file again")


def _nifti_finite(path: Path) -> None:
    """Refuse NaN/Inf in a floating-point NIfTI: ITK's NIfTI reader silently turns them into 0.

    Scanned with nibabel in slabs along the last axis, so memory stays at a few slices.
    """
    import nibabel as nib

    img = nib.load(str(path))
    if img.header.get_data_dtype().kind != "f" and img.header.get_slope_inter()[0] is None:
        return
    proxy = img.dataobj
    shape = proxy.shape
    if len(shape) < 3:
        return
    bad, first = 0, None
    step = max(1, (1 << 24) // max(1, int(np.prod(shape[:2]))))
    for k0 in range(0, shape[2], step):
        slab = np.asarray(proxy[:, :, k0:k0 + step])
        nonfinite = ~np.isfinite(slab)
        n = int(nonfinite.sum())
        if n and first is None:
            i = np.argwhere(nonfinite)[0]
            first = (int(i[0]), int(i[1]), int(i[2]) + k0)
        bad += n
    if bad:
        raise UserError(f"{path}: {bad:,} voxel(s) are NaN or infinite (first at index {first}); replace them "
                        "(e.g. by the background value) before using the file")


# MetaIO keeps its per-dimension fields in arrays of this length: a header declaring more
# dimensions (or a negative number) makes ITK's MetaImage reader write past them and crash.
_METAIMAGE_MAX_DIMS = 10


def _metaimage_header(path: Path) -> tuple[dict[str, str], int]:
    """The ``Key = Value`` fields of a MetaImage header (up to ``ElementDataFile``) and the offset after it."""
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(head):
        end = head.find(b"\n", pos)
        end = len(head) if end < 0 else end
        key, sep, value = head[pos:end].decode("latin-1").partition("=")
        pos = end + 1
        if sep:
            fields[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":
                break
    return fields, pos


def _metaimage_precheck(path: Path) -> tuple[dict[str, str], int]:
    """Refuse a MetaImage header that would crash ITK's reader (it runs in our process)."""
    fields, data_start = _metaimage_header(path)
    if "NDims" in fields:
        token = (fields["NDims"].split() or [""])[0]
        try:
            ndims = int(token)
        except ValueError:
            ndims = -1
        if not 1 <= ndims <= _METAIMAGE_MAX_DIMS:
            raise UserError(f"{path}: the MetaImage header says NDims = {fields['NDims'][:40]!r}, not a number of "
                            f"dimensions from 1 to {_METAIMAGE_MAX_DIMS}; the file is damaged")
    data_file = fields.get("ElementDataFile", "LOCAL")
    if data_file.upper() != "LOCAL" and not _plain_file_name(data_file):
        # MetaIO reads "LIST" and a value holding "%" ("pattern min max step", the pattern a
        # printf format) as slices in many files; damaged voxel bytes taken for such a pattern
        # wrote past a buffer (valgrind) and corrupted the heap of the reading process (found by
        # tests/test_fuzz.py). CT needs no more than the voxels inline or in one other file.
        raise UserError(f"{path}: the MetaImage header's ElementDataFile = {data_file[:40]!r} is neither LOCAL nor "
                        "one file name (multi-file lists and patterns are not supported, and a damaged header "
                        "looks like one); store the volume as one .mha, .nrrd or .nii.gz")
    return fields, data_start


def _plain_file_name(name: str) -> bool:
    """One data file's name: spaces and non-ASCII letters are fine (ITK writes "scan 1.raw"); a
    "%", "LIST" or control characters are not."""
    return bool(name) and name.upper() != "LIST" and "%" not in name and not any(
        ord(c) < 32 or ord(c) == 127 for c in name)


def _data_holds(source: Path, offset: int, expected: int, compressed: bool) -> bool:
    """Whether ``source`` from ``offset`` holds ``expected`` bytes of voxels (after inflating, if compressed).

    A compressed stream is inflated (and discarded) only up to ``expected`` bytes.
    """
    if not compressed:
        return source.stat().st_size - offset >= expected
    inflate = zlib.decompressobj(47)  # a zlib or gzip stream, as ITK's readers accept
    total = 0
    try:
        with open(source, "rb") as fh:
            fh.seek(offset)
            buf = fh.read(1 << 20)
            while buf and total < expected:
                total += len(inflate.decompress(buf, 1 << 24))
                buf = inflate.unconsumed_tail or (b"" if inflate.eof else fh.read(1 << 20))
    except (OSError, zlib.error):
        return False
    return total >= expected


def _refuse_short_data(path: Path, expected: int, compressed: bool) -> None:
    what = "compressed voxel data is truncated or corrupt" if compressed else "voxel data is truncated"
    raise UserError(f"{path}: the {what} (the header declares {expected:,} bytes of voxels, the file holds fewer); "
                    "copy or export the file again")


def _metaimage_data_complete(path: Path, fields: dict[str, str], data_start: int, expected: int) -> None:
    """Refuse MetaImage voxel data shorter than the header declares, before ITK allocates the image.

    ITK fills missing compressed data with zeros without a word (as it does for truncated
    NIfTI), and allocates the declared size before it finds raw data missing.
    """
    compressed = fields.get("CompressedData", "").lower().startswith("t")
    data_file = fields.get("ElementDataFile", "")
    if data_file.upper() == "LOCAL":
        source, offset = path, data_start
    elif _plain_file_name(data_file) and fields.get("HeaderSize", "0") == "0":
        source, offset = path.parent / data_file, 0
    else:  # LIST, file patterns, headers to skip: left to ITK
        return
    if source.is_file() and not _data_holds(source, offset, expected, compressed):
        _refuse_short_data(path, expected, compressed)


def _nrrd_data_complete(path: Path, expected: int) -> None:
    """Refuse an attached NRRD whose raw or gzip voxel data is shorter than its header declares.

    ITK allocates the declared size before it finds the data missing: seconds and gigabytes
    for a damaged header on a kilobyte file.
    """
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
    end = head.find(b"\n\n")
    if not head.startswith(b"NRRD") or end < 0:
        return
    fields = {}
    for line in head[:end].decode("latin-1").splitlines()[1:]:
        key, sep, value = line.partition(":")
        if sep and not line.startswith("#") and not value.startswith("="):
            fields[key.strip().lower()] = value.strip().lower()
    if any(k in fields for k in ("data file", "datafile", "line skip", "lineskip", "byte skip", "byteskip")):
        return  # detached or offset data: left to ITK
    encoding = fields.get("encoding", "")
    if encoding in ("raw", "gz", "gzip"):
        compressed = encoding != "raw"
        if not _data_holds(path, end + 2, expected, compressed):
            _refuse_short_data(path, expected, compressed)


def _read_file(path: Path) -> sitk.Image:
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty (0 bytes)")
    metaimage = path.name.endswith((".mha", ".mhd"))  # the only names ITK's MetaImage reader takes
    if metaimage:
        meta_fields, meta_data_start = _metaimage_precheck(path)
    _check_dicom_lengths(path)  # a no-op for files without the DICOM preamble
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.LoadPrivateTagsOff()
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise UserError(f"{path}: cannot read it as an image ({_itk_reason(exc)}); supported are NIfTI, NRRD, "
                        "MHA/MHD, DICOM files and DICOM series folders") from None
    dim, size = reader.GetDimension(), reader.GetSize()
    _check_header(path, dim, size, reader.GetSpacing(), reader.GetNumberOfComponents())
    bytes_per_voxel = _PIXEL_BYTES.get(reader.GetPixelID(), 8) * reader.GetNumberOfComponents()
    _check_memory(path, int(np.prod(size, dtype=np.int64)), bytes_per_voxel)
    if path.name.lower().endswith((".nii", ".nii.gz")):
        _nifti_complete(path)
    n_bytes = int(np.prod(size, dtype=np.int64)) * bytes_per_voxel
    if metaimage:
        _metaimage_data_complete(path, meta_fields, meta_data_start, n_bytes)
    elif path.name.lower().endswith(".nrrd"):
        _nrrd_data_complete(path, n_bytes)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise UserError(f"{path}: cannot read the voxel data ({_itk_reason(exc)}); the file may be truncated "
                        "or corrupt") from None
    if path.name.lower().endswith((".nii", ".nii.gz")):
        _nifti_finite(path)
    if image.GetDimension() > 3:  # trailing singleton dimensions, checked above
        image = sitk.Extract(image, size=list(image.GetSize()[:3]) + [0] * (image.GetDimension() - 3),
                             index=[0] * image.GetDimension())
    _check_direction(path, image.GetDirection())
    return image


def _check_direction(path: Path, direction: Sequence[float]) -> None:
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    if not np.all(np.isfinite(d)) or not np.allclose(d.T @ d, np.eye(3), atol=1e-3):
        raise UserError(f"{path}: the direction matrix {_fmt(direction)} is not a rotation; fix the file's header")


def _check_finite(array: np.ndarray, path: Path) -> None:
    if not np.issubdtype(array.dtype, np.floating):
        return
    finite = np.isfinite(array)
    if not finite.all():
        bad = np.argwhere(~finite)
        raise UserError(f"{path}: {len(bad):,} voxel(s) are NaN or infinite (first at index {tuple(int(i) for i in bad[0])}); "
                        "replace them (e.g. by the background value) before using the file")


def _as_label(array: np.ndarray, path: Path) -> np.ndarray:
    if np.issubdtype(array.dtype, np.floating):
        frac = array != np.round(array)
        if frac.any():
            example = float(array[frac].flat[0])
            raise UserError(f"{path}: a label map must hold whole class numbers, found {example:g}; was an image given "
                            "as the label, or was the mask resampled with linear instead of nearest-neighbour "
                            "interpolation?")
    elif not np.issubdtype(array.dtype, np.integer) and array.dtype != bool:
        raise UserError(f"{path}: a label map must hold integer class numbers, found type {array.dtype}")
    lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
    for dtype in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return array.astype(dtype, copy=False)
    raise UserError(f"{path}: label values {lo}..{hi} do not fit a 32-bit integer")


# --------------------------------------------------------------------------------------------
# DICOM series
# --------------------------------------------------------------------------------------------


@dataclass
class _Slice:
    path: Path
    series_uid: str
    position: np.ndarray | None
    orientation: np.ndarray | None
    size: tuple[int, ...]
    pixel_spacing: float
    pixel_bytes: int
    components: int


def _tag_floats(reader: sitk.ImageFileReader, key: str, count: int) -> np.ndarray | None:
    if not reader.HasMetaDataKey(key):
        return None
    try:
        values = [float(v) for v in reader.GetMetaData(key).strip().split("\\") if v.strip()]
    except ValueError:
        return None
    return np.asarray(values) if len(values) == count and all(map(math.isfinite, values)) else None


def _scan_dicom(folder: Path) -> tuple[list[_Slice], int]:
    """Read the header of every file in ``folder``; return the DICOM ones and the count of others."""
    slices, others = [], 0
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        _check_dicom_lengths(path)
        reader = sitk.ImageFileReader()
        reader.SetImageIO("GDCMImageIO")
        reader.SetFileName(str(path))
        reader.LoadPrivateTagsOff()
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            others += 1  # README, DICOMDIR, thumbnails: not slices
            continue
        uid = reader.GetMetaData("0020|000e").strip().rstrip("\x00") if reader.HasMetaDataKey("0020|000e") else ""
        slices.append(_Slice(
            path=path,
            series_uid=uid,
            position=_tag_floats(reader, "0020|0032", 3),
            orientation=_tag_floats(reader, "0020|0037", 6),
            size=tuple(reader.GetSize()),
            pixel_spacing=float(min(reader.GetSpacing()[:2])),
            pixel_bytes=_PIXEL_BYTES.get(reader.GetPixelID(), 8),
            components=reader.GetNumberOfComponents(),
        ))
    return slices, others


# Explicit-VR value representations whose length field is 4 bytes (after 2 reserved bytes).
_DICOM_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT",
                             b"UV"})
_DICOM_UNDEFINED = 0xFFFFFFFF


class _DicomWalkStop(Exception):
    """The element walk cannot tell (a layout it does not follow): leave the file to GDCM."""


class _Overrun(Exception):
    """A DICOM element declares more bytes than its file (or enclosing item) holds."""


def _dicom_overrun(path: Path) -> str | None:
    """Where a DICOM file declares an element longer than the file, or None.

    GDCM allocates an element's declared length before reading it, so one damaged length field
    makes a 1 kB file take gigabytes of memory. This walks the elements (file meta information,
    then the data set in its transfer syntax, into undefined-length sequences) and checks only
    lengths; files it cannot follow (no Part-10 preamble, big-endian or deflated syntaxes,
    unknown VRs, unreadable files) are left to GDCM.
    """
    try:
        size = path.stat().st_size
        if size < 132:
            return None
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data[128:132] != b"DICM":
                return None
            return _walk_dicom(data, size)
    except (OSError, ValueError):
        return None


def _walk_dicom(data: mmap.mmap, size: int) -> str | None:
    """The element walk of :func:`_dicom_overrun` over a mapped Part-10 file."""

    def element(pos: int, explicit: bool) -> tuple[int, int, bytes, int, int]:
        """(group, element, VR, header length, value length) of the element at ``pos``."""
        group, elem = struct.unpack_from("<HH", data, pos)
        if group == 0xFFFE or not explicit:  # items and delimiters are always implicit
            return group, elem, b"", 8, struct.unpack_from("<I", data, pos + 4)[0]
        vr = bytes(data[pos + 4:pos + 6])
        if not (vr.isalpha() and vr.isupper()):
            raise _DicomWalkStop
        if vr in _DICOM_LONG_VRS:
            if pos + 12 > size:
                raise _DicomWalkStop
            return group, elem, vr, 12, struct.unpack_from("<I", data, pos + 8)[0]
        return group, elem, vr, 8, struct.unpack_from("<H", data, pos + 6)[0]

    def walk(pos: int, end: int, explicit: bool, depth: int, delimited: bool) -> int:
        """Check the elements from ``pos``; inside a ``delimited`` block, return the offset after its delimiter."""
        if depth > 32:
            raise _DicomWalkStop
        while pos + 8 <= end:
            group, elem, vr, head, length = element(pos, explicit)
            if group == 0xFFFE and elem in (0xE00D, 0xE0DD):  # item / sequence delimiter
                if not delimited:
                    raise _DicomWalkStop
                return pos + 8
            if length == _DICOM_UNDEFINED:
                # A sequence, an item, or encapsulated pixel data, ended by a delimiter; the
                # content of an undefined-length UN is implicit VR.
                pos = walk(pos + head, end, explicit and vr != b"UN", depth + 1, delimited=True)
                continue
            if pos + head + length > end:
                raise _Overrun(f"element ({group:04X},{elem:04X}) at byte {pos:,} declares {length:,} bytes "
                               f"but {max(end - pos - head, 0):,} follow")
            pos += head + length
        if delimited:  # no delimiter before the end: truncated; GDCM says so
            raise _DicomWalkStop
        return pos

    def overrun(pos: int, explicit: bool) -> str | None:
        try:
            walk(pos, size, explicit, depth=0, delimited=False)
        except _Overrun as exc:
            return str(exc)
        except (_DicomWalkStop, struct.error):
            pass
        return None

    # File meta information: explicit VR little endian, group 0002.
    pos, syntax = 132, None
    try:
        while pos + 8 <= size and struct.unpack_from("<H", data, pos)[0] == 0x0002:
            _, elem, _, head, length = element(pos, True)
            if length == _DICOM_UNDEFINED or pos + head + length > size:
                return f"file meta element (0002,{elem:04X}) declares {length:,} bytes, more than the file holds"
            if elem == 0x0010:
                syntax = bytes(data[pos + head:pos + head + length]).decode("ascii", "replace").strip("\x00 ")
            pos += head + length
    except (_DicomWalkStop, struct.error):
        return None
    if syntax in ("1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"):  # big endian, deflated
        return None
    if syntax is None:
        # No transfer syntax (a damaged or non-conformant meta group): GDCM guesses the
        # encoding, so the file is damaged only when neither encoding fits it.
        explicit = overrun(pos, True)
        return explicit if explicit and overrun(pos, False) else None
    return overrun(pos, explicit=syntax != "1.2.840.10008.1.2")


def _check_dicom_lengths(path: Path) -> None:
    overrun = _dicom_overrun(path)
    if overrun:
        raise UserError(f"{path}: damaged DICOM file: {overrun}; the file is truncated or corrupt — copy or export "
                        "it again (or remove it from the series folder)")


def _uid_name(uid: str) -> str:
    return uid or "(no SeriesInstanceUID)"


def _pick_series(folder: Path, slices: list[_Slice], series_uid: str | None) -> list[_Slice]:
    groups: dict[str, list[_Slice]] = {}
    for s in slices:
        groups.setdefault(s.series_uid, []).append(s)
    listing = ", ".join(f"{_uid_name(uid)} ({len(g)} files)" for uid, g in sorted(groups.items()))
    if series_uid is not None:
        if series_uid not in groups:
            raise UserError(f"{folder}: no DICOM series with SeriesInstanceUID {series_uid}; the folder holds {listing}")
        return groups[series_uid]
    if len(groups) > 1:
        raise UserError(f"{folder}: holds {len(groups)} DICOM series: {listing}; pick one with --series-uid "
                        "(or move each series into its own folder)")
    return next(iter(groups.values()))


def _check_series(folder: Path, series: list[_Slice]) -> list[_Slice]:
    """Validate the slices of one series and return them sorted along the slice normal."""
    first = series[0]
    for s in series:
        if s.position is None or s.orientation is None:
            missing = "ImagePositionPatient (0020,0032)" if s.position is None else "ImageOrientationPatient (0020,0037)"
            raise UserError(f"{folder}: {s.path.name} has no valid {missing}, so the slices cannot be placed in space")
        if len(s.size) > 2 and s.size[2] > 1:
            raise UserError(f"{folder}: {s.path.name} is a multi-frame file inside a series of {len(series)} files; "
                            "give the multi-frame file on its own")
        if s.size[:2] != first.size[:2]:
            raise UserError(f"{folder}: slices of different sizes: {first.path.name} is "
                            f"{'x'.join(map(str, first.size[:2]))}, {s.path.name} is {'x'.join(map(str, s.size[:2]))}")
        if s.components != 1:
            raise UserError(f"{folder}: {s.path.name} has {s.components} components per pixel (colour); "
                            "a single-channel CT series is needed")
    for s in series:
        if np.abs(s.orientation - first.orientation).max() > _ORIENTATION_TOL:
            raise UserError(f"{folder}: mixed slice orientations (ImageOrientationPatient): {first.path.name} has "
                            f"{_fmt(first.orientation)}, {s.path.name} has {_fmt(s.orientation)}; "
                            "the folder mixes several acquisitions or reformats")
    row, col = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row, col)
    if abs(np.linalg.norm(normal) - 1.0) > 1e-3:
        raise UserError(f"{folder}: ImageOrientationPatient {_fmt(first.orientation)} is not two orthogonal unit vectors")
    along = np.array([s.position @ normal for s in series])
    order = np.argsort(along, kind="stable")
    series = [series[i] for i in order]
    along = along[order]

    gaps = np.diff(along)
    # Two files at (nearly) the same place: ITK would stack them with a made-up spacing.
    dup = np.flatnonzero(gaps < _GAP_TOL_MM)
    if dup.size:
        i = int(dup[0])
        raise UserError(f"{folder}: duplicate slice position: {series[i].path.name} and {series[i + 1].path.name} are "
                        f"both at {along[i]:.3f} mm along the slice normal ({dup.size} duplicate pair(s)); "
                        "remove the duplicated files")
    median = float(np.median(gaps))
    deviation = np.abs(gaps - median)
    worst = int(np.argmax(deviation))
    if deviation[worst] > max(_GAP_TOL_MM, _GAP_TOL_REL * median):
        raise UserError(
            f"{folder}: slice positions are not evenly spaced: gaps range from {gaps.min():.4g} to {gaps.max():.4g} mm "
            f"(largest deviation from the median gap of {median:.4g} mm: {deviation[worst]:.4g} mm, between "
            f"{series[worst].path.name} and {series[worst + 1].path.name}); slices are missing or misplaced, so the "
            "series cannot be stacked into a regular grid")
    # Slices shifted sideways (gantry tilt): ITK would build a sheared volume without saying so.
    inplane = np.array([s.position - (s.position @ normal) * normal for s in series])
    drift = float(np.linalg.norm(inplane - inplane[0], axis=1).max())
    if drift > max(_GAP_TOL_MM, 0.05 * first.pixel_spacing):
        raise UserError(f"{folder}: slice positions drift sideways by up to {drift:.3g} mm (gantry tilt or shifted "
                        "slices); the series does not form a rectangular grid — resample it first (e.g. dcm2niix)")
    return series


def _read_dicom_folder(folder: Path, series_uid: str | None) -> sitk.Image:
    slices, others = _scan_dicom(folder)
    if not slices:
        subdirs = [p.name for p in folder.iterdir() if p.is_dir()]
        hint = f" (subfolders are not searched: {', '.join(sorted(subdirs)[:5])})" if subdirs else ""
        raise UserError(f"{folder}: no DICOM files found among {others} file(s){hint}; give the folder that holds "
                        "the series' slice files")
    series = _pick_series(folder, slices, series_uid)
    if len(series) == 1:
        # One file: a multi-frame DICOM holds a whole volume, a classic one a single slice.
        return _read_file(series[0].path)
    series = _check_series(folder, series)
    rows_cols = series[0].size[:2]
    _check_memory(folder, int(np.prod(rows_cols, dtype=np.int64)) * len(series), max(4, series[0].pixel_bytes))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(s.path) for s in series])
    reader.MetaDataDictionaryArrayUpdateOff()
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise UserError(f"{folder}: cannot decode the DICOM pixel data ({_itk_reason(exc)}); a file may be "
                        "truncated or use an unsupported compression") from None
    _check_duplicate_pixels(folder, image, series)
    _check_direction(folder, image.GetDirection())
    return image


def _check_duplicate_pixels(folder: Path, image: sitk.Image, series: list[_Slice]) -> None:
    """Refuse neighbouring slices with identical, non-blank pixel data: a file exported twice.

    Real neighbouring CT slices always differ by noise, so bit-identical ones (at different
    positions) mean a slice was duplicated and the volume's anatomy is wrong from there on.
    """
    voxels = sitk.GetArrayViewFromImage(image)  # (z, y, x)
    for k in range(voxels.shape[0] - 1):
        a, b = voxels[k], voxels[k + 1]
        if a.min() != a.max() and np.array_equal(a, b):
            raise UserError(f"{folder}: duplicate slice: {series[k].path.name} and {series[k + 1].path.name} hold "
                            "identical pixel data at different positions; remove the duplicated file "
                            "or export the series again")


# --------------------------------------------------------------------------------------------
# MONAI reader
# --------------------------------------------------------------------------------------------


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
    say which key a file belongs to); :func:`unetpp3d.check.run_check` verifies labels fully.

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
            if not (p.is_dir() or p.name.lower().endswith(SUPPORTED_SUFFIXES)):
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
