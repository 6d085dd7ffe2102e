"""evaluate: hand-computed overlap metrics, physical distances, empty masks, matching, grids and outputs."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from monai.networks.utils import one_hot

from unetpp3d.commands.evaluate import case_name, run_evaluation
from unetpp3d.errors import UserError
from unetpp3d.evaluation.metrics import dice_per_class, score_arrays


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
    # nnU-Net's convention: undefined, not a perfect score
    assert all(math.isnan(v) for v in (both.dice, both.iou, both.hd95_mm, both.surface_dice))
    assert "both empty" in both.note and "left out of the means" in both.note
    full = empty.copy()
    full[1:3, 1:3, 1:3] = 1
    (one,) = score_arrays(empty, full, spacing=(1, 1, 1))
    assert one.dice == 0.0 and one.surface_dice == 0.0 and math.isnan(one.hd95_mm) and "prediction empty" in one.note
    (fp,) = score_arrays(full, empty, spacing=(1, 1, 1))
    assert fp.dice == 0.0 and fp.iou == 0.0 and "reference empty" in fp.note  # a false positive counts
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
    out = tmp_path / "scores"
    assert run_evaluation(tmp_path / "pred", tmp_path / "ref", out=out, tolerance_mm=1.0) == 0
    rows = list(csv.DictReader((out / "evaluation.csv").open()))
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
    # a prediction off its reference's grid is the user's to fix: status 2, in a batch too
    assert run_evaluation(tmp_path / "pred", tmp_path / "ref", out=tmp_path / "s") == 2
    assert "FAILED a" in capsys.readouterr().out
    assert [row["case"] for row in csv.DictReader((tmp_path / "s" / "evaluation.csv").open())] == ["b"]
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert [f["case"] for f in summary["failed"]] == ["a"] and "not on the grid" in summary["failed"][0]["error"]


def test_a_failure_that_is_not_the_users_gives_status_1(tmp_path, make_image, monkeypatch, capsys):
    import unetpp3d.commands.evaluate as evaluate_module

    pred, ref = cubes()
    for name in ("a", "b", "c"):
        make_image(f"pred/{name}.nii.gz", pred)
        make_image(f"ref/{name}.nii.gz", ref if name != "a" else ref[:, :, :6])  # a: wrong shape, user's to fix
    real = evaluate_module.evaluate_case

    def flaky(pred_path, ref_path, tolerance_mm, case):
        if case == "b":
            raise MemoryError("out of memory")
        return real(pred_path, ref_path, tolerance_mm, case=case)

    monkeypatch.setattr(evaluate_module, "evaluate_case", flaky)
    assert run_evaluation(tmp_path / "pred", tmp_path / "ref", out=tmp_path / "out") == 1  # 1 wins over 2
    printed = capsys.readouterr().out
    assert "FAILED a" in printed and "FAILED b: MemoryError: out of memory" in printed
    assert [row["case"] for row in csv.DictReader((tmp_path / "out" / "evaluation.csv").open())] == ["c"]


def test_results_go_to_the_out_folder_or_the_current_one_never_beside_the_masks(tmp_path, make_image,
                                                                                 monkeypatch):
    pred, ref = cubes()
    make_image("pred/a.nii.gz", pred)
    make_image("ref/a.nii.gz", ref)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert run_evaluation(tmp_path / "pred", tmp_path / "ref") == 0
    assert sorted(p.name for p in work.iterdir()) == ["evaluation.csv", "summary.json"]
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["a.nii.gz"]
    assert sorted(p.name for p in (tmp_path / "ref").iterdir()) == ["a.nii.gz"]
    assert run_evaluation(tmp_path / "pred", tmp_path / "ref", out=tmp_path / "new" / "folder") == 0
    assert (tmp_path / "new" / "folder" / "summary.json").is_file()
    with pytest.raises(UserError, match=r"--out .*scores.csv: names a file, but --out takes a folder"):
        run_evaluation(tmp_path / "pred", tmp_path / "ref", out=tmp_path / "scores.csv")
    (tmp_path / "taken").write_text("")
    with pytest.raises(UserError, match="exists and is not a folder"):
        run_evaluation(tmp_path / "pred", tmp_path / "ref", out=tmp_path / "taken")


def test_summary_json_per_case_per_class_and_means(tmp_path, make_image):
    pred, ref = cubes()
    tumour_pred, tumour_ref = pred.copy(), ref.copy()
    tumour_pred[8:10, 8:10, 8:10] = 2
    tumour_ref[8:10, 8:10, 8:10] = 2
    fp_pred = pred.copy()
    fp_pred[9:11, 9:11, 9:11] = 2  # tumour predicted where the reference has none
    make_image("pred/a.nii.gz", tumour_pred)
    make_image("ref/a.nii.gz", tumour_ref)
    make_image("pred/b.nii.gz", pred)  # no tumour on either side: undefined for label 2
    make_image("ref/b.nii.gz", ref)
    make_image("pred/c.nii.gz", fp_pred)
    make_image("ref/c.nii.gz", ref)
    assert run_evaluation(tmp_path / "pred", tmp_path / "ref", out=tmp_path / "out") == 0
    text = (tmp_path / "out" / "summary.json").read_text()
    assert "NaN" not in text  # strict JSON: undefined is null
    summary = json.loads(text)
    assert {"Dice", "IoU", "HD95_mm", "surface_Dice", "detection_TP"} <= set(summary["metrics"])
    assert "left out of the means" in summary["empty_masks"]
    per_case = {c["case"]: c for c in summary["metric_per_case"]}
    assert sorted(per_case) == ["a", "b", "c"] and per_case["a"]["prediction_file"].endswith("a.nii.gz")
    assert per_case["a"]["metrics"]["1"]["Dice"] == pytest.approx(0.75)
    assert per_case["b"]["metrics"]["2"]["Dice"] is None and per_case["c"]["metrics"]["2"]["Dice"] == 0.0
    mean = summary["mean"]
    assert mean["1"]["Dice"] == pytest.approx(0.75) and mean["1"]["cases"] == 3 and mean["1"]["undefined"] == {}
    # label 2: a scores 1, c (false positive) 0, b is left out
    assert mean["2"]["Dice"] == pytest.approx(0.5) and mean["2"]["undefined"]["Dice"] == 1
    assert summary["foreground_mean"]["Dice"] == pytest.approx((0.75 + 0.5) / 2)
    rows = list(csv.DictReader((tmp_path / "out" / "evaluation.csv").open()))
    assert next(r for r in rows if r["case"] == "b" and r["label"] == "2")["dice"] == "nan"


def test_dice_per_class_follows_the_same_convention_as_score_arrays():
    """Training validation (dice_per_class) and evaluate (score_arrays) agree, empty masks included."""
    pred, ref = cubes()
    tumour = np.zeros_like(pred)
    tumour[8:10, 8:10, 8:10] = 2
    cases = [(pred, ref), (pred, ref + tumour), (pred + tumour, ref), (np.zeros_like(pred), ref),
             (pred + tumour, ref + tumour)]
    for p, r in cases:
        rows = score_arrays(p, r, spacing=(1, 1, 1), labels=[1, 2])
        as_onehot = [one_hot(torch.as_tensor(x, dtype=torch.long)[None, None], 3) for x in (p, r)]
        dice = dice_per_class(*as_onehot)[0].tolist()
        assert len(dice) == 2
        for row, d in zip(rows, dice):
            assert (math.isnan(row.dice) and math.isnan(d)) or row.dice == pytest.approx(d), (row, d)


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
    from factories import write_image

    from unetpp3d.geometry import align_label_to_image
    from unetpp3d.imageio.readers import read_image

    case = shared_data / "abdomen_ct_dicom_ts"
    _, grid = read_image(case / "dicom")
    label, label_grid = read_image(case / "liver.nii.gz", is_label=True)
    on_dicom_grid = align_label_to_image(label, label_grid, grid)
    pred = write_image(tmp_path / "pred.nii.gz", on_dicom_grid, spacing=grid.spacing, origin=grid.origin,
                       direction=grid.direction)
    assert run_evaluation(pred, case / "liver.nii.gz", out=tmp_path / "self") == 0
    row = next(csv.DictReader((tmp_path / "self" / "evaluation.csv").open()))
    assert float(row["dice"]) == 1.0 and float(row["hd95_mm"]) == 0.0


def test_cli_evaluate(tmp_path, make_image, monkeypatch):
    from typer.testing import CliRunner

    from unetpp3d.commands.cli import app

    pred, ref = cubes()
    p = make_image("p/a.nii.gz", pred)
    r = make_image("r/a.nii.gz", ref)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["evaluate", "--pred", str(p), "--ref", str(r), "--tolerance-mm", "1.5"])
    assert result.exit_code == 0, result.output
    assert "mean Dice 0.7500" in result.output and (tmp_path / "evaluation.csv").is_file()
    assert not (tmp_path / "p" / "evaluation.csv").exists()


def test_cli_exit_status_2_for_a_missing_or_bad_input_alone_or_in_a_batch(tmp_path, make_image, capsys):
    from unetpp3d.commands.cli import main

    pred, ref = cubes()
    make_image("pred/a.nii.gz", pred)
    make_image("ref/a.nii.gz", ref)
    (tmp_path / "pred" / "b.nii.gz").write_bytes(b"not an image")  # unreadable, in a batch
    make_image("ref/b.nii.gz", ref)
    for argv in (["--pred", str(tmp_path / "nope"), "--ref", str(tmp_path / "ref")],
                 ["--pred", str(tmp_path / "pred" / "b.nii.gz"), "--ref", str(tmp_path / "ref" / "b.nii.gz")],
                 ["--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref")]):
        with pytest.raises(SystemExit) as info:
            main(["evaluate", *argv, "--out", str(tmp_path / "out")])
        assert info.value.code == 2, argv
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err and "FAILED b" in captured.out


def test_references_from_a_manifest(tmp_path, make_image):
    from unetpp3d.data.manifest import write_manifest

    pred, ref = cubes()
    make_image("pred/a.nii.gz", pred)
    image = make_image("images/a.nii.gz", np.zeros_like(ref, dtype=np.int16))
    label = make_image("labels/a.nii.gz", ref)
    manifest = write_manifest(tmp_path / "dataset.json", [(image, label)], labels={0: "background", 1: "liver"})
    assert run_evaluation(tmp_path / "pred", manifest, out=tmp_path / "m") == 0
    (row,) = csv.DictReader((tmp_path / "m" / "evaluation.csv").open())
    assert row["case"] == "a" and float(row["dice"]) == pytest.approx(0.75)
