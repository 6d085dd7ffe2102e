#!/usr/bin/env python
"""The body crop of whole scans under each body mask: what it keeps of the label and of the lungs.

For every scan (the real cases in ``../shared/data`` and, with ``--phantoms N``, synthetic liver
and chest phantoms) the project's own preprocessing runs up to the body crop at the scan's own
spacing, once per body mask (``threshold``: voxels above -500 HU; ``filled``: the body's filled
outline, :mod:`unetpp3d.data.body`). One table row per scan and mask: the crop box, the label
voxels inside it, and the air-like volume (below -500 HU) inside the body mask left and right of
the box's middle, which is where the lungs are: zero under the threshold, both lungs under the
filled outline.

Usage::

    python pipelines/body_crop_compare.py --data ../shared/data --phantoms 4

Exit status 0; 2 when the data folder holds none of the scans.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

from monai.transforms import Compose, CropForegroundd  # noqa: E402

from unetpp3d.config import Preprocessing  # noqa: E402
from unetpp3d.data.manifest import load_manifest  # noqa: E402
from unetpp3d.data.transforms import BodyMask, preprocess_transforms  # noqa: E402
from unetpp3d.errors import UserError  # noqa: E402
from unetpp3d.imageio.readers import read_image  # noqa: E402
from unetpp3d.synth.phantom import write_dataset  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data"
SCANS = [  # (name, image, label) under the data folder
    ("chest_ct_lesion", "chest_ct_lesion/ct.nii.gz", "chest_ct_lesion/lesion.nii.gz"),
    ("abdomen_ct_ts", "abdomen_ct_ts/ct.nii.gz", "abdomen_ct_ts/liver.nii.gz"),
    ("abdomen_ct_dicom_ts", "abdomen_ct_dicom_ts/dicom", "abdomen_ct_dicom_ts/liver.nii.gz"),
    ("abdomen_ct_3slice_dcmqi", "abdomen_ct_3slice_dcmqi/dicom", "abdomen_ct_3slice_dcmqi/liver.nrrd"),
]
MODES = ("threshold", "filled")
KEYS = ("image", "label")


def _prep(mode: str, spacing: Sequence[float]) -> Preprocessing:
    return Preprocessing(task="lung_nodule", labels={"0": "background", "1": "target"},
                         target_spacing=[float(s) for s in spacing], intensity_range=[-1000.0, 400.0],
                         intensity_stats=[0.0, 1.0], patch_size=[16, 16, 8], crop_foreground=True, body_mask=mode)


def compare(name: str, image: Path, label: Path) -> list[list[str]]:
    """One row per body mask for one scan, at the scan's own spacing."""
    _, geometry = read_image(image)
    spacing = geometry.to_ras().spacing
    steps = preprocess_transforms(_prep(MODES[0], spacing), KEYS)
    at = next(i for i, t in enumerate(steps) if isinstance(t, CropForegroundd))
    sample = Compose(steps[:at])({"image": str(image), "label": str(label)})
    hu = sample["image"][0].numpy()
    total = int((sample["label"] > 0).sum())
    ml = float(np.prod(spacing)) / 1000.0
    rows = []
    for mode in MODES:
        prep = _prep(mode, spacing)
        start = time.perf_counter()
        mask = BodyMask(prep.body_threshold_hu, mode, prep.body_air_hu)(sample["image"])[0].numpy()
        seconds = time.perf_counter() - start
        cropped = preprocess_transforms(prep, KEYS)[at](dict(sample))
        lo, hi = cropped["foreground_start_coord"], cropped["foreground_end_coord"]
        kept = int((cropped["label"] > 0).sum())
        airy = mask & (hu <= prep.body_threshold_hu)
        middle = (int(lo[0]) + int(hi[0])) // 2
        left, right = airy[:middle].sum() * ml, airy[middle:].sum() * ml
        box = "x".join(str(int(b) - int(a)) for a, b in zip(lo, hi))
        rows.append([name, mode, "x".join(str(n) for n in hu.shape), box, f"{kept}/{total}",
                     f"{left:.0f} / {right:.0f}", f"{seconds:.1f}"])
    return rows


def table(rows: Sequence[Sequence[str]]) -> str:
    head = ["scan", "body mask", "resampled", "crop box", "label kept", "air-like in mask L / R (mL)", "mask s"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder")
    parser.add_argument("--phantoms", type=int, default=0, help="also N liver and N chest phantoms (96^3)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cases = [(n, args.data / i, args.data / lab) for n, i, lab in SCANS if (args.data / i).exists()]
    with tempfile.TemporaryDirectory() as tmp:
        for task in ("liver", "lung_nodule") if args.phantoms > 0 else ():
            manifest = load_manifest(write_dataset(task, args.phantoms, Path(tmp) / task, seed=0))
            cases += [(f"phantom {c.name}", c.image, c.label) for c in [*manifest.training, *manifest.test]
                      if c.label is not None]
        if not cases:
            print(f"error: {args.data}: none of the scans found; pass --data or --phantoms", file=sys.stderr)
            return 2
        rows = []
        try:
            for name, image, label in cases:
                rows += compare(name, image, label)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
