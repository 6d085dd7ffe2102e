"""Shared test fixtures: the real cases in ../shared/data and a factory for small images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from factories import write_image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


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
