"""Post-processing: largest component, hole filling, nodule measurements and the nodule report."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, FillHoles

from unetpp3d.inference.nodules import (
    index_to_lps,
    nodule_components,
    write_nodule_report,
)
from unetpp3d.inference.pipeline import postprocess_transforms
from unetpp3d.inference.postprocess import (
    largest_component_filled,
    remove_small_components,
)


def grid(spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)):
    return SimpleNamespace(spacing=spacing, origin=origin, direction=direction)


def hollow_cube_with_island() -> np.ndarray:
    mask = np.zeros((24, 24, 24), np.uint8)
    mask[4:16, 4:16, 4:16] = 1
    mask[8:12, 8:12, 8:12] = 0  # an enclosed hole
    mask[4:16, 4:16, 10] = 1
    mask[20:22, 20:22, 20:22] = 1  # a small island
    mask[0:3, 8:12, 8:12] = 0
    return mask


def test_largest_component_filled_removes_islands_and_fills_holes():
    mask = hollow_cube_with_island()
    out = largest_component_filled(mask)
    expected = np.zeros_like(mask)
    expected[4:16, 4:16, 4:16] = 1
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == mask.dtype
    assert mask[10, 10, 9] == 0  # the input is not modified


def test_open_cavity_is_not_a_hole():
    mask = np.zeros((16, 16, 16), np.uint8)
    mask[2:14, 2:14, 2:14] = 1
    mask[6:10, 6:10, 6:16] = 0  # a tunnel that reaches the array border
    np.testing.assert_array_equal(largest_component_filled(mask), mask)


def test_empty_mask_passes_through():
    mask = np.zeros((8, 8, 8), np.uint8)
    np.testing.assert_array_equal(largest_component_filled(mask), mask)


def test_agrees_with_monai_transforms_used_by_the_bundle():
    """The fast path the predictor takes gives the voxels MONAI's transforms give in a bundle."""
    rng = np.random.default_rng(0)
    for trial in range(4):
        mask = (rng.random((20, 18, 16)) > 0.45 + 0.05 * trial).astype(np.uint8)
        mask[3:15, 3:15, 3:13] |= 1
        mask[6:9, 6:9, 6:9] = 0
        chain = Compose(postprocess_transforms("liver", [1]))
        bundle = np.asarray(chain({"pred": MetaTensor(torch.as_tensor(mask)[None])})["pred"][0])
        np.testing.assert_array_equal(largest_component_filled(mask, [1]), bundle.astype(np.uint8))
        # and the hole filling alone matches MONAI's FillHoles with the same connectivity
        from unetpp3d.inference.postprocess import fill_holes
        monai_filled = np.asarray(FillHoles(applied_labels=[1], connectivity=1)(torch.as_tensor(mask)[None])[0])
        np.testing.assert_array_equal(fill_holes(mask, [1]), monai_filled.astype(np.uint8))


def test_remove_small_components_uses_physical_volume():
    mask = np.zeros((20, 20, 20), np.uint8)
    mask[1:3, 1:3, 1:3] = 1  # 8 voxels
    mask[10:15, 10:15, 10:15] = 1  # 125 voxels
    spacing = (2.0, 2.0, 2.0)  # 8 mm^3 per voxel: 0.064 mL and 1.0 mL
    kept = remove_small_components(mask, spacing, min_ml=0.5)
    assert kept[1, 1, 1] == 0 and kept[12, 12, 12] == 1
    assert remove_small_components(mask, spacing, min_ml=1.0)[12, 12, 12] == 1  # exactly min_ml is kept
    np.testing.assert_array_equal(remove_small_components(mask, spacing, 0.0), mask)
    # the bundle's transform reads the voxel size from the MetaTensor's affine
    chain = Compose(postprocess_transforms("lung_nodule", [1], min_component_ml=0.5))
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    out = chain({"pred": MetaTensor(torch.as_tensor(mask)[None], affine=torch.as_tensor(affine))})["pred"]
    np.testing.assert_array_equal(np.asarray(out[0]), kept)


def test_index_to_lps_follows_direction_and_origin():
    g = grid(spacing=(2.0, 3.0, 4.0), origin=(10.0, 20.0, 30.0), direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))
    np.testing.assert_allclose(index_to_lps(g, [[1, 1, 1]]), [[8.0, 17.0, 34.0]])


def test_nodule_measurements():
    mask = np.zeros((40, 40, 20), np.uint8)
    mask[5:15, 5:7, 5:7] = 1  # a 10-voxel-long bar along x: 9 voxel steps apart
    mask[30, 30, 10] = 1  # one voxel
    probs = np.zeros((2, 40, 40, 20), np.float32)
    probs[1][mask == 1] = 0.8
    probs[0] = 1 - probs[1]
    g = grid(spacing=(0.5, 1.0, 2.0), origin=(-5.0, 0.0, 100.0), direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1))
    out, nodules = nodule_components(mask, g, probs, min_volume_ml=0.0)
    assert len(nodules) == 2
    bar, dot = nodules
    assert (bar.id, bar.voxels, dot.voxels) == (1, 40, 1)
    assert bar.volume_ml == pytest.approx(40 * 0.5 * 1.0 * 2.0 / 1000)
    # farthest surface voxel centres: (5,5,5) and (14,6,6) -> 4.5 mm, 1 mm, 2 mm apart
    assert bar.longest_diameter_mm == pytest.approx(np.sqrt(4.5**2 + 1 + 4), abs=1e-3)
    # centroid index (9.5, 5.5, 5.5), x axis pointing to -L
    np.testing.assert_allclose(bar.centre_lps_mm, (-5 - 9.5 * 0.5, 5.5, 100 + 11.0), atol=1e-3)
    assert bar.mean_probability == pytest.approx(0.8)
    assert dot.longest_diameter_mm == 0.0
    # the size filter removes the one-voxel nodule from both the list and the mask
    out, nodules = nodule_components(mask, g, None, min_volume_ml=0.01)
    assert len(nodules) == 1 and out[30, 30, 10] == 0 and nodules[0].mean_probability is None


def test_longest_diameter_of_a_large_flat_component_uses_the_hull():
    mask = np.zeros((80, 80, 3), np.uint8)
    mask[0:80, 0:80, 1] = 1  # 6,400 voxels in one slice: qhull needs joggling
    _, nodules = nodule_components(mask, grid(), None)
    assert nodules[0].longest_diameter_mm == pytest.approx(np.hypot(79, 79), abs=1e-3)


def test_nodule_report_files(tmp_path):
    mask = np.zeros((10, 10, 10), np.uint8)
    mask[2:4, 2:4, 2:4] = 1
    _, nodules = nodule_components(mask, grid(), np.full((10, 10, 10), 0.7, np.float32))
    write_nodule_report(nodules, tmp_path / "c.nodules.json", tmp_path / "c.nodules.csv", source="c.nii.gz")
    report = json.loads((tmp_path / "c.nodules.json").read_text())
    assert report["coordinate_system"] == "LPS" and report["count"] == 1
    entry = report["nodules"][0]
    assert set(entry) >= {"id", "centre_lps_mm", "volume_ml", "longest_diameter_mm", "mean_probability"}
    assert entry["centre_lps_mm"] == [2.5, 2.5, 2.5]
    rows = list(csv.DictReader((tmp_path / "c.nodules.csv").open()))
    assert rows[0]["centre_lps_x_mm"] == "2.5" and float(rows[0]["mean_probability"]) == pytest.approx(0.7)
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind
