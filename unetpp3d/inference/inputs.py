"""The scans to segment: command-line inputs (files, DICOM folders, folders of scans, manifests) as named cases.

``unetpp3d infer`` and a bundle's datalist (:func:`unetpp3d.bundle.components.scan_datalist`)
both expand their inputs here, so both name each case, and its output, alike.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from unetpp3d.data.manifest import case_name, load_manifest
from unetpp3d.errors import UserError
from unetpp3d.imageio.formats import IMAGE_SUFFIXES
from unetpp3d.readable import path_kind

log = logging.getLogger("unetpp3d")


MANIFEST_SUFFIXES = (".json",)


@dataclass
class InputCase:
    """One scan to segment: a name for its outputs, its path, or why it cannot be read."""

    name: str
    path: Path
    error: str | None = None


def _is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _is_dicom_folder(folder: Path) -> bool:
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]
    return any(_is_dicom_file(p) for p in files[:16])


# nnU-Net names a case's first (here: only) input channel <case>_0000<ending>; its labels are <case><ending>.
NNUNET_CHANNEL_0 = "_0000"


def _image_name(path: Path) -> str:
    name = case_name(path)  # a DICOM folder called "dicom" is named after its parent
    if path.is_dir() or name == path.name:  # a folder, or a file with no image suffix
        return name
    # imagesTs/liver_005_0000.nii.gz -> liver_005, the name of its mask in labelsTs/ (as nnU-Net writes it).
    if name.endswith(NNUNET_CHANNEL_0) and len(name) > len(NNUNET_CHANNEL_0):
        return name[: -len(NNUNET_CHANNEL_0)]
    return name


def is_dicom(path: str | Path) -> bool:
    """Whether an input (as :func:`expand_inputs` accepts it) is DICOM: a series folder or a DICOM file."""
    path = Path(path)
    return _is_dicom_folder(path) if path.is_dir() else path.is_file() and _is_dicom_file(path)


def expand_inputs(inputs: Sequence[str | Path]) -> list[InputCase]:
    """Turn command-line inputs into cases.

    Each input is an image file, a DICOM series folder, a folder of such inputs (image files and
    DICOM series subfolders directly inside it), or a manifest (its test cases, else its
    training images). A missing or unsupported input becomes a case with an ``error``, so that
    a batch reports it and carries on. A case is named after its file without the image suffix
    and without nnU-Net's channel suffix ``_0000`` (``liver_005_0000.nii.gz`` is ``liver_005``, as
    its reference in ``labelsTs/`` is named), or after its DICOM folder. Names are made unique by
    prefixing the parent folder.

    Raises:
        UserError: no inputs given, or a manifest that cannot be read.
    """
    if not inputs:
        raise UserError("no inputs given; pass scan files, DICOM folders, folders of scans or a manifest")
    found: list[InputCase] = []
    for raw in inputs:
        path = Path(raw)
        kind = path_kind(path)
        if kind == "missing":
            found.append(InputCase(_image_name(path), path, "no such file or folder"))
        elif kind == "other":  # opening a FIFO would wait for a writer; a device never ends
            found.append(InputCase(_image_name(path), path, "is a FIFO, device or socket, not a scan file or folder"))
        elif path.is_file() and path.name.lower().endswith(MANIFEST_SUFFIXES):
            manifest = load_manifest(path)
            cases = manifest.test or manifest.training
            if not manifest.test:
                log.info("%s: no test cases; segmenting its %d training image(s)", path, len(cases))
            found.extend(InputCase(c.name, Path(c.image)) for c in cases)
        elif path.is_file():
            if path.name.lower().endswith(IMAGE_SUFFIXES) or _is_dicom_file(path):
                found.append(InputCase(_image_name(path), path))
            else:
                found.append(InputCase(_image_name(path), path,
                                       f"not a supported scan (use {', '.join(IMAGE_SUFFIXES)}, a DICOM folder "
                                       "or a manifest .json)"))
        elif _is_dicom_folder(path):
            found.append(InputCase(_image_name(path), path))
        else:
            before = len(found)
            for entry in sorted(path.iterdir()):
                if entry.name.startswith("."):
                    continue
                if entry.is_file() and entry.name.lower().endswith(IMAGE_SUFFIXES):
                    found.append(InputCase(_image_name(entry), entry))
                elif entry.is_dir() and _is_dicom_folder(entry):
                    found.append(InputCase(_image_name(entry), entry))
            if len(found) == before:
                found.append(InputCase(_image_name(path), path, "no scans in this folder (image files or DICOM series "
                                                                 "folders directly inside it)"))
    if not found:
        raise UserError(f"{', '.join(map(str, inputs))}: no scans to segment (the manifest lists no cases)")
    # Unique output names: prefix the parent folder's name, then number what still collides.
    counts: dict[str, int] = {}
    for case in found:
        counts[case.name] = counts.get(case.name, 0) + 1
    seen: set[str] = set()
    for case in found:
        first = case.name
        if counts[case.name] > 1 and case.path.resolve().parent.name:
            case.name = f"{case.path.resolve().parent.name}_{case.name}"
        name, k = case.name, 2
        while name in seen:
            name, k = f"{case.name}_{k}", k + 1
        case.name = name
        seen.add(name)
        if name != first:  # the output is not where the input's name says: tell the user which is which
            log.warning("%s: %d inputs would be named %r; this one's outputs are named %r", case.path,
                        counts[first], first, name)
    return found
