"""The README's Python API example runs as written, on a tiny random model and a small scan."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from factories import write_image

from unetpp3d.config import Config, Preprocessing
from unetpp3d.model.network import UNetPlusPlus3D

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def readme_block(heading: str) -> str:
    """The first ```python block after a README heading."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index(f"\n{heading}\n"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"no python block under {heading!r}"
    return match.group(1)


def test_python_api_example_runs(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    net = UNetPlusPlus3D(in_channels=1, out_channels=2, features=(4, 8, 16))
    prep = Preprocessing(task="liver", labels={"0": "background", "1": "liver"}, target_spacing=[8.0, 8.0, 8.0],
                         intensity_range=[-1000.0, 1000.0], intensity_stats=[50.0, 100.0], patch_size=[32, 32, 32])
    run = tmp_path / "runs" / "liver"
    run.mkdir(parents=True)
    # what a training run's best.pt holds for inference: the network's arguments and weights, its preprocessing
    torch.save({"model_args": net.model_args, "state_dict": net.state_dict(), "preprocessing": prep.to_dict(),
                "config": Config(task="liver").to_dict(), "epoch": 1}, run / "best.pt")
    scan = np.where(np.indices((40, 36, 24)).sum(0) > 40, 200, -800).astype(np.int16)
    write_image(tmp_path / "ct.nii.gz", scan, spacing=(1.5, 1.5, 2.0), origin=(10.0, -5.0, 3.0))
    monkeypatch.chdir(tmp_path)

    exec(compile(readme_block("## Python API"), "README.md: Python API", "exec"), {})

    mask, image = (sitk.ReadImage(str(tmp_path / name)) for name in ("ct_liver.nii.gz", "ct.nii.gz"))
    assert mask.GetSize() == image.GetSize() == (40, 36, 24)
    assert np.allclose(mask.GetSpacing(), image.GetSpacing()) and np.allclose(mask.GetOrigin(), image.GetOrigin())
    assert "(40, 36, 24)" in capsys.readouterr().out
