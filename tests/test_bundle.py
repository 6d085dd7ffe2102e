"""`unetpp3d export-bundle`: a MONAI Bundle that MONAI runs alone and that agrees with `unetpp3d infer`.

One tiny model (features 4, 8, 16; 32^3 windows, random weights) is exported once per module;
one small scan with a permuted, flipped direction goes through `unetpp3d infer`, through the
bundle via MONAI's API in-process, and through `python -m monai.bundle run` in a subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import write_image

from unetpp3d.bundle.configs import inference_config, meta_schema_path, verify_metadata
from unetpp3d.bundle.export import export_bundle
from unetpp3d.commands.infer import run_inference
from unetpp3d.config import Config, Preprocessing
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
    torch.manual_seed(0)
    net = UNetPlusPlus3D(in_channels=1, out_channels=2, features=FEATURES)
    name = "liver" if task == "liver" else "nodule"
    prep = Preprocessing(task=task, labels={"0": "background", "1": name}, target_spacing=[1.5, 1.5, 1.5],
                         intensity_range=[-1000.0, 1000.0], intensity_stats=[50.0, 100.0], patch_size=[32, 32, 32])
    cfg = Config(task=task)
    cfg.infer.overlap, cfg.infer.sw_batch_size, cfg.infer.min_component_ml = 0.25, 4, 0.01
    for key, value in infer.items():
        setattr(cfg.infer, key, value)
    return {"model_args": net.model_args, "state_dict": net.state_dict(), "preprocessing": prep.to_dict(),
            "config": cfg.to_dict(), "epoch": 7, "best_metric": 0.8125,
            "split": {"fold": 0, "training": ["a", "b", "c"], "validation": ["d"]}}


def sphere_scan(shape=(40, 36, 24), centre=(20, 15, 12), radius_mm=10.0, spacing=(1.5, 1.5, 2.0)) -> np.ndarray:
    idx = np.indices(shape).astype(float)
    dist = np.sqrt(sum(((idx[a] - centre[a]) * spacing[a]) ** 2 for a in range(3)))
    scan = np.where(dist <= radius_mm, 200, -800).astype(np.int16)
    scan[:3] = -1000  # air outside the body, so the body crop has something to remove
    return scan


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
    for rel in ("configs/metadata.json", "configs/inference.json", "configs/logging.conf", "models/model.pt",
                "models/model.ts", "docs/README.md", "LICENSE"):
        assert (bundle / rel).is_file(), rel
    assert not list(bundle.parent.glob(".*.part"))  # the staging folder is gone

    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    for key in ("version", "changelog", "monai_version", "pytorch_version", "numpy_version", "task", "description",
                "authors", "copyright", "intended_use", "network_data_format"):
        assert meta[key], key
    assert "unetpp3d" in meta["required_packages_version"]
    assert "not a medical device" in meta["intended_use"]
    image = meta["network_data_format"]["inputs"]["image"]
    assert (image["modality"], image["format"], image["num_channels"]) == ("CT", "hounsfield", 1)
    assert image["spatial_shape"] == [32, 32, 32] and image["is_patch_data"] is True
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "liver"}
    assert meta["eval_metrics"] == {"mean_dice": 0.8125}
    # the section `unetpp3d infer` reads as plain data is exactly the predictor's own
    payload = torch.load(run_dir / "best.pt", weights_only=True)
    assert meta["unetpp3d"] == json.loads(json.dumps(bundle_metadata(payload)))
    assert meta["unetpp3d"]["format"] == 2  # the component paths of inference.json changed with the layout
    weights = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(weights[k], v) for k, v in payload["state_dict"].items())

    readme = (bundle / "docs" / "README.md").read_text()
    for text in ("liver", "epoch 7", "0.8125", "3 training, 1 validation", "Research use only",
                 "python -m monai.bundle run", "| 7 | 0.8125 | 0.8125 |"):
        assert text in readme, text
    assert "https://www.apache.org/licenses/LICENSE-2.0" in (bundle / "LICENSE").read_text()


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
    assert len(expressions) <= 6, expressions  # device, two default folders, weights path, initialize, run
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


def test_verify_metadata_offline_against_our_schema(bundle, tmp_path):
    # monai.bundle.verify_metadata validates with jsonschema, which unetpp3d does not depend on.
    pytest.importorskip("jsonschema", reason="jsonschema is not installed (not a unetpp3d dependency); "
                                             "verify_metadata cannot validate without it")
    assert "not MONAI's official" in json.loads(meta_schema_path().read_text())["description"]
    verify_metadata(bundle)
    broken = tmp_path / "broken"
    (broken / "configs").mkdir(parents=True)
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    del meta["network_data_format"]["inputs"]["image"]["num_channels"]
    (broken / "configs" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="num_channels"):
        verify_metadata(broken)


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
    assert post[2] == {"_target_": "unetpp3d.inference.postprocess.RemoveSmallComponentsd", "keys": "pred", "min_ml": 0.01,
                       "labels": [1]}


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
    assert config["postprocessing"]["transforms"][-1]["_target_"] == "unetpp3d.bundle.components.SaveMaskd"
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
