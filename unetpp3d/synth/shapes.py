"""Analytic shapes and tissue layers from which the synthetic phantoms are built (all in mm, LPS)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

Vec = np.ndarray


Coords = tuple[np.ndarray, np.ndarray, np.ndarray]  # qx, qy, qz: patient mm, broadcastable


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
