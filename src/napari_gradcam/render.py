"""The heat colours, shared by the batch run's overlay PNGs and the napari widget's heat layer,
and the regions drawn over the heat in the overlay PNGs.

Heat in [0, 1] is drawn with turbo up to its bright red (turbo's last tenth darkens to maroon,
which reads as cold), and its opacity rises with the heat: cold pixels leave the image as it
is, hot ones are painted red-yellow (the classic Grad-CAM overlay, without greying the rest).

Regions are drawn as the widget shows them: each region's box and polygon outline in its
class colour, and one label per region, "<class> <probability>" (the score where the model
gives no probability), light text on a dark backing box kept whole inside the image. Lines
lie on the pixels the region covers, never outside: a box (min_row, min_col, max_row,
max_col), max exclusive, is outlined on its own outermost rows and columns, and a
polygon (pixel-corner coordinates, x = column, y = row) on the outermost pixels whose centres
it holds. Lines and text grow with the image, so that a large X-ray viewed shrunk to a
screen still shows them.
"""

from __future__ import annotations

import functools
import math
import threading

import numpy as np

TURBO_TOP = 0.88  # the part of turbo used: up to its bright red
ALPHA_START, ALPHA_RISE = 0.08, 0.45  # transparent below 0.08 heat, opaque from 0.53
OVERLAY_OPACITY = 0.7  # the widget's heat layer opacity; overlays are painted the same


def turbo(v: np.ndarray) -> np.ndarray:
    """Google's polynomial approximation of the turbo colormap; v in [0, 1] -> RGB in [0, 1]."""
    v = np.clip(np.asarray(v, dtype=np.float64), 0, 1)
    coeffs = np.array([  # rows: powers 0..5 of v; columns: r, g, b
        [0.13572138, 0.09140261, 0.10667330], [4.61539260, 2.19418839, 12.64194608],
        [-42.66032258, 4.84296658, -60.58204836], [132.13108234, -14.18503333, 110.36276771],
        [-152.94239396, 4.27729857, -89.90310912], [59.28637943, 2.82956604, 27.34824973]])
    channels = []
    for k in range(3):  # Horner, channel by channel: fast on a whole overlay's pixels
        out = np.full(v.shape, coeffs[5, k])
        for c in coeffs[4::-1, k]:
            out *= v
            out += c
        channels.append(out)
    return np.clip(np.stack(channels, -1), 0, 1)


def heat_rgba(heat: np.ndarray) -> np.ndarray:
    """RGBA in [0, 1] for heat in [0, 1]: the colour and the opacity of the heat ramp."""
    heat = np.asarray(heat, dtype=np.float64)
    alpha = np.clip((heat - ALPHA_START) / ALPHA_RISE, 0.0, 1.0)
    return np.concatenate([turbo(heat * TURBO_TOP), alpha[..., None]], -1)


def heat_ramp(steps: int = 33) -> tuple[np.ndarray, np.ndarray]:
    """``(controls, rgba)``: the ramp sampled at ``steps`` evenly spaced heat values, for a
    viewer's linear colormap."""
    v = np.linspace(0.0, 1.0, steps)
    return v, heat_rgba(v)


def overlay_rgb(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """The image in grey with the heat painted over it (transparent where cold), uint8 RGB."""
    grey = image.astype(np.float32)
    if grey.ndim == 3:
        grey = grey[..., :3].mean(-1)
    lo, hi = np.percentile(grey, [0.5, 99.5]) if grey.size else (0, 1)
    grey = np.clip((grey - lo) / (hi - lo if hi > lo else 1), 0, 1)[..., None]
    rgba = heat_rgba(heat)
    alpha = rgba[..., 3:] * OVERLAY_OPACITY
    rgb = grey * (1 - alpha) + rgba[..., :3] * alpha
    return (rgb * 255 + 0.5).astype(np.uint8)


LABEL_BACKING = (16, 16, 16)  # the dark box behind a label's text
LABEL_BACKING_OPACITY = 0.8  # the heat and image stay faintly visible through it
LABEL_TEXT = (255, 255, 255)


def drawing_sizes(shape) -> tuple[int, int]:
    """``(line_width, font_size)`` in pixels for an image of ``shape``: 1 px lines and 10 px
    text up to ~500 px, growing with the larger side (a 2048 px X-ray: 4 px lines, 31 px
    text), so that both keep their size on a screen that shows the whole image."""
    side = max(shape[:2]) if len(shape) >= 2 else 0
    return max(1, round(side / 512)), max(10, round(side * 0.015))


def shown_score(row) -> float | None:
    """What a label says the model scored: the row's probability, or its score (a
    segmentation model's summed logit) where it has none; None (no number on the label)
    where neither is a finite number."""
    if not row:
        return None
    for key in ("probability", "score"):  # only a finite number is worth printing
        value = row.get(key)
        try:
            value = None if value is None else float(value)
        except (TypeError, ValueError):
            value = None
        if value is not None and math.isfinite(value):
            return value
    return None


def region_labels(regions, rows=(), class_names=None) -> list[str | None]:
    """Each region's label, "<class> <probability>" as the widget writes it: the probability
    (else the score) from the summary row of its image and class (rows as
    :meth:`ExplainJob.summarise` gives them, ``index`` the image's), else the region's own
    score; None for a region without a class (drawn unlabelled)."""
    from .annotations import class_name

    rows = list(rows or ())
    found = {(tuple(int(i) for i in row["index"]), row.get("class_id")): row for row in rows}
    axes = len(rows[0]["index"]) if rows else 0
    out = []
    for r in regions:
        if r.class_id is None:
            out.append(None)
            continue
        value = shown_score(found.get((tuple(r.index[:axes]), r.class_id)))
        if value is None and r.score is not None and np.isfinite(r.score):
            value = float(r.score)
        name = class_name(class_names, r.class_id, str(r.class_id))
        out.append(name if value is None else f"{name} {value:.2f}")
    return out


@functools.lru_cache(maxsize=8)
def _font(size: int):
    """Pillow's default font at ``size`` and the factor to enlarge its text by: the scalable
    font of Pillow >= 10.1 with FreeType, else the fixed ~11 px bitmap font, enlarged."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size), 1
    except (TypeError, ImportError, OSError):  # older Pillow, or built without FreeType
        return ImageFont.load_default(), max(1, round(size / 11))


_TEXT_LOCK = threading.Lock()  # overlays are drawn on writer threads; fonts are shared


@functools.lru_cache(maxsize=256)
def _text_mask(text: str, size: int) -> np.ndarray:
    """The text's coverage (0..1 floats, read-only: cached, as labels repeat), as tall as any
    label of this size (the font's ascent and descent, not this text's), so that labels line
    up."""
    from PIL import Image, ImageDraw

    with _TEXT_LOCK:
        font, scale = _font(size)
        _, top, _, bottom = font.getbbox("Agjy|0")
        left, t, right, b = font.getbbox(text)
        top, bottom = min(top, t), max(bottom, b)
        mask = Image.new("L", (max(right - left, 1), max(bottom - top, 1)), 0)
        ImageDraw.Draw(mask).text((-left, -top), text, fill=255, font=font)
    out = np.asarray(mask, dtype=np.float32) / 255
    out = np.kron(out, np.ones((scale, scale), np.float32)) if scale > 1 else out
    out.flags.writeable = False
    return out


def _label_geometry(mask_shape, font_size: int) -> tuple[int, int, int, int]:
    """``(height, width, padding, bar)`` of a label whose text covers ``mask_shape``: the
    padding around the text and the class-coloured bar at its left."""
    pad = max(1, font_size // 5)
    bar = max(2, font_size // 4)
    return mask_shape[0] + 2 * pad, mask_shape[1] + 2 * pad + bar, pad, bar


def _box_of(region, shape) -> tuple[int, int, int, int]:
    r0, c0, r1, c1 = (int(v) for v in region.bbox)
    h, w = shape[:2]
    return max(r0, 0), max(c0, 0), min(r1, h), min(c1, w)


def label_places(shape, regions, labels, font_size: int | None = None) -> list:
    """Where each region's label goes, ``(row0, col0, row1, col1)`` (max exclusive) or None
    where it is left out: at the left of the region's box, just above it, else just below it
    (clear of the region), else moved inside the image so that it is never cut off (above,
    over its top-left corner, below). Larger regions are placed first; a label that would
    overlap one already placed in every position is left out (the larger region keeps its
    label), as is one wider or taller than the image."""
    h, w = shape[:2]
    size = font_size or drawing_sizes(shape)[1]
    places: list = [None] * len(regions)
    taken: list = []
    order = sorted(range(len(regions)), key=lambda i: -float(getattr(regions[i], "area", 0)))
    for i in order:
        if not labels[i]:
            continue
        lh, lw, _, _ = _label_geometry(_text_mask(labels[i], size).shape, size)
        if lh > h or lw > w:
            continue
        r0, c0, r1, _ = _box_of(regions[i], shape)
        x = min(max(c0, 0), w - lw)
        rows = [r0 - lh, r1]  # above, below: clear of the region, where the image has room
        rows = [y for y in rows if 0 <= y <= h - lh] + [min(max(y, 0), h - lh)
                                                        for y in (r0 - lh, r0, r1)]
        for y in rows:
            rect = (y, x, y + lh, x + lw)
            if not any(rect[0] < t[2] and t[0] < rect[2] and rect[1] < t[3] and t[1] < rect[3]
                       for t in taken):
                places[i] = rect
                taken.append(rect)
                break
    return places


def _polygon_pixels(polygon, shape):
    """``(mask, row0, col0)``: the pixels whose centres ``polygon`` (pixel-corner
    coordinates, holes left out) holds, over its bounds clipped to the image. The library's
    one rasteriser (:func:`~napari_gradcam.regions.rasterize`) decides, so an overlay outlines
    exactly the pixels that agreement and the exports count, whatever the order of a
    multipolygon's parts (an island inside another part's hole included)."""
    from .regions import rasterize

    if polygon.geom_type not in ("Polygon", "MultiPolygon"):
        return None, 0, 0
    h, w = shape[:2]
    minx, miny, maxx, maxy = polygon.bounds
    row0, col0 = max(math.floor(miny), 0), max(math.floor(minx), 0)
    row1, col1 = min(math.ceil(maxy), h), min(math.ceil(maxx), w)
    if row1 <= row0 or col1 <= col0:
        return None, row0, col0
    return rasterize(polygon, (row1 - row0, col1 - col0), (row0, col0)), row0, col0


def draw_regions(rgb: np.ndarray, regions, labels=None, *, line_width: int | None = None,
                 font_size: int | None = None) -> np.ndarray:
    """``rgb`` (H, W, 3 uint8, e.g. :func:`overlay_rgb`'s) with each 2D region's polygon
    outline and box in its class colour (:func:`~napari_gradcam.annotations.class_color`,
    the widget's colours) and its label (``labels``: a string or None per region, e.g.
    :func:`region_labels`) placed by :func:`label_places`. Line width and text size default
    to :func:`drawing_sizes` of the image. Returns a new array."""
    from scipy.ndimage import binary_erosion

    from .annotations import class_color

    out = np.array(rgb, dtype=np.uint8, copy=True)
    if out.ndim != 3 or out.shape[2] != 3:
        raise ValueError(f"draw_regions takes an (H, W, 3) RGB image, not shape {out.shape}; "
                         "paint the heat first with overlay_rgb.")
    regions = list(regions)
    labels = [None] * len(regions) if labels is None else list(labels)
    if len(labels) != len(regions):
        raise ValueError(f"{len(labels)} labels for {len(regions)} regions: give one label "
                         "(or None) per region.")
    width, size = drawing_sizes(out.shape)
    width, size = line_width or width, font_size or size
    for region in regions:
        colour = np.array(class_color(region.class_id), np.uint8)
        polygon = getattr(region, "polygon", None)
        if polygon is not None and not polygon.is_empty:
            mask, row0, col0 = _polygon_pixels(polygon, out.shape)
            if mask is not None:
                edge = mask & ~binary_erosion(mask, iterations=width, border_value=0)
                out[row0:row0 + mask.shape[0], col0:col0 + mask.shape[1]][edge] = colour
        r0, c0, r1, c1 = _box_of(region, out.shape)
        if r1 <= r0 or c1 <= c0:
            continue
        out[r0:min(r0 + width, r1), c0:c1] = colour
        out[max(r1 - width, r0):r1, c0:c1] = colour
        out[r0:r1, c0:min(c0 + width, c1)] = colour
        out[r0:r1, max(c1 - width, c0):c1] = colour
    for region, text, place in zip(regions, labels,
                                   label_places(out.shape, regions, labels, size)):
        if place is None:
            continue
        y0, x0, y1, x1 = place
        text_mask = _text_mask(text, size)
        _, _, pad, bar = _label_geometry(text_mask.shape, size)
        patch = out[y0:y1, x0:x1].astype(np.float32)
        patch += (np.array(LABEL_BACKING) - patch) * LABEL_BACKING_OPACITY
        patch[:, :bar] = class_color(region.class_id)
        ty, tx = pad, bar + pad
        cover = text_mask[..., None]
        inner = patch[ty:ty + text_mask.shape[0], tx:tx + text_mask.shape[1]]
        inner += (np.array(LABEL_TEXT) - inner) * cover
        out[y0:y1, x0:x1] = np.clip(patch + 0.5, 0, 255).astype(np.uint8)
    return out


def volume_regions(regions, mode: str, plane: int | None = None) -> list:
    """A volume's regions as 2D regions to draw on its ``mode`` view: ``"mip"`` (the
    maximum-intensity projection along the first spatial axis) shows every region, a 3D
    region as its footprint (its box's rows and columns, and the union of its outlines in all
    planes); ``"mid"`` (the plane ``plane``) shows the regions that cross that plane, a 3D
    region as its box's rows and columns and its outline in the plane. ``regions`` are one
    volume's: 3D regions, or a 3D model's plane-wise 2D regions (the plane last in their
    index)."""
    from dataclasses import replace

    import shapely

    if mode not in ("mip", "mid"):
        raise ValueError(f"volume view {mode!r}: give 'mip' or 'mid'.")
    out = []
    for r in regions:
        if len(r.bbox) == 4:  # plane-wise: drawn in its own plane, or projected with the rest
            if mode == "mip" or (r.index and r.index[-1] == plane):
                out.append(r)
            continue
        z0, r0, c0, z1, r1, c1 = r.bbox
        outlines = r.polygons or ({} if r.polygon is None else {None: r.polygon})
        if mode == "mid":
            if not z0 <= plane < z1:
                continue
            polygon = outlines.get(plane, r.polygon if len(outlines) <= 1 else None)
        else:
            parts = [p for p in outlines.values() if p is not None and not p.is_empty]
            polygon = shapely.union_all(parts) if parts else None
        out.append(replace(r, bbox=(r0, c0, r1, c1), polygon=polygon, polygons=None))
    return out


__all__ = ["draw_regions", "drawing_sizes", "heat_ramp", "heat_rgba", "label_places",
           "overlay_rgb", "region_labels", "shown_score", "turbo", "volume_regions"]
