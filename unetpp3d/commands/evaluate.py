"""Scoring predicted masks against reference masks: ``unetpp3d evaluate --pred P --ref R``.

Predictions and references are matched by case name (the file name without its image
suffixes, or a manifest's case name). Per case and per foreground label it reports:

* Dice and IoU (both 1 when prediction and reference are empty);
* the 95th-percentile Hausdorff distance and the surface Dice at ``tolerance_mm``, both in mm,
  from MONAI's ``compute_hausdorff_distance`` and ``compute_surface_dice`` given the voxel spacing
  (HD95 is nan, with a note, when either mask is empty; surface Dice is then 1 if both are
  empty, else 0);
* predicted and reference volume (mL) and their difference (mL and % of the reference);
* detection counts over 26-connected components: a reference component is a hit (TP) when any
  predicted component overlaps it, else a miss (FN); a predicted component that overlaps no
  reference component is a false positive (FP).

A prediction must lie on its reference's grid (within ``readers.GRID_TOL`` of a voxel). A
reference stored with its axes in another order or direction but covering the same voxels is
re-indexed to match (never resampled); anything else is refused with a :class:`UserError` that
says what differs.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from unetpp3d.atomic import atomic_write_text
from unetpp3d.data.manifest import case_name, load_manifest
from unetpp3d.errors import UserError
from unetpp3d.evaluation.metrics import CaseMetrics, evaluate_case

log = logging.getLogger("unetpp3d")


IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


MANIFEST_SUFFIXES = (".json",)


def collect_masks(source: str | Path, role: str) -> dict[str, Path]:
    """Map case names to mask files for a file, a folder of masks or a manifest's labels.

    Args:
        source: a mask file, a folder of mask files, or a manifest (its cases' ``label`` paths,
            test list first).
        role: "prediction" or "reference", used in messages.

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
            if path.is_file() and not path.name.startswith(".") and path.name.lower().endswith(IMAGE_SUFFIXES):
                found.setdefault(case_name(path), path)
        if not found:
            raise UserError(f"{source}: no {role} masks here (looked for {', '.join(IMAGE_SUFFIXES)} files)")
        return found
    raise UserError(f"{source}: no such {role} file, folder or manifest")


def _fmt(value: float, digits: int = 3) -> str:
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _write_csv(path: Path, rows: list[CaseMetrics]) -> None:
    buf = io.StringIO()
    fields = list(CaseMetrics.__dataclass_fields__)
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        record = asdict(row)
        for key, value in record.items():
            if isinstance(value, float):
                record[key] = "nan" if math.isnan(value) else round(value, 6)
        writer.writerow(record)
    atomic_write_text(path, buf.getvalue())


def run_evaluation(pred: str | Path, ref: str | Path, out: str | Path | None = None,
                   tolerance_mm: float = 2.0) -> int:
    """Score every prediction that has a reference, write a CSV and print a summary.

    Args:
        pred: predicted masks: a file, a folder (``<case>.nii.gz`` …) or a manifest.
        ref: reference masks: a file, a folder or a manifest (its cases' labels).
        out: the CSV to write, one row per case and label (default: ``evaluation.csv`` in the
            prediction folder, or beside the prediction file).
        tolerance_mm: tolerance of the surface Dice in mm.

    Returns:
        0 when every matched case was scored, 1 when some case could not be (each is reported).

    Raises:
        UserError: nothing matches, the tolerance is not positive, or (for one file against one
            file) the masks cannot be read or do not share a grid.
    """
    pred, ref = Path(pred), Path(ref)
    if not tolerance_mm > 0:
        raise UserError(f"--tolerance-mm must be positive, got {tolerance_mm}")
    preds = collect_masks(pred, "prediction")
    refs = collect_masks(ref, "reference")
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
    failed: list[tuple[str, str]] = []
    for name, pred_path, ref_path in pairs:
        start = time.perf_counter()
        try:
            rows.extend(evaluate_case(pred_path, ref_path, tolerance_mm, case=name))
        except UserError as exc:
            if single:
                raise
            failed.append((name, str(exc)))
            log.error("%s: %s", name, exc)
            continue
        log.info("%s: scored in %.1f s", name, time.perf_counter() - start)

    if out is None:
        out = (pred if pred.is_dir() else pred.parent) / "evaluation.csv"
    out = Path(out)
    if rows:
        _write_csv(out, rows)

    table = [["case", "label", "Dice", "IoU", "HD95 mm", f"NSD@{tolerance_mm:g}mm", "pred mL", "ref mL", "ΔV %",
              "TP", "FP", "FN", "note"]]
    for r in rows:
        table.append([r.case, str(r.label), _fmt(r.dice), _fmt(r.iou), _fmt(r.hd95_mm, 2), _fmt(r.surface_dice),
                      _fmt(r.pred_ml, 2), _fmt(r.ref_ml, 2), _fmt(r.volume_diff_pct, 1), str(r.tp), str(r.fp),
                      str(r.fn), r.note])
    lines = []
    if rows:
        lines.append(_table(table))
        for label in sorted({r.label for r in rows}):
            sel = [r for r in rows if r.label == label]
            hd = [r.hd95_mm for r in sel if not math.isnan(r.hd95_mm)]
            tp, fp, fn = (sum(getattr(r, k) for r in sel) for k in ("tp", "fp", "fn"))
            lines.append(
                f"label {label}: {len(sel)} case(s), mean Dice {np.mean([r.dice for r in sel]):.4f}, "
                f"mean IoU {np.mean([r.iou for r in sel]):.4f}, "
                f"mean HD95 {_fmt(float(np.mean(hd)) if hd else math.nan, 2)} mm"
                f"{f' ({len(sel) - len(hd)} undefined)' if len(hd) < len(sel) else ''}, "
                f"mean surface Dice {np.mean([r.surface_dice for r in sel]):.4f}; detections TP {tp}, FP {fp}, FN {fn}"
            )
        lines.append(f"per-case metrics written to {out}")
    for name, msg in failed:
        lines.append(f"FAILED {name}: {msg}")
    if unmatched_pred:
        lines.append(f"{len(unmatched_pred)} prediction(s) without a reference: {', '.join(unmatched_pred)}")
    if unmatched_ref:
        lines.append(f"{len(unmatched_ref)} reference(s) without a prediction: {', '.join(unmatched_ref)}")
    print("\n".join(lines))
    return 1 if failed else 0
