"""``unetpp3d infer``: expand the inputs into cases, run the predictor on each, write every output.

Every output is written atomically (the mask last, so an existing mask means a finished case);
a case that fails is reported and the batch goes on; a summary table ends the run. What is
written besides the mask (a nodule report, the preview's window) follows the model's task
(:mod:`unetpp3d.tasks`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from unetpp3d.data.manifest import case_name
from unetpp3d.errors import UserError
from unetpp3d.imageio.formats import IMAGE_SUFFIXES
from unetpp3d.imageio.writer import write_mask
from unetpp3d.inference.inputs import InputCase, expand_inputs
from unetpp3d.inference.nodules import write_nodule_report
from unetpp3d.inference.predictor import Predictor
from unetpp3d.preview import save_overlay_png

log = logging.getLogger("unetpp3d")

__all__ = ["expand_inputs", "run_inference"]


MASK_SUFFIXES = (".nii.gz", ".nii")


def _mask_outputs(cases: Sequence[InputCase], out: Path) -> dict[str, Path]:
    is_file = out.name.lower().endswith(MASK_SUFFIXES)
    if not is_file and not out.is_dir() and out.name.lower().endswith(IMAGE_SUFFIXES + (".png",)):
        raise UserError(f"--out {out}: masks are written as compressed NIfTI; name the file .nii.gz (or give a folder)")
    if is_file and len(cases) > 1:
        raise UserError(f"--out {out}: {len(cases)} inputs need a folder for their masks, not a file name")
    if is_file:
        return {cases[0].name: out}
    return {c.name: out / f"{c.name}.nii.gz" for c in cases}


def _preview_outputs(cases: Sequence[InputCase], preview: Path | None) -> dict[str, Path]:
    if preview is None:
        return {}
    if preview.suffix.lower() == ".png":
        if len(cases) > 1:
            raise UserError(f"--preview {preview}: {len(cases)} inputs need a folder for their previews")
        return {cases[0].name: preview}
    return {c.name: preview / f"{c.name}.png" for c in cases}


def _report_paths(mask_path: Path) -> tuple[Path, Path]:
    stem = case_name(mask_path)
    return mask_path.with_name(f"{stem}.nodules.json"), mask_path.with_name(f"{stem}.nodules.csv")


@dataclass
class _Outcome:
    name: str
    status: str
    seconds: float = 0.0
    voxels: int | None = None
    volume_ml: float | None = None
    note: str = ""


def _summary(outcomes: Sequence[_Outcome]) -> str:
    rows = [["case", "status", "seconds", "voxels", "volume mL", "note"]]
    for o in outcomes:
        rows.append([o.name, o.status, f"{o.seconds:.1f}" if o.status == "ok" else "",
                     "" if o.voxels is None else f"{o.voxels:,}", "" if o.volume_ml is None else f"{o.volume_ml:.2f}",
                     (o.note.splitlines() or [""])[0]])  # tracebacks and details stay in the log
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    counts = {s: sum(o.status == s for o in outcomes) for s in ("ok", "skipped", "failed")}
    lines.append(f"{counts['ok']} segmented, {counts['skipped']} skipped, {counts['failed']} failed")
    return "\n".join(lines)


def _run_case(predictor: Predictor, case: InputCase, mask_path: Path, preview_path: Path | None) -> _Outcome:
    result = predictor.predict(case.path)
    written: list[Path] = []
    try:
        note = ""
        if predictor.rules.nodule_report and result.nodules is not None:
            json_path, csv_path = _report_paths(mask_path)
            write_nodule_report(result.nodules, json_path, csv_path, source=str(case.path),
                                min_volume_ml=predictor.min_component_ml)
            written += [json_path, csv_path]
            note = f"{len(result.nodules)} nodule(s)"
        if preview_path is not None:
            save_overlay_png(result.image_xyz, result.mask_xyz, result.geometry, preview_path, title=case.name,
                             window=predictor.rules.preview_window)
            written.append(preview_path)
        # The mask goes last: an existing mask means the case finished (what --skip-existing checks).
        write_mask(result.mask_xyz, result.geometry, mask_path)
    except BaseException:
        for p in written:  # a failed case leaves nothing behind
            p.unlink(missing_ok=True)
        raise
    voxels = int(np.count_nonzero(result.mask_xyz))
    return _Outcome(case.name, "ok", result.seconds, voxels, voxels * float(np.prod(result.geometry.spacing)) / 1000,
                    note)


def run_inference(inputs: Sequence[str | Path], out: str | Path, model: str | Path | Sequence[str | Path] | None = None,
                  mode: str | None = None, prune_level: int | None = None, tta: bool | None = None,
                  overlap: float | None = None, batch_size: int | None = None, device: str | None = None,
                  amp: bool = True, preview: str | Path | None = None, skip_existing: bool = False,
                  series_uid: str | None = None, trust_bundle: bool = False) -> int:
    """Segment scans and write one mask per scan on that scan's own grid (``unetpp3d infer``).

    The settings left None are the model's own (its config's ``infer`` section), else
    :class:`~unetpp3d.config.InferConfig`'s defaults; see :meth:`Predictor.from_source`.

    Args:
        inputs: scan files (NIfTI, NRRD, MHA), DICOM series folders, folders of those, or a
            manifest (its test cases, else its training images).
        out: the mask file (``.nii.gz``) for one scan, or a folder receiving ``<case>.nii.gz``.
            Lung-nodule models also write ``<case>.nodules.json`` and ``.csv`` beside each mask.
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

    Returns:
        0 when every case was segmented or skipped, 1 when any failed (each is listed in the
        summary table printed at the end).

    Raises:
        UserError: no usable model, bad settings, or outputs that cannot be named (checked
            before any case runs). Problems with one scan are reported, not raised.
    """
    out = Path(out)
    cases = expand_inputs(inputs)
    masks = _mask_outputs(cases, out)
    previews = _preview_outputs(cases, Path(preview) if preview is not None else None)
    predictor = Predictor.from_source(
        model, device=device, trust_bundle=trust_bundle, overlap=overlap, batch_size=batch_size, mode=mode,
        prune_level=prune_level, tta=tta, amp=amp, series_uid=series_uid,
    )
    if not model:
        print(f"no --model given: using the newest run, {predictor.source}")
    log.info("%s", predictor.describe())
    outcomes: list[_Outcome] = []
    for case in tqdm(cases, desc="cases", unit="case", disable=len(cases) < 2):
        mask_path = masks[case.name]
        if case.error:
            log.error("%s: %s: %s", case.name, case.path, case.error)
            outcomes.append(_Outcome(case.name, "failed", note=f"{case.path}: {case.error}"))
            continue
        if skip_existing and mask_path.exists():
            log.info("%s: %s exists, skipped", case.name, mask_path)
            outcomes.append(_Outcome(case.name, "skipped", note=str(mask_path)))
            continue
        try:
            outcomes.append(_run_case(predictor, case, mask_path, previews.get(case.name)))
            log.info("%s: wrote %s", case.name, mask_path)
        except UserError as exc:
            log.error("%s: %s", case.name, exc)
            outcomes.append(_Outcome(case.name, "failed", note=str(exc)))
        except (RuntimeError, ValueError, OSError, MemoryError) as exc:
            # Not a user mistake we recognised: keep the traceback in the log, keep going.
            log.exception("%s: failed", case.name)
            outcomes.append(_Outcome(case.name, "failed", note=f"{type(exc).__name__}: {exc}"))
    print(_summary(outcomes))
    return 1 if any(o.status == "failed" for o in outcomes) else 0
