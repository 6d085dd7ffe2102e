"""NIfTI checks: a complete file, finite voxels, one unambiguous grid, and scaling every reader agrees on.

ITK and nibabel (and with it most viewers) read some legal NIfTI headers differently. Each such
case is decided here by the NIfTI-1 standard (``nifti1.h``), refused with one line where the
standard leaves it ambiguous, and otherwise read so that the grid agrees with nibabel's affine:

* **qform and sform.** The standard defines both transforms (method 2, ``qform_code > 0``:
  "scanner" coordinates from ``pixdim`` and a quaternion; method 3, ``sform_code > 0``: a general
  affine) and says nothing about which one wins when both are set. ITK uses the qform (unless
  ``sform_code`` is 1), nibabel the sform. When both are valid and describe the same grid either
  is right; when they disagree the file is ambiguous and refused. When only one is valid it is
  used, also where ITK would have used the broken one (a qform whose ``pixdim`` is NaN gave
  1 mm voxels).
* **pixdim.** Method 3 does not use ``pixdim``: with a valid sform the voxel size is the length of
  the sform's columns, as in nibabel, whatever ``pixdim`` holds (ITK took NaN there as 1 mm).
* **Neither code set** (method 1, "for backwards compatibility with ANALYZE 7.5"): the standard
  gives no orientation and the readers place the volume differently; refused.
* **scl_slope 0** means "no scaling" by the standard, so nibabel ignores ``scl_inter``; ITK adds it.
  A slope of 0 (or NaN) with a non-zero ``scl_inter`` is refused, as is a valid slope with a
  non-finite intercept (nibabel refuses it, ITK ignores it).
"""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from unetpp3d.errors import UserError
from unetpp3d.geometry import Geometry, fmt_values

# Direction columns must be perpendicular unit vectors to within this (float32 headers carry ~1e-7).
_ORTHO_TOL = 1e-3

_LPS = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS: the sign of the first two world axes


def load_header(path: Path) -> nib.Nifti1Image:
    """nibabel's view of the file (header only; the voxels stay on disk).

    Raises:
        UserError: the header cannot be parsed.
    """
    try:
        return nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for damaged headers
        raise UserError(f"{path}: cannot read the NIfTI header ({type(exc).__name__}: {exc}); "
                        "the file is damaged or not NIfTI") from None


def raw_header(path: Path) -> nib.Nifti1Header:
    """The header as stored: ``nib.load`` moves the scaling out of ``img.header`` (and refuses some).

    Raises:
        UserError: the header cannot be parsed.
    """
    try:
        with nib.openers.ImageOpener(str(path)) as fh:
            head = fh.read(4)
            size = int.from_bytes(head, "little") if int.from_bytes(head, "little") in (348, 540) \
                else int.from_bytes(head, "big")
            klass = nib.Nifti2Header if size == 540 else nib.Nifti1Header
            fh.seek(0)
            return klass.from_fileobj(fh, check=False)
    except Exception as exc:  # nibabel and gzip raise several types for damaged headers
        raise UserError(f"{path}: cannot read the NIfTI header ({type(exc).__name__}: {exc}); "
                        "the file is damaged or not NIfTI") from None


def _nifti_complete(path: Path, img: nib.Nifti1Image | None = None) -> None:
    """Refuse a truncated NIfTI file, which ITK would otherwise read with the missing end zero-filled."""
    img = img if img is not None else load_header(path)
    try:
        header = img.header
        # The offset of the file's own header (vox_offset): nibabel resets img.header's to 0.
        expected = int(img.dataobj.offset) + int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
    except Exception as exc:
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


def is_complete(path: Path) -> bool:
    """Whether a NIfTI file has a readable header and all the voxel bytes it declares."""
    try:
        _nifti_complete(path)
    except (UserError, OSError):
        return False
    return True


def _nifti_finite(path: Path, img: nib.Nifti1Image | None = None) -> None:
    """Refuse NaN/Inf in a floating-point NIfTI: ITK's NIfTI reader silently turns them into 0.

    Scanned with nibabel in slabs along the last axis, so memory stays at a few slices.
    """
    img = img if img is not None else load_header(path)
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


def check_scaling(path: Path, header: nib.Nifti1Header) -> None:
    """Refuse ``scl_slope``/``scl_inter`` pairs that ITK and nibabel apply differently (see the module)."""
    slope, inter = float(header["scl_slope"]), float(header["scl_inter"])
    no_scaling = slope == 0 or not math.isfinite(slope)
    if no_scaling and math.isfinite(inter) and inter != 0:
        raise UserError(f"{path}: scl_slope is {slope:g} with scl_inter {inter:g}: by the NIfTI standard a slope of "
                        f"0 means no scaling (nibabel reads the stored values) but ITK adds {inter:g} to every voxel; "
                        "set scl_inter to 0 (no scaling) or scl_slope to 1 (add it)")
    if not no_scaling and not math.isfinite(inter):
        raise UserError(f"{path}: scl_slope is {slope:g} but scl_inter is {inter:g}, not a number; the header is "
                        "damaged — set scl_inter to 0")


def _grid_from_affine(affine: np.ndarray, size: tuple[int, int, int]) -> Geometry | None:
    """The ITK (LPS) grid of a voxel-to-RAS affine, or None when it is not a rotated, scaled grid."""
    if not np.all(np.isfinite(affine)):
        return None
    lps = _LPS @ affine[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    if np.any(spacing <= 0):
        return None
    direction = lps / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=_ORTHO_TOL):
        return None
    u, _, vt = np.linalg.svd(direction)  # the nearest exact rotation: float32 headers are a little off
    return Geometry(size, spacing, _LPS @ affine[:3, 3], (u @ vt).ravel())


def nifti_grid(path: Path, header: nib.Nifti1Header) -> Geometry:
    """The grid a NIfTI file defines, decided by the standard; refuse what it leaves ambiguous.

    Returns:
        The grid in ITK's convention (LPS, spacing as the affine's column lengths). It agrees
        with ``nib.load(path).affine`` whenever a file is accepted.

    Raises:
        UserError: qform and sform both set and disagreeing, neither set, the one that is set
            invalid, or an sform with shear.
    """
    size = tuple(int(n) for n in (list(header.get_data_shape()) + [1, 1, 1])[:3])
    qcode, scode = int(header["qform_code"]), int(header["sform_code"])
    qform = sform = None
    if qcode > 0:
        try:
            qform = _grid_from_affine(header.get_qform(), size)
        except Exception:  # an invalid quaternion makes nibabel raise
            qform = None
    if scode > 0:
        matrix = header.get_sform()
        sform = _grid_from_affine(matrix, size)
        if sform is None and np.all(np.isfinite(matrix)) and abs(np.linalg.det(matrix[:3, :3])) > 0:
            raise UserError(f"{path}: the sform (sform_code {scode}) has shear (its axes are not perpendicular), which "
                            "a grid of voxels cannot represent and ITK and nibabel read differently; resample the "
                            "scan onto a regular grid")
    if qform is not None and sform is not None:
        if not qform.same_grid(sform):
            raise UserError(f"{path}: the qform (code {qcode}) and the sform (code {scode}) describe different grids "
                            f"(qform: {_place(qform)}; sform: {_place(sform)}) and the NIfTI standard does not say "
                            "which one holds — ITK reads the qform, nibabel and most viewers the sform; make them "
                            "agree (e.g. nibabel's img.set_qform(img.get_sform())) or set the wrong one's code to 0")
        return sform
    if sform is not None:
        return sform
    if qform is not None:
        return qform
    if qcode > 0 or scode > 0:
        raise UserError(f"{path}: the header's {'qform' if qcode > 0 else 'sform'} is not a valid transform "
                        f"(pixdim {fmt_values(header['pixdim'][1:4])}); the file is damaged — fix its header or "
                        "export the scan again")
    raise UserError(f"{path}: the NIfTI header sets neither a qform nor an sform (both codes are 0), so the scan's "
                    "orientation and position are unknown and readers place it differently; set the sform or "
                    "qform (e.g. with nibabel or fslorient) or export the scan again")


def _place(grid: Geometry) -> str:
    return f"origin {fmt_values(grid.origin)} mm, spacing {fmt_values(grid.spacing)} mm"
