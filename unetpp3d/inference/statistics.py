"""Per-class statistics of a mask over its scan: volume in mL and mean/std intensity (HU) inside it.

What ``unetpp3d infer --statistics`` writes, as TotalSegmentator's ``--statistics`` (``-s``)
does: one JSON per case (``<case>.statistics.json``) and, for a folder of outputs, one table
for all cases (``statistics.csv``).

Intensities are the scan's voxel values as read (HU for CT: DICOM's rescale slope and
intercept applied), over the mask on the scan's own grid. The standard deviation is the
population one (``ddof=0``); a class with no voxel has volume 0 and no mean or std (``null``
in JSON, empty in the CSV).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from unetpp3d.atomic import atomic_write_csv
from unetpp3d.errors import UserError
from unetpp3d.geometry import Geometry
from unetpp3d.strictjson import strict_loads

STATISTICS_TABLE = "statistics.csv"


@dataclass
class ClassStatistics:
    """One class of one case.

    Attributes:
        case: the case's name.
        label: the class number in the mask.
        name: the class's name (the model's label name).
        voxels: voxels of the class.
        volume_ml: their volume in mL.
        mean_hu: mean intensity inside the class (HU for CT), None when it has no voxel.
        std_hu: standard deviation of the intensity inside the class, None when it has no voxel.
    """

    case: str
    label: int
    name: str
    voxels: int
    volume_ml: float
    mean_hu: float | None
    std_hu: float | None


def class_statistics(case: str, mask_xyz: np.ndarray, image_xyz: np.ndarray, geometry: Geometry,
                     labels: Mapping[int | str, str]) -> list[ClassStatistics]:
    """Volume and intensity statistics of every foreground class of ``labels``, present or not.

    Args:
        case: the case's name, for the rows.
        mask_xyz: integer labels on the scan's grid.
        image_xyz: the scan's voxels, same shape.
        geometry: the grid (for the voxel volume).
        labels: class number -> name (the model's labels; background 0 left out).

    Returns:
        One :class:`ClassStatistics` per foreground class, by class number.
    """
    if mask_xyz.shape != image_xyz.shape:
        raise ValueError(f"{case}: mask {mask_xyz.shape} and scan {image_xyz.shape} differ in shape")
    voxel_ml = geometry.voxel_volume_ml()
    rows = []
    for label, name in sorted((int(k), str(v)) for k, v in labels.items()):
        if label == 0:
            continue
        inside = image_xyz[mask_xyz == label].astype(np.float64)
        mean, std = (float(inside.mean()), float(inside.std())) if inside.size else (None, None)
        rows.append(ClassStatistics(case, label, name, int(inside.size), inside.size * voxel_ml, mean, std))
    return rows


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(float(value), digits)


def statistics_json(rows: Iterable[ClassStatistics], **about: Any) -> str:
    """One case's statistics as JSON: ``about`` (case, image, mask, model …) and per class name
    ``{"label", "voxels", "volume_ml", "mean_hu", "std_hu"}``."""
    classes = {r.name: {"label": r.label, "voxels": r.voxels, "volume_ml": _rounded(r.volume_ml, 4),
                        "mean_hu": _rounded(r.mean_hu, 3), "std_hu": _rounded(r.std_hu, 3)} for r in rows}
    return json.dumps({**about, "classes": classes}, indent=1, ensure_ascii=False) + "\n"


def read_statistics_json(path: str | Path) -> list[ClassStatistics]:
    """The rows of a JSON that :func:`statistics_json` wrote (for a case skipped in a later batch).

    Raises:
        UserError: the file is not such a JSON.
    """
    path = Path(path)
    try:
        data = strict_loads(path.read_text(encoding="utf-8"))
        return [ClassStatistics(data["case"], int(v["label"]), name, int(v["voxels"]), float(v["volume_ml"]),
                                v["mean_hu"], v["std_hu"]) for name, v in data["classes"].items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{path}: not a statistics file written by unetpp3d infer ({exc}); delete it and rerun "
                        "without --skip-existing") from None


def write_statistics_table(rows: Iterable[ClassStatistics], path: str | Path) -> Path:
    """Write every case's rows as one CSV (one row per case and class), atomically."""
    records = []
    for row in rows:
        record = asdict(row)
        record["volume_ml"] = _rounded(row.volume_ml, 4)
        record["mean_hu"], record["std_hu"] = _rounded(row.mean_hu, 3), _rounded(row.std_hu, 3)
        records.append({k: "" if v is None else v for k, v in record.items()})
    return atomic_write_csv(path, [f.name for f in fields(ClassStatistics)], records)
