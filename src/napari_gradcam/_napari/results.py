"""The widget's result layers, written on the main thread: heatmaps as Image layers, regions as
one editable Shapes layer, a segmentation as a Labels layer, 3D boxes as wireframes; updated in
place on a re-run, found by their metadata, named by what they are first."""

from __future__ import annotations

import contextlib
import functools
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from napari.layers import Image, Labels, Points, Shapes, Vectors
from napari.layers.utils.string_encoding import ConstantStringEncoding
from napari.utils.colormaps.standardize_color import transform_color
from napari.utils.notifications import show_info

from ..annotations import (
    annotations_to_shapes,
    box_wireframe,
    class_color,
    class_name,
    regions_to_annotations,
)
from ..explain_arrays import model_spatial_dims
from ..job import JobResult
from ..models import ModelSpec
from ..render import heat_ramp, region_labels
from .geometry import image_shape
from .io import META_KEY

if TYPE_CHECKING:
    from .widget import Job

# a heatmap volume in the 3D view: the hottest voxel along each ray, dimmed by what lies in
# front of it (attenuated MIP), so the hot spot stands out where it is, in depth
VOLUME_RENDERING = "attenuated_mip"
VOLUME_ATTENUATION = 0.05
# what the volume reader keeps in an image layer's metadata to write results back into the file
VOLUME_METADATA = ("affine", "header", "kind", "source", "file_order")

GRID_STRIDE = 4  # layers per side-by-side cell: the image, a heatmap, regions, labels
NAME_WIDTH = 14  # characters of the image's name kept in its result layers' names


def short_name(name: str, width: int = NAME_WIDTH) -> str:
    """An image's name cut to ``width`` characters for its result layers: its start and its
    last four characters (where numbered images differ), an ellipsis between."""
    if len(name) <= width:
        return name
    tail = min(4, width // 3)
    return name[:width - tail - 1].rstrip() + "\u2026" + name[len(name) - tail:]


def result_name(what: str, image: str, width: int = NAME_WIDTH) -> str:
    """A result layer's name, what it is first ("gradcam", "regions", ...) and the image's
    shortened name after it: napari's layer list elides the middle of long names, so both
    ends must tell the layers apart (the full image name is in the layer's metadata)."""
    return f"{what} \u00b7 {short_name(image, width)}"


def _add_probabilities(annotations: list, rows: list) -> None:
    """Each region's probability (its image's row for its class) as a property, so the
    features table keeps the logit ("score") beside it; NaN where the model gives none."""
    found = {(tuple(r["index"]), r["class_id"]): r.get("probability", np.nan) for r in rows}
    for a in annotations:
        image = tuple(a.index[:len(rows[0]["index"])]) if rows else ()
        p = found.get((image, a.properties.get("class_id")), np.nan)
        a.properties["probability"] = np.nan if p is None else float(p)


def level0_regions(job, regions: list) -> list:
    """A multiscale image's regions (found in the pixels of the level explained) in level-0
    pixels: the regions layer lies on the image with the image's own scale, so its vertices,
    and a GeoJSON saved from it, are full-resolution pixel coordinates (what QuPath reads)."""
    downsample = tuple(getattr(job, "downsample", (1.0, 1.0)))
    if getattr(job, "level", None) is None or downsample == (1.0, 1.0):
        return regions
    from ..regions import scale_regions

    return scale_regions(regions, downsample)


def region_rows(explained: JobResult, regions: list, ndim: int):
    """Shapes-layer rows for ``regions`` (any method's, found with the job's targets): vertex
    arrays, shape types, the features table (each row labelled with its class and
    probability) and the edge colours of the classes."""
    annotations = regions_to_annotations(regions, list(explained.class_names))
    _add_probabilities(annotations, explained.rows)
    data, types, features = annotations_to_shapes(annotations, ndim=ndim)
    if "probability" not in features:  # no regions: the column still exists
        features["probability"] = np.full(len(features["score"]), np.nan)
    # each region's label as the batch run's overlays write it
    per_region = region_labels(regions, explained.rows, list(explained.class_names))
    features["label"] = np.array(
        [per_region[int(i)] or "" if np.isfinite(i) else "" for i in
         np.asarray(features["region"], float)], dtype=object)
    colors = np.array([[*class_color(None if np.isnan(c) else int(c)), 255]
                       for c in features["class_id"]], float).reshape(-1, 4) / 255
    return data, types, features, colors


# region labels: one per region, inside the image, drawn by a Points layer's text beside the
# regions layer (whose own text stays empty)
LABEL_SIZE = 9  # points, at any zoom: a label is read on the screen, not measured on the image
LABEL_GAP = 2.0  # screen pixels kept free between two drawn labels
# "upper_left" anchors a point's text at the point and draws it above, the tops of its letters
# LABEL_LIFT ems above the point (measured on napari's canvas): the point is put that far below
# the label's top-left corner. Its letters then fill LABEL_HEIGHT ems below the corner.
LABEL_LIFT = 0.88
LABEL_HEIGHT = 0.8
LABEL_TEXT = {"string": {"constant": ""}, "anchor": "upper_left", "size": LABEL_SIZE,
              "color": "white"}  # the regions layer's: no text
# the labels layer's text: "upper_left" draws a point's text above it (see region_label_places)
LABEL_POINTS_TEXT = {"string": {"array": [], "default": ""}, "anchor": "upper_left",
                     "size": LABEL_SIZE, "color": "white"}
_METRICS: dict = {}


def _dpi() -> float:
    """The dots per inch vispy draws text at (its canvases' default: the screen's)."""
    if "dpi" not in _METRICS:
        from vispy.util import config
        from vispy.util.dpi import get_dpi

        _METRICS["dpi"] = float(config["dpi"] or get_dpi(raise_error=False) or 96.0)
    return _METRICS["dpi"]


def text_extent(texts, size: float) -> tuple[np.ndarray, float]:
    """Widths of ``texts`` and the em, in screen pixels, as napari draws its layers' text at
    ``size`` points: vispy's Open Sans, ``size`` points at its dpi times sqrt(2) (vispy's
    text shader scales by the length of a unit diagonal), measured with Qt's metrics of the
    same font file, or estimated where there is no Qt application."""
    from qtpy.QtGui import QFont, QFontDatabase, QFontMetricsF, QGuiApplication

    em = size / 72 * _dpi() * np.sqrt(2)
    if QGuiApplication.instance() is None:
        return np.array([0.62 * em * len(t) for t in texts], float), em
    if "family" not in _METRICS:
        import vispy.util.fonts

        path = Path(vispy.util.fonts.__file__).parent / "data" / "OpenSans-Regular.ttf"
        font_id = QFontDatabase.addApplicationFont(str(path))
        families = QFontDatabase.applicationFontFamilies(font_id) if font_id >= 0 else []
        _METRICS["family"] = families[0] if families else QGuiApplication.font().family()
    metrics = _METRICS.get(em)
    if metrics is None:
        font = QFont(_METRICS["family"])
        font.setPixelSize(max(1, round(em)))
        metrics = _METRICS[em] = QFontMetricsF(font)
    scale = em / max(1, round(em))
    widths = _METRICS.setdefault(("widths", em), {})  # the same labels at every zoom step
    for t in texts:
        if t not in widths:
            widths[t] = metrics.horizontalAdvance(t) * scale
    return np.array([widths[t] for t in texts], float), em


def thin_labels(rects, priority, bounds=None, gap=(0.0, 0.0)) -> np.ndarray:
    """Which labels to draw. ``rects`` (N, 4): each label's (top, left, bottom, right) in one
    plane, already moved inside ``bounds`` (top, left, bottom, right) where it fits: one still
    outside (a label larger than the image) is not drawn, nor one within ``gap`` (rows,
    columns) of a label of higher ``priority`` drawn before it (the larger region's label wins
    a crowded spot). Returns a boolean mask."""
    rects = np.asarray(rects, float).reshape(-1, 4)
    priority = np.nan_to_num(np.asarray(priority, float), nan=-np.inf)
    inside = np.ones(len(rects), bool)
    if bounds is not None:
        eps = 1e-6
        inside = ((rects[:, 0] >= bounds[0] - eps) & (rects[:, 1] >= bounds[1] - eps)
                  & (rects[:, 2] <= bounds[2] + eps) & (rects[:, 3] <= bounds[3] + eps))
    keep = np.zeros(len(rects), bool)
    kept, n = np.empty((len(rects), 4)), 0
    for i in np.argsort(-priority, kind="stable"):
        r, k = rects[i], kept[:n]
        if not inside[i] or ((k[:, 0] < r[2] + gap[0]) & (r[0] < k[:, 2] + gap[0])
                             & (k[:, 1] < r[3] + gap[1]) & (r[1] < k[:, 3] + gap[1])).any():
            continue
        keep[i] = True
        kept[n], n = r, n + 1
    return keep


def fit_labels(rects, bounds) -> np.ndarray:
    """``rects`` (N, 4) moved up and left where they would run past the bottom or right of
    ``bounds`` (a label at the image's edge is drawn at the edge, not dropped), and down and
    right where they start before its top or left; a label larger than the bounds stays
    outside them (see :func:`thin_labels`)."""
    rects = np.array(rects, float).reshape(-1, 4)
    if bounds is None or not len(rects):
        return rects
    for lo, hi in ((0, 2), (1, 3)):
        shift = np.minimum(0.0, bounds[hi] - rects[:, hi])  # past the far edge: back
        shift = np.where(rects[:, lo] + shift < bounds[lo], bounds[lo] - rects[:, lo], shift)
        fits = rects[:, hi] - rects[:, lo] <= bounds[hi] - bounds[lo]
        shift = np.where(fits, shift, 0.0)
        rects[:, lo] += shift
        rects[:, hi] += shift
    return rects


# a label covering more than LABEL_COVER times its region's box would hide the region it names
# (a small region seen from far away, where the label's letters keep their size): it waits
# for a closer zoom
LABEL_COVER = 4.0
LABELS_ROLE = "region labels"
# the Points layer that draws each regions layer's labels: napari redraws a Shapes layer's
# text at every zoom step at a cost of (shapes in view) x (all shapes), 0.3 s for 400 regions;
# a Points layer's text, one point per label, costs a few milliseconds
_LABELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def labels_of(layer):
    """The Points layer drawing the labels of the regions layer ``layer`` (None if none)."""
    return _LABELS.get(layer)


def region_label_places(layer) -> tuple[np.ndarray, np.ndarray]:
    """Where each region's label is drawn at the layer's zoom, and what it says: points
    (one per region: its plane, then the top-left of the label's letters, moved inside the
    image) and their strings ("" for a label not drawn at this zoom: it would cover a larger
    region's label, or hide its own small region; zooming in brings it back). A region's
    label is its first row's ``label`` (its rectangle; a region is its ``region`` id in one
    plane); rows without a label (hand-drawn shapes) get none."""
    data, feats = layer.data, layer.features
    size = LABEL_SIZE
    per_px = float(layer.scale_factor) / np.abs(np.asarray(layer.scale, float)[-2:])
    labels = feats["label"].to_numpy() if "label" in feats else np.array([], object)
    regions = feats["region"].to_numpy(float) if "region" in feats else np.full(len(feats), np.nan)
    areas = feats["area"].to_numpy(float) if "area" in feats else np.full(len(feats), np.nan)
    m = min(len(data), len(labels))
    shown = [i for i in range(m) if isinstance(labels[i], str) and labels[i]]
    if not shown:
        return np.empty((0, layer.ndim)), np.array([], dtype=str)
    # every shape's first vertex (its plane) and the bounds of its last two coordinates, from
    # all vertices at once
    arrays = [np.asarray(data[i], float) for i in shown]
    starts = np.cumsum([0] + [len(a) for a in arrays[:-1]])
    vertices = np.concatenate(arrays)
    leads = np.round(vertices[starts, :-2], 6)
    lows = np.minimum.reduceat(vertices[:, -2:], starts, axis=0)
    highs = np.maximum.reduceat(vertices[:, -2:], starts, axis=0)
    first, planes = {}, {}
    for j, i in enumerate(shown):
        plane = tuple(leads[j].tolist())
        key = (plane, regions[i]) if np.isfinite(regions[i]) else (plane, "row", i)
        if key not in first:  # the region's first row: its rectangle
            first[key] = j
            planes.setdefault(plane, []).append(j)
    picked_all = [j for picked in planes.values() for j in picked]
    points = np.zeros((len(picked_all), layer.ndim))
    strings = np.full(len(picked_all), "", dtype=object)
    shape = layer.metadata.get(META_KEY, {}).get("image_shape")
    bounds = (-0.5, -0.5, shape[-2] - 0.5, shape[-1] - 0.5) if shape else None
    gap = LABEL_GAP * per_px
    at = 0
    for picked in planes.values():
        rows = [shown[j] for j in picked]
        widths, em = text_extent([labels[i] for i in rows], size)
        corners = lows[picked] + gap  # the text keeps clear of its box's edge line
        height = LABEL_HEIGHT * em * per_px[0]
        rects = fit_labels(np.column_stack([corners, corners[:, 0] + height,
                                            corners[:, 1] + widths * per_px[1]]), bounds)
        extent = highs[picked] - lows[picked]
        priority = np.where(np.isfinite(areas[rows]), areas[rows], extent.prod(axis=1))
        keep = thin_labels(rects, priority, bounds, gap)
        covered = (rects[:, 2] - rects[:, 0]) * (rects[:, 3] - rects[:, 1])
        keep &= covered <= LABEL_COVER * np.maximum(extent, 0.0).prod(axis=1)
        end = at + len(picked)
        points[at:end, :-2] = leads[picked]
        # napari's "upper_left" anchor draws a point's text above it, the tops of its letters
        # LABEL_LIFT ems up: the point lies that far below where the letters begin
        points[at:end, -2] = rects[:, 0] + LABEL_LIFT * em * per_px[0]
        points[at:end, -1] = rects[:, 1]
        strings[at:end] = np.where(keep, np.array([labels[i] for i in rows], object), "")
        at = end
    return points, strings.astype(str)


def place_labels(layer) -> None:
    """Draw one label per region of a regions layer (see :func:`region_label_places`) at
    LABEL_SIZE points whatever the zoom, from its labels layer (see :func:`label_regions`):
    its points and strings set together, the layer redrawn once. The features table keeps
    every row's label: only the drawn text changes."""
    points_layer = _LABELS.get(layer)
    if points_layer is None:
        return
    points, strings = region_label_places(layer)
    old = np.asarray(points_layer.text.values, dtype=object).reshape(-1)
    if (points_layer.data.shape == points.shape and np.allclose(points_layer.data, points)
            and old.tolist() == strings.tolist()):
        return  # as drawn already: nothing to redraw
    with points_layer.events.blocker_all(), points_layer.text.events.blocker_all():
        points_layer.data = points  # (re-slices the layer, unannounced)
        points_layer.text.string = {"array": strings, "default": ""}
    points_layer.refresh(thumbnail=False, highlight=False, extent=False)  # drawn once


AGAIN = "again"  # what a step returns that wants another turn of the event loop
# a result's steps: one per frame (50 Hz), each followed at once by those that took no time
STEP_FRAME_MS = 20
STEP_QUICK_S = 0.002
_HELD: set[int] = set()  # ids of the layers whose labels wait for the end of an update


@contextlib.contextmanager
def labels_held(layer):
    """``with labels_held(layer):`` changes a regions layer's shapes and features without
    placing its labels after each change (an update emits data, then features: each would
    place every label again, against a half-written table); :func:`label_regions` after it
    places them once."""
    _HELD.add(id(layer))
    try:
        yield layer
    finally:
        _HELD.discard(id(layer))


# the characters vispy draws for any text besides the text's own: it measures these for the
# line's ascender and descender, and the space for the whitespace width
_ALWAYS_DRAWN = "\u00c5\u00c9\u00d1\u0150jgpqy "
GLYPH_BUDGET_S = 0.02  # glyphs rendered per event-loop turn: until this much time has passed


def canvas_fonts(widget) -> list:
    """The glyph caches napari draws layer text with in the window of ``widget`` (a Qt
    widget docked in a viewer): each canvas has one, shared by all its text visuals and
    there before any of them. Empty where ``widget`` is in no viewer's window."""
    try:
        from napari.qt import QtViewer

        viewers = widget.window().findChildren(QtViewer)
    except (AttributeError, RuntimeError, ImportError):  # no Qt widget, or it was deleted
        return []
    fonts = []
    for qt_viewer in viewers:
        try:
            info = qt_viewer.canvas.font_info()
            fonts.append(info.font_manager.get_font(info.face, False, False))
        except AttributeError:  # a napari without Qt fonts: glyphs are drawn as needed
            continue
    return fonts


def missing_glyphs(fonts, texts) -> list:
    """(font, character) pairs that drawing ``texts`` would render first: vispy renders a
    glyph (a distance field, about 10 ms each on a small CPU) the first time a canvas draws
    its character, all of them inside one paint."""
    chars = sorted(set(_ALWAYS_DRAWN).union(*map(set, texts)))
    return [(font, c) for font in fonts for c in chars
            if c not in getattr(font, "_glyphs", {c: None})]


def render_glyphs(pairs: list, budget: float = GLYPH_BUDGET_S) -> list:
    """Render glyphs of ``pairs`` (from :func:`missing_glyphs`) until ``budget`` seconds have
    passed; returns the pairs left."""
    import time

    end = time.perf_counter() + budget
    pairs = list(pairs)
    while pairs:
        font, char = pairs.pop(0)
        if char not in font._glyphs:
            font[char]
        if time.perf_counter() > end:
            break
    return pairs


def same_shapes(layer, data: list, types: list, colors: np.ndarray) -> bool:
    """Whether a Shapes layer already holds exactly ``data`` (vertex arrays, at least one),
    ``types`` and edge ``colors``: re-writing them would only redraw the same picture (no
    region: the layer is emptied again, which the viewer is told)."""
    if not len(data) or len(layer.data) != len(data) or list(layer.shape_type) != list(types):
        return False
    if len(data) and not np.allclose(np.asarray(layer.edge_color, float), colors):
        return False
    return all(a.shape == np.shape(b) and np.array_equal(a, b)
               for a, b in zip(layer.data, data))


def same_features(table, features: dict) -> bool:
    """Whether a layer's features ``table`` (a DataFrame) holds ``features`` (columns of equal
    length), NaN equal to NaN."""
    if list(table.columns) != list(features) or len(table) != len(next(iter(
            features.values()), [])):
        return False
    for key, column in features.items():
        old, new = table[key].to_numpy(), np.asarray(column)
        if old.dtype == object or new.dtype == object:
            if old.tolist() != new.tolist():
                return False
        elif not np.array_equal(old.astype(float), new.astype(float), equal_nan=True):
            return False
    return True


def _relabel(event) -> None:
    """Shapes added, removed or moved, new features or a new zoom: the labels placed again."""
    if id(event.source) in _HELD:
        return
    if event.type == "data" and str(getattr(event, "action", "")) not in (
            "added", "removed", "changed"):
        return
    place_labels(event.source)


def label_regions(layer, layers=None) -> None:
    """Label a regions layer (see :func:`place_labels`) and keep it labelled as it changes:
    the labels are drawn by a locked Points layer of their own (``layers``, the viewer's
    layer list, gets it above ``layer`` the first time), shown while ``layer`` is shown and
    removed with it; ``layer`` itself draws no text."""
    if not (isinstance(layer.text.string, ConstantStringEncoding)
            and layer.text.string.constant == ""):
        layer.text.string = {"constant": ""}  # a layer labelled by napari's Shapes text before
    points = _LABELS.get(layer)
    if points is not None and layers is not None and points not in layers:
        points = None  # its labels layer was removed by hand: labelled anew
    if points is None:
        if layers is None:
            raise ValueError("label_regions needs the viewer's layer list for the labels layer "
                             "of a new regions layer; pass viewer.layers.")
        name = layer.name.replace("regions", "labels", 1) if "regions" in layer.name else \
            f"labels of {layer.name}"
        meta = dict(layer.metadata.get(META_KEY, {}))
        meta.update(role=LABELS_ROLE, view=True, labels_of=layer.name)
        points = Points(np.empty((0, layer.ndim)), ndim=layer.ndim, name=name, size=0,
                        border_width=0, face_color="transparent", text=LABEL_POINTS_TEXT,
                        metadata={META_KEY: meta}, visible=layer.visible,
                        scale=layer.scale, translate=layer.translate,
                        affine=np.array(layer.affine.affine_matrix), units=layer.units)
        points.locked = True  # drawn from the regions: edited there, not here
        _LABELS[layer] = points
        # napari selects a layer it adds; the selection stays where it was (the regions),
        # so the layer controls are the editable shapes', not a locked layer's
        selected, active = set(layers.selection), layers.selection.active
        if layer in layers:
            layers.insert(layers.index(layer) + 1, points)
        else:
            layers.append(points)
        layers.selection.clear()
        layers.selection.update(selected)
        if active is not None and active in layers:
            layers.selection.active = active
        layers.events.removed.connect(_drop_labels)  # functions: connected once
        layer.events.visible.connect(_follow_visible)
    for key in ("scale", "translate", "affine"):
        value = getattr(layer, key)
        value = getattr(value, "affine_matrix", value)
        if not _same(getattr(points, key), value):
            setattr(points, key, value)
    if tuple(points.units) != tuple(layer.units):  # napari ignores units that differ
        points.units = layer.units
    for emitter in (layer.events.data, layer.events.features, layer.events.scale_factor):
        emitter.connect(_relabel)  # a function: connecting it again does not add it twice
    place_labels(layer)


def _drop_labels(event) -> None:
    """A regions layer left the viewer: its labels layer goes with it."""
    points = _LABELS.pop(event.value, None)
    if points is not None and points in event.source:
        event.source.remove(points)


def _follow_visible(event) -> None:
    points = _LABELS.get(event.source)
    if points is not None and points.visible != event.source.visible:
        points.visible = event.source.visible


def _same(current, value) -> bool:
    """Whether a layer's geometry attribute (an affine: its matrix) already equals ``value``."""
    current = getattr(current, "affine_matrix", current)
    try:
        return bool(np.array_equal(np.asarray(current), np.asarray(value)))
    except (TypeError, ValueError):  # values numpy can't compare: set it again
        return False


# a multiscale image's heat is shown as a pyramid of its own: the explained level, then halved
# until no side is above PYRAMID_SIDE (napari draws the level that fits the zoom)
PYRAMID_SIDE = 512
PYRAMID_BAND = 2048  # rows of a large heat halved at a time (an even number)
PYRAMID_IN_MEMORY = 256 * 2**20  # bytes: a halved level of a lazy heat above this goes to disk


def heat_pyramid(heat, max_side: int = PYRAMID_SIDE, band: int = PYRAMID_BAND) -> list:
    """``heat`` (*lead, H, W) and its halvings (2 x 2 means over the last two axes; an odd
    side's last row or column averaged with itself) until no side is above ``max_side``:
    napari's multiscale levels, finest first. A NumPy heat gives NumPy levels; a lazy one
    (the tiled run's zarr) is read ``band`` rows at a time, its large levels written to a
    temporary zarr array removed with the array, so memory stays bounded."""
    levels = [heat]
    while max(levels[-1].shape[-2:]) > max_side:
        levels.append(_halved(levels[-1], band))
    return levels


def _halved(heat, band: int):
    h, w = heat.shape[-2:]
    shape = (*heat.shape[:-2], (h + 1) // 2, (w + 1) // 2)
    if isinstance(heat, np.ndarray) or np.prod(shape) * 4 <= PYRAMID_IN_MEMORY:
        out = np.empty(shape, np.float32)
    else:
        out = _scratch_array(shape)
    band += band % 2
    for r0 in range(0, h, band):
        block = np.asarray(heat[..., r0:r0 + band, :], np.float32)
        pad = [(0, 0)] * (block.ndim - 2) + [(0, block.shape[-2] % 2), (0, w % 2)]
        if any(p[1] for p in pad):
            block = np.pad(block, pad, mode="edge")
        bh, bw = block.shape[-2:]
        block = block.reshape(*block.shape[:-2], bh // 2, 2, bw // 2, 2).mean(axis=(-3, -1))
        out[..., r0 // 2:r0 // 2 + block.shape[-2], :] = block
    return out


def _scratch_array(shape):
    """A float32 zarr array in a temporary folder that goes when the array does."""
    import shutil
    import tempfile

    import zarr

    folder = tempfile.mkdtemp(prefix="napari-gradcam-heat-")
    chunks = (*(1,) * (len(shape) - 2), *(min(s, 1024) for s in shape[-2:]))
    array = zarr.open_array(folder, mode="w", shape=shape, chunks=chunks, dtype="float32")
    weakref.finalize(array, shutil.rmtree, folder, True)
    return array


def level_geometry(layer, downsample, ndim_spatial: int = 2) -> dict:
    """What puts an array of a multiscale ``layer``'s level with ``downsample`` (rows,
    cols against level 0) on the layer in the world: napari draws pixel i of that level over
    level-0 pixels ds*i .. ds*(i+1) (pixel corners; see its multiscale slicing: the level's
    tile is scaled by the downsample from the level-0 origin, then shifted half a level-0
    pixel), so its centre is level-0 pixel ds*i + (ds - 1) / 2: the array's scale is the
    layer's times ds, its translate moved by (ds - 1) / 2 level-0 pixels (through the
    layer's rotation and shear, before its affine)."""
    scale = np.asarray(layer.scale, float).copy()
    translate = np.asarray(layer.translate, float).copy()
    ds = np.ones(len(scale))
    ds[-ndim_spatial:] = np.asarray(downsample, float)[-ndim_spatial:]
    if np.allclose(ds, 1):
        return {"scale": tuple(scale), "translate": tuple(translate)}
    shift = (ds - 1) / 2  # in level-0 pixels
    # the layer's own linear map (rotation, shear, scale) without its affine, probed through
    # public transforms: the affine's inverse undoes the affine part of data_to_world
    from .geometry import _data_to_world

    matrix, _origin = _data_to_world(layer)
    affine = np.asarray(layer.affine.linear_matrix, float)
    linear = np.linalg.solve(affine, matrix)
    return {"scale": tuple(scale * ds), "translate": tuple(translate + linear @ shift)}


def heat_colormap():
    """Turbo colours whose opacity rises with the heat: cold pixels leave the image as it is,
    hot ones are painted red-yellow (the classic Grad-CAM overlay, without greying the rest)."""
    from napari.utils.colormaps import Colormap

    v, rgba = heat_ramp()  # the same ramp as the batch run's overlay PNGs
    return Colormap(rgba, controls=v, name="gradcam heat", interpolation="linear")


class ResultLayers:
    """Mixin for the widget: writes and finds its result layers (``self._viewer``)."""

    # ---- layers (main thread only) ----------------------------------------------------------

    def _find(self, role: str, image: str, method: str | None = None):
        """Our ``role`` layer made for the image named ``image`` (and ``method``), found by its
        metadata, not its name: names are shortened, and the user may rename a result."""
        for layer in self._viewer.layers:
            meta = layer.metadata.get(META_KEY, {})
            if meta.get("role") == role and meta.get("source", meta.get("image_name")) == image \
                    and (method is None or meta.get("method") == method):
                return layer
        return None

    def _name(self, what: str, image) -> str:
        """The name of ``image``'s ``what`` layer: the image's name shortened, or in full when
        another image's shortens the same (each image's results keep names of their own)."""
        short = short_name(image.name)
        twins = [layer for layer in self._viewer.layers if layer is not image
                 and not self._is_ours(layer) and short_name(layer.name) == short]
        return result_name(what, image.name, len(image.name) if twins else NAME_WIDTH)

    @staticmethod
    def _geometry(job: Job) -> dict:
        """Scale, translate, affine, units and axis labels of the source layer, for result
        layers: they lie on the image also when its affine is oblique (a scan's voxel-to-world
        matrix)."""
        src = job.layer
        out = {"scale": tuple(src.scale), "translate": tuple(src.translate),
               "affine": np.array(src.affine.affine_matrix)}
        for key in ("units", "axis_labels"):
            value = getattr(src, key, None)
            if value is not None:
                out[key] = tuple(value)
        return out

    def _upsert(self, name: str, role: str, ndim: int, create, update, job: Job,
                method: str | None = None, multiscale: bool | None = None):
        """Update our ``role`` layer of the job's image in place (``update(layer)``), or add
        ``create()`` (called ``name``); a layer whose dimensionality changed, or (an image)
        whose being ``multiscale`` or not changed, is replaced where it was."""
        layers = self._viewer.layers
        layer = self._find(role, job.layer.name, method)
        if layer is not None and layer.ndim == ndim and (
                multiscale is None or bool(layer.multiscale) == multiscale):
            update(layer)
            return layer
        new = create()
        if layer is not None:
            index = layers.index(layer)
            layers.remove(layer)
            layers.insert(index, new)
        else:
            layers.append(new)
        return new

    @staticmethod
    def _place(layer, geometry: dict, metadata: dict):
        for key, value in geometry.items():
            # set again, an unchanged scale, translate or affine still makes napari redo the
            # layer's transforms, its slice and the viewer's dims (a re-run's largest cost)
            if not _same(getattr(layer, key, None), value):
                setattr(layer, key, value)
        layer.metadata = {**layer.metadata, **metadata}

    def _placed(self, job: Job, data):
        """A result array (or a pyramid of them: a list, finest first) and the layer geometry
        that puts it on the image: a multiscale image's result lies on the level explained
        (see :func:`level_geometry`); for one slice, a layer one frame deep placed at that
        frame."""
        geo = self._geometry(job)
        downsample = getattr(job, "downsample", (1.0, 1.0))
        if getattr(job, "level", None) is not None and tuple(downsample) != (1.0, 1.0):
            geo.update(level_geometry(job.layer, downsample))
        if job.offset:
            k = len(job.offset)
            if isinstance(data, list):
                data = [level.reshape((1,) * k + level.shape) for level in data]
            else:
                data = data.reshape((1,) * k + data.shape)
            geo["translate"] = tuple(
                t + i * s for t, i, s in zip(geo["translate"][:k], job.offset, geo["scale"][:k])
            ) + geo["translate"][k:]
        return data, geo

    def _show_heatmap(self, job: Job, explained: JobResult, method: str, levels=None):
        """``method``'s heatmap as an Image layer on the image; a multiscale image's as a
        multiscale layer: ``levels`` (the heat pyramid built on the worker) or one built
        here."""
        heat = explained.heatmaps[method]  # "every class found": the classes' maps combined
        multiscale = getattr(job, "level", None) is not None
        if multiscale and (levels is None or levels[0] is not heat):  # e.g. a new mask
            levels = heat_pyramid(heat)
        heat, geo = self._placed(job, levels if multiscale else heat)
        ndim = heat[0].ndim if multiscale else heat.ndim
        meta = {META_KEY: {"role": "heatmap", "source": job.layer.name, "method": method,
                           "target_layer": explained.target_layer,
                           "class_names": list(explained.class_names)}}
        if multiscale:  # the pyramid level it explains, and that level's downsample
            meta[META_KEY].update(level=int(job.level),
                                  downsample=[float(d) for d in job.downsample])
        if not job.offset:  # the scan's file geometry (NIfTI / DICOM reader): the heatmap
            # has the scan's shape, so it can be written back aligned with it
            meta.update({key: job.layer.metadata[key] for key in VOLUME_METADATA
                         if key in job.layer.metadata})
        name = self._name(method, job.layer)

        # a volume (a 3D model's, or a stack of planes): rendered in the 3D view as well
        volume = model_spatial_dims(job.explain.spec.module) == 3 or \
            len(image_shape(job.layer)) - len(job.offset) >= 3
        look = {"rendering": VOLUME_RENDERING} if volume else {}

        def update(layer):
            layer.data = heat
            self._place(layer, geo, meta)
            if not _same(layer.contrast_limits, (0.0, 1.0)):  # each set redraws the layer
                layer.contrast_limits = (0.0, 1.0)
            for key, value in look.items():
                if getattr(layer, key) != value:
                    setattr(layer, key, value)

        layer = self._upsert(name, "heatmap", ndim, lambda: Image(
            heat, name=name, colormap=heat_colormap(), blending="translucent", opacity=0.7,
            contrast_limits=(0.0, 1.0), metadata=meta, multiscale=multiscale, **look, **geo),
            update, job, method, multiscale=multiscale)
        if volume:
            layer.attenuation = VOLUME_ATTENUATION
        return layer

    @staticmethod
    def label_classes(spec: ModelSpec, labels: np.ndarray) -> tuple[list, list]:
        """The label values of a segmentation and the class each means: value v is class v
        (softmax heads: 0 = background), or class v - 1 for multi-label heads, where 0 means
        no class (one output channel without ``output`` = multi-label, as the engine rules).
        Without class names, the values present, named by class index."""
        names = list(spec.class_names or ())
        multilabel = spec.output == "multilabel" or (spec.output is None and len(names) == 1)
        shift = 1 if multilabel else 0
        top = len(names) + shift if names else int(labels.max(initial=0)) + 1
        values = list(range(top))
        classes = [v - shift for v in values]
        return values, classes

    def _show_segmentation(self, job: Job, labels: np.ndarray):
        """The predicted labels as a Labels layer on the image (updated in place on a re-run),
        each class in its regions' colour, background transparent; hovering shows the class
        (the layer's features: one row per label value)."""
        from napari.utils.colormaps import DirectLabelColormap

        spec = job.explain.spec
        names = list(spec.class_names or ())
        values, classes = self.label_classes(spec, labels)
        features = {"index": np.array(values),
                    "class": np.array(["" if c < 0 else class_name(names, c, str(c))
                                       for c in classes], dtype=object),
                    "class_id": np.array(classes)}
        clear = (0.0, 0.0, 0.0, 0.0)
        colors = {None: clear, 0: clear, **{
            v: (*(np.array(class_color(c)) / 255), 1.0) for v, c in zip(values, classes)
            if v and c >= 0}}
        colormap = DirectLabelColormap(color_dict=colors)
        labels, geo = self._placed(job, labels)
        meta = {META_KEY: {"role": "segmentation", "source": job.layer.name,
                           "class_names": names, "label_classes": dict(zip(values, classes))}}
        name = self._name("segmentation", job.layer)

        def update(layer):
            layer.data = labels
            layer.features = features
            layer.colormap = colormap
            self._place(layer, geo, meta)

        return self._upsert(name, "segmentation", labels.ndim, lambda: Labels(
            labels, name=name, features=features, colormap=colormap, opacity=0.5,
            metadata=meta, **geo), update, job)

    def _show_regions(self, job: Job, explained: JobResult):
        """The first method's regions as one Shapes layer (the job indexes them in the layer's
        leading axes)."""
        layer = None
        for step in self._regions_steps(job, explained):
            out = step()
            while out is AGAIN:
                out = step()
            layer = out if layer is None else layer  # the shapes step's
        return layer

    def _regions_steps(self, job: Job, explained: JobResult) -> list:
        """:meth:`_show_regions` as steps, each for a turn of the event loop of its own: the
        glyphs the labels draw for the first time (a few per turn, returning AGAIN while some
        are left: napari renders each new character of a canvas inside its next paint, and
        any text, even none, draws ten of them); the layer (a new one made empty and hidden;
        the step that returns it); a new layer shown; its shapes; their features table; the
        labels; the 3D wireframes and the side-by-side cells."""
        names = list(explained.class_names)
        ndim = job.layer.ndim
        data, types, features, colors = region_rows(
            explained, level0_regions(job, explained.regions), ndim)
        # rows for shapes the user draws: blank (no class: what a hand-drawn shape shows is the
        # user's, not the model's), their kind filled in from the shape once drawn
        defaults = {key: ("" if col.dtype == object else np.nan) for key, col in features.items()}
        new_color = np.array([1.0, 1.0, 1.0, 1.0])
        meta = {META_KEY: {"role": "regions", "class_names": names,
                           "image_shape": list(image_shape(job.layer)),
                           "image_name": job.layer.name, "method": explained.methods[0]}}
        name = self._name("regions", job.layer)
        geo = self._geometry(job)

        made: dict = {}

        def create():
            # empty and hidden: shown in the next turn and its shapes added in the one after,
            # so the viewer's work for a new layer (its visual and controls; its first paint,
            # which compiles its shaders; the shapes' triangulation and paint) blocks it in
            # three parts, not at once
            made["hidden"] = True
            return Shapes(None, ndim=ndim, shape_type="polygon", name=name,
                          features={k: v[:0] for k, v in features.items()},
                          edge_color="white", edge_width=2, face_color="transparent",
                          metadata=meta, text=LABEL_TEXT, visible=False, **geo)

        def layer():
            made["layer"] = self._upsert(name, "regions", ndim, create, lambda _l: None, job)
            return made["layer"]

        def show():
            if made.pop("hidden", False):
                made["layer"].visible = True

        def shapes():
            layer = made["layer"]
            if same_shapes(layer, data, types, colors):
                return  # the same regions again (a re-run): nothing to redraw
            with labels_held(layer):  # placed once, by the labels step
                if data:
                    # the layer emptied between two results is never shown: unannounced,
                    # the viewer redraws the layer once (for the new shapes), not twice
                    with layer.events.blocker_all():
                        layer.data = []
                    layer.add(list(zip(data, types)), edge_color=colors, edge_width=2,
                              face_color="transparent")
                else:
                    layer.data = []

        def table():
            layer = made["layer"]
            with labels_held(layer):
                if not same_features(layer.features, features):
                    layer.features = features  # redraws every text: only when it changed
                self._place(layer, geo, meta)
            # each set is announced to the layer's controls (a repaint): only when changed
            if not same_features(layer.feature_defaults, {k: [v] for k, v in defaults.items()}):
                layer.feature_defaults = defaults
            if transform_color(layer.current_edge_color)[0].tolist() != new_color.tolist():
                layer.current_edge_color = new_color
            layer.events.data.connect(self._kind_of_drawn)  # once: a bound method isn't re-added

        def glyphs():
            if "glyphs" not in made:
                made["glyphs"] = missing_glyphs(canvas_fonts(self.native),
                                                [t for t in features["label"] if t])
            made["glyphs"] = render_glyphs(made["glyphs"])
            if made["glyphs"]:
                return AGAIN
            if "metrics" not in made:  # the labels' first measure loads Qt's copy of the font
                made["metrics"] = text_extent(["0"], LABEL_SIZE)
                return AGAIN
            return None

        def labels():
            label_regions(made["layer"], self._viewer.layers)

        return [glyphs, layer, show, shapes, table, labels,
                functools.partial(self._show_wireframe, job, explained),
                functools.partial(self._grid_follow, job, explained)]

    @staticmethod
    def _kind_of_drawn(event):
        """Shapes added to the regions layer by hand (or from Python) come with the default
        row, whose kind is blank: give them their shape type once they are added (a drawn
        polygon is a path until its last click, so only the end of the drawing is final)."""
        if str(getattr(event, "action", "")) != "added" or id(event.source) in _HELD:
            return  # (held: a result's shapes, whose features table comes next)
        layer = event.source
        kinds = layer.features.get("kind")
        if kinds is None:
            return
        types = layer.shape_type
        blank = [i for i, k in enumerate(kinds) if i < len(types) and (not isinstance(k, str)
                                                                       or not k)]
        if blank:
            layer.features.loc[layer.features.index[blank], "kind"] = [types[i] for i in blank]
            layer.events.features()

    def _show_wireframe(self, job: Job, explained: JobResult):
        """The boxes of the 3D regions as edges in the 3D view (a Vectors layer, shown only
        while the viewer is in 3D: in a 2D slice the Shapes layer's rectangles are the boxes).
        No 3D regions and no such layer yet: nothing is added."""
        ndim = job.layer.ndim
        vectors, ids = box_wireframe(explained.regions, ndim=ndim)
        name = self._name("boxes 3D", job.layer)
        if not len(vectors) and self._find("wireframe", job.layer.name) is None:
            return None
        regions = explained.regions
        colors = np.array([[*class_color(regions[i].class_id), 255] for i in ids],
                          float).reshape(-1, 4) / 255
        features = {"region": ids, "region_label": np.array(
            [np.nan if getattr(regions[i], "label", None) is None else regions[i].label
             for i in ids], float)}
        meta = {META_KEY: {"role": "wireframe", "source": job.layer.name}}
        geo = self._geometry(job)
        style = {"edge_width": 1.0, "vector_style": "line", "length": 1.0}

        def update(layer):
            layer.data = vectors
            layer.features = features
            layer.edge_color = colors if len(vectors) else "white"
            self._place(layer, geo, meta)

        layer = self._upsert(name, "wireframe", ndim, lambda: Vectors(
            vectors, name=name, features=features, edge_color=colors if len(vectors) else
            "white", metadata=meta, **style, **geo), update, job)
        self._on_ndisplay()
        return layer

    def _on_ndisplay(self, _event=None):
        """In the 3D view an image with 3D regions shows their box wireframes and not its
        per-plane outlines (every plane's rectangle and polygon stacked hide the heat); in a
        2D slice the outlines, and not the wireframes (they would repeat the rectangles of the
        planes where the boxes begin and end)."""
        three = self._viewer.dims.ndisplay == 3
        ours = [(layer, layer.metadata.get(META_KEY, {})) for layer in self._viewer.layers]
        framed = {meta.get("source") for layer, meta in ours
                  if meta.get("role") == "wireframe" and len(layer.data)}
        for layer, meta in ours:
            if meta.get("role") == "wireframe":
                layer.visible = three
            elif meta.get("role") == "regions" and meta.get("image_name") in framed:
                layer.visible = not three

    # ---- side by side -----------------------------------------------------------------------

    def _grid_model(self):
        canvas = getattr(self._viewer, "canvas", None)  # napari >= 0.9; before: viewer.grid
        return canvas.grid if canvas is not None and hasattr(canvas, "grid") else \
            self._viewer.grid

    def _camera(self):
        scene = getattr(self._viewer, "scene", None)  # napari >= 0.9; before: viewer.camera
        return scene.camera if scene is not None and hasattr(scene, "camera") else \
            self._viewer.camera

    def toggle_grid(self, _event=None):
        """Side by side: a grid cell per method of the last run, each the image with that
        method's heatmap and regions under the method's name; pressed again, the overlay view
        as it was (the cells' extra layers removed, every layer where and as it was)."""
        if getattr(self, "_grid_state", None) is not None:
            self._leave_grid()
            return
        last = getattr(self, "_last", None)
        if last is None:
            show_info("napari-gradcam: nothing to show side by side yet; press Run first "
                      "(each method's heatmap and regions then get a cell of their own).")
            return
        self._enter_grid(last.job, last.explained)

    def _enter_grid(self, job: Job, explained: JobResult) -> bool:
        """Build the cells of ``explained`` and turn napari's grid on (see
        :meth:`_enter_cells`). Cell k is four layers, bottom to top: a view of the image (its
        data array shared, not copied) named after the method, whose name napari writes in the
        cell's top-left corner; the method's heatmap layer; its regions (the first method's:
        the editable regions layer itself, which File > Save writes; the others': locked views
        for reading) and their labels."""
        layers, image = self._viewer.layers, job.layer
        if image not in layers:
            show_info(f"napari-gradcam: the image {image.name!r} of the last run is no longer "
                      "in the viewer; run again to see its methods side by side.")
            return False
        heats = {m: self._find("heatmap", image.name, m) for m in explained.methods}
        methods = [m for m in explained.methods if heats[m] is not None]
        if not methods:
            show_info("napari-gradcam: the heatmap layers of the last run were removed; run "
                      "again to see its methods side by side.")
            return False

        def make_cells():
            cells, added = [], []
            regions = self._find("regions", image.name)
            for k, method in enumerate(methods):
                view = self._image_view(image, method)
                if k == 0 and regions is not None and method == explained.methods[0]:
                    shapes = regions
                    label_regions(shapes, layers)  # (its labels layer removed by hand: again)
                else:
                    shapes = self._regions_view(job, explained, method)
                    added += [shapes, labels_of(shapes)]
                added.append(view)
                cells.append((view, heats[method], shapes, labels_of(shapes)))
            return cells, added

        self._enter_cells(make_cells, GRID_STRIDE, image=image.name, methods=methods)
        return True

    def _enter_cells(self, make_cells, stride: int, **about) -> dict:
        """Side by side: ``make_cells()`` gives the cells (each ``stride`` layers, bottom to
        top, a captioned image view first) and the layers it made for them; napari fills cells
        with ``stride`` consecutive layers from the bottom of the layer list, so the cells'
        layers go first and every other layer is hidden while the grid is on, with the whole
        grid in view. What leaving restores (see :meth:`_leave_grid`) is noted before: the
        layers' order, visibility and selection, napari's grid and the camera. ``about`` is
        kept with it (the image, the methods, what kind of grid)."""
        layers, grid, camera = self._viewer.layers, self._grid_model(), self._camera()
        if getattr(self, "_grid_state", None) is not None:
            self._leave_grid()
        state = {"order": list(layers), "visible": [layer.visible for layer in layers],
                 "grid": {key: getattr(grid, key) for key in ("enabled", "stride", "shape")},
                 "selection": set(layers.selection), "active": layers.selection.active,
                 "camera": {"center": tuple(camera.center), "zoom": camera.zoom},
                 "methods": [], **about}
        state["cells"], state["added"] = make_cells()
        for layer in state["added"]:
            if layer not in layers:
                layers.append(layer)
        inside = [layer for cell in state["cells"] for layer in cell]
        self._reorder(inside + [layer for layer in layers if layer not in inside])
        for layer in layers:
            layer.visible = layer in inside
        for cell in state["cells"]:
            cell[0].name_overlay.visible = True
        self._grid_state = state
        grid.stride = stride
        n = len(state["cells"])
        grid.shape = (1, n) if n <= 3 else (-1, -1)
        grid.enabled = True
        self._viewer.reset_view()  # every cell's whole image in view
        grid.events.enabled.connect(self._on_grid_switched)
        self.grid_button.text = "Overlay"
        return state

    def _leave_grid(self):
        """Back to the overlay view: the cells' extra layers removed, the others in their old
        order, visibility and selection (layers added meanwhile stay, on top), napari's grid
        and the camera as they were."""
        state, self._grid_state = self._grid_state, None
        grid = self._grid_model()
        grid.events.enabled.disconnect(self._on_grid_switched)
        layers = self._viewer.layers
        for layer in state["added"]:
            if layer in layers:
                layers.remove(layer)
        kept = [layer for layer in state["order"] if layer in layers]
        self._reorder(kept + [layer for layer in layers if layer not in kept])
        for layer, visible in zip(state["order"], state["visible"]):
            if layer in layers:
                layer.visible = visible
        for key, value in state["grid"].items():
            setattr(grid, key, value)
        if "selection" in state:
            layers.selection.clear()
            layers.selection.update({layer for layer in state["selection"] if layer in layers})
            active = state["active"]  # (one selected layer: napari's active one)
            if active is not None and active in layers:
                layers.selection.active = active
        if "camera" in state:
            camera = self._camera()
            camera.center = state["camera"]["center"]
            camera.zoom = state["camera"]["zoom"]
        self.grid_button.text = "Side by side"

    def _on_grid_switched(self, _event=None):
        """napari's own grid button turned the grid off: leave side by side cleanly."""
        if getattr(self, "_grid_state", None) is not None and not self._grid_model().enabled:
            self._leave_grid()

    def _grid_follow(self, job: Job, explained: JobResult):
        """A run or new region settings while side by side: the cells show the new result
        (the heatmap layers and the editable regions were updated in place; the other
        methods' region views are rebuilt, and the cells too when the image or the methods
        changed)."""
        state = getattr(self, "_grid_state", None)
        if state is None:
            return
        layers = self._viewer.layers
        same = (state["image"] == job.layer.name and state["methods"] == [
            m for m in explained.methods if self._find("heatmap", job.layer.name, m) is not None]
            and all(layer in layers for cell in state["cells"] for layer in cell)
            and all(self._find("heatmap", job.layer.name, m) == heat
                    for m, (_view, heat, *_shapes) in zip(state["methods"], state["cells"])))
        if same:
            for method, (_view, _heat, shapes, *_labels) in zip(state["methods"], state["cells"]):
                if shapes in state["added"]:
                    self._fill_regions_view(shapes, job, explained, method)
            return
        self._leave_grid()
        if not self._enter_grid(job, explained):
            self._grid_model().enabled = False

    def _reorder(self, order: list):
        """Move the layers into ``order`` (all of them, each once), bottom first."""
        layers = self._viewer.layers
        for target, layer in enumerate(order):
            source = layers.index(layer)
            if source != target:
                layers.move(source, target)

    def _image_view(self, image, method: str):
        """Another layer of ``image`` for a grid cell: the same data array and look, named
        after the cell's method (the cell's caption)."""
        data, state, _kind = image.as_layer_data_tuple()
        state.update(name=method, visible=True, metadata={META_KEY: {
            "role": "cell image", "source": image.name, "method": method, "view": True}})
        return Image(data, **state)

    def _regions_view(self, job: Job, explained: JobResult, method: str):
        """``method``'s regions for its grid cell: a locked Shapes layer for reading (the
        editable, exported regions are the first method's layer)."""
        ndim = job.layer.ndim
        meta = {META_KEY: {"role": "cell regions", "source": job.layer.name, "method": method,
                           "view": True, "class_names": list(explained.class_names),
                           "image_shape": list(image_shape(job.layer))}}
        layer = Shapes(None, ndim=ndim, name=self._name(f"{method} regions (view)", job.layer),
                       edge_width=2, face_color="transparent", metadata=meta, text=LABEL_TEXT,
                       **self._geometry(job))
        self._fill_regions_view(layer, job, explained, method, self._viewer.layers)
        layer.locked = True
        return layer

    @staticmethod
    def _fill_regions_view(layer, job: Job, explained: JobResult, method: str, layers=None):
        data, types, features, colors = region_rows(
            explained, level0_regions(job, explained.regions_of(method)), job.layer.ndim)
        layer.data = []
        if data:
            layer.add(list(zip(data, types)), edge_color=colors, edge_width=2,
                      face_color="transparent")
        layer.features = features
        label_regions(layer, layers)
