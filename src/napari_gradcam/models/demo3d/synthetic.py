"""The synthetic data contract of the 3D demo model, deterministic by seed.

Grey float32 volumes (Z, Y, X) in [0, 1], 32 to 96 voxels per side (cubes or not). Background:
Gaussian noise blurred with sigma 1-2 voxels, rescaled to mean 0.3-0.5 and standard deviation
0.05-0.12. 0 to 3 non-overlapping objects, fully inside, any mix of three classes:

- ``sphere``: radius 5-9 voxels;
- ``cube``: side 10-16 voxels, axis-aligned (as the 2D demo's squares);
- ``cone``: height 12-20 voxels, base radius 5-8, its apex pointing along +z, -z, +y, -y, +x
  or -x;

each brighter than the background by 0.2-0.45, edges softened by 0-1 voxel. Every object comes
with its class, its mask (voxels whose centre is inside) and its box (min_z, min_row, min_col,
max_z, max_row, max_col, max exclusive): the ground truth for localisation. Objects are drawn in
their own bounding cube only, so a 96^3 volume takes tens of milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..demo.synthetic import background, batch_of, finish, paint, pick_classes

CLASS_NAMES = ("sphere", "cube", "cone")
MIN_SIDE, MAX_SIDE = 32, 96


@dataclass
class SyntheticObject:
    class_id: int
    mask: np.ndarray  # bool, the volume's shape
    box: tuple[int, int, int, int, int, int]  # min z/row/col, max z/row/col (max exclusive)

    @property
    def class_name(self) -> str:
        return CLASS_NAMES[self.class_id]


@dataclass
class SyntheticVolume:
    volume: np.ndarray  # float32 (Z, Y, X) in [0, 1]
    labels: np.ndarray  # float32 (3,) multi-hot
    objects: list[SyntheticObject] = field(default_factory=list)


def _draw(kind: str, rng: np.random.Generator):
    """(signed distance function of offsets (3, ...) to the centre, radius of the ball around
    the shape) for one random object of ``kind``. Orientations are axis-aligned: a small
    network trained on a CPU in minutes tells these apart reliably, which it does not for
    freely rotated cubes and cones."""
    if kind == "sphere":
        radius = rng.uniform(5, 9)
        return (lambda v: radius - np.sqrt((v ** 2).sum(0))), radius
    if kind == "cube":
        half = rng.uniform(10, 16) / 2
        return (lambda v: (half - np.abs(v)).min(0)), half * np.sqrt(3)
    # cone: base centre at -h/2 along its axis, apex at +h/2; distance to the side measured
    # perpendicular to it (cos of the half angle), to the base plane directly
    h, r = rng.uniform(12, 20), rng.uniform(5, 8)
    axis = np.zeros(3)
    axis[int(rng.integers(0, 3))] = rng.choice((-1.0, 1.0))
    cos_half = h / np.hypot(h, r)

    def cone(v):
        t = np.tensordot(axis, v, axes=1)
        rho = np.sqrt(np.maximum((v ** 2).sum(0) - t ** 2, 0))
        return np.minimum(t + h / 2, (r * (h / 2 - t) / h - rho) * cos_half)

    return cone, float(np.hypot(h / 2, r))


def _shape3(shape) -> tuple[int, int, int]:
    dims = (int(shape),) * 3 if np.isscalar(shape) else tuple(int(s) for s in shape)
    if len(dims) != 3 or not all(MIN_SIDE <= s <= MAX_SIDE for s in dims):
        raise ValueError(f"volume size {shape!r}: the 3D demo data is defined for 3 sides of "
                         f"{MIN_SIDE} to {MAX_SIDE} voxels; give an int or (Z, Y, X) in that "
                         "range.")
    return dims


def make_volume(shape=48, rng=None, seed: int | None = None, n_objects: int | None = None,
                classes=None) -> SyntheticVolume:
    """One volume drawn from the contract. ``shape``: an int (cube) or (Z, Y, X), each 32-96.
    ``n_objects`` (0-3) and ``classes`` (class ids) force the content; otherwise random. An
    object that finds no room (a small volume already holding large objects) is left out, and
    the labels say so."""
    if rng is None:
        rng = np.random.default_rng(seed)
    dims = _shape3(shape)
    volume = background(rng, dims, (1, 2), np.float32)
    classes = pick_classes(rng, n_objects, classes)
    placed = []  # (centre, radius)
    objects = []
    for cid in classes:
        sdf, radius = _draw(CLASS_NAMES[cid], rng)
        if 2 * radius + 2 >= min(dims):
            continue  # larger than this volume
        for _ in range(100):  # rejection sampling: inside, and apart from the others
            centre = np.array([rng.uniform(radius + 1, s - radius - 1) for s in dims])
            if all(np.linalg.norm(centre - c) > radius + r + 2 for c, r in placed):
                break
        else:
            continue  # no room left: fewer objects
        placed.append((centre, radius))
        lo = [max(int(c - radius) - 2, 0) for c in centre]
        hi = [min(int(c + radius) + 3, s) for c, s in zip(centre, dims)]
        grid = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        offsets = np.stack(np.broadcast_arrays(
            *(g + 0.5 - c for g, c in zip(grid, centre)))).astype(np.float32)
        crop = tuple(slice(a, b) for a, b in zip(lo, hi))
        drawn = paint(rng, volume, crop, sdf(offsets), np.float32)
        if drawn is not None:
            objects.append(SyntheticObject(cid, *drawn))
    return SyntheticVolume(*finish(volume, objects, len(CLASS_NAMES)), objects)


def make_batch(n: int, shape=48, seed: int = 0):
    """n volumes of one shape: (volumes (n, Z, Y, X), labels (n, 3), objects per volume)."""
    return batch_of(make_volume, "volume", n, shape, seed)


def sample_volume() -> SyntheticVolume:
    """The sample volume: 48 x 64 x 64 with one sphere, one cube and one cone."""
    return make_volume((48, 64, 64), seed=3, classes=[0, 1, 2])


__all__ = ["CLASS_NAMES", "SyntheticObject", "SyntheticVolume", "make_batch", "make_volume",
           "sample_volume"]
