"""Machine capabilities: the device choice, the precision policy and the CPU allocator setting (unetpp3d/hardware.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from unetpp3d import hardware
from unetpp3d.commands import cli
from unetpp3d.errors import UserError
from unetpp3d.hardware import autocast_dtype, resolve_device
from unetpp3d.inference.windows import ProbabilityNet
from unetpp3d.training.distributed import Dist


class AutocastProbe(nn.Module):
    """Logits that record whether the forward ran under CPU autocast, and in which dtype."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 1)
        self.seen: list[tuple[bool, torch.dtype]] = []

    def forward(self, x):
        self.seen.append((torch.is_autocast_enabled("cpu"), self.conv(x).dtype))
        return self.conv(x)


def fake_gpus(monkeypatch, count: int = 2, bf16: bool = True) -> None:
    """Pretend CUDA is there: only the decisions are exercised, no kernel runs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "a fake GPU")


# ---------------------------------------------------------------------------------------------
# One device choice, for training and inference
# ---------------------------------------------------------------------------------------------


def test_device_names_are_read_alike_everywhere(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == resolve_device("") == torch.device("cpu")
    for name in ("gpu", "cuda", "cuda:1"):
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device(name)
    with pytest.raises(UserError, match="not a device"):
        resolve_device("tpu")
    fake_gpus(monkeypatch)
    assert resolve_device("gpu") == resolve_device("cuda") == resolve_device(None) == torch.device("cuda", 0)
    assert resolve_device("GPU:1") == torch.device("cuda", 1)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    with pytest.raises(UserError, match="only 2 GPU"):
        resolve_device("cuda:2")


def test_training_and_the_predictor_take_gpu_as_cuda(monkeypatch):
    from unetpp3d.inference.predictor import Predictor

    fake_gpus(monkeypatch)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    _, device = Dist.from_env("gpu")
    assert device == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="CUDA is not available"):
        Dist.from_env("gpu")
    with pytest.raises(UserError, match="CUDA is not available"):  # not "not a device"
        Predictor(nn.Conv3d(1, 2, 1), {"task": "liver", "labels": {"0": "background", "1": "liver"},
                                      "target_spacing": [1.0] * 3, "intensity_range": [-1.0, 1.0],
                                      "intensity_stats": [0.0, 1.0], "patch_size": [8] * 3}, device="gpu")


# ---------------------------------------------------------------------------------------------
# One autocast policy, for training and inference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_on_the_cpu_is_bf16_only_where_the_cpu_has_it(monkeypatch, native):
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    for setting in ("auto", True):  # train.amp: auto, and infer's --amp
        assert autocast_dtype(setting, cpu) is (torch.bfloat16 if native else None)
    for setting in ("off", False):
        assert autocast_dtype(setting, cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16
    with pytest.raises(UserError, match="fp16 needs a CUDA device"):
        autocast_dtype("fp16", cpu)
    probe = AutocastProbe().eval()
    x = torch.randn(1, 1, 4, 4, 4)
    probs = ProbabilityNet(probe, amp=True)(x)
    assert probe.seen[-1] == ((True, torch.bfloat16) if native else (False, torch.float32))
    assert probs.dtype == torch.float32 and torch.allclose(probs.sum(1), torch.ones(1, 4, 4, 4))
    ProbabilityNet(probe, amp=False)(x)
    assert probe.seen[-1] == (False, torch.float32)  # --no-amp is fp32 everywhere


def test_auto_precision_on_cuda(monkeypatch):
    cuda = torch.device("cuda", 0)
    fake_gpus(monkeypatch, bf16=True)
    assert autocast_dtype("auto", cuda) is torch.bfloat16 and autocast_dtype("fp16", cuda) is torch.float16
    fake_gpus(monkeypatch, bf16=False)
    assert autocast_dtype("auto", cuda) is torch.float16
    with pytest.raises(UserError, match="does not support bf16"):
        autocast_dtype("bf16", cuda)
    with pytest.raises(UserError, match="'fast' is not one of"):
        autocast_dtype("fast", cuda)


def test_bf16_probabilities_stay_close_to_fp32(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)
    from unetpp3d.model.network import UNetPlusPlus3D

    torch.manual_seed(0)
    net = UNetPlusPlus3D(1, 2, (4, 8, 16)).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.inference_mode():
        fp32, bf16 = ProbabilityNet(net, amp=False)(x), ProbabilityNet(net, amp=True)(x)
    assert not torch.equal(fp32, bf16)  # it did run in reduced precision
    torch.testing.assert_close(bf16, fp32, atol=0.05, rtol=0)


# ---------------------------------------------------------------------------------------------
# The allocator setting: a documented command-line option, not an environment variable
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_takes_effect_and_can_be_turned_off():
    code = "from unetpp3d.hardware import keep_freed_memory as k; print(k(), k(False))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"UNETPP3D_MALLOC_TUNING": "0", "PATH": "", "PYTHONPATH": ":".join(sys.path)})
    assert out.stdout.split() == ["True", "False"]  # the old variable no longer switches it off


def test_the_command_line_tunes_the_allocator_unless_told_not_to(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda enabled=True: calls.append(enabled))
    runner = CliRunner()
    assert runner.invoke(cli.app, ["infer", "--help"]).exit_code == 0
    assert runner.invoke(cli.app, ["--no-malloc-tuning", "infer", "--help"]).exit_code == 0
    assert calls == [True, False]
    assert "--no-malloc-tuning" in runner.invoke(cli.app, ["--help"]).output
