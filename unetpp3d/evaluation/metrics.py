"""Per-case segmentation metrics: Dice, IoU, HD95, surface Dice, volumes and detections.

Empty masks follow one convention, nnU-Net's, here and in training validation
(:func:`dice_per_class`, which :meth:`unetpp3d.training.trainer.Trainer.validate` uses):

* prediction and reference both empty for a class: Dice, IoU and surface Dice are undefined
  (NaN, ``null`` in ``summary.json``) and left out of every mean, with the number left out
  reported beside the mean. A case with no tumour and no tumour predicted says nothing about
  how well tumours are segmented; counting it as 1 (MONAI's ``ignore_empty=False``) would
  inflate the mean by the share of such cases;
* only one of them empty: Dice, IoU and surface Dice are 0, so false positives on a case
  without the class do count (MONAI's ``ignore_empty=True`` would drop them);
* HD95 is undefined (NaN) whenever either mask is empty.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice
from scipy import ndimage

from unetpp3d.data.manifest import case_name
from unetpp3d.errors import UserError
from unetpp3d.geometry import align_label_to_image, axis_mapping
from unetpp3d.imageio.readers import read_image

_STRUCTURE = ndimage.generate_binary_structure(3, 3)


@dataclass
class CaseMetrics:
    """The scores of one foreground label in one case (one row of the CSV)."""

    case: str
    label: int
    dice: float
    iou: float
    hd95_mm: float
    surface_dice: float
    tolerance_mm: float
    pred_ml: float
    ref_ml: float
    volume_diff_ml: float
    volume_diff_pct: float
    tp: int
    fp: int
    fn: int
    note: str = ""


def dice_per_class(pred_onehot: torch.Tensor, ref_onehot: torch.Tensor) -> torch.Tensor:
    """Dice of each case and foreground class, NaN where prediction and reference are both empty.

    MONAI's ``compute_dice`` with ``ignore_empty=False`` (0 when only one side is empty), with the
    both-empty entries set to NaN: the convention of this module (see its docstring), shared by
    training validation and ``unetpp3d evaluate``.

    Args:
        pred_onehot: one-hot prediction ``(B, C, *spatial)``, channel 0 the background.
        ref_onehot: one-hot reference, same shape.

    Returns:
        ``(B, C - 1)`` float tensor.
    """
    dice = compute_dice(pred_onehot, ref_onehot, include_background=False, ignore_empty=False)
    spatial = tuple(range(2, pred_onehot.ndim))
    both_empty = (pred_onehot[:, 1:].sum(spatial) == 0) & (ref_onehot[:, 1:].sum(spatial) == 0)
    return torch.where(both_empty, torch.nan, dice)


def _bbox(binary: np.ndarray, margin: int) -> tuple[slice, ...]:
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(binary.any(axis=other))
        box.append(slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + 1 + margin, binary.shape[axis])))
    return tuple(box)


def _surface_metrics(pred: np.ndarray, ref: np.ndarray, spacing: list[float],
                     tolerance_mm: float) -> tuple[float, float]:
    # Distances only depend on the masks' neighbourhood: a crop with a margin keeps every edge.
    box = _bbox(pred | ref, margin=2)
    p, r = pred[box], ref[box]
    y_pred = torch.as_tensor(np.stack([~p, p])[None].astype(np.float32))
    y = torch.as_tensor(np.stack([~r, r])[None].astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd95 = compute_hausdorff_distance(y_pred, y, include_background=False, percentile=95, spacing=spacing)
        nsd = compute_surface_dice(y_pred, y, class_thresholds=[float(tolerance_mm)], include_background=False,
                                   spacing=spacing)
    return float(hd95.reshape(-1)[0]), float(nsd.reshape(-1)[0])


def _detections(pred: np.ndarray, ref: np.ndarray) -> tuple[int, int, int]:
    ref_cc, n_ref = ndimage.label(ref, structure=_STRUCTURE)
    pred_cc, n_pred = ndimage.label(pred, structure=_STRUCTURE)
    hit_ref = np.unique(ref_cc[pred & ref])
    hit_pred = np.unique(pred_cc[pred & ref])
    tp = int(np.count_nonzero(hit_ref))
    fp = n_pred - int(np.count_nonzero(hit_pred))
    return tp, int(fp), int(n_ref - tp)


def both_empty_row(case: str, label: int, tolerance_mm: float) -> CaseMetrics:
    """The row of a label absent from both prediction and reference: every score undefined."""
    return CaseMetrics(case=case, label=int(label), dice=math.nan, iou=math.nan, hd95_mm=math.nan,
                       surface_dice=math.nan, tolerance_mm=float(tolerance_mm), pred_ml=0.0, ref_ml=0.0,
                       volume_diff_ml=0.0, volume_diff_pct=math.nan, tp=0, fp=0, fn=0,
                       note="both empty: Dice, IoU, HD95 and surface Dice undefined, left out of the means")


def score_arrays(pred_xyz: np.ndarray, ref_xyz: np.ndarray, spacing: list[float] | tuple[float, ...],
                 tolerance_mm: float = 2.0, case: str = "", labels: list[int] | None = None) -> list[CaseMetrics]:
    """Score two label maps on the same grid, one :class:`CaseMetrics` per foreground label.

    Args:
        pred_xyz: predicted integer labels (x, y, z).
        ref_xyz: reference integer labels, same shape.
        spacing: voxel size in mm (x, y, z).
        tolerance_mm: the surface Dice tolerance.
        case: the case name recorded in each row.
        labels: labels to score (default: every non-zero label in either map, or label 1 when
            both are empty).

    Returns:
        One row per label; for empty masks see the convention in this module's docstring.
    """
    if pred_xyz.shape != ref_xyz.shape:
        raise ValueError(f"prediction {pred_xyz.shape} and reference {ref_xyz.shape} differ in shape")
    spacing = [float(s) for s in spacing]
    voxel_ml = float(np.prod(spacing)) / 1000.0
    if labels is None:
        present = {int(v) for v in np.unique(pred_xyz)} | {int(v) for v in np.unique(ref_xyz)}
        labels = sorted(present - {0}) or [1]
    rows = []
    for label in labels:
        p, r = pred_xyz == label, ref_xyz == label
        n_p, n_r = int(p.sum()), int(r.sum())
        inter = int(np.count_nonzero(p & r))
        union = n_p + n_r - inter
        note = ""
        if n_p == 0 and n_r == 0:
            rows.append(both_empty_row(case, label, tolerance_mm))
            continue
        if n_p == 0 or n_r == 0:
            dice = iou = nsd = 0.0
            hd95 = math.nan
            note = f"{'prediction' if n_p == 0 else 'reference'} empty: HD95 undefined"
        else:
            dice = 2.0 * inter / (n_p + n_r)
            iou = inter / union
            hd95, nsd = _surface_metrics(p, r, spacing, tolerance_mm)
        tp, fp, fn = _detections(p, r)
        pred_ml, ref_ml = n_p * voxel_ml, n_r * voxel_ml
        rows.append(CaseMetrics(
            case=case, label=int(label), dice=dice, iou=iou, hd95_mm=hd95, surface_dice=nsd,
            tolerance_mm=float(tolerance_mm), pred_ml=pred_ml, ref_ml=ref_ml, volume_diff_ml=pred_ml - ref_ml,
            volume_diff_pct=100.0 * (pred_ml - ref_ml) / ref_ml if n_r else math.nan, tp=tp, fp=fp, fn=fn, note=note,
        ))
    return rows


def evaluate_case(pred_path: Path, ref_path: Path, tolerance_mm: float = 2.0,
                  case: str | None = None) -> list[CaseMetrics]:
    """Read a predicted and a reference mask, check they share a grid, and score them.

    Raises:
        UserError: a file cannot be read, or the two masks lie on different grids.
    """
    case = case or case_name(pred_path)
    pred, pred_geom = read_image(pred_path, is_label=True)
    ref, ref_geom = read_image(ref_path, is_label=True)
    # The same voxels indexed in another axis order or direction are re-indexed, never resampled.
    if axis_mapping(ref_geom, pred_geom) is None:
        diff = pred_geom.to_ras().differences(ref_geom.to_ras()) or pred_geom.differences(ref_geom)
        raise UserError(
            f"{pred_path}: not on the grid of its reference {ref_path}: {diff or 'voxel centres disagree'} "
            f"(prediction {pred_geom.describe()}, reference {ref_geom.describe()}); predict on the reference's "
            "scan, or resample one mask onto the other's grid (nearest neighbour) before evaluating"
        )
    ref = align_label_to_image(np.asarray(ref), ref_geom, pred_geom)
    return score_arrays(np.rint(np.asarray(pred)).astype(np.int64), np.rint(ref).astype(np.int64),
                        list(pred_geom.spacing), tolerance_mm, case)
