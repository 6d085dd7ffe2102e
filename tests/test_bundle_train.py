"""A bundle's train.json, multi_gpu_train.json and evaluate.json under MONAI's runner, on phantoms.

One tiny model (features 4, 8, 16; 32^3 patches at 8 mm) is exported with a resolved config
(batch 1, no loader workers, 2 iterations per epoch); three 32^3 liver phantoms
(unetpp3d.synth) make the dataset root (imagesTr/labelsTr with two cases, imagesTs with one).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from factories import ONE_THREAD

from unetpp3d.bundle.training import labelled_datalist
from unetpp3d.commands.infer import run_inference
from unetpp3d.config import Config, Preprocessing
from unetpp3d.errors import UserError
from unetpp3d.model.checkpoint import save_checkpoint
from unetpp3d.model.network import UNetPlusPlus3D
from unetpp3d.synth.phantom import write_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_payload() -> dict:
    torch.manual_seed(0)
    net = UNetPlusPlus3D(in_channels=1, out_channels=2, features=(4, 8, 16))
    prep = Preprocessing(task="liver", labels={"0": "background", "1": "liver"}, target_spacing=[8.0, 8.0, 8.0],
                         intensity_range=[-1000.0, 1000.0], intensity_stats=[50.0, 100.0], patch_size=[32, 32, 32])
    cfg = Config(task="liver")
    cfg.data.batch_size, cfg.data.num_workers, cfg.data.cache = 1, 0, "none"
    cfg.train.epochs, cfg.train.iterations_per_epoch, cfg.train.val_every, cfg.train.amp = 1, 2, 1, "off"
    return {"model_args": net.model_args, "state_dict": net.state_dict(), "preprocessing": prep.to_dict(),
            "config": cfg.to_dict(), "epoch": 3, "best_metric": 0.5,
            "split": {"fold": None, "training": ["a"], "validation": ["b"]}}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_dataset("liver", 3, root, size=32)
    return root


@pytest.fixture
def bundle(tmp_path) -> Path:
    from unetpp3d.bundle.export import export_bundle

    save_checkpoint(tmp_path / "run" / "best.pt", tiny_payload())
    return export_bundle(tmp_path / "run", tmp_path / "bundle")


def workflow(bundle: Path, *configs: str, **override):
    from monai.bundle import ConfigWorkflow

    files = [str(bundle / "configs" / c) for c in configs]
    flow = ConfigWorkflow(config_file=files, meta_file=str(bundle / "configs" / "metadata.json"),
                          logging_file=False, workflow_type="train", bundle_root=str(bundle), device="cpu", **override)
    flow.initialize()
    return flow


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest difference between two state dicts' floating-point values."""
    return max(float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point())


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# The dataset as zoo users pass it
# ---------------------------------------------------------------------------------------------


def test_a_dataset_root_pairs_images_with_labels(dataset, tmp_path):
    cases = labelled_datalist(dataset)
    assert [c["name"] for c in cases] == ["liver_000", "liver_001"]
    assert all(Path(c["label"]).parent.name == "labelsTr" for c in cases)
    assert labelled_datalist(dataset / "manifest.json") == cases  # the same cases from the datalist JSON
    nnunet = tmp_path / "nnunet"
    (nnunet / "imagesTr").mkdir(parents=True)
    (nnunet / "labelsTr").mkdir()
    (nnunet / "imagesTr" / "liver_5_0000.nii.gz").write_bytes(b"x")
    (nnunet / "labelsTr" / "liver_5.nii.gz").write_bytes(b"x")
    assert [c["name"] for c in labelled_datalist(nnunet)] == ["liver_5"]
    (nnunet / "imagesTr" / "liver_6_0000.nii.gz").write_bytes(b"x")
    with pytest.raises(UserError, match=r"no label in labelsTr/ for 1 image.*liver_6_0000"):
        labelled_datalist(nnunet)
    with pytest.raises(UserError, match="no imagesTr/ folder"):
        labelled_datalist(tmp_path)


def test_train_json_has_monais_training_properties(bundle, dataset):
    flow = workflow(bundle, "train.json", dataset_dir=str(dataset))
    assert flow.check_properties() == []
    config = json.loads((bundle / "configs" / "train.json").read_text())
    assert config["run"] == ["$@train#trainer.run()"]
    assert config["train"]["trainer"]["preprocessing"] == "@_meta_#unetpp3d#preprocessing"  # one source: metadata


# ---------------------------------------------------------------------------------------------
# Training through MONAI's runner
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_one_epoch_through_monais_runner_then_infer_loads_the_model(bundle, dataset, tmp_path):
    before = weights(bundle / "models" / "model.pt")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "train.json"),
           "--bundle_root", str(bundle), "--dataset_dir", str(dataset), "--device", "cpu"]
    result = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600,
                            cwd=tmp_path, env=ONE_THREAD)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "training from the weights in" in result.stdout
    rows = (bundle / "train" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].split(",")[0] == "1"  # one epoch, validated
    assert json.loads((bundle / "train" / "split.json").read_text())["validation"]  # a case held out
    after = weights(bundle / "models" / "model.pt")
    assert not same(before, after)  # trained, and written back as a plain state dict
    assert same(after, torch.load(bundle / "train" / "best.pt", weights_only=True)["state_dict"])

    from monai.data import load_net_with_metadata

    scripted, meta, _ = load_net_with_metadata(str(bundle / "models" / "model.ts"))
    net = UNetPlusPlus3D(**tiny_payload()["model_args"]).eval()
    net.load_state_dict(after)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x), rtol=1e-5, atol=1e-5)  # traced again from the new weights

    assert run_inference([dataset / "imagesTs"], tmp_path / "masks", model=bundle, device="cpu") == 0
    assert (tmp_path / "masks" / "liver_002.nii.gz").is_file()


@pytest.mark.slow
def test_training_starts_from_model_pt(bundle, dataset):
    """With a learning rate of 1e-6 the weights hardly move: those written back are close to those started from."""
    no_update = {"config_overrides": ["train.lr=0.000001", "train.iterations_per_epoch=1"], "validate#dataset#data": []}
    # Not the weights network_def is built with under the config's seed, so that the two starts differ.
    original = {k: v + 0.25 if v.is_floating_point() else v for k, v in weights(bundle / "models" / "model.pt").items()}
    torch.save(original, bundle / "models" / "model.pt")
    workflow(bundle, "train.json", dataset_dir=str(dataset), **no_update).run()
    assert distance(weights(bundle / "models" / "model.pt"), original) < 1e-3  # started from model.pt
    workflow(bundle, "train.json", dataset_dir=str(dataset), pretrained=False, **no_update).run()
    assert distance(weights(bundle / "models" / "model.pt"), original) > 0.2  # from network_def as built


@pytest.mark.slow
def test_multi_gpu_train_json_under_torchrun(bundle, dataset, tmp_path):
    """Two processes on the CPU (gloo): the DDP path multi_gpu_train.json takes on GPUs (NCCL)."""
    before = weights(bundle / "models" / "model.pt")
    configs = f"['{bundle / 'configs' / 'train.json'}','{bundle / 'configs' / 'multi_gpu_train.json'}']"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "monai.bundle",
           "run", "--config_file", configs, "--bundle_root", str(bundle), "--dataset_dir", str(dataset),
           "--device", "cpu"]
    result = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600,
                            cwd=tmp_path, env=ONE_THREAD)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "x 2 process(es)" in result.stdout
    assert not same(before, weights(bundle / "models" / "model.pt"))


def test_training_refuses_bad_input_before_it_starts(bundle, dataset, tmp_path):
    with pytest.raises(RuntimeError) as info:
        workflow(bundle, "train.json", "multi_gpu_train.json", dataset_dir=str(dataset)).run()
    assert isinstance(info.value.__cause__, UserError) and "torchrun" in str(info.value.__cause__)
    torch.save({"other": torch.zeros(1)}, bundle / "models" / "model.pt")
    with pytest.raises(RuntimeError) as info:
        workflow(bundle, "train.json", dataset_dir=str(dataset)).run()
    assert "does not fit network_def" in str(info.value.__cause__)
    assert not (bundle / "train" / "last.pt").exists()  # refused before the run folder was used


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def test_evaluate_json_scores_the_model_on_labelled_cases(bundle, dataset):
    flow = workflow(bundle, "train.json", "evaluate.json", dataset_dir=str(dataset))
    means = flow.run()[0]
    report = json.loads((bundle / "eval" / "evaluation.json").read_text())
    assert report["cases"] == 2 and set(report["mean_dice"]) == {"liver"} == set(means)
    assert {row["case"] for row in report["per_case"]} == {"liver_000", "liver_001"}
    dice = [row["dice"] for row in report["per_case"]]
    assert report["mean_dice"]["liver"] == pytest.approx(sum(dice) / len(dice))
