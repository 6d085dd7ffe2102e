"""pipelines/lidc_experiment.py: folds by patient, size bands, and a tiny end-to-end run on synthetic crops."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch.utils.flop_counter import FlopCounterMode

SCRIPT = Path(__file__).resolve().parents[1] / "pipelines" / "lidc_experiment.py"

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OVERRIDES = ["model.features=[4,8,16]", "model.strides=[[2,2,1],[2,2,2]]", "data.patch_size=[16,16,4]",
             "data.batch_size=2", "train.epochs=1", "train.iterations_per_epoch=2", "train.val_every=1"]


def _load():
    spec = importlib.util.spec_from_file_location("lidc_experiment", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def write_image(path: Path, array_xyz: np.ndarray, spacing) -> None:
    img = sitk.GetImageFromArray(np.ascontiguousarray(array_xyz.transpose(2, 1, 0)))
    img.SetSpacing(spacing)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))


def _crops_folder(root: Path, patients: int = 6) -> Path:
    """LIDC-style crops: a bright ball in lung-like air, one or two crops per patient, and nodules.csv."""
    rng = np.random.default_rng(0)
    rows = []
    for p in range(1, patients + 1):
        for n in range(1, 2 + (p % 2)):
            name = f"LIDC-IDRI-{p:04d}_R_{n}"
            grid = np.mgrid[:24, :24, :6].astype(float)
            radius = 3.0 + n + rng.uniform(0, 2)
            ball = ((grid[0] - 12) ** 2 + (grid[1] - 12) ** 2 + ((grid[2] - 3) * 2) ** 2) <= radius ** 2
            image = np.where(ball, 40, -850) + rng.normal(0, 20, ball.shape)
            spacing = (0.7, 0.7, 1.25)
            write_image(root / "images" / f"{name}.nii.gz", image.astype(np.int16), spacing=spacing)
            write_image(root / "masks" / f"{name}.nii.gz", ball.astype(np.uint8), spacing=spacing)
            rows.append({"patient_id": f"LIDC-IDRI-{p:04d}", "nodule_id": n, "diameter_mm": 2 * radius * 0.7,
                         "Texture_value": 1 if p == 1 else 5})
    with open(root / "nodules.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def test_folds_keep_each_patient_on_one_side_and_test_every_nodule_once(tmp_path):
    exp = _load()
    crops = exp.load_crops(_crops_folder(tmp_path / "crops", patients=10))
    folds = exp.patient_folds(crops, folds=3, val_fraction=0.2, seed=0)
    patient = {c.name: c.patient for c in crops}
    tested = [n for f in folds for n in f["test"]]
    assert sorted(tested) == sorted(c.name for c in crops)
    for f in folds:
        sides = [{patient[n] for n in f[s]} for s in ("training", "validation", "test")]
        assert not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
        assert sides[1]  # a validation set for model selection


def test_size_bands_and_texture_groups():
    exp = _load()
    assert [exp.size_band(d) for d in (3.0, 6.0, 9.9, 10.0, 20.0, 33.0)] == \
        ["< 6 mm", "6-10 mm", "6-10 mm", "10-20 mm", "> 20 mm", "> 20 mm"]
    assert exp.TEXTURE_GROUPS[1] == exp.TEXTURE_GROUPS[2] == "ground-glass" and exp.TEXTURE_GROUPS[5] == "solid"


def test_wide_unet_is_matched_to_the_unetplusplus(tmp_path):
    exp = _load()
    _, cfg = exp.load_protocol(exp.DEFAULT_CONFIG, "reduced", [])
    wide, pp = exp.build_model("wide_unet", cfg), exp.build_model("unetpp_ds", cfg)
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert abs(count(wide) - count(pp)) <= 0.03 * count(pp)
    assert count(exp.build_model("unet", cfg)) < 0.95 * count(pp)


@pytest.mark.slow
def test_tiny_run_writes_every_model_and_mode(tmp_path):
    exp = _load()
    threads = torch.get_num_threads()
    out = tmp_path / "out"
    try:
        rc = exp.main(["--data", str(_crops_folder(tmp_path / "crops")), "--out", str(out),
                       "--set", "folds=2", "--set", "jobs=1", "--set", "timing_crops=1",
                       *[arg for o in OVERRIDES for arg in ("--set", o)]])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    text = (out / "results.md").read_text(encoding="utf-8")
    for row in ("| U-Net |", "| wide U-Net |", "| UNet++ |", "| UNet++ DS, accurate (mean probability) |",
                "| UNet++ DS, mean logit |", "| UNet++ DS, pruned L^1 |", "| UNet++ DS, pruned L^2 |"):
        assert row in text
    assert "Spearman" in text and "ground-glass" in text
    raw = json.loads((out / "results.json").read_text(encoding="utf-8"))
    table = raw["summary"]["table"]
    assert set(table) == {"unet", "wide_unet", "unetpp", "unetpp_ds/accurate", "unetpp_ds/logit_mean",
                          "unetpp_ds/L1", "unetpp_ds/L2"}
    n_crops = len(raw["nodules"])
    for label, entry in table.items():
        assert entry["iou"]["n"] == n_crops and 0.0 <= entry["iou"]["mean"] <= 1.0
        assert ("iou_minus_unet" in entry) == (label != "unet")
    assert len(raw["runs"]) == 8 and all(r["best_val_dice"] >= 0 for r in raw["runs"])
    # FLOPs counted on the fused path (direct oneDNN calls included) equal the plain path's count.
    _, cfg = exp.load_protocol(exp.DEFAULT_CONFIG, "reduced", OVERRIDES)
    net = exp.build_model("unetpp_ds", cfg).eval()
    net.fused = False
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.zeros(1, 1, 16, 16, 4))
    ds = next(r for r in raw["runs"] if r["model"] == "unetpp_ds")
    assert ds["cost"]["accurate"]["gflops_per_patch"] == pytest.approx(counter.get_total_flops() / 1e9, rel=0.02)
    assert ds["cost"]["L1"]["gflops_per_patch"] < ds["cost"]["L2"]["gflops_per_patch"]
    assert (out / "runs" / "fold1_unetpp_ds" / "best.pt").is_file()
    assert json.loads((out / "runs" / "fold1_unetpp_ds" / "pruning.json").read_text())["chosen_level"] in (1, 2)
