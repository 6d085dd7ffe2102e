"""Point-prompted nodules (infer --points) on a synthetic chest phantom: grid, chosen component, bad points."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage
from torch import nn

from unetpp3d.commands.infer import run_inference
from unetpp3d.config import Config, Preprocessing
from unetpp3d.errors import UserError
from unetpp3d.geometry import Geometry
from unetpp3d.imageio.writer import write_image
from unetpp3d.inference.nodules import index_to_lps
from unetpp3d.inference.points import Point, lps_to_index, read_points, segment_points
from unetpp3d.inference.predictor import Predictor
from unetpp3d.model.network import UNetPlusPlus3D
from unetpp3d.synth.phantom import make_phantom

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPACING = (3.75, 3.75, 6.0)
DIRECTION = (0, 1, 0, -1, 0, 0, 0, 0, 1)  # axes swapped and one reversed: world and index differ
THRESHOLD_HU = -400.0


class ThresholdNet(nn.Module):
    """Nodule wherever the normalised input is above 0, i.e. above THRESHOLD_HU: soft tissue, not lung."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([-x, x], dim=1) * 10.0


def _prep(task: str = "lung_nodule") -> Preprocessing:
    return Preprocessing(task=task, labels={"0": "background", "1": "nodule"}, target_spacing=list(SPACING),
                         intensity_range=[-1000.0, 400.0], intensity_stats=[THRESHOLD_HU, 100.0],
                         patch_size=[16, 16, 8], crop_foreground=False)


@pytest.fixture(scope="module")
def chest(tmp_path_factory):
    """A chest phantom (seed 28: a 70-voxel nodule clear of vessels), its nodule mask and centre in LPS mm."""
    image, label, spacing, origin, direction = make_phantom("lung_nodule", 28, size=(96, 96, 32), spacing=SPACING,
                                                            direction=DIRECTION)
    image = image.astype(np.int16)  # as stored: the reported mean HU is of the file's values
    geometry = Geometry(image.shape, spacing, origin, direction)
    path = write_image(image, geometry, tmp_path_factory.mktemp("chest") / "chest.nii.gz")
    components, _ = ndimage.label(label)
    nodule = components == np.argmax(np.bincount(components.ravel())[1:]) + 1
    centre = index_to_lps(geometry, np.argwhere(nodule).mean(axis=0))[0]
    return path, image, nodule, geometry, tuple(float(v) for v in centre)


def _predictor() -> Predictor:
    return Predictor(ThresholdNet(), _prep(), device="cpu", keep_probabilities=True, progress=False, amp=False)


def test_the_nodule_at_the_point_lands_on_the_scans_grid_alone(chest):
    path, image, nodule, geometry, centre = chest
    labels, grid, results = segment_points(_predictor(), path, [Point(1, "n1", centre)], crop_mm=60.0)
    assert grid == geometry and labels.shape == geometry.size
    (r,) = results
    assert r.status == "ok" and r.distance_mm == 0.0
    found = labels == 1
    # The threshold also marks the chest wall and vessels in the crop: only the nodule's component is kept.
    assert not (found & ~ndimage.binary_dilation(nodule, iterations=2)).any()
    assert 2 * (found & nodule).sum() / (found.sum() + nodule.sum()) > 0.7
    assert r.voxels == found.sum()
    assert r.volume_ml == pytest.approx(found.sum() * np.prod(SPACING) / 1000, rel=1e-4)
    assert r.mean_hu == pytest.approx(float(image[found].mean()), abs=0.1) and r.mean_hu > THRESHOLD_HU
    assert r.longest_diameter_mm > 2 * SPACING[0] and r.mean_probability > 0.9
    assert r.head_disagreement is None  # a network without heads has no disagreement to report
    assert np.linalg.norm(np.subtract(r.centre_lps_mm, centre)) < SPACING[2]


def test_the_component_touching_the_point_is_chosen_over_its_neighbours(chest):
    path, image, nodule, geometry, centre = chest
    tissue = image > THRESHOLD_HU
    # A point on the chest wall, in the same crop as the nodule: it gets the wall's component.
    components, _ = ndimage.label(tissue)
    wall_label = np.argmax(np.bincount(components.ravel())[1:]) + 1
    wall = np.argwhere(components == wall_label)
    nodule_index = lps_to_index(geometry, centre)
    near = wall[np.argmin(np.linalg.norm((wall - nodule_index) * SPACING, axis=1))]
    wall_point = tuple(float(v) for v in index_to_lps(geometry, near)[0])
    labels, _, results = segment_points(_predictor(), path, [Point(1, "nodule", centre), Point(2, "wall", wall_point)],
                                        crop_mm=60.0)
    assert [r.status for r in results] == ["ok", "ok"]
    assert labels[tuple(near)] == 2 and not (labels[nodule] == 2).any()
    assert (labels == 1).sum() < 0.1 * (labels == 2).sum()


def test_a_point_outside_or_on_nothing_is_reported_and_the_others_go_on(chest):
    path, image, nodule, geometry, centre = chest
    lung = ndimage.distance_transform_edt(image < THRESHOLD_HU, sampling=SPACING) > 12.0
    empty = tuple(float(v) for v in index_to_lps(geometry, np.argwhere(lung)[len(np.argwhere(lung)) // 2])[0])
    points = [Point(1, "far", (5000.0, 0.0, 0.0)), Point(2, "air", empty), Point(3, "nodule", centre)]
    labels, _, results = segment_points(_predictor(), path, points, crop_mm=20.0)
    assert [r.status for r in results] == ["outside", "nothing found", "ok"]
    assert "outside the scan" in results[0].note and "world LPS" in results[0].note
    assert "mm from the point" in results[1].note or "segmented nothing" in results[1].note
    assert set(np.unique(labels)) == {0, 3}


def test_read_points_checks_its_columns_and_values(tmp_path):
    good = tmp_path / "good.csv"
    good.write_text("seriesuid,coordX,coordY,coordZ,id\n1.2.3,1.5,-2,30,a\n1.2.3,0,0,0,\n", encoding="utf-8")
    points = read_points(good)
    assert [(p.row, p.id, p.lps_mm) for p in points] == [(1, "a", (1.5, -2.0, 30.0)), (2, "2", (0.0, 0.0, 0.0))]
    (tmp_path / "cols.csv").write_text("x,y,z\n1,2,3\n", encoding="utf-8")
    with pytest.raises(UserError, match="coordX, coordY, coordZ"):
        read_points(tmp_path / "cols.csv")
    (tmp_path / "bad.csv").write_text("coordX,coordY,coordZ\n1,2,3\n1,two,3\n", encoding="utf-8")
    with pytest.raises(UserError, match="row 2"):
        read_points(tmp_path / "bad.csv")
    with pytest.raises(UserError, match="no such file"):
        read_points(tmp_path / "missing.csv")


def test_cli_writes_labels_on_the_scans_grid_and_a_report_per_point(chest, tmp_path):
    path, image, nodule, geometry, centre = chest
    torch.manual_seed(0)
    net = UNetPlusPlus3D(1, 2, (4, 8, 16), strides=[[2, 2, 2], [2, 2, 1]])
    ckpt = tmp_path / "model" / "best.pt"
    ckpt.parent.mkdir()
    torch.save({"model_args": net.model_args, "state_dict": net.state_dict(), "preprocessing": _prep().to_dict(),
                "config": Config(task="lung_nodule").to_dict(), "epoch": 1}, ckpt)
    points = tmp_path / "points.csv"
    points.write_text(f"coordX,coordY,coordZ,id\n{centre[0]},{centre[1]},{centre[2]},n1\n9000,0,0,far\n",
                      encoding="utf-8")
    out = tmp_path / "out"
    rc = run_inference([path], out, model=ckpt, points=points, device="cpu", crop_mm=40.0)
    assert rc == 2  # the point outside the scan is the user's to fix: reported, not raised
    mask, scan = sitk.ReadImage(str(out / "chest.nii.gz")), sitk.ReadImage(str(path))
    assert mask.GetSize() == scan.GetSize()
    np.testing.assert_allclose(mask.GetSpacing(), scan.GetSpacing())
    np.testing.assert_allclose(mask.GetOrigin(), scan.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(mask.GetDirection(), scan.GetDirection(), atol=1e-6)
    assert set(np.unique(sitk.GetArrayFromImage(mask))) <= {0, 1}
    report = json.loads((out / "chest.points.json").read_text())
    assert [r["status"] for r in report["results"]][1] == "outside"
    assert report["results"][0]["status"] in ("ok", "nothing found")
    if report["results"][0]["status"] == "ok":  # an untrained UNet++ DS: its heads disagree
        assert report["results"][0]["head_disagreement"] > 0
    rows = list(csv.DictReader((out / "chest.points.csv").open()))
    assert [r["id"] for r in rows] == ["n1", "far"] and rows[1]["status"] == "outside"
    with pytest.raises(UserError, match="exactly one scan"):
        run_inference([path, path], out, model=ckpt, points=points, device="cpu")
    with pytest.raises(UserError, match="give a folder"):
        run_inference([path], tmp_path / "mask.nii.gz", model=ckpt, points=points, device="cpu")
