"""Synthetic phantoms: determinism, plausible HU, label shape and size, geometry, dataset layout."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from unetpp3d import UserError
from unetpp3d.data.manifest import load_manifest
from unetpp3d.imageio.readers import read_image
from unetpp3d.synth.anatomy import FOV_MM, NODULE_DIAMETER_MM, sample_anatomy
from unetpp3d.synth.phantom import make_phantom, sample_geometry, write_dataset


def _sitk(array_xyz, spacing, origin, direction) -> sitk.Image:
    img = sitk.GetImageFromArray(np.ascontiguousarray(array_xyz.transpose(2, 1, 0)))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


@pytest.mark.parametrize("task", ["liver", "lung_nodule"])
def test_same_seed_same_phantom_other_seed_other_phantom(task):
    a_img, a_lab, *a_geo = make_phantom(task, seed=7, size=32)
    b_img, b_lab, *b_geo = make_phantom(task, seed=7, size=32)
    c_img, *_ = make_phantom(task, seed=8, size=32)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    assert a_geo == b_geo
    assert np.abs(a_img - c_img).mean() > 5.0
    assert a_img.dtype == np.float32 and a_lab.dtype == np.uint8 and a_img.shape == (32, 32, 32)


def test_default_grid_is_isotropic_and_covers_the_field_of_view():
    _, _, spacing, origin, direction = make_phantom("liver", seed=0, size=32)
    assert spacing == (FOV_MM["liver"] / 32,) * 3
    assert direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    # Centred on the patient: the centre of the grid is world (0, 0, 0).
    np.testing.assert_allclose(np.asarray(origin) + np.asarray(spacing) * 31 / 2, 0.0, atol=1e-9)


def test_abdomen_hu_are_ct_like():
    img, lab, *_ = make_phantom("liver", seed=1, size=48)
    assert img.min() >= -1024 and img.max() <= 3071
    assert img[:3, :3, :].mean() < -950  # air in the corners, outside the body
    inner = ndimage.binary_erosion(lab > 0, iterations=1)  # away from partial-volume edges
    assert 40 <= np.median(img[inner]) <= 80
    assert (img > 400).sum() > 50  # spine and ribs
    assert ((img > -150) & (img < -50)).sum() > 1000  # subcutaneous fat
    assert (img < -700).sum() > (img < -990).sum()  # gas in bowel/stomach and lung bases, not only outside air


def test_chest_hu_are_ct_like():
    img, lab, *_ = make_phantom("lung_nodule", seed=1, size=48)
    lung = (img > -950) & (img < -700)
    assert lung.mean() > 0.05
    assert (img > 400).sum() > 50
    assert lab.any() and lab.mean() < 0.005  # nodules are a tiny share of the scan


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_liver_is_one_component_on_the_patients_right(seed):
    img, lab, spacing, origin, _ = make_phantom("liver", seed=seed, size=40)
    assert lab.sum() > 300
    _, n = ndimage.label(lab)
    assert n == 1
    # Patient's right is -x in LPS; identity direction, so x world = origin + i * spacing.
    centroid_x = origin[0] + np.nonzero(lab)[0].mean() * spacing[0]
    assert centroid_x < 0


def test_nodules_are_3_to_30_mm_and_of_every_kind():
    nodules = [n for seed in range(20) for n in sample_anatomy("lung_nodule", seed).nodules]
    counts = [len(sample_anatomy("lung_nodule", seed).nodules) for seed in range(20)]
    assert min(counts) >= 1
    diameters = np.array([n.diameter_mm for n in nodules])
    assert diameters.min() >= NODULE_DIAMETER_MM[0] and diameters.max() <= NODULE_DIAMETER_MM[1]
    assert (diameters < 8).any()  # small ones exist: the task is not trivial
    assert {n.kind for n in nodules} == {"isolated", "juxtapleural", "juxtavascular"}


def test_rendered_nodule_has_its_nominal_size():
    """On a fine 1 mm grid around an isolated, round nodule, the label's equivalent diameter matches."""
    for seed in range(40):
        found = [n for n in sample_anatomy("lung_nodule", seed).nodules
                 if n.kind == "isolated" and not n.lobulated and n.diameter_mm > 8]
        if found:
            break
    nodule = found[0]
    size = int(nodule.diameter_mm * 1.5) + 8
    origin = np.asarray(nodule.center) - (size - 1) / 2
    _, lab, *_ = make_phantom("lung_nodule", seed, size=size, spacing=(1.0, 1.0, 1.0), origin=origin)
    cc, _ = ndimage.label(lab)
    central = cc[size // 2, size // 2, size // 2]
    assert central > 0
    diameter = (6.0 * (cc == central).sum() / np.pi) ** (1 / 3)
    assert 0.8 * nodule.diameter_mm <= diameter <= 1.2 * nodule.diameter_mm


def test_random_geometry_keeps_the_anatomy_in_physical_space():
    seed = 5
    grid = sample_geometry("liver", seed, size=32)
    img, lab, spacing, origin, direction = make_phantom("liver", seed, **grid)
    assert len(set(np.round(spacing, 6))) > 1  # anisotropic
    assert tuple(img.shape) == grid["size"]
    # The same patient on a plain grid centred on them.
    ref_img, ref_lab, r_spacing, r_origin, r_direction = make_phantom("liver", seed, size=32,
                                                                      patient_center=grid["patient_center"])
    resampled = sitk.Resample(_sitk(lab, spacing, origin, direction), _sitk(ref_lab, r_spacing, r_origin, r_direction),
                              sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    back = sitk.GetArrayFromImage(resampled).transpose(2, 1, 0)
    assert _dice(back > 0, ref_lab > 0) > 0.85  # voxels of 12-16 mm: partial volume caps the Dice
    # Control: the same label read as if its direction were the identity lands elsewhere.
    reference = _sitk(ref_lab, r_spacing, r_origin, r_direction)
    wrong = sitk.Resample(_sitk(lab, spacing, origin, (1, 0, 0, 0, 1, 0, 0, 0, 1)), reference, sitk.Transform(),
                          sitk.sitkNearestNeighbor, 0)
    assert _dice(sitk.GetArrayFromImage(wrong).transpose(2, 1, 0) > 0, ref_lab > 0) < 0.5
    # The image agrees with its own label: liver HU where the label is.
    inner = ndimage.binary_erosion(lab > 0)
    assert 30 <= np.median(img[inner]) <= 90


def test_random_geometry_varies_direction_spacing_and_origin():
    grids = [sample_geometry("liver", seed, size=32) for seed in range(8)]
    assert len({g["direction"] for g in grids}) > 3
    assert any(g["direction"] != (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0) for g in grids)
    assert len({g["spacing"] for g in grids}) == 8
    assert len({g["origin"] for g in grids}) == 8
    for g in grids:
        dmat = np.asarray(g["direction"]).reshape(3, 3)
        np.testing.assert_allclose(np.abs(dmat).sum(0), 1.0)  # a signed permutation
        assert max(g["spacing"]) / min(g["spacing"]) >= 1.0


def test_phantom_of_96_voxels_is_fast():
    start = time.perf_counter()
    make_phantom("lung_nodule", seed=0, size=96)
    # Typically ~0.1 s; the bound is loose because CI machines are shared.
    assert time.perf_counter() - start < 2.0


def test_write_dataset_layout_and_manifest(tmp_path):
    path = write_dataset("liver", 5, tmp_path / "ds", seed=3, size=24)
    assert path == tmp_path / "ds" / "manifest.json"
    manifest = json.loads(path.read_text())
    assert manifest["task"] == "liver"
    assert manifest["labels"] == {"0": "background", "1": "liver"}
    assert manifest["modality"] == {"0": "CT"}
    assert len(manifest["training"]) == 4 and len(manifest["test"]) == 1
    for case in manifest["training"]:
        image, geo = read_image(path.parent / case["image"])
        label, lgeo = read_image(path.parent / case["label"], is_label=True)
        assert image.dtype == np.int16 and label.dtype == np.uint8
        assert geo == lgeo and geo.size == (24, 24, 24)
        assert set(np.unique(label)) == {0, 1}
    test_image = manifest["test"][0]
    assert test_image.startswith("imagesTs/")
    assert (path.parent / test_image).is_file()
    assert (path.parent / test_image.replace("imagesTs", "labelsTs")).is_file()
    assert not list(path.parent.rglob(".*"))  # no temporary files left behind
    loaded = load_manifest(path)
    assert loaded.task == "liver" and loaded.labels == {0: "background", 1: "liver"}
    assert [c.name for c in loaded.training] == [f"liver_00{i}" for i in range(4)]
    assert [c.image for c in loaded.test] == [(path.parent / test_image).resolve()]


def test_write_dataset_is_deterministic_and_random_geometry_changes_grids(tmp_path):
    a = write_dataset("lung_nodule", 2, tmp_path / "a", seed=11, size=24, random_geometry=True)
    b = write_dataset("lung_nodule", 2, tmp_path / "b", seed=11, size=24, random_geometry=True)
    plain = write_dataset("lung_nodule", 2, tmp_path / "c", seed=11, size=24)
    manifest = json.loads(a.read_text())
    assert manifest["test"] == []  # fewer than 3 cases: all for training
    for case in manifest["training"]:
        img_a, geo_a = read_image(a.parent / case["image"])
        img_b, geo_b = read_image(b.parent / case["image"])
        _, geo_plain = read_image(plain.parent / case["image"])
        np.testing.assert_array_equal(img_a, img_b)
        assert geo_a == geo_b
        assert geo_a != geo_plain


def test_bad_arguments_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not one of"):
        make_phantom("brain", seed=0, size=16)
    with pytest.raises(UserError, match=r"--cases 0: give a number of phantoms from 1 to"):
        write_dataset("liver", 0, tmp_path)
    with pytest.raises(UserError, match="direction"):
        make_phantom("liver", seed=0, size=16, direction=(1, 0, 0, 0, 2, 0, 0, 0, 1))


def test_cli_synth_prints_the_manifest_path(tmp_path):
    from typer.testing import CliRunner

    from unetpp3d.commands.cli import app

    result = CliRunner().invoke(app, ["synth", "--task", "lung_nodule", "--cases", "1", "--size", "20",
                                      "--out", str(tmp_path / "s"), "--random-geometry"])
    assert result.exit_code == 0, result.output
    assert str(tmp_path / "s" / "manifest.json") in result.output
