#!/usr/bin/env python
"""How many LIDC nodule crops lose nodule voxels to the body crop, per body mask.

The preprocessing crops each scan to the box of its body mask (plus a margin) before training
and inference. With a -500 HU threshold the lung parenchyma (about -850 HU) counts as air, so in
a nodule-centred crop that shows little besides lung the box can cut the nodule, above all a
ground-glass one. This script runs the project's own preprocessing on every crop of
``lidc_nodule_crops`` (reading, RAS orientation, resampling to the target spacing, then the
``CropForegroundd`` of :func:`unetpp3d.data.transforms.preprocess_transforms`) once per body mask
and counts, for each, the crops whose nodule mask loses voxels to the crop and those that lose
all of them. It prints one table row per mask and, with ``--out``, writes a CSV row per crop.

Usage::

    python pipelines/lidc_body_crop_check.py --data ../shared/data/lidc_nodule_crops
    python pipelines/lidc_body_crop_check.py --data DIR --modes threshold filled --out /tmp/crop.csv

Exit status 0; 2 when the data folder is unusable.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

from monai.transforms import Compose, CropForegroundd  # noqa: E402

from unetpp3d.atomic import atomic_write_text  # noqa: E402
from unetpp3d.config import Preprocessing  # noqa: E402
from unetpp3d.data.transforms import preprocess_transforms  # noqa: E402
from unetpp3d.errors import UserError  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "lidc_nodule_crops"
# What the planner picks for these crops (median spacing; configs/lidc_nodule.yaml).
DEFAULT_SPACING = (0.703125, 0.703125, 1.25)
KEYS = ("image", "label")


@dataclass
class CropResult:
    case: str
    mode: str
    nodule_voxels: int  # after resampling, before the crop
    kept_voxels: int  # inside the crop box
    volume_fraction: float  # crop box volume / resampled volume

    @property
    def lost(self) -> int:
        return self.nodule_voxels - self.kept_voxels


def _prep(mode: str, spacing: Sequence[float]) -> Preprocessing:
    # Intensities do not matter here: only the steps up to the crop run.
    return Preprocessing(task="lung_nodule", labels={"0": "background", "1": "nodule"},
                         target_spacing=[float(s) for s in spacing], intensity_range=[-1000.0, 400.0],
                         intensity_stats=[0.0, 1.0], patch_size=[48, 48, 8], crop_foreground=True, body_mask=mode)


def crop_pipelines(modes: Sequence[str], spacing: Sequence[float]) -> tuple[Compose, dict[str, CropForegroundd]]:
    """The preprocessing up to the crop (shared by every mode) and each mode's crop transform."""
    steps = preprocess_transforms(_prep(modes[0], spacing), KEYS)
    at = next(i for i, t in enumerate(steps) if isinstance(t, CropForegroundd))
    crops = {mode: preprocess_transforms(_prep(mode, spacing), KEYS)[at] for mode in modes}
    return Compose(steps[:at]), crops


def check_case(case: str, image: Path, label: Path, head: Compose, crops: dict[str, CropForegroundd]) -> list[CropResult]:
    """Resample one crop once, then apply every mode's body crop to it."""
    sample = head({"image": str(image), "label": str(label)})
    total = int((sample["label"] > 0).sum())
    volume = float(torch.tensor(sample["image"].shape[1:]).prod())
    out = []
    for mode, crop in crops.items():
        cropped = crop(dict(sample))
        kept = int((cropped["label"] > 0).sum())
        out.append(CropResult(case, mode, total, kept, float(torch.tensor(cropped["image"].shape[1:]).prod()) / volume))
    return out


def summarise(results: Sequence[CropResult], modes: Sequence[str]) -> str:
    """The table: per mode, crops that lose some / all nodule voxels, voxels lost, mean box volume."""
    lines = ["| body mask | crops | lose nodule voxels | lose the whole nodule | nodule voxels lost | mean box / volume |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for mode in modes:
        rows = [r for r in results if r.mode == mode]
        with_nodule = [r for r in rows if r.nodule_voxels > 0]
        some = sum(r.lost > 0 for r in with_nodule)
        whole = sum(r.kept_voxels == 0 for r in with_nodule)
        lost = sum(r.lost for r in rows)
        total = sum(r.nodule_voxels for r in rows)
        share = 100.0 * lost / total if total else 0.0
        box = sum(r.volume_fraction for r in rows) / len(rows) if rows else 0.0
        lines.append(f"| {mode} | {len(rows)} | {some} | {whole} | {lost} ({share:.2f}%) | {box:.3f} |")
    empty = sum(r.nodule_voxels == 0 for r in results if r.mode == modes[0])
    if empty:
        lines.append(f"\n{empty} crop(s) have no nodule voxel after resampling and are not counted as losing one.")
    return "\n".join(lines)


def run(data: Path, modes: Sequence[str], spacing: Sequence[float], limit: int | None = None,
        out: Path | None = None) -> tuple[list[CropResult], str]:
    """Check every crop under ``data`` (``images/*.nii.gz`` with ``masks/`` of the same names).

    Returns:
        The per-crop results and the summary table.

    Raises:
        UserError: no images, or an image without its mask.
    """
    images = sorted((data / "images").glob("*.nii.gz"))[:limit]
    if not images:
        raise UserError(f"{data}: no images/*.nii.gz; pass --data, the lidc_nodule_crops folder")
    head, crops = crop_pipelines(modes, spacing)
    results: list[CropResult] = []
    for image in images:
        label = data / "masks" / image.name
        if not label.is_file():
            raise UserError(f"{label}: missing mask for {image.name}")
        results += check_case(image.name[: -len(".nii.gz")], image, label, head, crops)
    if out is not None:
        rows = [["case", "mode", "nodule_voxels", "kept_voxels", "lost_voxels", "box_volume_fraction"]]
        rows += [[r.case, r.mode, r.nodule_voxels, r.kept_voxels, r.lost, f"{r.volume_fraction:.4f}"] for r in results]
        out.parent.mkdir(parents=True, exist_ok=True)
        text = "\n".join(",".join(str(v) for v in row) for row in rows) + "\n"
        atomic_write_text(out, text)
    return results, summarise(results, modes)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the lidc_nodule_crops folder")
    parser.add_argument("--modes", nargs="+", default=["threshold", "filled"], choices=["threshold", "filled"])
    parser.add_argument("--spacing", type=float, nargs=3, default=DEFAULT_SPACING, metavar=("X", "Y", "Z"),
                        help="target spacing in mm (default: what the planner picks for these crops)")
    parser.add_argument("--limit", type=int, default=None, help="check only the first N crops")
    parser.add_argument("--out", type=Path, default=None, help="CSV with one row per crop and mode")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    try:
        _, table = run(args.data, args.modes, args.spacing, args.limit, args.out)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
