"""The synthetic data contract of the demo model, deterministic by seed.

Grayscale float32 images in [0, 1], any size from 96 to 512 pixels per side. Background: Gaussian
noise blurred with sigma 1-3 px, rescaled to mean 0.3-0.5 and standard deviation 0.05-0.12.
0 to 3 non-overlapping objects, fully inside, any mix of three classes:

- ``disc``: filled circle, radius 5-14 px;
- ``square``: axis-aligned filled square, side 10-26 px;
- ``triangle``: filled equilateral triangle, side 12-28 px, any rotation;

each brighter than the background by 0.2-0.45, edges softened by 0-1 px. Every object comes with
its class, its mask (pixels at least half covered) and its box (min_row, min_col, max_row,
max_col, max exclusive): the ground truth for localisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import gaussian_filter

CLASS_NAMES = ("disc", "square", "triangle")


@dataclass
class SyntheticObject:
    class_id: int
    mask: np.ndarray  # bool, the image's shape
    box: tuple[int, int, int, int]  # min_row, min_col, max_row, max_col (max exclusive)

    @property
    def class_name(self) -> str:
        return CLASS_NAMES[self.class_id]


@dataclass
class SyntheticImage:
    image: np.ndarray  # float32 (H, W) in [0, 1]
    labels: np.ndarray  # float32 (3,) multi-hot
    objects: list[SyntheticObject] = field(default_factory=list)


def _signed_distance(kind: str, size: float, angle: float, dy: np.ndarray, dx: np.ndarray):
    """Distance to the shape's edge, positive inside, from offsets to its centre."""
    if kind == "disc":
        return size - np.hypot(dy, dx)
    if kind == "square":
        return np.minimum(size / 2 - np.abs(dx), size / 2 - np.abs(dy))
    # triangle: equilateral, side `size`, inradius size / (2 sqrt 3); min over its three edges
    inradius = size / (2 * np.sqrt(3))
    d = np.full(dx.shape, np.inf)
    for k in range(3):
        t = angle + k * 2 * np.pi / 3
        d = np.minimum(d, inradius - (dx * np.cos(t) + dy * np.sin(t)))
    return d


def _extent(kind: str, size: float) -> float:
    """Radius of the circle around the shape."""
    return {"disc": size, "square": size / np.sqrt(2), "triangle": size / np.sqrt(3)}[kind]


def background(rng: np.random.Generator, shape, sigma: tuple[float, float], dtype=np.float64):
    """Gaussian noise blurred with a sigma drawn from ``sigma``, rescaled to mean 0.3-0.5 and
    standard deviation 0.05-0.12 (both demos' background; the 3D one in float32, for speed)."""
    noise = gaussian_filter(rng.normal(size=shape).astype(dtype, copy=False), rng.uniform(*sigma))
    return rng.uniform(0.3, 0.5) + rng.uniform(0.05, 0.12) * noise / noise.std()


def pick_classes(rng: np.random.Generator, n_objects: int | None, classes) -> list[int]:
    """The class ids to draw: ``classes`` as given, else ``n_objects`` (or 0-3) random ones."""
    if classes is not None:
        return [int(c) for c in classes]
    count = int(rng.integers(0, 4)) if n_objects is None else int(n_objects)
    return [int(c) for c in rng.integers(0, 3, size=count)]


def paint(rng: np.random.Generator, image: np.ndarray, crop: tuple, d: np.ndarray,
          dtype=float) -> np.ndarray | None:
    """Add one object, signed distance ``d`` over ``image[crop]``, brighter than the background
    by 0.2-0.45 with edges softened by 0-1 px; returns its mask (pixels whose centre is inside)
    and box (min per axis, then max exclusive per axis), or None where no pixel is inside."""
    soft = rng.uniform(0, 1)
    alpha = np.clip(0.5 + d / soft, 0, 1) if soft > 1e-3 else (d >= 0).astype(dtype)
    image[crop] += rng.uniform(0.2, 0.45) * alpha
    mask = np.zeros(image.shape, dtype=bool)
    mask[crop] = d >= 0
    idx = np.nonzero(mask)
    if not idx[0].size:
        return None
    return mask, tuple(int(i.min()) for i in idx) + tuple(int(i.max()) + 1 for i in idx)


def finish(image: np.ndarray, objects, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(the image clipped to [0, 1] as float32, its multi-hot float32 labels (classes,))."""
    labels = np.zeros(classes, np.float32)
    for o in objects:
        labels[o.class_id] = 1
    return np.clip(image, 0, 1).astype(np.float32), labels


def batch_of(make, attr: str, n: int, shape, seed: int):
    """n samples ``make(shape, rng)`` of one shape from one seed: (arrays (n, ...), labels
    (n, 3), objects per sample)."""
    rng = np.random.default_rng(seed)
    items = [make(shape, rng) for _ in range(n)]
    return (np.stack([getattr(i, attr) for i in items]), np.stack([i.labels for i in items]),
            [i.objects for i in items])


def make_image(shape=128, rng=None, seed: int | None = None, n_objects: int | None = None,
               classes=None) -> SyntheticImage:
    """One image drawn from the contract. ``shape``: an int (square) or (H, W), each 96-512.
    ``n_objects`` (0-3) and ``classes`` (class ids) force the content; otherwise random."""
    if rng is None:
        rng = np.random.default_rng(seed)
    h, w = (shape, shape) if np.isscalar(shape) else tuple(int(s) for s in shape)
    if not (96 <= h <= 512 and 96 <= w <= 512):
        raise ValueError(f"image size {(h, w)}: the demo data is defined for 96 to 512 px a side.")
    image = background(rng, (h, w), (1, 3))
    classes = pick_classes(rng, n_objects, classes)
    placed = []  # (cy, cx, radius)
    objects = []
    rr, cc = np.mgrid[0:h, 0:w]
    for cid in classes:
        kind = CLASS_NAMES[cid]
        size = {"disc": rng.uniform(5, 14), "square": rng.uniform(10, 26),
                "triangle": rng.uniform(12, 28)}[kind]
        angle = rng.uniform(0, 2 * np.pi)
        radius = _extent(kind, size)
        for _ in range(200):  # rejection sampling: inside, and apart from the others
            cy = rng.uniform(radius + 1, h - radius - 1)
            cx = rng.uniform(radius + 1, w - radius - 1)
            if all(np.hypot(cy - y, cx - x) > radius + r + 2 for y, x, r in placed):
                break
        else:
            continue  # no room left: fewer objects
        placed.append((cy, cx, radius))
        r0, r1 = max(int(cy - radius) - 2, 0), min(int(cy + radius) + 3, h)
        c0, c1 = max(int(cx - radius) - 2, 0), min(int(cx + radius) + 3, w)
        d = _signed_distance(kind, size, angle, rr[r0:r1, c0:c1] + 0.5 - cy,
                             cc[r0:r1, c0:c1] + 0.5 - cx)
        drawn = paint(rng, image, (slice(r0, r1), slice(c0, c1)), d)
        if drawn is not None:
            objects.append(SyntheticObject(cid, *drawn))
    return SyntheticImage(*finish(image, objects, len(CLASS_NAMES)), objects)


def make_batch(n: int, shape=128, seed: int = 0):
    """n images of one shape: (images (n, H, W), labels (n, 3), objects per image)."""
    return batch_of(make_image, "image", n, shape, seed)


def make_stack(frames: int = 16, shape=128, seed: int = 0):
    """A stack of frames along a leading axis, same contract per frame."""
    return make_batch(frames, shape, seed)
