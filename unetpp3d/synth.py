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
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from unetpp3d.errors import UserError
from unetpp3d.manifest import write_manifest
from unetpp3d.readers import Geometry
from unetpp3d.writer import write_image, write_mask

__all__ = ["LABEL_NAMES", "Anatomy", "Nodule", "make_phantom", "sample_anatomy", "sample_geometry", "write_dataset"]

LABEL_NAMES = {"liver": "liver", "lung_nodule": "nodule"}
# Field of view (mm) that the default isotropic grid covers: the whole body cross-section.
FOV_MM = {"liver": 384.0, "lung_nodule": 360.0}
AIR_HU = -1000.0
NODULE_DIAMETER_MM = (3.0, 30.0)

Vec = np.ndarray
Coords = tuple[np.ndarray, np.ndarray, np.ndarray]  # qx, qy, qz: patient mm, broadcastable


# --------------------------------------------------------------------------------------------
# Shapes: each answers "inside?" for patient coordinates and gives a bounding box, so rendering
# evaluates it only on the voxels that can be inside.
# --------------------------------------------------------------------------------------------

INF = np.array([np.inf, np.inf, np.inf])


@dataclass(frozen=True)
class Ripples:
    """A smooth random field: a sum of a few cosines, ``sum_k a_k cos(w_k . q + phi_k)``."""

    amp: np.ndarray  # (k,)
    freq: np.ndarray  # (k, 3), radians per mm
    phase: np.ndarray  # (k,)

    @staticmethod
    def sample(rng: np.random.Generator, n: int, amp: float, wavelength_mm: tuple[float, float]) -> Ripples:
        direction = rng.normal(size=(n, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        wavelength = rng.uniform(*wavelength_mm, size=n)
        return Ripples(amp=amp * rng.uniform(0.5, 1.0, size=n) / math.sqrt(n),
                       freq=direction * (2 * math.pi / wavelength)[:, None],
                       phase=rng.uniform(0, 2 * math.pi, size=n))

    @property
    def bound(self) -> float:
        return float(np.abs(self.amp).sum())

    def __call__(self, q: Coords) -> np.ndarray | float:
        out: np.ndarray | float = 0.0
        for a, w, p in zip(self.amp, self.freq, self.phase):
            out = out + np.float32(a) * np.cos(np.float32(w[0]) * q[0] + np.float32(w[1]) * q[1]
                                               + np.float32(w[2]) * q[2] + np.float32(p))
        return out


class Shape:
    def bbox(self) -> tuple[Vec, Vec]:
        return -INF, INF

    def inside(self, q: Coords) -> np.ndarray:
        raise NotImplementedError


@dataclass(frozen=True)
class Ellipsoid(Shape):
    """A rotated ellipsoid whose surface is pushed in and out by low-frequency ripples."""

    center: Vec
    semi: Vec  # semi-axes, mm
    rot: Vec = field(default_factory=lambda: np.eye(3))  # columns: the ellipsoid's axes in patient space
    ripples: Ripples | None = None  # in units of the normalised radius

    def bbox(self) -> tuple[Vec, Vec]:
        reach = float(np.max(self.semi)) * (1.0 + (self.ripples.bound if self.ripples else 0.0))
        return self.center - reach, self.center + reach

    def inside(self, q: Coords) -> np.ndarray:
        d = [q[k] - np.float32(self.center[k]) for k in range(3)]
        r2: np.ndarray | float = 0.0
        for i in range(3):
            local = sum(d[k] * np.float32(self.rot[k, i]) for k in range(3))
            r2 = r2 + (local / np.float32(self.semi[i])) ** 2
        if self.ripples is None:
            return r2 < 1.0
        return np.sqrt(r2) + self.ripples(tuple(d)) < 1.0


@dataclass(frozen=True)
class Cylinder(Shape):
    """An elliptic cylinder along z (body outline, spine, large vessels), optionally capped in z."""

    center: Vec  # (x, y)
    semi: Vec  # (a_x, a_y)
    z_range: tuple[float, float] = (-np.inf, np.inf)

    def bbox(self) -> tuple[Vec, Vec]:
        lo = np.array([self.center[0] - self.semi[0], self.center[1] - self.semi[1], self.z_range[0]])
        hi = np.array([self.center[0] + self.semi[0], self.center[1] + self.semi[1], self.z_range[1]])
        return lo, hi

    def inside(self, q: Coords) -> np.ndarray:
        r2 = ((q[0] - np.float32(self.center[0])) / np.float32(self.semi[0])) ** 2 \
            + ((q[1] - np.float32(self.center[1])) / np.float32(self.semi[1])) ** 2
        m = r2 < 1.0
        if np.isfinite(self.z_range[0]) or np.isfinite(self.z_range[1]):
            m = m & (q[2] >= self.z_range[0]) & (q[2] <= self.z_range[1])
        return m


@dataclass(frozen=True)
class Capsule(Shape):
    """A tube with round ends from ``p0`` to ``p1``: a vessel segment, a bowel loop, an airway."""

    p0: Vec
    p1: Vec
    radius: float

    def bbox(self) -> tuple[Vec, Vec]:
        return np.minimum(self.p0, self.p1) - self.radius, np.maximum(self.p0, self.p1) + self.radius

    def inside(self, q: Coords) -> np.ndarray:
        d = self.p1 - self.p0
        length2 = float(d @ d) or 1e-9
        rel = [q[k] - np.float32(self.p0[k]) for k in range(3)]
        t = np.clip((rel[0] * np.float32(d[0]) + rel[1] * np.float32(d[1]) + rel[2] * np.float32(d[2]))
                    / np.float32(length2), 0.0, 1.0)
        dist2 = sum((rel[k] - t * np.float32(d[k])) ** 2 for k in range(3))
        return dist2 < np.float32(self.radius ** 2)


@dataclass(frozen=True)
class Halfspace(Shape):
    """Points with ``normal . q < offset`` (the gas above a fluid level)."""

    normal: Vec
    offset: float

    def inside(self, q: Coords) -> np.ndarray:
        return q[0] * np.float32(self.normal[0]) + q[1] * np.float32(self.normal[1]) \
            + q[2] * np.float32(self.normal[2]) < np.float32(self.offset)


@dataclass(frozen=True)
class Slabs(Shape):
    """Periodic slabs across z: intervertebral discs."""

    period: float
    thickness: float
    phase: float

    def inside(self, q: Coords) -> np.ndarray:
        return np.mod(q[2] - np.float32(self.phase), np.float32(self.period)) < np.float32(self.thickness)


@dataclass(frozen=True)
class Ribs(Shape):
    """Round ribs running around an ellipse of the body wall, sloping down towards the front."""

    semi: Vec  # (a_x, a_y) of the ellipse the ribs follow
    radius: float
    period: float  # rib spacing along z, mm
    slope: float  # how much lower (mm) a rib is at the front than at the back
    phase: float
    z_range: tuple[float, float]

    def bbox(self) -> tuple[Vec, Vec]:
        reach = np.array([self.semi[0] + self.radius, self.semi[1] + self.radius])
        return np.array([-reach[0], -reach[1], self.z_range[0]]), np.array([reach[0], reach[1], self.z_range[1]])

    def inside(self, q: Coords) -> np.ndarray:
        shape = np.broadcast_shapes(*(a.shape for a in q))
        u = np.broadcast_to(q[0] / np.float32(self.semi[0]), shape)
        v = np.broadcast_to(q[1] / np.float32(self.semi[1]), shape)
        e = np.sqrt(u * u + v * v)
        scale = 0.5 * float(self.semi[0] + self.semi[1])
        # Only the thin band around the rib ellipse can be bone; finish the work on those voxels.
        band = np.abs(e - 1.0) * scale < self.radius
        out = np.zeros(shape, dtype=bool)
        idx = np.nonzero(band)
        if not idx[0].size:
            return out
        qz = np.broadcast_to(q[2], shape)[idx]
        eb = e[idx]
        sin_t = v[idx] / np.maximum(eb, 1e-6)  # -1 at the front (anterior is -y), +1 at the back
        z_eff = qz + np.float32(self.slope) * (1.0 - sin_t) * 0.5
        dz = np.mod(z_eff - np.float32(self.phase), np.float32(self.period)) - np.float32(self.period / 2)
        radial = (eb - 1.0) * np.float32(scale)
        rib = (radial * radial + dz * dz < np.float32(self.radius ** 2)) & (sin_t > -0.75)  # no ribs mid-front
        rib &= (qz >= self.z_range[0]) & (qz <= self.z_range[1])
        out[idx] = rib
        return out


@dataclass(frozen=True)
class Intersect(Shape):
    a: Shape
    b: Shape

    def bbox(self) -> tuple[Vec, Vec]:
        (lo1, hi1), (lo2, hi2) = self.a.bbox(), self.b.bbox()
        return np.maximum(lo1, lo2), np.minimum(hi1, hi2)

    def inside(self, q: Coords) -> np.ndarray:
        return self.a.inside(q) & self.b.inside(q)


@dataclass(frozen=True)
class Union(Shape):
    a: Shape
    b: Shape

    def bbox(self) -> tuple[Vec, Vec]:
        (lo1, hi1), (lo2, hi2) = self.a.bbox(), self.b.bbox()
        return np.minimum(lo1, lo2), np.maximum(hi1, hi2)

    def inside(self, q: Coords) -> np.ndarray:
        return self.a.inside(q) | self.b.inside(q)


@dataclass(frozen=True)
class Layer:
    """Paint ``hu`` (+ texture, + a linear gradient) inside ``shape``; then set the label there.

    ``label`` 1 marks the target, 0 erases it (an organ drawn over the target), None leaves the
    label as it is (a structure inside the target, or one that never meets it).
    """

    shape: Shape
    hu: float
    texture: Ripples | None = None
    gradient: tuple[float, float, float] | None = None  # HU per mm
    label: int | None = 0

    def value(self, q: Coords) -> np.ndarray | float:
        out: np.ndarray | float = np.float32(self.hu)
        if self.texture is not None:
            out = out + self.texture(q)
        if self.gradient is not None:
            out = out + sum(np.float32(g) * q[k] for k, g in enumerate(self.gradient) if g)
        return out


@dataclass(frozen=True)
class Nodule:
    """One lung nodule as sampled (before rendering clips it to the thoracic cavity)."""

    center: tuple[float, float, float]  # patient mm (LPS, relative to the patient centre)
    diameter_mm: float
    kind: str  # "isolated", "juxtapleural" or "juxtavascular"
    lobulated: bool


@dataclass(frozen=True)
class Anatomy:
    """A sampled phantom: layers painted in order over air, plus scanner noise and blur."""

    task: str
    layers: tuple[Layer, ...]
    noise_hu: float
    blur_voxels: float
    nodules: tuple[Nodule, ...] = ()


# --------------------------------------------------------------------------------------------
# Anatomy
# --------------------------------------------------------------------------------------------


def _rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    """A random rotation of at most ``max_degrees`` about a random axis (Rodrigues)."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = math.radians(rng.uniform(-max_degrees, max_degrees))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


def _organ(rng: np.random.Generator, center, semi, *, tilt: float = 10.0, bumps: float = 0.08,
           wavelength=(60.0, 160.0)) -> Ellipsoid:
    return Ellipsoid(center=np.asarray(center, float), semi=np.asarray(semi, float), rot=_rotation(rng, tilt),
                     ripples=Ripples.sample(rng, 4, bumps, wavelength) if bumps else None)


def _body_wall(rng: np.random.Generator, semi_x: tuple[float, float], semi_y: tuple[float, float]):
    """Body outline, subcutaneous fat, muscle wall, spine and back muscles shared by both phantoms."""
    ax, ay = rng.uniform(*semi_x), rng.uniform(*semi_y)
    fat, muscle = rng.uniform(10, 30), rng.uniform(8, 14)
    cav = np.array([ax - fat - muscle, ay - fat - muscle])
    body = Cylinder(np.zeros(2), np.array([ax, ay]))
    wall = Cylinder(np.zeros(2), np.array([ax - fat, ay - fat]))
    cavity = Cylinder(np.zeros(2), cav)
    layers = [
        Layer(body, -100.0, Ripples.sample(rng, 3, 10.0, (20, 60))),
        Layer(wall, rng.uniform(40, 55), Ripples.sample(rng, 3, 6.0, (20, 60))),
    ]
    yb = cav[1] - rng.uniform(28, 36)  # vertebral body centre, just inside the posterior wall
    disc_phase, period = rng.uniform(0, 32), rng.uniform(28, 34)
    vertebra = Cylinder(np.array([0.0, yb]), np.array([22.0, 18.0]))
    marrow = Cylinder(np.array([0.0, yb]), np.array([19.0, 15.0]))
    bone = [
        Layer(Cylinder(np.array([-34.0, yb + 40]), np.array([24.0, 22.0])), 50.0),  # back muscles
        Layer(Cylinder(np.array([34.0, yb + 40]), np.array([24.0, 22.0])), 50.0),
        Layer(vertebra, rng.uniform(650, 900)),  # cortical shell
        Layer(marrow, rng.uniform(200, 320), Ripples.sample(rng, 3, 30.0, (8, 20))),
        Layer(Intersect(vertebra, Slabs(period, 6.0, disc_phase)), 90.0),
        Layer(Cylinder(np.array([0.0, yb + 30]), np.array([15.0, 13.0])), rng.uniform(450, 650)),  # arch
        Layer(Cylinder(np.array([0.0, yb + 29]), np.array([8.0, 8.0])), 20.0),  # spinal canal
        Layer(Cylinder(np.array([0.0, yb + 50]), np.array([5.0, 14.0])), 500.0),  # spinous process
    ]
    return body, cavity, yb, layers, bone


def _ribs(rng: np.random.Generator, cavity: Cylinder, z_range: tuple[float, float]) -> Layer:
    offset = rng.uniform(5, 8)  # ribs sit in the wall, just outside the cavity
    return Layer(Ribs(semi=np.asarray(cavity.semi) + offset, radius=rng.uniform(4.5, 6.0), period=rng.uniform(24, 30),
                      slope=rng.uniform(30, 60), phase=rng.uniform(0, 30), z_range=z_range), rng.uniform(500, 800))


def _tree(rng: np.random.Generator, root: Vec, direction: Vec, length: float, radius: float, depth: int,
          spread: float = 0.6) -> list[Capsule]:
    """A branching vessel tree of capsules: two children per segment, thinner and shorter each level."""
    direction = direction / np.linalg.norm(direction)
    end = root + direction * length
    out = [Capsule(root, end, radius)]
    if depth > 0:
        for _ in range(2):
            child = direction + spread * rng.normal(size=3)
            out += _tree(rng, end, child, length * rng.uniform(0.7, 0.9), radius * 0.72, depth - 1, spread)
    return out


def _abdomen(rng: np.random.Generator) -> Anatomy:
    body, cavity, yb, layers, bone = _body_wall(rng, (145, 170), (105, 125))
    cx, cy = cavity.semi
    inside = lambda s: Intersect(s, cavity)  # noqa: E731 - organs never leave the abdominal cavity
    zl = rng.uniform(-10, 30)  # liver centre height

    # Bowel and visceral fat: a mottled soft-tissue background with some gas-filled loops.
    layers.append(Layer(cavity, rng.uniform(-20, 10), Ripples.sample(rng, 5, 35.0, (25, 70))))
    for _ in range(int(rng.integers(6, 11))):
        p0 = np.array([rng.uniform(-0.6, 0.6) * cx, rng.uniform(-0.7, 0.3) * cy, rng.uniform(zl - 190, zl - 30)])
        p1 = p0 + rng.normal(size=3) * 35
        r = rng.uniform(9, 16)
        layers.append(Layer(inside(Capsule(p0, p1, r)), rng.uniform(20, 40)))
        if rng.random() < 0.5:
            layers.append(Layer(inside(Capsule(p0, p1, r - 3)), rng.choice([-950.0, 10.0])))
    # Lung bases above the diaphragm.
    lung_z = zl + rng.uniform(150, 175)
    for side in (-1, 1):
        lung = _organ(rng, (side * 0.5 * cx, 0.1 * cy, lung_z), (0.48 * cx, 0.85 * cy, 110), tilt=5, bumps=0.04)
        layers.append(Layer(inside(lung), -850.0, Ripples.sample(rng, 3, 20.0, (30, 80)), gradient=(0, 0.25, 0)))
    # Neighbours of liver-like density: kidneys, spleen, stomach, aorta.
    for side, dz in ((-1, -rng.uniform(55, 75)), (1, -rng.uniform(40, 60))):
        kc = np.array([side * rng.uniform(62, 75), yb - rng.uniform(0, 10), zl + dz])
        layers.append(Layer(inside(_organ(rng, kc, (rng.uniform(25, 30), rng.uniform(22, 26), rng.uniform(45, 55)),
                                          tilt=20, bumps=0.05)), rng.uniform(25, 40)))
        layers.append(Layer(_organ(rng, kc + [-side * 12, -5, 0], (9, 9, 22), bumps=0), -70.0))  # sinus fat
    spleen = _organ(rng, (0.62 * cx, 0.35 * cy, zl + rng.uniform(0, 30)),
                    (rng.uniform(35, 50), rng.uniform(25, 32), rng.uniform(45, 60)), tilt=25)
    layers.append(Layer(inside(spleen), rng.uniform(45, 55), Ripples.sample(rng, 3, 4.0, (15, 40))))
    sc = np.array([0.35 * cx, -0.3 * cy, zl + rng.uniform(0, 25)])
    ss = np.array([rng.uniform(40, 55), rng.uniform(30, 40), rng.uniform(40, 55)])
    stomach = _organ(rng, sc, ss, tilt=20, bumps=0.06)
    lumen = Ellipsoid(sc, ss - 5, stomach.rot, stomach.ripples)
    layers += [Layer(inside(stomach), 40.0), Layer(inside(lumen), 15.0),
               # Gas rises to the front (-y) of a patient lying on their back.
               Layer(inside(Intersect(lumen, Halfspace(np.array([0, 1.0, 0]), sc[1] - rng.uniform(0, 0.6) * ss[1]))),
                     -950.0)]
    layers.append(Layer(Cylinder(np.array([12.0, yb - 32]), np.array([11.0, 11.0])), rng.uniform(35, 50)))  # aorta

    # The liver: a big right lobe joined to a flatter left lobe reaching across the midline.
    right = _organ(rng, (-0.38 * cx, rng.uniform(-0.15, 0.05) * cy, zl),
                   (rng.uniform(0.5, 0.6) * cx, rng.uniform(0.62, 0.75) * cy, rng.uniform(65, 85)), tilt=12)
    left = _organ(rng, (rng.uniform(0.0, 0.15) * cx, -0.4 * cy, zl + rng.uniform(5, 25)),
                  (rng.uniform(0.35, 0.5) * cx, rng.uniform(0.25, 0.35) * cy, rng.uniform(35, 50)), tilt=15)
    # The visceral surface faces down, back and to the midline: a slanted cut makes the wedge.
    normal = np.array([0.6, 0.3, -1.0]) / np.linalg.norm([0.6, 0.3, -1.0])
    cut = Halfspace(normal, float(normal @ right.center) + rng.uniform(0.35, 0.55) * right.semi[2])
    liver = Intersect(Intersect(Union(right, left), cut), cavity)
    liver_hu = rng.uniform(50, 70)
    layers.append(Layer(liver, liver_hu, Ripples.sample(rng, 4, 8.0, (15, 50)), label=1))
    hilum = right.center + np.array([0.35 * right.semi[0], -0.1 * right.semi[1], -0.3 * right.semi[2]])
    for k in range(int(rng.integers(2, 4))):
        for seg in _tree(rng, hilum, rng.normal(size=3) + [-1.0, 0, 0.5], rng.uniform(35, 50), rng.uniform(5, 7), 2):
            layers.append(Layer(Intersect(seg, liver), liver_hu - rng.uniform(20, 35), label=1))
    if rng.random() < 0.5:  # a hypodense lesion: part of the liver for this task
        for _ in range(int(rng.integers(1, 3))):
            lc = right.center + rng.uniform(-0.5, 0.5, size=3) * right.semi
            lesion = _organ(rng, lc, np.full(3, rng.uniform(6, 16)), tilt=0, bumps=0.08, wavelength=(10, 30))
            layers.append(Layer(Intersect(lesion, liver), liver_hu - rng.uniform(20, 40), label=1))
    if rng.random() < 0.7:  # the gallbladder sits in a notch under the liver and is not liver
        gc = right.center + np.array([0.45 * right.semi[0], -0.45 * right.semi[1], -0.65 * right.semi[2]])
        layers.append(Layer(inside(_organ(rng, gc, (14, 14, 28), tilt=20, bumps=0.04)), rng.uniform(0, 20)))
    layers.append(Layer(Cylinder(np.array([-22.0, yb - 28]), np.array([12.0, 10.0])), rng.uniform(35, 45)))  # IVC
    layers.append(_ribs(rng, cavity, (zl - 60, np.inf)))
    layers += bone
    return Anatomy("liver", tuple(layers), noise_hu=float(rng.uniform(15, 25)),
                   blur_voxels=float(rng.uniform(0.4, 0.7)))


def _lungs_inside(lungs: Sequence[Shape], points: np.ndarray) -> np.ndarray:
    q = (points[:, 0].astype(np.float32), points[:, 1].astype(np.float32), points[:, 2].astype(np.float32))
    m = np.zeros(len(points), bool)
    for lung in lungs:
        m |= lung.inside(q)
    return m


def _place_nodule(rng: np.random.Generator, lung: Shape, all_lungs: Sequence[Shape], vessels: Sequence[Capsule],
                  radius: float, kind: str) -> np.ndarray | None:
    lo, hi = lung.bbox()
    lo, hi = np.maximum(lo, -250), np.minimum(hi, 250)
    cand = rng.uniform(lo, hi, size=(400, 3))
    cand = cand[_lungs_inside([lung], cand)]
    if not len(cand):
        return None
    if kind == "juxtapleural":
        # Walk from a point inside the lung towards a random direction until the lung ends; the
        # nodule then sits against the pleura there.
        start, direction = cand[0], rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        steps = start + np.arange(0, 300, 1.0)[:, None] * direction
        outside = np.nonzero(~_lungs_inside([lung], steps))[0]
        if not len(outside):
            return None
        return steps[outside[0]] - direction * 0.6 * radius
    if kind == "juxtavascular":
        thick = [v for v in vessels if v.radius >= 1.5 and _lungs_inside([lung], v.p1[None])[0]]
        if not thick:
            return None
        v = thick[int(rng.integers(len(thick)))]
        axis = (v.p1 - v.p0) / (np.linalg.norm(v.p1 - v.p0) + 1e-9)
        perp = np.cross(axis, rng.normal(size=3))
        perp /= np.linalg.norm(perp) + 1e-9
        c = v.p0 + rng.uniform(0.3, 0.9) * (v.p1 - v.p0) + perp * (v.radius + 0.5 * radius)
        return c if _lungs_inside([lung], c[None])[0] else None
    # Isolated: the whole nodule inside the lungs.
    offsets = np.concatenate([np.eye(3), -np.eye(3)]) * radius
    for c in cand:
        if _lungs_inside(all_lungs, c + offsets).all():
            return c
    return None


def _chest(rng: np.random.Generator) -> Anatomy:
    body, cavity, yb, layers, bone = _body_wall(rng, (140, 165), (100, 120))
    cx, cy = cavity.semi
    inside = lambda s: Intersect(s, cavity)  # noqa: E731
    layers.append(Layer(cavity, rng.uniform(-90, -60)))  # mediastinal fat fills what the organs leave
    lungs = []
    for side in (-1, 1):
        width = rng.uniform(0.44, 0.5) * cx * (0.92 if side > 0 else 1.0)  # the heart takes room on the left
        lung = _organ(rng, (side * (cx - width - 4), 0.08 * cy, rng.uniform(-10, 10)),
                      (width, rng.uniform(0.8, 0.9) * cy, rng.uniform(110, 135)), tilt=6, bumps=0.05)
        lungs.append(inside(lung))
        # Lung tissue is denser at the back (gravity-dependent), hence the +y gradient.
        layers.append(Layer(lungs[-1], rng.uniform(-870, -830), Ripples.sample(rng, 3, 20.0, (30, 80)),
                            gradient=(0, rng.uniform(0.15, 0.35), 0)))
    heart_c = np.array([rng.uniform(15, 30), -0.25 * cy, rng.uniform(-60, -30)])
    layers.append(Layer(inside(_organ(rng, heart_c, (rng.uniform(50, 65), rng.uniform(45, 55), rng.uniform(50, 60)),
                                      tilt=25, bumps=0.05)), rng.uniform(35, 50)))
    asc = Capsule(np.array([8.0, -0.3 * cy, -20]), np.array([5.0, -0.25 * cy, 60]), rng.uniform(13, 17))
    arch = Capsule(asc.p1, np.array([18.0, yb - 28, 65]), 12.0)
    desc = Capsule(arch.p1, np.array([18.0, yb - 28, -400]), rng.uniform(10, 13))
    layers += [Layer(s, rng.uniform(35, 50)) for s in (asc, arch, desc)]
    carina = np.array([0.0, -0.05 * cy, rng.uniform(20, 40)])
    airways = [Capsule(carina, carina + [0, 0, 400], 9.0)]
    airways += [Capsule(carina, carina + [side * 45, 8, -25], 6.5) for side in (-1, 1)]
    for a in airways:
        layers.append(Layer(Capsule(a.p0, a.p1, a.radius + 2.0), 40.0))  # airway wall
    for a in airways:
        layers.append(Layer(a, -1000.0))

    vessels: list[list[Capsule]] = []
    for side, lung in zip((-1, 1), lungs):
        hilum = carina + np.array([side * 40.0, 10.0, -20.0])
        segs = []
        for _ in range(3):
            segs += _tree(rng, hilum, np.array([side, 0, 0]) + 0.8 * rng.normal(size=3),
                          rng.uniform(30, 45), rng.uniform(5, 6.5), 3, spread=0.8)
        vessels.append(segs)
        layers += [Layer(Intersect(s, lung), rng.uniform(0, 40)) for s in segs]

    nodules: list[Nodule] = []
    log_lo, log_hi = np.log(NODULE_DIAMETER_MM)
    for i in range(int(rng.integers(1, 5))):
        # The first nodule is at least 8 mm, so that every case on the default grid (<= 4 mm
        # voxels) has label voxels; the rest are mostly small,
        # log-uniform over 3-30 mm like screening findings.
        diameter = float(np.exp(rng.uniform(np.log(8.0) if i == 0 else log_lo, log_hi)))
        kind = str(rng.choice(["isolated", "juxtapleural", "juxtavascular"], p=[0.5, 0.25, 0.25]))
        side = int(rng.integers(2))
        center = None
        for attempt in range(6):
            # After three failed tries at the chosen kind, settle for an isolated nodule.
            center = _place_nodule(rng, lungs[side], lungs, vessels[side], diameter / 2,
                                   kind if attempt < 3 else "isolated")
            if center is not None and all(np.linalg.norm(center - np.array(n.center))
                                          > (diameter + n.diameter_mm) / 2 + 3 for n in nodules):
                if attempt >= 3:
                    kind = "isolated"
                break
            center = None
        if center is None:
            continue
        lobulated = bool(rng.random() < 0.4)
        shape = Ellipsoid(center, np.full(3, diameter / 2) * rng.uniform(0.9, 1.1, size=3), _rotation(rng, 90),
                          Ripples.sample(rng, 4, 0.2 if lobulated else 0.04, (0.5 * diameter, 1.0 * diameter)))
        layers.append(Layer(inside(shape), rng.uniform(0, 50), Ripples.sample(rng, 2, 8.0, (4, 12)), label=1))
        nodules.append(Nodule(tuple(float(c) for c in center), diameter, kind, lobulated))
    layers.append(_ribs(rng, cavity, (-np.inf, np.inf)))
    layers += bone
    return Anatomy("lung_nodule", tuple(layers), noise_hu=float(rng.uniform(15, 25)),
                   blur_voxels=float(rng.uniform(0.4, 0.7)), nodules=tuple(nodules))


def _streams(seed: int) -> tuple[np.random.Generator, np.random.Generator, np.random.Generator]:
    anatomy, geometry, noise = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 20240917]).spawn(3)
    return np.random.default_rng(anatomy), np.random.default_rng(geometry), np.random.default_rng(noise)


def _check_task(task: str) -> None:
    if task not in LABEL_NAMES:
        raise UserError(f"task {task!r}: not one of {', '.join(LABEL_NAMES)}")


def sample_anatomy(task: str, seed: int) -> Anatomy:
    """Draw a phantom's anatomy from its seed, independent of any voxel grid.

    Args:
        task: ``"liver"`` (upper abdomen, label 1 = liver) or ``"lung_nodule"`` (chest, label 1 = nodules).
        seed: the same seed always gives the same anatomy.

    Returns:
        An :class:`Anatomy`; ``anatomy.nodules`` lists the sampled nodules of a chest phantom.
    """
    _check_task(task)
    rng = _streams(seed)[0]
    return _abdomen(rng) if task == "liver" else _chest(rng)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


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
    if n_cases < 1:
        raise UserError(f"--cases {n_cases}: need at least one case")
    if size < 16:
        raise UserError(f"--size {size}: phantoms need at least 16 voxels per axis")
    out = Path(out_dir)
    n_test = int(round(0.2 * n_cases)) if n_cases >= 3 else 0
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
