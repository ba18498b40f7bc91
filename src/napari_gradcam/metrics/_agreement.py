"""Agreement of heatmaps with a reader's annotations: pointing game, energy-based pointing
game, IoU and Dice, of the thresholded heatmap and of its regions.

Annotations come as a mask (boolean, labels > 0, or 0 / 1 floats), as regions or annotations
(``Region`` / ``Annotation`` lists: what the widget's Shapes layers hold), as GeoJSON (QuPath's,
or ours: a path or a FeatureCollection dict) or as COCO JSON (a path or a dict). Shapes are in
pixel-corner coordinates (QuPath, GeoJSON, COCO); a pixel belongs to a shape when its centre lies
inside, as everywhere in the library.

An image without any annotation gets ``annotated=False``: its numbers are 0 in the arrays and
``None`` in the rows, and it is left out of every mean (no NaN anywhere). Annotations that hold
nothing at all for any image are an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..annotations import Annotation
from ..regions import Region, find_regions, label_image, rasterize
from ._common import index_of, tolist


@dataclass
class Agreement:
    """Per image (*lead): ``annotated`` (the image has an annotation; all numbers below are 0
    where it has none), ``pointing`` (the heatmap's maximum lies inside the annotation or within
    ``tolerance`` pixels of it; a flat map, which has no maximum to point with, is a miss),
    ``distance`` (from the maximum's pixel centre to the nearest annotated pixel centre, 0
    inside), ``peak`` (*lead, dims: the maximum's pixel, the first in row-major order on ties),
    ``flat`` (the heatmap is one value everywhere: it points nowhere, so its pointing is a miss
    whatever its first pixel touches), ``energy`` (the share of the heat inside the annotation's boxes or
    mask, see ``settings["energy"]``), ``iou`` / ``dice`` (heat >= threshold vs the annotation),
    ``region_iou`` / ``region_dice`` (the regions' pixels vs the annotation; None without
    regions)."""

    annotated: np.ndarray
    pointing: np.ndarray
    distance: np.ndarray
    peak: np.ndarray
    energy: np.ndarray
    iou: np.ndarray
    dice: np.ndarray
    region_iou: np.ndarray | None = None
    region_dice: np.ndarray | None = None
    settings: dict = field(default_factory=dict)
    flat: np.ndarray | None = None

    _METRICS = ("pointing", "energy", "iou", "dice", "region_iou", "region_dice")

    def rows(self) -> list[dict]:
        """One row per image: index, annotated, flat, pointing, distance, energy, iou, dice and
        (with regions) region_iou, region_dice; the numbers are None for an image without
        annotation."""
        lead = self.annotated.shape
        out = []
        for k in range(int(np.prod(lead, dtype=np.int64))):
            idx = np.unravel_index(k, lead) if lead else ()
            ok = bool(self.annotated[idx])
            row = {"index": index_of(k, lead), "annotated": ok,
                   "flat": bool(self.flat[idx]) if self.flat is not None else False}
            for name in ("pointing", "distance", "energy", "iou", "dice", "region_iou",
                         "region_dice"):
                values = getattr(self, name)
                if values is None:
                    continue
                v = values[idx]
                row[name] = (bool(v) if name == "pointing" else float(v)) if ok else None
            out.append(row)
        return out

    def summary(self) -> dict:
        """Means over the annotated images (``pointing_game``: the share of hits; a flat map
        is a miss) and ``flat_maps``, the number of flat heatmaps."""
        ok = self.annotated.reshape(-1)
        out = {"images": int(ok.size), "annotated": int(ok.sum()),
               "flat_maps": int(self.flat.sum()) if self.flat is not None else 0}
        for name in self._METRICS:
            values = getattr(self, name)
            if values is None:
                continue
            key = "pointing_game" if name == "pointing" else name
            out[key] = float(values.reshape(-1)[ok].mean()) if ok.any() else 0.0
        return out

    def as_dict(self) -> dict:
        return {**{k: tolist(v) for k, v in self.__dict__.items()}, **self.summary()}


def agreement(heatmaps, annotations, threshold: float = 0.5, regions=None,
              tolerance: float = 15, *, energy: str = "box", annotation_class=None,
              spatial_dims: int = 2) -> Agreement:
    """How well heatmaps agree with annotations.

    Parameters
    ----------
    heatmaps : (*lead, H, W) heat (``explain(...).heatmaps``); ``spatial_dims=3`` for
        (*lead, D, H, W) volumes (mask annotations only).
    annotations : a mask (the heatmaps' shape, n maps of the spatial shape, or the spatial
        shape for every image; booleans, labels > 0, or 0 / 1 floats), a list of
        :class:`Region` / :class:`Annotation` (their ``index`` is the image, padded on the
        left with zeros), a GeoJSON path or FeatureCollection dict (QuPath; a feature's plane
        is its image), or a COCO JSON path or dict (its images, in the file's order, are the
        images in flat order; their sizes must be the heatmaps').
    threshold : heat >= threshold is the thresholded heatmap (IoU, Dice; also the regions'
        threshold when ``regions=True``).
    regions : None, a list of :class:`Region` (e.g. ``JobResult.regions``; rasterised), or True
        (``find_regions`` of the heatmaps at ``threshold``, its other defaults).
    tolerance : pixels: a maximum this close to the annotation still hits (Zhang et al.'s
        pointing game uses 15).
    energy : ``"box"`` (default, as the Score-CAM paper: the heat inside the bounding boxes of
        the annotation's objects, connected components of its mask, over all heat) or
        ``"mask"`` (inside the annotated pixels themselves).
    annotation_class : only the annotations of this class: a label value of a label mask, or
        a class name / id of regions, GeoJSON features or COCO categories (COCO's category
        id minus 1 is our class id, as ``write_coco`` writes them).
    """
    heat = _heat(heatmaps, spatial_dims)
    lead, spatial = heat.shape[:-spatial_dims], heat.shape[-spatial_dims:]
    n = int(np.prod(lead, dtype=np.int64))
    flat = heat.reshape(n, *spatial)
    if energy not in ("box", "mask"):
        raise ValueError(f"energy={energy!r}: give 'box' (the annotation's bounding boxes, "
                         "as Score-CAM) or 'mask' (its pixels).")
    try:
        tolerance = float(tolerance)
        threshold = float(threshold)
    except (TypeError, ValueError):
        raise TypeError("threshold and tolerance must be numbers.") from None
    if not np.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"tolerance={tolerance}: give a distance in pixels >= 0.")
    if not np.isfinite(threshold):
        raise ValueError(f"threshold={threshold}: give a finite heat threshold, e.g. 0.5.")
    masks = annotation_masks(annotations, lead, spatial, annotation_class)
    annotated = masks.reshape(n, -1).any(1)
    if not annotated.any():
        raise ValueError("the annotations hold no annotated pixel in any image"
                         + (f" of class {annotation_class!r}" if annotation_class is not None
                            else "")
                         + "; draw or load at least one shape (or check annotation_class).")

    peak_flat = flat.reshape(n, -1).argmax(1)
    peaks = np.stack(np.unravel_index(peak_flat, spatial), -1)
    distance = np.zeros(n)
    for i in np.flatnonzero(annotated):
        inside = np.argwhere(masks[i])
        distance[i] = float(np.sqrt(((inside - peaks[i]) ** 2).sum(1).min()))
    rows = flat.reshape(n, -1)
    flat_map = rows.max(1) == rows.min(1)  # no maximum to point with: a miss, flagged
    pointing = annotated & (distance <= tolerance) & ~flat_map

    area = masks if energy == "mask" else _boxes(masks)
    total = flat.reshape(n, -1).astype(np.float64).sum(1)
    inside_heat = (flat * area).reshape(n, -1).astype(np.float64).sum(1)
    share = np.divide(inside_heat, total, out=np.zeros(n), where=total > 0)

    iou, dice = _overlap(flat >= threshold, masks)
    r_iou = r_dice = None
    if regions is not None:
        drawn = _region_masks(regions, heat, lead, spatial, threshold, spatial_dims)
        r_iou, r_dice = _overlap(drawn, masks)

    def shaped(v):
        return None if v is None else np.where(annotated, v, 0).reshape(lead)

    return Agreement(
        annotated=annotated.reshape(lead), pointing=pointing.reshape(lead),
        distance=shaped(distance), peak=peaks.reshape(*lead, len(spatial)),
        energy=shaped(share), iou=shaped(iou), dice=shaped(dice), region_iou=shaped(r_iou),
        region_dice=shaped(r_dice), flat=flat_map.reshape(lead),
        settings={"threshold": threshold, "tolerance": tolerance, "energy": energy,
                  "annotation_class": annotation_class})


def _heat(heatmaps, spatial_dims: int) -> np.ndarray:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims={spatial_dims}: give 2 (images) or 3 (volumes).")
    heat = np.asarray(heatmaps)
    if heat.dtype.kind not in "biuf":
        raise TypeError(f"the heatmaps have dtype {heat.dtype}; give numbers (float heat).")
    if heat.ndim < spatial_dims or 0 in heat.shape:
        raise ValueError(f"the heatmaps have shape {heat.shape}; give (..., H, W) maps"
                         + (" ((..., D, H, W) with spatial_dims=3)" if spatial_dims == 3
                            else "") + " with pixels.")
    heat = heat.astype(np.float32, copy=False)
    if not np.isfinite(heat).all():
        raise ValueError("the heatmaps hold NaN or infinite values; give finite heat "
                         "(recompute the maps, or replace NaN with 0).")
    return heat


def _overlap(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = truth.shape[0]
    p, t = pred.reshape(n, -1), truth.reshape(n, -1)
    inter = (p & t).sum(1).astype(np.float64)
    union = (p | t).sum(1).astype(np.float64)
    size = p.sum(1) + t.sum(1).astype(np.float64)
    return (np.divide(inter, union, out=np.zeros(n), where=union > 0),
            np.divide(2 * inter, size, out=np.zeros(n), where=size > 0))


def _boxes(masks: np.ndarray) -> np.ndarray:
    """The bounding boxes of every connected object (8- / 26-connected) of each mask,
    filled."""
    out = np.zeros_like(masks)
    from scipy import ndimage  # imported when boxes are needed, not with the module

    structure = np.ones((3,) * (masks.ndim - 1), bool)
    for i in range(masks.shape[0]):
        labels, _count = ndimage.label(masks[i], structure)
        for box in ndimage.find_objects(labels):
            if box is not None:
                out[i][box] = True
    return out


def _region_masks(regions, heat, lead, spatial, threshold, spatial_dims) -> np.ndarray:
    n = int(np.prod(lead, dtype=np.int64))
    if regions is True:
        regions = find_regions(heat, threshold=threshold, ndim=spatial_dims)
    if isinstance(regions, Region):
        regions = [regions]
    try:
        regions = list(regions)
    except TypeError:
        raise TypeError(f"regions={regions!r}: give a list of Region (e.g. "
                        "JobResult.regions), True to find them here, or None.") from None
    if any(not isinstance(r, Region) for r in regions):
        raise TypeError("regions must be Region objects (from find_regions or a JobResult); "
                        "give annotations as the annotations argument instead.")
    out = np.zeros((n, *spatial), bool)
    for r in regions:
        k = _image_of(tuple(r.index), lead, "a region")
        out[k] |= label_image([_at_origin(r)], spatial) > 0
    return out


def _at_origin(region: Region) -> Region:
    """The region with its index dropped (label_image then draws it in a map of its own)."""
    import dataclasses

    return dataclasses.replace(region, index=())


def _image_of(index: tuple, lead: tuple, what: str) -> int:
    """The flat image of an index (padded on the left with zeros to the leading axes)."""
    if len(index) > len(lead):
        raise ValueError(f"{what} on plane {index} has more leading indices than the "
                         f"heatmaps' leading shape {lead}; give annotations of the images "
                         "the heatmaps belong to (or heatmaps of every plane).")
    index = (0,) * (len(lead) - len(index)) + tuple(int(i) for i in index)
    if any(not 0 <= i < s for i, s in zip(index, lead)):
        raise ValueError(f"{what} lies on plane {index}, outside the heatmaps' leading shape "
                         f"{lead}; check that the annotations belong to these images.")
    return int(np.ravel_multi_index(index, lead)) if lead else 0


# ---- annotations -> masks -----------------------------------------------------------------------

def annotation_masks(annotations, lead, spatial, annotation_class=None) -> np.ndarray:
    """Any accepted annotation form -> bool (n, *spatial), one mask per image."""
    lead, spatial = tuple(lead), tuple(spatial)
    n = int(np.prod(lead, dtype=np.int64))
    if isinstance(annotations, (str, Path)):
        return _from_file(Path(annotations), lead, spatial, annotation_class)
    if isinstance(annotations, dict):
        return _from_document(annotations, lead, spatial, annotation_class, "the annotations")
    if hasattr(annotations, "shape") and hasattr(annotations, "dtype"):
        return _from_mask(annotations, lead, spatial, n, annotation_class)
    if isinstance(annotations, (list, tuple)):
        items = list(annotations)
        if not items:
            raise ValueError("the annotations are an empty list: there is no shape to compare "
                             "with; draw or load at least one shape.")
        if all(isinstance(a, Region) for a in items):
            return _from_regions(items, lead, spatial, annotation_class)
        if all(isinstance(a, Annotation) for a in items):
            return _from_shapes(items, lead, spatial, annotation_class)
        if all(hasattr(a, "shape") for a in items):
            return _from_mask(np.asarray(items), lead, spatial, n, annotation_class)
    raise TypeError(f"annotations of type {type(annotations).__name__}: give a mask array, a "
                    "list of Region or Annotation, a GeoJSON or COCO file path, or a "
                    "GeoJSON / COCO dict.")


def _from_mask(mask, lead, spatial, n, annotation_class) -> np.ndarray:
    m = np.asarray(mask)
    if m.dtype.kind not in "biuf":
        raise TypeError(f"the annotation mask has dtype {m.dtype}; give booleans, integer "
                        "labels (> 0 = annotated) or 0 / 1 floats.")
    if m.dtype.kind == "f" and not np.isfinite(m).all():
        raise ValueError("the annotation mask holds NaN or infinite values; give 0 / 1 or "
                         "labels.")
    if annotation_class is not None:
        if m.dtype.kind not in "iu" or isinstance(annotation_class, str):
            raise ValueError(f"annotation_class={annotation_class!r} picks a label value of a "
                             "label mask; give an integer label and an integer mask, or leave "
                             "annotation_class out.")
        inside = m == int(annotation_class)
    else:
        inside = m > 0
    if inside.shape == lead + spatial:
        return inside.reshape(n, *spatial)
    if inside.shape == (n, *spatial):
        return inside
    if inside.shape == spatial:
        return np.broadcast_to(inside, (n, *spatial)).copy()
    raise ValueError(f"the annotation mask has shape {inside.shape} but the heatmaps are "
                     f"{lead + spatial}; give a mask of the heatmaps' shape, or of the "
                     f"spatial shape {spatial} for every image (resample it to the image "
                     "the heatmaps were computed on).")


def _class_matches(name, cid, wanted) -> bool:
    if wanted is None:
        return True
    if isinstance(wanted, str):
        return name is not None and str(name).lower() == wanted.lower()
    return cid is not None and int(cid) == int(wanted)


def _from_regions(items, lead, spatial, wanted) -> np.ndarray:
    n = int(np.prod(lead, dtype=np.int64))
    out = np.zeros((n, *spatial), bool)
    for r in items:
        if not _class_matches(None, r.class_id, wanted):
            continue
        if r.ndim != len(spatial):
            raise ValueError(f"a {r.ndim}D region can't annotate {len(spatial)}D maps; give "
                             "regions of the heatmaps' dimensions.")
        lo, hi = r.bbox[:r.ndim], r.bbox[r.ndim:]
        if any(v < 0 for v in lo) or any(h > s for h, s in zip(hi, spatial)):
            raise ValueError(f"a region with box {r.bbox} lies outside the heatmaps' "
                             f"{spatial} pixels; give annotations of images of this size.")
        k = _image_of(tuple(r.index), lead, "a region")
        out[k] |= label_image([_at_origin(r)], spatial) > 0
    return out


def _from_shapes(items, lead, spatial, wanted, what: str = "an annotation") -> np.ndarray:
    if len(spatial) != 2:
        raise ValueError("shapes (GeoJSON, COCO, Shapes layers) annotate 2D images; for "
                         "volumes give a mask.")
    n = int(np.prod(lead, dtype=np.int64))
    out = np.zeros((n, *spatial), bool)
    h, w = spatial
    for a in _outlines(items):
        if not _class_matches(a.class_name, a.class_id, wanted):
            continue
        geom = a.geometry
        if geom is None or geom.is_empty or geom.geom_type not in ("Polygon", "MultiPolygon"):
            continue  # lines and points enclose no pixels
        x0, y0, x1, y1 = geom.bounds
        if x0 < -0.5 or y0 < -0.5 or x1 > w + 0.5 or y1 > h + 0.5:
            raise ValueError(f"{what} spans x {x0:g}..{x1:g}, y {y0:g}..{y1:g}, outside the "
                             f"heatmaps' {h} x {w} pixels; give annotations drawn on images "
                             "of this size (or rescale them).")
        k = _image_of(tuple(a.index), lead, what)
        _fill(out[k], geom)
    return out


def _outlines(items) -> list:
    """The shapes that annotate pixels: a region exported by us is a rectangle (its box) and a
    polygon (its outline) sharing a plane and a ``region`` id, and its pixels are the
    outline's, so the rectangle of such a pair is left out (filling both would turn every
    region into its box). A rectangle without an outline beside it (a reader's box, or a
    region exported as boxes only) is kept."""
    outlined = {(tuple(a.index), a.properties.get("region")) for a in items
                if a.kind in ("polygon", "ellipse") and a.properties.get("region") is not None}
    return [a for a in items
            if not (a.kind == "rectangle" and a.properties.get("region") is not None
                    and (tuple(a.index), a.properties.get("region")) in outlined)]


def _fill(mask: np.ndarray, geom) -> None:
    """Set the pixels whose centre lies in ``geom`` (only its bounds are tested)."""
    h, w = mask.shape
    x0, y0, x1, y1 = geom.bounds
    r0, c0 = max(int(np.floor(y0)), 0), max(int(np.floor(x0)), 0)
    r1, c1 = min(int(np.ceil(y1)), h), min(int(np.ceil(x1)), w)
    if r1 > r0 and c1 > c0:
        mask[r0:r1, c0:c1] |= rasterize(geom, (r1 - r0, c1 - c0), (r0, c0))


def read_json(path: Path, where: str | None = None):
    """A GeoJSON or COCO JSON file's document, read and parsed once; anything unreadable is
    one sentence that starts with ``where`` (default: the path)."""
    where = where or str(path)
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError as err:
        raise ValueError(f"{where} can't be read ({err.strerror or err}); check the path and "
                         "its permissions.") from None
    except UnicodeDecodeError:
        raise ValueError(f"{where} is not UTF-8 text; give a GeoJSON or COCO JSON file.") \
            from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:
        line = getattr(err, "lineno", None)
        at = f" (line {line})" if line else ""
        raise ValueError(f"{where} is not valid JSON{at}; fix the file or export it again as "
                         "GeoJSON or COCO JSON.") from None


def _from_file(path: Path, lead, spatial, wanted) -> np.ndarray:
    return _from_document(read_json(path), lead, spatial, wanted, str(path))


def _is_geojson(doc) -> bool:
    return isinstance(doc, list) or (isinstance(doc, dict) and doc.get("type") in
                                     ("FeatureCollection", "Feature"))


def _shapes_or_empty(items, lead, spatial, wanted, source) -> np.ndarray:
    if not items:
        raise ValueError(f"{source} holds no shape (no polygon feature); export the "
                         "annotations again or choose another file.")
    return _from_shapes(items, lead, spatial, wanted)


def _from_document(doc, lead, spatial, wanted, source) -> np.ndarray:
    if _is_geojson(doc):  # read as the GeoJSON reader reads a file (scale included)
        from ..export import geojson_annotations

        items, _meta = geojson_annotations(doc, source)
        return _shapes_or_empty(items, lead, spatial, wanted, source)
    if isinstance(doc, dict) and "images" in doc and "annotations" in doc:
        return _from_coco(doc, lead, spatial, wanted, source)
    raise ValueError(f"{source} is neither GeoJSON (a FeatureCollection) nor COCO JSON "
                     "(images, annotations); give one of those.")


def _from_coco(doc, lead, spatial, wanted, source) -> np.ndarray:
    if len(spatial) != 2:
        raise ValueError("COCO annotates 2D images; for volumes give a mask.")
    n = int(np.prod(lead, dtype=np.int64))
    images, anns = doc.get("images"), doc.get("annotations")
    if not isinstance(images, list) or not isinstance(anns, list):
        raise ValueError(f"{source}: COCO 'images' and 'annotations' must be lists; fix "
                         "the file or export it again.")
    if len(images) != n:
        raise ValueError(f"{source} describes {len(images)} image(s) but there are {n} "
                         "heatmaps; give one COCO image per heatmap, in the same order.")
    where, h, w = {}, *spatial
    for k, im in enumerate(images):
        if not isinstance(im, dict):
            raise ValueError(f"{source}: COCO image {k} is {type(im).__name__}, not an object; "
                             "give each image as {\"id\": ..., \"height\": ..., \"width\": "
                             "...}.")
        size = (im.get("height"), im.get("width"))
        if not all(_whole_number(v) for v in size):
            raise ValueError(f"{source}: COCO image {k}'s height and width are "
                             f"{size[0]!r} and {size[1]!r}; write them as whole numbers of "
                             "pixels (e.g. 512, not \"512\").")
        if size != (h, w):
            raise ValueError(f"{source}: image {k} ({im.get('file_name', '?')}) is "
                             f"{size[0]} x {size[1]} but the heatmaps are {h} x {w}; give "
                             "annotations of images of the heatmaps' size.")
        where[_coco_id(im.get("id"), f"{source}: COCO image {k}'s id")] = k
    cats = doc.get("categories", [])
    if cats is None:
        cats = []
    if not isinstance(cats, list):
        raise ValueError(f"{source}: COCO 'categories' is {type(cats).__name__}; write it as a "
                         "list of {\"id\": ..., \"name\": ...} objects (or leave it out).")
    names = {_coco_id(c.get("id"), f"{source}: COCO category {i}'s id"): c.get("name")
             for i, c in enumerate(cats) if isinstance(c, dict)}
    out = np.zeros((n, h, w), bool)
    for j, ann in enumerate(anns):
        if not isinstance(ann, dict):
            raise ValueError(f"{source}: COCO annotation {j} is {type(ann).__name__}, not an "
                             "object; give each annotation as {\"image_id\": ..., "
                             "\"segmentation\" or \"bbox\": ...}.")
        if _coco_id(ann.get("image_id"), f"{source}: annotation {j}'s image_id") not in where:
            raise ValueError(f"{source}: annotation {j} names no image of the file; check "
                             "its image_id.")
        cat = ann.get("category_id")
        if not isinstance(cat, (int, float, str, type(None))) or isinstance(cat, bool):
            raise ValueError(f"{source}: annotation {j}'s category_id is {cat!r}; write it as "
                             "a category's id (a number), or leave it out.")
        cid = int(cat) - 1 if isinstance(cat, (int, float)) and np.isfinite(cat) else None
        if not _class_matches(names.get(cat), cid, wanted):
            continue
        k = where[ann["image_id"]]
        out[k] |= _coco_mask(ann, h, w, f"{source}: annotation {j}")
    return out


def _whole_number(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _coco_id(v, what: str):
    """A COCO id (a number or a string, as files write them), else one sentence."""
    if isinstance(v, bool) or not isinstance(v, (int, float, str, type(None))):
        raise ValueError(f"{what} is {v!r}; write ids as numbers (or strings), as COCO does.")
    return v


def _coco_mask(ann: dict, h: int, w: int, what: str) -> np.ndarray:
    import shapely  # imported when an annotation is rasterised, not with the module

    seg = ann.get("segmentation")
    mask = np.zeros((h, w), bool)
    try:
        if isinstance(seg, dict):
            counts = seg.get("counts")
            if not isinstance(counts, list):
                raise ValueError(f"{what} holds a compressed RLE; convert it to polygons or "
                                 "uncompressed RLE (pycocotools' mask.decode) first.")
            if list(seg.get("size", [])) != [h, w]:
                raise ValueError(f"{what}'s RLE is {seg.get('size')} but the heatmaps are "
                                 f"[{h}, {w}]; give annotations of images of this size.")
            values = np.repeat(np.arange(len(counts)) % 2, np.asarray(counts, np.int64))
            if values.size != h * w:
                raise ValueError(f"{what}'s RLE covers {values.size} pixels, not {h * w}; "
                                 "fix its counts or export it again.")
            return values.reshape(w, h).T.astype(bool)  # column-major
        if isinstance(seg, list) and seg:
            points = [np.asarray(p, np.float64).reshape(-1, 2) for p in seg]
            if not all(np.isfinite(p).all() for p in points):
                raise ValueError("its polygon holds NaN or infinite coordinates")
            parts = [shapely.Polygon(p) for p in points]
            geom = shapely.union_all([shapely.make_valid(p) for p in parts])
        else:
            x, y, bw, bh = (float(v) for v in ann["bbox"])
            if not np.isfinite([x, y, bw, bh]).all():
                raise ValueError("its bbox holds NaN or infinite numbers")
            geom = shapely.box(x, y, x + bw, y + bh)
    except (KeyError, TypeError, ValueError, shapely.errors.GEOSException) as err:
        if isinstance(err, ValueError) and str(err).startswith(what):
            raise
        raise ValueError(f"{what} has no readable segmentation or bbox ({err}); fix the "
                         "file.") from None
    x0, y0, x1, y1 = geom.bounds
    if x0 < -0.5 or y0 < -0.5 or x1 > w + 0.5 or y1 > h + 0.5:
        raise ValueError(f"{what} spans x {x0:g}..{x1:g}, y {y0:g}..{y1:g}, outside the "
                         f"heatmaps' {h} x {w} pixels; give annotations of images of this "
                         "size.")
    _fill(mask, geom)
    return mask
