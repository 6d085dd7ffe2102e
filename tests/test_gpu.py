"""Every CUDA path, run for real: mixed-precision training, inference modes, stitching, the bundle, TorchScript, NCCL.

All tests here are marked ``gpu``; where CUDA is unavailable (CI included) conftest skips them
and says why. ``make gpu-check`` runs them on a GPU machine (``pytest -m gpu``). Small phantoms
and widths keep the file to a minute or two on one GPU (an estimate until it has run on one).

A model trained once per module with the demo's recipe (on the GPU) serves the inference tests:
masks of a trained model have few voxels near a tie, so agreement between precisions means
something, which it does not with random weights.
"""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from unetpp3d import load_model
from unetpp3d.bundle.export import export_bundle
from unetpp3d.commands.demo import demo_config_path
from unetpp3d.commands.infer import run_inference
from unetpp3d.commands.train import run_training
from unetpp3d.data.manifest import load_manifest
from unetpp3d.inference import predictor as predictor_module
from unetpp3d.inference.predictor import Predictor
from unetpp3d.model.checkpoint import load_checkpoint, resolve_model_path
from unetpp3d.synth.phantom import write_dataset

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
TINY = ["model.features=[8,16,32]", "data.patch_size=[32,32,32]", "data.batch_size=2", "data.num_workers=0",
        "train.iterations_per_epoch=4", "train.val_every=1"]
AGREEMENT = 0.999  # share of voxels on which CUDA masks must match the CPU fp32 masks of the same model


def read_xyz(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).transpose(2, 1, 0)


def metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """Six 64^3 liver phantoms: four to train on, one to validate, one held out (the manifest's test scan)."""
    return write_dataset("liver", 6, tmp_path_factory.mktemp("phantoms"), seed=0, size=64)


@pytest.fixture(scope="module")
def scan(phantoms) -> Path:
    return Path(load_manifest(phantoms).test[0].image)


@pytest.fixture(scope="module")
def trained(phantoms, tmp_path_factory) -> Path:
    """The demo's recipe (features 8-64, 48^3 patches, 240 AdamW steps) in bf16 on the GPU."""
    run = tmp_path_factory.mktemp("trained") / "run"
    return run_training(phantoms, demo_config_path(), run, device="cuda", overrides=["train.amp=bf16"])


# ---- training ----------------------------------------------------------------------------------


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_two_epochs_in_mixed_precision_then_resume(phantoms, tmp_path, amp):
    run = run_training(phantoms, SMOKE, tmp_path / amp, device="cuda",
                       overrides=TINY + [f"train.amp={amp}", "train.epochs=2"])
    rows = metrics(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(math.isfinite(float(r["train_loss"])) for r in rows), rows
    log = (run / "train.log").read_text()
    assert "cuda" in log and ("bfloat16" if amp == "bf16" else "float16") in log

    # The checkpoint loads on the CPU (no CUDA tensor left in it) and the model runs there.
    last = load_checkpoint(run / "last.pt")
    assert last["epoch"] == 2
    assert all(v.device.type == "cpu" for v in last["state_dict"].values())
    if amp == "fp16":  # the gradient scaler's state is saved, to continue with the same scale
        assert math.isfinite(last["scaler"]["scale"]) and last["scaler"]["scale"] > 0
    else:
        assert not last["scaler"]  # bf16 needs no scaler
    net = load_model(run / "last.pt").eval()
    with torch.no_grad():
        assert torch.isfinite(net(torch.zeros(1, 1, 32, 32, 32))).all()

    # --resume continues from last.pt, on the GPU, with its precision and scaler.
    run_training(phantoms, None, run, resume=True, device="cuda", overrides=["train.epochs=3"])
    rows = metrics(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert math.isfinite(float(rows[-1]["train_loss"]))
    assert load_checkpoint(run / "last.pt")["epoch"] == 3
    assert "resuming at epoch 3/3" in (run / "train.log").read_text()


def test_torchrun_one_process_trains_an_epoch_over_nccl(phantoms, tmp_path):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "unetpp3d",
           "train", "--manifest", str(phantoms), "--config", str(SMOKE), "--out", str(run), "--device", "cuda",
           "--epochs", "1", *[a for o in TINY for a in ("--set", o)]]
    proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "x 1 process(es) (nccl)" in (run / "train.log").read_text()  # DDP over NCCL, not a plain run
    assert len(metrics(run)) == 1 and math.isfinite(float(metrics(run)[0]["train_loss"]))
    assert load_checkpoint(run / "last.pt")["epoch"] == 1


# ---- inference ---------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [dict(mode="accurate"), dict(mode="fast"), dict(tta=True)],
                         ids=["accurate", "fast", "tta"])
def test_infer_on_cuda_agrees_with_cpu_fp32(trained, scan, tmp_path, options):
    cpu, gpu = tmp_path / "cpu.nii.gz", tmp_path / "cuda.nii.gz"
    assert run_inference([scan], cpu, model=trained, device="cpu", amp=False, **options) == 0
    assert run_inference([scan], gpu, model=trained, device="cuda", **options) == 0  # bf16, as by default
    want, got = read_xyz(cpu), read_xyz(gpu)
    assert 0 < np.count_nonzero(want) < want.size  # a mask with something to get wrong
    agreement = float(np.mean(got == want))
    assert agreement >= AGREEMENT, f"{agreement:.5f} of voxels agree"


def test_gpu_and_cpu_stitching_give_the_same_mask(trained, scan, monkeypatch):
    # Windows run on the GPU both times, with the same kernels; only where the output is held differs.
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    on_gpu = Predictor.from_source(trained, device="cuda", progress=False, keep_probabilities=True).predict(scan)
    monkeypatch.setattr(predictor_module, "_GPU_HEADROOM_BYTES", 1 << 60)  # "does not fit": the CPU holds it
    on_cpu = Predictor.from_source(trained, device="cuda", progress=False, keep_probabilities=True).predict(scan)
    assert on_gpu.info["stitch"].startswith("cuda") and on_cpu.info["stitch"] == "cpu"
    np.testing.assert_array_equal(on_gpu.mask_xyz, on_cpu.mask_xyz)
    np.testing.assert_allclose(on_gpu.probabilities, on_cpu.probabilities, atol=1e-5)


# ---- the bundle and its TorchScript ------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(trained, tmp_path_factory) -> Path:
    return export_bundle(trained, tmp_path_factory.mktemp("export") / "bundle")


def test_monai_bundle_run_on_cuda_agrees_with_infer(bundle, trained, scan, tmp_path):
    out = tmp_path / "masks"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
           "--bundle_root", str(bundle), "--dataset_dir", str(scan.parent), "--output_dir", str(out),
           "--device", "cuda"]
    proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert run_inference([scan], tmp_path / "infer.nii.gz", model=trained, device="cuda") == 0
    want = read_xyz(tmp_path / "infer.nii.gz")
    got = read_xyz(out / scan.name)
    assert 0 < np.count_nonzero(want) < want.size
    assert float(np.mean(got == want)) >= AGREEMENT


def test_model_ts_runs_on_cuda_in_every_mode(bundle, trained):
    scripted = torch.jit.load(str(bundle / "models" / "model.ts"), map_location="cuda")
    eager = load_model(resolve_model_path(trained)).eval()
    torch.manual_seed(0)
    x = torch.randn(2, 1, 24, 40, 32)  # not the traced size; multiples of the divisor (8)
    for level in [None, *range(1, eager.depth + 1)]:
        method = scripted.forward if level is None else getattr(scripted, f"fast_l{level}")
        with torch.no_grad():
            got = method(x.cuda())
            want = eager(x, prune_level=level)
        assert got.device.type == "cuda"
        # The trace keeps the flag it was traced with that lets cuDNN use TF32 (10-bit mantissa);
        # another mode's head would differ by far more than this.
        torch.testing.assert_close(got.cpu(), want, rtol=5e-2, atol=5e-2)
