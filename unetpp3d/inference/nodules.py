"""Measure lung nodules in a mask (volume, diameters, centre, probability) and write their report."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import pdist

from unetpp3d.atomic import atomic_write_csv, atomic_write_text
from unetpp3d.inference.postprocess import (
    _HOLE_STRUCTURE,
    _OBJECT_STRUCTURE,
    _PAIRWISE_LIMIT,
    _foreground_labels,
    _voxel_ml,
    remove_small_components,
)


def _direction_matrix(geometry: Any) -> np.ndarray:
    return np.asarray(geometry.direction, dtype=float).reshape(3, 3)


def index_to_lps(geometry: Any, index_xyz: np.ndarray) -> np.ndarray:
    """Map (n, 3) continuous voxel indices (x, y, z) to world LPS millimetres, as SimpleITK does.

    ``geometry`` needs ``spacing``, ``origin`` and ``direction`` (row-major 3x3, SimpleITK's).
    """
    index = np.atleast_2d(np.asarray(index_xyz, dtype=float))
    scaled = index * np.asarray(geometry.spacing, dtype=float)
    return np.asarray(geometry.origin, dtype=float) + scaled @ _direction_matrix(geometry).T


@dataclass
class Nodule:
    """One connected component of a lung-nodule prediction.

    Attributes:
        id: 1-based number, largest nodule first.
        label: the class label of the component.
        voxels: number of voxels.
        volume_ml: volume in millilitres.
        centre_lps_mm: centroid in world LPS coordinates (mm): +x left, +y posterior, +z superior.
        longest_diameter_mm: largest distance between two surface voxel centres, in mm.
        mean_probability: mean predicted probability of ``label`` over the component (None when
            no probabilities were given).
        bbox_min_index: first voxel index (x, y, z) of the component's bounding box.
        bbox_max_index: last voxel index (x, y, z) of the component's bounding box.
        head_disagreement: mean spread of the UNet++ heads' probabilities over the component
            (:mod:`unetpp3d.inference.quality`: 0 when all heads agree; higher means review it),
            None when not computed.
    """

    id: int
    label: int
    voxels: int
    volume_ml: float
    centre_lps_mm: tuple[float, float, float]
    longest_diameter_mm: float
    mean_probability: float | None
    bbox_min_index: tuple[int, int, int]
    bbox_max_index: tuple[int, int, int]
    head_disagreement: float | None = None


def _longest_distance(points: np.ndarray) -> float:
    if len(points) < 2:
        return 0.0
    if len(points) > _PAIRWISE_LIMIT:
        # The farthest pair of a point set lies on its convex hull.
        try:
            points = points[ConvexHull(points).vertices]
        except QhullError:  # flat (one-slice) components: joggle so that qhull accepts them
            points = points[ConvexHull(points, qhull_options="QJ").vertices]
    return float(pdist(points).max())


def nodule_components(mask_xyz: np.ndarray, geometry: Any, probabilities: np.ndarray | None = None,
                      min_volume_ml: float = 0.0, spread: np.ndarray | None = None) -> tuple[np.ndarray, list[Nodule]]:
    """Find, filter and measure the connected components of a lung-nodule label map.

    Args:
        mask_xyz: integer label map (x, y, z) on the grid described by ``geometry``.
        geometry: the grid (``spacing``, ``origin``, ``direction`` as SimpleITK reports them).
        probabilities: class probabilities ``(C, x, y, z)`` on the same grid, or one foreground
            probability map ``(x, y, z)``; None leaves ``mean_probability`` empty.
        min_volume_ml: components smaller than this (mL) are removed from the mask and the list.
        spread: the heads' per-voxel spread (x, y, z) on the same grid, or None.

    Returns:
        The filtered label map and the nodules, largest first.
    """
    mask = remove_small_components(mask_xyz, geometry.spacing, min_volume_ml)
    voxel_ml = _voxel_ml(geometry.spacing)
    found: list[Nodule] = []
    for label in _foreground_labels(mask, None):
        components, n = ndimage.label(mask == label, structure=_OBJECT_STRUCTURE)
        prob = None
        if probabilities is not None:
            prob = probabilities[label] if probabilities.ndim == 4 else probabilities
        for k, box in enumerate(ndimage.find_objects(components), start=1):
            if box is None:
                continue
            comp = components[box] == k
            offset = np.array([s.start for s in box])
            idx = np.argwhere(comp)
            # Surface voxels: those with a 6-neighbour outside the component.
            surface = comp & ~ndimage.binary_erosion(comp, structure=_HOLE_STRUCTURE, border_value=0)
            surface_mm = index_to_lps(geometry, np.argwhere(surface) + offset)
            centre = index_to_lps(geometry, idx.mean(axis=0) + offset)[0]
            mean_p = None if prob is None else float(np.asarray(prob[box])[comp].mean())
            spread_mean = None if spread is None else float(np.asarray(spread[box])[comp].mean())
            found.append(Nodule(
                id=0, label=label, voxels=int(len(idx)), volume_ml=len(idx) * voxel_ml,
                centre_lps_mm=tuple(round(float(c), 3) for c in centre),
                longest_diameter_mm=round(_longest_distance(surface_mm), 3),
                mean_probability=None if mean_p is None else round(mean_p, 4),
                bbox_min_index=tuple(int(v) for v in offset),
                bbox_max_index=tuple(int(s.stop) - 1 for s in box),
                head_disagreement=None if spread_mean is None else round(spread_mean, 4),
            ))
    found.sort(key=lambda nod: (-nod.voxels, nod.bbox_min_index))
    for i, nod in enumerate(found, start=1):
        nod.id = i
    return mask, found


_CSV_FIELDS = ["id", "label", "voxels", "volume_ml", "centre_lps_x_mm", "centre_lps_y_mm", "centre_lps_z_mm",
               "longest_diameter_mm", "mean_probability", "head_disagreement"]


def write_nodule_report(nodules: Sequence[Nodule], json_path: str | Path, csv_path: str | Path,
                        source: str = "", min_volume_ml: float = 0.0, quality: float | None = None) -> None:
    """Write the nodule list as JSON and CSV, each atomically.

    The JSON states its coordinate system (world LPS, mm) and units; the CSV has one row per
    nodule with the columns ``id, label, voxels, volume_ml, centre_lps_{x,y,z}_mm,
    longest_diameter_mm, mean_probability, head_disagreement`` (empty when unknown).

    Args:
        nodules: from :func:`nodule_components`.
        json_path: where to write the JSON report.
        csv_path: where to write the CSV table.
        source: the scan the nodules were found in, recorded in the JSON.
        min_volume_ml: the size filter that was applied, recorded in the JSON.
        quality: the case's head disagreement (:attr:`Prediction.quality`), recorded in the JSON.
    """
    payload = {
        "source": source,
        "coordinate_system": "LPS",
        "coordinate_note": "world coordinates of the scan in mm as SimpleITK/DICOM report them: "
                           "+x towards the patient's left, +y posterior, +z superior",
        "units": {"volume": "mL", "centre": "mm", "longest_diameter": "mm"},
        "min_component_ml": float(min_volume_ml),
        "head_disagreement": quality,
        "head_disagreement_note": "mean spread of the UNet++ heads' probabilities inside the mask: 0 when all "
                                  "heads agree; the higher, the more a mask deserves review (null: not computed)",
        "count": len(nodules),
        "nodules": [_json_ready(asdict(nod)) for nod in nodules],
    }
    atomic_write_text(json_path, json.dumps(payload, indent=2) + "\n")
    atomic_write_csv(csv_path, _CSV_FIELDS, [{
            "id": nod.id, "label": nod.label, "voxels": nod.voxels, "volume_ml": f"{nod.volume_ml:.4f}",
            "centre_lps_x_mm": nod.centre_lps_mm[0], "centre_lps_y_mm": nod.centre_lps_mm[1],
            "centre_lps_z_mm": nod.centre_lps_mm[2], "longest_diameter_mm": nod.longest_diameter_mm,
            "mean_probability": "" if nod.mean_probability is None else nod.mean_probability,
            "head_disagreement": "" if nod.head_disagreement is None else nod.head_disagreement,
        } for nod in nodules])


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
