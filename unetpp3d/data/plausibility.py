"""Warnings (never refusals) for inputs that do not look like what a CT model was trained on.

An all-air scan, a scan shifted by +30000, a 0/1 label map given as the image, or a chest scan
given to a liver model are all read and segmented without error, and the volumes reported look
like results. ``check`` and ``infer`` say so: these heuristics are loose on purpose (a cropped
or contrast scan must not warn) and flag only inputs far from CT in Hounsfield units.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from unetpp3d.geometry import Geometry

AIR_HU = -1000.0
TISSUE_HU = -500.0  # above: body (as the body mask)
MIN_TISSUE_FRACTION = 0.01  # under 1% of the voxels in the body: no body in the scan
HU_LOW, HU_HIGH = -1200.0, 4000.0  # beyond, for most of the scan: not HU
MIN_SPREAD_HU = 100.0  # a body CT spans air to tissue; a few units of spread is normalised data
MIN_EXTENT_MM, MAX_EXTENT_MM = 10.0, 2000.0
VOLUME_FACTOR = 3.0  # a predicted volume this far outside the training range warns
VIEW_FACTOR = 8.0  # a scan whose field of view holds this many times the training cases' warns (2x per axis)
_SAMPLE = 200_000


def intensity_warnings(image: np.ndarray) -> list[str]:
    """What about a scan's values does not look like CT in Hounsfield units.

    Args:
        image: the scan's voxels (any order), as read.

    Returns:
        One line per finding; empty for a plausible CT.
    """
    flat = np.asarray(image).reshape(-1)
    if flat.size > _SAMPLE:  # a strided sample: percentiles within a fraction of a percent
        flat = flat[:: flat.size // _SAMPLE]
    flat = flat.astype(np.float64, copy=False)
    p1, p50, p99 = np.percentile(flat, [1, 50, 99])
    values = np.unique(flat[: min(flat.size, 50_000)])
    out = []
    if values.size <= 16 and values.min() >= 0 and values.max() <= 255 and np.all(values == np.round(values)):
        out.append(f"only {values.size} distinct values {values[:6].astype(int).tolist()}: this looks like a label "
                   f"map, not a CT scan")
    elif (p50 < HU_LOW or p50 > HU_HIGH or p1 > HU_HIGH or p99 < HU_LOW
          or (p99 - p1 < MIN_SPREAD_HU and p50 > AIR_HU + 100)):  # normalised or rescaled values
        out.append(f"intensities are not plausible Hounsfield units (1st/50th/99th percentile {p1:.0f}/{p50:.0f}/"
                   f"{p99:.0f}); is it CT, and are the scaling (slope/intercept) and offset right?")
    elif float(np.mean(flat > TISSUE_HU)) < MIN_TISSUE_FRACTION:
        out.append(f"under {MIN_TISSUE_FRACTION:.0%} of the voxels are above {TISSUE_HU:.0f} HU: almost no body "
                   f"in the scan (all air?)")
    return out


def _extent_mm(geometry: Geometry) -> list[float]:
    """The scan's field of view per axis (its own axis order), mm."""
    return [n * s for n, s in zip(geometry.size, geometry.spacing)]


def field_of_view_warnings(geometry: Geometry) -> list[str]:
    """A field of view too small or too large for a body CT (extent per axis in mm)."""
    extent = _extent_mm(geometry)
    shown = " x ".join(f"{e:.0f}" for e in extent)
    if min(extent) < MIN_EXTENT_MM or max(extent) > MAX_EXTENT_MM:
        return [f"field of view {shown} mm is implausible for a body CT (expected {MIN_EXTENT_MM:.0f}-"
                f"{MAX_EXTENT_MM:.0f} mm per axis); check the spacing"]
    return []


def scan_warnings(image: np.ndarray, geometry: Geometry) -> list[str]:
    """:func:`intensity_warnings` and :func:`field_of_view_warnings` of one scan."""
    return intensity_warnings(image) + field_of_view_warnings(geometry)


def volume_range(label_volumes: Sequence[dict[str, float]]) -> dict[str, list[float]]:
    """Per class, the [smallest, largest] volume (mL) among training cases that have the class.

    Args:
        label_volumes: each case's ``label_volumes_ml`` from the fingerprint.
    """
    seen: dict[str, list[float]] = {}
    for volumes in label_volumes:
        for cls, ml in (volumes or {}).items():
            if ml > 0:
                seen.setdefault(str(cls), []).append(float(ml))
    return {cls: [min(v), max(v)] for cls, v in seen.items()}


def volume_warnings(volumes_ml: dict[str, float], trained: dict[str, list[float]], names: dict[str, str]) -> list[str]:
    """Predicted volumes far (``VOLUME_FACTOR``) outside the range the training set held.

    Args:
        volumes_ml: class number (as text) -> predicted volume in mL.
        trained: class -> [min, max] mL from :func:`volume_range`; classes missing are not judged.
        names: class number (as text) -> name, for messages.
    """
    out = []
    for cls, ml in volumes_ml.items():
        if str(cls) not in trained or ml <= 0:
            continue
        low, high = trained[str(cls)]
        if ml < low / VOLUME_FACTOR or ml > high * VOLUME_FACTOR:
            out.append(f"predicted {names.get(str(cls), cls)} volume {ml:.0f} mL is far outside the training set's "
                       f"{low:.0f}-{high:.0f} mL: is this the organ and the kind of scan the model was trained on?")
    return out


def field_of_view_mm(sizes: Sequence[Sequence[int]], spacings: Sequence[Sequence[float]]) -> list[float] | None:
    """The largest extent per axis (mm) among cases of the given sizes and spacings (same axis order);
    None without cases."""
    if len(sizes) == 0:
        return None
    extents = np.asarray(sizes, dtype=float) * np.asarray(spacings, dtype=float)
    return [round(float(e), 1) for e in extents.max(axis=0)]


def view_warnings(geometry: Geometry, trained_mm: Sequence[float] | None) -> list[str]:
    """A scan far larger than anything the model was trained on (a crop-trained model on a whole scan).

    Args:
        geometry: the scan's grid.
        trained_mm: the training cases' largest extent per axis (:func:`field_of_view_mm`);
            None (an older model) is not judged.
    """
    if not trained_mm:
        return []
    extent = _extent_mm(geometry)
    ratio = float(np.prod(extent)) / max(float(np.prod(trained_mm)), 1e-9)
    if ratio < VIEW_FACTOR:
        return []
    seen = " x ".join(f"{e:.0f}" for e in trained_mm)
    shown = " x ".join(f"{e:.0f}" for e in extent)
    return [f"the model was trained on cases of at most {seen} mm; this scan is {shown} mm, {ratio:.0f} times that "
            f"volume: it never saw most of this anatomy as background, so expect false positives there. Segment at "
            f"given locations with --points, or train on whole scans"]
