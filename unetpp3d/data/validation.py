"""Validate one case of a manifest: readable image and label, matching grids, known label values."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unetpp3d.data.fingerprint import (
    case_files,
    case_fingerprint,
    combine_fingerprints,
    label_histogram,
)
from unetpp3d.data.manifest import Case
from unetpp3d.data.plausibility import scan_warnings
from unetpp3d.errors import UserError
from unetpp3d.geometry import align_label_to_image, check_pair
from unetpp3d.imageio.readers import read_image


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one case.

    Attributes:
        case: the case name.
        file: the file or folder concerned (None when it concerns the pair).
        message: what is wrong and what to do; it names the file.
        severity: ``"error"`` (fails the check) or ``"warning"`` (reported only).
    """

    case: str
    file: Path | None
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        return f"{self.severity}: {self.case}: {self.message}"


@dataclass
class CaseResult:
    """What reading one case found: its problems and, when it has no error, its fingerprint record.

    Attributes:
        problems: errors and warnings.
        entry: the case's fingerprint record (:func:`~unetpp3d.data.fingerprint.case_fingerprint`)
            with its files' stamps under ``"files"``; None after an error.
        samples: the intensities sampled for the fingerprint.
        labelled: whether the samples come from a label's foreground.
    """

    problems: list[Problem]
    entry: dict[str, Any] | None = None
    samples: np.ndarray | None = None
    labelled: bool = False


def inspect_case(case: Case, labels: dict[int, str], series_uid: str | None = None, seed: int = 0) -> CaseResult:
    """Read one case once: every problem of :func:`validate_case` and, if none is an error, its fingerprint.

    Args:
        case: the case.
        labels: the manifest's class number -> name.
        series_uid: SeriesInstanceUID for DICOM folders holding several series.
        seed: intensity-sampling seed.

    Returns:
        The problems, and the fingerprint record when the case has no error.
    """
    problems: list[Problem] = []
    image = label = None
    try:
        files = case_files(case)  # before reading: a file changed meanwhile makes the record stale
    except OSError:
        files = None  # reading reports what is wrong with the file
    try:
        image, geom = read_image(case.image, series_uid=series_uid)
    except UserError as exc:
        problems.append(Problem(case.name, case.image, str(exc)))
    else:
        problems += [Problem(case.name, case.image, f"{case.image}: {w}", severity="warning")
                     for w in scan_warnings(image, geom)]
    if case.label is not None:
        try:
            label, lgeom = read_image(case.label, is_label=True)
        except UserError as exc:
            problems.append(Problem(case.name, case.label, str(exc)))
    if label is not None:
        unknown = sorted(set(label_histogram(label)) - set(labels))
        if unknown:
            problems.append(Problem(case.name, case.label,
                                    f"{case.label}: label values {unknown} are not among the manifest's labels "
                                    f"{sorted(labels)}; fix the labels or the manifest's 'labels'"))
    if image is not None and label is not None:
        try:
            check_pair(geom, lgeom, case.image, case.label)
        except UserError as exc:
            problems.append(Problem(case.name, case.label, str(exc)))
            label = None
        else:
            label = align_label_to_image(label, lgeom, geom)
            if not label.any():
                problems.append(Problem(case.name, case.label, f"{case.label}: the label map is all background",
                                        severity="warning"))
    if any(p.severity == "error" for p in problems) or image is None:
        return CaseResult(problems)
    entry, samples = case_fingerprint(case.name, image, geom, label, labels, seed)
    if files is not None:
        entry["files"] = files
    return CaseResult(problems, entry, samples, labelled=label is not None)


def validate_case(case: Case, labels: dict[int, str], series_uid: str | None = None) -> list[Problem]:
    """Every problem of one case: its image, its label, and whether the two fit together.

    Checks what :func:`~unetpp3d.imageio.readers.read_image` checks (missing, empty, truncated or
    unreadable files; not a single-channel 3D volume; NaN/Inf; non-positive spacing; DICOM
    series with no, several, unevenly spaced, duplicated or mixed-orientation slices), plus
    label values outside ``labels``, non-integer labels, and a label grid that differs from the
    image's beyond tolerance (a pure axis flip or permutation is accepted). An all-background
    label is reported as a warning.

    Args:
        case: the case to check.
        labels: the manifest's class number -> name.
        series_uid: SeriesInstanceUID for DICOM folders holding several series.

    Returns:
        The problems found, errors and warnings; empty when the case is fine.
    """
    return inspect_case(case, labels, series_uid).problems


def fingerprint_of(results: list[CaseResult], labels: dict[int, str]) -> dict[str, Any]:
    """The dataset fingerprint from :func:`inspect_case` results without errors (no second read)."""
    return combine_fingerprints([r.entry for r in results], [r.samples for r in results], labels,
                                [r.labelled for r in results])


def default_fingerprint_path(manifest_path: str | Path, folder: str | Path | None = None) -> Path:
    """``data/dataset.json`` -> ``FOLDER/dataset.fingerprint.json``, FOLDER the current folder by default.

    Never beside the manifest by default: the data folder may be read-only or shared.
    """
    return Path(folder if folder is not None else Path.cwd()) / f"{Path(manifest_path).stem}.fingerprint.json"
