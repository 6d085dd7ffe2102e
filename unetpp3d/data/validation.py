"""Validate one case of a manifest: readable image and label, matching grids, known label values."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unetpp3d.data.fingerprint import case_fingerprint, label_histogram
from unetpp3d.data.manifest import Case
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
class _CaseResult:
    problems: list[Problem]
    entry: dict[str, Any] | None = None
    samples: np.ndarray | None = None
    labelled: bool = False


def _inspect(case: Case, labels: dict[int, str], series_uid: str | None, seed: int = 0) -> _CaseResult:
    problems: list[Problem] = []
    image = label = None
    try:
        image, geom = read_image(case.image, series_uid=series_uid)
    except UserError as exc:
        problems.append(Problem(case.name, case.image, str(exc)))
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
        return _CaseResult(problems)
    entry, samples = case_fingerprint(case.name, image, geom, label, labels, seed)
    return _CaseResult(problems, entry, samples, labelled=label is not None)


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
    return _inspect(case, labels, series_uid).problems


def default_fingerprint_path(manifest_path: str | Path) -> Path:
    """``data/dataset.json`` -> ``data/dataset.fingerprint.json``."""
    manifest_path = Path(manifest_path)
    return manifest_path.with_name(f"{manifest_path.stem}.fingerprint.json")
