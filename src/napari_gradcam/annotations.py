"""Annotations: the records that exports write, and their conversion to and from napari Shapes.

An :class:`Annotation` is one shape: a shapely geometry in pixel-corner image coordinates
(x = column, y = row, pixel (r, c) covers [c, c + 1] x [r, r + 1]), its kind (``rectangle``,
``polygon``, ``ellipse``, ``line``, ``path``), the leading indices of its plane (frame, z, ...)
and its properties (the features: class, score, peak, mean, area, region id).

napari puts pixel *centres* on integers, so a vertex at napari (row, col) is the point
x = col + 0.5, y = row + 0.5 here. Every function in this module is pure (no napari import): the
napari reader, writers and widget call them.

Polygons with holes: napari (>= 0.6) draws a polygon with holes from one vertex array that
holds the outer ring, explicitly closed, then each hole, explicitly closed, each hole entered
from and left back to the outer ring's first vertex; napari drops the edges that are walked
twice. :func:`polygon_to_vertices` writes that form and :func:`vertices_to_polygon` reads it
(and any plain polygon a user draws).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import shapely

KINDS = ("rectangle", "polygon", "ellipse", "line", "path")
FEATURES = ("region", "kind", "class", "class_id", "score", "peak", "mean", "area")

# tab10, as 0-255 RGB: the colour of class k is PALETTE[k % 10]
PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]


def class_name(names, cid, default=None):
    """``names[cid]`` when ``cid`` indexes ``names``, else ``default`` (a class id from another
    model, or no names at all)."""
    if names is None or cid is None:
        return default
    try:
        i = int(cid)
    except (TypeError, ValueError):  # NaN: a row without a class
        return default
    return names[i] if 0 <= i < len(names) else default


def class_color(class_id: int | None) -> tuple[int, int, int]:
    """A stable RGB colour (0-255) per class id; grey for unknown classes."""
    if class_id is None or (isinstance(class_id, float) and math.isnan(class_id)):
        return (160, 160, 160)
    return PALETTE[int(class_id) % len(PALETTE)]


@dataclass
class Annotation:
    geometry: Any  # shapely Polygon / MultiPolygon / LineString, pixel-corner coordinates
    kind: str = "polygon"
    index: tuple[int, ...] = ()
    properties: dict = field(default_factory=dict)

    @property
    def class_name(self) -> str | None:
        return self.properties.get("class")

    @property
    def class_id(self) -> int | None:
        return self.properties.get("class_id")


def _clean(value):
    """numpy scalars -> Python, NaN / empty -> None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if value is None or (isinstance(value, str) and value == ""):
        return None
    return value


# ---- regions -> annotations ----------------------------------------------------------------

def regions_to_annotations(
    regions: Sequence,
    class_names: Sequence[str] | None = None,
    kinds: Sequence[str] = ("rectangle", "polygon"),
) -> list[Annotation]:
    """One rectangle and one polygon per region (``kinds`` chooses), sharing a ``region`` id.

    A 3D region (a volume's connected component) gives its rectangle and polygon in every
    plane it crosses, the plane appended to its index, so that it can be drawn, edited and
    exported plane by plane like any stack; all its planes share its ``region`` id and carry
    its ``region_label`` (its value in the volume's label map), which keeps them recognisable
    as one region after editing and in every export. Their ``area`` is the plane's pixels;
    ``volume`` is the whole region's voxels.
    """
    bad = set(kinds) - {"rectangle", "polygon"}
    if bad:
        raise ValueError(f"kinds {sorted(bad)}: regions give 'rectangle' and 'polygon' only.")
    out = []
    for i, region in enumerate(regions):
        if getattr(region, "ndim", 2) == 3:
            from .regions import split_planes

            planes = split_planes([region])
            extra = {"region_label": region.label, "volume": region.area}
        else:
            planes, extra = [region], {}
        for r in planes:
            name = None
            if r.class_id is not None:
                name = class_name(class_names, r.class_id, str(r.class_id))
            props = {"region": i, "class": name, "class_id": r.class_id, "score": r.score,
                     "peak": r.peak, "mean": r.mean, "area": r.area, **extra}
            for kind in kinds:
                geom = r.box if kind == "rectangle" else r.polygon
                out.append(Annotation(geom, kind, tuple(r.index), dict(props, kind=kind)))
    return out


# the 12 edges of a box, as pairs of its corners (corner bits: z, row, col)
_EDGES = [(a, b) for a in range(8) for b in range(8)
          if a < b and (a ^ b).bit_count() == 1]


def box_wireframe(regions: Sequence, ndim: int | None = None):
    """The boxes of the 3D regions as line segments, for a napari Vectors layer in the 3D view.

    Returns ``(vectors, region_ids)``: float array (12 * n, 2, D), each segment a start point
    and its displacement in napari (centre) coordinates, every point carrying the region's
    leading indices (D = ``ndim``, default the regions' leading axes + 3), and the position of
    each segment's region in ``regions``. 2D regions have no box in depth and are skipped.
    """
    boxes = [(i, r) for i, r in enumerate(regions) if getattr(r, "ndim", 2) == 3]
    lead = max((len(r.index) for _, r in boxes), default=0)
    if ndim is not None:
        lead = max(lead, ndim - 3)
    vectors = np.zeros((12 * len(boxes), 2, lead + 3))
    ids = np.repeat(np.array([i for i, _ in boxes], int), 12)
    for k, (_, r) in enumerate(boxes):
        lo = np.asarray(r.bbox[:3], float) - 0.5  # voxel corners -> napari centre coordinates
        hi = np.asarray(r.bbox[3:], float) - 0.5
        corners = np.array([[hi[d] if (c >> (2 - d)) & 1 else lo[d] for d in range(3)]
                            for c in range(8)])
        index = np.zeros(lead)
        if r.index:
            index[lead - len(r.index):] = r.index
        for e, (a, b) in enumerate(_EDGES):
            vectors[12 * k + e, 0] = np.concatenate([index, corners[a]])
            vectors[12 * k + e, 1, lead:] = corners[b] - corners[a]
    return vectors, ids


def as_annotations(items, class_names=None) -> list[Annotation]:
    """Regions or annotations -> annotations."""
    items = list(items)
    if items and not isinstance(items[0], Annotation):
        return regions_to_annotations(items, class_names)
    return items


# ---- napari vertices <-> geometries ---------------------------------------------------------

def _to_napari(xy: np.ndarray, index: tuple[int, ...]) -> np.ndarray:
    """(x, y) pixel-corner points -> napari (*index, row, col) vertices."""
    xy = np.asarray(xy, dtype=np.float64)
    rc = np.column_stack([xy[:, 1] - 0.5, xy[:, 0] - 0.5])
    if index:
        rc = np.column_stack([np.broadcast_to(np.asarray(index, float), (len(rc), len(index))),
                              rc])
    return rc


def _from_napari(vertices: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """napari (*index, row, col) vertices -> ((x, y) points, index)."""
    v = np.asarray(vertices, dtype=np.float64)
    xy = np.column_stack([v[:, -1] + 0.5, v[:, -2] + 0.5])
    index = tuple(int(round(i)) for i in v[0, :-2]) if v.shape[1] > 2 and len(v) else ()
    return xy, index


def polygon_to_vertices(polygon, index: tuple[int, ...] = ()) -> list[np.ndarray]:
    """napari polygon vertex arrays for a Polygon (one array) or MultiPolygon (one per part);
    holes in napari's form (see the module docstring)."""
    arrays = []
    for part in shapely.get_parts(polygon):
        shell = np.asarray(part.exterior.coords)[:-1]
        if not len(part.interiors):
            arrays.append(_to_napari(shell, index))
            continue
        walk = [shell, shell[:1]]  # the outer ring, closed
        for hole in part.interiors:
            walk.append(np.asarray(hole.coords))  # closed
            walk.append(shell[:1])  # back to the anchor
        arrays.append(_to_napari(np.concatenate(walk), index))
    return arrays


def vertices_to_polygon(xy: np.ndarray):
    """Polygon from a napari polygon's points (x, y): the first ring, then any further rings
    that the walk closes (holes), with visits to the anchor vertex between them skipped."""
    rings = []
    i, n = 0, len(xy)
    while i < n:
        start = xy[i]
        j = i + 1
        while j < n and not np.array_equal(xy[j], start):
            j += 1
        ring = xy[i:j]
        if len(ring) >= 3:
            rings.append(ring)
        i = j + 1
        if rings and i < n and np.array_equal(xy[i], rings[0][0]):
            i += 1  # the bridge back to the outer ring's anchor
    if not rings:
        return shapely.Polygon()
    geom = shapely.Polygon(rings[0], rings[1:])
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
        polys = [g for g in shapely.get_parts(geom) if g.geom_type == "Polygon"]
        geom = polys[0] if len(polys) == 1 else shapely.MultiPolygon(polys)
    return geom


def ellipse_polygon(corners_xy: np.ndarray, segments: int = 64):
    """The ellipse inscribed in napari's 4 (possibly rotated) bounding-box corners."""
    c = np.asarray(corners_xy, float)
    centre = c.mean(0)
    a = (c[1] - c[0]) / 2  # half of one side
    b = (c[3] - c[0]) / 2  # half of the other
    t = np.linspace(0, 2 * np.pi, segments, endpoint=False)[:, None]
    return shapely.Polygon(centre + np.cos(t) * a + np.sin(t) * b)


# ---- annotations -> napari Shapes data --------------------------------------------------------

def annotations_to_shapes(annotations: Iterable[Annotation], ndim: int | None = None):
    """napari Shapes layer data for annotations.

    Returns ``(data, shape_types, features)``: a list of vertex arrays in napari (row, col)
    centre coordinates (every vertex carries the leading indices), the shape types, and a dict
    of feature columns (``FEATURES`` plus ``index0``, ``index1``, ... for the leading axes).
    A MultiPolygon becomes one polygon per part with the same features.
    """
    annotations = list(annotations)
    lead = max((len(a.index) for a in annotations), default=0)
    if ndim is not None:
        lead = max(lead, ndim - 2)
    data, types, rows = [], [], []
    for a in annotations:
        index = (0,) * (lead - len(a.index)) + tuple(a.index)
        if a.kind == "rectangle":
            xy = np.asarray(a.geometry.exterior.coords)[:4]
            arrays, kind = [_to_napari(xy, index)], "rectangle"
        elif a.kind in ("line", "path"):
            arrays, kind = [_to_napari(np.asarray(a.geometry.coords), index)], a.kind
        elif a.kind == "ellipse" and "ellipse" in a.properties.get("napari_gradcam", {}):
            corners = np.asarray(a.properties["napari_gradcam"]["ellipse"], float)
            arrays, kind = [_to_napari(corners, index)], "ellipse"
        else:
            arrays, kind = polygon_to_vertices(a.geometry, index), "polygon"
        for arr in arrays:
            data.append(arr)
            types.append(kind)
            rows.append(a)
    features = {name: [] for name in FEATURES}
    for k in range(lead):
        features[f"index{k}"] = []
    extra = sorted({key for a in rows for key in a.properties} - set(features) - {"napari_gradcam"})
    for key in extra:
        features[key] = []
    for a, kind in zip(rows, types):
        for name in features:
            if name == "kind":
                features[name].append(kind)
            elif name.startswith("index") and name[5:].isdigit():
                k = int(name[5:])
                idx = (0,) * (lead - len(a.index)) + tuple(a.index)
                features[name].append(idx[k])
            else:
                features[name].append(a.properties.get(name))
    return data, types, _typed(features)


def _typed(features: dict) -> dict:
    """Columns as arrays napari can hold: numbers as float (None -> NaN), text as object."""
    out = {}
    for name, values in features.items():
        if name in ("kind", "class") or any(isinstance(v, str) for v in values):
            out[name] = np.array(["" if v is None else str(v) for v in values], dtype=object)
        else:
            out[name] = np.array([np.nan if v is None else v for v in values], dtype=float)
    return out


# ---- napari Shapes data -> annotations ---------------------------------------------------------

def shapes_to_annotations(data, shape_types, features=None) -> list[Annotation]:
    """Annotations from a napari Shapes layer's data, shape types and features: what the user
    sees (edited, deleted or hand-drawn shapes included) is what gets exported."""
    if isinstance(shape_types, str):
        shape_types = [shape_types] * len(data)
    if features is None:
        columns = {}
    elif hasattr(features, "to_dict"):  # a pandas DataFrame
        columns = {str(k): list(v) for k, v in features.to_dict("list").items()}
    else:
        columns = {str(k): list(v) for k, v in dict(features).items()}
    out = []
    for i, (vertices, kind) in enumerate(zip(data, shape_types)):
        xy, index = _from_napari(vertices)
        props = {k: _clean(v[i]) for k, v in columns.items()
                 if not (k.startswith("index") and k[5:].isdigit())}
        extra = {}
        if kind == "rectangle":
            geom = shapely.Polygon(xy[:4])
        elif kind == "ellipse":
            geom = ellipse_polygon(xy[:4])
            extra["ellipse"] = xy[:4].tolist()
        elif kind in ("line", "path"):
            geom = shapely.LineString(xy)
        elif kind == "polygon":
            geom = vertices_to_polygon(xy)
        else:
            raise ValueError(f"shape {i} has type {kind!r}; napari shape types are {KINDS}.")
        if props.get("class_id") is not None:
            props["class_id"] = int(props["class_id"])
        if props.get("region") is not None:
            props["region"] = int(props["region"])
        props["kind"] = kind
        if extra:
            props["napari_gradcam"] = extra
        out.append(Annotation(geom, kind, index, props))
    return out
