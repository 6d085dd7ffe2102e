"""Scoring predicted masks against reference masks: ``unetpp3d evaluate --pred P --ref R``.

Predictions and references are matched by case name (the file name without its image
suffixes, or a manifest's case name). Per case and per foreground label it reports:

* Dice and IoU;
* the 95th-percentile Hausdorff distance and the surface Dice at ``tolerance_mm``, both in mm,
  from MONAI's ``compute_hausdorff_distance`` and ``compute_surface_dice`` given the voxel spacing;
* predicted and reference volume (mL) and their difference (mL and % of the reference);
* detection counts over 26-connected components: a reference component is a hit (TP) when any
  predicted component overlaps it, else a miss (FN); a predicted component that overlaps no
  reference component is a false positive (FP).

The labels scored are those found in any prediction or reference; a case lacking one of them on
both sides gets a row for it all the same, so that every case has the same labels.

Empty masks follow nnU-Net's convention, the same as training validation (see
:mod:`unetpp3d.evaluation.metrics`): a class absent from both prediction and reference has no
Dice, IoU, HD95 or surface Dice (NaN in the CSV, ``null`` in ``summary.json``) and is left out
of the means; absent from one side only, it scores 0 (HD95 undefined).

The results go into an output folder (``--out``, default the current folder), never beside the
masks read: ``evaluation.csv`` (one row per case and label) and ``summary.json`` (per case and
label, the mean per label and the mean over labels, in the spirit of nnU-Net's).

A prediction must lie on its reference's grid (within ``readers.GRID_TOL`` of a voxel). A
reference stored with its axes in another order or direction but covering the same voxels is
re-indexed to match (never resampled); anything else is refused with a :class:`UserError` that
says what differs.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from unetpp3d import __version__
from unetpp3d.atomic import atomic_write_csv, atomic_write_text
from unetpp3d.data.manifest import case_name, load_manifest
from unetpp3d.errors import UserError, exit_status
from unetpp3d.evaluation.metrics import CaseMetrics, both_empty_row, evaluate_case
from unetpp3d.imageio.formats import VOLUME_SUFFIXES
from unetpp3d.outputs import check_outputs, csv_kind, json_kind
from unetpp3d.readable import path_kind

log = logging.getLogger("unetpp3d")


MANIFEST_SUFFIXES = (".json",)

TABLE_NAME, SUMMARY_NAME = "evaluation.csv", "summary.json"

# summary.json's metric names (nnU-Net's where it has one) -> CaseMetrics field, and what each is.
METRICS = {
    "Dice": ("dice", "Dice overlap, 2|P∩R| / (|P| + |R|)"),
    "IoU": ("iou", "intersection over union, |P∩R| / |P∪R|"),
    "HD95_mm": ("hd95_mm", "95th-percentile symmetric Hausdorff distance between the surfaces, mm"),
    "surface_Dice": ("surface_dice", "normalised surface Dice at tolerance_mm (MONAI compute_surface_dice)"),
    "pred_mL": ("pred_ml", "predicted volume, mL"),
    "ref_mL": ("ref_ml", "reference volume, mL"),
    "volume_diff_mL": ("volume_diff_ml", "predicted minus reference volume, mL"),
    "volume_diff_pct": ("volume_diff_pct", "volume difference in % of the reference volume"),
    "detection_TP": ("tp", "reference components (26-connected) overlapped by the prediction"),
    "detection_FP": ("fp", "predicted components overlapping no reference component"),
    "detection_FN": ("fn", "reference components the prediction misses"),
}

EMPTY_CONVENTION = ("a label absent from both prediction and reference has no Dice, IoU, HD95 or surface Dice "
                    "(null) and is left out of the means ('undefined' counts them); absent from one side only, "
                    "Dice, IoU and surface Dice are 0 and HD95 is null (nnU-Net's convention; training "
                    "validation uses the same)")


# What evaluate writes, as a later run recognises it: the table's first columns (CaseMetrics'
# first fields) and the summary's keys.
METRICS_TABLE = csv_kind("metrics table", "case,label,dice,")
SUMMARY = json_kind("evaluation summary", ("tool", "metric_per_case"))


def collect_masks(source: str | Path, role: str) -> dict[str, Path]:
    """Map case names to mask files for a file, a folder of masks or a manifest's labels.

    Args:
        source: a mask file, a folder of mask files, or a manifest (its cases' ``label`` paths,
            test list first).
        role: "prediction" or "reference", used in messages.

    Returns:
        Case name -> mask path.

    Raises:
        UserError: the path does not exist or holds no masks.
    """
    source = Path(source)
    if source.is_file() and source.name.lower().endswith(MANIFEST_SUFFIXES):
        manifest = load_manifest(source)
        found: dict[str, Path] = {}
        for case in [*manifest.test, *(manifest.validation or []), *manifest.training]:
            if getattr(case, "label", None) and case.name not in found:
                found[case.name] = Path(case.label)
        if not found:
            raise UserError(f"{source}: this manifest lists no {role} masks (no case has a label)")
        return found
    if source.is_file():
        return {case_name(source): source}
    if source.is_dir():
        found = {}
        for path in sorted(source.iterdir()):
            # Dot files are temporaries of interrupted atomic writes.
            if path.is_file() and not path.name.startswith(".") and path.name.lower().endswith(VOLUME_SUFFIXES):
                found.setdefault(case_name(path), path)
        if not found:
            raise UserError(f"{source}: no {role} masks here (looked for {', '.join(VOLUME_SUFFIXES)} files)")
        return found
    if path_kind(source) == "other":
        raise UserError(f"{source}: the {role} is a FIFO, device or socket, not a mask file, folder or manifest")
    raise UserError(f"{source}: no such {role} file, folder or manifest")


def _fmt(value: float, digits: int = 3) -> str:
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _csv_records(rows: list[CaseMetrics]) -> list[dict[str, Any]]:
    records = []
    for row in rows:
        record = asdict(row)
        for key, value in record.items():
            if isinstance(value, float):
                record[key] = "nan" if math.isnan(value) else round(value, 6)
        records.append(record)
    return records


def _json_value(value: float | int) -> float | int | None:
    # Strict JSON has no NaN: undefined is null.
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 6)
    return value


def _mean(values: list[float]) -> tuple[float, int]:
    """The mean of the defined values, and how many were undefined (NaN)."""
    defined = [v for v in values if not math.isnan(v)]
    return (float(np.mean(defined)) if defined else math.nan), len(values) - len(defined)


def class_means(rows: list[CaseMetrics]) -> dict[int, dict[str, Any]]:
    """Per label: the mean of each metric over the cases where it is defined, the number of cases
    and, per metric, how many cases were left out as undefined.

    Args:
        rows: per-case rows of :func:`~unetpp3d.evaluation.metrics.score_arrays`.

    Returns:
        label -> ``{metric name: mean (NaN when no case defines it), "cases": n,
        "undefined": {metric name: count}}`` with the names of :data:`METRICS`.
    """
    means: dict[int, dict[str, Any]] = {}
    for label in sorted({r.label for r in rows}):
        sel = [r for r in rows if r.label == label]
        entry: dict[str, Any] = {}
        undefined = {}
        for name, (field, _) in METRICS.items():
            entry[name], n_undefined = _mean([float(getattr(r, field)) for r in sel])
            if n_undefined:
                undefined[name] = n_undefined
        entry["cases"] = len(sel)
        entry["undefined"] = undefined
        means[label] = entry
    return means


def _summary(rows: list[CaseMetrics], files: dict[str, tuple[Path, Path]], tolerance_mm: float, pred: Path, ref: Path,
             failed: list[tuple[str, str]], unmatched_pred: list[str], unmatched_ref: list[str]) -> dict[str, Any]:
    per_case: dict[str, dict[str, Any]] = {}
    for r in rows:
        entry = per_case.setdefault(r.case, {"case": r.case, "prediction_file": str(files[r.case][0]),
                                             "reference_file": str(files[r.case][1]), "metrics": {}})
        entry["metrics"][str(r.label)] = {name: _json_value(getattr(r, field)) for name, (field, _) in METRICS.items()}
    means = class_means(rows)
    foreground = {}
    for name in METRICS:
        foreground[name] = _json_value(_mean([m[name] for m in means.values()])[0])
    return {
        "tool": f"unetpp3d evaluate {__version__}",
        "prediction": str(pred),
        "reference": str(ref),
        "tolerance_mm": float(tolerance_mm),
        "metrics": {name: text for name, (_, text) in METRICS.items()},
        "empty_masks": EMPTY_CONVENTION,
        "metric_per_case": list(per_case.values()),
        "mean": {str(label): {**{k: _json_value(v) for k, v in m.items() if k in METRICS},
                              "cases": m["cases"], "undefined": m["undefined"]} for label, m in means.items()},
        "foreground_mean": foreground,
        "failed": [{"case": name, "error": msg} for name, msg in failed],
        "predictions_without_reference": unmatched_pred,
        "references_without_prediction": unmatched_ref,
    }


def _every_label_in_every_case(rows: list[CaseMetrics], tolerance_mm: float) -> list[CaseMetrics]:
    # score_arrays rows a case's labels only; a label found elsewhere is absent from both sides here.
    labels = sorted({r.label for r in rows})
    by_case: dict[str, dict[int, CaseMetrics]] = {}
    for r in rows:
        by_case.setdefault(r.case, {})[r.label] = r
    return [by_case[case].get(label) or both_empty_row(case, label, tolerance_mm)
            for case in by_case for label in labels]


def _out_folder(out: str | Path | None) -> Path:
    folder = Path(out) if out is not None else Path.cwd()
    if folder.suffix.lower() in (".csv", ".json"):
        raise UserError(f"--out {folder}: names a file, but --out takes a folder: evaluate writes {TABLE_NAME} and "
                        f"{SUMMARY_NAME} into it (e.g. --out {folder.with_suffix('')})")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out {folder}: exists and is not a folder; pick another --out")
    return folder


def _printed(rows: list[CaseMetrics], tolerance_mm: float) -> list[str]:
    table = [["case", "label", "Dice", "IoU", "HD95 mm", f"NSD@{tolerance_mm:g}mm", "pred mL", "ref mL", "ΔV %",
              "TP", "FP", "FN", "note"]]
    for r in rows:
        table.append([r.case, str(r.label), _fmt(r.dice), _fmt(r.iou), _fmt(r.hd95_mm, 2), _fmt(r.surface_dice),
                      _fmt(r.pred_ml, 2), _fmt(r.ref_ml, 2), _fmt(r.volume_diff_pct, 1), str(r.tp), str(r.fp),
                      str(r.fn), r.note])
    lines = [_table(table)]
    for label, m in class_means(rows).items():
        sel = [r for r in rows if r.label == label]
        tp, fp, fn = (sum(getattr(r, k) for r in sel) for k in ("tp", "fp", "fn"))
        lines.append(f"label {label}: {m['cases']} case(s), mean Dice {_mean_text(m, 'Dice')}, "
                     f"mean IoU {_mean_text(m, 'IoU')}, mean HD95 {_mean_text(m, 'HD95_mm', 2, ' mm')}, "
                     f"mean surface Dice {_mean_text(m, 'surface_Dice')}; detections TP {tp}, FP {fp}, FN {fn}")
    return lines


def _mean_text(means: dict[str, Any], name: str, digits: int = 4, unit: str = "") -> str:
    undefined = means["undefined"].get(name, 0)
    return f"{_fmt(means[name], digits)}{unit}{f' ({undefined} undefined)' if undefined else ''}"


def run_evaluation(pred: str | Path, ref: str | Path, out: str | Path | None = None,
                   tolerance_mm: float = 2.0) -> int:
    """Score every prediction that has a reference, write the table and summary, print a summary.

    Args:
        pred: predicted masks: a file, a folder (``<case>.nii.gz`` …) or a manifest.
        ref: reference masks: a file, a folder or a manifest (its cases' labels).
        out: the folder receiving ``evaluation.csv`` (one row per case and label) and
            ``summary.json``; default the current folder, never the masks' own folders (which
            may be read-only or shared). Created when missing.
        tolerance_mm: tolerance of the surface Dice in mm.

    Returns:
        The exit status of :func:`unetpp3d.errors.exit_status`: 0 when every matched case was
        scored, 2 when some case could not be for a reason the user can fix (an unreadable mask,
        a prediction off its reference's grid), 1 when some case failed otherwise. Each failed
        case is reported; the others are scored and written.

    Raises:
        UserError: nothing matches, the tolerance is not positive, ``out`` is not a folder, or
            (for one file against one file) the masks cannot be read or do not share a grid.
    """
    pred, ref = Path(pred), Path(ref)
    if not (math.isfinite(tolerance_mm) and 0 < tolerance_mm <= 1000):
        raise UserError(f"--tolerance-mm must be a distance in mm above 0 (and at most 1000), got {tolerance_mm}")
    folder = _out_folder(out)
    preds = collect_masks(pred, "prediction")
    refs = collect_masks(ref, "reference")
    # Before any mask is scored: the table and summary must not replace a mask, a manifest or a
    # user's file of the same name.
    inputs = [*preds.values(), *refs.values(), *(p for p in (pred, ref) if p.is_file())]
    check_outputs([folder / TABLE_NAME], METRICS_TABLE, inputs, "--out")
    check_outputs([folder / SUMMARY_NAME], SUMMARY, inputs, "--out")
    single = pred.is_file() and ref.is_file() and len(preds) == 1 and len(refs) == 1 \
        and not pred.name.lower().endswith(MANIFEST_SUFFIXES) and not ref.name.lower().endswith(MANIFEST_SUFFIXES)
    if single:
        pairs = [(next(iter(preds)), next(iter(preds.values())), next(iter(refs.values())))]
    else:
        pairs = [(name, path, refs[name]) for name, path in preds.items() if name in refs]
    if not pairs:
        raise UserError(f"{pred} and {ref}: no case names in common (predictions: {', '.join(sorted(preds)[:5])}"
                        f"{' …' if len(preds) > 5 else ''}; references: {', '.join(sorted(refs)[:5])}"
                        f"{' …' if len(refs) > 5 else ''}); name each mask <case>.nii.gz")
    unmatched_pred = [] if single else sorted(set(preds) - set(refs))
    unmatched_ref = [] if single else sorted(set(refs) - set(preds))

    rows: list[CaseMetrics] = []
    user_failed: list[tuple[str, str]] = []
    other_failed: list[tuple[str, str]] = []
    for name, pred_path, ref_path in pairs:
        start = time.perf_counter()
        try:
            rows.extend(evaluate_case(pred_path, ref_path, tolerance_mm, case=name))
        except UserError as exc:
            if single:
                raise
            user_failed.append((name, str(exc)))
            log.error("%s: %s", name, exc)
            continue
        except (RuntimeError, ValueError, OSError, MemoryError) as exc:
            # Not a user mistake we recognised: keep the traceback in the log, score the others.
            log.exception("%s: failed", name)
            other_failed.append((name, f"{type(exc).__name__}: {exc}"))
            continue
        log.info("%s: scored in %.1f s", name, time.perf_counter() - start)

    rows = _every_label_in_every_case(rows, tolerance_mm)
    failed = user_failed + other_failed
    files = {name: (pred_path, ref_path) for name, pred_path, ref_path in pairs}
    summary = _summary(rows, files, tolerance_mm, pred, ref, failed, unmatched_pred, unmatched_ref)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(folder / TABLE_NAME, list(CaseMetrics.__dataclass_fields__), _csv_records(rows))
    atomic_write_text(folder / SUMMARY_NAME, json.dumps(summary, indent=1, ensure_ascii=False) + "\n")

    lines = _printed(rows, tolerance_mm) if rows else []
    lines.append(f"per-case metrics written to {folder / TABLE_NAME}, summary to {folder / SUMMARY_NAME}")
    for name, msg in failed:
        lines.append(f"FAILED {name}: {msg}")
    if unmatched_pred:
        lines.append(f"{len(unmatched_pred)} prediction(s) without a reference: {', '.join(unmatched_pred)}")
    if unmatched_ref:
        lines.append(f"{len(unmatched_ref)} reference(s) without a prediction: {', '.join(unmatched_ref)}")
    print("\n".join(lines))
    return exit_status(len(user_failed), len(other_failed))
