"""Implausible inputs are warned about (not refused): all air, HU with an offset, a label map as the image, FOV."""

from __future__ import annotations

import numpy as np
import pytest

from unetpp3d.commands.check import run_check
from unetpp3d.data.manifest import Case, load_manifest, write_manifest
from unetpp3d.data.plausibility import (
    field_of_view_mm,
    field_of_view_warnings,
    intensity_warnings,
    view_warnings,
    volume_range,
    volume_warnings,
)
from unetpp3d.geometry import Geometry
from unetpp3d.imageio.readers import read_image
from unetpp3d.synth.phantom import write_dataset

EYE = (1, 0, 0, 0, 1, 0, 0, 0, 1)


@pytest.fixture(scope="module")
def phantom_scan(tmp_path_factory):
    man = load_manifest(write_dataset("liver", 1, tmp_path_factory.mktemp("p"), seed=0, size=32))
    return read_image(man.training[0].image)


def test_a_ct_phantom_gets_no_warning(phantom_scan):
    image, geometry = phantom_scan
    assert intensity_warnings(image) == [] and field_of_view_warnings(geometry) == []


@pytest.mark.parametrize("change, expected", [
    (lambda img: np.full_like(img, -1000), "almost no body"),
    (lambda img: img.astype(np.int32) + 30000, "not plausible Hounsfield units"),
    (lambda img: (img > 0).astype(np.uint8), "looks like a label map"),
    (lambda img: img.astype(np.float32) / 1000.0 - 5.0, "not plausible Hounsfield units"),  # rescaled to about [-6, -3]
])
def test_implausible_intensities_are_named(phantom_scan, change, expected):
    warnings = intensity_warnings(change(phantom_scan[0]))
    assert len(warnings) == 1 and expected in warnings[0]


def test_an_implausible_field_of_view_is_named():
    tiny = Geometry((32, 32, 32), (0.1, 0.1, 0.1), (0.0, 0.0, 0.0), EYE)
    assert "field of view 3 x 3 x 3 mm" in field_of_view_warnings(tiny)[0]
    assert field_of_view_warnings(Geometry((32, 32, 32), (100.0, 100.0, 100.0), (0.0, 0.0, 0.0), EYE))  # 3.2 m
    assert field_of_view_warnings(Geometry((512, 512, 300), (0.8, 0.8, 1.0), (0.0, 0.0, 0.0), EYE)) == []


def test_volumes_far_outside_the_training_range_are_named():
    trained = volume_range([{"1": 1500.0}, {"1": 1900.0}, {"1": 0.0}])
    assert trained == {"1": [1500.0, 1900.0]}
    assert volume_warnings({"1": 1700.0}, trained, {"1": "liver"}) == []
    assert "liver volume 100 mL is far outside" in volume_warnings({"1": 100.0}, trained, {"1": "liver"})[0]
    assert volume_warnings({"1": 9000.0}, trained, {"1": "liver"})


def test_a_scan_far_larger_than_the_training_cases_is_named():
    """A model trained on nodule crops (about 31 x 31 x 40 mm) run on a whole chest CT warns; a liver
    model's whole abdomen on a slightly larger abdomen does not."""
    crops = field_of_view_mm([(44, 44, 30), (40, 46, 12)], [(0.7, 0.7, 1.25), (0.7, 0.7, 2.5)])
    assert crops == [30.8, 32.2, 37.5]
    chest = Geometry((512, 512, 61), (0.63, 0.63, 5.0), (0.0, 0.0, 0.0), EYE)
    (warning,) = view_warnings(chest, crops)
    assert "at most 31 x 32 x 38 mm" in warning and "323 x 323 x 305 mm" in warning and "--points" in warning
    assert view_warnings(chest, None) == []  # an older model: not judged
    abdomen = [400.0, 400.0, 300.0]
    assert view_warnings(Geometry((512, 512, 120), (0.9, 0.9, 3.0), (0.0, 0.0, 0.0), EYE), abdomen) == []


def test_check_warns_about_a_label_map_given_as_the_image(make_image, tmp_path, capsys):
    lab = np.zeros((32, 32, 24), np.uint8)
    lab[8:20, 8:20, 6:16] = 1
    img = make_image("scan.nii.gz", lab.astype(np.int16), spacing=(8.0, 8.0, 8.0))
    seg = make_image("scan_seg.nii.gz", lab, spacing=(8.0, 8.0, 8.0))
    manifest = write_manifest(tmp_path / "ds.json", [Case("scan", img, seg)], {0: "background", 1: "liver"},
                              task="liver")
    assert run_check(manifest, out_dir=tmp_path) == 0  # a warning, not an error
    out = capsys.readouterr().out
    assert "warning: scan: " in out and "looks like a label map" in out
