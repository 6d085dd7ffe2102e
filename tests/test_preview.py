"""save_overlay_png: the PNG exists, shows something, and handles empty masks and odd orientations."""

from __future__ import annotations

from types import SimpleNamespace

import matplotlib.image as mpimg
import numpy as np
import pytest

from unetpp3d.preview import _to_lps_axes, save_overlay_png


def geometry(spacing=(1.0, 1.0, 2.5), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)):
    return SimpleNamespace(spacing=spacing, origin=(0.0, 0.0, 0.0), direction=direction)


def phantom():
    x, y, z = np.meshgrid(np.arange(40), np.arange(36), np.arange(16), indexing="ij")
    image = np.where((x - 20) ** 2 + (y - 18) ** 2 < 15**2, 40.0, -1000.0).astype(np.float32)
    mask = (((x - 24) ** 2 + (y - 16) ** 2 + ((z - 8) * 2.5) ** 2) < 36).astype(np.uint8)
    return image, mask


def colours(path) -> int:
    pixels = mpimg.imread(path)[..., :3].reshape(-1, 3)
    return len(np.unique(np.round(pixels * 255).astype(int), axis=0))


@pytest.mark.parametrize("empty", [False, True])
def test_overlay_png_is_written_and_not_blank(tmp_path, empty):
    image, mask = phantom()
    if empty:
        mask[:] = 0
    out = save_overlay_png(image, mask, geometry(), tmp_path / "sub" / "p.png", title="case")
    assert out.is_file() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert colours(out) > 10
    assert not list(out.parent.glob(".*"))


def test_mask_colour_is_drawn(tmp_path):
    image, mask = phantom()
    save_overlay_png(image, mask, geometry(), tmp_path / "with.png")
    pixels = mpimg.imread(tmp_path / "with.png")[..., :3]
    reddish = (pixels[..., 0] > pixels[..., 1] + 0.2) & (pixels[..., 0] > pixels[..., 2] + 0.2)
    assert reddish.sum() > 50


def test_non_hu_images_fall_back_to_percentiles(tmp_path):
    image, mask = phantom()
    save_overlay_png(image / 1000.0 + 5.0, mask * 0, geometry(), tmp_path / "flat.png")
    assert colours(tmp_path / "flat.png") > 10


def test_axes_are_brought_to_lps_order():
    arr = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    # array axis 0 runs along -y, axis 1 along +z, axis 2 along +x
    direction = np.zeros((3, 3))
    direction[1, 0], direction[2, 1], direction[0, 2] = -1, 1, 1
    out, spacing = _to_lps_axes(arr, geometry(spacing=(1.0, 2.0, 3.0), direction=direction.ravel()))
    assert out.shape == (4, 2, 3)
    np.testing.assert_array_equal(spacing, [3.0, 1.0, 2.0])
    np.testing.assert_array_equal(out[:, :, 0], arr[::-1, 0, :].T)


def test_shape_mismatch_is_refused(tmp_path):
    image, mask = phantom()
    with pytest.raises(ValueError):
        save_overlay_png(image, mask[:-1], geometry(), tmp_path / "x.png")
