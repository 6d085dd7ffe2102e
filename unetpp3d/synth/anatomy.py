"""Random abdomen and chest anatomies (organs, ribs, vessels, nodules) drawn from one seed."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from unetpp3d.errors import UserError
from unetpp3d.synth.shapes import (
    Anatomy,
    Capsule,
    Cylinder,
    Ellipsoid,
    Halfspace,
    Intersect,
    Layer,
    Nodule,
    Ribs,
    Ripples,
    Shape,
    Slabs,
    Union,
    Vec,
)
from unetpp3d.tasks import TASK_RULES

LABEL_NAMES = {name: rules.foreground for name, rules in TASK_RULES.items()}  # what label 1 is called


# Field of view (mm) that the default isotropic grid covers: the whole body cross-section.
FOV_MM = {"liver": 384.0, "lung_nodule": 360.0}


AIR_HU = -1000.0


NODULE_DIAMETER_MM = (3.0, 30.0)


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
