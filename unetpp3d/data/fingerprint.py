"""The dataset fingerprint: spacings, sizes, intensities and label volumes, as nnU-Net collects them.

Each case's record also keeps the path, size and modification time of its files
(:func:`case_files`), so that ``unetpp3d train`` can reuse the fingerprint ``unetpp3d check``
wrote instead of reading every case again, and can tell when the files have changed since
(:func:`fingerprint_mismatch`).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from unetpp3d.errors import UserError
from unetpp3d.geometry import Geometry, align_label_to_image, check_pair
from unetpp3d.imageio.readers import read_image
from unetpp3d.strictjson import strict_loads

FINGERPRINT_VERSION = 1


SAMPLES_PER_CASE = 10_000  # foreground voxels sampled per case, as nnU-Net does


QUANTILE_STEPS = np.linspace(0.0, 100.0, 201)  # stored so clipped stats can be recomputed later


def _rng_for(name: str, seed: int) -> np.random.Generator:
    # Seed per case name, so a case's samples do not depend on which cases precede it.
    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])


def label_histogram(label: np.ndarray) -> dict[int, int]:
    """Voxel count of every value present in an integer label map.

    Counted in slabs: ``np.bincount`` widens its input to 64-bit integers, which for a whole
    512x512x600 scan would be a 1.2 GB temporary.
    """
    flat = label.reshape(-1)
    if flat.size == 0:
        return {}
    lo, hi = int(flat.min()), int(flat.max())
    if hi - lo > 65535:  # sparse huge values: a dense count array would not fit
        values, counts = np.unique(flat, return_counts=True)
        return dict(zip(values.tolist(), counts.tolist()))
    counts = np.zeros(hi - lo + 1, dtype=np.int64)
    step = 1 << 24
    for start in range(0, flat.size, step):
        chunk = flat[start:start + step].astype(np.int64) - lo
        counts += np.bincount(chunk, minlength=counts.size)
    return {int(v) + lo: int(n) for v, n in enumerate(counts) if n}


def case_fingerprint(name: str, image: np.ndarray, geometry: Geometry, label: np.ndarray | None,
                     labels: dict[int, str], seed: int = 0) -> tuple[dict[str, Any], np.ndarray]:
    """Fingerprint one case from arrays already in memory.

    Args:
        name: case name.
        image: the scan, (x, y, z) on ``geometry``.
        geometry: the scan's grid.
        label: the label map on the same index grid (see
            :func:`~unetpp3d.geometry.align_label_to_image`), or None.
        labels: class number -> name, from the manifest.
        seed: sampling seed.

    Returns:
        ``(entry, samples)``: the JSON-ready per-case record (spacing and size in RAS order,
        label volumes in mL) and up to :data:`SAMPLES_PER_CASE` intensities sampled from the
        foreground (all voxels when there is no label).
    """
    ras = geometry.to_ras()
    entry: dict[str, Any] = {
        "name": name,
        "spacing": [round(s, 6) for s in ras.spacing],
        "size": list(ras.size),
        "axcodes": "".join(nib.orientations.aff2axcodes(geometry.affine_ras())),
        "intensity_min": float(image.min()),
        "intensity_max": float(image.max()),
    }
    rng = _rng_for(name, seed)
    if label is not None:
        by_value = label_histogram(label)
        ml = geometry.voxel_volume_ml()
        entry["label_volumes_ml"] = {str(k): round(by_value.get(k, 0) * ml, 3) for k in labels if k != 0}
        fg = image[label > 0]
        entry["foreground_voxels"] = int(fg.size)
        source = fg
    else:
        source = image.reshape(-1)
    n = min(SAMPLES_PER_CASE, source.size)
    samples = rng.choice(source, size=n, replace=False).astype(np.float64) if n else np.empty(0)
    return entry, samples


def combine_fingerprints(entries: Sequence[dict[str, Any]], samples: Sequence[np.ndarray], labels: dict[int, str],
                         foreground: Sequence[bool] | None = None) -> dict[str, Any]:
    """Merge per-case records into the dataset fingerprint.

    Args:
        entries: per-case records from :func:`case_fingerprint`.
        samples: the matching intensity samples.
        labels: class number -> name.
        foreground: per case, whether its samples are foreground (it had a label); default all.

    Returns:
        The fingerprint dict (plain JSON types): ``cases``, ``median_spacing``, ``spacing_min``,
        ``spacing_max``, ``median_size``, ``size_min``, ``size_max`` (RAS order),
        ``intensity`` (``source``, ``percentile_00_5``, ``percentile_99_5``, ``mean``, ``std``,
        ``clipped_mean``, ``clipped_std``, ``quantiles``) and ``label_volumes_ml`` per class.
    """
    if not entries:
        raise UserError("fingerprint: no cases to fingerprint")
    foreground = list(foreground) if foreground is not None else [True] * len(entries)
    # By case name: the same cases give the same fingerprint, bit for bit, in any order (the
    # intensity means sum the samples in order).
    order = sorted(range(len(entries)), key=lambda i: str(entries[i]["name"]))
    entries, samples, foreground = ([seq[i] for i in order] for seq in (entries, samples, foreground))
    spacing = np.array([e["spacing"] for e in entries], dtype=float)
    size = np.array([e["size"] for e in entries], dtype=float)
    fp: dict[str, Any] = {
        "version": FINGERPRINT_VERSION,
        "labels": {str(k): v for k, v in labels.items()},
        "n_cases": len(entries),
        "median_spacing": np.median(spacing, axis=0).round(6).tolist(),
        "spacing_min": spacing.min(axis=0).tolist(),
        "spacing_max": spacing.max(axis=0).tolist(),
        "median_size": np.median(size, axis=0).tolist(),
        "size_min": size.min(axis=0).astype(int).tolist(),
        "size_max": size.max(axis=0).astype(int).tolist(),
        "cases": list(entries),
    }
    fg = [s for s, is_fg in zip(samples, foreground) if is_fg and s.size]
    pool, source = (fg, "foreground") if fg else ([s for s in samples if s.size], "image")
    if pool:
        values = np.concatenate(pool)
        lo, hi = np.percentile(values, [0.5, 99.5])
        clipped = np.clip(values, lo, hi)
        fp["intensity"] = {
            "source": source,
            "n_samples": int(values.size),
            "percentile_00_5": float(lo),
            "percentile_99_5": float(hi),
            "mean": float(values.mean()),
            "std": float(values.std()),
            "clipped_mean": float(clipped.mean()),
            "clipped_std": float(clipped.std()),
            "min": float(values.min()),
            "max": float(values.max()),
            "quantiles": np.percentile(values, QUANTILE_STEPS).round(4).tolist(),
        }
    else:
        fp["intensity"] = {"source": "none", "n_samples": 0}
    volumes: dict[str, Any] = {}
    for k, name in labels.items():
        if k == 0:
            continue
        vals = [e["label_volumes_ml"][str(k)] for e in entries if "label_volumes_ml" in e]
        if vals:
            volumes[str(k)] = {"name": name, "median": float(np.median(vals)), "min": float(min(vals)),
                               "max": float(max(vals)), "cases_without": int(sum(v == 0 for v in vals))}
    fp["label_volumes_ml"] = volumes
    return fp


def fingerprint(cases: Iterable[Any], labels: dict[int, str], series_uid: str | None = None,
                seed: int = 0) -> dict[str, Any]:
    """Read cases and compute the dataset fingerprint.

    Args:
        cases: :class:`~unetpp3d.data.manifest.Case` objects (anything with ``name``, ``image`` and
            ``label``); labelled ones contribute foreground intensities and label volumes.
        labels: class number -> name.
        series_uid: SeriesInstanceUID for DICOM folders holding several series.
        seed: sampling seed; the same seed gives the same fingerprint.

    Returns:
        See :func:`combine_fingerprints`.

    Raises:
        UserError: a case cannot be read or its label does not fit its image (run
            ``unetpp3d check`` to see every problem at once).
    """
    entries, samples, is_fg = [], [], []
    for case in cases:
        files = case_files(case)  # before reading: a file changed meanwhile makes the record stale
        image, geom = read_image(case.image, series_uid=series_uid)
        label = None
        if case.label is not None:
            label, lgeom = read_image(case.label, is_label=True)
            check_pair(geom, lgeom, case.image, case.label)
            label = align_label_to_image(label, lgeom, geom)
        entry, s = case_fingerprint(case.name, image, geom, label, labels, seed)
        entry["files"] = files
        entries.append(entry)
        samples.append(s)
        is_fg.append(label is not None)
    return combine_fingerprints(entries, samples, labels, is_fg)


def file_stamp(path: str | Path) -> dict[str, Any]:
    """The resolved path, size and modification time of a file, or of the files under a folder.

    A folder (a DICOM series) gives its file count, total size and newest modification time, so
    that adding, removing or rewriting a slice changes the stamp.

    Raises:
        OSError: the path cannot be read.
    """
    path = Path(path)
    if path.is_dir():
        stats = [p.stat() for p in sorted(path.rglob("*")) if p.is_file()]
        return {"path": str(path.resolve()), "files": len(stats), "size": sum(s.st_size for s in stats),
                "mtime_ns": max((s.st_mtime_ns for s in stats), default=0)}
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def case_files(case: Any) -> dict[str, Any]:
    """:func:`file_stamp` of a case's image and, when it has one, its label."""
    files = {"image": file_stamp(case.image)}
    if case.label is not None:
        files["label"] = file_stamp(case.label)
    return files


def read_fingerprint(path: str | Path) -> dict[str, Any]:
    """A fingerprint JSON as ``unetpp3d check`` writes it.

    Raises:
        UserError: the file is missing or is not a fingerprint.
    """
    path = Path(path)
    try:
        fp = strict_loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such fingerprint file; write one with `unetpp3d check`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a readable fingerprint ({exc}); write it again with `unetpp3d check`") from None
    if not isinstance(fp, dict) or not isinstance(fp.get("cases"), list):
        raise UserError(f"{path}: not a fingerprint (no 'cases' list); write it again with `unetpp3d check`")
    return fp


def fingerprint_mismatch(fp: dict[str, Any], cases: Sequence[Any], labels: dict[int, str],
                         seed: int = 0) -> str | None:
    """Why ``fp`` is not what :func:`fingerprint` would compute for ``cases`` now, or None when it is.

    It is when it has the current version, the same labels and sampling seed, no DICOM series
    choice, and exactly these cases with files of the same path, size and modification time.

    Args:
        fp: a fingerprint (from :func:`read_fingerprint`).
        cases: the cases to be fingerprinted.
        labels: the manifest's class number -> name.
        seed: the sampling seed the caller would use.

    Returns:
        A reason for a log line ("case003's image ... changed"), or None.
    """
    if fp.get("version") != FINGERPRINT_VERSION:
        return f"it has version {fp.get('version')}, not {FINGERPRINT_VERSION}"
    wanted = {str(k): v for k, v in labels.items()}
    if fp.get("labels") != wanted:
        return f"its labels {fp.get('labels')} differ from the manifest's {wanted}"
    if fp.get("seed", 0) != seed:
        return f"its intensities were sampled with seed {fp.get('seed')}, not {seed}"
    if fp.get("series_uid") is not None:
        return f"it was computed for DICOM series {fp['series_uid']} (--series-uid)"
    stored = {str(c.get("name")): c for c in fp["cases"] if isinstance(c, dict)}
    names = {c.name for c in cases}
    for what, diff in (("lacks", sorted(names - set(stored))), ("has other", sorted(set(stored) - names))):
        if diff:
            return f"it {what} case(s) {', '.join(diff[:5])}{' ...' if len(diff) > 5 else ''}"
    for case in cases:
        files = stored[case.name].get("files")
        if not isinstance(files, dict):
            return f"it records no file sizes and times for {case.name} (written by an older unetpp3d check)"
        try:
            now = case_files(case)
        except OSError as exc:
            return f"{case.name}: {exc}"
        for role in sorted(set(now) | set(files)):
            current, recorded = now.get(role), files.get(role)
            if current != recorded:
                path = (current or recorded or {}).get("path", "?")
                return f"{case.name}'s {role} {path} has changed since (path, size or modification time)"
    return None


# What a case's data is: a different scan under the same name differs in at least one of these.
_CASE_FIELDS = ("spacing", "size", "axcodes", "intensity_min", "intensity_max", "label_volumes_ml",
                "foreground_voxels")


def dataset_differences(recorded: dict[str, Any], current: dict[str, Any], limit: int = 6) -> list[str]:
    """How the cases of ``current`` differ from those of ``recorded``, one line each (empty: the same data).

    Compares, per case name, what the data is (spacing, size, orientation, intensity range, label
    volumes) and the files' sizes; a file that was only touched or copied (a new modification
    time, the same bytes) is the same data and not a difference.

    Args:
        recorded: the fingerprint a run recorded when it started.
        current: the fingerprint of the cases now.
        limit: at most this many lines, the last one saying how many more there were.

    Returns:
        Lines such as ``"case003: spacing [0.8, 0.8, 2.5] -> [1.0, 1.0, 1.0]"``.
    """
    old = {str(c.get("name")): c for c in recorded.get("cases", []) if isinstance(c, dict)}
    new = {str(c.get("name")): c for c in current.get("cases", []) if isinstance(c, dict)}
    lines = [f"{name}: not in the recorded dataset" for name in sorted(set(new) - set(old))]
    lines += [f"{name}: no longer in the dataset" for name in sorted(set(old) - set(new))]
    for name in sorted(set(old) & set(new)):
        a, b = old[name], new[name]
        for key in _CASE_FIELDS:
            if a.get(key) != b.get(key):
                lines.append(f"{name}: {key} {a.get(key)} -> {b.get(key)}")
        files_a, files_b = a.get("files") or {}, b.get("files") or {}
        for role in sorted(set(files_a) & set(files_b)):
            size_a, size_b = files_a[role].get("size"), files_b[role].get("size")
            if size_a != size_b:
                lines.append(f"{name}: {role} file size {size_a} -> {size_b} bytes")
    if len(lines) > limit:
        lines = lines[:limit - 1] + [f"and {len(lines) - limit + 1} more difference(s)"]
    return lines
