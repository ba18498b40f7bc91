"""Writers (QuPath GeoJSON, COCO JSON, CSV, YOLO txt) and a GeoJSON reader.

Every writer takes a list of :class:`~napari_gradcam.regions.Region` (each becomes a rectangle
and a polygon) or of :class:`~napari_gradcam.annotations.Annotation` (what a napari Shapes layer
holds, edits included), in pixel-corner image coordinates (see annotations.py). Files are
written atomically (see files.py): a temporary file in the same folder, renamed over the target
when complete, with the mode a plain ``open()`` gives (0666 less the umask). JSON is strict: no
NaN / Infinity tokens (a missing number is null).

Every format is plane-wise, as QuPath and COCO are: a 3D region (a volume's connected component)
is written as its part in each plane it crosses (its rectangle and polygon there, the plane
appended to its index: GeoJSON's ``plane`` z, COCO's image of that plane, a CSV row), and every
part carries the region's ``region_label`` (its value in the volume's label map) and ``volume``
(its voxels), so the parts can be grouped into the region again.
"""

from __future__ import annotations

import csv
import io
import json
import math
import reprlib
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import shapely
import shapely.affinity
from shapely.geometry import mapping, shape

from .annotations import KINDS, Annotation, as_annotations, class_color, class_name
from .files import atomic_output, atomic_write as _atomic_write  # noqa: F401 - re-exported
from .regions import rasterize

FORMAT_KEY = "napari_gradcam"  # our round-trip information inside otherwise standard files
# QuPath measurements: a region's numbers; a plane of a 3D region also carries the region's
# value in its volume's label map (``region_label``, to group its planes again) and its voxels
MEASUREMENTS = ("score", "peak", "mean", "area", "region_label", "volume")


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
    if name is None:
        name = class_name(class_names, cid)
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
    if scale is not None:  # napari's layer scale: recorded, and applied with physical_units
        try:
            scale = _check_scale([float(v) for v in scale], "scale")
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"scale={scale!r}: give the pixel size per axis as numbers "
                             "(napari's layer scale).") from None
        except _Malformed as err:
            raise ValueError(f"{err}.") from None
    sx, sy = _scale_xy(scale) if physical_units else (1.0, 1.0)
    features = []
    for i, a in enumerate(annotations):
        geom = a.geometry
        if not np.isfinite(shapely.get_coordinates(geom)).all():
            raise ValueError(f"shape {i} has coordinates that are not finite (NaN or "
                             "infinity); fix or delete that shape before exporting.")
        if (sx, sy) != (1.0, 1.0):
            geom = shapely.affinity.scale(geom, sx, sy, origin=(0, 0))
        g = _strict(mapping(geom))  # tuples -> lists
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
                "features": {k: _strict(v) for k, v in a.properties.items()
                             if k != FORMAT_KEY}}
        ours.update(a.properties.get(FORMAT_KEY, {}))
        props[FORMAT_KEY] = ours
        features.append({"type": "Feature", "geometry": g, "properties": props})
    doc = {
        "type": "FeatureCollection",
        "features": features,
        FORMAT_KEY: {"version": 1, "physical_units": bool(physical_units),
                     "scale": scale, "plane_axes": list(axes)},
    }
    return _atomic_write(path, _dumps(doc, indent=1))


def _jsonable(v):
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _strict(v):
    """A value strict JSON can hold: NumPy scalars and arrays as Python numbers and lists,
    tuples as lists, non-finite floats as null (a missing value: strict JSON has no NaN, and
    other readers reject a bare NaN token), keys as text, other objects as their text."""
    if isinstance(v, np.ndarray):
        v = v.tolist()
    elif isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if v is None or isinstance(v, (str, int)):
        return v
    if isinstance(v, dict):
        return {str(k): _strict(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_strict(x) for x in v]
    return str(v)


def _dumps(doc, **kwargs) -> str:
    """Strict JSON (no NaN / Infinity tokens), whatever the document held."""
    return json.dumps(_strict(doc), allow_nan=False, **kwargs)


# GeoJSON geometry types -> how deep their "coordinates" nest above a position
_DEPTH = {"Point": 0, "MultiPoint": 1, "LineString": 1, "MultiLineString": 2, "Polygon": 2,
          "MultiPolygon": 3}
# a pixel coordinate beyond 2**53 is no longer an exact float and lies far outside any image
_MAX_COORD = float(2 ** 53)


class _Malformed(Exception):
    """What is wrong with one part of a GeoJSON file (read_geojson adds the file's name and
    the feature's position)."""


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 3, 6, 4, 40, 40


def _short(v) -> str:
    """repr of a value from the file, cut short (it may be huge or deeply nested)."""
    text = _REPR.repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _type_name(v) -> str:
    return "null" if v is None else {dict: "an object", list: "a list", str: "a string",
                                     bool: "a boolean", int: "a number", float: "a number",
                                     }.get(type(v), f"a {type(v).__name__}")


def _int_value(v, what: str, minimum: int | None = None) -> int:
    """An integer (integer-valued floats such as 2.0 included) or _Malformed."""
    ok = isinstance(v, int) and not isinstance(v, bool)
    if not ok and isinstance(v, float) and math.isfinite(v) and v == int(v):
        v, ok = int(v), True
    if not ok or (minimum is not None and v < minimum):
        need = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise _Malformed(f"{what} is {_short(v)}; it must be {need}")
    return int(v)


def _positions(coords, depth: int, what: str) -> None:
    """Check nested coordinate lists down to positions of 2 or 3 finite numbers."""
    stack = [(coords, depth, what)]
    while stack:
        c, d, w = stack.pop()
        if not isinstance(c, list):
            need = "a position [x, y]" if d == 0 else "a list"
            raise _Malformed(f"{w} is {_type_name(c)}; it must be {need}")
        if d == 0:
            for v in c:
                if not isinstance(v, (int, float)) or isinstance(v, bool):
                    raise _Malformed(f"{w} holds {_type_name(v)} {_short(v)}; coordinates "
                                     "must be numbers")
            if len(c) not in (2, 3):
                raise _Malformed(f"{w} has {len(c)} number(s); a position is [x, y] (or "
                                 "[x, y, z])")
            for v in c:
                try:
                    f = float(v)
                except OverflowError:
                    f = math.inf
                if not math.isfinite(f) or abs(f) > _MAX_COORD:
                    raise _Malformed(f"{w} holds {_short(v)}; coordinates must be finite pixel "
                                     f"positions (at most {_MAX_COORD:.0f} in size)")
        else:
            stack.extend((c[k], d - 1, f"{w}[{k}]") for k in range(len(c)))


def _rings(rings, what: str) -> None:
    for k, ring in enumerate(rings):
        if len(ring) < 4:
            raise _Malformed(f"{what}'s ring {k} has {len(ring)} position(s); a polygon ring needs "
                             "at least 4, the last equal to the first")
        if [float(v) for v in ring[0][:2]] != [float(v) for v in ring[-1][:2]]:
            raise _Malformed(f"{what}'s ring {k} is not closed; repeat its first position at its "
                             "end (GeoJSON rings are closed)")


def _check_geometry(gj, what: str = "its geometry", level: int = 0) -> None:
    if not isinstance(gj, dict):
        raise _Malformed(f"{what} is {_type_name(gj)}; it must be a GeoJSON geometry object "
                         "such as {\"type\": \"Polygon\", \"coordinates\": [...]} (or null)")
    kind = gj.get("type")
    if kind == "GeometryCollection":
        parts = gj.get("geometries")
        if not isinstance(parts, list):
            raise _Malformed(f"{what} is a GeometryCollection whose 'geometries' is "
                             f"{_type_name(parts)}; it must be a list of geometries")
        if level > 0:
            raise _Malformed(f"{what} nests a GeometryCollection in another; flatten it")
        for k, part in enumerate(parts):
            _check_geometry(part, f"{what}'s geometry {k}", level + 1)
        return
    if kind not in _DEPTH:
        raise _Malformed(f"{what} has type {_short(kind)}; use one of {', '.join(_DEPTH)} or "
                         "GeometryCollection")
    coords = gj.get("coordinates")
    _positions(coords, _DEPTH[kind], f"{what}'s coordinates")
    if kind in ("LineString", "MultiLineString"):
        for k, line in enumerate(coords if kind == "MultiLineString" else [coords]):
            if len(line) == 1:
                raise _Malformed(f"{what} has a line {k} of one position; a line needs at "
                                 "least 2")
    if kind == "Polygon":
        _rings(coords, what)
    elif kind == "MultiPolygon":
        for k, poly in enumerate(coords):
            _rings(poly, f"{what}'s polygon {k}")


def _polygonal(geom):
    """A valid geometry: invalid polygons (self-intersecting rings, bow ties) are repaired with
    ``make_valid`` and keep their polygonal part; one that encloses no area at all is
    refused."""
    if geom.is_valid or geom.geom_type not in ("Polygon", "MultiPolygon"):
        return geom
    fixed = shapely.make_valid(geom)
    parts = [p for p in shapely.get_parts(fixed) if p.geom_type in ("Polygon", "MultiPolygon")
             and not p.is_empty]
    if not parts:
        raise _Malformed("its polygon encloses no area (its rings cross or fold onto "
                         "themselves); redraw it")
    return parts[0] if len(parts) == 1 else shapely.union_all(parts)


def _check_scale(scale, what: str = "the file's scale") -> list[float] | None:
    if scale is None:
        return None
    if (not isinstance(scale, list) or len(scale) < 2
            or any(not isinstance(v, (int, float)) or isinstance(v, bool) for v in scale)):
        raise _Malformed(f"{what} is {_short(scale)}; it must be a list of at least 2 numbers (one "
                         "per axis) or null")
    try:
        values = [float(v) for v in scale]
    except OverflowError:  # an integer too large for a float
        values = [math.inf]
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise _Malformed(f"{what} is {_short(scale)}; every entry must be a finite number > 0 (the "
                         "size of a pixel)")
    return values


def _metadata(meta) -> dict:
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise _Malformed(f"its '{FORMAT_KEY}' block is {_type_name(meta)}; it must be an "
                         "object")
    meta = dict(meta)
    if "scale" in meta:
        meta["scale"] = _check_scale(meta["scale"], f"its '{FORMAT_KEY}' scale")
    units = meta.get("physical_units", False)
    if not isinstance(units, bool):
        raise _Malformed(f"its '{FORMAT_KEY}' physical_units is {_short(units)}; it must be "
                         "true or false")
    if units and meta.get("scale") is None:
        raise _Malformed(f"its '{FORMAT_KEY}' block says physical_units but gives no scale; "
                         "add the pixel size as scale, or set physical_units to false")
    axes = meta.get("plane_axes")
    if axes is not None and (not isinstance(axes, list)
                             or any(a not in (None, "z", "t") for a in axes)):
        raise _Malformed(f"its '{FORMAT_KEY}' plane_axes is {_short(axes)}; it must be a list of "
                         "'z', 't' or null")
    return meta


def _our_block(ours) -> tuple[str, tuple[int, ...], dict]:
    if not isinstance(ours, dict):
        raise _Malformed(f"its '{FORMAT_KEY}' property is {_type_name(ours)}; it must be an "
                         "object with kind, index and features")
    kind = ours.get("kind", "polygon")
    if kind not in KINDS:
        raise _Malformed(f"its '{FORMAT_KEY}' kind is {_short(kind)}; it must be one of "
                         f"{', '.join(KINDS)}")
    index = ours.get("index", [])
    if not isinstance(index, list):
        raise _Malformed(f"its '{FORMAT_KEY}' index is {_type_name(index)}; it must be a "
                         "list of plane indices (integers >= 0)")
    index = tuple(_int_value(i, f"its '{FORMAT_KEY}' index entry {k}", 0)
                  for k, i in enumerate(index))
    features = ours.get("features", {})
    if not isinstance(features, dict):
        raise _Malformed(f"its '{FORMAT_KEY}' features is {_type_name(features)}; it must be "
                         "an object of feature names and values")
    features = dict(features)
    extra = {k: v for k, v in ours.items() if k not in ("kind", "index", "features")}
    if extra:
        features[FORMAT_KEY] = extra
    return kind, index, features


def _plane_index(gj) -> tuple[int, ...]:
    plane = gj.get("plane")
    if plane is None:
        return ()
    if not isinstance(plane, dict):
        raise _Malformed(f"its geometry's plane is {_type_name(plane)}; it must be an object "
                         "{\"c\": -1, \"z\": z, \"t\": t}")
    z = _int_value(plane.get("z", 0), "its plane's z", 0)
    t = _int_value(plane.get("t", 0), "its plane's t", 0)
    _int_value(plane.get("c", -1), "its plane's c", -1)
    if t:
        return (t, z)
    return (z,) if "z" in plane else ()


def _qupath_features(props: dict, kind: str) -> dict:
    features = {"kind": kind}
    cls = props.get("classification")
    if cls is not None:
        if not isinstance(cls, dict):
            raise _Malformed(f"its classification is {_type_name(cls)}; it must be an object "
                             "{\"name\": ..., \"color\": [r, g, b]}")
        name = cls.get("name")
        if name is not None and not isinstance(name, str):
            raise _Malformed(f"its classification name is {_short(name)}; it must be text")
        if name is not None:
            features["class"] = name
    meas = props.get("measurements")
    if meas is None:
        meas = {}
    if isinstance(meas, list):  # older QuPath: [{"name": ..., "value": ...}]
        if not all(isinstance(m, dict) for m in meas):
            raise _Malformed("its measurements list holds entries that are not objects; give "
                             "{\"name\": ..., \"value\": ...} entries or one object")
        meas = {m.get("name"): m.get("value") for m in meas}
    if not isinstance(meas, dict):
        raise _Malformed(f"its measurements are {_type_name(meas)}; they must be an object of "
                         "names and numbers")
    # QuPath writes NaN for measurements it could not compute: those (and any value that is
    # not a finite number) are left out rather than refused
    features.update({k: v for k, v in meas.items() if isinstance(k, str) and _number(v)})
    return features


def _read_feature(f) -> Annotation | None:
    if not isinstance(f, dict):
        raise _Malformed(f"it is {_type_name(f)}; a feature must be an object "
                         "{\"type\": \"Feature\", \"geometry\": ..., \"properties\": ...}")
    gj = f.get("geometry")
    if gj is None or gj == {}:
        return None  # GeoJSON allows features without geometry: nothing to draw
    _check_geometry(gj)
    props = f.get("properties")
    if props is None:
        props = {}
    if not isinstance(props, dict):
        raise _Malformed(f"its properties are {_type_name(props)}; they must be an object")
    try:
        geom = shape(gj)
    except (shapely.errors.GEOSException, ValueError, TypeError) as err:
        raise _Malformed(f"its geometry can't be built ({err}); check its coordinates") from None
    if geom.geom_type in ("Point", "MultiPoint") or geom.is_empty:
        return None  # points are not shapes we can hold
    if geom.geom_type == "GeometryCollection":
        parts = [p for p in shapely.get_parts(geom) if p.geom_type in ("Polygon", "MultiPolygon")]
        if not parts:
            return None
        geom = shapely.union_all(parts) if len(parts) > 1 else parts[0]
    geom = _polygonal(geom)
    ours = props.get(FORMAT_KEY)
    if ours is not None:
        kind, index, features = _our_block(ours)
        return Annotation(geom, kind, index, features)
    kind = "path" if geom.geom_type in ("LineString", "MultiLineString") else "polygon"
    return Annotation(geom, kind, _plane_index(gj), _qupath_features(props, kind))


def read_geojson(path) -> tuple[list[Annotation], dict]:
    """Annotations from a GeoJSON file (ours, QuPath's, or any FeatureCollection of polygons and
    lines), in pixel coordinates, and the file's metadata (``scale``, ``physical_units``).

    The file is untrusted: anything malformed raises one ``ValueError`` that names the file, the
    feature (its position in ``features``) and what is wrong. Refused: text that is not UTF-8
    JSON or nests too deeply; a top level, feature, geometry, properties, classification,
    plane or our own round-trip block of the wrong type; coordinates that are not finite
    numbers (``NaN``, ``Infinity``, text, or beyond 2**53); polygon rings with fewer than 4
    positions or not closed; a scale that is not a list of finite positive numbers.
    Repaired and kept: self-intersecting polygons (``make_valid``, polygonal part; one that
    encloses no area is refused). Skipped: features without geometry, points, and
    measurements that are not finite numbers (QuPath writes NaN for those it could not
    compute).
    """
    def fail(where: str, what: str) -> ValueError:
        return ValueError(f"can't read {path} as GeoJSON: {where}{what}.")

    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"can't read {path}: {err.strerror or err}; check the path and its "
                         "permissions.") from err
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise fail("", f"byte {err.start} is not UTF-8 text; GeoJSON files are UTF-8 "
                   "(re-save it as UTF-8)") from None
    if not text.strip():
        raise fail("", "the file is empty; export the annotations again")
    try:
        doc = json.loads(text)
    except RecursionError:
        raise fail("", "its JSON nests too deeply to hold annotations; check that it is a "
                   ".geojson file") from None
    except ValueError as err:  # JSONDecodeError, or an integer of too many digits
        raise fail("", f"it is not valid JSON ({err}); check that it is a .geojson file") from None
    return geojson_annotations(doc, path)


def geojson_annotations(doc, source) -> tuple[list[Annotation], dict]:
    """:func:`read_geojson` of a parsed document (``source`` names it in errors): for a file
    read once by a caller that looked inside it first."""
    def fail(where: str, what: str) -> ValueError:
        return ValueError(f"can't read {source} as GeoJSON: {where}{what}.")

    if isinstance(doc, list):
        feats, meta = doc, {}
    elif isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        feats, meta = doc.get("features", []), doc.get(FORMAT_KEY)
        if not isinstance(feats, list):
            raise fail("", f"its 'features' is {_type_name(feats)}; a FeatureCollection's "
                       "features must be a list")
    elif isinstance(doc, dict) and doc.get("type") == "Feature":
        feats, meta = [doc], {}
    else:
        raise fail("", "it is not a GeoJSON FeatureCollection or Feature (its top level is "
                   f"{_type_name(doc)}"
                   + (f" of type {_short(doc.get('type'))}" if isinstance(doc, dict) else "")
                   + "); export annotations as a FeatureCollection")
    try:
        meta = _metadata(meta)
    except _Malformed as err:
        raise fail("", str(err)) from None
    sx, sy = _scale_xy(meta.get("scale")) if meta.get("physical_units") else (1.0, 1.0)
    out = []
    for i, f in enumerate(feats):
        try:
            a = _read_feature(f)
        except _Malformed as err:
            raise fail(f"feature {i}: ", str(err)) from None
        except RecursionError:
            raise fail(f"feature {i}: ", "it nests too deeply") from None
        if a is None:
            continue
        if (sx, sy) != (1.0, 1.0):
            a.geometry = shapely.affinity.scale(a.geometry, 1 / sx, 1 / sy, origin=(0, 0))
        out.append(a)
    return out, meta


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
        if not np.isfinite(shapely.get_coordinates(a.geometry)).all():
            raise ValueError(f"shape {i} has coordinates that are not finite (NaN or "
                             "infinity); fix or delete that shape before exporting.")
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
    """COCO JSON: images (one per leading index of ``image_shape``: for 3D regions pass the
    volume's (..., D, H, W), and each plane is an image), categories (class_names,
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
            attrs = {k: _strict(props[k]) for k in ("score", "peak", "mean", "region",
                                                    "region_label", "volume")
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
    return _atomic_write(path, _dumps(doc))


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
