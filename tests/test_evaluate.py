"""evaluate: hand-computed overlap metrics, physical distances, empty masks, matching and grids."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from unetpp3d.errors import UserError
from unetpp3d.commands.evaluate import case_name, run_evaluation
from unetpp3d.evaluation.metrics import score_arrays


def cubes():
    pred = np.zeros((12, 12, 12), np.uint8)
    ref = np.zeros_like(pred)
    pred[2:6, 2:6, 2:6] = 1  # 64 voxels
    ref[3:7, 2:6, 2:6] = 1  # 64 voxels, 48 shared
    return pred, ref


def test_dice_iou_and_volumes_by_hand():
    pred, ref = cubes()
    (row,) = score_arrays(pred, ref, spacing=(2.0, 1.0, 1.0), tolerance_mm=1.0, case="c")
    assert row.dice == pytest.approx(2 * 48 / 128)
    assert row.iou == pytest.approx(48 / 80)
    assert row.pred_ml == pytest.approx(64 * 2 / 1000) and row.volume_diff_ml == 0 and row.volume_diff_pct == 0
    # the cubes are one voxel = 2 mm apart along x: distances are physical
    assert row.hd95_mm == pytest.approx(2.0)
    assert 0 < row.surface_dice < 1  # the x faces are 2 mm apart, beyond the 1 mm tolerance
    (loose,) = score_arrays(pred, ref, spacing=(2.0, 1.0, 1.0), tolerance_mm=2.5)
    assert loose.surface_dice == pytest.approx(1.0)
    assert (row.tp, row.fp, row.fn) == (1, 0, 0)


def test_several_labels_are_scored_separately():
    pred, ref = cubes()
    pred[8:10, 8:10, 8:10] = 2
    ref[8:10, 8:10, 8:10] = 2
    rows = score_arrays(pred, ref, spacing=(1, 1, 1))
    assert [r.label for r in rows] == [1, 2]
    assert rows[1].dice == 1.0 and rows[1].hd95_mm == 0.0


def test_empty_masks():
    empty = np.zeros((6, 6, 6), np.uint8)
    (both,) = score_arrays(empty, empty, spacing=(1, 1, 1))
    assert both.dice == 1.0 and both.iou == 1.0 and math.isnan(both.hd95_mm) and "both empty" in both.note
    full = empty.copy()
    full[1:3, 1:3, 1:3] = 1
    (one,) = score_arrays(empty, full, spacing=(1, 1, 1))
    assert one.dice == 0.0 and math.isnan(one.hd95_mm) and "prediction empty" in one.note
    assert (one.tp, one.fp, one.fn) == (0, 0, 1) and one.volume_diff_pct == -100.0


def test_detection_counts():
    pred = np.zeros((20, 20, 20), np.uint8)
    ref = np.zeros_like(pred)
    ref[2:5, 2:5, 2:5] = 1  # found
    ref[12:15, 12:15, 12:15] = 1  # missed
    pred[3:6, 3:6, 3:6] = 1
    pred[2:4, 14:17, 2:4] = 1  # a false positive
    (row,) = score_arrays(pred, ref, spacing=(1, 1, 1))
    assert (row.tp, row.fp, row.fn) == (1, 1, 1)


def test_case_name():
    assert case_name("/a/b/case_01.nii.gz") == "case_01"
    assert case_name("x.nrrd") == "x"


def test_run_evaluation_on_folders(tmp_path, make_image, capsys):
    pred, ref = cubes()
    make_image("pred/a.nii.gz", pred)
    make_image("pred/b.nii.gz", pred)
    make_image("pred/only_pred.nii.gz", pred)
    make_image("ref/a.nii.gz", ref)
    # b's reference is stored with its y axis reversed: the same voxels, indexed the other way
    make_image("ref/b.nrrd", ref[:, ::-1, :], origin=(0, 11, 0), direction=(1, 0, 0, 0, -1, 0, 0, 0, 1))
    make_image("ref/only_ref.nii.gz", ref)
    out = tmp_path / "scores.csv"
    assert run_evaluation(tmp_path / "pred", tmp_path / "ref", out=out, tolerance_mm=1.0) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["case"] for r in rows] == ["a", "b"]
    for r in rows:
        assert float(r["dice"]) == pytest.approx(0.75) and float(r["iou"]) == pytest.approx(0.6)
    printed = capsys.readouterr().out
    assert "only_pred" in printed and "only_ref" in printed and "mean Dice 0.7500" in printed


def test_grid_mismatch(tmp_path, make_image, capsys):
    pred, ref = cubes()
    p = make_image("pred/a.nii.gz", pred)
    r = make_image("ref/a.nii.gz", ref, spacing=(1.0, 1.0, 2.0))
    with pytest.raises(UserError, match="not on the grid"):
        run_evaluation(p, r)
    # in a batch, the bad case is reported and the others are still scored
    make_image("pred/b.nii.gz", pred)
    make_image("ref/b.nii.gz", ref)
    assert run_evaluation(tmp_path / "pred", tmp_path / "ref", out=tmp_path / "s.csv") == 1
    assert "FAILED a" in capsys.readouterr().out
    assert [row["case"] for row in csv.DictReader((tmp_path / "s.csv").open())] == ["b"]


def test_nothing_in_common(tmp_path, make_image):
    pred, ref = cubes()
    make_image("pred/a.nii.gz", pred)
    make_image("ref/z.nii.gz", ref)
    with pytest.raises(UserError, match="no case names in common"):
        run_evaluation(tmp_path / "pred", tmp_path / "ref")
    with pytest.raises(UserError, match="tolerance"):
        run_evaluation(tmp_path / "pred", tmp_path / "ref", tolerance_mm=0)


def test_real_label_stored_with_y_reversed(shared_data, tmp_path):
    """The DICOM case's label is stored with y reversed: it is re-indexed, not refused."""
    from conftest import write_image

    from unetpp3d.geometry import align_label_to_image
    from unetpp3d.imageio.readers import read_image

    case = shared_data / "abdomen_ct_dicom_ts"
    _, grid = read_image(case / "dicom")
    label, label_grid = read_image(case / "liver.nii.gz", is_label=True)
    on_dicom_grid = align_label_to_image(label, label_grid, grid)
    pred = write_image(tmp_path / "pred.nii.gz", on_dicom_grid, spacing=grid.spacing, origin=grid.origin,
                       direction=grid.direction)
    assert run_evaluation(pred, case / "liver.nii.gz", out=tmp_path / "self.csv") == 0
    row = next(csv.DictReader((tmp_path / "self.csv").open()))
    assert float(row["dice"]) == 1.0 and float(row["hd95_mm"]) == 0.0


def test_cli_evaluate(tmp_path, make_image):
    from typer.testing import CliRunner

    from unetpp3d.commands.cli import app

    pred, ref = cubes()
    p = make_image("p/a.nii.gz", pred)
    r = make_image("r/a.nii.gz", ref)
    result = CliRunner().invoke(app, ["evaluate", "--pred", str(p), "--ref", str(r), "--tolerance-mm", "1.5"])
    assert result.exit_code == 0, result.output
    assert "mean Dice 0.7500" in result.output and (tmp_path / "p" / "evaluation.csv").is_file()


def test_references_from_a_manifest(tmp_path, make_image):
    from unetpp3d.data.manifest import write_manifest

    pred, ref = cubes()
    make_image("pred/a.nii.gz", pred)
    image = make_image("images/a.nii.gz", np.zeros_like(ref, dtype=np.int16))
    label = make_image("labels/a.nii.gz", ref)
    manifest = write_manifest(tmp_path / "dataset.json", [(image, label)], labels={0: "background", 1: "liver"})
    assert run_evaluation(tmp_path / "pred", manifest, out=tmp_path / "m.csv") == 0
    (row,) = csv.DictReader((tmp_path / "m.csv").open())
    assert row["case"] == "a" and float(row["dice"]) == pytest.approx(0.75)
