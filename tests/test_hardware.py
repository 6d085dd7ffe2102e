"""Machine capabilities and process-wide CPU settings (unetpp3d/hardware.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from unetpp3d import hardware
from unetpp3d.inference.windows import ProbabilityNet


class AutocastProbe(nn.Module):
    """Logits that record whether the forward ran under CPU autocast, and in which dtype."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 1)
        self.seen: list[tuple[bool, torch.dtype]] = []

    def forward(self, x):
        self.seen.append((torch.is_autocast_enabled("cpu"), self.conv(x).dtype))
        return self.conv(x)


@pytest.mark.parametrize("native", [True, False])
def test_cpu_inference_uses_bf16_only_where_the_cpu_has_it(monkeypatch, native):
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: native)
    assert hardware.inference_autocast_dtype(torch.device("cpu")) is (torch.bfloat16 if native else None)
    monkeypatch.setattr("unetpp3d.inference.predictor.inference_autocast_dtype", hardware.inference_autocast_dtype)
    probe = AutocastProbe().eval()
    x = torch.randn(1, 1, 4, 4, 4)
    probs = ProbabilityNet(probe, amp=True)(x)
    assert probe.seen[-1] == ((True, torch.bfloat16) if native else (False, torch.float32))
    assert probs.dtype == torch.float32 and torch.allclose(probs.sum(1), torch.ones(1, 4, 4, 4))
    ProbabilityNet(probe, amp=False)(x)
    assert probe.seen[-1] == (False, torch.float32)  # --no-amp is fp32 everywhere


def test_bf16_probabilities_stay_close_to_fp32(monkeypatch):
    monkeypatch.setattr("unetpp3d.inference.predictor.inference_autocast_dtype", lambda device: torch.bfloat16)
    from unetpp3d.model.network import UNetPlusPlus3D

    torch.manual_seed(0)
    net = UNetPlusPlus3D(1, 2, (4, 8, 16)).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.inference_mode():
        fp32, bf16 = ProbabilityNet(net, amp=False)(x), ProbabilityNet(net, amp=True)(x)
    assert not torch.equal(fp32, bf16)  # it did run in reduced precision
    torch.testing.assert_close(bf16, fp32, atol=0.05, rtol=0)


def _mallopt_in_child(env_value: str) -> str:
    code = "from unetpp3d.hardware import keep_freed_memory; print(keep_freed_memory())"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={"UNETPP3D_MALLOC_TUNING": env_value, "PATH": ""}).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_takes_effect_and_can_be_turned_off():
    assert _mallopt_in_child("1") == "True"
    assert _mallopt_in_child("0") == "False"
