"""Read one image file with SimpleITK, after the format checks that keep ITK from reading it wrongly.

ITK silently zero-fills truncated NIfTI and MetaImage data, allocates whatever a damaged header
declares, and crashes on some malformed MetaImage headers; each check here refuses such a file
from its header or a bounded scan, before ITK sees it, with a one-line :class:`UserError`.
"""

from __future__ import annotations

import math
import mmap
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from unetpp3d.errors import UserError
from unetpp3d.geometry import Geometry, fmt_values
from unetpp3d.hardware import available_memory
from unetpp3d.imageio.headers import _metaimage_data_complete, _metaimage_precheck, _nrrd_data_complete, _nrrd_precheck
from unetpp3d.imageio.nifti import _nifti_complete, _nifti_finite, check_scaling, load_header, nifti_grid, raw_header
from unetpp3d.readable import not_regular_reason

# The one list of image file suffixes that the readers accept, matched case-insensitively on the
# file name: NIfTI, NRRD (attached or detached header), MetaImage (.mha or .mhd + data file), and
# single DICOM files. A DICOM series is a folder.
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")


# The suffixes of files that hold a whole volume each (every image suffix but a DICOM slice's):
# what a folder of masks may contain.
VOLUME_SUFFIXES = tuple(s for s in IMAGE_SUFFIXES if s != ".dcm")


# GetArrayFromImage copies the ITK buffer, so a read briefly holds two copies of the voxels.
_READ_COPIES = 2


_PIXEL_BYTES = {
    sitk.sitkUInt8: 1, sitk.sitkInt8: 1, sitk.sitkUInt16: 2, sitk.sitkInt16: 2,
    sitk.sitkUInt32: 4, sitk.sitkInt32: 4, sitk.sitkUInt64: 8, sitk.sitkInt64: 8,
    sitk.sitkFloat32: 4, sitk.sitkFloat64: 8,
}


def _available_memory() -> int | None:
    """Bytes of memory available to a new allocation (the machine's and the cgroup's), or None where unknown."""
    return available_memory()


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
        raise UserError(f"{path}: voxel spacing {fmt_values(spacing[:3])} is not positive; fix the file's header")


# The ITK reader for each name we accept. Naming it keeps ITK from choosing by content among
# all its readers, several of which open other files that a header names (Analyze, Stimulate).
_IMAGE_IOS = ((".nii.gz", "NiftiImageIO"), (".nii", "NiftiImageIO"), (".nrrd", "NrrdImageIO"),
              (".nhdr", "NrrdImageIO"), (".mha", "MetaImageIO"), (".mhd", "MetaImageIO"), (".dcm", "GDCMImageIO"))


def _image_io(path: Path) -> str:
    name = path.name.lower()
    for suffix, io in _IMAGE_IOS:
        if name.endswith(suffix):
            return io
    with open(path, "rb") as fh:
        head = fh.read(132)
    if head[128:132] == b"DICM":
        return "GDCMImageIO"
    raise UserError(f"{path}: not a supported image format (by its name); supported are NIfTI (.nii.gz, .nii), NRRD "
                    "(.nrrd, .nhdr), MetaImage (.mha, .mhd), DICOM files and DICOM series folders")


def _read_file(path: Path, io: str | None = None) -> sitk.Image:
    """Read one image file after the checks of this module; ``io`` forces ITK's reader (else chosen by name)."""
    reason = not_regular_reason(path)
    if reason is not None:
        raise UserError(f"{path}: {reason}")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty (0 bytes)")
    io = io or _image_io(path)
    if io == "MetaImageIO":
        meta_fields, meta_data_start = _metaimage_precheck(path)
    elif io == "NrrdImageIO":
        _nrrd_precheck(path)
    elif io == "GDCMImageIO":
        _check_dicom_lengths(path)
    header = raw_header(path) if io == "NiftiImageIO" else None
    reader = sitk.ImageFileReader()
    reader.SetImageIO(io)
    reader.SetFileName(str(path))
    reader.LoadPrivateTagsOff()
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        if header is not None:  # ITK refuses some headers the checks below explain better (a sheared sform)
            check_scaling(path, header)
            nifti_grid(path, header)
        raise UserError(f"{path}: cannot read it as an image ({_itk_reason(exc)}); supported are NIfTI, NRRD, "
                        "MHA/MHD, DICOM files and DICOM series folders") from None
    dim, size = reader.GetDimension(), reader.GetSize()
    _check_header(path, dim, size, reader.GetSpacing(), reader.GetNumberOfComponents())
    bytes_per_voxel = _PIXEL_BYTES.get(reader.GetPixelID(), 8) * reader.GetNumberOfComponents()
    _check_memory(path, int(np.prod(size, dtype=np.int64)), bytes_per_voxel)
    nifti = None
    if header is not None:
        # The scaling and the grid as the standard defines them, before any voxel is read.
        check_scaling(path, header)
        grid = nifti_grid(path, header)
        nifti = load_header(path)
        _nifti_complete(path, nifti)
    elif io == "GDCMImageIO":
        _check_dicom_pixel_spacing(path, reader)
    n_bytes = int(np.prod(size, dtype=np.int64)) * bytes_per_voxel
    if io == "MetaImageIO":
        _metaimage_data_complete(path, meta_fields, meta_data_start, n_bytes)
    elif io == "NrrdImageIO":
        _nrrd_data_complete(path, n_bytes)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise UserError(f"{path}: cannot read the voxel data ({_itk_reason(exc)}); the file may be truncated "
                        "or corrupt") from None
    if nifti is not None:
        _nifti_finite(path, nifti)
    if image.GetDimension() > 3:  # trailing singleton dimensions, checked above
        image = sitk.Extract(image, size=list(image.GetSize()[:3]) + [0] * (image.GetDimension() - 3),
                             index=[0] * image.GetDimension())
    if nifti is not None and not Geometry.from_sitk(image).same_grid(grid):
        # ITK chose the other transform, or took a NaN pixdim as 1 mm: use the one nifti_grid
        # chose by the standard, which is also nibabel's.
        grid.apply_to(image)
    _check_direction(path, image.GetDirection())
    return image


def _check_dicom_pixel_spacing(path: Path, reader: sitk.ImageFileReader) -> None:
    """Refuse a single DICOM file without a valid PixelSpacing, which GDCM would read as 1 x 1 mm.

    An enhanced (multi-frame) file keeps PixelSpacing in its functional groups, which GDCM reads
    but does not list among the file's top-level tags; when the top level has none, the tag is
    looked for in the file's bytes (explicit or implicit little-endian encoding).
    """
    if reader.HasMetaDataKey("0028|0030"):
        if _pixel_spacing_value(reader.GetMetaData("0028|0030")) is None:
            value = reader.GetMetaData("0028|0030")[:40]
            raise UserError(f"{path}: the DICOM file's PixelSpacing (0028,0030) {value!r} is not two positive "
                            "numbers; fix the file or export the scan again")
        return
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        pos = data.find(b"\x28\x00\x30\x00")
        for _ in range(1000):  # pixel data may hold the same four bytes by chance
            if pos < 0:
                break
            explicit = data[pos + 4:pos + 6] == b"DS"
            length = struct.unpack_from("<H" if explicit else "<I", data, pos + 6 if explicit else pos + 4)[0] \
                if pos + 8 <= len(data) else 0
            if 0 < length <= 64 and _pixel_spacing_value(bytes(data[pos + 8:pos + 8 + length]).decode("latin-1")):
                return
            pos = data.find(b"\x28\x00\x30\x00", pos + 1)
    raise UserError(f"{path}: the DICOM file has no PixelSpacing (0028,0030), so the size of its pixels is unknown "
                    "(ITK would assume 1 x 1 mm); export the scan again with its pixel spacing")


def _pixel_spacing_value(text: str) -> tuple[float, float] | None:
    """The two numbers of a PixelSpacing value, or None when it is not two positive finite numbers."""
    try:
        values = [float(v) for v in text.strip().strip("\x00").split("\\") if v.strip()]
    except ValueError:
        return None
    if len(values) != 2 or not all(math.isfinite(v) and v > 0 for v in values):
        return None
    return values[0], values[1]


def _check_direction(path: Path, direction: Sequence[float]) -> None:
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    if not np.all(np.isfinite(d)) or not np.allclose(d.T @ d, np.eye(3), atol=1e-3):
        raise UserError(f"{path}: the direction matrix {fmt_values(direction)} is not a rotation; fix the file's header")


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
