"""Data leaks (a held-out scan that is a training scan under another name) and manifests with duplicate keys."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from unetpp3d import UserError
from unetpp3d.commands.check import run_check
from unetpp3d.data.fingerprint import read_fingerprint
from unetpp3d.data.leaks import find_leaks
from unetpp3d.data.manifest import Case, load_manifest
from unetpp3d.strictjson import strict_loads
from unetpp3d.synth.phantom import write_dataset


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return write_dataset("liver", 3, tmp_path_factory.mktemp("phantoms"), seed=0, size=32)


def _leaky(phantoms: Path, tmp_path: Path, make) -> Path:
    """A manifest: two training cases, and a validation case whose image ``make(src, dst)`` derives from case 0's."""
    data = shutil.copytree(phantoms.parent, tmp_path / "data")
    man = json.loads((data / phantoms.name).read_text())
    train = man["training"][:2]
    make(data / train[0]["image"], data / "imagesTr" / "held_out.nii.gz")
    shutil.copyfile(data / train[0]["label"], data / "labelsTr" / "held_out.nii.gz")
    out = data / "leaky.json"
    out.write_text(json.dumps({"labels": man["labels"], "task": "liver", "training": train,
                               "validation": [{"image": "imagesTr/held_out.nii.gz",
                                               "label": "labelsTr/held_out.nii.gz"}]}))
    return out


@pytest.mark.parametrize("make, how", [
    (lambda src, dst: dst.symlink_to(src), "the same file (a symlink"),
    (lambda src, dst: os.link(src, dst), "the same file on disk (a hard link)"),
    (shutil.copyfile, "a byte copy"),
])
def test_check_reports_a_validation_scan_that_is_a_training_scan(phantoms, tmp_path, capsys, make, how):
    manifest = _leaky(phantoms, tmp_path, make)
    assert run_check(manifest, out_dir=tmp_path) == 2
    out = capsys.readouterr().out
    assert f"data leak: the image of validation case held_out is {how}" in out
    assert "training case liver_000" in out and "fingerprint not written" in out


def test_train_refuses_a_leaky_split(phantoms, tmp_path):
    from unetpp3d.commands.train import run_training

    manifest = _leaky(phantoms, tmp_path, shutil.copyfile)
    with pytest.raises(UserError, match="data leak"):
        run_training(manifest, out_dir=tmp_path / "run", device="cpu", overrides=["train.epochs=1"])
    assert not (tmp_path / "run").exists()


def test_different_scans_of_equal_size_are_no_leak(tmp_path):
    a, b, c = tmp_path / "a.nii", tmp_path / "b.nii", tmp_path / "c.nii"
    a.write_bytes(b"x" * 100)
    b.write_bytes(b"x" * 99 + b"y")  # same size, other bytes: hashed, and not equal
    c.write_bytes(b"x" * 100)
    groups = {"training": [Case("a", a, None)], "validation": [Case("b", b, None)], "test": [Case("c", c, None)]}
    assert find_leaks(groups) == [("test case c", "training case a", "a byte copy")]
    # Two training cases that are copies of each other are a duplicate, not a leak between the groups.
    assert find_leaks({"training": [Case("a", a, None), Case("c", c, None)]}) == []


@pytest.mark.parametrize("text", [
    '{"labels": {"0": "background", "1": "liver"}, "training": [], "training": []}',
    '{"labels": {"0": "background", "1": "liver", "1": "tumour"}, "training": []}',
    '{"labels": {"0": "background", "1": "liver"}, "training": [{"image": "a.nii", "image": "b.nii"}]}',
])
def test_a_manifest_with_a_duplicate_key_is_refused(tmp_path, text):
    path = tmp_path / "dataset.json"
    path.write_text(text)
    with pytest.raises(UserError, match=rf"{path.name}: not valid JSON \(duplicate key"):
        load_manifest(path)


def test_other_json_inputs_refuse_duplicate_keys_too(tmp_path):
    fp = tmp_path / "d.fingerprint.json"
    fp.write_text('{"cases": [], "cases": []}')
    with pytest.raises(UserError, match="duplicate key 'cases'"):
        read_fingerprint(fp)
    assert strict_loads('{"a": {"b": 1}, "c": [{"b": 2}]}') == {"a": {"b": 1}, "c": [{"b": 2}]}
