"""`unetpp3d export-bundle`: a MONAI Bundle that MONAI runs alone and that agrees with `unetpp3d infer`.

One tiny model (features 4, 8, 16; 32^3 windows, random weights) is exported once per module;
one small scan with a permuted, flipped direction goes through `unetpp3d infer`, through the
bundle via MONAI's API in-process, and through `python -m monai.bundle run` in a subprocess.
"""

from __future__ import annotations

import csv
import json
import math
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from factories import ONE_THREAD, make_prep, tiny_payload, write_image
from factories import sphere_scan as factory_sphere_scan

import unetpp3d
from unetpp3d.bundle import check_unetpp3d
from unetpp3d.bundle.components import scan_datalist
from unetpp3d.bundle.configs import (
    LOG_PROB_MIN,
    inference_config,
    meta_schema_path,
    verify_metadata,
)
from unetpp3d.bundle.export import export_bundle
from unetpp3d.commands.infer import run_inference
from unetpp3d.data.transforms import preprocess_transforms, preprocessing_specs
from unetpp3d.errors import UserError
from unetpp3d.inference.model_loading import bundle_metadata
from unetpp3d.inference.pipeline import inferer_args, window_network_args
from unetpp3d.inference.predictor import Predictor
from unetpp3d.model.checkpoint import save_checkpoint
from unetpp3d.model.network import UNetPlusPlus3D

FEATURES = (4, 8, 16)
AGREEMENT = 0.999  # share of voxels on which the bundle and `unetpp3d infer` must agree


def make_payload(task: str = "liver", **infer) -> dict:
    """The factory's tiny checkpoint with 1.5 mm voxels, a nodule size filter and a run's bookkeeping."""
    payload = tiny_payload(task, prep=make_prep(task, spacing=(1.5, 1.5, 1.5)), epoch=7,
                           **{"min_component_ml": 0.01, **infer})
    payload.update(best_metric=0.8125, split={"fold": 0, "training": ["a", "b", "c"], "validation": ["d"]})
    return payload


def sphere_scan(**kwargs) -> np.ndarray:
    return factory_sphere_scan(**{"radius_mm": 10.0, "air_rows": 3, **kwargs})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    save_checkpoint(folder / "best.pt", make_payload())
    (folder / "metrics.csv").write_text("epoch,train_loss,val_dice,lr,seconds,dice_liver\n"
                                        "5,0.9,0.75,0.01,1.0,0.75\n6,0.8,,0.01,1.0,\n7,0.7,0.8125,0.01,1.0,0.8125\n")
    return folder


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scans")
    write_image(folder / "sphere.nii.gz", sphere_scan(), spacing=(1.5, 1.5, 2.0), origin=(12.0, -30.0, 5.0),
                direction=(0, 1, 0, -1, 0, 0, 0, 0, 1))  # axes permuted, one reversed: exercises Orientationd
    return folder


@pytest.fixture(scope="module")
def bundle(run_dir, tmp_path_factory):
    return export_bundle(model=run_dir, out=tmp_path_factory.mktemp("export") / "liver_bundle")


@pytest.fixture(scope="module")
def infer_masks(run_dir, scans, tmp_path_factory):
    """What `unetpp3d infer SCANS --model RUN` writes."""
    out = tmp_path_factory.mktemp("infer")
    assert run_inference([scans], out, model=run_dir, device="cpu") == 0
    return out


def read_xyz(path) -> tuple[np.ndarray, sitk.Image]:
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0), image


def assert_agrees_with_infer(out_dir, infer_dir, scans, exact: bool = False) -> None:
    got, got_img = read_xyz(out_dir / "sphere.nii.gz")
    want, _ = read_xyz(infer_dir / "sphere.nii.gz")
    scan = sitk.ReadImage(str(scans / "sphere.nii.gz"))
    assert got_img.GetSize() == scan.GetSize()
    np.testing.assert_allclose(got_img.GetSpacing(), scan.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(got_img.GetOrigin(), scan.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(got_img.GetDirection(), scan.GetDirection(), atol=1e-6)
    assert 0 < np.count_nonzero(want) < want.size  # a mask with something to get wrong
    if exact:
        np.testing.assert_array_equal(got, want)
    else:
        assert np.mean(got == want) >= AGREEMENT


# ---------------------------------------------------------------------------------------------
# What the export writes
# ---------------------------------------------------------------------------------------------


def test_layout_metadata_and_docs(bundle, run_dir):
    for rel in ("configs/metadata.json", "configs/inference.json", "configs/train.json", "configs/evaluate.json",
                "configs/multi_gpu_train.json", "configs/logging.conf", "models/model.pt", "models/model.ts",
                "scripts/check_unetpp3d.py", "docs/README.md", "docs/license.txt", "LICENSE"):
        assert (bundle / rel).is_file(), rel
    assert not list(bundle.parent.glob(".*.part"))  # the staging folder is gone

    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    for key in ("version", "changelog", "monai_version", "pytorch_version", "numpy_version", "task", "description",
                "authors", "copyright", "intended_use", "network_data_format"):
        assert meta[key], key
    # the oldest unetpp3d the bundle's check accepts: the one that exported it
    assert meta["required_packages_version"]["unetpp3d"] == unetpp3d.__version__
    assert "not a medical device" in meta["intended_use"]
    image = meta["network_data_format"]["inputs"]["image"]
    assert (image["modality"], image["format"], image["num_channels"]) == ("CT", "hounsfield", 1)
    assert image["spatial_shape"] == [32, 32, 32] and image["is_patch_data"] is True
    output = meta["network_data_format"]["outputs"]["pred"]
    assert output["channel_def"] == {"0": "background", "1": "liver"}
    assert output["format"] == "labels" and output["value_range"] == [LOG_PROB_MIN, 0.0]  # log-probabilities
    written = meta["network_data_format"]["post_processed_outputs"]["pred"]
    assert (written["num_channels"], written["dtype"], written["value_range"]) == (1, "uint8", [0, 1])
    assert meta["eval_metrics"] == {"mean_dice": 0.8125}
    # the section `unetpp3d infer` reads as plain data is exactly the predictor's own
    payload = torch.load(run_dir / "best.pt", weights_only=True)
    assert meta["unetpp3d"] == json.loads(json.dumps(bundle_metadata(payload)))
    assert meta["unetpp3d"]["format"] == 2  # the component paths of inference.json changed with the layout
    weights = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(weights[k], v) for k, v in payload["state_dict"].items())

    readme = (bundle / "docs" / "README.md").read_text()
    for text in ("liver", "epoch 7", "0.8125", "3 training, 1 validation", "Research use only",
                 "python -m monai.bundle run", "| 7 | 0.8125 | 0.8125 |", "configs/train.json",
                 check_unetpp3d.install_command(unetpp3d.__version__), "docs/license.txt"):
        assert text in readme, text
    assert "https://www.apache.org/licenses/LICENSE-2.0" in (bundle / "docs" / "license.txt").read_text()
    assert (bundle / "LICENSE").read_text() == (bundle / "docs" / "license.txt").read_text()
    assert (bundle / "scripts" / "check_unetpp3d.py").read_bytes() == Path(check_unetpp3d.__file__).read_bytes()


def test_inference_json_is_components_not_code(bundle):
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    expressions = []

    def walk(node):
        if isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, str) and node.startswith("$"):
            expressions.append(node)

    walk(config)
    # runpy's import, device, two default folders, weights path, the unetpp3d check, seeding, run
    assert len(expressions) <= 8, expressions
    assert config["run"] == ["$@evaluator.run()"]
    assert config["network_def"]["_target_"] == "unetpp3d.model.network.UNetPlusPlus3D"
    # the model's own infer settings
    assert config["inferer"]["overlap"] == 0.25 and config["inferer"]["sw_batch_size"] == 4


def test_config_parser_builds_the_trained_network(bundle, run_dir):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser["bundle_root"] = str(bundle)
    parser["device"] = "cpu"
    net = parser.get_parsed_content("network")
    assert isinstance(net, UNetPlusPlus3D) and not net.training
    payload = torch.load(run_dir / "best.pt", weights_only=True)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in payload["state_dict"].items())


def test_verify_net_in_out(bundle):
    from monai.bundle import verify_net_in_out

    verify_net_in_out(net_id="network_def", meta_file=str(bundle / "configs" / "metadata.json"),
                      config_file=str(bundle / "configs" / "inference.json"), device="cpu")


# Fields MONAI's official schema (meta_schema_20240725.json) requires, at the top level and of each
# tensor, with the JSON types it gives them. Written from the schema as published; the schema file
# itself is not part of this repository.
OFFICIAL_REQUIRED = {"schema": str, "version": str, "monai_version": str, "pytorch_version": str,
                     "numpy_version": str, "required_packages_version": dict, "task": str, "description": str,
                     "authors": str, "copyright": str, "network_data_format": dict}
OFFICIAL_TENSOR_REQUIRED = {"type": str, "format": str, "num_channels": int, "spatial_shape": list, "dtype": str,
                            "value_range": list}


def test_metadata_has_what_monais_official_schema_requires(bundle):
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    for key, kind in OFFICIAL_REQUIRED.items():
        assert isinstance(meta[key], kind), key
    assert meta["schema"].endswith("meta_schema_20240725.json")
    fmt = meta["network_data_format"]
    for group in ("inputs", "outputs", "post_processed_outputs"):
        for tensor in fmt[group].values():
            for key, kind in OFFICIAL_TENSOR_REQUIRED.items():
                assert isinstance(tensor[key], kind), (group, key)
            assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in tensor["value_range"])
            assert len(tensor["value_range"]) == 2


def test_verify_metadata_offline_against_our_schema(bundle, tmp_path):
    # monai.bundle.verify_metadata validates with jsonschema (the [bundle] extra).
    pytest.importorskip("jsonschema", reason="jsonschema is not installed (pip install 'unetpp3d[bundle]'); "
                                             "verify_metadata cannot validate without it")
    ours = json.loads(meta_schema_path().read_text())
    assert "not MONAI's official" in ours["description"]
    assert set(OFFICIAL_REQUIRED) <= set(ours["required"])  # ours asks for at least what the official one does
    verify_metadata(bundle)
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    broken = tmp_path / "broken"
    (broken / "configs").mkdir(parents=True)
    for path, key in ((("network_data_format", "inputs", "image"), "num_channels"), ((), "required_packages_version")):
        changed = json.loads(json.dumps(meta))
        node = changed
        for k in path:
            node = node[k]
        del node[key]
        (broken / "configs" / "metadata.json").write_text(json.dumps(changed))
        with pytest.raises(ValueError, match=key):
            verify_metadata(broken)


OFFICIAL_SCHEMA = os.environ.get("UNETPP3D_MONAI_META_SCHEMA")


@pytest.mark.skipif(not OFFICIAL_SCHEMA, reason="UNETPP3D_MONAI_META_SCHEMA does not name a local copy of MONAI's "
                                                "meta_schema_20240725.json (not shipped with unetpp3d)")
def test_verify_metadata_against_monais_official_schema(bundle, tmp_path):
    pytest.importorskip("jsonschema", reason="jsonschema is not installed (pip install 'unetpp3d[bundle]')")
    schema = json.loads(Path(OFFICIAL_SCHEMA).read_text())
    assert set(schema["required"]) == set(OFFICIAL_REQUIRED)  # the file is the schema this test was written from
    verify_metadata(bundle, schema=OFFICIAL_SCHEMA)
    broken = tmp_path / "broken"
    (broken / "configs").mkdir(parents=True)
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    meta["network_data_format"]["outputs"]["pred"]["value_range"] = ["low", "high"]
    (broken / "configs" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="Failed validating"):
        verify_metadata(broken, schema=OFFICIAL_SCHEMA)


def test_torchscript_holds_no_cpu_only_op(bundle):
    """The graph of every method of the saved file, inlined: no oneDNN (mkldnn) operator, which
    the fused path calls on the CPU and which fails on a GPU."""
    scripted = torch.jit.load(str(bundle / "models" / "model.ts"))
    methods = scripted._c._method_names()
    kinds = {node.kind() for name in methods for node in getattr(scripted, name).inlined_graph.nodes()}
    assert "aten::_convolution" in kinds  # the graph was read
    assert not [k for k in kinds if "mkldnn" in k.lower()], sorted(kinds)
    assert {"forward", "fast_l1", "fast_l2"} <= set(methods)  # every mode was checked


def test_torchscript_gives_the_eager_output_of_every_mode_at_any_size(bundle, run_dir):
    from monai.data import load_net_with_metadata

    scripted, meta, extra = load_net_with_metadata(str(bundle / "models" / "model.ts"),
                                                   more_extra_files=("inference.json",))
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 1
    assert json.loads(extra["inference.json"])["run"] == ["$@evaluator.run()"]
    eager = UNetPlusPlus3D.from_checkpoint(torch.load(run_dir / "best.pt", weights_only=True)).eval()
    torch.manual_seed(1)
    # The window, and another multiple of the divisor in every axis and the batch.
    for shape in ((1, 1, 32, 32, 32), (2, 1, 16, 24, 40)):
        x = torch.randn(shape)
        for level, method in ((None, scripted.forward), (1, scripted.fast_l1), (2, scripted.fast_l2)):
            with torch.no_grad():  # accurate mode: the log of the heads' mean probability, as infer combines them
                torch.testing.assert_close(method(x), eager(x, prune_level=level), rtol=1e-4, atol=1e-4)
    readme = (bundle / "docs" / "README.md").read_text()
    assert "`model.fast_l2(x)`" in readme and "no CPU-only operator" in readme
    assert "the log of the mean of the 2 heads' softmax probabilities" in readme


# ---------------------------------------------------------------------------------------------
# Running it: MONAI alone, and `unetpp3d infer --model BUNDLE`
# ---------------------------------------------------------------------------------------------


def test_monai_workflow_in_process_agrees_with_infer(bundle, scans, infer_masks, tmp_path):
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(config_file=str(bundle / "configs" / "inference.json"), workflow_type="infer",
                              logging_file=False, bundle_root=str(bundle), dataset_dir=str(scans),
                              output_dir=str(tmp_path / "masks"), device="cpu")
    workflow.initialize()
    assert workflow.check_properties() == []  # every property MONAI requires of an inference bundle
    workflow.run()
    workflow.finalize()
    assert_agrees_with_infer(tmp_path / "masks", infer_masks, scans)


def test_python_m_monai_bundle_run_agrees_with_infer(bundle, scans, infer_masks, tmp_path):
    out = tmp_path / "masks"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
           "--bundle_root", str(bundle), "--dataset_dir", str(scans), "--output_dir", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "wrote" in result.stdout  # configs/logging.conf puts the cases on the console
    assert_agrees_with_infer(out, infer_masks, scans)


def test_infer_accepts_the_bundle_folder(bundle, scans, infer_masks, tmp_path):
    assert run_inference([scans], tmp_path, model=bundle, device="cpu") == 0
    assert_agrees_with_infer(tmp_path, infer_masks, scans, exact=True)


def test_empty_dataset_dir_is_a_clear_error(bundle, tmp_path):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["dataset_dir"] = str(tmp_path)
    with pytest.raises(RuntimeError) as info:  # MONAI wraps what a component raises
        parser.get_parsed_content("datalist")
    assert isinstance(info.value.__cause__, UserError) and "--dataset_dir" in str(info.value.__cause__)


# ---------------------------------------------------------------------------------------------
# Other tasks, bad exports, and one pipeline for the bundle and `unetpp3d infer`
# ---------------------------------------------------------------------------------------------


def test_lung_nodule_bundle_lists_its_component_filter(tmp_path):
    save_checkpoint(tmp_path / "nodule.pt", make_payload("lung_nodule"))
    out = export_bundle(tmp_path / "nodule.pt", tmp_path / "b")
    post = json.loads((out / "configs" / "inference.json").read_text())["postprocessing"]["transforms"]
    assert {"_target_": "unetpp3d.inference.postprocess.RemoveSmallComponentsd", "keys": "pred", "min_ml": 0.01,
            "labels": [1]} in post
    targets = [t["_target_"] for t in post]
    # the probabilities are copied before the argmax, for the report written before the mask
    assert targets.index("CopyItemsd") < targets.index("AsDiscreted")
    assert targets[-2:] == ["unetpp3d.bundle.components.NoduleReportd", "SaveImaged"]


def test_lung_nodule_bundle_writes_the_reports_infer_writes(scans, tmp_path):
    save_checkpoint(tmp_path / "nodule.pt", make_payload("lung_nodule"))
    bundle = export_bundle(tmp_path / "nodule.pt", tmp_path / "bundle")
    assert run_inference([scans], tmp_path / "infer", model=tmp_path / "nodule.pt", device="cpu") == 0
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(config_file=str(bundle / "configs" / "inference.json"), workflow_type="infer",
                              logging_file=False, bundle_root=str(bundle), dataset_dir=str(scans),
                              output_dir=str(tmp_path / "bundle_out"), device="cpu")
    workflow.initialize()
    workflow.run()
    want = json.loads((tmp_path / "infer" / "sphere.nodules.json").read_text())
    got = json.loads((tmp_path / "bundle_out" / "sphere.nodules.json").read_text())
    assert want["count"] > 0  # a report with something in it
    # The bundle's window network returns the heads' averaged probabilities only, so its report
    # has no head-disagreement quality signal (null); everything measured is infer's.
    assert got.pop("head_disagreement") is None and want.pop("head_disagreement") is not None
    for nodules in (got["nodules"], want["nodules"]):
        for nodule in nodules:
            nodule.pop("head_disagreement", None)
    assert got == want
    rows = [[{k: v for k, v in r.items() if k != "head_disagreement"}
             for r in csv.DictReader((folder / "sphere.nodules.csv").open(encoding="utf-8"))]
            for folder in (tmp_path / "bundle_out", tmp_path / "infer")]
    assert rows[0] == rows[1] and rows[0]
    assert not list((tmp_path / "bundle_out").glob(".*"))  # no temporary files left


def test_liver_bundle_writes_no_nodule_report(bundle):
    """The same task-rules table decides: no report step for a task whose rules ask for none."""
    post = json.loads((bundle / "configs" / "inference.json").read_text())["postprocessing"]["transforms"]
    assert not {"CopyItemsd", "unetpp3d.bundle.components.NoduleReportd"} & {t["_target_"] for t in post}


def test_bad_exports_raise_user_errors(run_dir, bundle, tmp_path):
    with pytest.raises(UserError, match="not empty.*--force"):
        export_bundle(run_dir, bundle)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        export_bundle(run_dir, tmp_path / "file")
    with pytest.raises(UserError, match="no such checkpoint"):
        export_bundle(tmp_path / "missing.pt", tmp_path / "b1")
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="corrupt.pt"):
        export_bundle(tmp_path / "corrupt.pt", tmp_path / "b2")
    payload = make_payload()
    save_checkpoint(tmp_path / "bare.pt", {"model_args": payload["model_args"], "state_dict": payload["state_dict"]})
    with pytest.raises(UserError, match="no preprocessing"):
        export_bundle(tmp_path / "bare.pt", tmp_path / "b3")
    payload["model_args"] = {**payload["model_args"], "features": [4, 8, 32]}
    save_checkpoint(tmp_path / "mismatch.pt", payload)
    with pytest.raises(UserError, match="do not fit"):
        export_bundle(tmp_path / "mismatch.pt", tmp_path / "b4")
    assert not any((tmp_path / f"b{i}").exists() for i in range(1, 5))


def test_force_writes_into_a_non_empty_folder(run_dir, tmp_path):
    out = tmp_path / "bundle"
    (out / "configs").mkdir(parents=True)
    (out / "configs" / "inference.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    export_bundle(run_dir, out, force=True)
    assert json.loads((out / "configs" / "inference.json").read_text())["run"] == ["$@evaluator.run()"]
    assert (out / "notes.txt").read_text() == "mine"


def test_cli_reports_errors_on_one_line(run_dir, tmp_path, capsys):
    from unetpp3d.commands.cli import main

    (tmp_path / "out" / "x").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_info:
        main(["export-bundle", "--model", str(run_dir), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "not empty" in capsys.readouterr().err


def test_the_bundle_lists_the_pipeline_the_predictor_runs(bundle, run_dir):
    """One description: inference.json holds the very specs the predictor instantiated, and training
    builds its preprocessing from the same specs (with the label key)."""
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    predictor = Predictor.from_source(run_dir, device="cpu", progress=False)
    pipeline = json.loads(json.dumps(predictor.pipeline_config))
    assert config["preprocessing"] == pipeline["preprocessing"]
    assert config["postprocessing"]["transforms"][:-1] == pipeline["postprocessing"]["transforms"]
    writer = config["postprocessing"]["transforms"][-1]
    assert writer["_target_"] == "SaveImaged"  # MONAI's own, so MONAI Label's post-filters drop it
    assert writer["writer"] == "unetpp3d.bundle.components.AtomicNibabelWriter"
    assert writer["output_name_formatter"] == "@case_names"
    args = json.loads(json.dumps(inferer_args(predictor.roi_size, predictor.sw_batch_size, predictor.overlap,
                                              predictor.prep)))
    assert {k: config["inferer"][k] for k in args} == args
    window = window_network_args(predictor.tta, predictor.prune_level, amp=True)
    assert {k: config["window_network"][k] for k in window} == window
    specs = preprocessing_specs(predictor.prep, ("image",))
    assert pipeline["preprocessing"]["transforms"] == json.loads(json.dumps(specs))
    training = preprocess_transforms(predictor.prep, ("image", "label"))
    assert [type(t).__name__ for t in training] == [s["_target_"].split(".")[-1] for s in specs]


def test_the_models_infer_settings_are_the_bundles_defaults(tmp_path):
    save_checkpoint(tmp_path / "fast.pt", make_payload(tta=True, mode="fast", prune_level=1))
    config = inference_config(Predictor.from_source(tmp_path / "fast.pt", device="cpu", progress=False))
    assert config["window_network"]["tta"] is True and config["window_network"]["prune_level"] == 1
    save_checkpoint(tmp_path / "plain.pt", make_payload())
    config = inference_config(Predictor.from_source(tmp_path / "plain.pt", device="cpu", progress=False))
    assert config["window_network"]["tta"] is False and config["window_network"]["prune_level"] is None


# ---------------------------------------------------------------------------------------------
# MONAI's SaveImaged writes what SaveMaskd wrote
# ---------------------------------------------------------------------------------------------


class TwoClassProbabilities(torch.nn.Module):
    """Stands in for the window network: class probabilities from the intensities, in one call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(x[:, :1] * 4)
        return torch.cat([1 - p, p], dim=1)


def oblique_direction() -> tuple[float, ...]:
    a, b = math.radians(20), math.radians(10)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return tuple((rz @ rx).ravel())


@pytest.fixture(params=["permuted", "oblique", "dicom"])
def scan_folder(request, scans, tmp_path):
    if request.param == "permuted":
        return scans
    if request.param == "oblique":
        write_image(tmp_path / "oblique" / "oblique.nii.gz", sphere_scan(), spacing=(1.1, 1.3, 2.7),
                    origin=(-101.25, 33.3, -7.77), direction=oblique_direction())
        return tmp_path / "oblique"
    data = request.getfixturevalue("shared_data")
    (tmp_path / "dicom_cases").mkdir()
    (tmp_path / "dicom_cases" / "abdomen").symlink_to(data / "abdomen_ct_dicom_ts" / "dicom")
    return tmp_path / "dicom_cases"


def test_save_imaged_writes_the_grid_and_voxels_of_save_maskd(bundle, scan_folder, tmp_path):
    """Both writers after the bundle's own post-processing of the same case, on an axis-permuted and
    flipped scan, an oblique one, and the real DICOM series (512x512x20, JPEG2000)."""
    from monai.bundle import ConfigWorkflow

    config = json.loads((bundle / "configs" / "inference.json").read_text())
    config["postprocessing"]["transforms"].append(
        {"_target_": "unetpp3d.bundle.components.SaveMaskd", "keys": "pred", "output_dir": str(tmp_path / "maskd")})
    (tmp_path / "both.json").write_text(json.dumps(config))
    workflow = ConfigWorkflow(config_file=str(tmp_path / "both.json"), meta_file=str(bundle / "configs" / "metadata.json"),
                              workflow_type="infer", logging_file=False, bundle_root=str(bundle),
                              dataset_dir=str(scan_folder), output_dir=str(tmp_path / "imaged"), device="cpu",
                              window_network=TwoClassProbabilities(), inferer={"_target_": "SimpleInferer"})
    workflow.initialize()
    workflow.run()
    names = sorted(p.name for p in (tmp_path / "maskd").iterdir())
    assert names and sorted(p.name for p in (tmp_path / "imaged").iterdir()) == names
    for name in names:
        want, got = (sitk.ReadImage(str(tmp_path / d / name)) for d in ("maskd", "imaged"))
        assert got.GetSize() == want.GetSize() and got.GetPixelID() == want.GetPixelID() == sitk.sitkUInt8
        assert got.GetSpacing() == want.GetSpacing() and got.GetOrigin() == want.GetOrigin()
        # NIfTI stores the direction in float32: the two writers round it alike to 1e-7.
        np.testing.assert_allclose(got.GetDirection(), want.GetDirection(), rtol=0, atol=1e-7)
        voxels = sitk.GetArrayFromImage(want)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(got), voxels)
        assert 0 < np.count_nonzero(voxels) < voxels.size


def test_case_names_are_infers_for_dicom_folders(tmp_path):
    from unetpp3d.bundle.components import CaseNames

    series = tmp_path / "case7" / "dicom"
    series.mkdir(parents=True)
    (series / "1.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    datalist = scan_datalist(tmp_path / "case7")
    names = CaseNames(datalist)
    assert names({"filename_or_obj": str(series)}) == {"subject": "case7", "idx": None}  # MONAI would say "dicom"
    assert names({"filename_or_obj": str(tmp_path / "other" / "x_1.nii.gz")})["subject"] == "x_1"


# ---------------------------------------------------------------------------------------------
# dataset_dir as zoo users pass it, and one line for what a user can fix
# ---------------------------------------------------------------------------------------------


def test_a_dataset_root_gives_its_test_scans(scans, tmp_path):
    root = tmp_path / "Task03_Liver"
    write_image(root / "imagesTs" / "liver_7.nii.gz", sphere_scan())
    write_image(root / "imagesTr" / "liver_1.nii.gz", sphere_scan())
    (root / "dataset.json").write_text("{}")
    assert scan_datalist(root) == [{"image": str(root / "imagesTs" / "liver_7.nii.gz"), "name": "liver_7"}]


def run_monai(bundle: Path, cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
           "--bundle_root", str(bundle), *args]
    return subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300,
                          cwd=cwd, env=env or ONE_THREAD)


@pytest.mark.slow
def test_an_empty_dataset_dir_ends_monais_runner_with_one_line(bundle, tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_monai(bundle, tmp_path, "--dataset_dir", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "o"))
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: dataset_dir {tmp_path / 'empty'}") and "pass --dataset_dir" in last, last
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


def test_user_errors_inside_monais_wrapping_are_reported_in_one_line(capsys, monkeypatch):
    from unetpp3d.bundle.components import one_line_user_errors
    from unetpp3d.errors import UserError

    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    one_line_user_errors()
    one_line_user_errors()  # twice: still one hook
    try:
        try:
            raise UserError("dataset_dir x: no scans")
        except UserError as exc:
            raise RuntimeError("Failed to instantiate {...}") from exc
    except RuntimeError as wrapped:
        sys.excepthook(type(wrapped), wrapped, wrapped.__traceback__)
    assert capsys.readouterr().err == "error: dataset_dir x: no scans\n"
    try:
        raise ValueError("a bug")
    except ValueError as bug:
        sys.excepthook(type(bug), bug, bug.__traceback__)
    assert "Traceback" in capsys.readouterr().err  # anything else keeps its traceback


# ---------------------------------------------------------------------------------------------
# The bundle needs unetpp3d: missing or too old is one line
# ---------------------------------------------------------------------------------------------


def test_check_names_the_install_command(bundle, monkeypatch):
    metadata = bundle / "configs" / "metadata.json"
    script = bundle / "scripts" / "check_unetpp3d.py"
    runpy.run_path(str(script), run_name="__main__")  # this unetpp3d is new enough
    command = f"pip install 'unetpp3d[bundle]>={unetpp3d.__version__}'"
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(SystemExit) as missing:
        check_unetpp3d.check(metadata)
    assert str(missing.value) == (f"error: this bundle needs the unetpp3d package (>= {unetpp3d.__version__}), which is "
                                  f"not installed; install it with: {command}")
    assert check_unetpp3d.problem("0.2.0", "0.2.0") is None and check_unetpp3d.problem("0.2.0", "0.10.1") is None
    assert check_unetpp3d.problem("0.2.0", "0.2.0+local") is None and check_unetpp3d.problem("0.2.0", "0.2") is None
    for old in ("0.1.9", "0.1", "unknown"):
        assert command.replace(unetpp3d.__version__, "0.2.0") in check_unetpp3d.problem("0.2.0", old)


@pytest.mark.slow
def test_monais_runner_refuses_an_older_unetpp3d_in_one_line(bundle, tmp_path):
    fake = tmp_path / "old" / "unetpp3d"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('__version__ = "0.0.1"\n')
    env = {**ONE_THREAD, "PYTHONPATH": os.pathsep.join([str(tmp_path / "old"), os.environ.get("PYTHONPATH", "")])}
    result = run_monai(bundle, tmp_path, "--dataset_dir", str(tmp_path), env=env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: this bundle needs unetpp3d >= {unetpp3d.__version__}, but unetpp3d 0.0.1 is installed; "
        f"upgrade with: pip install 'unetpp3d[bundle]>={unetpp3d.__version__}'")
    assert "Traceback" not in result.stderr
