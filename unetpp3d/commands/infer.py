"""``unetpp3d infer``: expand the inputs into cases, run the predictor on each, write every output.

Every output is written atomically (the mask last, so an existing mask means a finished case);
a case that fails is reported and the batch goes on; a summary table ends the run, and the exit
status follows :func:`unetpp3d.errors.exit_status`. What is written besides the mask follows the
model's task (:mod:`unetpp3d.tasks`: a nodule report, the preview's window) and the options:
class probabilities (``--save-probabilities``), per-class volume and HU statistics
(``--statistics``), and the mask as NIfTI or as a DICOM SEG over the source series
(``--output-type``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from unetpp3d import __version__
from unetpp3d.atomic import atomic_write_text
from unetpp3d.config import INFER_MODES
from unetpp3d.data.manifest import case_name
from unetpp3d.data.plausibility import scan_warnings, view_warnings, volume_warnings
from unetpp3d.errors import UserError, exit_status
from unetpp3d.imageio.dicom_seg import require_highdicom, write_dicom_seg
from unetpp3d.imageio.formats import IMAGE_SUFFIXES
from unetpp3d.imageio.nifti import is_complete
from unetpp3d.imageio.writer import OUTPUT_TYPES, write_mask, write_probabilities
from unetpp3d.inference.inputs import InputCase, expand_inputs, is_dicom
from unetpp3d.inference.nodules import write_nodule_report
from unetpp3d.inference.points import (
    DEFAULT_CROP_MM,
    DEFAULT_MAX_DISTANCE_MM,
    format_results,
    read_points,
    segment_points,
    write_point_report,
)
from unetpp3d.inference.predictor import Predictor
from unetpp3d.inference.statistics import (
    STATISTICS_TABLE,
    ClassStatistics,
    class_statistics,
    read_statistics_json,
    statistics_json,
    write_statistics_table,
)
from unetpp3d.outputs import MASK, NIFTI_PROBABILITIES, PNG, OutputKind, check_outputs, csv_kind, json_kind
from unetpp3d.preview import save_overlay_png
from unetpp3d.readable import path_kind

log = logging.getLogger("unetpp3d")

__all__ = ["expand_inputs", "run_inference"]


MASK_SUFFIXES = OUTPUT_TYPES["nifti"]

# Names that say "a file", not "a folder", where an output path is either.
_FILE_SUFFIXES = IMAGE_SUFFIXES + (".png", ".json", ".csv", ".npz", ".npy")


def _mask_outputs(cases: Sequence[InputCase], out: Path, output_type: str) -> dict[str, Path]:
    suffixes = OUTPUT_TYPES[output_type]
    is_file = out.name.lower().endswith(suffixes)
    if not is_file and path_kind(out) not in ("missing", "folder"):
        raise UserError(f"--out {out}: exists and is not a folder; give a folder for the masks, or a new "
                        f"{suffixes[0]} file name for one scan's mask")
    if not is_file and not out.is_dir() and out.name.lower().endswith(_FILE_SUFFIXES):
        other = next((t for t, s in OUTPUT_TYPES.items() if out.name.lower().endswith(s)), None)
        hint = f" (or --output-type {other})" if other else ""
        raise UserError(f"--out {out}: {output_type} masks are written as {suffixes[0]}; name the file "
                        f"{suffixes[0]}{hint}, or give a folder")
    if is_file and len(cases) > 1:
        raise UserError(f"--out {out}: {len(cases)} inputs need a folder for their masks, not a file name")
    if is_file:
        return {cases[0].name: out}
    return {c.name: out / f"{c.name}{suffixes[0]}" for c in cases}


def _preview_outputs(cases: Sequence[InputCase], preview: Path | None) -> dict[str, Path]:
    if preview is None:
        return {}
    if preview.suffix.lower() != ".png" and path_kind(preview) not in ("missing", "folder"):
        raise UserError(f"--preview {preview}: exists and is not a folder; give a folder for the previews, or a "
                        ".png file name for one scan's preview")
    if preview.suffix.lower() == ".png":
        if len(cases) > 1:
            raise UserError(f"--preview {preview}: {len(cases)} inputs need a folder for their previews")
        return {cases[0].name: preview}
    return {c.name: preview / f"{c.name}.png" for c in cases}


def _probability_outputs(cases: Sequence[InputCase], target: Path | None, masks: dict[str, Path]) -> dict[str, Path]:
    if target is None:
        return {}
    if target.name.lower().endswith(MASK_SUFFIXES):
        if len(cases) > 1:
            raise UserError(f"--save-probabilities {target}: {len(cases)} inputs need a folder for their "
                            "probabilities, not a file name")
        paths = {cases[0].name: target}
    elif not target.is_dir() and target.name.lower().endswith(_FILE_SUFFIXES):
        raise UserError(f"--save-probabilities {target}: probabilities are written as float NIfTI; name the file "
                        ".nii.gz, or give a folder")
    else:
        paths = {c.name: target / f"{c.name}.nii.gz" for c in cases}
    for name, path in paths.items():
        if path.resolve() == masks[name].resolve():
            raise UserError(f"--save-probabilities {target}: would overwrite the mask {masks[name]}; give the "
                            "probabilities their own folder")
    return paths


def _beside(mask_path: Path, what: str) -> Path:
    """``masks/liver_5.nii.gz`` -> ``masks/liver_5.<what>``."""
    return mask_path.with_name(f"{case_name(mask_path)}.{what}")


# What infer writes, as a later run recognises it (see unetpp3d.outputs): a DICOM SEG names
# unetpp3d as its manufacturer; the reports and tables carry their own keys and columns.
DICOM_SEG = OutputKind("DICOM SEG", (".dcm",), lambda p: b"unetpp3d" in p.read_bytes()[:1 << 16])
MASK_KINDS = {"nifti": MASK, "dicom-seg": DICOM_SEG}
NODULE_REPORT = json_kind("nodule report", ("nodules", "coordinate_system"))
NODULE_TABLE = csv_kind("nodule table", "id,label,voxels,")
CASE_STATISTICS = json_kind("statistics report", ("classes",))
STATISTICS_CSV = csv_kind("statistics table", "case,label,name,")


def _protected_inputs(inputs: Sequence[str | Path], cases: Sequence[InputCase]) -> list[Path]:
    """Everything an output must not touch: each scan, each folder given, each manifest."""
    return [*(Path(p) for p in inputs), *(c.path for c in cases)]


def _check_settings(prune_level: int | None, overlap: float | None, batch_size: int | None) -> None:
    """Refuse option values outside their range before anything is read."""
    if prune_level is not None and not 1 <= prune_level <= 8:
        raise UserError(f"--prune-level {prune_level}: give a level from 1 to the network's depth (at most 8)")
    if overlap is not None and not (math.isfinite(overlap) and 0 <= overlap < 1):
        raise UserError(f"--overlap {overlap}: give a fraction from 0 up to (not including) 1, e.g. 0.5")
    if batch_size is not None and not 1 <= batch_size <= 1024:
        raise UserError(f"--batch-size {batch_size}: give a number of windows from 1 to 1024")


def _finished(mask_path: Path) -> bool:
    """Whether a case's mask exists whole: an empty or truncated file (left by a failed write of an
    older version) is written again, not skipped forever."""
    if not (mask_path.is_file() and mask_path.stat().st_size > 0):
        return False
    return is_complete(mask_path) if mask_path.name.lower().endswith(OUTPUT_TYPES["nifti"]) else True


@dataclass
class _Targets:
    """Where one case's outputs go."""

    mask: Path
    preview: Path | None = None
    probabilities: Path | None = None
    statistics: Path | None = None


@dataclass
class _Outcome:
    name: str
    status: str
    seconds: float = 0.0
    voxels: int | None = None
    volume_ml: float | None = None
    note: str = ""
    user_problem: bool = False  # a failure the user can fix (exit status 2 rather than 1)
    quality: float | None = None  # the heads' disagreement inside the mask


def _summary(outcomes: Sequence[_Outcome]) -> str:
    rows = [["case", "status", "seconds", "voxels", "volume mL", "disagreement", "note"]]
    for o in outcomes:
        rows.append([o.name, o.status, f"{o.seconds:.1f}" if o.status == "ok" else "",
                     "" if o.voxels is None else f"{o.voxels:,}", "" if o.volume_ml is None else f"{o.volume_ml:.2f}",
                     "" if o.quality is None else f"{o.quality:.3f}",
                     (o.note.splitlines() or [""])[0]])  # tracebacks and details stay in the log
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    counts = {s: sum(o.status == s for o in outcomes) for s in ("ok", "skipped", "failed")}
    lines.append(f"{counts['ok']} segmented, {counts['skipped']} skipped, {counts['failed']} failed")
    if any(o.quality is not None for o in outcomes):
        lines.append("disagreement: mean spread of the UNet++ heads' probabilities inside the mask (0 = all heads "
                     "agree); review the masks with the highest values first")
    return "\n".join(lines)


def _run_case(predictor: Predictor, case: InputCase, targets: _Targets, output_type: str
              ) -> tuple[_Outcome, list[ClassStatistics]]:
    result = predictor.predict(case.path)
    labels = {int(k): str(v) for k, v in predictor.prep.labels.items()}
    written: list[Path] = []
    rows: list[ClassStatistics] = []
    try:
        note = ""
        if predictor.rules.nodule_report and result.nodules is not None:
            json_path, csv_path = _beside(targets.mask, "nodules.json"), _beside(targets.mask, "nodules.csv")
            write_nodule_report(result.nodules, json_path, csv_path, source=str(case.path),
                                min_volume_ml=predictor.min_component_ml, quality=result.quality)
            written += [json_path, csv_path]
            note = f"{len(result.nodules)} nodule(s)"
        if targets.preview is not None:
            save_overlay_png(result.image_xyz, result.mask_xyz, result.geometry, targets.preview, title=case.name,
                             window=predictor.rules.preview_window)
            written.append(targets.preview)
        if targets.probabilities is not None:
            write_probabilities(result.probabilities, result.geometry, targets.probabilities)
            written.append(targets.probabilities)
        if targets.statistics is not None:
            rows = class_statistics(case.name, result.mask_xyz, result.image_xyz, result.geometry, labels)
            text = statistics_json(rows, case=case.name, image=str(case.path), mask=str(targets.mask),
                                   model=predictor.source, tool=f"unetpp3d infer {__version__}",
                                   intensity="the scan's values as read (HU for CT)")
            atomic_write_text(targets.statistics, text)
            written.append(targets.statistics)
        # The mask goes last: an existing mask means the case finished (what --skip-existing checks).
        if output_type == "dicom-seg":
            write_dicom_seg(result.mask_xyz, result.geometry, case.path, targets.mask, labels,
                            task=predictor.prep.task, series_uid=predictor.series_uid, version=__version__)
        else:
            write_mask(result.mask_xyz, result.geometry, targets.mask)
    except BaseException:
        for p in written:  # a failed case leaves nothing behind
            p.unlink(missing_ok=True)
        raise
    voxels = int(np.count_nonzero(result.mask_xyz))
    if result.quality is not None:
        log.info("%s: head disagreement %.4f inside the mask", case.name, result.quality)
    # Segmented all the same, but a result on such an input is likely meaningless: say so.
    warnings = (scan_warnings(result.image_xyz, result.geometry) + view_warnings(result.geometry,
                                                                                predictor.prep.field_of_view_mm)
                + _volume_warnings(predictor, result.mask_xyz, result.geometry.voxel_volume_ml()))
    for w in warnings:
        log.warning("%s: %s", case.name, w)
    note = "; ".join([*(f"warning: {w}" for w in warnings), *([note] if note else [])])
    outcome = _Outcome(case.name, "ok", result.seconds, voxels, voxels * result.geometry.voxel_volume_ml(), note,
                       quality=result.quality)
    return outcome, rows


def _volume_warnings(predictor: Predictor, mask: np.ndarray, voxel_ml: float) -> list[str]:
    """Predicted class volumes far outside the training set's (none for a model that did not record it)."""
    trained = predictor.prep.volume_range_ml
    if not trained:
        return []
    counts = np.bincount(np.asarray(mask).reshape(-1).astype(np.int64), minlength=predictor.prep.num_classes)
    volumes = {str(k): float(counts[k]) * voxel_ml for k in range(1, counts.size)}
    return volume_warnings(volumes, trained, {str(k): str(v) for k, v in predictor.prep.labels.items()})


def _check_dicom_inputs(cases: Sequence[InputCase]) -> None:
    require_highdicom()
    for case in cases:
        if not case.error and not is_dicom(case.path):
            raise UserError(f"--output-type dicom-seg: {case.path} is not DICOM, so no DICOM SEG can reference it; "
                            "give DICOM series folders (or DICOM files), or use --output-type nifti")


def _run_points(cases: Sequence[InputCase], out: Path, points_path: Path, crop_mm: float | None,
                options: dict) -> int:
    """``infer SCAN --points CSV --out DIR``: one nodule per point, on the scan's own grid."""
    if len(cases) != 1:
        raise UserError(f"--points: the points are positions in one scan; give exactly one scan, not {len(cases)}")
    case = cases[0]
    if case.error:
        raise UserError(f"{case.path}: {case.error}")
    if out.name.lower().endswith(IMAGE_SUFFIXES) or (out.exists() and not out.is_dir()):
        raise UserError(f"--out {out}: with --points, give a folder (it receives the mask and the point report)")
    points = read_points(points_path)  # before the model loads: a bad CSV costs nothing
    crop = DEFAULT_CROP_MM if crop_mm is None else float(crop_mm)
    model = options.pop("model")
    predictor = Predictor.from_source(model, keep_probabilities=True, progress=False, **options)
    if not model:
        print(f"no --model given: using the newest run, {predictor.source}")
    log.info("%s", predictor.describe())
    log.info("%s: %d point(s) from %s, a %g mm crop around each", case.name, len(points), points_path, crop)
    labels, geometry, results = segment_points(predictor, case.path, points, crop_mm=crop)
    for r in results:
        if r.status != "ok":
            log.warning("%s: point %d (id %s): %s: %s", case.name, r.row, r.id, r.status, r.note)
    out.mkdir(parents=True, exist_ok=True)
    mask_path = out / f"{case.name}.nii.gz"
    write_point_report(results, out / f"{case.name}.points.json", out / f"{case.name}.points.csv",
                       source=str(case.path), points_file=str(points_path), crop_mm=crop,
                       max_distance_mm=DEFAULT_MAX_DISTANCE_MM)
    write_mask(labels, geometry, mask_path)  # last: an existing mask means a finished run
    log.info("%s: wrote %s (label i = the nodule of row i) and its .points.json/.csv", case.name, mask_path)
    print(format_results(results))
    # A point outside the scan is the user's to fix (2); a crop that failed otherwise is 1.
    return exit_status(sum(r.status == "outside" for r in results), sum(r.status == "failed" for r in results))


def run_inference(inputs: Sequence[str | Path], out: str | Path, model: str | Path | Sequence[str | Path] | None = None,
                  mode: str | None = None, prune_level: int | None = None, tta: bool | None = None,
                  overlap: float | None = None, batch_size: int | None = None, device: str | None = None,
                  amp: bool = True, preview: str | Path | None = None, skip_existing: bool = False,
                  series_uid: str | None = None, trust_bundle: bool = False, output_type: str = "nifti",
                  save_probabilities: str | Path | None = None, statistics: bool = False,
                  points: str | Path | None = None, crop_mm: float | None = None) -> int:
    """Segment scans and write one mask per scan on that scan's own grid (``unetpp3d infer``).

    The settings left None are the model's own (its config's ``infer`` section), else
    :class:`~unetpp3d.config.InferConfig`'s defaults; see :meth:`Predictor.from_source`.

    Args:
        inputs: scan files (NIfTI, NRRD, MHA), DICOM series folders, folders of those, or a
            manifest (its test cases, else its training images). A case is named after its file
            (nnU-Net's ``liver_005_0000.nii.gz`` is ``liver_005``) or its DICOM folder.
        out: the mask file for one scan (``.nii.gz``; ``.dcm`` for a DICOM SEG), or a folder
            receiving ``<case>.nii.gz`` (``<case>.dcm``). Lung-nodule models also write
            ``<case>.nodules.json`` and ``.csv`` beside each mask.
        model: checkpoint, run folder or exported bundle, or a list of them to ensemble (their
            probabilities averaged); None: the newest run in ``./runs`` (printed).
        mode: "accurate" or "fast" (default: the model's).
        prune_level: UNet++ L^l for fast mode (default: the model's, else 2, capped at the depth).
        tta: flip test-time augmentation, 8 flips, probabilities averaged (default: the model's).
        overlap: sliding-window overlap (default: the model's).
        batch_size: windows per forward pass (default: the model's).
        device: cpu, cuda (or gpu) or cuda:N (default: CUDA when available).
        amp: reduced precision where it pays (see :class:`Predictor`).
        preview: a PNG (one scan) or a folder of ``<case>.png`` showing the mask over the scan.
        skip_existing: leave cases whose mask already exists.
        series_uid: the DICOM series to read from folders holding several.
        trust_bundle: allow a bundle not exported by unetpp3d (see :meth:`Predictor.from_source`).
        output_type: "nifti" (compressed NIfTI) or "dicom-seg": a DICOM SEG referencing the source
            series (DICOM inputs only; needs highdicom, the ``dicom`` extra).
        save_probabilities: a ``.nii.gz`` (one scan) or a folder receiving ``<case>.nii.gz``: the
            class probabilities as float32 NIfTI on the scan's grid, one volume per class
            (``x, y, z, class``), summing to one, before the task's clean-up.
        statistics: write ``<case>.statistics.json`` beside each mask (per class: voxels, volume
            in mL, mean and std HU inside the mask) and, when ``out`` is a folder,
            ``statistics.csv`` with every case's rows (skipped cases' from their JSON).
        points: a CSV of nodule locations in the one input scan (world LPS mm: ``coordX, coordY,
            coordZ``, optional ``id``); the model runs on a crop around each point and ``out``
            (a folder) receives ``<case>.nii.gz`` with label ``i`` for row ``i`` and
            ``<case>.points.json``/``.csv`` (see :mod:`unetpp3d.inference.points`).
        crop_mm: with ``points``: the edge of the cube cropped around each point (default 64).

    Returns:
        The exit status of :func:`unetpp3d.errors.exit_status`: 0 when every case was segmented
        or skipped; 2 when some case failed for a reason the user can fix (a missing or
        unreadable input, a DICOM series that cannot be read or referenced); 1 when some case
        failed otherwise (1 wins over 2). Each failed case is listed in the summary table printed
        at the end. With ``points``: 2 when a point lies outside the scan, 1 when a crop failed
        otherwise; "nothing found" is an answer, not a failure.

    Raises:
        UserError: no usable model, bad settings, or outputs that cannot be named (checked
            before any case runs; for ``dicom-seg``, before the model loads: highdicom missing or
            an input that is not DICOM). Problems with one scan are reported, not raised.
    """
    out = Path(out)
    if output_type not in OUTPUT_TYPES:
        raise UserError(f"--output-type {output_type!r}: use {' or '.join(OUTPUT_TYPES)}")
    if mode is not None and mode not in INFER_MODES:
        raise UserError(f"--mode {mode!r}: use {' or '.join(INFER_MODES)}")
    _check_settings(prune_level, overlap, batch_size)
    cases = expand_inputs(inputs)
    if points is not None:
        if output_type != "nifti" or save_probabilities is not None or statistics or preview is not None:
            raise UserError("--points writes one label map and a report per point; drop --output-type, "
                            "--save-probabilities, --statistics and --preview")
        return _run_points(cases, out, Path(points), crop_mm, dict(
            model=model, device=device, trust_bundle=trust_bundle, overlap=overlap, batch_size=batch_size, mode=mode,
            prune_level=prune_level, tta=tta, amp=amp, series_uid=series_uid))
    if crop_mm is not None:
        raise UserError("--crop-mm applies to --points; add a points CSV or drop it")
    if output_type == "dicom-seg":
        _check_dicom_inputs(cases)
    masks = _mask_outputs(cases, out, output_type)
    previews = _preview_outputs(cases, Path(preview) if preview is not None else None)
    probabilities = _probability_outputs(cases, Path(save_probabilities) if save_probabilities is not None else None,
                                         masks)
    targets = {c.name: _Targets(masks[c.name], previews.get(c.name), probabilities.get(c.name),
                                _beside(masks[c.name], "statistics.json") if statistics else None) for c in cases}
    # Before the model loads: an output that would destroy a scan, or replace a file we did not
    # write, is refused now rather than after minutes of inference.
    protected = _protected_inputs(inputs, cases)
    check_outputs(masks.values(), MASK_KINDS[output_type], protected, "--out")
    check_outputs(previews.values(), PNG, protected, "--preview")
    check_outputs(probabilities.values(), NIFTI_PROBABILITIES, protected, "--save-probabilities")
    if statistics:
        check_outputs([t.statistics for t in targets.values()], CASE_STATISTICS, protected, "--statistics")
        if not out.name.lower().endswith(OUTPUT_TYPES[output_type]):
            check_outputs([out / STATISTICS_TABLE], STATISTICS_CSV, protected, "--statistics")
    predictor = Predictor.from_source(
        model, device=device, trust_bundle=trust_bundle, overlap=overlap, batch_size=batch_size, mode=mode,
        prune_level=prune_level, tta=tta, amp=amp, series_uid=series_uid,
        keep_probabilities=True if save_probabilities is not None else None,
    )
    if not model:
        print(f"no --model given: using the newest run, {predictor.source}")
    if predictor.rules.nodule_report:
        check_outputs([_beside(m, "nodules.json") for m in masks.values()], NODULE_REPORT, protected, "--out")
        check_outputs([_beside(m, "nodules.csv") for m in masks.values()], NODULE_TABLE, protected, "--out")
    log.info("%s", predictor.describe())
    outcomes: list[_Outcome] = []
    rows: list[ClassStatistics] = []
    for case in tqdm(cases, desc="cases", unit="case", disable=len(cases) < 2):
        target = targets[case.name]
        if case.error:
            log.error("%s: %s: %s", case.name, case.path, case.error)
            outcomes.append(_Outcome(case.name, "failed", note=f"{case.path}: {case.error}", user_problem=True))
            continue
        if skip_existing and _finished(target.mask):
            log.info("%s: %s exists, skipped", case.name, target.mask)
            outcomes.append(_Outcome(case.name, "skipped", note=str(target.mask)))
            if target.statistics is not None:
                # The case is done; its statistics come from the run that wrote its mask, where there are any.
                try:
                    rows += read_statistics_json(target.statistics)
                except UserError as exc:
                    log.warning("%s: %s; %s leaves the case out", case.name,
                                exc if target.statistics.exists() else f"no {target.statistics.name}",
                                STATISTICS_TABLE)
            continue
        try:
            outcome, case_rows = _run_case(predictor, case, target, output_type)
            outcomes.append(outcome)
            rows += case_rows
            log.info("%s: wrote %s", case.name, target.mask)
        except UserError as exc:
            log.error("%s: %s", case.name, exc)
            outcomes.append(_Outcome(case.name, "failed", note=str(exc), user_problem=True))
        except (RuntimeError, ValueError, OSError, MemoryError) as exc:
            # Not a user mistake we recognised: keep the traceback in the log, keep going.
            log.exception("%s: failed", case.name)
            outcomes.append(_Outcome(case.name, "failed", note=f"{type(exc).__name__}: {exc}"))
    if statistics and not out.name.lower().endswith(OUTPUT_TYPES[output_type]):
        table = write_statistics_table(rows, out / STATISTICS_TABLE)
        log.info("per-class statistics of %d case(s) written to %s", len({r.case for r in rows}), table)
    print(_summary(outcomes))
    failed = [o for o in outcomes if o.status == "failed"]
    return exit_status(sum(o.user_problem for o in failed), sum(not o.user_problem for o in failed))
