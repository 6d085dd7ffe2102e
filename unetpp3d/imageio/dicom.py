"""Assemble a DICOM series folder into one volume, refusing what ITK would stack wrongly.

ITK stacks unevenly spaced, duplicated, tilted or mixed-orientation slices with a made-up
spacing; the checks here read every slice header first and refuse such series by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from unetpp3d.errors import UserError
from unetpp3d.geometry import _ORIENTATION_TOL, fmt_values
from unetpp3d.imageio.formats import (
    _PIXEL_BYTES,
    _check_dicom_lengths,
    _check_direction,
    _check_memory,
    _itk_reason,
    _pixel_spacing_value,
    _read_file,
)

# Slice gaps may deviate from the median gap by this much before a DICOM series is refused:
# DS strings carry rounding noise of ~1e-6 mm, a missing slice deviates by a whole gap.
_GAP_TOL_MM = 0.01


_GAP_TOL_REL = 0.01


@dataclass
class _Slice:
    path: Path
    series_uid: str
    position: np.ndarray | None
    orientation: np.ndarray | None
    size: tuple[int, ...]
    pixel_spacing: float
    pixel_spacing_tag: tuple[float, float] | None  # PixelSpacing (0028,0030): row, column spacing in mm
    pixel_bytes: int
    components: int


def _tag_floats(reader: sitk.ImageFileReader, key: str, count: int) -> np.ndarray | None:
    if not reader.HasMetaDataKey(key):
        return None
    try:
        values = [float(v) for v in reader.GetMetaData(key).strip().split("\\") if v.strip()]
    except ValueError:
        return None
    return np.asarray(values) if len(values) == count and all(map(math.isfinite, values)) else None


def _scan_dicom(folder: Path) -> tuple[list[_Slice], int]:
    """Read the header of every file in ``folder``; return the DICOM ones and the count of others."""
    slices, others = [], 0
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        _check_dicom_lengths(path)
        reader = sitk.ImageFileReader()
        reader.SetImageIO("GDCMImageIO")
        reader.SetFileName(str(path))
        reader.LoadPrivateTagsOff()
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            others += 1  # README, DICOMDIR, thumbnails: not slices
            continue
        uid = reader.GetMetaData("0020|000e").strip().rstrip("\x00") if reader.HasMetaDataKey("0020|000e") else ""
        slices.append(_Slice(
            path=path,
            series_uid=uid,
            position=_tag_floats(reader, "0020|0032", 3),
            orientation=_tag_floats(reader, "0020|0037", 6),
            size=tuple(reader.GetSize()),
            pixel_spacing=float(min(reader.GetSpacing()[:2])),
            pixel_spacing_tag=(_pixel_spacing_value(reader.GetMetaData("0028|0030"))
                               if reader.HasMetaDataKey("0028|0030") else None),
            pixel_bytes=_PIXEL_BYTES.get(reader.GetPixelID(), 8),
            components=reader.GetNumberOfComponents(),
        ))
    return slices, others


def _uid_name(uid: str) -> str:
    return uid or "(no SeriesInstanceUID)"


def _pick_series(folder: Path, slices: list[_Slice], series_uid: str | None) -> list[_Slice]:
    groups: dict[str, list[_Slice]] = {}
    for s in slices:
        groups.setdefault(s.series_uid, []).append(s)
    listing = ", ".join(f"{_uid_name(uid)} ({len(g)} files)" for uid, g in sorted(groups.items()))
    if series_uid is not None:
        if series_uid not in groups:
            raise UserError(f"{folder}: no DICOM series with SeriesInstanceUID {series_uid}; the folder holds {listing}")
        return groups[series_uid]
    if len(groups) > 1:
        raise UserError(f"{folder}: holds {len(groups)} DICOM series: {listing}; pick one with --series-uid "
                        "(or move each series into its own folder)")
    return next(iter(groups.values()))


def _check_series(folder: Path, series: list[_Slice]) -> list[_Slice]:
    """Validate the slices of one series and return them sorted along the slice normal."""
    first = series[0]
    for s in series:
        if s.position is None or s.orientation is None:
            missing = "ImagePositionPatient (0020,0032)" if s.position is None else "ImageOrientationPatient (0020,0037)"
            raise UserError(f"{folder}: {s.path.name} has no valid {missing}, so the slices cannot be placed in space")
        if len(s.size) > 2 and s.size[2] > 1:
            raise UserError(f"{folder}: {s.path.name} is a multi-frame file inside a series of {len(series)} files; "
                            "give the multi-frame file on its own")
        if s.size[:2] != first.size[:2]:
            raise UserError(f"{folder}: slices of different sizes: {first.path.name} is "
                            f"{'x'.join(map(str, first.size[:2]))}, {s.path.name} is {'x'.join(map(str, s.size[:2]))}")
        if s.pixel_spacing_tag is None:
            # GDCM reads a series without it as 1 x 1 mm pixels, without a word.
            raise UserError(f"{folder}: {s.path.name} has no valid PixelSpacing (0028,0030), so the size of the "
                            "pixels is unknown (ITK would assume 1 x 1 mm); export the series again with its "
                            "pixel spacing")
        if not np.allclose(s.pixel_spacing_tag, first.pixel_spacing_tag, rtol=1e-4, atol=1e-6):
            raise UserError(f"{folder}: slices with different PixelSpacing (0028,0030): {first.path.name} has "
                            f"{fmt_values(first.pixel_spacing_tag)} mm, {s.path.name} has "
                            f"{fmt_values(s.pixel_spacing_tag)} mm; the folder mixes several acquisitions")
        if s.components != 1:
            raise UserError(f"{folder}: {s.path.name} has {s.components} components per pixel (colour); "
                            "a single-channel CT series is needed")
    for s in series:
        if np.abs(s.orientation - first.orientation).max() > _ORIENTATION_TOL:
            raise UserError(f"{folder}: mixed slice orientations (ImageOrientationPatient): {first.path.name} has "
                            f"{fmt_values(first.orientation)}, {s.path.name} has {fmt_values(s.orientation)}; "
                            "the folder mixes several acquisitions or reformats")
    row, col = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row, col)
    if abs(np.linalg.norm(normal) - 1.0) > 1e-3:
        raise UserError(f"{folder}: ImageOrientationPatient {fmt_values(first.orientation)} is not two orthogonal unit vectors")
    along = np.array([s.position @ normal for s in series])
    order = np.argsort(along, kind="stable")
    series = [series[i] for i in order]
    along = along[order]

    gaps = np.diff(along)
    # Two files at (nearly) the same place: ITK would stack them with a made-up spacing.
    dup = np.flatnonzero(gaps < _GAP_TOL_MM)
    if dup.size:
        i = int(dup[0])
        raise UserError(f"{folder}: duplicate slice position: {series[i].path.name} and {series[i + 1].path.name} are "
                        f"both at {along[i]:.3f} mm along the slice normal ({dup.size} duplicate pair(s)); "
                        "remove the duplicated files")
    median = float(np.median(gaps))
    deviation = np.abs(gaps - median)
    worst = int(np.argmax(deviation))
    if deviation[worst] > max(_GAP_TOL_MM, _GAP_TOL_REL * median):
        raise UserError(
            f"{folder}: slice positions are not evenly spaced: gaps range from {gaps.min():.4g} to {gaps.max():.4g} mm "
            f"(largest deviation from the median gap of {median:.4g} mm: {deviation[worst]:.4g} mm, between "
            f"{series[worst].path.name} and {series[worst + 1].path.name}); slices are missing or misplaced, so the "
            "series cannot be stacked into a regular grid")
    # Slices shifted sideways (gantry tilt): ITK would build a sheared volume without saying so.
    inplane = np.array([s.position - (s.position @ normal) * normal for s in series])
    drift = float(np.linalg.norm(inplane - inplane[0], axis=1).max())
    if drift > max(_GAP_TOL_MM, 0.05 * first.pixel_spacing):
        raise UserError(f"{folder}: slice positions drift sideways by up to {drift:.3g} mm (gantry tilt or shifted "
                        "slices); the series does not form a rectangular grid — resample it first (e.g. dcm2niix)")
    return series


def _series(folder: Path, series_uid: str | None) -> list[_Slice]:
    """The slices of the one series read from ``folder`` (``series_uid`` picks among several)."""
    slices, others = _scan_dicom(folder)
    if not slices:
        subdirs = [p.name for p in folder.iterdir() if p.is_dir()]
        hint = f" (subfolders are not searched: {', '.join(sorted(subdirs)[:5])})" if subdirs else ""
        raise UserError(f"{folder}: no DICOM files found among {others} file(s){hint}; give the folder that holds "
                        "the series' slice files")
    return _pick_series(folder, slices, series_uid)


def series_files(folder: str | Path, series_uid: str | None = None) -> list[Path]:
    """The files of the DICOM series that :func:`~unetpp3d.imageio.readers.read_image` reads from ``folder``.

    Args:
        folder: a folder holding a DICOM series.
        series_uid: the SeriesInstanceUID to pick where the folder holds several.

    Returns:
        The slice files, sorted along the slice normal (one file: a multi-frame or single-slice image).

    Raises:
        UserError: as :func:`~unetpp3d.imageio.readers.read_image` for the same folder.
    """
    folder = Path(folder)
    series = _series(folder, series_uid)
    return [s.path for s in (series if len(series) == 1 else _check_series(folder, series))]


def _read_dicom_folder(folder: Path, series_uid: str | None) -> sitk.Image:
    series = _series(folder, series_uid)
    if len(series) == 1:
        # One file: a multi-frame DICOM holds a whole volume, a classic one a single slice.
        return _read_file(series[0].path, io="GDCMImageIO")
    series = _check_series(folder, series)
    rows_cols = series[0].size[:2]
    _check_memory(folder, int(np.prod(rows_cols, dtype=np.int64)) * len(series), max(4, series[0].pixel_bytes))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(s.path) for s in series])
    reader.MetaDataDictionaryArrayUpdateOff()
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise UserError(f"{folder}: cannot decode the DICOM pixel data ({_itk_reason(exc)}); a file may be "
                        "truncated or use an unsupported compression") from None
    _check_duplicate_pixels(folder, image, series)
    _check_direction(folder, image.GetDirection())
    return image


def _check_duplicate_pixels(folder: Path, image: sitk.Image, series: list[_Slice]) -> None:
    """Refuse neighbouring slices with identical, non-blank pixel data: a file exported twice.

    Real neighbouring CT slices always differ by noise, so bit-identical ones (at different
    positions) mean a slice was duplicated and the volume's anatomy is wrong from there on.
    """
    voxels = sitk.GetArrayViewFromImage(image)  # (z, y, x)
    for k in range(voxels.shape[0] - 1):
        a, b = voxels[k], voxels[k + 1]
        if a.min() != a.max() and np.array_equal(a, b):
            raise UserError(f"{folder}: duplicate slice: {series[k].path.name} and {series[k + 1].path.name} hold "
                            "identical pixel data at different positions; remove the duplicated file "
                            "or export the series again")
