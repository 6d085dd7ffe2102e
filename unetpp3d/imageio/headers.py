"""MetaImage and NRRD text headers: read them as ITK will, and refuse what it would read wrongly.

Both formats may keep their voxels in another file that the header names (MetaImage
``ElementDataFile``, NRRD ``data file``). That name may point anywhere: ``/etc/passwd`` and
``../secret.bin`` were read as voxels, a FIFO made the read wait forever. A detached data file
must therefore be one regular file inside the header's own folder (symlinks resolved), named
once; lists and file patterns are refused. Voxel data shorter than the header declares is
refused too, before ITK allocates the declared size or fills the missing end with zeros.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

from unetpp3d.errors import UserError
from unetpp3d.readable import is_inside, not_regular_reason

# MetaIO keeps its per-dimension fields in arrays of this length: a header declaring more
# dimensions (or a negative number) makes ITK's MetaImage reader write past them and crash.
_METAIMAGE_MAX_DIMS = 10


_HEADER_BYTES = 1 << 16  # text headers are a few hundred bytes; ITK reads no further for fields


def _metaimage_header(path: Path) -> tuple[dict[str, str], int]:
    """The ``Key = Value`` fields of a MetaImage header (up to ``ElementDataFile``) and the offset after it.

    MetaIO takes ``=`` or ``:`` (whichever comes first) between a key and its value, matches keys
    case-sensitively and stops at the first ``ElementDataFile``; so does this.
    """
    with open(path, "rb") as fh:
        head = fh.read(_HEADER_BYTES)
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(head):
        end = head.find(b"\n", pos)
        end = len(head) if end < 0 else end
        line = head[pos:end].decode("latin-1")
        pos = end + 1
        cut = min((i for i in (line.find("="), line.find(":")) if i >= 0), default=-1)
        if cut < 0:
            continue
        key, value = line[:cut].strip(), line[cut + 1:].strip()
        fields.setdefault(key, value)
        if key == "ElementDataFile":
            break
    return fields, pos


def _plain_file_name(name: str) -> bool:
    """One data file's name: spaces and non-ASCII letters are fine (ITK writes "scan 1.raw"); a
    "%", "LIST" or control characters are not."""
    return bool(name) and name.split()[0].upper() != "LIST" and "%" not in name and not any(
        ord(c) < 32 or ord(c) == 127 for c in name)


def _detached_file(path: Path, field: str, name: str) -> Path:
    """The data file a header names, once it is known to be a regular file inside the header's folder.

    Raises:
        UserError: the name leads outside the header's folder (``..``, an absolute path, a
            symlink), or to something that is missing or not a regular file (a FIFO, a device).
    """
    if name.strip() == "-":  # teem (ITK's NRRD reader) reads "-" from standard input: it would wait there
        raise UserError(f"{path}: the header's {field} is '-', standard input, which is never read; name the file "
                        "that holds the voxels")
    # Headers are parsed as latin-1; ITK takes the name's bytes as they are (UTF-8 on Linux).
    # An absolute name replaces the folder, as in ITK.
    candidate = path.parent / os.fsdecode(name.encode("latin-1"))
    if not is_inside(candidate, path.parent):
        raise UserError(f"{path}: the header's {field} {name[:80]!r} points outside the header's folder (to "
                        f"{candidate.resolve()}); only a data file beside the header is read — move the voxel data "
                        "there and name it without a path")
    reason = not_regular_reason(candidate)
    if reason is not None:
        raise UserError(f"{path}: the header's {field} {name[:80]!r}: the data file {reason}")
    if candidate.resolve() == path.resolve():  # its own text read as voxels: a damaged header
        raise UserError(f"{path}: the header's {field} {name[:80]!r} names the header itself; name the file that "
                        "holds the voxels")
    return candidate


def _metaimage_precheck(path: Path) -> tuple[dict[str, str], int]:
    """Refuse a MetaImage header that would crash ITK's reader (it runs in our process) or read another file."""
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
    if data_file.upper() != "LOCAL":
        if not _plain_file_name(data_file):
            # MetaIO reads "LIST" and a value holding "%" ("pattern min max step", the pattern a
            # printf format) as slices in many files; damaged voxel bytes taken for such a pattern
            # wrote past a buffer (valgrind) and corrupted the heap of the reading process (found by
            # tests/test_fuzz.py). CT needs no more than the voxels inline or in one other file.
            raise UserError(f"{path}: the MetaImage header's ElementDataFile = {data_file[:40]!r} is neither LOCAL "
                            "nor one file name (multi-file lists and patterns are not supported, and a damaged "
                            "header looks like one); store the volume as one .mha, .nrrd or .nii.gz")
        _detached_file(path, "ElementDataFile", data_file)
    return fields, data_start


def _data_holds(source: Path, offset: int, expected: int, compressed: bool) -> bool:
    """Whether ``source`` from ``offset`` holds ``expected`` bytes of voxels (after inflating, if compressed).

    A compressed stream is inflated (and discarded) only up to ``expected`` bytes.
    """
    if not compressed:
        return source.stat().st_size - offset >= expected
    inflate = zlib.decompressobj(47)  # a zlib or gzip stream, as ITK's readers accept
    total = 0
    # Inflate past the declared size only a little: far enough to reach the stream's end (its
    # checksum, which a stream cut short lacks), not through data the header does not declare.
    limit = expected + (1 << 20)
    try:
        with open(source, "rb") as fh:
            fh.seek(offset)
            buf = fh.read(1 << 20)
            while buf and not inflate.eof and total < limit:
                total += len(inflate.decompress(buf, 1 << 24))
                buf = inflate.unconsumed_tail or (b"" if inflate.eof else fh.read(1 << 20))
    except (OSError, zlib.error):
        return False
    return total >= expected and (inflate.eof or total >= limit)


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
        source, offset = _detached_file(path, "ElementDataFile", data_file), 0
    else:  # headers to skip: left to ITK
        return
    if not _data_holds(source, offset, expected, compressed):
        _refuse_short_data(path, expected, compressed)


def _nrrd_header(path: Path) -> tuple[dict[str, str], int | None]:
    """The fields of a NRRD header (keys lower-cased, as teem matches them) and where attached data starts.

    The data start is None when the header ends without the blank line that precedes attached
    data (a detached ``.nhdr``).
    """
    with open(path, "rb") as fh:
        head = fh.read(_HEADER_BYTES)
    if not head.startswith(b"NRRD"):
        return {}, None
    end = head.find(b"\n\n")
    text = head[:end] if end >= 0 else head
    fields: dict[str, str] = {}
    for line in text.decode("latin-1").splitlines()[1:]:
        key, sep, value = line.partition(": ")
        if sep and not line.startswith("#") and ":=" not in key + sep:
            fields.setdefault(" ".join(key.lower().split()), value.strip())
    return fields, (end + 2 if end >= 0 else None)


def _nrrd_precheck(path: Path) -> tuple[dict[str, str], int | None]:
    """Refuse a NRRD whose detached data is a list, a pattern, or a file outside its folder."""
    fields, data_start = _nrrd_header(path)
    for key in ("data file", "datafile"):
        if key in fields:
            name = fields[key]
            if not _plain_file_name(name):
                raise UserError(f"{path}: the NRRD header's data file {name[:40]!r} is a list or a pattern of "
                                "several files, which is not supported; store the volume as one .nrrd or .nii.gz")
            _detached_file(path, "data file", name)
    return fields, data_start


def _nrrd_data_complete(path: Path, expected: int) -> None:
    """Refuse a NRRD whose raw or gzip voxel data (attached or in its one data file) is shorter than declared.

    ITK allocates the declared size before it finds the data missing: seconds and gigabytes
    for a damaged header on a kilobyte file.
    """
    fields, data_start = _nrrd_precheck(path)
    if any(k in fields for k in ("line skip", "lineskip", "byte skip", "byteskip")):
        return  # offset data: left to ITK
    name = fields.get("data file", fields.get("datafile"))
    if name is not None:
        source, offset = _detached_file(path, "data file", name), 0
    elif data_start is not None:
        source, offset = path, data_start
    else:
        return
    encoding = fields.get("encoding", "").lower()
    if encoding in ("raw", "gz", "gzip"):
        compressed = encoding != "raw"
        if not _data_holds(source, offset, expected, compressed):
            _refuse_short_data(path, expected, compressed)

