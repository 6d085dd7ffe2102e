"""pipelines/lidc_manifest.py (a split by patient, never by crop) and pipelines/lidc_body_crop_check.py,
on a fake nodules.csv and fake crops."""

from __future__ import annotations

import csv
import importlib.util
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from unetpp3d.data.manifest import load_manifest, split_cases
from unetpp3d.errors import UserError

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, PIPELINES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


lidc_manifest = _load("lidc_manifest")


def fake_crops(root: Path, n_patients: int = 23, seed: int = 0, shuffle_rows: bool = False) -> Path:
    """nodules.csv with 1-4 crops per patient, and empty image/mask files of the same names."""
    rng = random.Random(seed)
    rows = [(f"LIDC-IDRI-{p:04d}", str(k)) for p in range(1, n_patients + 1) for k in range(1, rng.randint(1, 4) + 1)]
    if shuffle_rows:
        rng.shuffle(rows)
    root.mkdir(parents=True, exist_ok=True)
    with (root / "nodules.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["patient_id", "nodule_id", "seriesuid", "diameter_mm"])
        writer.writerows([p, k, "1.2.3", "7.5"] for p, k in rows)
    for folder in ("images", "masks"):
        (root / folder).mkdir(exist_ok=True)
        for p, k in rows:
            (root / folder / f"{p}_R_{k}.nii.gz").touch()
    return root


def _patient(entry: dict) -> str:
    return Path(entry["image"]).name.split("_R_")[0]


def test_no_patient_crosses_a_split_and_the_folds_cover_every_patient(tmp_path):
    data = fake_crops(tmp_path / "crops")
    paths = lidc_manifest.write_manifests(tmp_path / "out" / "lidc.json", data, folds=4, fold=None, test_fraction=0.2)
    assert [p.name for p in paths] == [f"lidc_fold{k}.json" for k in range(4)]
    held_out: list[set[str]] = []
    test_patients = None
    for path in paths:
        m = json.loads(path.read_text())
        parts = {k: {_patient(e) for e in m[k]} for k in ("training", "validation", "test")}
        assert not parts["training"] & parts["validation"] and not parts["training"] & parts["test"]
        assert not parts["validation"] & parts["test"]
        assert sum(len(m[k]) for k in ("training", "validation", "test")) == sum(
            1 for _ in (data / "images").iterdir())
        assert test_patients in (None, parts["test"])  # the same test patients in every fold
        test_patients = parts["test"]
        held_out.append(parts["validation"])
        assert {p: f for p, f in m["split"]["patients"].items() if f == -1}.keys() == parts["test"]
    assert len(test_patients) == round(0.2 * 23)
    everyone = set().union(*held_out)
    assert len(everyone) == sum(len(h) for h in held_out) == 23 - len(test_patients)  # each in exactly one fold
    # The manifest reads back with its validation fixed, so training takes the patient split as given.
    man = load_manifest(paths[0])
    train, val = split_cases(man)
    assert {c.name for c in val} == {Path(e["image"]).name[:-7] for e in json.loads(paths[0].read_text())["validation"]}
    assert man.task == "lung_nodule" and man.labels == {0: "background", 1: "nodule"}
    assert all(c.label is not None for c in man.test)


def test_the_split_is_seeded_and_does_not_depend_on_the_csv_order(tmp_path):
    a = lidc_manifest.read_crops(fake_crops(tmp_path / "a") / "nodules.csv")
    b = lidc_manifest.read_crops(fake_crops(tmp_path / "b", shuffle_rows=True) / "nodules.csv")
    patients_a, patients_b = [p for p, _ in a], [p for p, _ in b]
    assert patients_a != patients_b and sorted(patients_a) == sorted(patients_b)
    split = lidc_manifest.patient_folds(patients_a, 5, 0.2, seed=3)
    assert split == lidc_manifest.patient_folds(patients_b, 5, 0.2, seed=3)
    assert split != lidc_manifest.patient_folds(patients_a, 5, 0.2, seed=4)
    sizes = np.bincount([f for f in split.values() if f >= 0])
    assert sizes.max() - sizes.min() <= 1  # folds of equal patient counts


def test_refusals(tmp_path):
    data = fake_crops(tmp_path / "crops", n_patients=4)
    with pytest.raises(UserError, match="inside the data folder"):
        lidc_manifest.write_manifests(data / "lidc.json", data)
    with pytest.raises(UserError, match="inside the repository"):
        lidc_manifest.write_manifests(PIPELINES / "lidc.json", data)
    with pytest.raises(UserError, match="cannot fill 5 folds"):
        lidc_manifest.write_manifests(tmp_path / "lidc.json", data, folds=5)
    with pytest.raises(UserError, match="outside 0..2"):
        lidc_manifest.write_manifests(tmp_path / "lidc.json", data, folds=3, fold=3, test_fraction=0.0)
    (data / "images" / "LIDC-IDRI-0001_R_1.nii.gz").unlink()
    with pytest.raises(UserError, match="no image"):
        lidc_manifest.write_manifests(tmp_path / "lidc.json", data, folds=2, test_fraction=0.0)
    assert lidc_manifest.main([str(tmp_path / "x.json"), "--data", str(tmp_path / "missing")]) == 2


def test_body_crop_check_counts_the_crops_that_lose_their_nodule(tmp_path, make_image):
    lung = np.random.default_rng(0).normal(-850, 30, (24, 24, 6)).astype(np.float32)
    lung[2:4, 2:4] = 40.0  # a vessel at one edge
    glass = np.zeros(lung.shape, np.uint8)
    glass[15:21, 15:21, 1:5] = 1  # a ground-glass nodule at the other
    lung[glass > 0] = -650.0
    solid = lung.copy()
    solid[glass > 0] = 30.0
    for name, image in (("LIDC-IDRI-0001_R_1", lung), ("LIDC-IDRI-0002_R_1", solid)):
        make_image(f"crops/images/{name}.nii.gz", image)
        make_image(f"crops/masks/{name}.nii.gz", glass)
    check = _load("lidc_body_crop_check")
    results, table = check.run(tmp_path / "crops", ["threshold", "filled"], (1.0, 1.0, 1.0), out=tmp_path / "c.csv")
    lost = {(r.case, r.mode): r.lost for r in results}
    assert lost[("LIDC-IDRI-0001_R_1", "threshold")] == glass.sum()  # the whole ground-glass nodule
    assert lost[("LIDC-IDRI-0002_R_1", "threshold")] == 0  # a solid one is tissue: inside the box
    assert lost[("LIDC-IDRI-0001_R_1", "filled")] == lost[("LIDC-IDRI-0002_R_1", "filled")] == 0
    assert "| threshold | 2 | 1 | 1 |" in table and "| filled | 2 | 0 | 0 |" in table
    assert len((tmp_path / "c.csv").read_text().splitlines()) == 5
