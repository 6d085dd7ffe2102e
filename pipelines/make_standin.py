"""Write a synthetic stand-in for an MSD task folder, so that a recipe runs on it unchanged.

    python pipelines/make_standin.py --task liver --out /tmp/Task03_Liver --cases 6 --test 1 --size 32
    pipelines/msd_liver.sh --data /tmp/Task03_Liver --out /tmp/liver_out --config configs/smoke.yaml --device cpu

The folder has the layout and ``dataset.json`` of the Medical Segmentation Decathlon download
(no ``task`` key, MSD's label names, ``._*`` AppleDouble files beside the scans as in the MSD
archives)::

    Task03_Liver/                      Task06_Lung/
      dataset.json                       dataset.json
      imagesTr/liver_0.nii.gz ...        imagesTr/lung_001.nii.gz ...
      labelsTr/liver_0.nii.gz ...        labelsTr/lung_001.nii.gz ...
      imagesTs/liver_N.nii.gz ...        imagesTs/lung_00N.nii.gz ...

Scans are :func:`unetpp3d.synth.phantom.make_phantom` phantoms (int16 HU). Task03 labels are 0
background, 1 liver, 2 tumour: one or two hypodense lesions are carved inside each phantom's
liver and labelled 2, since the phantoms' own lesions are labelled liver. Task06 labels are 0
background, 1 nodule ("cancer" in the MSD). Like the MSD, there are no test labels.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from unetpp3d.geometry import Geometry
from unetpp3d.synth.phantom import make_phantom
from unetpp3d.imageio.writer import write_image, write_mask

TASKS = {
    # folder, phantom task, case name, MSD labels
    "liver": ("Task03_Liver", "liver", "liver_{}", {"0": "background", "1": "liver", "2": "cancer"}),
    "lung": ("Task06_Lung", "lung_nodule", "lung_{:03d}", {"0": "background", "1": "cancer"}),
}
TUMOUR_HU = -45.0  # hypodense against the liver, as most liver tumours are in portal-venous CT
APPLEDOUBLE = b"\x00\x05\x16\x07" + bytes(78)  # the header of the macOS "._" files in the MSD archives


def add_tumours(image: np.ndarray, label: np.ndarray, spacing, rng: np.random.Generator) -> None:
    """In place: one or two round lesions inside the liver (label 1), labelled 2 and darkened."""
    depth = ndimage.distance_transform_edt(label == 1, sampling=spacing)  # mm to the liver's surface
    for _ in range(int(rng.integers(1, 3))):
        if depth.max() <= 0:
            return
        # A centre well inside the liver, so that the lesion is surrounded by liver.
        deep = np.argwhere(depth >= 0.6 * depth.max())
        centre = deep[rng.integers(len(deep))]
        radius = max(0.6 * depth[tuple(centre)], 1.01 * min(spacing))
        idx = np.indices(label.shape, dtype=np.float32)
        dist = np.sqrt(sum(((idx[a] - centre[a]) * spacing[a]) ** 2 for a in range(3)))
        lesion = (dist <= radius) & (label == 1)
        label[lesion] = 2
        image[lesion] += TUMOUR_HU
        depth[dist <= 2 * radius] = 0  # the next lesion goes elsewhere


def write_standin(task: str, out: str | Path, cases: int = 6, test: int = 1, size: int = 32, seed: int = 0) -> Path:
    """Write ``cases`` labelled phantoms and ``test`` unlabelled ones in the MSD layout.

    Args:
        task: ``"liver"`` (Task03) or ``"lung"`` (Task06).
        out: the task folder to write (e.g. ``.../Task03_Liver``).
        cases: training cases (imagesTr + labelsTr).
        test: test cases (imagesTs, no labels).
        size: phantom edge length in voxels.
        seed: the same seed writes the same files.

    Returns:
        The path of ``dataset.json``.
    """
    folder, phantom_task, pattern, labels = TASKS[task]
    out = Path(out)
    training, testing = [], []
    for i in range(cases + test):
        case_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        image, label, spacing, origin, direction = make_phantom(phantom_task, case_seed, size=size)
        if task == "liver":
            add_tumours(image, label, spacing, np.random.default_rng(case_seed))
        geometry = Geometry(label.shape, spacing, origin, direction)
        name = pattern.format(i) + ".nii.gz"
        held_out = i >= cases
        image_rel = f"imagesTs/{name}" if held_out else f"imagesTr/{name}"
        write_image(np.rint(image).astype(np.int16), geometry, out / image_rel)
        (out / image_rel).with_name(f"._{name}").write_bytes(APPLEDOUBLE)
        if held_out:
            testing.append(f"./{image_rel}")
        else:
            write_mask(label, geometry, out / f"labelsTr/{name}")
            (out / f"labelsTr/._{name}").write_bytes(APPLEDOUBLE)
            training.append({"image": f"./{image_rel}", "label": f"./labelsTr/{name}"})
    dataset = {
        "name": folder.split("_", 1)[1],
        "description": f"unetpp3d synthetic stand-in for MSD {folder} (seed {seed}, size {size})",
        "reference": "synthetic",
        "licence": "CC-BY-SA 4.0",
        "release": "unetpp3d stand-in",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": labels,
        "numTraining": len(training),
        "numTest": len(testing),
        "training": training,
        "test": testing,
    }
    path = out / "dataset.json"
    path.write_text(json.dumps(dataset, indent=4) + "\n", encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), required=True)
    parser.add_argument("--out", required=True, help="the task folder to write, e.g. /tmp/Task03_Liver")
    parser.add_argument("--cases", type=int, default=6, help="labelled training cases (default 6)")
    parser.add_argument("--test", type=int, default=1, help="unlabelled test cases (default 1)")
    parser.add_argument("--size", type=int, default=32, help="phantom edge length in voxels (default 32)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_standin(args.task, args.out, args.cases, args.test, args.size, args.seed)
    print(f"wrote {args.cases} training and {args.test} test {args.task} phantoms and {path}")


if __name__ == "__main__":
    main()
