"""The wheel: built and installed into a fresh virtual environment, it carries the task configs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", timeout=600, **kwargs)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow  # builds a wheel, makes a venv, and trains one step from the installed package
def test_installed_wheel_trains_a_lung_manifest_with_the_lung_config(tmp_path):
    # Build from a copy of the sources, so that the build leaves nothing in the repository.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "unetpp3d", src / "unetpp3d", ignore=shutil.ignore_patterns("__pycache__"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w",
          str(tmp_path / "dist"), str(src)])
    wheel = next((tmp_path / "dist").glob("unetpp3d-*.whl"))

    # A fresh venv that sees this environment's packages (torch, MONAI ...) but not its unetpp3d:
    # a plain path in a .pth file adds the folder without running the .pth files (an editable
    # install's finder) inside it.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout
    purelib = Path(purelib.strip())
    (purelib / "main_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "--quiet",
          str(wheel)])

    outside = tmp_path / "elsewhere"  # not the repository: nothing there to fall back on
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    where = _run([str(python), "-c", "import unetpp3d; print(unetpp3d.__file__)"], cwd=outside, env=env).stdout
    assert Path(where.strip()).is_relative_to(venv), where
    cli = str(venv / "bin" / "unetpp3d")
    _run([cli, "synth", "--task", "lung_nodule", "--cases", "3", "--size", "32", "--out", "data"], cwd=outside, env=env)
    tiny = ["model.features=[4,8,16]", "data.patch_size=[32,32,32]", "data.batch_size=2", "data.num_workers=0",
            "train.epochs=1", "train.iterations_per_epoch=1", "train.val_every=1"]
    _run([cli, "train", "--manifest", "data/manifest.json", "--out", "run", "--device", "cpu",
          *[a for o in tiny for a in ("--set", o)]], cwd=outside, env=env)

    cfg = yaml.safe_load((outside / "run" / "config.yaml").read_text(encoding="utf-8"))
    assert cfg["task"] == "lung_nodule"
    assert cfg["data"]["intensity_range"] == [-1000.0, 400.0] and cfg["infer"]["tta"] is True
    assert cfg["data"]["pos_fraction"] == 0.9  # the lung config's, not the built-in default 0.67
