"""Synthetic CT phantoms with labels: an upper abdomen (label 1 = liver) and a chest (label 1 = nodule).

A phantom is sampled once from its seed as a list of *layers* (a shape in patient millimetres, a
HU value, an optional texture, and what the layer does to the label), then rendered onto any voxel
grid. Because every shape lives in physical space, the same seed rendered on two grids (other
spacing, origin, axis order or flips) gives the same anatomy, which is what lets the phantoms test
geometry code: a label resampled in physical space must land on the image.

Patient coordinates are LPS millimetres relative to the patient's centre (``+x`` the patient's
left, ``+y`` posterior, ``+z`` superior), as SimpleITK reports world coordinates; a grid places
the patient at ``patient_center`` in world space.

Randomness comes from three separate streams of the seed (anatomy, grid, noise), so switching on
random geometry never changes the anatomy that a seed gives.

Dataset layout written by :func:`write_dataset` (the Medical Segmentation Decathlon's)::

    out_dir/
      manifest.json          training and test lists, paths relative to out_dir
      imagesTr/<task>_000.nii.gz    int16 HU
      labelsTr/<task>_000.nii.gz    uint8, 0 = background, 1 = liver or nodule
      imagesTs/<task>_00N.nii.gz    held-out scans (the manifest's "test" list)
      labelsTs/<task>_00N.nii.gz    their labels, for `unetpp3d evaluate`
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from unetpp3d.data.manifest import write_manifest
from unetpp3d.errors import UserError
from unetpp3d.geometry import Geometry
from unetpp3d.hardware import refuse_unless_memory
from unetpp3d.imageio.writer import write_image, write_mask
from unetpp3d.outputs import MASK, NIFTI_IMAGE, OutputKind, check_outputs, nifti_mark
from unetpp3d.synth.anatomy import (
    AIR_HU,
    FOV_MM,
    LABEL_NAMES,
    _check_task,
    _streams,
    sample_anatomy,
)
from unetpp3d.synth.shapes import Anatomy, Coords, Vec


class _Grid:
    """Voxel index <-> patient coordinates for one image grid."""

    def __init__(self, shape, spacing, origin, direction, patient_center) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.matrix = np.asarray(direction, float).reshape(3, 3) @ np.diag(np.asarray(spacing, float))
        self.inverse = np.linalg.inv(self.matrix)
        self.origin = np.asarray(origin, float) - np.asarray(patient_center, float)
        # Voxels are boxes: the grid spans half a voxel beyond the first and last centres.
        corners = np.array(list(itertools.product(*[(-0.5, n - 0.5) for n in self.shape])))
        world = corners @ self.matrix.T + self.origin
        self.lo, self.hi = world.min(0), world.max(0)

    def block(self, lo: Vec, hi: Vec) -> tuple[slice, slice, slice] | None:
        lo, hi = np.maximum(lo, self.lo), np.minimum(hi, self.hi)
        if np.any(lo > hi):
            return None
        corners = np.array(list(itertools.product(*zip(lo, hi))))
        idx = (corners - self.origin) @ self.inverse.T
        start = np.clip(np.floor(idx.min(0)).astype(int), 0, self.shape)
        stop = np.clip(np.ceil(idx.max(0)).astype(int) + 1, 0, self.shape)
        if np.any(stop <= start):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(start, stop))

    def coords(self, block: tuple[slice, slice, slice]) -> Coords:
        # Terms with a zero coefficient are skipped so that, for axis-aligned grids, each
        # coordinate stays a thin broadcastable array instead of a full block.
        idx = [np.arange(s.start, s.stop, dtype=np.float64) for s in block]
        out = []
        for k in range(3):
            acc: np.ndarray = np.full((1, 1, 1), self.origin[k])
            for j in range(3):
                c = self.matrix[k, j]
                if abs(c) > 1e-12:
                    shape = [1, 1, 1]
                    shape[j] = len(idx[j])
                    acc = acc + (c * idx[j]).reshape(shape)
            out.append(acc.astype(np.float32))
        return tuple(out)  # type: ignore[return-value]


def _render(anatomy: Anatomy, grid: _Grid, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    image = np.full(grid.shape, AIR_HU, dtype=np.float32)
    label = np.zeros(grid.shape, dtype=np.uint8)
    for layer in anatomy.layers:
        block = grid.block(*layer.shape.bbox())
        if block is None:
            continue
        q = grid.coords(block)
        sub_shape = tuple(s.stop - s.start for s in block)
        mask = np.broadcast_to(layer.shape.inside(q), sub_shape)
        where = np.nonzero(mask)
        if not where[0].size:
            continue
        # Texture is evaluated only on the painted voxels.
        qm = tuple(np.broadcast_to(c, sub_shape)[where] for c in q)
        image[block][where] = layer.value(qm)
        if layer.label is not None:
            label[block][where] = layer.label
    image = ndimage.gaussian_filter(image, anatomy.blur_voxels, mode="nearest", truncate=3.0)
    image += rng.standard_normal(grid.shape, dtype=np.float32) * np.float32(anatomy.noise_hu)
    np.clip(image, -1024.0, 3071.0, out=image)
    return image, label


def _as_triple(value, name: str) -> tuple[float, float, float]:
    arr = np.broadcast_to(np.asarray(value, float), (3,))
    if not np.all(np.isfinite(arr)):
        raise UserError(f"{name} {value!r}: expected three finite numbers")
    return tuple(float(v) for v in arr)  # type: ignore[return-value]


def make_phantom(
    task: str,
    seed: int,
    size: int | Sequence[int] = 96,
    spacing: Sequence[float] | None = None,
    origin: Sequence[float] | None = None,
    direction: Sequence[float] | None = None,
    patient_center: Sequence[float] = (0.0, 0.0, 0.0),
) -> tuple[np.ndarray, np.ndarray, tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """Render one CT phantom on a voxel grid.

    The anatomy depends on ``task`` and ``seed`` only; the grid arguments choose where it is
    sampled, so the same seed on another grid is the same patient. Sizes are physical (mm),
    hence a coarser spacing shows small nodules with fewer voxels, as a real scanner would.

    Args:
        task: ``"liver"`` or ``"lung_nodule"``.
        seed: phantoms are fully determined by the seed (anatomy, noise) and the grid.
        size: voxels along (x, y, z); one int for a cube.
        spacing: mm per voxel (x, y, z). Default: isotropic, the cube spanning the task's field of
            view (``FOV_MM``), e.g. 4 mm for a 96-voxel liver phantom.
        origin: world position (LPS mm) of voxel (0, 0, 0). Default: the grid centred on the patient.
        direction: 3x3 direction cosines, row-major as SimpleITK's ``GetDirection()``. Default: identity.
        patient_center: world position (LPS mm) of the patient's centre.

    Returns:
        ``(image, label, spacing, origin, direction)``: ``image`` float32 HU and ``label`` uint8
        (1 = liver or nodule), both indexed (x, y, z) like SimpleITK's index; the geometry as
        SimpleITK would report it.

    Example:
        >>> image, label, spacing, origin, direction = make_phantom("liver", seed=3, size=48)
        >>> image.shape, spacing
        ((48, 48, 48), (8.0, 8.0, 8.0))
    """
    _check_task(task)
    shape = tuple(int(s) for s in np.broadcast_to(np.asarray(size), (3,)))
    if min(shape) < 2:
        raise UserError(f"size {size!r}: need at least 2 voxels per axis")
    spacing = _as_triple(spacing, "spacing") if spacing is not None else \
        (FOV_MM[task] / max(shape),) * 3
    if min(spacing) <= 0:
        raise UserError(f"spacing {spacing!r}: must be positive")
    direction = tuple(float(d) for d in np.asarray(np.eye(3) if direction is None else direction, float).ravel())
    if len(direction) != 9:
        raise UserError(f"direction {direction!r}: expected 9 numbers (a row-major 3x3 matrix)")
    dmat = np.asarray(direction).reshape(3, 3)
    if dmat.shape != (3, 3) or not np.allclose(dmat @ dmat.T, np.eye(3), atol=1e-4):
        raise UserError(f"direction {direction!r}: expected 9 numbers forming an orthonormal matrix")
    center = np.asarray(_as_triple(patient_center, "patient_center"))
    if origin is None:
        half = dmat @ (np.asarray(spacing) * (np.asarray(shape) - 1) / 2)
        origin = tuple(float(v) for v in center - half)
    else:
        origin = _as_triple(origin, "origin")
    anatomy = sample_anatomy(task, seed)
    image, label = _render(anatomy, _Grid(shape, spacing, origin, dmat, center), _streams(seed)[2])
    return image, label, tuple(spacing), tuple(origin), direction


def sample_geometry(task: str, seed: int, size: int = 96) -> dict:
    """Draw a random scanner grid for a phantom: the keyword arguments of :func:`make_phantom`.

    In-plane spacing is 0.8-1.25x and slice spacing 1-2.5x the default isotropic spacing (the
    ratios of 0.7-1.5 mm pixels to 1-5 mm slices, scaled to phantom-sized grids); the voxel
    counts follow so the field of view still covers the body. The array axes are permuted and
    flipped at random in the direction matrix, and the patient sits at a random world position,
    so code that ignores the direction, the origin or anisotropy gives wrong answers.

    Args:
        task: ``"liver"`` or ``"lung_nodule"``.
        seed: the phantom's seed (the grid uses its own random stream, so the anatomy is unchanged).
        size: the phantom's edge length before randomisation.

    Returns:
        ``{"size", "spacing", "origin", "direction", "patient_center"}``.
    """
    _check_task(task)
    rng = _streams(seed)[1]
    base = FOV_MM[task] / size
    inplane = base * rng.uniform(0.8, 1.25)
    spacing = np.array([inplane, inplane, base * rng.uniform(1.0, 2.5)])
    shape = np.maximum(np.ceil(FOV_MM[task] / spacing).astype(int), 8)
    perm = rng.permutation(3)
    dmat = np.zeros((3, 3))
    dmat[perm, np.arange(3)] = rng.choice([-1.0, 1.0], size=3)  # column j: world axis of array axis j
    center = np.array([rng.uniform(-50, 50), rng.uniform(-50, 50), rng.uniform(-400, 400)])
    # Not quite centred, like a real scan, but no more than ~5% of the field of view off.
    target = center + rng.uniform(-0.05, 0.05, size=3) * FOV_MM[task]
    origin = target - dmat @ (spacing * (shape - 1) / 2)
    return {"size": tuple(int(s) for s in shape), "spacing": tuple(float(s) for s in spacing),
            "origin": tuple(float(o) for o in origin), "direction": tuple(float(d) for d in dmat.ravel()),
            "patient_center": tuple(float(c) for c in center)}


# Peak bytes per voxel of one phantom (float work arrays, label, the int16/uint8 copies written),
# measured with tracemalloc at sizes 32 and 64 (19-23 B) plus ITK's copy on writing.
SYNTH_BYTES_PER_VOXEL = 26
RANDOM_GEOMETRY_GROWTH = 1.25 * 1.25
MAX_CASES = 10_000


def _synthetic_manifest(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and str(data.get("name", "")).startswith("synthetic_")


SYNTH_MANIFEST = OutputKind("synthetic-phantom manifest", (".json",), _synthetic_manifest)


def _check_targets(task: str, n_cases: int, n_test: int, out: Path) -> None:
    """Refuse before drawing anything when a file to be written exists and is not a phantom's."""
    images, labels = [], []
    for i in range(n_cases):
        suffix = "Ts" if i >= n_cases - n_test else "Tr"
        images.append(out / f"images{suffix}" / f"{task}_{i:03d}.nii.gz")
        labels.append(out / f"labels{suffix}" / f"{task}_{i:03d}.nii.gz")
    check_outputs([out / "manifest.json"], SYNTH_MANIFEST)
    if (out / "manifest.json").is_file():
        # A phantom dataset already (perhaps from a version that did not mark its files): its
        # NIfTI files are phantoms too, and may be replaced.
        image_kind = label_kind = OutputKind("phantom NIfTI", (".nii.gz",), lambda p: nifti_mark(p) is not None
                                             or _nifti_header_readable(p))
    else:
        image_kind, label_kind = NIFTI_IMAGE, MASK
    check_outputs(images, image_kind)
    check_outputs(labels, label_kind)


def _nifti_header_readable(path: Path) -> bool:
    try:
        nib.load(str(path))
    except Exception:  # nibabel raises several types for files that are not NIfTI
        return False
    return True


def write_dataset(task: str, n_cases: int, out_dir: str | Path, seed: int = 0, size: int = 96,
                  random_geometry: bool = False) -> Path:
    """Write ``n_cases`` phantoms as NIfTI files plus a manifest, in the layout of the module docstring.

    About a fifth of the cases (none when there are fewer than 3) are held out in ``imagesTs`` /
    ``labelsTs``; the manifest lists the rest under ``"training"`` and the held-out scans under
    ``"test"``. Images are int16 HU, labels uint8. Files are written atomically, and the same
    arguments always write the same files.

    Args:
        task: ``"liver"`` or ``"lung_nodule"``.
        n_cases: number of phantoms (at least 1).
        out_dir: output folder, created if needed; files of the same names are overwritten.
        seed: dataset seed; case ``i`` uses a seed derived from ``(seed, i)``.
        size: edge length in voxels (before random geometry changes the grid).
        random_geometry: random anisotropic spacing, origin and axis permutation/flips per case
            (see :func:`sample_geometry`).

    Returns:
        The path of ``manifest.json``.
    """
    _check_task(task)
    if not 1 <= n_cases <= MAX_CASES:
        raise UserError(f"--cases {n_cases}: give a number of phantoms from 1 to {MAX_CASES:,}")
    if size < 16:
        raise UserError(f"--size {size}: phantoms need at least 16 voxels per axis")
    if not 0 <= seed < 2**32:
        raise UserError(f"--seed {seed}: give a seed from 0 to {2**32 - 1}")
    # Random geometry draws up to 1.25x the voxels along each in-plane axis.
    voxels = size**3 * (RANDOM_GEOMETRY_GROWTH if random_geometry else 1.0)
    refuse_unless_memory(int(voxels * SYNTH_BYTES_PER_VOXEL), f"--size {size}: one phantom",
                         "choose a smaller --size")
    out = Path(out_dir)
    n_test = int(round(0.2 * n_cases)) if n_cases >= 3 else 0
    _check_targets(task, n_cases, n_test, out)
    training, test = [], []
    for i in range(n_cases):
        case_seed = int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, i]).generate_state(1)[0])
        grid = sample_geometry(task, case_seed, size) if random_geometry else {"size": size}
        image, label, spacing, origin, direction = make_phantom(task, case_seed, **grid)
        held_out = i >= n_cases - n_test
        name = f"{task}_{i:03d}.nii.gz"
        suffix = "Ts" if held_out else "Tr"
        img_rel, lab_rel = f"images{suffix}/{name}", f"labels{suffix}/{name}"
        geometry = Geometry(label.shape, spacing, origin, direction)
        write_image(np.rint(image).astype(np.int16), geometry, out / img_rel)
        write_mask(label, geometry, out / lab_rel)
        if held_out:
            test.append(out / img_rel)
        else:
            training.append((out / img_rel, out / lab_rel))
    return write_manifest(
        out / "manifest.json", training, labels={0: "background", 1: LABEL_NAMES[task]}, task=task, test=test,
        name=f"synthetic_{task}",
        description=f"unetpp3d synthetic {task} phantoms (seed {seed}, size {size}, random geometry "
                    f"{'on' if random_geometry else 'off'}); the test scans' labels are in labelsTs/",
    )
