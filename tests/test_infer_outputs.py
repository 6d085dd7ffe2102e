"""`unetpp3d infer` as nnU-Net and TotalSegmentator users run it: nnU-Net case names that
`evaluate` matches, saved probabilities, per-class statistics, DICOM SEG output, exit status.

Models are tiny (see tests/test_predictor.py); :class:`ThresholdNet` (voxels brighter than
50 HU) gives masks with a known, non-trivial shape on the real DICOM series.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from factories import ThresholdNet, make_prep, sphere_scan, write_image
from factories import write_tiny_checkpoint as save_checkpoint
from typer.testing import CliRunner

import unetpp3d
import unetpp3d.commands.cli as cli_module
from unetpp3d.commands.cli import app, main
from unetpp3d.commands.evaluate import run_evaluation
from unetpp3d.commands.infer import run_inference
from unetpp3d.errors import UserError
from unetpp3d.imageio.readers import read_image
from unetpp3d.imageio.writer import write_mask
from unetpp3d.inference.inputs import expand_inputs
from unetpp3d.inference.predictor import Predictor
from unetpp3d.inference.statistics import class_statistics

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
WIDE = {"COLUMNS": "200", "TERMINAL_WIDTH": "200"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("model") / "best.pt")


@pytest.fixture(scope="module")
def nodule_ckpt(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("nodule_model") / "best.pt", task="lung_nodule")


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    direction = (0, 1, 0, -1, 0, 0, 0, 0, 1)  # permuted axes: the probabilities go back through Orientationd
    return write_image(tmp_path_factory.mktemp("scans") / "sphere.nii.gz", sphere_scan(), spacing=(1.5, 1.5, 2.0),
                       origin=(12.0, -30.0, 5.0), direction=direction)


# ---------------------------------------------------------------------------------------------
# nnU-Net names
# ---------------------------------------------------------------------------------------------


def test_nnunet_channel_suffix_is_dropped_from_case_names(tmp_path):
    folder = tmp_path / "imagesTs"
    for name in ("liver_005_0000.nii.gz", "liver_006_0001.nii.gz", "_0000.nii.gz", "scan_2023.nrrd"):
        write_image(folder / name, np.zeros((4, 4, 4), np.int16))
    names = [c.name for c in expand_inputs([folder])]
    # only channel 0000 is nnU-Net's single CT channel; other digits are part of the name
    assert names == ["_0000", "liver_005", "liver_006_0001", "scan_2023"]
    # a DICOM folder keeps its name as it is
    dicom = tmp_path / "series_0000"
    dicom.mkdir()
    (dicom / "slice1.dcm").write_bytes(b"")
    assert [c.name for c in expand_inputs([dicom])] == ["series_0000"]


def test_colliding_names_are_made_unique_and_the_log_says_which_is_which(tmp_path, caplog):
    """liver_005.nii.gz and liver_005_0000.nii.gz both mean the case liver_005: neither output is lost,
    and the log names the file behind each changed name."""
    folder = tmp_path / "imagesTs"
    for name in ("liver_005.nii.gz", "liver_005_0000.nii.gz", "other.nii.gz"):
        write_image(folder / name, np.zeros((4, 4, 4), np.int16))
    names = [c.name for c in expand_inputs([folder])]
    assert names == ["imagesTs_liver_005", "imagesTs_liver_005_2", "other"]
    assert "liver_005_0000.nii.gz: 2 inputs would be named 'liver_005'; this one's outputs are named " \
           "'imagesTs_liver_005_2'" in caplog.text
    assert "other.nii.gz" not in caplog.text


def test_masks_of_nnunet_named_inputs_match_labelsTs_in_evaluate(ckpt, tmp_path, capsys):
    """imagesTs/<case>_0000.nii.gz -> <case>.nii.gz, so evaluate --ref labelsTs/ pairs every case."""
    for k, shift in ((5, 0), (6, 3)):
        image = np.roll(sphere_scan(), shift, axis=0)
        write_image(tmp_path / "imagesTs" / f"liver_{k:03d}_0000.nii.gz", image, spacing=(1.5, 1.5, 2.0))
        write_image(tmp_path / "labelsTs" / f"liver_{k:03d}.nii.gz", (image > 0).astype(np.uint8),
                    spacing=(1.5, 1.5, 2.0))
    assert run_inference([tmp_path / "imagesTs"], tmp_path / "pred", model=ckpt, device="cpu") == 0
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["liver_005.nii.gz", "liver_006.nii.gz"]
    capsys.readouterr()
    assert run_evaluation(tmp_path / "pred", tmp_path / "labelsTs", out=tmp_path / "scores") == 0
    summary = json.loads((tmp_path / "scores" / "summary.json").read_text(encoding="utf-8"))
    assert [c["case"] for c in summary["metric_per_case"]] == ["liver_005", "liver_006"]
    assert summary["predictions_without_reference"] == [] == summary["references_without_prediction"]


# ---------------------------------------------------------------------------------------------
# --save-probabilities
# ---------------------------------------------------------------------------------------------


def test_probabilities_are_on_the_scans_grid_sum_to_one_and_agree_with_the_mask(nodule_ckpt, scan, tmp_path):
    # lung nodules with min_component_ml 0 keep every component, so the mask is the argmax itself
    out, probs_dir = tmp_path / "masks", tmp_path / "probs"
    assert run_inference([scan], out, model=nodule_ckpt, device="cpu", save_probabilities=probs_dir) == 0
    path = probs_dir / "sphere.nii.gz"
    mask = np.asanyarray(nib.load(str(out / "sphere.nii.gz")).dataobj)
    probs_img, scan_img = nib.load(str(path)), nib.load(str(scan))
    probs = np.asanyarray(probs_img.dataobj)
    assert probs.shape == (*scan_img.shape, 2) and probs.dtype == np.float32
    np.testing.assert_allclose(probs_img.affine, scan_img.affine, atol=1e-4)
    itk = sitk.ReadImage(str(path))  # SimpleITK: a 4D image whose first three axes are the scan's
    reference = sitk.ReadImage(str(scan))
    np.testing.assert_allclose(itk.GetSpacing()[:3], reference.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(itk.GetOrigin()[:3], reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(itk.GetDirection()).reshape(4, 4)[:3, :3].ravel(),
                               reference.GetDirection(), atol=1e-6)
    # every voxel sums to one, the body crop's outside included (background 1 there)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert np.mean(probs[..., 0] == 1.0) > 0.1  # outside the body crop (14% of this scan)
    np.testing.assert_array_equal(probs.argmax(-1), mask)
    assert 0 < np.count_nonzero(mask) < mask.size
    assert sorted(p.name for p in probs_dir.iterdir()) == ["sphere.nii.gz"]  # no temporaries left


def test_probability_targets_are_checked_before_the_model_loads(scan, tmp_path):
    missing_model = tmp_path / "no_model.pt"  # any refusal here comes before the model is looked at
    with pytest.raises(UserError, match="would overwrite the mask"):
        run_inference([scan], tmp_path / "out", model=missing_model, save_probabilities=tmp_path / "out")
    with pytest.raises(UserError, match="float NIfTI; name the file .nii.gz"):
        run_inference([scan], tmp_path / "out", model=missing_model, save_probabilities=tmp_path / "p.npz")
    with pytest.raises(UserError, match="need a folder for their probabilities"):
        run_inference([scan, scan], tmp_path / "out", model=missing_model, save_probabilities=tmp_path / "p.nii.gz")


# ---------------------------------------------------------------------------------------------
# --statistics
# ---------------------------------------------------------------------------------------------


def test_class_statistics_measure_volume_and_hu_inside_each_class():
    from unetpp3d.geometry import Geometry

    geometry = Geometry((4, 4, 2), (2.0, 2.0, 2.5), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    image = np.full((4, 4, 2), -1000, np.int16)
    mask = np.zeros((4, 4, 2), np.uint8)
    mask[:2, :2, 0] = 1
    image[:2, :2, 0] = [[100, 300], [100, 300]]
    (liver, tumour) = class_statistics("c", mask, image, geometry, {"0": "background", "1": "liver", "2": "tumour"})
    assert (liver.label, liver.name, liver.voxels) == (1, "liver", 4)
    assert liver.volume_ml == pytest.approx(4 * 10.0 / 1000)
    assert liver.mean_hu == pytest.approx(200.0) and liver.std_hu == pytest.approx(100.0)
    assert (tumour.voxels, tumour.volume_ml, tumour.mean_hu, tumour.std_hu) == (0, 0.0, None, None)


def test_statistics_per_case_json_and_one_table_for_the_batch(ckpt, tmp_path):
    scans = [write_image(tmp_path / "in" / f"case{k}.nii.gz", np.roll(sphere_scan(), 4 * k, axis=1),
                         spacing=(1.5, 1.5, 2.0)) for k in (1, 2)]
    out = tmp_path / "out"
    code = run_inference([*scans, tmp_path / "in" / "missing.nii.gz"], out, model=ckpt, device="cpu",
                         statistics=True)
    assert code == 2  # the missing input
    rows = list(csv.DictReader((out / "statistics.csv").read_text(encoding="utf-8").splitlines()))
    assert [(r["case"], r["label"], r["name"]) for r in rows] == [("case1", "1", "liver"), ("case2", "1", "liver")]
    for path, row in zip(scans, rows, strict=True):
        stats = json.loads((out / f"{path.name[:-7]}.statistics.json").read_text(encoding="utf-8"))
        assert stats["case"] == row["case"] and stats["image"] == str(path)
        # measured again here from the files written and read
        image, geometry = read_image(path)
        mask, _ = read_image(out / f"{row['case']}.nii.gz", is_label=True)
        inside = image[mask == 1].astype(float)
        entry = stats["classes"]["liver"]
        assert entry["voxels"] == int(row["voxels"]) == inside.size > 0
        assert entry["volume_ml"] == pytest.approx(inside.size * np.prod(geometry.spacing) / 1000, rel=1e-6)
        assert entry["mean_hu"] == pytest.approx(inside.mean(), abs=1e-3) == float(row["mean_hu"])
        assert entry["std_hu"] == pytest.approx(inside.std(), abs=1e-3) == float(row["std_hu"])
    # rerun skipping the finished cases: the table still holds both, from their JSON files
    before = (out / "statistics.csv").read_text(encoding="utf-8")
    assert run_inference(scans, out, model=ckpt, device="cpu", statistics=True, skip_existing=True) == 0
    assert (out / "statistics.csv").read_text(encoding="utf-8") == before
    # a skipped case without its JSON (an earlier run without --statistics) is left out, and said so
    (out / "case2.statistics.json").unlink()
    assert run_inference(scans, out, model=ckpt, device="cpu", statistics=True, skip_existing=True) == 0
    assert [r.split(",")[0] for r in (out / "statistics.csv").read_text(encoding="utf-8").splitlines()[1:]] == ["case1"]


# ---------------------------------------------------------------------------------------------
# DICOM SEG
# ---------------------------------------------------------------------------------------------


def _source_slices(folder: Path) -> dict[int, str]:
    """Slice index k on the grid read_image gives -> that slice's SOPInstanceUID (from the file meta)."""
    import pydicom

    _, geometry = read_image(folder)
    to_index = np.linalg.inv(geometry.direction_matrix @ np.diag(geometry.spacing))
    slices = {}
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        index = to_index @ (np.asarray(ds.ImagePositionPatient, float) - np.asarray(geometry.origin))
        slices[int(round(index[2]))] = str(ds.file_meta.MediaStorageSOPInstanceUID)
    return slices


def assert_seg_matches(seg_path: Path, mask_xyz: np.ndarray, geometry, source: Path) -> object:
    """Every frame of the SEG lies on a slice of the mask's grid and holds that slice's voxels of its segment."""
    import pydicom

    seg = pydicom.dcmread(seg_path)
    assert seg.SOPClassUID == SEG_STORAGE and seg.SegmentationType == "BINARY"
    shared = seg.SharedFunctionalGroupsSequence[0]
    row_spacing, col_spacing = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    np.testing.assert_allclose((col_spacing, row_spacing), geometry.spacing[:2], rtol=1e-5)
    np.testing.assert_allclose([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
                               geometry.direction_matrix[:, :2].T.ravel(), atol=1e-5)
    assert (seg.Columns, seg.Rows) == geometry.size[:2]
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    to_index = np.linalg.inv(geometry.direction_matrix @ np.diag(geometry.spacing))
    sources = _source_slices(source)
    rebuilt = np.zeros(geometry.size, np.uint8)
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        position = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float)
        index = to_index @ (position - np.asarray(geometry.origin))
        k = int(round(index[2]))
        np.testing.assert_allclose(index, (0, 0, k), atol=1e-3)  # on a slice of the grid, at its corner
        assert item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID == sources[k]
        # highdicom moves the segment's identification to the shared groups when every frame has the same one
        identification = (item if "SegmentIdentificationSequence" in item else shared).SegmentIdentificationSequence
        number = int(identification[0].ReferencedSegmentNumber)
        assert not rebuilt[:, :, k][frame.T > 0].any()  # segments do not overlap
        rebuilt[:, :, k][frame.T > 0] = number
    np.testing.assert_array_equal(rebuilt, mask_xyz)
    referenced = seg.ReferencedSeriesSequence[0]
    assert {str(i.ReferencedSOPInstanceUID) for i in referenced.ReferencedInstanceSequence} == set(sources.values())
    return seg


@pytest.mark.parametrize("series, task, spacing, threshold, code", [
    ("dicom_small/CT5N_series", "lung_nodule", (0.488281, 0.488281, 2.5), -40.0, "27925004"),  # its own grid
    ("abdomen_ct_dicom_ts/dicom", "liver", (4.0, 4.0, 4.0), 50.0, "10200004"),
])
def test_dicom_seg_frames_and_geometry_match_the_nifti_mask(shared_data, tmp_path, series, task, spacing, threshold,
                                                            code, caplog):
    pytest.importorskip("highdicom")
    import pydicom

    from unetpp3d.imageio.dicom_seg import write_dicom_seg

    source = shared_data / series
    prep = make_prep(task, spacing=spacing)
    prep.intensity_stats = [threshold, 100.0]  # ThresholdNet: the mask is the voxels above `threshold` HU
    predictor = Predictor(ThresholdNet(), prep, device="cpu", progress=False)
    result = predictor.predict(source)
    assert 0 < np.count_nonzero(result.mask_xyz) < result.mask_xyz.size
    nifti = write_mask(result.mask_xyz, result.geometry, tmp_path / "mask.nii.gz")
    labels = {int(k): v for k, v in predictor.prep.labels.items()}
    seg_path = write_dicom_seg(result.mask_xyz, result.geometry, source, tmp_path / "mask.dcm", labels, task=task)
    mask_back, grid = read_image(nifti, is_label=True)  # the NIfTI as a user reads it
    seg = assert_seg_matches(seg_path, mask_back, grid, source)
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == code
    first = pydicom.dcmread(next(iter(sorted(source.iterdir()))), stop_before_pixels=True)
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    if str(first.SeriesInstanceUID).strip():
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
        assert seg.StudyInstanceUID == first.StudyInstanceUID and "anonymisation" not in caplog.text
    else:  # the anonymised series: its UIDs were blanked, the SEG says so and derives its own
        assert "have no StudyInstanceUID or SeriesInstanceUID" in caplog.text
        assert str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID) in caplog.text


def test_dicom_seg_with_several_labels_has_one_segment_each(shared_data, tmp_path):
    pytest.importorskip("highdicom")
    from unetpp3d.imageio.dicom_seg import write_dicom_seg

    source = shared_data / "dicom_small" / "CT5N_series"
    image, geometry = read_image(source)
    mask = np.zeros(geometry.size, np.uint8)
    mask[2:10, 3:12, 1:4] = 1
    mask[5:8, 5:9, 2] = 2
    mask[:, :, 0] = 0  # an empty slice: no frame for it
    seg_path = write_dicom_seg(mask, geometry, source, tmp_path / "two.dcm", {1: "liver", 2: "tumour"})
    seg = assert_seg_matches(seg_path, mask, geometry, source)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver", "tumour"]
    assert seg.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"  # neoplasm


def test_infer_writes_dicom_seg_from_a_dicom_series(shared_data, ckpt, tmp_path):
    pytest.importorskip("highdicom")
    source = shared_data / "dicom_small" / "CT5N_series"
    assert run_inference([source], tmp_path / "nifti", model=ckpt, device="cpu") == 0
    code = run_inference([source], tmp_path / "seg", model=ckpt, device="cpu", output_type="dicom-seg",
                         statistics=True)
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "seg").iterdir()) == ["CT5N_series.dcm", "CT5N_series.statistics.json",
                                                                   "statistics.csv"]
    mask, grid = read_image(tmp_path / "nifti" / "CT5N_series.nii.gz", is_label=True)
    seg = assert_seg_matches(tmp_path / "seg" / "CT5N_series.dcm", mask, grid, source)
    assert seg.SoftwareVersions == unetpp3d.__version__ and seg.ContentQualification == "RESEARCH"
    # one input, one file: .dcm, not .nii.gz
    with pytest.raises(UserError, match=r"written as \.dcm"):
        run_inference([source], tmp_path / "one.nii.gz", model=ckpt, output_type="dicom-seg")


def test_dicom_seg_refusals_come_before_the_model_loads(shared_data, scan, tmp_path, monkeypatch, capsys):
    missing_model = tmp_path / "no_model.pt"
    with pytest.raises(UserError, match="is not DICOM"):
        run_inference([scan], tmp_path / "out", model=missing_model, output_type="dicom-seg")
    with pytest.raises(UserError, match="--output-type 'rtstruct'"):
        run_inference([scan], tmp_path / "out", model=missing_model, output_type="rtstruct")
    # highdicom missing: one line, exit status 2, nothing written
    monkeypatch.setitem(__import__("sys").modules, "highdicom", None)
    with pytest.raises(SystemExit) as info:
        main(["infer", str(shared_data / "dicom_small" / "CT5N_series"), "--out", str(tmp_path / "out"),
              "--model", str(missing_model), "--output-type", "dicom-seg"])
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "needs highdicom" in lines[0] and "pip install" in lines[0]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Exit status and choices
# ---------------------------------------------------------------------------------------------


def test_exit_status_is_2_for_user_problems_and_1_when_anything_else_failed(ckpt, scan, tmp_path, monkeypatch):
    other = write_image(tmp_path / "other.nii.gz", sphere_scan(), spacing=(1.5, 1.5, 2.0))
    missing = tmp_path / "missing.nii.gz"
    assert run_inference([scan, missing], tmp_path / "a", model=ckpt, device="cpu") == 2
    predict = Predictor.predict

    def failing(self, path):
        if Path(path) == other:
            raise RuntimeError("out of memory (simulated)")
        return predict(self, path)

    monkeypatch.setattr(Predictor, "predict", failing)
    assert run_inference([scan, other], tmp_path / "b", model=ckpt, device="cpu") == 1
    assert run_inference([scan, other, missing], tmp_path / "c", model=ckpt, device="cpu") == 1  # 1 wins over 2
    assert (tmp_path / "c" / "sphere.nii.gz").is_file()


def test_infer_choices_and_device_are_checked_before_anything_loads(tmp_path, monkeypatch, scan):
    runner = CliRunner()
    help_text = runner.invoke(app, ["infer", "--help"], env=WIDE).output
    assert "accurate|fast" in help_text and "nifti|dicom-seg" in help_text
    for option, bad in (("--mode", "slow"), ("--output-type", "png"), ("--device", "tpu")):
        result = runner.invoke(app, ["infer", str(scan), "--out", str(tmp_path / "o"), option, bad], env=WIDE)
        assert result.exit_code == 2 and (f"'{bad}' is not one of" in result.output or "is not a device"
                                          in result.output), result.output
    assert not (tmp_path / "o").exists()
    seen = {}
    monkeypatch.setattr(cli_module, "run_inference", lambda **kwargs: seen.update(kwargs) or 0)
    result = runner.invoke(app, ["infer", str(scan), "--out", str(tmp_path / "o"), "--device", "GPU", "--mode", "fast",
                                 "--output-type", "dicom-seg", "-s", "--save-probabilities", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    assert (seen["device"], seen["mode"], seen["output_type"], seen["statistics"]) == ("cuda", "fast", "dicom-seg",
                                                                                        True)
    assert seen["save_probabilities"] == tmp_path / "p"

