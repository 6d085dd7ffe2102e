"""Real-CT check (docs/real_ct_check.md): the pipeline fits three real scans from three scanners and formats.

The slow test runs pipelines/real_ct_check.py with its default budget on the labelled cases of
../shared/data and asserts what the script reports: liver Dice above 0.8 on each scan's own
grid, and a mask whose size, spacing, origin and direction equal the scan's (read again here
with plain SimpleITK). It skips where ../shared/data is absent (a fresh clone).

The fast tests cover the script's parts that need no data, and the bug the check found: sliding
windows padded thin scans with 0, which after the z-score is soft tissue, while training pads
with air (``transforms.pad_value``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from factories import write_image

from unetpp3d.config import DataConfig, Preprocessing
from unetpp3d.data.manifest import load_manifest
from unetpp3d.data.transforms import pad_value, train_transforms
from unetpp3d.inference.predictor import Predictor
from unetpp3d.model.network import UNetPlusPlus3D

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "pipelines" / "real_ct_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("real_ct_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def read_sitk(path: Path) -> sitk.Image:
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path)))
        return reader.Execute()
    return sitk.ReadImage(str(path))


# ---------------------------------------------------------------------------------------------
# The check on the real cases
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pipeline_fits_three_real_ct_scans(shared_data, tmp_path):
    out = tmp_path / "real_ct"
    env = dict(os.environ)
    # One thread unless the caller chose: several per process crawl on a shared 2-core machine.
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--data", str(shared_data), "--out", str(out),
                           "--device", "cpu"], capture_output=True, text=True, encoding="utf-8", errors="replace", env=env, timeout=3600)
    report = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert (out / "summary.json").is_file(), report
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    dice = {c["case"]: c["dice"] for c in summary["cases"]}
    assert set(dice) == {"abdomen_ct_ts", "abdomen_ct_dicom_ts", "abdomen_ct_3slice_dcmqi"}, report
    assert all(d > 0.8 for d in dice.values()), f"liver Dice {dice}\n{report}"
    assert proc.returncode == 0, report

    module = load_script()
    for case in module.CASES:
        scan = read_sitk(shared_data / case.image)
        mask = sitk.ReadImage(str(out / "masks" / f"{case.name}.nii.gz"))
        assert mask.GetSize() == scan.GetSize(), case.name
        np.testing.assert_allclose(mask.GetSpacing(), scan.GetSpacing(), rtol=1e-5, err_msg=case.name)
        np.testing.assert_allclose(mask.GetOrigin(), scan.GetOrigin(), atol=1e-3, err_msg=case.name)
        np.testing.assert_allclose(mask.GetDirection(), scan.GetDirection(), atol=1e-5, err_msg=case.name)
        assert sitk.GetArrayViewFromImage(mask).any(), f"{case.name}: empty mask"


# ---------------------------------------------------------------------------------------------
# The script's parts
# ---------------------------------------------------------------------------------------------


def fake_data(root: Path, module) -> Path:
    """The three cases' paths, as empty stand-ins: enough for manifests, not for reading."""
    for case in module.CASES:
        for rel in (case.image, case.label):
            path = root / rel
            if path.suffix:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"")
            else:
                path.mkdir(parents=True, exist_ok=True)
    return root


def test_manifests_list_the_three_cases_and_validate_on_them(tmp_path):
    module = load_script()
    data = fake_data(tmp_path / "data", module)
    out = tmp_path / "out"
    module.prepare_out(out, force=False)
    cases_json, train_json = module.write_manifests(data, out, module.find_cases(data))
    cases = load_manifest(cases_json)
    assert [c.name for c in cases.training] == [c.name for c in module.CASES]
    assert all(c.image == (data / rc.image).resolve() for c, rc in zip(cases.training, module.CASES))
    assert cases.validation is None and cases.task == "liver"
    train = load_manifest(train_json)  # the validation links are not the same paths, so it loads
    assert [c.name for c in train.validation] == [f"{c.name}.val" for c in module.CASES]
    for val, case in zip(train.validation, module.CASES):
        assert val.image.resolve() == (data / case.image).resolve()
        assert val.label.resolve() == (data / case.label).resolve()


def test_out_folder_is_not_overwritten_without_force(tmp_path):
    module = load_script()
    data = fake_data(tmp_path / "data", module)
    out = tmp_path / "out"
    module.prepare_out(out, force=False)
    module.write_manifests(data, out, module.find_cases(data))
    with pytest.raises(module.CheckError, match="--force"):
        module.prepare_out(out, force=False)
    (out / "keep.txt").write_text("someone else's")
    module.prepare_out(out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_missing_data_exits_2_with_the_paths(tmp_path, capsys):
    module = load_script()
    assert module.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "abdomen_ct_ts/ct.nii.gz" in err and "../shared/data" in err


def test_a_failing_step_fails_the_check_and_names_it(tmp_path, capsys):
    # Empty stand-in files: `unetpp3d check` refuses them, so nothing is trained and every case fails.
    module = load_script()
    data = fake_data(tmp_path / "data", module)
    out = tmp_path / "out"
    assert module.main(["--data", str(data), "--out", str(out)]) == 1
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert "unetpp3d check" in summary["failed_step"] and not summary["passed"]
    assert [c["passed"] for c in summary["cases"]] == [False] * 3
    assert set(summary["seconds"]) == {"check", "total"}
    printed = capsys.readouterr().out
    assert printed.count("FAIL") >= 4 and "is empty" in (out / "logs" / "check.log").read_text()


def test_grid_differences_name_each_field():
    module = load_script()
    grid = {"size": [4, 5, 6], "spacing": [0.8, 0.8, 1.0], "origin": [1.0, 2.0, 3.0],
            "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]}
    assert module.grid_differences(grid, dict(grid)) == []
    assert module.grid_differences({**grid, "spacing": [0.8, 0.8, 1.0 + 1e-7]}, grid) == []
    other = {"size": [4, 5, 7], "spacing": [0.8, 0.8, 2.0], "origin": [1.0, 2.0, 4.0],
             "direction": [1, 0, 0, 0, -1, 0, 0, 0, 1]}
    problems = module.grid_differences(other, grid)
    assert [p.split()[0] for p in problems] == ["size", "spacing", "origin", "direction"]


# ---------------------------------------------------------------------------------------------
# Padding: inference pads as training does
# ---------------------------------------------------------------------------------------------


def test_windows_pad_thin_scans_with_the_value_training_pads_with(tmp_path):
    """Regression: a 3-slice scan padded with 0 (soft tissue after the z-score) got an empty mask."""
    prep = Preprocessing(task="liver", labels={"0": "background", "1": "liver"}, target_spacing=[2.0, 2.0, 2.0],
                         intensity_range=[-100.0, 200.0], intensity_stats=[60.0, 40.0], patch_size=[16, 16, 8],
                         crop_foreground=False)
    air = (-100.0 - 60.0) / 40.0
    assert pad_value(prep) == pytest.approx(air)

    # Training: a 2-slice scan of soft tissue (60 HU, 0 after the z-score) is padded to 8 slices with air.
    image = write_image(tmp_path / "thin.nii.gz", np.full((16, 16, 2), 60, np.int16), spacing=(2.0, 2.0, 2.0))
    label = write_image(tmp_path / "thin_label.nii.gz", np.ones((16, 16, 2), np.uint8), spacing=(2.0, 2.0, 2.0))
    cfg = DataConfig(samples_per_volume=1)
    for name in ("flip_prob", "rotate_prob", "scale_prob", "intensity_shift_prob", "intensity_scale_prob",
                 "noise_prob", "gamma_prob"):
        setattr(cfg.augment, name, 0.0)
    patch = train_transforms(prep, cfg)({"image": str(image), "label": str(label)})[0]["image"]
    values = set(np.round(np.unique(np.asarray(patch)), 4).tolist())
    assert values == {0.0, round(air, 4)}

    # Inference and the exported bundle pad with the same value.
    predictor = Predictor(UNetPlusPlus3D(features=(4, 8), strides=[2]), prep, device="cpu", progress=False)
    assert predictor.inferer().cval == pytest.approx(air)
    from unetpp3d.bundle.configs import inference_config

    assert inference_config(predictor)["inferer"]["cval"] == pytest.approx(air)


def test_thin_scan_is_segmented_with_air_padding(tmp_path):
    """A network that looks at its whole window marks a thin soft-tissue slab only when padding is air."""

    class WindowContrast(torch.nn.Module):
        # Foreground where a voxel is brighter than its window's mean: true for the slab only when
        # the padding around it is darker than tissue.
        size_divisor = (1, 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            diff = x - x.mean(dim=(2, 3, 4), keepdim=True)
            return torch.cat([-diff, diff], dim=1) * 100.0

    prep = Preprocessing(task="liver", labels={"0": "background", "1": "liver"}, target_spacing=[2.0, 2.0, 2.0],
                         intensity_range=[-100.0, 200.0], intensity_stats=[60.0, 40.0], patch_size=[16, 16, 8],
                         crop_foreground=False)
    scan = np.full((16, 16, 2), 60, np.int16)  # the 0 of the z-score: padding with 0 would hide it
    image = write_image(tmp_path / "thin.nii.gz", scan, spacing=(2.0, 2.0, 2.0))
    result = Predictor(WindowContrast(), prep, device="cpu", progress=False).predict(image)
    assert result.mask_xyz.shape == scan.shape
    assert math.isclose(result.mask_xyz.mean(), 1.0)
