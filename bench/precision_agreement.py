#!/usr/bin/env python
"""Masks of a trained model with reduced precision against fp32, on real scans.

    python bench/precision_agreement.py --model RUN_OR_CKPT SCAN[=LABEL] ...  [--mode fast] [--device cpu]

For each scan, ``Predictor`` runs twice, ``amp=False`` (fp32) and ``amp=True`` (what ``unetpp3d
infer`` does by default: bf16 on GPUs and on CPUs with native bf16, see unetpp3d/hardware.py),
and prints the voxel agreement of the two masks, their Dice with each other, each one's Dice
with the label when one is given, and the seconds of each. With no reduced precision on this
device both runs are fp32, and the table says so.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unetpp3d.hardware import autocast_dtype, keep_freed_memory  # noqa: E402
from unetpp3d.inference.predictor import Predictor  # noqa: E402
from unetpp3d.geometry import align_label_to_image
from unetpp3d.imageio.readers import read_image  # noqa: E402


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else 1.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--mode", default="accurate")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("scans", nargs="+", help="SCAN or SCAN=LABEL (the label on the scan's grid)")
    args = ap.parse_args()
    keep_freed_memory()
    device = torch.device(args.device)
    low = autocast_dtype("auto", device)
    print(f"device {device}; reduced precision here: {str(low).replace('torch.', '') if low else 'none (fp32 both)'}")
    predictors = {amp: Predictor.from_source(args.model, device=args.device, mode=args.mode, amp=amp, progress=False)
                  for amp in (False, True)}
    rows = []
    for item in args.scans:
        scan, _, label = item.partition("=")
        got = {amp: p.predict(scan) for amp, p in predictors.items()}
        fp32, amp = got[False].mask_xyz, got[True].mask_xyz
        row = {"scan": f"{Path(scan).parent.name}/{Path(scan).name}", "voxels": f"{fp32.size:,}", "agreement": f"{float((fp32 == amp).mean()):.5f}",
               "dice amp/fp32": f"{dice(fp32, amp):.4f}",
               "s fp32": f"{got[False].seconds:.1f}", "s amp": f"{got[True].seconds:.1f}"}
        if label:
            truth_xyz, truth_geom = read_image(label, is_label=True)
            truth = align_label_to_image(truth_xyz, truth_geom, got[False].geometry)  # e.g. a label stored flipped
            row["dice fp32"] = f"{dice(fp32, truth):.4f}"
            row["dice amp"] = f"{dice(amp, truth):.4f}"
        rows.append(row)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    widths = {c: max(len(c), *(len(r.get(c, "")) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(r.get(c, "").ljust(widths[c]) for c in cols))


if __name__ == "__main__":
    main()
