#!/usr/bin/env python
"""Write manifests of the LIDC-IDRI nodule crops with a split by patient.

The crops in ``../shared/data/lidc_nodule_crops`` (``images/<case>.nii.gz``,
``masks/<case>.nii.gz``, ``<case>`` = ``LIDC-IDRI-<patient>_R_<nodule>``, one row per crop in
``nodules.csv``) hold up to several nodules per patient. Crops of one patient share anatomy,
scanner and reader, so they must never sit on both sides of a split: this script assigns whole
patients, never crops, to the test set and to ``k`` cross-validation folds.

* A seeded shuffle of the sorted patient ids (so the split depends on the seed alone, not on
  the CSV's order); the first ``round(test_fraction * patients)`` patients are the test set,
  the rest are dealt round-robin into ``folds`` folds.
* Fold ``f``'s manifest lists the other folds' crops under ``training``, fold ``f``'s under
  ``validation`` (so ``unetpp3d train`` takes the patient split as given instead of splitting
  crops itself) and the test patients' crops, with their masks, under ``test``.
* Every manifest also carries ``"split"``: the seed, the fold count, and each patient's fold
  (``-1`` for test), so a reader can check that no patient crosses a split.

Paths in the manifests are absolute, because the manifests live outside the data folder (never
write them into the repository or into the shared data).

Usage::

    python pipelines/lidc_manifest.py /tmp/lidc/lidc.json                 # fold 0 of 5
    python pipelines/lidc_manifest.py /tmp/lidc/lidc.json --all-folds      # lidc_fold0.json .. lidc_fold4.json
    python pipelines/lidc_manifest.py /tmp/lidc/lidc.json --folds 5 --test-fraction 0.2 --seed 0 \\
        --data ../shared/data/lidc_nodule_crops

Exit status 0 on success, 2 when the data folder, the CSV or the output path is unusable.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

from unetpp3d.atomic import atomic_write_text  # noqa: E402
from unetpp3d.errors import UserError  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "lidc_nodule_crops"
TEST = -1  # the fold number of the held-out test patients


def case_name(patient: str, nodule: str) -> str:
    """The crop's file stem: ``LIDC-IDRI-0001_R_1``."""
    return f"{patient}_R_{nodule}"


def read_crops(csv_path: Path) -> list[tuple[str, str]]:
    """``(patient, case)`` for every row of ``nodules.csv``, in file order.

    Raises:
        UserError: the CSV is missing, lacks ``patient_id``/``nodule_id``, or lists a crop twice.
    """
    if not csv_path.is_file():
        raise UserError(f"{csv_path}: no such file; pass --data, the folder holding nodules.csv, images/ and masks/")
    with csv_path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"patient_id", "nodule_id"} - set(reader.fieldnames or [])
        if missing:
            raise UserError(f"{csv_path}: no column(s) {', '.join(sorted(missing))}; expected the LIDC crops' nodules.csv")
        rows = [(r["patient_id"].strip(), case_name(r["patient_id"].strip(), r["nodule_id"].strip())) for r in reader]
    seen: set[str] = set()
    for _, case in rows:
        if case in seen:
            raise UserError(f"{csv_path}: crop {case} is listed twice")
        seen.add(case)
    if not rows:
        raise UserError(f"{csv_path}: no rows")
    return rows


def patient_folds(patients: Sequence[str], folds: int, test_fraction: float, seed: int) -> dict[str, int]:
    """Assign each patient to a fold ``0..folds-1`` or to the test set (:data:`TEST`).

    Args:
        patients: patient ids (duplicates are counted once).
        folds: number of cross-validation folds (at least 2).
        test_fraction: share of patients held out for testing, in [0, 1).
        seed: shuffle seed; the same seed and patients give the same split, in any input order.

    Returns:
        patient -> fold number (``-1`` for test).

    Raises:
        UserError: too few patients for the folds, or arguments out of range.
    """
    unique = sorted(set(patients))
    if folds < 2:
        raise UserError(f"--folds must be at least 2, got {folds}")
    if not 0.0 <= test_fraction < 1.0:
        raise UserError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    random.Random(seed).shuffle(unique)
    n_test = int(round(test_fraction * len(unique)))
    if len(unique) - n_test < folds:
        raise UserError(f"{len(unique)} patients ({n_test} for test) cannot fill {folds} folds")
    out = {p: TEST for p in unique[:n_test]}
    for i, p in enumerate(unique[n_test:]):
        out[p] = i % folds
    return out


def fold_manifest(crops: Sequence[tuple[str, str]], assignment: dict[str, int], fold: int, data: Path,
                  folds: int, seed: int) -> dict[str, Any]:
    """The manifest dict for one fold (``validation`` = the crops of fold ``fold``'s patients)."""
    def entry(case: str) -> dict[str, str]:
        return {"image": str(data / "images" / f"{case}.nii.gz"), "label": str(data / "masks" / f"{case}.nii.gz")}

    parts: dict[str, list[dict[str, str]]] = {"training": [], "validation": [], "test": []}
    for patient, case in crops:
        f = assignment[patient]
        part = "test" if f == TEST else "validation" if f == fold else "training"
        parts[part].append(entry(case))
    return {
        "name": "LIDC-IDRI nodule crops",
        "description": f"fold {fold} of {folds} by patient (seed {seed}); test patients held out",
        "task": "lung_nodule",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "nodule"},
        **parts,
        "numTraining": len(parts["training"]),
        "numTest": len(parts["test"]),
        "split": {"seed": seed, "folds": folds, "fold": fold, "patients": dict(sorted(assignment.items()))},
    }


def write_manifests(out: Path, data: Path, folds: int = 5, fold: int | None = 0, test_fraction: float = 0.2,
                    seed: int = 0) -> list[Path]:
    """Write fold ``fold``'s manifest to ``out``, or with ``fold=None`` every fold's to ``<stem>_fold<k>.json``.

    Raises:
        UserError: unusable data folder, CSV or arguments, or ``out`` inside the data folder or the repository.
    """
    data = data.resolve()
    out = out.resolve()
    for folder, what in ((data, "the data folder"), (REPO.resolve(), "the repository")):
        if folder in out.parents:
            raise UserError(f"{out}: inside {what} {folder}; write the manifest elsewhere (e.g. under /tmp)")
    if fold is not None and not 0 <= fold < folds:
        raise UserError(f"--fold {fold} is outside 0..{folds - 1}")
    crops = read_crops(data / "nodules.csv")
    missing = [c for _, c in crops if not (data / "images" / f"{c}.nii.gz").is_file()]
    if missing:
        raise UserError(f"{data}: {len(missing)} crop(s) of nodules.csv have no image, e.g. images/{missing[0]}.nii.gz")
    assignment = patient_folds([p for p, _ in crops], folds, test_fraction, seed)
    targets = [(fold, out)] if fold is not None else [(k, out.with_name(f"{out.name.removesuffix('.json')}_fold{k}.json"))
                                                      for k in range(folds)]
    written = []
    for k, path in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(fold_manifest(crops, assignment, k, data, folds, seed), indent=1) + "\n")
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="manifest JSON to write (outside the repository and the data)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the lidc_nodule_crops folder")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--fold", type=int, default=0, help="the fold held out for validation")
    parser.add_argument("--all-folds", action="store_true", help="write one manifest per fold, <stem>_fold<k>.json")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share of patients held out for testing")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        paths = write_manifests(args.out, args.data, args.folds, None if args.all_folds else args.fold,
                                args.test_fraction, args.seed)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for p in paths:
        m = json.loads(p.read_text(encoding="utf-8"))
        print(f"{p}: {len(m['training'])} training, {len(m['validation'])} validation, {len(m['test'])} test crops")
    return 0


if __name__ == "__main__":
    sys.exit(main())
