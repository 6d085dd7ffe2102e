"""The command line's shared rules: --version, choices checked before anything loads, exit status, dependencies."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version
from typer.testing import CliRunner

import unetpp3d
from unetpp3d.commands.cli import app, device_option, main
from unetpp3d.errors import EXIT_FAILED, EXIT_OK, EXIT_USER, exit_status

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
WIDE = {"COLUMNS": "200", "TERMINAL_WIDTH": "200"}  # so that rich does not wrap the choices


def test_version_has_one_source(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"unetpp3d {unetpp3d.__version__}"
    # pyproject declares no version of its own: setuptools reads unetpp3d.__version__
    assert "version" not in PYPROJECT["project"] and "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "unetpp3d.__version__"}


def test_exit_status_rule():
    assert exit_status() == EXIT_OK == 0
    assert exit_status(user_problems=3) == EXIT_USER == 2
    assert exit_status(other_failures=1) == EXIT_FAILED == 1
    assert exit_status(user_problems=2, other_failures=1) == 1  # fixing the inputs alone would not do


def test_help_lists_the_exit_status_and_the_choices():
    runner = CliRunner()
    top = runner.invoke(app, ["--help"], env=WIDE)
    assert top.exit_code == 0 and "Exit status: 0 all done; 2 a problem you can fix" in " ".join(top.output.split())
    synth = runner.invoke(app, ["synth", "--help"], env=WIDE)
    assert "liver|lung_nodule" in synth.output


def test_a_bad_choice_is_refused_before_anything_runs(tmp_path):
    result = CliRunner().invoke(app, ["synth", "--task", "brain", "--out", str(tmp_path / "out")], env=WIDE)
    assert result.exit_code == 2 and "'brain' is not one of 'liver', 'lung_nodule'" in result.output
    assert not (tmp_path / "out").exists()


def test_device_gpu_means_cuda_and_a_bad_device_is_refused_before_training(tmp_path, monkeypatch):
    import unetpp3d.commands.cli as cli_module

    seen = []
    monkeypatch.setattr(cli_module, "run_training", lambda **kwargs: seen.append(kwargs["device"]))
    runner = CliRunner()
    for given, passed in (("GPU", "cuda"), ("gpu:1", "cuda:1"), ("cuda:0", "cuda:0"), ("cpu", "cpu")):
        result = runner.invoke(app, ["train", "--manifest", str(tmp_path / "m.json"), "--device", given], env=WIDE)
        assert result.exit_code == 0, result.output
        assert seen.pop() == passed
    for bad in ("tpu", "cpu:1", "cuda:x"):
        result = runner.invoke(app, ["train", "--manifest", str(tmp_path / "m.json"), "--device", bad], env=WIDE)
        assert result.exit_code == 2 and "is not a device" in result.output
    assert not seen
    assert device_option(None) is None


def _core_requirements() -> dict[str, Requirement]:
    return {Requirement(r).name.lower(): Requirement(r) for r in PYPROJECT["project"]["dependencies"]}


def test_torch_lower_bound_is_what_the_installed_monai_requires():
    core = _core_requirements()
    ours = min(Version(s.version) for s in core["torch"].specifier if s.operator == ">=")
    monai_torch = [Requirement(r) for r in importlib.metadata.requires("monai") or []
                   if Requirement(r).name == "torch" and Requirement(r).marker is None]
    theirs = [Version(s.version) for r in monai_torch for s in r.specifier if s.operator == ">="]
    assert theirs and ours >= max(theirs), f"torch>={ours} but MONAI {importlib.metadata.version('monai')} needs " \
                                           f"torch>={max(theirs)}"
    assert Version(importlib.metadata.version("monai")) in core["monai"].specifier


def test_bundle_tools_are_an_extra_not_core():
    core = _core_requirements()
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert not {"fire", "jsonschema"} & set(core)
    assert {Requirement(r).name for r in extras["bundle"]} == {"fire", "jsonschema"}
    assert "unetpp3d[bundle]" in extras["test"]
    # every core dependency says which default path uses it
    lines = (REPO / "pyproject.toml").read_text(encoding="utf-8").splitlines()
    for name in ("tqdm", "matplotlib", "tensorboard", "scipy", "scikit-image"):
        line = next(ln for ln in lines if re.match(rf'\s*"{name}>=', ln))
        assert "#" in line, line


def test_the_dicom_seg_writer_is_an_extra_the_tests_install():
    core = _core_requirements()
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert not {"highdicom", "pydicom"} & set(core)
    assert {Requirement(r).name for r in extras["dicom"]} == {"highdicom"}
    assert "unetpp3d[dicom]" in extras["test"]
