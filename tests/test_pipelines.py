"""The MSD recipes in pipelines/, and what they need: fold ensembles and liver-with-tumour post-processing.

The slow tests run pipelines/msd_liver.sh (two folds and their ensemble) and pipelines/msd_lung.sh
(fold 0) end to end, with the `unetpp3d` command, on synthetic stand-ins written in the MSD layout
by pipelines/make_standin.py: 32^3 phantoms, widths (4, 8, 16), one epoch of two iterations.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml
from factories import make_prep, write_image, write_tiny_checkpoint
from monai.data import MetaTensor
from monai.transforms import Compose

from unetpp3d.commands.cli import main as cli_main
from unetpp3d.config import Preprocessing
from unetpp3d.errors import UserError
from unetpp3d.inference.pipeline import postprocess_transforms
from unetpp3d.inference.postprocess import largest_component_filled
from unetpp3d.inference.predictor import Predictor
from unetpp3d.inference.windows import EnsembleNet, ProbabilityNet
from unetpp3d.model.network import UNetPlusPlus3D

REPO = Path(__file__).resolve().parents[1]
PIPELINES = REPO / "pipelines"
FEATURES = (4, 8, 16)
# The recipe's own options, then `--` and the tiny budget for every `unetpp3d train`.
TINY = ["--config", str(REPO / "configs" / "smoke.yaml"), "--epochs", "1", "--device", "cpu", "--",
        "--set", "model.features=[4,8,16]", "--set", "train.iterations_per_epoch=2"]


def load_standin_writer():
    spec = importlib.util.spec_from_file_location("make_standin", PIPELINES / "make_standin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# Liver post-processing with a tumour label
# ---------------------------------------------------------------------------------------------


def liver_with_tumours() -> np.ndarray:
    mask = np.zeros((32, 28, 24), np.uint8)
    mask[4:20, 4:20, 4:20] = 1  # the liver
    mask[7:10, 7:10, 7:10] = 2  # a tumour inside it
    mask[14:20, 14:20, 14:18] = 2  # a tumour reaching its surface
    mask[11:13, 11:13, 11:13] = 0  # a vessel enclosed by liver
    mask[26:29, 4:7, 4:7] = 1  # a liver-like island (spleen, say)
    mask[26:28, 20:22, 18:20] = 2  # a "tumour" outside the liver
    return mask


def test_liver_keeps_every_tumour_inside_the_largest_foreground_component():
    mask = liver_with_tumours()
    out = largest_component_filled(mask, [1, 2])
    expected = np.zeros_like(mask)
    expected[4:20, 4:20, 4:20] = 1
    expected[7:10, 7:10, 7:10] = 2
    expected[14:20, 14:20, 14:18] = 2
    np.testing.assert_array_equal(out, expected)  # the hole is liver, the islands are gone, both tumours stay
    # the MONAI transforms a bundle lists give the same voxels
    chain = Compose(postprocess_transforms("liver", [1, 2]))
    bundle = np.asarray(chain({"pred": MetaTensor(torch.as_tensor(mask)[None])})["pred"][0]).astype(np.uint8)
    np.testing.assert_array_equal(bundle, expected)


def test_liver_without_a_tumour_predicted_is_cleaned_as_before():
    mask = liver_with_tumours()
    mask[mask == 2] = 1
    np.testing.assert_array_equal(largest_component_filled(mask, [1, 2]), largest_component_filled(mask, [1]))


# ---------------------------------------------------------------------------------------------
# Fold ensembles
# ---------------------------------------------------------------------------------------------


def save_model(path: Path, seed: int, prep: Preprocessing) -> Path:
    return write_tiny_checkpoint(path, seed=seed, prep=prep, sw_batch_size=2)


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> Path:
    idx = np.indices((40, 36, 24)).astype(float)
    dist = np.sqrt(((idx[0] - 20) * 1.5) ** 2 + ((idx[1] - 15) * 1.5) ** 2 + ((idx[2] - 12) * 2.0) ** 2)
    image = np.where(dist <= 12.0, 200, -800).astype(np.int16)
    return write_image(tmp_path_factory.mktemp("scan") / "sphere.nii.gz", image, spacing=(1.5, 1.5, 2.0),
                       direction=(0, 1, 0, -1, 0, 0, 0, 0, 1))


@pytest.fixture(scope="module")
def folds(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("folds")
    return [save_model(root / f"fold_{k}" / "best.pt", seed=k, prep=make_prep()) for k in range(2)]


def test_ensemble_window_is_the_mean_of_the_members_probabilities():
    nets = [UNetPlusPlus3D(features=FEATURES).eval() for _ in range(2)]
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        got = EnsembleNet([ProbabilityNet(n) for n in nets])(x)
        expected = (ProbabilityNet(nets[0])(x) + ProbabilityNet(nets[1])(x)) / 2
    torch.testing.assert_close(got, expected)


def test_ensemble_prediction_averages_the_folds_probabilities(folds, scan):
    options = dict(device="cpu", progress=False, keep_probabilities=True)
    singles = [Predictor.from_source(f, **options).predict(scan).probabilities for f in folds]
    ensemble = Predictor.from_source(folds, **options)
    assert isinstance(ensemble.window_net, EnsembleNet) and len(ensemble.networks) == 2
    assert ensemble.source.startswith("ensemble of 2")
    result = ensemble.predict(scan)
    # Averaging commutes with the (linear) resampling back to the scan's grid.
    np.testing.assert_allclose(result.probabilities, (singles[0] + singles[1]) / 2, atol=1e-5)
    assert result.mask_xyz.shape == (40, 36, 24)


def test_folds_trained_on_other_cases_still_ensemble(tmp_path):
    """The training set's organ volumes differ between folds; they describe the data, not the pipeline."""
    ranged = [write_tiny_checkpoint(tmp_path / f"fold_{k}" / "best.pt", seed=k, prep=make_prep(),
                                    volume_range_ml={"1": [700.0 + 50 * k, 1100.0 + 50 * k]}) for k in range(2)]
    assert len(Predictor.from_source(ranged, device="cpu").networks) == 2


def test_ensemble_of_models_with_other_preprocessing_is_refused(folds, tmp_path, capsys):
    other = save_model(tmp_path / "other" / "best.pt", seed=2, prep=make_prep(spacing=(4.0, 4.0, 4.0)))
    with pytest.raises(UserError, match=r"target_spacing: \[8.0, 8.0, 8.0\] vs \[4.0, 4.0, 4.0\]"):
        Predictor.from_source([folds[0], other], device="cpu")
    # `unetpp3d infer --model A --model B` says so on one line and exits 2
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["infer", str(tmp_path), "--out", str(tmp_path / "out"), "--model", str(folds[0]),
                  "--model", str(other), "--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "cannot be ensembled" in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# The recipes, end to end on stand-ins of the MSD folders
# ---------------------------------------------------------------------------------------------


def run_recipe(script: str, data: Path, out: Path, *options: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           # the `unetpp3d` and `python3` of this environment first
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for key in ("FOLDS", "CONFIG", "EPOCHS", "DEVICE", "MANIFEST", "DATA_DIR", "OUT_DIR", "UNETPP3D"):
        env.pop(key, None)
    done = subprocess.run(["bash", str(PIPELINES / script), "--data", str(data), "--out", str(out), *options],
                          env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done.stdout + done.stderr


def assert_on_grid(mask: Path, reference: Path, labels: set[int]) -> None:
    got, want = sitk.ReadImage(str(mask)), sitk.ReadImage(str(reference))
    assert got.GetSize() == want.GetSize()
    np.testing.assert_allclose(got.GetSpacing(), want.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(got.GetOrigin(), want.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(got.GetDirection(), want.GetDirection(), atol=1e-6)
    assert set(np.unique(sitk.GetArrayViewFromImage(got)).tolist()) <= labels


def assert_run_outputs(out: Path, data: Path, folds: int, labels: set[int]) -> None:
    dataset = json.loads((data / "dataset.json").read_text())
    assert json.loads((out / "fingerprint.json").read_text())  # unetpp3d check
    assert any((out / "cache").iterdir())  # the folds' shared disk cache of preprocessed volumes
    validated = []
    for k in range(folds):
        run = out / "runs" / f"fold_{k}"
        for name in ("last.pt", "best.pt", "config.yaml", "split.json", "metrics.csv", "train.log"):
            assert (run / name).is_file(), run / name
        split = json.loads((run / "split.json").read_text())
        assert split["fold"] == k
        validated += split["validation"]
        bundle = out / "bundles" / f"fold_{k}"
        assert (bundle / "configs" / "metadata.json").is_file() and (bundle / "models" / "model.pt").is_file()
    # cross-validation masks: every validation case, on its label's grid, scored in the CSV
    masks = sorted(p.name for p in (out / "cv_predictions").glob("*.nii.gz"))
    assert masks == sorted(f"{name}.nii.gz" for name in validated)
    for name in validated:
        assert_on_grid(out / "cv_predictions" / f"{name}.nii.gz", data / "labelsTr" / f"{name}.nii.gz", labels)
    with open(out / "cv_evaluation" / "evaluation.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["case"] for r in rows} == set(validated)
    assert {int(r["label"]) for r in rows} <= labels - {0}
    # the test scans (the fold ensemble when several folds were trained)
    for image in dataset["test"]:
        name = Path(image).name
        assert_on_grid(out / "test_predictions" / name, data / image, labels)


@pytest.mark.slow
def test_liver_recipe_two_folds_and_their_ensemble(tmp_path):
    data = tmp_path / "Task03_Liver"
    load_standin_writer().write_standin("liver", data, cases=5, test=1, size=32)
    assert "cancer" in json.loads((data / "dataset.json").read_text())["labels"].values()
    out = tmp_path / "liver_out"
    log = run_recipe("msd_liver.sh", data, out, "--folds", "2", *TINY)
    assert_run_outputs(out, data, folds=2, labels={0, 1, 2})
    assert "ensemble of 2" in log  # the test scans went through both folds
    with open(out / "cv_evaluation" / "evaluation.csv", newline="") as fh:
        assert {int(r["label"]) for r in csv.DictReader(fh)} == {1, 2}  # liver and tumour scored apart
    assert yaml.safe_load((out / "runs" / "fold_1" / "config.yaml").read_text())["data"]["folds"] == 2


@pytest.mark.slow
def test_lung_recipe_one_fold(tmp_path):
    data = tmp_path / "Task06_Lung"
    load_standin_writer().write_standin("lung", data, cases=5, test=1, size=32)
    out = tmp_path / "lung_out"
    run_recipe("msd_lung.sh", data, out, *TINY)
    assert_run_outputs(out, data, folds=1, labels={0, 1})
    assert not (out / "runs" / "fold_1").exists()
    assert yaml.safe_load((out / "runs" / "fold_0" / "config.yaml").read_text())["task"] == "lung_nodule"
    report = json.loads((out / "test_predictions" / "lung_005.nodules.json").read_text())
    assert report["coordinate_system"] == "LPS"
