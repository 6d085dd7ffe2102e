"""outputs: no command destroys an input or replaces a file it did not write, and each says so first.

The rule lives in :func:`unetpp3d.outputs.check_outputs`; every command checks its outputs with it
before any work (inference, scoring, checking, drawing phantoms, training). The infer tests name a
model that does not exist: had the outputs been checked after the model was loaded, the error
would be about the model.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from factories import noisy_sphere as sphere
from factories import tiny_payload, write_dicom_series, write_image

from unetpp3d.commands.check import run_check
from unetpp3d.commands.cli import main
from unetpp3d.commands.evaluate import run_evaluation
from unetpp3d.commands.infer import run_inference
from unetpp3d.data.manifest import Case, write_manifest
from unetpp3d.errors import UserError
from unetpp3d.geometry import Geometry
from unetpp3d.imageio.writer import write_mask
from unetpp3d.outputs import MASK, PNG, check_outputs, csv_kind
from unetpp3d.synth.phantom import write_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GRID = Geometry((8, 8, 8), (1, 1, 1), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
NO_MODEL = "/nonexistent/model.pt"


def digest(path: Path) -> str:
    if path.is_dir():
        return "".join(digest(p) for p in sorted(path.iterdir()))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line_error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.fixture
def scan(tmp_path) -> Path:
    return write_image(tmp_path / "scans" / "scan.nii.gz", sphere(), spacing=(1.5, 1.5, 2.0))


@pytest.fixture
def model(tmp_path) -> Path:
    path = tmp_path / "model" / "best.pt"
    path.parent.mkdir()
    torch.save(tiny_payload(), path)
    return path


# ---------------------------------------------------------------------------------------------
# The rule itself
# ---------------------------------------------------------------------------------------------


def test_the_rule(tmp_path):
    scan = write_image(tmp_path / "in" / "scan.nii.gz", np.zeros((8, 8, 8), np.int16))
    ours = write_mask(np.zeros((8, 8, 8), np.uint8), GRID, tmp_path / "ours.nii.gz")
    (tmp_path / "link.nii.gz").symlink_to(scan)
    os.link(scan, tmp_path / "hard.nii.gz")
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    (tmp_path / "folder.nii.gz").mkdir()
    os.mkfifo(tmp_path / "pipe.nii.gz")

    def refused(out, match, inputs=(scan,)):
        with pytest.raises(UserError, match=match):
            check_outputs([out], MASK, inputs)

    refused(tmp_path / "m.txt", r"--out .*m\.txt: a mask is written as \.nii\.gz or \.nii")
    refused(scan, "is the input")
    refused(tmp_path / "link.nii.gz", "is the input")  # a symlink resolving to an input
    refused(tmp_path / "hard.nii.gz", "is the input")  # a hard link to an input
    refused(tmp_path / "in" / "new.nii.gz", "would be written into the input folder", inputs=(scan.parent,))
    refused(tmp_path / "folder.nii.gz", "is a folder")
    refused(tmp_path / "pipe.nii.gz", "not a regular file")
    refused(write_image(tmp_path / "ct.nii.gz", np.zeros((8, 8, 8), np.int16)), "not a mask written by unetpp3d")
    check_outputs([ours, tmp_path / "empty.nii.gz", tmp_path / "new.nii.gz"], MASK, [scan])  # all fine
    (tmp_path / "t.csv").write_text("case,label,dice,iou\n")
    check_outputs([tmp_path / "t.csv"], csv_kind("table", "case,label,dice,"))
    (tmp_path / "n.csv").write_text("my,notes\n")
    with pytest.raises(UserError, match="not a table written by unetpp3d"):
        check_outputs([tmp_path / "n.csv"], csv_kind("table", "case,label,dice,"))
    (tmp_path / "p.png").write_bytes(b"GIF89a")
    with pytest.raises(UserError, match="not a PNG picture"):
        check_outputs([tmp_path / "p.png"], PNG)


# ---------------------------------------------------------------------------------------------
# infer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["the scan", "a symlink to it", "a hard link to it", "the scans' folder",
                                    "notes.txt", "a scan of the user's", "a preview over a text file"])
def test_infer_refuses_an_output_that_would_destroy_an_input_before_loading_the_model(tmp_path, scan, capsys,
                                                                                      target):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    other = write_image(tmp_path / "other.nii.gz", sphere(seed=3))
    (tmp_path / "link.nii.gz").symlink_to(scan)
    os.link(scan, tmp_path / "hard.nii.gz")
    inputs, out, extra = [scan], None, []
    if target == "the scan":
        out = scan
    elif target == "a symlink to it":
        out = tmp_path / "link.nii.gz"
    elif target == "a hard link to it":
        out = tmp_path / "hard.nii.gz"
    elif target == "the scans' folder":
        inputs, out = [scan.parent], scan.parent
    elif target == "notes.txt":
        out = notes
    elif target == "a scan of the user's":
        out = other
    else:
        out, extra = tmp_path / "masks", ["--preview", notes]
    before = {p: digest(p) for p in (scan, notes, other)}
    err = one_line_error(["infer", *inputs, "--out", out, *extra, "--model", NO_MODEL, "--device", "cpu"], capsys)
    assert NO_MODEL not in err
    assert {p: digest(p) for p in before} == before


def test_infer_refuses_to_write_into_a_dicom_series_folder(tmp_path, capsys):
    series = write_dicom_series(tmp_path / "case7" / "dicom", n=4)
    before = digest(series)
    for out in (series, series / "mask.nii.gz"):
        err = one_line_error(["infer", series, "--out", out, "--model", NO_MODEL], capsys)
        assert "input folder" in err
    assert digest(series) == before


def test_infer_replaces_its_own_masks(tmp_path, scan, model):
    out = tmp_path / "masks"
    assert run_inference([scan], out, model=model, device="cpu") == 0
    assert run_inference([scan], out, model=model, device="cpu") == 0  # a rerun: the mask is ours
    assert run_inference([scan], out / "scan.nii.gz", model=model, device="cpu") == 0


def test_skip_existing_writes_again_a_mask_left_empty(tmp_path, scan, model):
    """An older version could leave an empty mask under its final name; --skip-existing skipped it forever."""
    out = tmp_path / "masks"
    out.mkdir()
    (out / "scan.nii.gz").write_bytes(b"")
    assert run_inference([scan], out, model=model, device="cpu", skip_existing=True) == 0
    assert nib.load(str(out / "scan.nii.gz")).shape == sphere().shape


# ---------------------------------------------------------------------------------------------
# check, evaluate, synth, train, demo
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def dataset(tmp_path) -> Path:
    img = sphere()
    lab = (img > 0).astype(np.uint8)
    cases = [Case(f"c{i}", write_image(tmp_path / "ds" / f"c{i}.nii.gz", img),
                  write_image(tmp_path / "ds" / f"c{i}_seg.nii.gz", lab)) for i in range(2)]
    return write_manifest(tmp_path / "ds" / "manifest.json", cases, {0: "background", 1: "liver"}, task="liver")


@pytest.mark.parametrize("target", ["c0.nii.gz", "c1_seg.nii.gz", "manifest.json", "notes.json"])
def test_check_refuses_a_fingerprint_path_naming_an_input_or_a_file_not_ours(dataset, capsys, target):
    out = dataset.parent / target
    if target == "notes.json":
        out.write_text('{"mine": 1}\n')
    before = digest(dataset.parent)
    err = one_line_error(["check", "--manifest", dataset, "--fingerprint", out], capsys)
    assert "--fingerprint" in err
    assert digest(dataset.parent) == before


def test_check_rewrites_its_own_fingerprint(dataset, tmp_path):
    assert run_check(dataset, out_dir=tmp_path / "fp") == 0
    assert run_check(dataset, out_dir=tmp_path / "fp") == 0


@pytest.mark.parametrize("target", ["a reference mask", "the manifest", "a table of the user's",
                                    "a summary of the user's"])
def test_evaluate_refuses_an_out_naming_a_mask_or_holding_files_not_ours(tmp_path, dataset, capsys, target):
    preds = tmp_path / "preds"
    preds.mkdir()
    grid = Geometry(sphere().shape, (1, 1, 1), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    write_mask((sphere() > 0).astype(np.uint8), grid, preds / "c0.nii.gz")
    scores = tmp_path / "scores"
    scores.mkdir()
    (scores / "evaluation.csv").write_text("patient,score\n")
    (scores / "summary.json").write_text('{"my": "summary"}\n')
    out = {"a reference mask": dataset.parent / "c0_seg.nii.gz", "the manifest": dataset,
           "a table of the user's": scores, "a summary of the user's": scores}[target]
    if target == "a summary of the user's":
        (scores / "evaluation.csv").unlink()
    before = {p: digest(p) for p in (dataset.parent, preds, scores)}
    err = one_line_error(["evaluate", "--pred", preds, "--ref", dataset, "--out", out], capsys)
    assert "--out" in err
    assert {p: digest(p) for p in before} == before
    mine = tmp_path / "mine"
    assert run_evaluation(preds, dataset, out=mine) == 0
    assert run_evaluation(preds, dataset, out=mine) == 0  # a rerun replaces its own table and summary


def test_synth_refuses_to_replace_a_manifest_or_image_not_its_own(tmp_path, capsys):
    out = tmp_path / "data"
    out.mkdir()
    (out / "manifest.json").write_text('{"name": "my study"}\n')
    one_line_error(["synth", "--out", out, "--cases", 1, "--size", 16], capsys)
    assert (out / "manifest.json").read_text() == '{"name": "my study"}\n'
    (out / "manifest.json").unlink()
    image = write_image(out / "imagesTr" / "liver_000.nii.gz", sphere())
    before = digest(image)
    one_line_error(["synth", "--out", out, "--cases", 1, "--size", 16], capsys)
    assert digest(image) == before
    fresh = tmp_path / "fresh"
    write_dataset("liver", 1, fresh, size=16)
    write_dataset("liver", 1, fresh, size=16, seed=1)  # a second run replaces its own phantoms


def test_train_force_refuses_to_delete_a_file_a_run_did_not_write(tmp_path, dataset, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("my: settings\n")
    err = one_line_error(["train", "--manifest", dataset, "--out", out, "--force", "--device", "cpu"], capsys)
    assert "config.yaml" in err and "not a run config" in err
    assert (out / "config.yaml").read_text() == "my: settings\n"


def test_demo_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    out = tmp_path / "home"
    (out / "data").mkdir(parents=True)
    (out / "data" / "thesis.tex").write_text("years of work\n")
    err = one_line_error(["demo", "--out", out, "--device", "cpu"], capsys)
    assert "not a previous demo's" in err
    assert (out / "data" / "thesis.tex").read_text() == "years of work\n"


@pytest.mark.parametrize("extra", ["probabilities", "statistics table", "case statistics"])
def test_infers_other_outputs_follow_the_same_rule(tmp_path, scan, model, capsys, extra):
    """Probability maps and statistics: a user's file under their name is refused; ours is replaced."""
    out = tmp_path / "masks"
    out.mkdir()
    if extra == "probabilities":
        user = write_image(tmp_path / "probs" / "scan.nii.gz", sphere())
        args = ["--save-probabilities", user.parent]
    elif extra == "statistics table":
        user = out / "statistics.csv"
        user.write_text("subject,volume\n")
        args = ["--statistics"]
    else:
        user = out / "scan.statistics.json"
        user.write_text('{"mine": 1}\n')
        args = ["--statistics"]
    before = digest(user)
    one_line_error(["infer", scan, "--out", out, *args, "--model", NO_MODEL, "--device", "cpu"], capsys)
    assert digest(user) == before
    user.unlink()
    for _ in range(2):  # the second run replaces what the first wrote
        assert run_inference([scan], out, model=model, device="cpu", statistics=extra != "probabilities",
                             save_probabilities=args[1] if extra == "probabilities" else None) == 0


def test_a_dicom_seg_of_the_users_is_refused_and_ours_replaced(shared_data, tmp_path, model, capsys):
    series = shared_data / "dicom_small" / "CT5N_series"
    out = tmp_path / "segs"
    out.mkdir()
    user = out / "CT5N_series.dcm"
    user.write_bytes(next(p for p in sorted(series.iterdir()) if p.is_file()).read_bytes())  # someone's DICOM file
    before = digest(user)
    one_line_error(["infer", series, "--out", out, "--output-type", "dicom-seg", "--model", NO_MODEL], capsys)
    assert digest(user) == before
    user.unlink()
    for _ in range(2):  # the second run replaces the SEG the first wrote
        assert run_inference([series], out, model=model, device="cpu", output_type="dicom-seg") == 0
