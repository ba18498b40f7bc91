"""Writers (QuPath GeoJSON, COCO JSON, CSV, YOLO txt) and a GeoJSON reader.

Every writer takes a list of :class:`~napari_gradcam.regions.Region` (each becomes a rectangle
and a polygon) or of :class:`~napari_gradcam.annotations.Annotation` (what a napari Shapes layer
holds, edits included), in pixel-corner image coordinates (see annotations.py). Files are
written atomically: a temporary file in the same folder, renamed over the target when complete.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import shapely
import shapely.affinity
from shapely.geometry import mapping, shape

from .annotations import Annotation, as_annotations, class_color
from .regions import rasterize

FORMAT_KEY = "napari_gradcam"  # our round-trip information inside otherwise standard files
MEASUREMENTS = ("score", "peak", "mean", "area")


def _atomic_write(path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


@contextlib.contextmanager
def atomic_output(path):
    """Yield a temporary path beside ``path``; it replaces ``path`` only when the block ends
    without error, so an interrupted writer never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}",
                               dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _number(v) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(v)


def _plane_axes(lead: int, plane_axes) -> tuple:
    if plane_axes is not None:
        axes = tuple(None if a is None else str(a).lower() for a in plane_axes)
        if len(axes) != lead:
            raise ValueError(
                f"plane_axes has {len(axes)} entries but the annotations have {lead} leading "
                "axes; give one of 'z', 't' or None per leading axis."
            )
        return axes
    return (None,) * max(lead - 2, 0) + ("t", "z")[-lead:] if lead else ()


def _scale_xy(scale) -> tuple[float, float]:
    if scale is None:
        return 1.0, 1.0
    s = [float(v) for v in scale]
    return s[-1], s[-2]


def _class_of(props: dict, class_names) -> tuple[str | None, int | None]:
    cid = props.get("class_id")
    name = props.get("class")
    if name is None and cid is not None and class_names is not None and 0 <= cid < len(class_names):
        name = class_names[cid]
    if cid is None and name is not None and class_names is not None and name in class_names:
        cid = list(class_names).index(name)
    return name, cid


# ---- GeoJSON (QuPath) ----------------------------------------------------------------------

def write_geojson(
    items: Iterable,
    path,
    *,
    class_names: Sequence[str] | None = None,
    scale: Sequence[float] | None = None,
    physical_units: bool = False,
    plane_axes: Sequence[str | None] | None = None,
) -> Path:
    """A GeoJSON FeatureCollection that QuPath imports as annotations.

    Per feature: ``objectType`` "annotation", ``classification`` {name, color} when the class is
    known (QuPath aborts an import on a classification without colour), ``measurements`` with the
    region's numbers, closed rings (rectangles as axis-aligned 5-point rings), and the plane in
    the geometry's ``plane`` {"c": -1, "z": z, "t": t} (QuPath ignores a third coordinate).
    Coordinates are pixels; with ``physical_units=True`` they are multiplied by ``scale``
    (napari's layer scale, last two entries = row, column). The leading axes map to QuPath's
    planes by ``plane_axes`` (default: one leading axis = z, two = t, z).
    """
    annotations = as_annotations(items, class_names)
    lead = max((len(a.index) for a in annotations), default=0)
    axes = _plane_axes(lead, plane_axes)
    sx, sy = _scale_xy(scale) if physical_units else (1.0, 1.0)
    features = []
    for a in annotations:
        geom = a.geometry
        if (sx, sy) != (1.0, 1.0):
            geom = shapely.affinity.scale(geom, sx, sy, origin=(0, 0))
        g = mapping(geom)
        g = json.loads(json.dumps(g))  # tuples -> lists
        index = (0,) * (lead - len(a.index)) + tuple(a.index)
        if index:
            plane = {"c": -1, "z": 0, "t": 0}
            for axis, value in zip(axes, index):
                if axis in ("z", "t"):
                    plane[axis] = int(value)
            g["plane"] = plane
        name, cid = _class_of(a.properties, class_names)
        props = {"objectType": "annotation"}
        if name is not None:
            props["classification"] = {"name": str(name), "color": list(class_color(cid))}
            props["name"] = f"{name} {a.kind}"
        measurements = {k: float(a.properties[k]) for k in MEASUREMENTS
                        if _number(a.properties.get(k))}
        if measurements:
            props["measurements"] = measurements
        ours = {"kind": a.kind, "index": list(index),
                "features": {k: _jsonable(v) for k, v in a.properties.items()
                             if k != FORMAT_KEY}}
        ours.update(a.properties.get(FORMAT_KEY, {}))
        props[FORMAT_KEY] = ours
        features.append({"type": "Feature", "geometry": g, "properties": props})
    doc = {
        "type": "FeatureCollection",
        "features": features,
        FORMAT_KEY: {"version": 1, "physical_units": bool(physical_units),
                     "scale": None if scale is None else [float(v) for v in scale],
                     "plane_axes": list(axes)},
    }
    return _atomic_write(path, json.dumps(doc, indent=1))


def _jsonable(v):
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def read_geojson(path) -> tuple[list[Annotation], dict]:
    """Annotations from a GeoJSON file (ours, QuPath's, or any FeatureCollection of polygons and
    lines), in pixel coordinates, and the file's metadata (``scale``, ``physical_units``)."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"can't read {path} as GeoJSON: {err}; is it a .geojson file?") from err
    if isinstance(doc, list):
        feats, meta = doc, {}
    elif doc.get("type") == "FeatureCollection":
        feats, meta = doc.get("features", []), doc.get(FORMAT_KEY, {})
    elif doc.get("type") == "Feature":
        feats, meta = [doc], {}
    else:
        raise ValueError(f"{path} is not a GeoJSON FeatureCollection or Feature.")
    sx, sy = _scale_xy(meta.get("scale")) if meta.get("physical_units") else (1.0, 1.0)
    out = []
    for f in feats:
        gj = f.get("geometry")
        if not gj:
            continue
        geom = shape(gj)
        if (sx, sy) != (1.0, 1.0):
            geom = shapely.affinity.scale(geom, 1 / sx, 1 / sy, origin=(0, 0))
        props = f.get("properties") or {}
        ours = props.get(FORMAT_KEY)
        if ours:
            features = dict(ours.get("features", {}))
            extra = {k: v for k, v in ours.items() if k not in ("kind", "index", "features")}
            if extra:
                features[FORMAT_KEY] = extra
            out.append(Annotation(geom, ours.get("kind", "polygon"),
                                  tuple(int(i) for i in ours.get("index", [])), features))
            continue
        kind = "path" if geom.geom_type in ("LineString", "MultiLineString") else "polygon"
        if geom.geom_type == "Point" or geom.geom_type == "MultiPoint":
            continue  # points are not shapes we can hold
        features = {"kind": kind}
        cls = props.get("classification") or {}
        if cls.get("name") is not None:
            features["class"] = cls["name"]
        meas = props.get("measurements") or {}
        if isinstance(meas, list):  # older QuPath: [{"name": ..., "value": ...}]
            meas = {m.get("name"): m.get("value") for m in meas}
        features.update({k: v for k, v in meas.items() if _number(v)})
        plane = gj.get("plane") or {}
        index = ()
        if plane.get("t", 0):
            index = (int(plane.get("t", 0)), int(plane.get("z", 0)))
        elif "z" in plane:
            index = (int(plane["z"]),)
        out.append(Annotation(geom, kind, index, features))
    return out, dict(meta)


# ---- objects (COCO, YOLO): a region's rectangle and polygon are one object ------------------

def _objects(annotations: list[Annotation]):
    """(index, segmentation geometry, box geometry, properties) per object; lines skipped."""
    groups: dict = {}
    order = []
    skipped = 0
    for i, a in enumerate(annotations):
        if a.geometry.geom_type not in ("Polygon", "MultiPolygon") or a.geometry.is_empty:
            skipped += 1
            continue
        region = a.properties.get("region")
        key = (tuple(a.index), region) if region is not None else ("shape", i)
        if key not in groups:
            groups[key] = {}
            order.append(key)
        groups[key][a.kind] = a
    if skipped:
        warnings.warn(f"{skipped} line or path shape(s) skipped: COCO and YOLO hold areas only.",
                      stacklevel=3)
    for key in order:
        g = groups[key]
        seg = next((g[k] for k in ("polygon", "ellipse", "rectangle") if k in g),
                   next(iter(g.values())))
        box = g.get("rectangle", seg)
        props = dict(box.properties)
        props.update(seg.properties)
        yield tuple(seg.index), seg.geometry, box.geometry, props


def _images(annotations, image_shape):
    """[(index, height, width)] for every image; from image_shape (..., H, W) when given."""
    if image_shape is not None:
        shape = tuple(int(s) for s in image_shape)
        if len(shape) < 2:
            raise ValueError(f"image_shape {shape}: give the image's (..., H, W).")
        return [(idx, shape[-2], shape[-1]) for idx in np.ndindex(*shape[:-2])]
    if not annotations:
        return []
    warnings.warn("image_shape not given: image sizes are guessed from the annotations' extent; "
                  "pass image_shape=(..., H, W) for exact COCO / YOLO files.", stacklevel=3)
    lead = max(len(a.index) for a in annotations)
    sizes: dict = {}
    for a in annotations:
        idx = (0,) * (lead - len(a.index)) + tuple(a.index)
        x0, y0, x1, y1 = a.geometry.bounds
        h, w = sizes.get(idx, (0, 0))
        sizes[idx] = (max(h, math.ceil(y1)), max(w, math.ceil(x1)))
    return [(idx, h, w) for idx, (h, w) in sorted(sizes.items())]


def _image_name(stem: str, index: tuple, ext: str) -> str:
    return f"{stem}{''.join(f'_{i}' for i in index)}{ext}"


def _rle(geometry, height: int, width: int) -> tuple[dict, int]:
    """Uncompressed COCO RLE (column-major run lengths, starting with a run of zeros) of the
    pixels whose centre lies in ``geometry``, and their count."""
    x0, y0, x1, y1 = geometry.bounds
    r0, c0 = max(int(math.floor(y0)), 0), max(int(math.floor(x0)), 0)
    r1, c1 = min(int(math.ceil(y1)), height), min(int(math.ceil(x1)), width)
    mask = np.zeros((height, width), dtype=bool)
    if r1 > r0 and c1 > c0:
        mask[r0:r1, c0:c1] = rasterize(geometry, (r1 - r0, c1 - c0), (r0, c0))
    flat = mask.ravel(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0] + counts
    return {"counts": counts, "size": [height, width]}, int(mask.sum())


def write_coco(
    items: Iterable,
    path,
    *,
    class_names: Sequence[str] | None = None,
    image_shape: Sequence[int] | None = None,
    image_name: str = "image",
) -> Path:
    """COCO JSON: images (one per leading index of ``image_shape``), categories (class_names,
    ids from 1), annotations (ids from 1; one per region: bbox [x, y, w, h] from its rectangle,
    segmentation from its polygon, RLE where it has holes; area; iscrowd 0). Loads with
    ``pycocotools.coco.COCO``. Hand-drawn shapes without a class go to an "unlabelled"
    category."""
    return write_coco_dataset([(image_name, image_shape, items)], path,
                              class_names=class_names)


def write_coco_dataset(entries: Iterable, path, *,
                       class_names: Sequence[str] | None = None) -> Path:
    """One COCO JSON for many sources: ``entries`` holds ``(image_name, image_shape, items)``
    per source (a stack's leading indices are images of their own, named
    ``<image_name>_<index>.png``); see :func:`write_coco`."""
    names = list(class_names) if class_names is not None else []
    categories = [{"id": k + 1, "name": n, "supercategory": "object"} for k, n in enumerate(names)]
    coco_images, coco_anns = [], []
    for image_name, image_shape, items in entries:
        annotations = as_annotations(items, class_names)
        images = _images(annotations, image_shape)
        lead = len(images[0][0]) if images else 0
        image_ids = {idx: len(coco_images) + k + 1 for k, (idx, _, _) in enumerate(images)}
        sizes = {idx: (h, w) for idx, h, w in images}
        coco_images += [{"id": image_ids[idx], "file_name": _image_name(image_name, idx, ".png"),
                         "height": h, "width": w} for idx, h, w in images]
        for index, seg_geom, box_geom, props in _objects(annotations):
            index = (0,) * (lead - len(index)) + index
            if index not in image_ids:
                raise ValueError(f"an annotation lies on plane {index}, outside image_shape "
                                 f"{tuple(image_shape) if image_shape is not None else None}.")
            name, cid = _class_of(props, names or None)
            if cid is None or cid >= len(names):
                label = name if name is not None else "unlabelled"
                if label not in names:
                    names.append(label)
                    categories.append({"id": len(names), "name": label,
                                       "supercategory": "object"})
                cid = names.index(label)
            x0, y0, x1, y1 = box_geom.bounds
            ann = {"id": len(coco_anns) + 1, "image_id": image_ids[index],
                   "category_id": cid + 1, "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0}
            parts = shapely.get_parts(seg_geom)
            if any(len(p.interiors) for p in parts):
                ann["segmentation"], ann["area"] = _rle(seg_geom, *sizes[index])
            else:
                ann["segmentation"] = [np.asarray(p.exterior.coords)[:-1].ravel().tolist()
                                       for p in parts]
                ann["area"] = float(seg_geom.area)
            attrs = {k: _jsonable(props[k]) for k in ("score", "peak", "mean", "region")
                     if props.get(k) is not None}
            if attrs:
                ann["attributes"] = attrs
            coco_anns.append(ann)
    doc = {
        "info": {"description": "napari-gradcam regions", "version": "1.0"},
        "images": coco_images,
        "annotations": coco_anns,
        "categories": categories,
    }
    return _atomic_write(path, json.dumps(doc))


# ---- CSV ---------------------------------------------------------------------------------------

def write_csv(items: Iterable, path, *, class_names: Sequence[str] | None = None) -> Path:
    """One row per shape: its features, its plane, its bounding box in pixels (min_row,
    min_col, max_row, max_col of the geometry) and the geometry as WKT (pixel-corner x, y)."""
    annotations = as_annotations(items, class_names)
    lead = max((len(a.index) for a in annotations), default=0)
    base = ["shape", "kind", "class", "class_id", "region", "score", "peak", "mean", "area"]
    extra = sorted({k for a in annotations for k in a.properties} - set(base) - {FORMAT_KEY})
    header = base + extra + [f"index{k}" for k in range(lead)] + [
        "min_row", "min_col", "max_row", "max_col", "wkt"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    for i, a in enumerate(annotations):
        name, cid = _class_of(a.properties, class_names)
        row = {"shape": i, "kind": a.kind, "class": name, "class_id": cid}
        row.update({k: a.properties.get(k) for k in base[4:] + extra})
        index = (0,) * (lead - len(a.index)) + tuple(a.index)
        row.update({f"index{k}": v for k, v in enumerate(index)})
        x0, y0, x1, y1 = a.geometry.bounds
        row.update(min_row=y0, min_col=x0, max_row=y1, max_col=x1, wkt=a.geometry.wkt)
        w.writerow(["" if row.get(h) is None else _jsonable(row.get(h)) for h in header])
    return _atomic_write(path, buf.getvalue())


# ---- YOLO ---------------------------------------------------------------------------------------

def write_yolo(
    items: Iterable,
    directory,
    *,
    image_shape: Sequence[int],
    class_names: Sequence[str] | None = None,
    image_name: str = "image",
) -> list[Path]:
    """YOLO labels: one ``<image_name>[_index].txt`` per image, a line ``class xc yc w h`` per
    object (0-based class, box centre and size normalised by the image size). Every image gets
    a file, empty when it has no object. Objects without a known class are skipped (warned)."""
    annotations = as_annotations(items, class_names)
    images = _images(annotations, image_shape)
    lead = len(images[0][0]) if images else 0
    lines: dict = {idx: [] for idx, _, _ in images}
    sizes = {idx: (h, w) for idx, h, w in images}
    unknown = 0
    for index, _seg, box_geom, props in _objects(annotations):
        index = (0,) * (lead - len(index)) + index
        _name, cid = _class_of(props, class_names)
        if cid is None:
            unknown += 1
            continue
        h, w = sizes[index]
        x0, y0, x1, y1 = box_geom.bounds
        x0, x1 = np.clip([x0, x1], 0, w)
        y0, y1 = np.clip([y0, y1], 0, h)
        lines[index].append(f"{cid} {(x0 + x1) / 2 / w:.6f} {(y0 + y1) / 2 / h:.6f} "
                            f"{(x1 - x0) / w:.6f} {(y1 - y0) / h:.6f}")
    if unknown:
        warnings.warn(f"{unknown} object(s) without a class skipped: YOLO needs a class id.",
                      stacklevel=2)
    directory = Path(directory)
    return [_atomic_write(directory / _image_name(image_name, idx, ".txt"),
                          "".join(f"{ln}\n" for ln in lines[idx])) for idx in lines]
