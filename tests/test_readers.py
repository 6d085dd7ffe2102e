"""readers: geometry, validation of every input we refuse, real CT cases, DICOM series, MONAI reader."""

from __future__ import annotations

import gzip
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from factories import ONE_THREAD, write_dicom_series

from unetpp3d.errors import UserError
from unetpp3d.geometry import Geometry, align_label_to_image, axis_mapping, check_pair
from unetpp3d.imageio.readers import SitkReader, read_image

FLIP_XY = (-1, 0, 0, 0, -1, 0, 0, 0, 1)
# Index x runs along physical y, index y along physical z, index z along physical x.
PERMUTED = (0, 0, 1, 1, 0, 0, 0, 1, 0)


def ramp(shape=(8, 9, 10), dtype=np.float32) -> np.ndarray:
    """Distinct values everywhere, so any flip or transpose shows."""
    return np.arange(np.prod(shape), dtype=dtype).reshape(shape)


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------


def test_geometry_dict_round_trip_and_ras_affine():
    g = Geometry((4, 5, 6), (0.5, 0.7, 2.0), (10.0, -3.0, 7.0), FLIP_XY)
    assert Geometry.from_dict(g.to_dict()) == g
    lps, ras = g.affine_lps(), g.affine_ras()
    np.testing.assert_allclose(ras[:2], -lps[:2])
    np.testing.assert_allclose(ras[2:], lps[2:])
    np.testing.assert_allclose(lps[:3, :3], np.diag([-0.5, -0.7, 2.0]))
    with pytest.raises(UserError):
        Geometry.from_dict({"size": [1, 2, 3]})


def test_affine_matches_simpleitk_index_to_physical():
    g = Geometry((4, 5, 6), (0.5, 0.7, 2.0), (10.0, -3.0, 7.0), PERMUTED)
    img = g.apply_to(sitk.Image(4, 5, 6, sitk.sitkUInt8))
    for idx in [(0, 0, 0), (3, 1, 5), (2, 4, 1)]:
        np.testing.assert_allclose(g.index_to_physical(idx)[0], img.TransformIndexToPhysicalPoint(idx))


def test_reoriented_geometry_describes_the_flipped_array():
    g = Geometry((4, 5, 6), (0.5, 0.7, 2.0), (10.0, -3.0, 7.0), PERMUTED)
    perm, flips = (2, 0, 1), (True, False, True)
    h = g.reoriented(perm, flips)
    arr = ramp((4, 5, 6))
    moved = np.flip(arr.transpose(perm), axis=[0, 2])
    # The same value sits at the same physical point in both indexings.
    for idx in [(0, 0, 0), (5, 3, 4), (2, 1, 0)]:
        p = h.index_to_physical(idx)[0]
        src = np.linalg.solve(g.affine_lps()[:3, :3], p - np.array(g.origin)).round().astype(int)
        assert moved[idx] == arr[tuple(src)]
    assert axis_mapping(g, h) == (perm, flips)


def test_same_grid_tolerance():
    g = Geometry((10, 10, 10), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert g.same_grid(Geometry(g.size, g.spacing, (0.001, 0, 0), g.direction))
    assert not g.same_grid(Geometry(g.size, g.spacing, (0.5, 0, 0), g.direction))
    assert not g.same_grid(Geometry(g.size, (1.0, 1.0, 2.1), g.origin, g.direction))
    assert not g.same_grid(Geometry((10, 10, 9), g.spacing, g.origin, g.direction))


def test_ras_axes_agree_with_monai_orientation(make_image):
    from monai.transforms import LoadImaged, Orientationd

    arr = ramp((6, 7, 8))
    path = make_image("perm.nii.gz", arr, spacing=(1.0, 2.0, 3.0), origin=(5, 6, 7), direction=PERMUTED)
    _, g = read_image(path)
    perm, flips = g.ras_axes()
    ours = np.flip(arr.transpose(perm), axis=[k for k in range(3) if flips[k]])
    d = LoadImaged(keys="image", reader=SitkReader(), image_only=True, ensure_channel_first=True)({"image": path})
    ras = Orientationd(keys="image", axcodes="RAS")(d)["image"]
    np.testing.assert_array_equal(ras[0].numpy(), ours)
    np.testing.assert_allclose(ras.affine.numpy(), g.to_ras().affine_ras(), atol=1e-6)
    assert g.to_ras().spacing == (3.0, 1.0, 2.0)


# ---------------------------------------------------------------------------------------------
# Reading files, and every input we refuse
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_read_returns_xyz_array_and_geometry(make_image, suffix):
    arr = ramp()
    path = make_image(f"img{suffix}", arr, spacing=(0.5, 0.75, 2.5), origin=(1, 2, 3), direction=FLIP_XY)
    out, g = read_image(path)
    np.testing.assert_array_equal(out, arr)
    assert g.size == (8, 9, 10)
    np.testing.assert_allclose(g.spacing, (0.5, 0.75, 2.5), rtol=1e-6)
    np.testing.assert_allclose(g.origin, (1, 2, 3), atol=1e-5)
    np.testing.assert_allclose(g.direction, FLIP_XY, atol=1e-6)


def test_labels_come_back_as_integers(make_image):
    arr = np.zeros((8, 8, 8), dtype=np.float32)
    arr[2:5, 2:5, 2:5] = 2.0
    out, _ = read_image(make_image("lab.nii.gz", arr), is_label=True)
    assert out.dtype == np.uint8 and out.max() == 2
    big = np.zeros((8, 8, 8), dtype=np.int32)
    big[0, 0, 0] = 300
    assert read_image(make_image("big.nii.gz", big), is_label=True)[0].dtype == np.int16


def refused(path, match, **kwargs) -> str:
    with pytest.raises(UserError, match=match) as info:
        read_image(path, **kwargs)
    message = str(info.value)
    assert str(path) in message, f"message does not name the file: {message}"
    assert "\n" not in message
    return message


def test_missing_path(tmp_path):
    refused(tmp_path / "nope.nii.gz", "no such file")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.nii.gz"
    path.write_bytes(b"")
    refused(path, "empty")


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_bytes(b"this is not an image at all")
    refused(path, "cannot read")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_truncated_nifti(make_image, suffix):
    # ITK reads both silently with the missing end zero-filled; we must not.
    path = make_image(f"t{suffix}", np.random.default_rng(0).random((32, 32, 32), dtype=np.float32))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    refused(path, "truncated")


def test_multi_member_gzip_nifti_is_accepted(make_image, tmp_path):
    """A valid .nii.gz whose trailer does not hold the total length (two gzip members)."""
    arr = ramp((8, 8, 8))
    raw = gzip.decompress(make_image("one.nii.gz", arr).read_bytes())
    path = tmp_path / "two.nii.gz"
    path.write_bytes(gzip.compress(raw[:500]) + gzip.compress(raw[500:]))
    np.testing.assert_array_equal(read_image(path)[0], arr)


def test_2d_image(tmp_path):
    path = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkInt16), str(path))
    refused(path, "2D image")


def test_single_slice_3d_image(make_image):
    refused(make_image("slice.nii.gz", np.zeros((8, 8, 1), np.int16)), "single 2D slice")


def test_multichannel_4d_refused_single_channel_4d_squeezed(tmp_path):
    multi = tmp_path / "multi.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.float32), np.eye(4)), str(multi))
    refused(multi, "3 channels")
    single = tmp_path / "single.nii.gz"
    nib.save(nib.Nifti1Image(ramp((8, 8, 8, 1)), np.eye(4)), str(single))
    out, g = read_image(single)
    assert out.shape == (8, 8, 8) and g.size == (8, 8, 8)
    np.testing.assert_array_equal(out, ramp((8, 8, 8)))


def test_5d_with_singleton_dims_is_squeezed(tmp_path):
    path = tmp_path / "five.nii.gz"
    nib.save(nib.Nifti1Image(ramp((8, 8, 8, 1, 1)), np.eye(4)), str(path))
    assert read_image(path)[0].shape == (8, 8, 8)


def test_vector_image_refused(tmp_path):
    path = tmp_path / "rgb.mha"
    sitk.WriteImage(sitk.Image([8, 8, 8], sitk.sitkVectorUInt8, 3), str(path))
    refused(path, "3 components")


def test_nan_voxels(make_image):
    arr = ramp()
    arr[1, 2, 3] = np.nan
    arr[4, 4, 4] = np.inf
    msg = refused(make_image("nan.nii.gz", arr), "NaN or infinite")
    assert "2 voxel(s)" in msg and "(1, 2, 3)" in msg


def test_non_integer_label(make_image):
    arr = np.zeros((8, 8, 8), np.float32)
    arr[3, 3, 3] = 0.5
    refused(make_image("half.nii.gz", arr), "whole class numbers, found 0.5", is_label=True)
    # the same file is a fine image
    assert read_image(make_image("half2.nii.gz", arr))[0].dtype == np.float32


def _mhd(tmp_path: Path, name: str, dims: str, spacing: str) -> Path:
    (tmp_path / f"{name}.raw").write_bytes(np.zeros(8 * 8 * 8, np.int16).tobytes())
    path = tmp_path / f"{name}.mhd"
    path.write_text(f"ObjectType = Image\nNDims = 3\nDimSize = {dims}\nElementSpacing = {spacing}\n"
                    f"ElementType = MET_SHORT\nElementDataFile = {name}.raw\n")
    return path


def test_non_positive_spacing(tmp_path):
    refused(_mhd(tmp_path, "zero", "8 8 8", "0 1 -1"), "spacing .* is not positive")


def test_too_large_for_memory_is_refused_from_the_header(tmp_path):
    # 10^15 voxels: the header alone must be enough to refuse it (its data file has 1 kB).
    msg = refused(_mhd(tmp_path, "huge", "100000 100000 100000", "1 1 1"), "memory")
    assert "PiB" in msg or "TiB" in msg


# ---------------------------------------------------------------------------------------------
# DICOM series written in the test
# ---------------------------------------------------------------------------------------------


def test_dicom_series_reads_in_position_order(tmp_path):
    # Files named against the slice order: the reader must sort by position, not by name.
    folder = write_dicom_series(tmp_path / "series", positions=[6.0, 2.0, 4.0, 0.0])
    arr, g = read_image(folder)
    assert g.size == (8, 8, 4)
    np.testing.assert_allclose(g.spacing, (0.5, 0.5, 2.0))
    np.testing.assert_allclose(g.origin, (-10, -20, 0))
    # s3 (z=0) holds pixels*4, s1 (z=2) pixels*2, s2 (z=4) pixels*3, s0 (z=6) pixels*1
    assert [int(arr[1, 0, k]) for k in range(4)] == [4, 2, 3, 1]


def test_folder_without_dicom(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "README.txt").write_text("no images here")
    refused(folder, "no DICOM files")


def test_folder_with_two_series_lists_them_and_series_uid_picks(tmp_path):
    folder = tmp_path / "two"
    write_dicom_series(folder, uid="1.2.3.100", prefix="a")
    write_dicom_series(folder, uid="1.2.3.200", prefix="b", n=5)
    msg = refused(folder, "2 DICOM series")
    assert "1.2.3.100 (4 files)" in msg and "1.2.3.200 (5 files)" in msg and "--series-uid" in msg
    assert read_image(folder, series_uid="1.2.3.200")[1].size == (8, 8, 5)
    refused(folder, "no DICOM series with SeriesInstanceUID 9.9", series_uid="9.9")


def test_missing_slice_reports_largest_deviation(tmp_path):
    folder = write_dicom_series(tmp_path / "gap", positions=[0.0, 2.0, 4.0, 8.0, 10.0])
    msg = refused(folder, "not evenly spaced")
    assert "2 mm" in msg and "s2.dcm and s3.dcm" in msg


def test_duplicate_slice_position(tmp_path):
    folder = write_dicom_series(tmp_path / "dup", positions=[0.0, 2.0, 2.0, 4.0])
    refused(folder, "duplicate slice position")


def test_mixed_orientations(tmp_path):
    iops = [(1, 0, 0, 0, 1, 0)] * 3 + [(1, 0, 0, 0, 0, -1)]
    folder = write_dicom_series(tmp_path / "mixed", orientations=iops)
    refused(folder, "mixed slice orientations")


def test_gantry_tilt_is_refused(tmp_path):
    # evenly spaced along the normal, but each slice shifted 0.5 mm in y: a sheared grid
    folder = write_dicom_series(tmp_path / "tilt", positions=[(-10, -20 + 0.5 * k, 2.0 * k) for k in range(4)])
    refused(folder, "drift sideways by up to 1.5 mm")


def test_single_file_series_is_2d(tmp_path):
    refused(write_dicom_series(tmp_path / "one", n=1), "single 2D slice")


def drop_pixel_spacing(path: Path) -> None:
    """Rename the file's PixelSpacing (0028,0030) element to (0028,0031): still valid DICOM, no pixel size."""
    data = bytearray(path.read_bytes())
    pos = data.find(b"\x28\x00\x30\x00")
    while pos >= 0:
        explicit = data[pos + 4:pos + 6] == b"DS"
        length = int.from_bytes(data[pos + 6:pos + 8] if explicit else data[pos + 4:pos + 8], "little")
        value = bytes(data[pos + 8:pos + 8 + length])
        if 0 < length <= 64 and value.count(b"\\") == 1:
            data[pos + 2] = 0x31
            path.write_bytes(bytes(data))
            return
        pos = data.find(b"\x28\x00\x30\x00", pos + 1)
    raise AssertionError(f"{path}: no PixelSpacing element found")


def test_dicom_series_without_pixel_spacing_is_refused(tmp_path):
    """GDCM reads a series without PixelSpacing (0028,0030) as 1 x 1 mm pixels, silently."""
    folder = write_dicom_series(tmp_path / "series", n=4)
    assert read_image(folder)[1].spacing[:2] == (0.5, 0.5)
    for path in folder.iterdir():
        drop_pixel_spacing(path)
    assert sitk.ReadImage([str(p) for p in sorted(folder.iterdir())]).GetSpacing()[:2] == (1.0, 1.0)
    refused(folder, r"has no valid PixelSpacing \(0028,0030\).*1 x 1 mm")


def test_dicom_series_with_different_pixel_spacings_is_refused(tmp_path):
    folder = write_dicom_series(tmp_path / "series", n=4)
    last = sorted(folder.iterdir())[-1]
    data = last.read_bytes()
    assert data.count(b".5\\.5 ") == 1
    last.write_bytes(data.replace(b".5\\.5 ", b".6\\.6 "))
    refused(folder, "different PixelSpacing")


def test_single_dicom_file_without_pixel_spacing_is_refused(tmp_path):
    image = sitk.GetImageFromArray(np.arange(4 * 6 * 8, dtype=np.uint16).reshape(4, 6, 8))
    image.SetSpacing((0.7, 0.8, 2.0))
    path = tmp_path / "volume.dcm"
    sitk.WriteImage(image, str(path))
    assert read_image(path)[1].spacing[:2] == pytest.approx((0.7, 0.8))
    drop_pixel_spacing(path)
    assert sitk.ReadImage(str(path)).GetSpacing()[:2] == (1.0, 1.0)
    refused(path, r"has no PixelSpacing \(0028,0030\)")


# ---------------------------------------------------------------------------------------------
# NIfTI geometry and scaling, decided by the standard (and in agreement with nibabel)
# ---------------------------------------------------------------------------------------------

SFORM = np.array([[0.0, 0.0, 2.5, -40.0], [-0.7, 0.0, 0.0, 30.0], [0.0, 0.8, 0.0, 12.0], [0, 0, 0, 1]])


def nifti(path: Path, qform=None, qcode=0, sform=SFORM, scode=2, pixdim=None, slope=None, inter=None,
          data=None) -> Path:
    """A NIfTI file with its transforms, codes, pixdim and scaling set field by field."""
    img = nib.Nifti1Image(ramp((4, 5, 6), np.int16) if data is None else data, None)
    header = img.header
    header.set_sform(sform, code=scode)
    header.set_qform(qform, code=qcode)
    nib.save(img, str(path))
    fields = {"pixdim": pixdim, "scl_slope": slope, "scl_inter": inter}
    if any(v is not None for v in fields.values()):
        raw = bytearray(path.read_bytes()) if path.suffix == ".nii" else None
        assert raw is not None
        if pixdim is not None:
            struct_pixdim = np.frombuffer(bytes(raw[76:108]), "<f4").copy()
            struct_pixdim[1:4] = pixdim
            raw[76:108] = struct_pixdim.astype("<f4").tobytes()
        if slope is not None:
            raw[112:116] = np.float32(slope).astype("<f4").tobytes()
        if inter is not None:
            raw[116:120] = np.float32(inter).astype("<f4").tobytes()
        path.write_bytes(bytes(raw))
    return path


def assert_agrees_with_nibabel(path: Path) -> Geometry:
    array, geometry = read_image(path)
    np.testing.assert_allclose(geometry.affine_ras(), nib.load(str(path)).affine, atol=1e-4)
    np.testing.assert_array_equal(array, np.asarray(nib.load(str(path)).dataobj))
    return geometry


def test_nan_pixdim_with_a_valid_sform_reads_the_sforms_spacing(tmp_path):
    """Method 3 does not use pixdim; ITK took its NaN as 1 mm voxels."""
    path = nifti(tmp_path / "nan.nii", pixdim=[np.nan] * 3)
    assert sitk.ReadImage(str(path)).GetSpacing() == (1.0, 1.0, 1.0)
    assert assert_agrees_with_nibabel(path).spacing == pytest.approx((0.7, 0.8, 2.5))


def test_pixdim_that_disagrees_with_the_sform_reads_the_sform(tmp_path):
    path = nifti(tmp_path / "wrong.nii", pixdim=[3.0, 3.0, 3.0])
    assert assert_agrees_with_nibabel(path).spacing == pytest.approx((0.7, 0.8, 2.5))


def test_qform_and_sform_that_disagree_are_refused(tmp_path):
    """The standard says nothing about which wins; ITK reads the qform, nibabel and viewers the sform."""
    moved = SFORM.copy()
    moved[:3, 3] += [5.0, 0.0, 0.0]
    path = nifti(tmp_path / "both.nii", qform=moved, qcode=1)
    assert not np.allclose(nib.load(str(path)).header.get_qform(), nib.load(str(path)).affine)
    refused(path, r"the qform \(code 1\) and the sform \(code 2\) describe different grids")


def test_qform_and_sform_that_agree_are_read(tmp_path):
    path = nifti(tmp_path / "same.nii", qform=SFORM, qcode=1)
    assert_agrees_with_nibabel(path)


def test_a_broken_qform_gives_way_to_a_valid_sform(tmp_path):
    path = nifti(tmp_path / "q.nii", qform=SFORM, qcode=1, pixdim=[np.nan] * 3)
    assert assert_agrees_with_nibabel(path).spacing == pytest.approx((0.7, 0.8, 2.5))


def test_qform_only_is_read_as_before(tmp_path):
    path = nifti(tmp_path / "q.nii", qform=SFORM, qcode=1, sform=None, scode=0)
    assert assert_agrees_with_nibabel(path).spacing == pytest.approx((0.7, 0.8, 2.5))


def test_an_sform_with_shear_is_refused(tmp_path):
    sheared = SFORM.copy()
    sheared[0, 1] = 0.5
    refused(nifti(tmp_path / "shear.nii", sform=sheared), "has shear")


def test_a_nifti_without_qform_or_sform_is_refused(tmp_path):
    refused(nifti(tmp_path / "none.nii", sform=None, scode=0), "neither a qform nor an sform")


def test_qform_only_with_nan_pixdim_is_refused(tmp_path):
    refused(nifti(tmp_path / "q.nii", qform=SFORM, qcode=1, sform=None, scode=0, pixdim=[np.nan] * 3),
            "qform is not a valid transform")


@pytest.mark.parametrize("slope, inter", [(0.0, 5.0), (np.nan, 5.0), (-0.0, -3.0)])
def test_slope_zero_with_an_intercept_is_refused(tmp_path, slope, inter):
    """By the standard slope 0 means no scaling (nibabel); ITK adds the intercept anyway."""
    refused(nifti(tmp_path / "s.nii", slope=slope, inter=inter), "by the NIfTI standard a slope of 0 means no scaling")


@pytest.mark.parametrize("slope, inter", [(2.0, np.nan), (1.0, np.inf)])
def test_a_valid_slope_with_a_non_finite_intercept_is_refused(tmp_path, slope, inter):
    refused(nifti(tmp_path / "s.nii", slope=slope, inter=inter), "scl_inter is .*, not a number")


@pytest.mark.parametrize("slope, inter", [(2.0, 3.0), (0.0, 0.0), (np.nan, np.nan), (1.0, 0.0)])
def test_scaling_every_reader_agrees_on_is_read_as_nibabel_reads_it(tmp_path, slope, inter):
    path = nifti(tmp_path / "s.nii", slope=slope, inter=inter)
    array = read_image(path)[0]
    np.testing.assert_allclose(array, np.asarray(nib.load(str(path)).dataobj))


# ---------------------------------------------------------------------------------------------
# Read only what was named: detached data files, FIFOs and devices
# ---------------------------------------------------------------------------------------------


def mhd(folder: Path, data_file: str, name: str = "scan.mhd") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("ObjectType = Image\nNDims = 3\nDimSize = 2 3 4\nElementType = MET_UCHAR\n"
                    f"ElementSpacing = 1 1 1\nElementDataFile = {data_file}\n")
    return path


def nhdr(folder: Path, data_file: str, name: str = "scan.nhdr", key: str = "data file") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("NRRD0004\ntype: uchar\ndimension: 3\nsizes: 2 3 4\nspacings: 1 1 1\nencoding: raw\n"
                    f"{key}: {data_file}\n")
    return path


HEADERS = {"mhd": mhd, "nhdr": nhdr}
VOXELS = bytes(range(24))


@pytest.fixture
def secret(tmp_path) -> Path:
    """A file outside the header's folder whose bytes must never be read as voxels."""
    path = tmp_path / "secret.bin"
    path.write_bytes(b"S" * 24)
    return path


@pytest.mark.parametrize("header", HEADERS)
def test_a_data_file_beside_its_header_is_read(tmp_path, header):
    (tmp_path / "h" / "data.raw").parent.mkdir()
    (tmp_path / "h" / "data.raw").write_bytes(VOXELS)
    array = read_image(HEADERS[header](tmp_path / "h", "data.raw"))[0]
    assert array.transpose(2, 1, 0).tobytes() == VOXELS


@pytest.mark.parametrize("header", HEADERS)
@pytest.mark.parametrize("where", ["parent", "absolute", "symlink", "dotdot-inside-name"])
def test_a_data_file_outside_the_headers_folder_is_refused(tmp_path, secret, header, where):
    folder = tmp_path / "h"
    folder.mkdir()
    name = {"parent": "../secret.bin", "absolute": str(secret), "symlink": "link.raw",
            "dotdot-inside-name": "sub/../../secret.bin"}[where]
    (folder / "sub").mkdir()
    (folder / "link.raw").symlink_to(secret)
    refused(HEADERS[header](folder, name), "points outside the header's folder")


def test_an_nrrd_data_file_field_is_matched_as_teem_matches_it(tmp_path, secret):
    """teem takes "DATA FILE" and "datafile" as well as "data file"."""
    for key in ("DATA FILE", "datafile", "Data File"):
        refused(nhdr(tmp_path / key.replace(" ", "_"), "../secret.bin", key=key), "points outside")


def test_a_metaimage_data_file_after_a_colon_is_checked_too(tmp_path, secret):
    """MetaIO takes "ElementDataFile: x" as well as "ElementDataFile = x"."""
    path = mhd(tmp_path / "h", "x")
    path.write_text(path.read_text().replace("ElementDataFile = x", "ElementDataFile: ../secret.bin"))
    refused(path, "points outside")


@pytest.mark.parametrize("header", HEADERS)
@pytest.mark.parametrize("target", ["missing", "folder", "device"])
def test_a_data_file_that_is_not_a_regular_file_is_refused(tmp_path, header, target):
    folder = tmp_path / "h"
    folder.mkdir()
    if target == "folder":
        (folder / "data.raw").mkdir()
    elif target == "device":
        (folder / "data.raw").symlink_to("/dev/zero")
    # A link to a device leads outside the folder as well; either reason refuses it.
    refused(HEADERS[header](folder, "data.raw"), {"missing": "the data file no such file",
                                                  "folder": "the data file is a folder",
                                                  "device": "points outside the header's folder"}[target])


@pytest.mark.parametrize("header", HEADERS)
def test_list_and_pattern_data_files_are_refused(tmp_path, header):
    refused(HEADERS[header](tmp_path / "a", "LIST"), "list|LIST")
    refused(HEADERS[header](tmp_path / "b", "slice%03d.raw 1 4 1"), "pattern|neither LOCAL")


@pytest.mark.parametrize("header", HEADERS)
def test_a_detached_data_file_shorter_than_declared_is_refused(tmp_path, header):
    folder = tmp_path / "h"
    folder.mkdir()
    (folder / "data.raw").write_bytes(VOXELS[:10])
    refused(HEADERS[header](folder, "data.raw"), "truncated")


_READ = "import sys\nfrom unetpp3d.imageio.readers import read_image\nread_image(sys.argv[1])\n"


def read_in_subprocess(path: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    """read_image in a child process: a read that blocks (on a FIFO, or on standard input, here a pipe
    nothing is written to) fails the test at the timeout instead of hanging it."""
    proc = subprocess.Popen([sys.executable, "-c", _READ, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, encoding="utf-8", env={**ONE_THREAD, "PYTHONIOENCODING": "utf-8"})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"reading {path} blocked for {timeout} s")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_an_nrrd_data_file_of_standard_input_is_refused_without_blocking(tmp_path):
    """teem reads "data file: -" from standard input (found by tests/test_fuzz.py): it would wait forever."""
    header = nhdr(tmp_path / "h", "-")
    (tmp_path / "h" / "-").write_bytes(VOXELS)
    refused(header, "standard input")
    done = read_in_subprocess(header)
    assert done.returncode != 0 and "standard input" in done.stderr


def read_within(path: Path, timeout: float = 60):
    """read_image in a thread: a read that blocks on a FIFO fails the test at the timeout instead of hanging it.

    Returns what read_image returned, or the exception it raised.
    """
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["value"] = read_image(path)
        except Exception as exc:  # handed back to the test
            outcome["value"] = exc

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        for fifo in [path, *path.parent.iterdir(), *(path.iterdir() if path.is_dir() else [])]:
            if fifo.exists() and stat.S_ISFIFO(fifo.stat().st_mode):  # release the blocked reader
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"reading {path} blocked for {timeout} s")
    return outcome["value"]


@pytest.mark.parametrize("header", HEADERS)
def test_a_fifo_as_data_file_is_refused_without_blocking(tmp_path, header):
    folder = tmp_path / "h"
    folder.mkdir()
    os.mkfifo(folder / "data.raw")
    error = read_within(HEADERS[header](folder, "data.raw"))
    assert isinstance(error, UserError) and "named pipe (FIFO)" in str(error)


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_fifo_or_device_as_the_image_is_refused_without_blocking(tmp_path, kind):
    path = tmp_path / "scan.nii.gz"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    error = read_within(path)
    assert isinstance(error, UserError) and "not a regular file or folder" in str(error)
    assert ("named pipe" if kind == "fifo" else "device") in str(error)


def test_a_fifo_in_a_dicom_folder_is_not_opened(tmp_path):
    folder = write_dicom_series(tmp_path / "series", n=4)
    os.mkfifo(folder / "zz_pipe.dcm")
    assert read_within(folder)[1].size == (8, 8, 4)


def test_files_of_other_formats_are_not_handed_to_itk(tmp_path):
    """ITK would pick a reader by content, some of which open files a header names (Analyze pairs)."""
    analyze = tmp_path / "scan.hdr"
    nib.save(nib.AnalyzeImage(ramp((4, 5, 6), np.int16), np.eye(4)), str(analyze))
    assert sitk.ReadImage(str(analyze)).GetSize() == (4, 5, 6)
    refused(analyze, "not a supported image format")


# ---------------------------------------------------------------------------------------------
# Real CT cases (../shared/data)
# ---------------------------------------------------------------------------------------------


def test_real_nifti_case(shared_data):
    ct, g = read_image(shared_data / "abdomen_ct_ts" / "ct.nii.gz")
    assert ct.dtype == np.int16 and ct.shape == (122, 101, 30) and g.size == (122, 101, 30)
    assert (int(ct.min()), int(ct.max())) == (-1100, 1207)
    np.testing.assert_allclose(g.spacing, (3.0, 3.0, 3.0))
    np.testing.assert_allclose(g.direction_matrix, np.diag([-1.0, -1.0, 1.0]), atol=1e-6)
    label, lg = read_image(shared_data / "abdomen_ct_ts" / "liver.nii.gz", is_label=True)
    assert int((label == 1).sum()) == 38634
    check_pair(g, lg, "ct", "liver")


def test_real_jpeg2000_dicom_and_its_y_flipped_label_align(shared_data):
    case = shared_data / "abdomen_ct_dicom_ts"
    ct, g = read_image(case / "dicom")
    assert g.size == (512, 512, 20)
    np.testing.assert_allclose(g.spacing, (0.9765625, 0.9765625, 2.0))
    np.testing.assert_allclose(g.direction_matrix, np.eye(3))
    label, lg = read_image(case / "liver.nii.gz", is_label=True)
    np.testing.assert_allclose(lg.direction_matrix, np.diag([1.0, -1.0, 1.0]))
    check_pair(g, lg, case / "dicom", case / "liver.nii.gz")  # a pure flip is fine
    aligned = align_label_to_image(label, lg, g)
    np.testing.assert_array_equal(aligned, label[:, ::-1, :])
    # Same answer through physical space: the label voxel at each image voxel's position.
    for idx in [(100, 200, 3), (300, 250, 10), (256, 400, 19)]:
        p = g.index_to_physical(idx)[0]
        lidx = np.linalg.solve(lg.affine_lps()[:3, :3], p - np.array(lg.origin)).round().astype(int)
        assert aligned[idx] == label[tuple(lidx)]
    # Liver is bright tissue: the aligned mask covers soft-tissue HU, the raw-index one would not.
    assert 0 < np.median(ct[aligned == 1]) < 250


def test_real_three_slice_dicom_with_nrrd_labels(shared_data):
    case = shared_data / "abdomen_ct_3slice_dcmqi"
    ct, g = read_image(case / "dicom")
    assert g.size == (512, 512, 3) and int(ct.min()) == -3024
    np.testing.assert_allclose(g.spacing, (0.810547, 0.810547, 1.0), rtol=1e-5)
    for name, values in (("liver.nrrd", {0, 1}), ("liver_spine.nrrd", {0, 1, 2})):
        label, lg = read_image(case / name, is_label=True)
        assert set(np.unique(label).tolist()) == values
        check_pair(g, lg, case / "dicom", case / name)


def test_real_small_series_and_single_slice(shared_data):
    _, g = read_image(shared_data / "dicom_small" / "CT5N_series")
    assert g.size == (16, 16, 5)
    np.testing.assert_allclose(g.spacing, (0.488281, 0.488281, 2.5), rtol=1e-5)
    refused(shared_data / "dicom_small" / "CT_small.dcm", "single 2D slice")


def test_real_bad_dicom_series_are_refused(shared_data):
    msg = refused(shared_data / "bad_dicom" / "nonuniform_spacing", "not evenly spaced")
    assert "201.2 mm" in msg
    # The two files are 1 mm apart but carry bit-identical pixel data: a duplicated slice.
    refused(shared_data / "bad_dicom" / "duplicate_slice", "duplicate slice")


# ---------------------------------------------------------------------------------------------
# Label/image pairs
# ---------------------------------------------------------------------------------------------


def test_check_pair_accepts_flips_and_permutations_and_refuses_shifts():
    g = Geometry((6, 7, 8), (1.0, 1.5, 2.0), (5.0, 6.0, 7.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    label = ramp((6, 7, 8)).astype(np.int32)
    perm, flips = (2, 0, 1), (False, True, True)
    moved = np.flip(label.transpose(perm), axis=[1, 2])
    mg = g.reoriented(perm, flips)
    check_pair(g, mg, "img", "lab")
    np.testing.assert_array_equal(align_label_to_image(moved, mg, g), label)

    shifted = Geometry(g.size, g.spacing, (5.0, 6.0, 8.0), g.direction)
    with pytest.raises(UserError, match=r"lab: label grid does not match image img: origin"):
        check_pair(g, shifted, "img", "lab")
    with pytest.raises(UserError, match="size 6x7x8 vs 6x7x9"):
        check_pair(g, Geometry((6, 7, 9), g.spacing, g.origin, g.direction), "img", "lab")
    with pytest.raises(UserError, match="cannot be aligned"):
        align_label_to_image(label, shifted, g)


# ---------------------------------------------------------------------------------------------
# MONAI reader
# ---------------------------------------------------------------------------------------------


def test_sitk_reader_in_load_imaged(make_image):
    from monai.transforms import LoadImaged

    img = make_image("img.nii.gz", ramp(), spacing=(0.5, 0.75, 2.5), origin=(1, 2, 3), direction=FLIP_XY)
    lab = make_image("lab.nii.gz", (ramp() % 3).astype(np.uint8), spacing=(0.5, 0.75, 2.5), origin=(1, 2, 3),
                     direction=FLIP_XY)
    load = LoadImaged(keys=["image", "label"], reader=SitkReader(), image_only=True, ensure_channel_first=True)
    d = load({"image": img, "label": lab})
    _, g = read_image(img)
    for key, path in (("image", img), ("label", lab)):
        t = d[key]
        assert tuple(t.shape) == (1, 8, 9, 10)
        np.testing.assert_allclose(t.affine.numpy(), g.affine_ras())
        assert t.meta["geometry"] == g.to_dict()
        assert t.meta["filename_or_obj"] == str(path)
    np.testing.assert_array_equal(d["image"][0].numpy(), ramp())


def test_sitk_reader_verify_suffix(tmp_path):
    reader = SitkReader()
    assert reader.verify_suffix("a.nii.gz") and reader.verify_suffix(["a.nrrd", "b.mha"])
    assert reader.verify_suffix(tmp_path)  # a DICOM folder
    assert not reader.verify_suffix("a.png")


def test_orientation_spacing_and_invert_restore_the_original_grid(make_image):
    from monai.transforms import Compose, Invertd, LoadImaged, Orientationd, Spacingd

    arr = (ramp((10, 12, 8)) % 5).astype(np.float32)
    path = make_image("lab.nii.gz", arr, spacing=(1.0, 1.0, 2.0), origin=(3, -4, 5), direction=PERMUTED)
    pre = Compose([
        LoadImaged(keys="label", reader=SitkReader(), image_only=True, ensure_channel_first=True),
        Orientationd(keys="label", axcodes="RAS"),
        Spacingd(keys="label", pixdim=(1.0, 1.0, 1.0), mode="nearest"),
    ])
    d = pre({"label": path})
    _, g = read_image(path)
    # RAS order after orientation: PERMUTED puts index z on physical x (spacing 2 -> resampled 1).
    assert tuple(d["label"].shape[1:]) == (15, 10, 12)
    d["pred"] = d["label"].clone()
    back = Invertd(keys="pred", transform=pre, orig_keys="label", nearest_interp=True)(d)["pred"]
    assert tuple(back.shape) == (1, 10, 12, 8)
    np.testing.assert_allclose(back.affine.numpy(), g.affine_ras(), atol=1e-5)
    np.testing.assert_array_equal(back[0].numpy(), arr)


def test_sitk_reader_stacks_channels_of_one_grid(make_image):
    reader = SitkReader()
    a = make_image("a.nii.gz", ramp())
    b = make_image("b.nii.gz", ramp() * 2)
    array, meta = reader.get_data(reader.read([a, b]))
    assert array.shape == (2, 8, 9, 10) and meta["original_channel_dim"] == 0
    c = make_image("c.nii.gz", ramp(), spacing=(2, 2, 2))
    with pytest.raises(UserError, match="cannot stack"):
        reader.get_data(reader.read([a, c]))
    np.testing.assert_allclose(meta["affine"], read_image(a)[1].affine_ras())
