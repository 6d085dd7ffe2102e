"""writer: masks land on the exact input grid (SimpleITK and nibabel agree), atomically and verified."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from factories import ONE_THREAD

import unetpp3d.imageio.writer as writer_module
from unetpp3d.atomic import atomic_write_text, final_suffix, temp_path_for
from unetpp3d.errors import UserError
from unetpp3d.geometry import Geometry
from unetpp3d.imageio.readers import read_image
from unetpp3d.imageio.writer import write_image, write_mask
from unetpp3d.outputs import nifti_mark

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


# ---------------------------------------------------------------------------------------------
# A reported success is a real result: names with extra dots, and writes that fail silently
# ---------------------------------------------------------------------------------------------

GRID = Geometry((8, 9, 10), (0.7, 0.8, 2.5), (-1.0, 2.0, 3.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1))


@pytest.mark.parametrize("name", ["m.img.nii.gz", "x.nii.nii.gz", "abdomen.img.nii.gz", "a.hdr.nii", "scan.img.nii",
                                  "b.nii.nrrd", "c.img.mha", ".hidden.nii.gz", "no dots here.nii.gz", "img.nii.gz",
                                  "hdr.nii", "x.IMG.NII.GZ"])
def test_names_with_extra_dots_are_written_whole(tmp_path, name):
    """ITK's NIfTI writer reads every dot of a name: '.x.img.part.nii.gz' became an Analyze pair and
    'x.nii.part.nii.gz' became 'x.part.nii.gz', so an empty temporary was renamed into place."""
    path = write_mask(blob(), GRID, tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # nothing written beside it
    back, geometry = read_image(path, is_label=True)
    np.testing.assert_array_equal(back, blob())
    assert geometry.same_grid(GRID)


@pytest.mark.parametrize("name, suffix", [("m.img.nii.gz", ".nii.gz"), ("x.nii.nii.gz", ".nii.gz"), ("a.nii", ".nii"),
                                          ("last.pt", ".pt"), ("t.tar.gz", ".tar.gz"), ("README", ""),
                                          ("w.hdr.nrrd", ".nrrd")])
def test_temporary_names_keep_only_the_format_suffix(tmp_path, name, suffix):
    assert final_suffix(name) == suffix
    tmp = temp_path_for(tmp_path / name)
    assert tmp.parent == tmp_path and tmp.name.startswith(".") and tmp.name.endswith(f".part{suffix}")
    # The leading dot, one after the name, one before "part", and the suffix's own: no other dot.
    assert tmp.name.count(".") == 3 + suffix.count(".")


def _truncating(fraction: float):
    """A stand-in for sitk.WriteImage that writes the file and then cuts it, as a full disk does to ITK."""
    real = sitk.WriteImage

    def write(image, name, *args, **kwargs):
        real(image, name, *args, **kwargs)
        data = Path(name).read_bytes()
        Path(name).write_bytes(data[:int(len(data) * fraction)])

    return write


def _writes_nothing(image, name, *args, **kwargs):
    """ITK writing under another name than the one given (what '.img' in a name did)."""
    os.unlink(name)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
@pytest.mark.parametrize("failure", ["empty", "half", "last byte", "nothing"])
def test_a_write_that_fails_without_an_error_is_refused_and_keeps_the_old_file(tmp_path, monkeypatch, suffix,
                                                                               failure):
    path = write_mask(blob(), GRID, tmp_path / f"mask{suffix}")
    before = path.read_bytes()
    fake = {"empty": _truncating(0.0), "half": _truncating(0.5), "last byte": _truncating((len(before) - 1)
                                                                                         / len(before)),
            "nothing": _writes_nothing}[failure]
    monkeypatch.setattr(writer_module.sitk, "WriteImage", fake)
    with pytest.raises(UserError, match=rf"mask{suffix.replace('.', '[.]')}: could not write the file"):
        write_mask(blob() * 0, GRID, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # the temporary is gone


def test_a_file_that_reads_back_on_another_grid_is_refused(tmp_path, monkeypatch):
    real = sitk.WriteImage

    def shifted(image, name, *args, **kwargs):
        image = sitk.Image(image)
        image.SetOrigin((100.0, 0.0, 0.0))
        real(image, name, *args, **kwargs)

    monkeypatch.setattr(writer_module.sitk, "WriteImage", shifted)
    with pytest.raises(UserError, match="reads back as"):
        write_mask(blob(), GRID, tmp_path / "m.nii.gz")
    assert not any(tmp_path.iterdir())


_FULL_DISK = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from unetpp3d.errors import UserError
    from unetpp3d.geometry import Geometry
    from unetpp3d.imageio.writer import write_image
    g = Geometry((64, 64, 64), (1, 1, 1), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    noise = np.random.default_rng(0).integers(-1000, 1000, (64, 64, 64)).astype(np.int16)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))  # writes past 20 kB fail, as on a full disk
    try:
        write_image(noise, g, sys.argv[1])
    except UserError as exc:
        print(exc)
        sys.exit(2)
""")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_a_full_disk_is_a_user_error_naming_the_file(tmp_path, suffix):
    """A real short write (a file-size limit: the kernel refuses bytes past it, as on a full disk).

    ITK's NIfTI writer returns normally after such a write; the file was renamed into place, truncated.
    """
    path = tmp_path / f"ct{suffix}"
    done = subprocess.run([sys.executable, "-c", _FULL_DISK, str(path)], capture_output=True, encoding="utf-8",
                          env={**ONE_THREAD, "PYTHONIOENCODING": "utf-8"}, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout.startswith(f"{path}: could not write the file") and done.stdout.count("\n") == 1
    assert not any(tmp_path.iterdir())


def test_text_writes_that_hit_a_full_disk_name_the_file(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError, match=r"notes\.json: could not write the file \(No space left on device: the disk"):
        atomic_write_text(tmp_path / "notes.json", "{}")
    assert not any(tmp_path.iterdir())


def test_written_niftis_are_marked_as_ours(tmp_path):
    """The mark is how a later run tells its own masks (replaceable) from a user's files (not)."""
    assert nifti_mark(write_mask(blob(), GRID, tmp_path / "m.nii.gz")) == "unetpp3d mask"
    assert nifti_mark(write_image(blob().astype(np.int16), GRID, tmp_path / "i.nii.gz")) == "unetpp3d image"
    plain = tmp_path / "user.nii.gz"
    nib.save(nib.Nifti1Image(blob(), np.eye(4)), plain)
    assert nifti_mark(plain) is None


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
