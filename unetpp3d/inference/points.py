"""Segment nodules at given points: a detector's or a reader's locations in, masks and measurements out.

The common clinical workflow: a candidate list gives a location per nodule (world LPS mm, as
LUNA16's ``coordX, coordY, coordZ``); for each point the model runs on a crop around it, the
connected component at the point is kept, and the nodule is measured on the scan's own grid.

* :func:`read_points` reads the CSV (columns ``coordX, coordY, coordZ``, any case; an optional
  ``id``; other columns, such as LUNA16's ``seriesuid``, are ignored).
* :func:`segment_points` runs a :class:`~unetpp3d.inference.predictor.Predictor` on a
  ``crop_mm`` cube around each point (clipped to the scan) and returns one label map on the
  scan's grid, label ``i`` for the ``i``-th row, with a :class:`PointResult` per row: volume,
  longest diameter, mean HU, the heads' disagreement, or why there is none (the point lies
  outside the scan; nothing was segmented within ``max_distance_mm`` of it; the crop failed).
  A point's failure never stops the others.
* :func:`write_point_report` writes the results as JSON and CSV.

The component kept is the one containing the point's voxel, else the nearest one whose closest
voxel lies within ``max_distance_mm`` (a detector's centre may fall a voxel or two outside a
small or irregular nodule). Where two points' nodules overlap, the earlier row keeps the shared
voxels and the later row's report says so.
"""

from __future__ import annotations

import csv
import io
import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from unetpp3d.atomic import atomic_write_csv, atomic_write_text
from unetpp3d.errors import UserError
from unetpp3d.geometry import Geometry
from unetpp3d.imageio.readers import read_image
from unetpp3d.imageio.writer import write_image
from unetpp3d.inference.nodules import index_to_lps, nodule_components
from unetpp3d.inference.postprocess import _OBJECT_STRUCTURE

COORD_COLUMNS = ("coordx", "coordy", "coordz")


DEFAULT_CROP_MM = 64.0  # cube edge: a 30 mm nodule with a margin of lung around it


DEFAULT_MAX_DISTANCE_MM = 5.0


@dataclass
class Point:
    """One row of the points CSV: its 1-based row number (the label it gets), id and world LPS position."""

    row: int
    id: str
    lps_mm: tuple[float, float, float]


@dataclass
class PointResult:
    """What was found at one point.

    Attributes:
        row: 1-based row of the CSV; the nodule's label in the label map.
        id: the row's id (its row number when the CSV has no ``id`` column).
        point_lps_mm: the point as given.
        status: ``"ok"``, ``"outside"`` (the point is not inside the scan), ``"nothing found"``
            (no segmented voxel within the distance) or ``"failed"`` (the crop could not be segmented).
        note: a sentence saying why, for anything but ``"ok"`` (and overlaps).
        voxels: voxels labelled for this row in the label map.
        volume_ml: the nodule's volume.
        longest_diameter_mm: largest distance between two surface voxel centres.
        mean_hu: mean intensity of the scan inside the nodule.
        centre_lps_mm: centroid of the nodule.
        distance_mm: from the point to the nodule's nearest voxel (0 when the point is inside it).
        mean_probability: the model's mean nodule probability over the nodule.
        head_disagreement: the UNet++ heads' disagreement over the nodule (0: all agree), or None.
    """

    row: int
    id: str
    point_lps_mm: tuple[float, float, float]
    status: str
    note: str = ""
    voxels: int = 0
    volume_ml: float | None = None
    longest_diameter_mm: float | None = None
    mean_hu: float | None = None
    centre_lps_mm: tuple[float, float, float] | None = None
    distance_mm: float | None = None
    mean_probability: float | None = None
    head_disagreement: float | None = None
    crop_index: dict[str, list[int]] = field(default_factory=dict)


def read_points(path: str | Path) -> list[Point]:
    """Read a points CSV: ``coordX, coordY, coordZ`` in world LPS mm, optional ``id``, one row per nodule.

    Raises:
        UserError: the file is missing or empty, lacks a coordinate column, or a value is not a
            finite number (the message names the row).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--points {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--points {path}: cannot read it as UTF-8 text ({exc})") from None
    reader = csv.DictReader(io.StringIO(text))
    columns = {c.strip().lower(): c for c in reader.fieldnames or []}
    missing = [c for c in COORD_COLUMNS if c not in columns]
    if missing:
        raise UserError(f"--points {path}: needs the columns coordX, coordY, coordZ (world LPS mm, as in LUNA16's "
                        f"candidate lists) and optionally id; it has {', '.join(reader.fieldnames or []) or 'none'}")
    points = []
    for n, row in enumerate(reader, start=1):
        try:
            lps = tuple(float(row[columns[c]]) for c in COORD_COLUMNS)
        except (TypeError, ValueError):
            raise UserError(f"--points {path}: row {n} ({', '.join(str(row[columns[c]]) for c in COORD_COLUMNS)}): "
                            "coordinates must be numbers in mm") from None
        if not all(math.isfinite(v) for v in lps):
            raise UserError(f"--points {path}: row {n}: coordinates must be finite numbers")
        ident = (row.get(columns["id"]) or "").strip() if "id" in columns else ""
        points.append(Point(n, ident or str(n), lps))  # type: ignore[arg-type]
    if not points:
        raise UserError(f"--points {path}: no rows; write one row per nodule under the header coordX,coordY,coordZ")
    return points


def lps_to_index(geometry: Geometry, lps_mm: Any) -> np.ndarray:
    """Continuous voxel index (x, y, z) of a world LPS point; the inverse of :func:`index_to_lps`."""
    direction = np.asarray(geometry.direction, dtype=float).reshape(3, 3)
    offset = np.asarray(lps_mm, dtype=float) - np.asarray(geometry.origin, dtype=float)
    return np.linalg.solve(direction, offset) / np.asarray(geometry.spacing, dtype=float)


def _crop_box(index: np.ndarray, geometry: Geometry, crop_mm: float) -> tuple[slice, slice, slice]:
    centre = np.round(index).astype(int)
    half = np.ceil(crop_mm / 2.0 / np.asarray(geometry.spacing, dtype=float)).astype(int)
    return tuple(slice(int(max(c - h, 0)), int(min(c + h + 1, n)))  # type: ignore[return-value]
                 for c, h, n in zip(centre, half, geometry.size))


def _crop_geometry(geometry: Geometry, box: tuple[slice, slice, slice]) -> Geometry:
    start = np.array([s.start for s in box], dtype=float)
    origin = index_to_lps(geometry, start)[0]
    return Geometry(size=tuple(s.stop - s.start for s in box), spacing=tuple(geometry.spacing),
                    origin=tuple(float(v) for v in origin), direction=tuple(geometry.direction))


def _pick_component(mask: np.ndarray, geometry: Geometry, index: np.ndarray, point_lps: np.ndarray,
                    max_distance_mm: float) -> tuple[np.ndarray | None, float | None]:
    """The component at the point, or the nearest within the distance; and its distance (mm)."""
    components, n = ndimage.label(mask, structure=_OBJECT_STRUCTURE)
    if n == 0:
        return None, None
    at = tuple(int(v) for v in np.round(index))
    if all(0 <= a < s for a, s in zip(at, mask.shape)) and components[at]:
        return components == components[at], 0.0
    voxels = np.argwhere(components > 0)
    distances = np.linalg.norm(index_to_lps(geometry, voxels) - point_lps, axis=1)
    nearest = int(np.argmin(distances))
    if distances[nearest] > max_distance_mm:
        return None, float(distances[nearest])
    return components == components[tuple(voxels[nearest])], float(distances[nearest])


def segment_points(predictor: Any, scan: str | Path, points: list[Point], crop_mm: float = DEFAULT_CROP_MM,
                   max_distance_mm: float = DEFAULT_MAX_DISTANCE_MM) -> tuple[np.ndarray, Geometry, list[PointResult]]:
    """Segment one nodule per point of ``scan``; see the module docstring.

    Args:
        predictor: a :class:`~unetpp3d.inference.predictor.Predictor` (a lung-nodule model).
        scan: the scan the points are in (any format the readers take).
        points: from :func:`read_points`.
        crop_mm: edge of the cube cropped around each point, in mm.
        max_distance_mm: how far from the point the nearest segmented voxel may be.

    Returns:
        ``(labels_xyz, geometry, results)``: the label map on the scan's grid (label ``i`` for
        row ``i``), the scan's geometry, and one :class:`PointResult` per point, in row order.

    Raises:
        UserError: the scan cannot be read, or a setting is out of range.
    """
    if crop_mm <= 0 or max_distance_mm < 0:
        raise UserError(f"--crop-mm {crop_mm} must be positive and the distance {max_distance_mm} not negative")
    image, geometry = read_image(scan)
    labels = np.zeros(geometry.size, dtype=np.uint8 if len(points) < 256 else np.uint16)
    results = []
    with tempfile.TemporaryDirectory(prefix="unetpp3d-points-") as tmp:
        for point in points:
            result = PointResult(point.row, point.id, point.lps_mm, "ok")
            results.append(result)
            index = lps_to_index(geometry, point.lps_mm)
            if not all(-0.5 <= i < n - 0.5 for i, n in zip(index, geometry.size)):
                result.status = "outside"
                result.note = (f"the point ({', '.join(f'{v:g}' for v in point.lps_mm)}) mm is outside the scan "
                               f"(voxel index {', '.join(f'{v:.1f}' for v in index)} of a {'x'.join(map(str, geometry.size))}"
                               " grid); check that the points belong to this scan and are world LPS mm")
                continue
            box = _crop_box(index, geometry, crop_mm)
            crop_geometry = _crop_geometry(geometry, box)
            crop_path = write_image(np.ascontiguousarray(image[box]), crop_geometry, Path(tmp) / f"point{point.row}.nii")
            result.crop_index = {"start": [s.start for s in box], "stop": [s.stop for s in box]}
            try:
                pred = predictor.predict(crop_path)
            except (UserError, RuntimeError, ValueError, MemoryError) as exc:
                result.status, result.note = "failed", f"{type(exc).__name__}: {exc}"
                continue
            start = np.array([s.start for s in box])
            chosen, distance = _pick_component(pred.mask_xyz > 0, crop_geometry, index - start,
                                               np.asarray(point.lps_mm, dtype=float), max_distance_mm)
            if chosen is None:
                result.status = "nothing found"
                result.note = ("the model segmented nothing in the crop" if distance is None else
                               f"the nearest segmented voxel is {distance:.1f} mm from the point (more than "
                               f"{max_distance_mm:g} mm)")
                continue
            _measure(result, chosen, crop_geometry, image[box], pred, distance)
            region = labels[box]
            taken = chosen & (region > 0)
            if taken.any():
                others = sorted(int(v) for v in np.unique(region[taken]))
                result.note = f"overlaps row(s) {', '.join(map(str, others))}: {int(taken.sum())} shared voxel(s) kept there"
            region[chosen & (region == 0)] = point.row
            result.voxels = int((region == point.row).sum())
    return labels, geometry, results


def _measure(result: PointResult, chosen: np.ndarray, geometry: Geometry, image: np.ndarray, pred: Any,
             distance: float) -> None:
    probabilities = pred.probabilities[1] if pred.probabilities is not None else None
    _, found = nodule_components(chosen.astype(np.uint8), geometry, probabilities, spread=pred.spread_xyz)
    nodule = found[0]
    result.volume_ml = round(nodule.volume_ml, 5)
    result.longest_diameter_mm = nodule.longest_diameter_mm
    result.mean_hu = round(float(np.asarray(image, dtype=np.float64)[chosen].mean()), 1)
    result.centre_lps_mm = nodule.centre_lps_mm
    result.distance_mm = round(distance, 2)
    result.mean_probability = nodule.mean_probability
    result.head_disagreement = nodule.head_disagreement


_CSV_FIELDS = ["row", "id", "status", "coordX", "coordY", "coordZ", "voxels", "volume_ml", "longest_diameter_mm",
               "mean_hu", "head_disagreement", "mean_probability", "distance_mm", "note"]


def write_point_report(results: list[PointResult], json_path: str | Path, csv_path: str | Path, source: str = "",
                       points_file: str = "", crop_mm: float = DEFAULT_CROP_MM,
                       max_distance_mm: float = DEFAULT_MAX_DISTANCE_MM) -> None:
    """Write one entry per point as JSON and CSV (atomically); label ``row`` in the mask is that point's nodule."""
    payload = {
        "source": source, "points": points_file, "coordinate_system": "LPS",
        "units": {"volume": "mL", "coordinates": "mm", "longest_diameter": "mm", "mean_hu": "HU"},
        "crop_mm": crop_mm, "max_distance_mm": max_distance_mm,
        "label_note": "label i of the mask is the nodule of row i",
        "head_disagreement_note": "mean spread of the UNet++ heads' probabilities over the nodule: 0 when all heads "
                                  "agree; the higher, the more the mask deserves review",
        "results": [asdict(r) for r in results],
    }
    atomic_write_text(json_path, json.dumps(payload, indent=2) + "\n")
    atomic_write_csv(csv_path, _CSV_FIELDS, [{
            "row": r.row, "id": r.id, "status": r.status, "coordX": r.point_lps_mm[0], "coordY": r.point_lps_mm[1],
            "coordZ": r.point_lps_mm[2], "voxels": r.voxels, **{k: "" if getattr(r, k) is None else getattr(r, k) for k in
                                                                 ("volume_ml", "longest_diameter_mm", "mean_hu",
                                                                  "head_disagreement", "mean_probability", "distance_mm")},
            "note": r.note,
        } for r in results])


def format_results(results: list[PointResult]) -> str:
    """The per-point summary printed by ``unetpp3d infer --points``."""
    rows = [["row", "id", "status", "volume mL", "diameter mm", "mean HU", "disagreement", "note"]]
    for r in results:
        rows.append([str(r.row), r.id, r.status, "" if r.volume_ml is None else f"{r.volume_ml:.3f}",
                     "" if r.longest_diameter_mm is None else f"{r.longest_diameter_mm:.1f}",
                     "" if r.mean_hu is None else f"{r.mean_hu:.0f}",
                     "" if r.head_disagreement is None else f"{r.head_disagreement:.3f}", r.note])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "nothing found", "outside", "failed")}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)
