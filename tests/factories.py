"""Small things the tests build again and again: images on a given grid, scans, preprocessing,
tiny checkpoints and a network with known output. One place, imported by the test modules
(``from factories import ...``), instead of copies in each file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from unetpp3d.config import Config, Preprocessing
from unetpp3d.model.network import UNetPlusPlus3D

# One thread per process: on a shared 2-core machine several OpenMP threads per process wait on
# each other and a run takes ten times longer. Results do not depend on it. ONE_THREAD is the
# environment for subprocesses; conftest's ``one_torch_thread`` fixture does the same in-process.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}

FEATURES = (4, 8, 16)  # the tiny network of the inference tests: fast, and its windows are 32^3
HU_MEAN = 50.0  # the intensity mean of make_prep: ThresholdNet's boundary in HU


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


def write_dicom_series(folder: Path, n: int = 4, uid: str = "1.2.826.0.1.3680043.2.1125.1", gap: float = 2.0,
                       positions=None, orientations=None, prefix: str = "s", size: int = 8) -> Path:
    """Write a tiny CT series, one file per slice, with the position/orientation tags set by hand.

    ``positions`` are z values (x, y fixed at -10, -20) or full (x, y, z) tuples.
    """
    folder.mkdir(parents=True, exist_ok=True)
    positions = positions if positions is not None else [k * gap for k in range(n)]
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k, z in enumerate(positions):
        iop = orientations[k] if orientations is not None else (1, 0, 0, 0, 1, 0)
        pixels = (np.arange(size * size).reshape(size, size) * (k + 1)).astype(np.int16)
        img = sitk.GetImageFromArray(pixels)
        img.SetSpacing((0.5, 0.5))
        for tag, value in {
            "0008|0060": "CT",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{uid}.{k + 1}",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.99",
            "0020|000e": uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(str(v) for v in (z if isinstance(z, tuple) else (-10, -20, z))),
            "0020|0037": "\\".join(str(v) for v in iop),
            "0028|0030": "0.5\\0.5",
        }.items():
            img.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{prefix}{k}.dcm"))
        writer.Execute(img)
    return folder


def sphere_scan(shape=(40, 36, 24), centre=(20, 15, 12), radius_mm=8.0, spacing=(1.5, 1.5, 2.0),
                air_rows: int = 0) -> np.ndarray:
    """int16 HU: a 200 HU sphere in -800 HU, with ``air_rows`` x-rows of -1000 HU air (for the body crop)."""
    idx = np.indices(shape).astype(float)
    dist = np.sqrt(sum(((idx[a] - centre[a]) * spacing[a]) ** 2 for a in range(3)))
    scan = np.where(dist <= radius_mm, 200, -800).astype(np.int16)
    scan[:air_rows] = -1000
    return scan


def noisy_sphere(shape=(40, 36, 24), centre=(20, 15, 12), radius=7.0, seed=0) -> np.ndarray:
    """int16 HU on a 1 mm grid: a 200 HU sphere of ``radius`` voxels in -800 HU, plus noise (std 30 HU)."""
    scan = sphere_scan(shape, centre, radius_mm=radius, spacing=(1.0, 1.0, 1.0)).astype(float)
    return (scan + np.random.default_rng(seed).normal(0, 30, shape)).astype(np.int16)


def make_prep(task: str = "liver", spacing=(8.0, 8.0, 8.0), patch=(32, 32, 32), **fields) -> Preprocessing:
    """Resolved preprocessing; 8 mm voxels keep real scans to a few 32^3 windows (geometry tests, not accuracy)."""
    name = "liver" if task == "liver" else "nodule"
    return Preprocessing(task=task, labels={"0": "background", "1": name}, target_spacing=list(spacing),
                         intensity_range=[-1000.0, 1000.0], intensity_stats=[HU_MEAN, 100.0],
                         patch_size=list(patch), body_threshold_hu=-500.0, **fields)


def tiny_payload(task: str = "liver", features=FEATURES, seed: int = 0, prep: Preprocessing | None = None,
                 epoch: int = 1, all_foreground: bool = False, volume_range_ml: dict | None = None,
                 field_of_view_mm: list | None = None, **infer) -> dict:
    """A checkpoint payload of a randomly initialised tiny UNet++ (``infer`` sets the model's infer config).

    ``all_foreground``: heads that say class 1 wherever they look; ``volume_range_ml`` and
    ``field_of_view_mm``: the training set's label volumes and largest extents, as ``unetpp3d
    train`` stores them in the preprocessing.
    """
    torch.manual_seed(seed)
    net = UNetPlusPlus3D(in_channels=1, out_channels=2, features=features)
    if all_foreground:
        with torch.no_grad():
            for head in net.heads:
                head.weight.zero_()
                head.bias.copy_(torch.tensor([0.0, 10.0]))
    prep_dict = (prep or make_prep(task)).to_dict()
    if volume_range_ml is not None:
        prep_dict["volume_range_ml"] = volume_range_ml
    if field_of_view_mm is not None:
        prep_dict["field_of_view_mm"] = field_of_view_mm
    cfg = Config(task=task)
    cfg.infer.overlap, cfg.infer.sw_batch_size = 0.25, 4
    for key, value in infer.items():
        setattr(cfg.infer, key, value)
    return {"model_args": net.model_args, "state_dict": net.state_dict(), "preprocessing": prep_dict,
            "config": cfg.to_dict(), "epoch": epoch}


def write_tiny_checkpoint(path: Path, task: str = "liver", features=FEATURES, seed: int = 0,
                          prep: Preprocessing | None = None, **options) -> Path:
    """:func:`tiny_payload` saved at ``path`` (folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tiny_payload(task, features, seed, prep, **options), path)
    return path


class ThresholdNet(nn.Module):
    """Logits whose argmax is 1 exactly where the normalised input is above 0 (HU above HU_MEAN)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([-x, x], dim=1) * 10.0
