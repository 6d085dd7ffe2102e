"""Shared test fixtures: the real cases in ../shared/data and a factory for small images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
# One thread per process: on a shared 2-core machine several OpenMP threads per process wait on
# each other and a run takes ten times longer. Results do not depend on it. ONE_THREAD is the
# environment for subprocesses; the fixture below does the same for this process.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run only where CUDA is available; elsewhere they are skipped, saying why."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA device; torch.cuda.is_available() is False here (PyTorch "
                                   f"{torch.__version__}); `make gpu-check` runs these on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests (use with ``pytest.mark.usefixtures``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real CT cases beside the repository; tests using them skip where they are absent."""
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"real CT cases not found at {SHARED_DATA} (a fresh clone has none; CI has them)")
    return SHARED_DATA


def write_image(path: Path, array_xyz: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> Path:
    """Write an (x, y, z) array as an image file (format from the suffix) with the given geometry."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array_xyz).transpose(2, 1, 0)))
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in origin])
    img.SetDirection([float(d) for d in direction])
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


@pytest.fixture
def make_image(tmp_path):
    """Factory: ``make_image(name, array_xyz, spacing=..., origin=..., direction=...) -> Path`` in tmp_path."""

    def _make(name: str, array_xyz: np.ndarray, **geometry) -> Path:
        return write_image(tmp_path / name, array_xyz, **geometry)

    return _make


@pytest.fixture(autouse=True)
def _restore_locale():
    """Undo a C library's setlocale: SimpleITK's DICOM writer switches the process to "C", which
    would make later text I/O without an explicit encoding decode as ASCII."""
    import locale

    saved = locale.setlocale(locale.LC_ALL)
    yield
    if locale.setlocale(locale.LC_ALL) != saved:
        locale.setlocale(locale.LC_ALL, saved)
