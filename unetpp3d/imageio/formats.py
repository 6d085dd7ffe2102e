"""Read one image file with SimpleITK, after the format checks that keep ITK from reading it wrongly.

ITK silently zero-fills truncated NIfTI and MetaImage data, allocates whatever a damaged header
declares, and crashes on some malformed MetaImage headers; each check here refuses such a file
from its header or a bounded scan, before ITK sees it, with a one-line :class:`UserError`.
"""

from __future__ import annotations

import gzip
import math
import mmap
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from unetpp3d.errors import UserError
from unetpp3d.geometry import fmt_values
from unetpp3d.hardware import available_memory

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
