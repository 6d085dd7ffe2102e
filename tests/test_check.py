"""check: every problem of every case reported at once, summary, fingerprint, and the CLI's exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from factories import write_dicom_series

from unetpp3d.commands.check import run_check
from unetpp3d.commands.cli import main
from unetpp3d.data.fingerprint import fingerprint_mismatch
from unetpp3d.data.manifest import Case, load_manifest, write_manifest
from unetpp3d.data.validation import default_fingerprint_path, validate_case

LABELS = {0: "background", 1: "liver"}
FLIP_Y = (1, 0, 0, 0, -1, 0, 0, 0, 1)


@pytest.fixture(autouse=True)
def _work_folder(tmp_path, monkeypatch):
    """Run each test from its own folder: `check` writes the fingerprint into the current folder."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def phantom(shape=(16, 16, 12)):
    img = np.full(shape, -1000, np.int16)
    lab = np.zeros(shape, np.uint8)
    lab[4:10, 3:9, 2:8] = 1
    img[lab == 1] = 60
    return img, lab


def good_case(make_image, name, **geometry):
    img, lab = phantom()
    img[0, 0, 0] += 1 + sum(map(ord, name)) % 97  # one background voxel: distinct scans, not byte copies (leaks)
    return Case(name, make_image(f"{name}.nii.gz", img, **geometry), make_image(f"{name}_seg.nii.gz", lab, **geometry))


def test_good_dataset_passes_and_writes_fingerprint(make_image, tmp_path, capsys):
    cases = [good_case(make_image, f"case{i}", spacing=(1.0, 1.0, 2.0)) for i in range(3)]
    manifest = write_manifest(tmp_path / "ds.json", cases[:2], LABELS, task="liver", validation=cases[2:])
    assert run_check(manifest) == 0
    out = capsys.readouterr().out
    assert "3 case(s)" in out and "liver (mL)" in out and "spacing (mm)" in out
    fp_path = default_fingerprint_path(manifest)
    assert fp_path == tmp_path / "work" / "ds.fingerprint.json"  # the current folder, not beside the data
    assert not (tmp_path / "ds.fingerprint.json").exists()
    fp = json.loads(fp_path.read_text())
    assert fp["n_cases"] == 3 and fp["median_spacing"] == [1.0, 1.0, 2.0]
    assert fp["cases"][0]["label_volumes_ml"]["1"] == pytest.approx(6 * 6 * 6 * 2.0 / 1000)
    assert fp["intensity"]["source"] == "foreground" and fp["intensity"]["percentile_00_5"] == 60
    # explicit fingerprint path
    assert run_check(manifest, fingerprint_path=tmp_path / "elsewhere" / "fp.json") == 0
    assert (tmp_path / "elsewhere" / "fp.json").is_file()


def test_fingerprint_goes_to_the_out_folder_and_records_each_cases_files(make_image, tmp_path):
    cases = [good_case(make_image, f"case{i}") for i in range(2)]
    manifest = write_manifest(tmp_path / "ds.json", cases, LABELS, task="liver")
    with pytest.raises(SystemExit) as info:
        main(["check", "--manifest", str(manifest), "--out", str(tmp_path / "out")])
    assert info.value.code == 0
    fp = json.loads((tmp_path / "out" / "ds.fingerprint.json").read_text())
    assert not (tmp_path / "ds.fingerprint.json").exists() and not (tmp_path / "work" / "ds.fingerprint.json").exists()
    files = fp["cases"][0]["files"]
    image = cases[0].image.stat()
    assert files["image"] == {"path": str(cases[0].image.resolve()), "size": image.st_size,
                              "mtime_ns": image.st_mtime_ns}
    assert set(files) == {"image", "label"}
    assert fp["seed"] == 0 and fp["series_uid"] is None


def test_a_fingerprint_matches_until_a_file_changes(make_image, tmp_path):
    cases = [good_case(make_image, f"case{i}") for i in range(2)]
    manifest = write_manifest(tmp_path / "ds.json", cases, LABELS, task="liver")
    assert run_check(manifest) == 0
    fp = json.loads(default_fingerprint_path(manifest).read_text())
    man = load_manifest(manifest)
    assert fingerprint_mismatch(fp, man.training, LABELS) is None
    assert "lacks case(s) other" in fingerprint_mismatch(fp, [*man.training, Case("other", cases[0].image)], LABELS)
    assert "has other case(s) case1" in fingerprint_mismatch(fp, man.training[:1], LABELS)
    assert "labels" in fingerprint_mismatch(fp, man.training, {0: "background", 1: "liver", 2: "tumour"})
    later = cases[1].label.stat().st_mtime_ns + 10**9
    os.utime(cases[1].label, ns=(later, later))
    why = fingerprint_mismatch(fp, man.training, LABELS)
    assert why.startswith("case1's label") and str(cases[1].label.resolve()) in why


def test_a_dicom_folder_is_stamped_by_its_files(tmp_path):
    series = write_dicom_series(tmp_path / "series")
    manifest = write_manifest(tmp_path / "d.json", [], LABELS, test=[Case("d", series)])
    assert run_check(manifest) == 0
    fp = json.loads(default_fingerprint_path(manifest).read_text())
    stamp = fp["cases"][0]["files"]["image"]
    slices = [p for p in series.rglob("*") if p.is_file()]
    assert stamp["files"] == len(slices) and stamp["size"] == sum(p.stat().st_size for p in slices)
    slices[0].write_bytes(slices[0].read_bytes() + b"\0")
    assert "has changed" in fingerprint_mismatch(fp, load_manifest(manifest).test, LABELS)


def test_flipped_label_is_fine_and_empty_label_is_a_warning(make_image, tmp_path):
    img, lab = phantom()
    # the label stored y-reversed, with a direction that says so: same physical voxels
    origin_flip = (0.0, 15.0, 0.0)
    case = Case("flip", make_image("flip.nii.gz", img),
                make_image("flip_seg.nii.gz", lab[:, ::-1, :], origin=origin_flip, direction=FLIP_Y))
    assert validate_case(case, LABELS) == []
    empty = Case("empty", make_image("e.nii.gz", img), make_image("e_seg.nii.gz", np.zeros_like(lab)))
    problems = validate_case(empty, LABELS)
    assert [p.severity for p in problems] == ["warning"] and "all background" in problems[0].message


def broken_dataset(make_image, tmp_path) -> tuple[Path, dict[str, str]]:
    """A manifest whose cases each carry one problem; returns it and case -> expected phrase."""
    img, lab = phantom()
    expected: dict[str, str] = {}
    training = [good_case(make_image, "fine")]

    training.append(Case("missing", tmp_path / "missing.nii.gz", make_image("missing_seg.nii.gz", lab)))
    expected["missing"] = "no such file"

    training.append(Case("shape", make_image("shape.nii.gz", img), make_image("shape_seg.nii.gz", lab[:, :, :10])))
    expected["shape"] = "size 16x16x12 vs 16x16x10"

    shifted = make_image("shift_seg.nii.gz", lab, origin=(0.0, 0.0, 5.0))
    training.append(Case("shift", make_image("shift.nii.gz", img), shifted))
    expected["shift"] = "label grid does not match image"

    half = lab.astype(np.float32)
    half[5, 5, 5] = 0.5
    training.append(Case("half", make_image("half.nii.gz", img), make_image("half_seg.nii.gz", half)))
    expected["half"] = "whole class numbers, found 0.5"

    three = lab.copy()
    three[0, 0, 0] = 3
    training.append(Case("three", make_image("three.nii.gz", img), make_image("three_seg.nii.gz", three)))
    expected["three"] = "label values [3] are not among the manifest's labels [0, 1]"

    nan = img.astype(np.float32)
    nan[1, 1, 1] = np.nan
    training.append(Case("nan", make_image("nan.nii.gz", nan), make_image("nan_seg.nii.gz", lab)))
    expected["nan"] = "NaN or infinite"

    trunc = make_image("trunc.nii.gz", np.random.default_rng(0).normal(size=(32, 32, 32)).astype(np.float32))
    trunc.write_bytes(trunc.read_bytes()[:3000])
    training.append(Case("trunc", trunc, make_image("trunc_seg.nii.gz", np.zeros((32, 32, 32), np.uint8))))
    expected["trunc"] = "truncated"

    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    training.append(Case("empty", empty, make_image("empty_seg.nii.gz", lab)))
    expected["empty"] = "empty"

    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.Image(16, 16, sitk.sitkInt16), str(flat))
    training.append(Case("flat", flat, make_image("flat_seg.nii.gz", lab)))
    expected["flat"] = "2D image"

    four = tmp_path / "four.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 12, 2), np.float32), np.eye(4)), str(four))
    training.append(Case("four", four, make_image("four_seg.nii.gz", lab)))
    expected["four"] = "2 channels"

    nodicom = tmp_path / "nodicom"
    nodicom.mkdir()
    (nodicom / "notes.txt").write_text("hello")
    test = [Case("nodicom", nodicom)]
    expected["nodicom"] = "no DICOM files"

    two = tmp_path / "two_series"
    write_dicom_series(two, uid="1.2.3.1", prefix="a")
    write_dicom_series(two, uid="1.2.3.2", prefix="b")
    test.append(Case("two_series", two))
    expected["two_series"] = "2 DICOM series"

    gap = write_dicom_series(tmp_path / "gap", positions=[0.0, 2.0, 6.0, 8.0])
    test.append(Case("gap", gap))
    expected["gap"] = "not evenly spaced"
    return write_manifest(tmp_path / "broken.json", training, LABELS, test=test), expected


def test_all_problems_are_reported_one_line_each(make_image, tmp_path, capsys):
    manifest, expected = broken_dataset(make_image, tmp_path)
    assert run_check(manifest) == 2  # every problem check finds is the user's to fix
    out = capsys.readouterr().out
    error_lines = [ln for ln in out.splitlines() if ln.startswith("error: ")]
    assert len(error_lines) == len(expected), "\n".join(error_lines)
    for case, phrase in expected.items():
        line = next((ln for ln in error_lines if ln.startswith(f"error: {case}: ")), None)
        assert line is not None, f"no problem reported for {case}:\n{out}"
        assert phrase in line, line
        assert str(tmp_path) in line  # names the file
    assert "fine" not in " ".join(error_lines)
    assert f"{len(expected)} error(s) in {len(expected)} case(s)" in out
    assert not default_fingerprint_path(manifest).exists()  # not written for a broken dataset


def test_cli_check_exit_codes_without_traceback(make_image, tmp_path, capsys):
    manifest, _ = broken_dataset(make_image, tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["check", "--manifest", str(manifest)])
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err

    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(SystemExit) as info:
        main(["check", "--manifest", str(bad)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not valid JSON" in err and "Traceback" not in err


@pytest.mark.slow  # a fresh interpreter importing torch and MONAI: a few seconds
def test_cli_subprocess(make_image, tmp_path):
    img, lab = phantom()
    bad_label = lab.astype(np.float32)
    bad_label[1, 1, 1] = 0.5
    case = Case("c", make_image("c.nii.gz", img), make_image("c_seg.nii.gz", bad_label))
    manifest = write_manifest(tmp_path / "m.json", [case], LABELS)
    exe = Path(sys.executable).with_name("unetpp3d")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "unetpp3d"]
    done = subprocess.run([*cmd, "check", "--manifest", str(manifest)], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stdout + done.stderr
    assert "error: c: " in done.stdout and "0.5" in done.stdout


def test_real_cases_pass(shared_data, tmp_path, capsys):
    d = shared_data
    training = [
        Case("ts_nifti", d / "abdomen_ct_ts" / "ct.nii.gz", d / "abdomen_ct_ts" / "liver.nii.gz"),
        # the label is stored y-flipped relative to the DICOM series: fine by physical space
        Case("ts_dicom", d / "abdomen_ct_dicom_ts" / "dicom", d / "abdomen_ct_dicom_ts" / "liver.nii.gz"),
        Case("dcmqi", d / "abdomen_ct_3slice_dcmqi" / "dicom", d / "abdomen_ct_3slice_dcmqi" / "liver_spine.nrrd"),
    ]
    manifest = write_manifest(tmp_path / "real.json", training, {0: "background", 1: "liver", 2: "spine"},
                              test=[Case("ct5n", d / "dicom_small" / "CT5N_series")])
    assert run_check(manifest) == 0, capsys.readouterr().out
    fp = json.loads(default_fingerprint_path(manifest).read_text())
    by_name = {c["name"]: c for c in fp["cases"]}
    assert set(by_name) == {"ts_nifti", "ts_dicom", "dcmqi"}  # labelled cases only
    assert by_name["ts_nifti"]["label_volumes_ml"]["1"] == pytest.approx(38634 * 27 / 1000)
    assert by_name["ts_dicom"]["size"] == [512, 512, 20] and by_name["ts_dicom"]["axcodes"] == "LPS"
    assert by_name["dcmqi"]["label_volumes_ml"]["2"] > 0
    assert -200 < fp["intensity"]["percentile_00_5"] < fp["intensity"]["percentile_99_5"] < 1000
