"""Predictor and `unetpp3d infer`: geometry round trips, modes, batches, reports, model sources.

Models are tiny (features 4, 8, 16; 32^3 windows) with random weights, except
:class:`ThresholdNet`, a network with a known answer (voxels brighter than the intensity mean),
which lets a test check that the mask lands on the right voxels of the input's grid.
"""

from __future__ import annotations

import csv
import json
import os

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from factories import (
    FEATURES,
    HU_MEAN,
    ThresholdNet,
    make_prep,
    sphere_scan,
    write_image,
)
from factories import write_tiny_checkpoint as save_checkpoint
from torch import nn

from unetpp3d.commands.infer import expand_inputs, run_inference
from unetpp3d.config import Preprocessing
from unetpp3d.errors import UserError
from unetpp3d.inference.model_loading import find_default_model
from unetpp3d.inference.predictor import Predictor
from unetpp3d.inference.windows import ProbabilityNet
from unetpp3d.model.network import UNetPlusPlus3D


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("model") / "best.pt")


@pytest.fixture(scope="module")
def small_scan(tmp_path_factory):
    direction = (0, 1, 0, -1, 0, 0, 0, 0, 1)  # axes permuted and one reversed: exercises Orientationd
    return write_image(tmp_path_factory.mktemp("scans") / "sphere.nii.gz", sphere_scan(), spacing=(1.5, 1.5, 2.0),
                       origin=(12.0, -30.0, 5.0), direction=direction)


def assert_same_grid_as(mask_path, reference: sitk.Image):
    out = sitk.ReadImage(str(mask_path))
    assert out.GetSize() == reference.GetSize()
    np.testing.assert_allclose(out.GetSpacing(), reference.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(out.GetOrigin(), reference.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(out.GetDirection(), reference.GetDirection(), atol=1e-5)
    assert out.GetPixelID() in (sitk.sitkUInt8, sitk.sitkInt16)
    return out


# ---------------------------------------------------------------------------------------------
# Geometry: the mask is on the input's own grid
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", [(3.0, 3.0, 3.0), (2.0, 2.5, 1.5)])
def test_threshold_model_lands_on_the_right_voxels(shared_data, spacing):
    """Through RAS reorientation, resampling, cropping and back (a NIfTI with direction diag(-1, -1, 1))."""
    prep = make_prep("lung_nodule", spacing=spacing, patch=(64, 64, 64))
    predictor = Predictor(ThresholdNet(), prep, device="cpu", overlap=0.0, progress=False, keep_probabilities=True)
    result = predictor.predict(shared_data / "abdomen_ct_ts" / "ct.nii.gz")
    image = np.asarray(result.image_xyz)
    assert result.mask_xyz.shape == image.shape == (122, 101, 30)
    assert result.probabilities.shape == (2, 122, 101, 30)
    expected = image > HU_MEAN
    got = result.probabilities.argmax(0) == 1
    if spacing == (3.0, 3.0, 3.0):  # the scan's own spacing: no interpolation, every voxel agrees
        np.testing.assert_array_equal(got, expected)
        return
    # Resampled there and back, thin vessels blur; but no shift by a voxel matches better.
    score = dice(got, expected)
    assert score > 0.8
    for axis in range(3):
        for step in (-1, 1):
            assert dice(np.roll(got, step, axis=axis), expected) < score - 0.05


def test_infer_writes_mask_on_real_nifti_grid(shared_data, ckpt, tmp_path):
    src = shared_data / "abdomen_ct_ts" / "ct.nii.gz"
    out = tmp_path / "ct_mask.nii.gz"
    assert run_inference([src], out, model=ckpt, device="cpu") == 0
    assert_same_grid_as(out, sitk.ReadImage(str(src)))
    # nibabel sees the same affine as the input (the RAS view of the direction diag(-1, -1, 1))
    ours, theirs = nib.load(str(out)), nib.load(str(src))
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours.affine, theirs.affine, atol=1e-3)
    assert np.issubdtype(np.asanyarray(ours.dataobj).dtype, np.integer)
    assert set(np.unique(np.asanyarray(ours.dataobj))) <= {0, 1}


def test_infer_on_nrrd_and_dicom_keeps_their_grids(shared_data, ckpt, tmp_path):
    from unetpp3d.imageio.readers import read_image

    nrrd = shared_data / "abdomen_ct_3slice_dcmqi" / "liver.nrrd"
    dicom = shared_data / "abdomen_ct_dicom_ts" / "dicom"
    out = tmp_path / "masks"
    assert run_inference([nrrd, dicom], out, model=ckpt, device="cpu", preview=tmp_path / "png") == 0
    assert_same_grid_as(out / "liver.nii.gz", sitk.ReadImage(str(nrrd)))
    # the DICOM folder is named after its parent ("dicom" says nothing) and gets the series' grid
    _, grid = read_image(dicom)
    mask = sitk.ReadImage(str(out / "abdomen_ct_dicom_ts.nii.gz"))
    assert mask.GetSize() == grid.size
    np.testing.assert_allclose(mask.GetSpacing(), grid.spacing, rtol=1e-5)
    np.testing.assert_allclose(mask.GetOrigin(), grid.origin, atol=1e-3)
    np.testing.assert_allclose(mask.GetDirection(), grid.direction, atol=1e-5)
    np.testing.assert_allclose(nib.load(str(out / "abdomen_ct_dicom_ts.nii.gz")).affine, grid.affine_ras(), atol=1e-3)
    for name in ("liver", "abdomen_ct_dicom_ts"):
        assert (tmp_path / "png" / f"{name}.png").is_file()


# ---------------------------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [dict(mode="accurate"), dict(mode="fast"), dict(mode="fast", prune_level=1),
                                     dict(mode="accurate", tta=True)])
def test_modes_run_on_an_input_smaller_than_the_window(ckpt, small_scan, options):
    predictor = Predictor.from_source(ckpt, device="cpu", progress=False, **options)
    assert predictor.prune_level == ({"fast": options.get("prune_level", 2)}.get(options["mode"]))
    result = predictor.predict(small_scan)  # 40x36x24 voxels at 1.5-2 mm -> 8x7x6 at 8 mm: padded
    assert result.mask_xyz.shape == (40, 36, 24) and result.mask_xyz.dtype == np.uint8
    assert result.probabilities is None  # only kept for nodules unless asked
    assert predictor.overlap == 0.25 and predictor.sw_batch_size == 4  # from the checkpoint's config


def test_the_models_infer_settings_are_the_defaults_and_flags_override_them(tmp_path, small_scan, monkeypatch):
    from typer.testing import CliRunner

    from unetpp3d.commands.cli import app

    model = save_checkpoint(tmp_path / "run" / "best.pt", tta=True)
    assert Predictor.from_source(model, device="cpu").tta is True  # configs/lung_nodule.yaml's tta: true counts
    built = []
    from_source = Predictor.from_source.__func__

    def spy(cls, *args, **kwargs):
        built.append(from_source(cls, *args, **kwargs))
        return built[-1]

    monkeypatch.setattr(Predictor, "from_source", classmethod(spy))
    base = ["infer", str(small_scan), "--out", str(tmp_path / "out"), "--model", str(model), "--device", "cpu"]
    for flags, tta in (([], True), (["--no-tta"], False), (["--tta"], True)):
        result = CliRunner().invoke(app, base + flags)
        assert result.exit_code == 0, result.output
        assert built[-1].tta is tta and built[-1].window_net.tta is tta, flags
    fast = save_checkpoint(tmp_path / "fast" / "best.pt", mode="fast", prune_level=1)
    assert CliRunner().invoke(app, [*base[:-4], "--model", str(fast), "--device", "cpu"]).exit_code == 0
    assert (built[-1].mode, built[-1].prune_level) == ("fast", 1)
    assert CliRunner().invoke(app, [*base[:-4], "--model", str(fast), "--device", "cpu", "--mode",
                                    "accurate"]).exit_code == 0
    assert (built[-1].mode, built[-1].prune_level) == ("accurate", None)  # the flag's mode drops the model's level


def test_inference_defaults_have_one_source():
    import inspect

    from unetpp3d.config import InferConfig

    defaults, params = InferConfig(), inspect.signature(Predictor).parameters
    for name in ("mode", "prune_level", "tta", "overlap", "sw_batch_size", "min_component_ml"):
        assert params[name].default == getattr(defaults, name), name
    flags = inspect.signature(run_inference).parameters  # left None: the model's, else InferConfig's
    assert all(flags[name].default is None for name in ("mode", "prune_level", "tta", "overlap", "batch_size"))


def test_library_code_installs_no_log_handler_and_the_cli_shows_the_log(ckpt, small_scan, tmp_path, monkeypatch,
                                                                        capsys):
    import logging

    from unetpp3d.commands.cli import main

    logger = logging.getLogger("unetpp3d")
    monkeypatch.setattr(logger, "propagate", False)  # as in a program whose root logger has no handler
    added = []
    original = logging.Logger.addHandler
    monkeypatch.setattr(logging.Logger, "addHandler", lambda self, h: (added.append(self.name), original(self, h)))
    assert run_inference([small_scan], tmp_path / "a", model=ckpt, device="cpu") == 0
    assert "unetpp3d" not in added and not logger.handlers
    with pytest.raises(SystemExit) as info:
        main(["infer", str(small_scan), "--out", str(tmp_path / "b"), "--model", str(ckpt), "--device", "cpu"])
    assert info.value.code == 0
    assert f"model: {ckpt}" in capsys.readouterr().err  # the console log, set up by the command line
    assert not logger.handlers  # and taken down again


def test_mode_settings_are_checked(ckpt):
    with pytest.raises(UserError, match="depth 2"):
        Predictor.from_source(ckpt, device="cpu", mode="fast", prune_level=3)
    with pytest.raises(UserError, match="--mode fast"):
        Predictor.from_source(ckpt, device="cpu", mode="accurate", prune_level=1)
    with pytest.raises(UserError, match="accurate or fast"):
        Predictor.from_source(ckpt, device="cpu", mode="quick")
    with pytest.raises(UserError, match="overlap"):
        Predictor.from_source(ckpt, device="cpu", overlap=1.0)


def test_tta_averages_probabilities_over_all_flips():
    torch.manual_seed(0)
    net = nn.Conv3d(1, 3, kernel_size=3, padding=1).eval()
    x = torch.randn(1, 1, 8, 6, 4)
    got = ProbabilityNet(net, tta=True)(x)
    flips = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
    expected = sum(torch.softmax(net(x.flip(d)), 1).flip(d) if d else torch.softmax(net(x), 1) for d in flips) / 8
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got.sum(1), torch.ones(1, 8, 6, 4))


def test_window_nets_sharing_a_network_keep_their_own_level():
    """A fast (L^1) and an accurate wrapper on one network each give their own output, whichever
    was built last: the level goes with each call and the network is left as it was."""
    torch.manual_seed(0)
    net = UNetPlusPlus3D(in_channels=1, out_channels=2, features=FEATURES).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        want_fast = torch.softmax(net(x, prune_level=1), 1)
        want_accurate = torch.softmax(net(x), 1)
        for order in ("fast first", "accurate first"):
            if order == "fast first":
                fast, accurate = ProbabilityNet(net, prune_level=1), ProbabilityNet(net)
            else:
                accurate, fast = ProbabilityNet(net), ProbabilityNet(net, prune_level=1)
            torch.testing.assert_close(fast(x), want_fast, msg=order)
            torch.testing.assert_close(accurate(x), want_accurate, msg=order)
    assert not torch.allclose(want_fast, want_accurate)  # the two modes do differ
    assert not hasattr(net, "prune_level")
    with pytest.raises(ValueError, match="takes no prune_level"):
        ProbabilityNet(ThresholdNet(), prune_level=1)


def test_accurate_mode_can_combine_heads_as_logits(ckpt, small_scan):
    """The paper's average of probabilities by default; the old mean of logits on request."""
    probs = Predictor.from_source(ckpt, device="cpu", progress=False, keep_probabilities=True)
    logits = Predictor.from_source(ckpt, device="cpu", progress=False, keep_probabilities=True, combine="logits")
    assert probs.combine == "probabilities" and "as logits" in logits.describe()
    a, b = probs.predict(small_scan).probabilities, logits.predict(small_scan).probabilities
    assert a.shape == b.shape and not np.allclose(a, b)


def test_a_window_with_a_single_voxel_bottleneck_is_refused_when_the_predictor_is_built():
    net = UNetPlusPlus3D(in_channels=1, out_channels=2, features=FEATURES)  # size divisor 4
    with pytest.raises(UserError, match=r"windows of 4x4x4 voxels.*single voxel"):
        Predictor(net, make_prep(patch=(4, 4, 4)), device="cpu")
    Predictor(net, make_prep(patch=(8, 4, 4)), device="cpu")


def test_window_is_rounded_up_to_the_size_divisor():
    net = UNetPlusPlus3D(features=FEATURES, strides=[2, (2, 2, 1)])
    predictor = Predictor(net, make_prep(patch=(30, 33, 17)), device="cpu")
    assert predictor.roi_size == (32, 36, 18)


def test_large_output_is_stitched_on_the_cpu(monkeypatch):
    predictor = Predictor(ThresholdNet(), make_prep(), device="cpu")
    predictor.device = torch.device("cuda")  # pretend; only the decision is exercised
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * 1024**3, 80 * 1024**3))
    where, why = predictor._stitch_device([(512, 512, 600)])
    assert where.type == "cpu" and "on the CPU" in why and "GiB" in why
    where, _ = predictor._stitch_device([(128, 128, 64)])
    assert where.type == "cuda"


def test_windows_out_of_gpu_memory_retry_with_the_output_on_the_cpu(ckpt, small_scan, monkeypatch, caplog):
    """The GPU held the output but the windows then ran out of memory: the case is redone with the
    output on the CPU, not lost. (No GPU here: the decision and the failure are simulated.)"""
    predictor = Predictor.from_source(ckpt, device="cpu", progress=False)
    expected = predictor.predict(small_scan).mask_xyz
    real_inferer = predictor.inferer
    asked = []

    def inferer(stitch_device=None):
        asked.append(torch.device(stitch_device).type)
        if asked[-1] == "cuda":
            def out_of_memory(*args):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return out_of_memory
        return real_inferer(stitch_device)

    monkeypatch.setattr(predictor, "_stitch_device", lambda shapes: (torch.device("cuda"), "on cuda (pretend)"))
    monkeypatch.setattr(predictor, "inferer", inferer)
    with caplog.at_level("WARNING", logger="unetpp3d"):
        result = predictor.predict(small_scan)
    assert asked == ["cuda", "cpu"] and result.info["stitch"] == "cpu"
    assert "out of GPU memory" in caplog.text
    np.testing.assert_array_equal(result.mask_xyz, expected)


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


def test_batch_continues_past_a_broken_input(ckpt, small_scan, tmp_path, capsys):
    broken = tmp_path / "in" / "broken.nii.gz"
    broken.parent.mkdir()
    broken.write_bytes(b"\x1f\x8b not really a gzip file")
    missing = tmp_path / "in" / "missing.nii.gz"
    out = tmp_path / "out"
    code = run_inference([small_scan, broken, missing], out, model=ckpt, device="cpu")
    assert code == 2  # an unreadable and a missing input: problems the user can fix (errors.exit_status)
    printed = capsys.readouterr().out
    assert "1 segmented, 0 skipped, 2 failed" in printed
    assert "broken" in printed and "missing" in printed and "no such file" in printed
    assert "broken.nii.gz: cannot read" in printed and "LoadImage" not in printed  # our message, not MONAI's
    assert sorted(p.name for p in out.iterdir()) == ["sphere.nii.gz"]  # nothing partial, no temporaries

    # again with --skip-existing: the finished case is left alone
    stamp = (out / "sphere.nii.gz").stat().st_mtime_ns
    assert run_inference([small_scan, broken], out, model=ckpt, device="cpu", skip_existing=True) == 2
    assert "0 segmented, 1 skipped, 1 failed" in capsys.readouterr().out
    assert (out / "sphere.nii.gz").stat().st_mtime_ns == stamp
    assert run_inference([small_scan], out, model=ckpt, device="cpu", skip_existing=True) == 0


def test_a_volume_far_outside_the_training_range_is_warned_about(small_scan, tmp_path, capsys, caplog):
    """Segmented all the same; the log and the summary's note say the volume is implausible."""
    model = save_checkpoint(tmp_path / "ranged" / "best.pt", all_foreground=True,
                            volume_range_ml={"1": [1000.0, 2000.0]})
    assert run_inference([small_scan], tmp_path / "out", model=model, device="cpu") == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("sphere"))
    assert "warning: predicted liver volume" in row and "far outside the training set's 1000-2000 mL" in row
    assert "predicted liver volume" in caplog.text
    assert (tmp_path / "out" / "sphere.nii.gz").is_file()

    # A checkpoint from before runs recorded the range: loads, segments the same, warns about nothing.
    caplog.clear()
    old = save_checkpoint(tmp_path / "old" / "best.pt", all_foreground=True)
    payload = torch.load(old, weights_only=True)
    del payload["preprocessing"]["volume_range_ml"]  # the key did not exist then
    torch.save(payload, old)
    assert run_inference([small_scan], tmp_path / "out_old", model=old, device="cpu") == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("sphere"))
    assert "warning" not in row and "training set" not in caplog.text


def test_a_crop_trained_model_on_a_larger_scan_says_so(small_scan, tmp_path, capsys, caplog):
    """The issue's case: a model that saw only small crops, run on a whole scan, warns and names --points."""
    model = save_checkpoint(tmp_path / "crops" / "best.pt", field_of_view_mm=[10.0, 10.0, 10.0])
    assert run_inference([small_scan], tmp_path / "out", model=model, device="cpu") == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("sphere"))
    assert "warning: the model was trained on cases of at most 10 x 10 x 10 mm" in row and "--points" in row
    assert "never saw most of this anatomy" in caplog.text
    caplog.clear()
    wide = save_checkpoint(tmp_path / "wide" / "best.pt", field_of_view_mm=[500.0, 500.0, 500.0])
    assert run_inference([small_scan], tmp_path / "out_wide", model=wide, device="cpu") == 0
    assert "never saw" not in caplog.text


def test_an_ensembles_warnings_hold_for_every_member_whatever_their_order(small_scan, tmp_path, caplog):
    """Folds record different fields of view and volume ranges: the widest of them is judged, and a
    member that records none (an older model) leaves the scan unjudged."""
    from unetpp3d.inference.model_loading import ensemble_training_data

    small = save_checkpoint(tmp_path / "small" / "best.pt", field_of_view_mm=[10.0, 10.0, 10.0])
    wide = save_checkpoint(tmp_path / "wide" / "best.pt", seed=1, field_of_view_mm=[500.0, 500.0, 500.0])
    for k, order in enumerate(([small, wide], [wide, small])):
        caplog.clear()
        assert run_inference([small_scan], tmp_path / f"out{k}", model=order, device="cpu") == 0
        assert "never saw" not in caplog.text
    caplog.clear()
    other = save_checkpoint(tmp_path / "other" / "best.pt", seed=2, field_of_view_mm=[12.0, 11.0, 10.0])
    assert run_inference([small_scan], tmp_path / "both_small", model=[other, small], device="cpu") == 0
    assert "at most 12 x 11 x 10 mm" in caplog.text
    merged = ensemble_training_data([{"volume_range_ml": {"1": [10, 20]}, "field_of_view_mm": [1, 2, 3]},
                                     {"volume_range_ml": {"1": [5, 15], "2": [1, 2]}, "field_of_view_mm": [3, 2, 1]}])
    assert merged == {"volume_range_ml": {"1": [5, 20], "2": [1, 2]}, "field_of_view_mm": [3, 2, 3]}
    assert ensemble_training_data([{"field_of_view_mm": [1, 2, 3]}, {}]) == {"volume_range_ml": None,
                                                                            "field_of_view_mm": None}


def test_a_stored_field_of_view_is_checked_when_read():
    data = make_prep().to_dict()
    for bad in (["a", "b", "c"], [0, 0, 0], [30.0, 30.0]):
        with pytest.raises(UserError, match=r"preprocessing\.field_of_view_mm"):
            Preprocessing.from_dict({**data, "field_of_view_mm": bad})


def test_a_stored_volume_range_is_checked_when_read():
    data = make_prep().to_dict()
    assert Preprocessing.from_dict({**data, "volume_range_ml": {"1": [10, 20.5]}}).volume_range_ml == {"1": [10, 20.5]}
    with pytest.raises(UserError, match=r"preprocessing\.volume_range_ml: "):
        Preprocessing.from_dict({**data, "volume_range_ml": {"1": "big"}})


def test_inputs_folders_and_manifests(tmp_path, small_scan):
    from unetpp3d.data.manifest import write_manifest

    folder = tmp_path / "scans"
    write_image(folder / "a.nii.gz", np.zeros((4, 4, 4), np.int16))
    write_image(folder / "b.nrrd", np.zeros((4, 4, 4), np.int16))
    (folder / "notes.txt").write_text("not a scan")
    cases = expand_inputs([folder])
    assert [c.name for c in cases] == ["a", "b"]
    # duplicate names get their folder as a prefix
    write_image(tmp_path / "other" / "a.nii.gz", np.zeros((4, 4, 4), np.int16))
    names = [c.name for c in expand_inputs([folder / "a.nii.gz", tmp_path / "other" / "a.nii.gz"])]
    assert names == ["scans_a", "other_a"]
    # a manifest gives its test list (here: none, so its training images)
    label = write_image(tmp_path / "labels" / "a.nii.gz", np.zeros((4, 4, 4), np.uint8))
    manifest = write_manifest(tmp_path / "m.json", [(folder / "a.nii.gz", label)],
                              labels={0: "background", 1: "liver"}, task="liver")
    assert [c.name for c in expand_inputs([manifest])] == ["a"]
    with pytest.raises(UserError):
        expand_inputs([])


def test_output_names_are_checked(ckpt, small_scan, tmp_path):
    with pytest.raises(UserError, match="need a folder"):
        run_inference([small_scan, small_scan], tmp_path / "one.nii.gz", model=ckpt, device="cpu")
    with pytest.raises(UserError, match="need a folder"):
        run_inference([small_scan, small_scan], tmp_path / "o", model=ckpt, device="cpu", preview=tmp_path / "p.png")


# ---------------------------------------------------------------------------------------------
# Lung nodules: report and preview
# ---------------------------------------------------------------------------------------------


def test_nodule_found_measured_and_reported(tmp_path):
    spacing, origin = (1.5, 1.5, 2.0), (12.0, -30.0, 5.0)
    scan = write_image(tmp_path / "chest.nii.gz", sphere_scan(), spacing=spacing, origin=origin)
    predictor = Predictor(ThresholdNet(), make_prep("lung_nodule", spacing=(1.5, 1.5, 2.0)), device="cpu",
                          progress=False)
    result = predictor.predict(scan)
    (nodule,) = result.nodules
    # centre index (20, 15, 12), identity direction: LPS = origin + index * spacing
    np.testing.assert_allclose(nodule.centre_lps_mm, (12 + 20 * 1.5, -30 + 15 * 1.5, 5 + 12 * 2.0), atol=0.2)
    assert nodule.volume_ml == pytest.approx(4 / 3 * np.pi * 8.0**3 / 1000, rel=0.15)
    assert 14.0 <= nodule.longest_diameter_mm <= 17.0
    assert nodule.mean_probability > 0.9


def test_infer_writes_nodule_report_and_preview(tmp_path, small_scan):
    model = save_checkpoint(tmp_path / "run" / "best.pt", task="lung_nodule")
    out = tmp_path / "out" / "sphere.nii.gz"
    assert run_inference([small_scan], out, model=tmp_path / "run", device="cpu", preview=tmp_path / "p.png",
                         tta=False) == 0
    report = json.loads((tmp_path / "out" / "sphere.nodules.json").read_text())
    assert report["coordinate_system"] == "LPS" and report["count"] == len(report["nodules"])
    for entry in report["nodules"]:
        assert {"centre_lps_mm", "volume_ml", "longest_diameter_mm", "mean_probability"} <= set(entry)
    with open(tmp_path / "out" / "sphere.nodules.csv") as fh:
        header = next(csv.reader(fh))
    assert header[:4] == ["id", "label", "voxels", "volume_ml"] and "longest_diameter_mm" in header
    pixels = mpimg.imread(tmp_path / "p.png")[..., :3]
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10
    assert model.is_file()


# ---------------------------------------------------------------------------------------------
# Where the model comes from
# ---------------------------------------------------------------------------------------------


def test_default_model_is_the_newest_run_and_is_named(tmp_path, monkeypatch, small_scan, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("UNETPP3D_MODEL", str(tmp_path / "ignored.pt"))  # no side channel: the variable means nothing
    with pytest.raises(UserError, match="unetpp3d train"):
        find_default_model()
    old = save_checkpoint(tmp_path / "runs" / "old" / "last.pt")
    new = save_checkpoint(tmp_path / "runs" / "new" / "best.pt")
    os.utime(old, (1, 1))
    assert find_default_model() == (tmp_path / "runs" / "new").resolve()
    assert Predictor.from_source(None, device="cpu").source == str(new.resolve())
    # `infer` without --model says which model it took
    assert run_inference([small_scan], tmp_path / "out", device="cpu") == 0
    assert f"no --model given: using the newest run, {new.resolve()}" in capsys.readouterr().out


def write_bundle(folder, payload, ours: bool, inference: dict | None = None):
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    meta = {"version": "0.1.0", "name": "test"}
    if ours:
        from unetpp3d.inference.model_loading import bundle_metadata

        meta["unetpp3d"] = bundle_metadata(payload)
    (folder / "configs" / "metadata.json").write_text(json.dumps(meta))
    if inference is not None:
        (folder / "configs" / "inference.json").write_text(json.dumps(inference))
    torch.save(payload["state_dict"], folder / "models" / "model.pt")


def test_bundle_sources(ckpt, tmp_path, small_scan):
    payload = torch.load(ckpt, weights_only=True)
    write_bundle(tmp_path / "ours", payload, ours=True)
    from_bundle = Predictor.from_source(tmp_path / "ours", device="cpu", progress=False)
    from_ckpt = Predictor.from_source(ckpt, device="cpu", progress=False)
    np.testing.assert_array_equal(from_bundle.predict(small_scan).mask_xyz, from_ckpt.predict(small_scan).mask_xyz)

    # a foreign bundle is refused unless trusted; trusted, its network_def is built by ConfigParser
    inference = {"network_def": {"_target_": "unetpp3d.model.network.UNetPlusPlus3D", **payload["model_args"]},
                 "preprocessing": payload["preprocessing"]}
    write_bundle(tmp_path / "foreign", payload, ours=False, inference=inference)
    with pytest.raises(UserError, match="--trust-bundle"):
        Predictor.from_source(tmp_path / "foreign", device="cpu")
    trusted = Predictor.from_source(tmp_path / "foreign", device="cpu", trust_bundle=True)
    assert isinstance(trusted.network, UNetPlusPlus3D)


def test_a_format_1_bundle_still_loads_and_a_newer_one_is_refused(ckpt, tmp_path, small_scan):
    """Bundles exported before the layout by stage (format 1) are read as data, as before."""
    payload = torch.load(ckpt, weights_only=True)
    folder = tmp_path / "old"
    write_bundle(folder, payload, ours=True)
    meta = json.loads((folder / "configs" / "metadata.json").read_text())
    meta["unetpp3d"] = {"format": 1, "model_args": payload["model_args"],
                        "preprocessing": payload["preprocessing"], "config": payload["config"]}
    (folder / "configs" / "metadata.json").write_text(json.dumps(meta))
    # what a format-1 export wrote: components under their old, flat module names
    (folder / "configs" / "inference.json").write_text(json.dumps(
        {"network_def": {"_target_": "unetpp3d.network.UNetPlusPlus3D", **payload["model_args"]}}))
    old = Predictor.from_source(folder, device="cpu", progress=False)
    new = Predictor.from_source(ckpt, device="cpu", progress=False)
    np.testing.assert_array_equal(old.predict(small_scan).mask_xyz, new.predict(small_scan).mask_xyz)
    meta["unetpp3d"]["format"] = 3
    (folder / "configs" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="format 3 is newer"):
        Predictor.from_source(folder, device="cpu")


def test_cli_infer_reports_failures_with_its_exit_code(ckpt, small_scan, tmp_path):
    from typer.testing import CliRunner

    from unetpp3d.commands.cli import app

    args = ["infer", str(small_scan), str(tmp_path / "missing.nii.gz"), "--out", str(tmp_path / "out"),
            "--model", str(ckpt), "--device", "cpu", "--mode", "fast", "--prune-level", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output  # a missing input, in a batch too
    assert "1 segmented, 0 skipped, 1 failed" in result.output
    assert (tmp_path / "out" / "sphere.nii.gz").is_file()


@pytest.mark.parametrize("task", ["liver", "lung_nodule"])
def test_monai_components_alone_reproduce_the_mask(tmp_path, small_scan, task):
    """The predictor's pipeline specs, built by MONAI's ConfigParser alone, give the predictor's voxels."""
    from monai.bundle import ConfigParser

    model = save_checkpoint(tmp_path / "best.pt", task=task)
    predictor = Predictor.from_source(model, device="cpu", mode="fast", progress=False)
    expected = predictor.predict(small_scan).mask_xyz
    assert 0 < np.count_nonzero(expected) < expected.size  # a mask with something to get wrong

    parser = ConfigParser(json.loads(json.dumps(predictor.pipeline_config)))  # plain JSON, as a bundle holds it
    preprocessing, post = parser.get_parsed_content("preprocessing"), parser.get_parsed_content("postprocessing")
    data = preprocessing({"image": str(small_scan)})
    network = ProbabilityNet(UNetPlusPlus3D.from_checkpoint(torch.load(model, weights_only=True)), prune_level=2,
                             amp=True)  # as the predictor (and a bundle) run it by default
    with torch.no_grad():
        data["pred"] = predictor.inferer("cpu")(data["image"][None], network.eval())[0]
    got = np.asarray(post(data)["pred"][0]).astype(np.uint8)
    np.testing.assert_array_equal(got, expected)
