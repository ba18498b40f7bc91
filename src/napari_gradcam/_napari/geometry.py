"""Where another layer's pixels or shapes fall on an image's pixels: the world coordinates napari
shares between layers (scale, translate; rotations refused by name), shapes rasterised plane by
plane. Main-thread reads, worker-thread rasterising; no widget state."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from napari.layers import Shapes


def image_shape(layer) -> tuple[int, ...]:
    """A layer's data shape without the RGB(A) axis (full resolution for multiscale data)."""
    data = layer.data[0] if layer.multiscale else layer.data
    shape = tuple(data.shape)
    return shape[:-1] if layer.rgb else shape



def labels_region(layer) -> np.ndarray:
    """The pixels a Labels layer marks: all its labels (> 0), or only its selected label
    while the layer shows only that one ("show selected"): what the user sees is what is
    explained."""
    data = np.asarray(layer.data[0] if getattr(layer, "multiscale", False) else layer.data)
    if layer.show_selected_label:
        return data == layer.selected_label
    return data > 0


def shapes_region(shapes, image, offset: tuple[int, ...] = ()) -> np.ndarray:
    """The selected shapes of ``shapes`` (every shape when none is selected) rasterised onto
    the pixels of ``image``: the vertices go through the shapes' data-to-world and the image's
    world-to-data transforms (layers share world coordinates). The mask has the trailing
    ``shapes.ndim`` axes of the image's shape (2D shapes: one plane for every plane), less the
    leading axes fixed by ``offset`` (one slice explained: only the shapes on that plane)."""
    return shape_outlines(shapes, image, offset).rasterise()


@dataclass
class Outlines:
    """Shapes as 2D outlines in an image's pixel coordinates, grouped by the plane they lie
    on: reading them is cheap (the UI thread does it), rasterising costs one (H, W) plane
    per group, so it runs in the worker."""

    shape: tuple[int, ...]  # the mask's shape: planes (leading) + (H, W)
    planes: dict  # plane index (tuple) -> ([(n, 2) vertices], [shape types])
    failure: str  # the error when no pixel lies inside

    def rasterise(self) -> np.ndarray:
        region = np.zeros(self.shape, bool)
        for plane, (data, types) in self.planes.items():
            masks = Shapes(data, shape_type=types, ndim=2).to_masks(mask_shape=self.shape[-2:])
            np.logical_or(region[plane], np.any(masks, axis=0), out=region[plane])
        if not region.any():
            raise ValueError(self.failure)
        return region


def shape_outlines(shapes, image, offset: tuple[int, ...] = (),
                   looks: str = "the run explains") -> Outlines:
    """The outlines of :func:`shapes_region`, checked (no shapes, none near the image: a
    ValueError saying what to change) but not yet rasterised. ``looks`` names who looks at
    the frame ``offset`` in the message for shapes drawn on other frames only."""
    if not len(shapes.data):
        raise ValueError(f"the Shapes layer {shapes.name!r} has no shapes; draw one around the "
                         "region to explain, or choose another target.")
    picked = sorted(shapes.selected_data) or range(len(shapes.data))
    full = image_shape(image)
    k = min(shapes.ndim, len(full))
    first = len(full) - k  # the image axis of the shapes' first axis
    fixed = max(len(offset) - first, 0)  # leading shape axes fixed by the slice explained
    out = full[first + fixed:]
    planes: dict = {}
    elsewhere: set = set()  # frames of the image that hold shapes, other than the one looked at
    for i in picked:
        world = [shapes.data_to_world(v) for v in np.asarray(shapes.data[i], float)]
        pixels = np.array([np.asarray(image.world_to_data(w), float)[-k:] for w in world])
        # a shape drawn on a plane stays on it (napari's own masks take the first vertex's)
        plane = tuple(int(np.floor(v + 0.5)) for v in pixels[0, :-2])
        if plane[:fixed] != tuple(offset[first:]):  # on another plane than the slice
            if all(0 <= p < n for p, n in zip(plane[:fixed], full[first:])):
                elsewhere.add(plane[:fixed])
            continue
        plane = plane[fixed:]
        if any(not 0 <= p < s for p, s in zip(plane, out[:-2])):
            continue
        yx = pixels[:, -2:]
        if (yx.max(axis=0) < -0.5).any() or (yx.min(axis=0) > np.array(full[-2:]) - 0.5).any():
            continue  # wholly outside the image
        data, types = planes.setdefault(plane, ([], []))
        data.append(yx)
        types.append(shapes.shape_type[i])
    what = "selected shapes" if shapes.selected_data else "shapes"
    failure = (f"the {what} of {shapes.name!r} don't overlap the image {image.name!r}"
               f"{' in the slice shown' if fixed else ''}; draw them on the image, or give "
               "both layers the same scale and translate.")
    if not planes and elsewhere:  # on the image, only not on the frame looked at
        def frame(p):  # a stack's frame as its index, a hyperstack's as its indices
            index = tuple(offset[:first]) + p
            return str(index[0]) if len(index) == 1 else f"({', '.join(map(str, index))})"

        frames = sorted(elsewhere)
        here = frame(tuple(offset[first:]))
        raise ValueError(
            f"the {what} of {shapes.name!r} lie on frame{'s' * (len(frames) > 1)} "
            f"{', '.join(map(frame, frames))}; {looks} frame {here}: go to frame "
            f"{frame(frames[0])} and run, or draw on frame {here}.")
    if not planes:
        raise ValueError(failure)
    return Outlines(tuple(out), planes, failure)


def _data_to_world(layer) -> tuple[np.ndarray, np.ndarray]:
    """A layer's data-to-world transform as a matrix and an offset (probed through its
    public ``data_to_world``: scale, translate, rotate, shear and affine together)."""
    n = layer.ndim
    origin = np.asarray(layer.data_to_world(np.zeros(n)), float)
    matrix = np.stack([np.asarray(layer.data_to_world(e), float) - origin for e in np.eye(n)],
                      axis=1)
    return matrix, origin


def index_map(source, image, point=None) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) with ``source index = A @ image index + b``: the image's pixels seen in the
    ``source`` layer's data through world coordinates (trailing axes aligned, as napari
    shows them). A source with more axes than the image is read at the viewer's ``point``
    (world) on its extra leading axes, as shown."""
    mi, oi = _data_to_world(image)
    ms, os_ = _data_to_world(source)
    ni, ns = len(oi), len(os_)
    if ns <= ni:
        rows, offset = mi[-ns:], oi[-ns:]
    else:
        lead = np.zeros(ns - ni) if point is None else np.asarray(point, float)[-ns:][:ns - ni]
        rows = np.vstack([np.zeros((ns - ni, ni)), mi])
        offset = np.concatenate([lead, oi])
    inverse = np.linalg.inv(ms)
    return inverse @ rows, inverse @ (offset - os_)


def _geometry_text(layer) -> str:
    text = f"{layer.name!r} (scale {tuple(float(v) for v in layer.scale)}, translate " \
           f"{tuple(float(v) for v in layer.translate)}"
    if not np.allclose(layer.affine.affine_matrix, np.eye(layer.ndim + 1)) or \
            not np.allclose(layer.rotate, np.eye(layer.ndim)) or \
            not np.allclose(layer.shear, 0):
        text += ", with a rotation, shear or affine"
    return text + ")"


def layer_onto_image(data, source, image, offset: tuple[int, ...] = (), point=None):
    """``data`` (the array of the layer ``source``) looked up at the pixel centres of
    ``image`` (nearest source pixel; 0 / False outside it): an array over the image's axes
    after the ``offset`` ones (one slice explained), of the image's size on each axis the
    source varies along and 1 on the others (it then holds for every plane). Only for
    axis-aligned transforms between the two (scale, translate; the same rotation is fine):
    otherwise a ValueError naming both layers' geometry."""
    a, b = index_map(source, image, point)
    full = image_shape(image)
    tol = 1e-6 * max(1.0, float(np.abs(a).max()))
    used = np.abs(a) > tol
    columns = [np.flatnonzero(row) for row in used]
    if any(len(c) > 1 for c in columns) or len({int(c[0]) for c in columns if len(c)}) < \
            sum(1 for c in columns if len(c)):
        raise ValueError(
            f"the layer {_geometry_text(source)} is rotated or sheared against the image "
            f"{_geometry_text(image)}, so its pixels can't be matched to the image's; give "
            "both the same rotation (or none), or paint the region on the image's grid.")
    lead = len(offset)
    out = [1] * (len(full) - lead)
    index, valid = [], np.ones((1,) * len(out), bool)
    for j, (cols, size) in enumerate(zip(columns, data.shape)):
        if len(cols) and cols[0] >= lead:  # varies along an image axis explained
            c = int(cols[0])
            q = np.floor(a[j, c] * np.arange(full[c]) + b[j] + 0.5).astype(np.int64)
            out[c - lead] = full[c]
            shape = [1] * len(out)
            shape[c - lead] = full[c]
            q = q.reshape(shape)
        else:  # constant over the pixels explained
            p = offset[cols[0]] if len(cols) else 0
            q = np.full((1,) * len(out), np.floor(a[j, cols[0]] * p + b[j] + 0.5)
                        if len(cols) else np.floor(b[j] + 0.5), np.int64)
        inside = (q >= 0) & (q < size)
        valid = valid & inside
        index.append(np.where(inside, q, 0))
    values = np.asarray(data)[tuple(index)] if data.size else np.zeros(valid.shape, data.dtype)
    return np.where(valid, values, np.zeros((), data.dtype))
