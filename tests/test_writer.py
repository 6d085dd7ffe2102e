"""writer: masks land on the exact input grid (SimpleITK and nibabel agree), atomically."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from unetpp3d.errors import UserError
from unetpp3d.geometry import Geometry
from unetpp3d.imageio.readers import read_image
from unetpp3d.imageio.writer import write_image, write_mask

OBLIQUE = tuple(sitk.VersorRigid3DTransform((0.1, 0.2, 0.3, 0.927)).GetMatrix())
PERMUTED = (0, 0, 1, 1, 0, 0, 0, 1, 0)


def blob(shape=(8, 9, 10)) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    mask[1:4, 2:7, 3:5] = 1
    mask[5:7, 1:3, 6:9] = 2
    return mask


def assert_same_grid_both_readers(path, geometry: Geometry, atol: float = 1e-4) -> None:
    img = sitk.ReadImage(str(path))
    assert Geometry.from_sitk(img).same_grid(geometry), (Geometry.from_sitk(img), geometry)
    if str(path).endswith((".nii", ".nii.gz")):
        ni = nib.load(str(path))
        assert ni.shape == geometry.size
        np.testing.assert_allclose(ni.affine, geometry.affine_ras(), atol=atol)


@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), (-1, 0, 0, 0, -1, 0, 0, 0, 1), PERMUTED, OBLIQUE])
def test_mask_round_trip_keeps_values_and_grid(tmp_path, direction):
    g = Geometry((8, 9, 10), (0.7, 0.8, 2.5), (-12.5, 30.25, -100.0), direction)
    path = write_mask(blob(), g, tmp_path / "out" / "mask.nii.gz")
    assert path.read_bytes()[:2] == b"\x1f\x8b"  # gzip-compressed
    assert_same_grid_both_readers(path, g)
    back, bg = read_image(path, is_label=True)
    np.testing.assert_array_equal(back, blob())
    # nibabel's voxel order is SimpleITK's index order too
    np.testing.assert_array_equal(np.asarray(nib.load(str(path)).dataobj), blob())


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".nii"])
def test_other_suffixes(tmp_path, suffix):
    g = Geometry((8, 9, 10), (0.7, 0.8, 2.5), (1.0, 2.0, 3.0), PERMUTED)
    path = write_mask(blob(), g, tmp_path / f"mask{suffix}")
    assert_same_grid_both_readers(path, g)
    np.testing.assert_array_equal(read_image(path, is_label=True)[0], blob())


def test_label_types(tmp_path):
    g = Geometry((8, 9, 10), (1, 1, 1), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert sitk.ReadImage(str(write_mask(blob().astype(bool), g, tmp_path / "b.nii.gz"))).GetPixelID() == sitk.sitkUInt8
    many = blob().astype(np.int64) * 200
    path = write_mask(many, g, tmp_path / "many.nii.gz")
    assert sitk.ReadImage(str(path)).GetPixelID() == sitk.sitkInt16
    np.testing.assert_array_equal(read_image(path, is_label=True)[0], many)
    assert read_image(write_mask(blob().astype(np.float32), g, tmp_path / "f.nii.gz"), is_label=True)[0].max() == 2


def test_bad_inputs(tmp_path):
    g = Geometry((8, 9, 10), (1, 1, 1), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    with pytest.raises(ValueError, match="does not match"):
        write_mask(np.zeros((10, 9, 8), np.uint8), g, tmp_path / "m.nii.gz")
    with pytest.raises(ValueError, match="whole class numbers"):
        write_mask(np.full((8, 9, 10), 0.5, np.float32), g, tmp_path / "m.nii.gz")
    with pytest.raises(UserError, match="name the file .nii.gz"):
        write_mask(blob(), g, tmp_path / "m.png")
    with pytest.raises(UserError, match="name the file .nii.gz"):
        write_mask(blob(), g, tmp_path / "m.mhd")  # two files: cannot be atomic


def test_write_is_atomic_and_replaces(tmp_path):
    g = Geometry((8, 9, 10), (1, 1, 1), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    path = tmp_path / "mask.nii.gz"
    write_mask(blob(), g, path)
    write_mask(blob() * 0, g, path)
    assert read_image(path, is_label=True)[0].max() == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.nii.gz"]  # no temporary left behind


def test_write_image_types(tmp_path):
    g = Geometry((8, 9, 10), (0.5, 0.5, 1.0), (0, 0, 0), (-1, 0, 0, 0, -1, 0, 0, 0, 1))
    hu = (np.arange(720).reshape(8, 9, 10) - 360).astype(np.int16)
    back, bg = read_image(write_image(hu, g, tmp_path / "ct.nii.gz"))
    assert back.dtype == np.int16 and bg.same_grid(g)
    np.testing.assert_array_equal(back, hu)
    back, _ = read_image(write_image(hu.astype(np.float64) / 7, g, tmp_path / "f.nii.gz"))
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, hu / 7, rtol=1e-6)


# Real cases: a mask written on a real scan's geometry reads back on that scan's grid.


def test_real_nifti_grid(shared_data, tmp_path):
    src = shared_data / "abdomen_ct_ts" / "ct.nii.gz"
    ct, g = read_image(src)
    path = write_mask(ct > 0, g, tmp_path / "mask.nii.gz")
    assert_same_grid_both_readers(path, g)
    np.testing.assert_allclose(nib.load(str(path)).affine, nib.load(str(src)).affine, atol=1e-4)
    np.testing.assert_array_equal(read_image(path, is_label=True)[0], ct > 0)


def test_real_nrrd_label_grid(shared_data, tmp_path):
    label, g = read_image(shared_data / "abdomen_ct_3slice_dcmqi" / "liver_spine.nrrd", is_label=True)
    path = write_mask(label, g, tmp_path / "liver_spine.nii.gz")
    assert_same_grid_both_readers(path, g)
    np.testing.assert_array_equal(read_image(path, is_label=True)[0], label)


def test_real_dicom_grid(shared_data, tmp_path):
    ct, g = read_image(shared_data / "abdomen_ct_dicom_ts" / "dicom")
    mask = (ct > 100).astype(np.uint8)
    path = write_mask(mask, g, tmp_path / "mask.nii.gz")
    assert_same_grid_both_readers(path, g)
    np.testing.assert_array_equal(read_image(path, is_label=True)[0], mask)
