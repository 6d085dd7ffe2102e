"""Write a label map as a DICOM Segmentation (SEG) that references the DICOM series it was computed on.

DICOM in, DICOM out, as TotalSegmentator's ``--output_type dicom_seg`` does: the SEG belongs to
the source series' study and frame of reference, and each of its frames names the source slice
it lies on, so a PACS or viewer (3D Slicer, OHIF) shows it over that series. It is built with
`highdicom <https://highdicom.readthedocs.io>`_, an optional dependency (``pip install
'unetpp3d[dicom]'``); :func:`require_highdicom` refuses in one line where it is missing.

One frame per source slice that holds any foreground (a BINARY SEG, one segment per foreground
label, empty frames left out as highdicom does by default), placed by the slice's own
ImagePositionPatient, never by file order. Each segment is coded (SNOMED CT) by its label's name:
liver, nodule, tumour (tumor, lesion); any other name is coded as tissue and keeps its name as
the segment label.

Anonymisers sometimes blank the identifiers a SEG must copy. A blank SOPClassUID or
SOPInstanceUID is taken from the file's meta header (which names the object it holds); a blank
StudyInstanceUID or SeriesInstanceUID cannot be recovered, so the SEG gets one derived from the
slices' SOPInstanceUIDs (the same for every run on that series), and the log says that a viewer
will not file it under the source study.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unetpp3d.atomic import atomic_path
from unetpp3d.errors import UserError
from unetpp3d.geometry import Geometry
from unetpp3d.imageio.dicom import series_files

log = logging.getLogger("unetpp3d")

INSTALL_HINT = "pip install 'unetpp3d[dicom]' (or pip install highdicom)"

# Label name -> (segmented property category, segmented property type), as pydicom's SNOMED CT keywords.
_SEGMENT_CODES = {
    "liver": ("AnatomicalStructure", "Liver"),
    "nodule": ("MorphologicallyAbnormalStructure", "Nodule"),
    "tumour": ("MorphologicallyAbnormalStructure", "Neoplasm"),
    "tumor": ("MorphologicallyAbnormalStructure", "Neoplasm"),
    "lesion": ("MorphologicallyAbnormalStructure", "Lesion"),
}
_OTHER_CODES = ("Tissue", "Tissue")

# Where an in-plane offset or slice index counts as on the grid (fractions of a voxel): DS strings
# carry ~1e-6 mm of rounding, a misplaced slice is off by a whole voxel.
_ON_GRID_TOL = 0.01


def require_highdicom() -> None:
    """Refuse, in one line, where highdicom (the DICOM SEG writer) is not installed.

    Raises:
        UserError: highdicom cannot be imported; the message says how to install it.
    """
    try:
        importlib.import_module("highdicom")
    except ImportError:
        raise UserError(f"--output-type dicom-seg needs highdicom, which is not installed: {INSTALL_HINT}") from None


def source_files(source: str | Path, series_uid: str | None = None) -> list[Path]:
    """The DICOM files a scan was read from: a series folder's slices, or the one DICOM file given.

    Raises:
        UserError: ``source`` is not DICOM, or its folder cannot be read as one series.
    """
    source = Path(source)
    if source.is_dir():
        return series_files(source, series_uid)
    with open(source, "rb") as fh:
        head = fh.read(132)
    if source.suffix.lower() != ".dcm" and head[128:132] != b"DICM":
        raise UserError(f"{source}: not a DICOM input, so no DICOM SEG can reference it; use --output-type nifti")
    return [source]


def _blank(ds: Any, keyword: str) -> bool:
    return not str(getattr(ds, keyword, "") or "").strip().rstrip("\x00")


def _fill_identifiers(datasets: list[Any], source: Path) -> None:
    """Give every dataset the identifiers a SEG copies, from the meta header or derived (see the module)."""
    from pydicom.uid import (
        generate_uid,  # optional dependency (the dicom extra), as highdicom
    )

    for ds in datasets:
        meta = getattr(ds, "file_meta", None)
        for keyword, meta_keyword in (("SOPClassUID", "MediaStorageSOPClassUID"),
                                      ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
            if _blank(ds, keyword):
                if meta is None or _blank(meta, meta_keyword):
                    raise UserError(f"{source}: {Path(ds.filename).name} has no {keyword}, in its header or its "
                                    "file meta, so a DICOM SEG cannot reference it; use --output-type nifti")
                setattr(ds, keyword, getattr(meta, meta_keyword))
    instances = sorted(str(ds.SOPInstanceUID) for ds in datasets)
    derived = []
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        if any(_blank(ds, keyword) for ds in datasets):
            uid = generate_uid(entropy_srcs=[keyword, *instances])
            derived.append(f"{keyword} {uid}")
            for ds in datasets:
                setattr(ds, keyword, uid)
    if derived:
        log.warning("%s: the series' slices have no %s (blanked by anonymisation?); the DICOM SEG refers to them by "
                    "their SOPInstanceUIDs and uses %s, derived from those, so a viewer will not file it beside the "
                    "source series", source, " or ".join(d.split()[0] for d in derived), ", ".join(derived))


def _frames(mask_xyz: np.ndarray, geometry: Geometry, datasets: Sequence[Any], source: Path) -> np.ndarray:
    """The mask's slice under each source image, as (rows, columns) = (y, x), in the datasets' order."""
    to_index = np.linalg.inv(geometry.direction_matrix @ np.diag(geometry.spacing))
    frames = []
    for ds in datasets:
        name = Path(ds.filename).name
        if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
            raise UserError(f"{source}: {name} is a multi-frame image; DICOM SEG output is written for series of "
                            "single-frame slices; use --output-type nifti")
        if (int(ds.Columns), int(ds.Rows)) != tuple(geometry.size[:2]):
            raise RuntimeError(f"{source}: {name} is {ds.Columns}x{ds.Rows} pixels, the scan read {geometry.size}")
        position = to_index @ (np.asarray(ds.ImagePositionPatient, dtype=float) - np.asarray(geometry.origin))
        k = int(round(position[2]))
        if np.abs(position[:2]).max() > _ON_GRID_TOL or abs(position[2] - k) > _ON_GRID_TOL \
                or not 0 <= k < geometry.size[2]:
            raise RuntimeError(f"{source}: {name} lies at voxel index {np.round(position, 3).tolist()} of the grid "
                               "the scan was read on, not on one of its slices")
        orientation = np.asarray(ds.ImageOrientationPatient, dtype=float)
        if np.abs(orientation - geometry.direction_matrix[:, :2].T.reshape(-1)).max() > 1e-4:
            raise RuntimeError(f"{source}: {name}'s ImageOrientationPatient differs from the grid's direction")
        frames.append(mask_xyz[:, :, k].T)
    return np.stack(frames)


def _segment_descriptions(labels: Mapping[int, str], task: str, version: str) -> list[Any]:
    import highdicom as hd  # optional dependency (the dicom extra): imported only when a SEG is written
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(name="unetpp3d", version=version,
                                                   family=codes.cid7162.ArtificialIntelligence,
                                                   parameters={"task": task})
    descriptions = []
    for number, name in sorted(labels.items()):
        category, kind = _SEGMENT_CODES.get(name.strip().lower(), _OTHER_CODES)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=name[:64], segmented_property_category=getattr(codes.SCT, category),
            segmented_property_type=getattr(codes.SCT, kind),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm))
    return descriptions


def write_dicom_seg(mask_xyz: np.ndarray, geometry: Geometry, source: str | Path, path: str | Path,
                    labels: Mapping[int, str], task: str = "", series_uid: str | None = None,
                    version: str = "unknown") -> Path:
    """Write a label map as a DICOM SEG referencing the DICOM series it was computed on, atomically.

    Args:
        mask_xyz: integer labels (x, y, z) on ``geometry``, the grid
            :func:`~unetpp3d.imageio.readers.read_image` read ``source`` on.
        geometry: that grid.
        source: the DICOM series folder (or single DICOM file) the scan was read from.
        path: the SEG file to write (``.dcm``); parent folders are created.
        labels: foreground label number -> name, one segment each (background 0 left out).
        task: the model's task, recorded with the algorithm's identification.
        series_uid: the series read from a folder holding several.
        version: unetpp3d's version (the caller's ``unetpp3d.__version__``), recorded as the SEG's
            software version and the algorithm's.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        UserError: highdicom is missing, ``source`` is not a DICOM series of single-frame
            slices, a slice lacks its identifiers, or highdicom refuses the series' headers.
        RuntimeError: the series' slices do not lie on ``geometry`` (the scan was read otherwise).
    """
    require_highdicom()
    import highdicom as hd  # optional dependency (the dicom extra): imported only when a SEG is written
    import pydicom

    source, path = Path(source), Path(path)
    labels = {int(k): str(v) for k, v in labels.items() if int(k) != 0}
    mask = np.asarray(mask_xyz)
    unknown = sorted(set(np.unique(mask).tolist()) - set(labels) - {0})
    if unknown:
        raise ValueError(f"{path}: mask labels {unknown} have no name among {labels}")
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in source_files(source, series_uid)]
    _fill_identifiers(datasets, source)
    frames = _frames(mask, geometry, datasets, source).astype(np.uint8 if max(labels, default=0) < 256 else np.uint16)
    first = datasets[0]
    try:
        seg = hd.seg.Segmentation(
            source_images=datasets, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=_segment_descriptions(labels, task, version), series_instance_uid=hd.UID(),
            series_number=1000 + int(getattr(first, "SeriesNumber", 0) or 0), sop_instance_uid=hd.UID(),
            instance_number=1, manufacturer="unetpp3d", manufacturer_model_name=f"unetpp3d {task}".strip(),
            software_versions=version, device_serial_number="none",
            series_description=f"unetpp3d {task} segmentation (research)".replace("  ", " ")[:64],
            content_qualification=hd.ContentQualificationValues.RESEARCH,
            # An empty mask still gives a SEG (with its frames), so that "nothing found" is recorded too.
            omit_empty_frames=bool(frames.any()),
        )
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise UserError(f"{source}: cannot build a DICOM SEG on this series ({type(exc).__name__} from highdicom: "
                        f"{str(exc).splitlines()[0][:200] if str(exc) else 'no message'}); use --output-type nifti") \
            from None
    with atomic_path(path) as tmp:
        seg.save_as(tmp)
    return path
