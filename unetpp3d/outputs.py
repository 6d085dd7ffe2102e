"""Where a command may write: the one rule every command checks before it does any work.

An output never destroys an input, and never replaces a file unetpp3d did not write:

* it must not resolve (symlinks and hard links included) to any input file, nor to an input
  folder, nor sit directly inside an input folder given as a whole (a DICOM series folder, a
  folder of scans);
* its name must carry the suffix of what is written (``.nii.gz`` for a mask, ``.png`` for a
  preview, ``.csv`` for a table, ``.json`` for a fingerprint), so ``--out notes.txt`` is refused;
* where it exists it must be a regular file that looks like what unetpp3d writes there (a NIfTI
  marked as ours, a PNG, a CSV with our header, a JSON with our keys); anything else is refused,
  not replaced.

The checks run before inference, scoring or checking starts, so a mistake costs nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib

from unetpp3d.errors import UserError
from unetpp3d.readable import path_kind

# The NIfTI ``descrip`` field of every file the writer makes starts with this, so that a later
# run can tell its own masks (which it may replace) from a scan or a reference (which it may not).
NIFTI_MARK = "unetpp3d"


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


_MAX_SNIFF = 64 << 20  # a JSON file larger than this is not one of our small reports


@dataclass(frozen=True)
class OutputKind:
    """What a command writes under a name: its description, its suffixes and how to recognise it.

    Attributes:
        name: for messages, e.g. "mask".
        suffixes: allowed endings (lower case), e.g. ``(".nii.gz", ".nii")``.
        is_ours: whether an existing regular file looks like one unetpp3d wrote (so may be replaced).
    """

    name: str
    suffixes: tuple[str, ...]
    is_ours: Callable[[Path], bool]


def nifti_mark(path: Path) -> str | None:
    """The ``descrip`` field of a NIfTI file when it is one unetpp3d wrote ("unetpp3d mask"), else None."""
    try:
        descrip = bytes(nib.load(str(path)).header.get("descrip", b"")).split(b"\x00")[0].decode("latin-1")
    except Exception:  # nibabel raises several types for files that are not NIfTI
        return None
    return descrip if descrip.startswith(NIFTI_MARK) else None


def _marked(note: str) -> Callable[[Path], bool]:
    return lambda path: nifti_mark(path) == f"{NIFTI_MARK} {note}"


def _head(path: Path, n: int) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(n)
    except OSError:
        return b""


def _png(path: Path) -> bool:
    return _head(path, len(_PNG_MAGIC)) == _PNG_MAGIC


def csv_kind(name: str, header_start: str) -> OutputKind:
    """A CSV table whose first line starts with ``header_start``."""

    def ours(path: Path) -> bool:
        return _head(path, len(header_start.encode())).decode("utf-8", "replace") == header_start

    return OutputKind(name, (".csv",), ours)


def json_kind(name: str, keys: Iterable[str]) -> OutputKind:
    """A JSON object holding all of ``keys``."""
    required = tuple(keys)

    def ours(path: Path) -> bool:
        try:
            if path.stat().st_size > _MAX_SNIFF:
                return False
            data = json.loads(path.read_bytes())
        except (OSError, ValueError, RecursionError):
            return False
        return isinstance(data, dict) and all(k in data for k in required)

    return OutputKind(name, (".json",), ours)


MASK = OutputKind("mask", (".nii.gz", ".nii"), _marked("mask"))
NIFTI_IMAGE = OutputKind("image", (".nii.gz", ".nii"), _marked("image"))
NIFTI_PROBABILITIES = OutputKind("probability map", (".nii.gz", ".nii"), _marked("probabilities"))
PNG = OutputKind("PNG picture", (".png",), _png)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _collides(out: Path, inputs: list[tuple[Path, Path, str]]) -> str | None:
    """How ``out`` would touch an input (``"is"``, ``"is inside"``), with the input, or None."""
    resolved = out.resolve()
    for given, real, kind in inputs:
        if resolved == real or (out.exists() and _same_file(out, given)):
            return f"is the input {given}"
        if kind == "folder" and resolved.parent == real:
            return f"would be written into the input folder {given}"
    return None


def check_outputs(outputs: Iterable[str | Path], kind: OutputKind, inputs: Iterable[str | Path] = (),
                  flag: str = "--out") -> None:
    """Refuse outputs that would destroy an input or replace a file unetpp3d did not write.

    Args:
        outputs: every file the command is about to write with this kind.
        kind: what is written (see :data:`MASK`, :data:`PNG`, :func:`csv_kind`, :func:`json_kind`).
        inputs: the files and folders the command reads. A folder counts as an input as a whole:
            nothing may be written directly into it.
        flag: the option that named the outputs, for messages.

    Raises:
        UserError: ``"<flag> <path>: <problem>; <what to do>"`` for the first output that breaks
            the rule.
    """
    resolved_inputs = []
    for item in inputs:
        item = Path(item)
        kind_of = path_kind(item)
        if kind_of != "missing":
            resolved_inputs.append((item, item.resolve(), kind_of))
    for out in outputs:
        out = Path(out)
        if not out.name.lower().endswith(kind.suffixes):
            raise UserError(f"{flag} {out}: a {kind.name} is written as {' or '.join(kind.suffixes)}; "
                            f"name the file {out.name.split('.')[0] or 'output'}{kind.suffixes[0]}")
        hit = _collides(out, resolved_inputs)
        if hit:
            raise UserError(f"{flag} {out}: {hit}; writing there would destroy or change an input — "
                            "choose another output")
        existing = path_kind(out)
        if existing == "folder":
            raise UserError(f"{flag} {out}: is a folder; give a file name or another folder")
        if existing == "other":
            raise UserError(f"{flag} {out}: exists and is not a regular file (a FIFO, device or socket); "
                            "choose another output")
        # An empty file holds nothing to lose (an interrupted or failed write of an old version).
        if existing == "file" and out.stat().st_size > 0 and not kind.is_ours(out):
            article = "an" if kind.name[:1].lower() in "aeiou" else "a"
            raise UserError(f"{flag} {out}: exists and is not {article} {kind.name} written by unetpp3d; refusing to "
                            "replace it — move it away or choose another output")
