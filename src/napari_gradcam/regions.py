"""Heatmap -> regions: bounding boxes and (simplified) polygons of the thresholded heat.

Coordinates: boxes are (min_row, min_col, max_row, max_col) with the max exclusive, as
scikit-image's regionprops; polygons are shapely geometries with pixel *corners* on integers,
x = column and y = row: pixel (r, c) covers [c, c + 1] x [r, r + 1], the convention of QuPath,
GeoJSON and COCO.

How it works, per 2D map, all in NumPy / SciPy / shapely vectorised calls:

1. threshold (absolute, relative to the map's maximum, or Otsu) and restrict to the mask;
2. crop to the rows and columns that hold any foreground;
3. run-length encode each row (start and end column of every run of foreground pixels);
4. link runs of consecutive rows that overlap (4-connectivity: share an edge; 8-connectivity:
   share an edge or a corner) with two ``searchsorted`` calls, and take connected components
   of that run graph (a vectorised union-find);
5. per component: area, bounding box, peak and mean heat from ``reduceat`` over the runs;
6. the exact pixel outline: a component with one run per row (blobs, the usual heatmap region)
   is a staircase polygon built directly from its runs; any other (concave rows, holes) is the
   union of its run rectangles. Rasterised back, it is the thresholded region exactly;
7. simplification: the outline's corners are cut by half a pixel (it then runs along the
   region's boundary instead of zig-zagging around it, and still rasterises to the same pixels),
   then Douglas-Peucker (``shapely.simplify``) at the requested tolerance, capped at a tenth of
   the region's area / perimeter so that thin and small regions keep their shape (raster IoU
   >= 0.95 with the exact region); where plain Douglas-Peucker would break validity or
   topology, the topology-preserving variant instead, and validity repaired with
   ``make_valid``.

A stack (..., H, W) is processed map by map in a thread pool.
"""

from __future__ import annotations

import math
import numbers
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely


@dataclass(frozen=True, eq=False)
class Region:
    """One connected region of a thresholded heatmap."""

    index: tuple[int, ...]  # leading indices of its map, () for a single 2D heatmap
    bbox: tuple[int, int, int, int]  # min_row, min_col, max_row, max_col (max exclusive)
    polygon: Any  # shapely Polygon / MultiPolygon, pixel-corner coordinates (x = col, y = row)
    area: int  # pixels in the thresholded region
    peak: float  # highest heat inside
    mean: float  # mean heat inside
    threshold: float  # the absolute threshold used on its map
    class_id: int | None = None  # the explained class, when the caller passes class_ids
    score: float | None = None  # the model's score for that class, when passed

    @property
    def box(self):
        """The bounding box as a shapely rectangle in pixel-corner coordinates."""
        r0, c0, r1, c1 = self.bbox
        return shapely.box(c0, r0, c1, r1)


def find_regions(
    heatmaps,
    threshold: float | str = 0.5,
    min_area: int = 16,
    simplify: float = 1.0,
    mask=None,
    *,
    threshold_mode: str = "absolute",
    connectivity: int = 1,
    class_ids=None,
    scores=None,
    workers: int | None = None,
) -> list[Region]:
    """Connected regions of every heatmap, as boxes and polygons.

    Parameters
    ----------
    heatmaps : (H, W) or (..., H, W) array (NumPy, dask, zarr or a torch tensor), heat in
        [0, 1]. Every leading index is one map (a stack, or the z-planes of a 3D heatmap).
        NaN or infinite heat is refused (ValueError naming the map): it comes from a broken
        model or input, and would otherwise give silently empty or unbounded regions.
    threshold : a number, or ``"otsu"`` (Otsu's threshold of each map's own histogram).
        Pixels with heat >= threshold belong to a region.
    min_area : regions with fewer pixels are dropped; a whole number >= 0 (an integer-valued
        float such as 16.0 is accepted).
    simplify : tolerance in pixels (finite, >= 0) for the topology-preserving simplification
        of the polygons; 0 keeps the exact pixel outline.

    Arguments of the wrong type (None, booleans, text where a number belongs) raise
    ``TypeError``, values out of range (NaN, infinity, negative) ``ValueError``.
    mask : optional boolean or label array, (H, W) for every map or the heatmaps' full shape:
        regions only where mask > 0 (e.g. the lungs on a chest X-ray).
    threshold_mode : ``"absolute"`` (threshold is a heat value) or ``"relative"`` (a fraction of
        each map's own maximum, as in the CAM (0.2) and Grad-CAM (0.15) papers).
    connectivity : 1 = pixels sharing an edge belong together (default; every region's polygon
        is then a single Polygon, possibly with holes), 2 = sharing an edge or a corner (a region
        whose parts touch only at corners is a MultiPolygon).
    class_ids, scores : optional per-map values (shape of the leading axes, or scalars) copied
        into each region.
    workers : threads for a stack (default: all CPUs); 1 runs in the calling thread.

    Returns
    -------
    list of :class:`Region`, ordered by map index, then by position (top to bottom).
    """
    threshold, min_area, simplify = _check_options(threshold, threshold_mode, min_area,
                                                   simplify, connectivity, workers)
    heatmaps = _as_array(heatmaps)
    _check_dtype(heatmaps, "heatmaps", "heat values (floats in [0, 1])")
    if heatmaps.ndim < 2:
        raise ValueError(f"heatmaps has shape {tuple(heatmaps.shape)}; give (H, W) or (..., H, W).")
    lead = tuple(heatmaps.shape[:-2])
    spatial = tuple(heatmaps.shape[-2:])
    if mask is not None:
        mask = _as_array(mask)
        _check_dtype(mask, "mask", "booleans or labels (True / > 0 = regions allowed)")
        if tuple(mask.shape) not in (spatial, tuple(heatmaps.shape)):
            raise ValueError(
                f"mask has shape {tuple(mask.shape)}; it must be the heatmap's spatial shape "
                f"{spatial} or its full shape {tuple(heatmaps.shape)}."
            )
    per_map_ids = _per_map(class_ids, lead, "class_ids", int)
    per_map_scores = _per_map(scores, lead, "scores", float)

    def one(index):
        heat = np.asarray(heatmaps[index], dtype=np.float32)
        # one fast reduction; the exact check only when it is not finite (or overflowed)
        if not np.isfinite(heat.sum()) and not np.isfinite(heat).all():
            where = f"heatmaps[{', '.join(map(str, index))}]" if index else "the heatmap"
            raise ValueError(f"{where} holds NaN or infinite values; heat must be finite "
                             "numbers in [0, 1]: fix what produced them, or replace them "
                             "(np.nan_to_num) before finding regions.")
        m = None
        if mask is not None:
            m = np.asarray(mask if mask.ndim == 2 else mask[index]) > 0
        return _regions_2d(
            heat, index, threshold, threshold_mode, min_area, simplify, m, connectivity,
            per_map_ids(index), per_map_scores(index),
        )

    indices = list(np.ndindex(*lead)) if lead else [()]
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(indices) == 1:
        results = [one(i) for i in indices]
    else:
        with ThreadPoolExecutor(max_workers=min(workers, len(indices))) as pool:
            results = list(pool.map(one, indices))
    return [r for regions in results for r in regions]


def _check_options(threshold, threshold_mode, min_area, simplify, connectivity, workers):
    """find_regions' settings checked (each wrong one says what it must be), normalised:
    (threshold as a float or "otsu", min_area as an int, simplify as a float)."""
    if not isinstance(threshold_mode, str) or threshold_mode not in ("absolute", "relative"):
        raise ValueError(
            f"threshold_mode={threshold_mode!r}: use 'absolute' (a heat value) or 'relative' "
            "(a fraction of each map's maximum)."
        )
    if isinstance(threshold, str):
        if threshold.lower() != "otsu":
            raise ValueError(f"threshold={threshold!r}: give a number in [0, 1] or 'otsu'.")
        threshold = "otsu"
    else:
        threshold = _real(threshold, "threshold", "a number in [0, 1] or 'otsu'")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold={threshold}: give a number in [0, 1] (a heat value, "
                             "or with threshold_mode='relative' a fraction of the maximum) or "
                             "'otsu'.")
    if isinstance(connectivity, bool) or connectivity not in (1, 2):
        raise ValueError(f"connectivity={connectivity}: use 1 (edges) or 2 (edges and corners).")
    # min_area counts pixels: an integer-valued float (16.0, from a config file or a slider)
    # is accepted, a fractional one is not
    area = _real(min_area, "min_area", "a whole number of pixels >= 0")
    if not (math.isfinite(area) and area >= 0 and area == int(area)):
        raise ValueError(f"min_area={min_area!r}: give a whole number of pixels >= 0.")
    min_area = int(area)
    simplify = _real(simplify, "simplify", "a tolerance in pixels >= 0 (0 keeps the exact "
                     "outline)")
    if not (math.isfinite(simplify) and simplify >= 0):
        raise ValueError(f"simplify={simplify!r}: give a finite tolerance in pixels >= 0 (0 "
                         "keeps the exact pixel outline).")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)
                                or workers < 1):
        raise ValueError(f"workers={workers!r}: give a number of threads >= 1, or None for "
                         "all CPUs.")

    return threshold, min_area, simplify


def _as_array(a):
    if hasattr(a, "detach") and hasattr(a, "cpu"):  # torch tensor
        return a.detach().cpu().numpy()
    if hasattr(a, "shape") and hasattr(a, "__getitem__") and hasattr(a, "dtype"):
        return a  # numpy, dask, zarr: stay lazy
    try:
        return np.asarray(a)
    except (TypeError, ValueError):  # ragged nested lists and the like
        return np.asarray(None)  # refused by _check_dtype with the expected type


def _check_dtype(a, name: str, expected: str) -> None:
    kind = np.dtype(a.dtype).kind
    if kind not in "biuf":
        raise TypeError(f"{name} has dtype {a.dtype}; give an array of {expected}.")


def _real(value, name: str, expected: str) -> float:
    """A real number from a Python / NumPy number or a one-element array or tensor;
    booleans, text, None and anything else are a TypeError."""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={value!r} ({type(value).__name__}): give {expected}.")
    return float(value)


def _per_map(values, lead, name, cast):
    if values is None:
        return lambda index: None
    arr = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values)
    if arr.ndim == 0:
        return lambda index: cast(arr)
    if arr.shape != lead:
        raise ValueError(
            f"{name} has shape {arr.shape}; give one value, or one per map (shape {lead})."
        )
    return lambda index: cast(arr[index])


def absolute_threshold(heat: np.ndarray, threshold, mode: str) -> float:
    """The heat value a pixel must reach on this map."""
    if threshold == "otsu":
        from skimage.filters import threshold_otsu

        finite = heat[np.isfinite(heat)]
        if finite.size == 0 or finite.min() == finite.max():
            return float("inf")  # a flat map has no foreground
        return float(threshold_otsu(finite))
    if mode == "relative":
        top = float(np.nanmax(heat)) if heat.size else 0.0
        return float(threshold) * top if top > 0 else float("inf")
    return float(threshold)


def _runs(m: np.ndarray):
    """Row-major runs of True: (row, start, end) with end exclusive."""
    padded = np.zeros((m.shape[0], m.shape[1] + 2), dtype=bool)
    padded[:, 1:-1] = m
    rows, cols = np.nonzero(padded[:, 1:] != padded[:, :-1])
    return rows[0::2], cols[0::2], cols[1::2]


def _link(row, start, end, width, connectivity):
    """Component label of every run: runs in consecutive rows that overlap are linked."""
    n = row.size
    w1 = width + 1
    key_start = row * w1 + start
    key_end = row * w1 + end
    prev = (row - 1) * w1
    # runs of the previous row that overlap run j form the index range [lo, hi)
    hi = np.searchsorted(key_start, prev + end, side="left" if connectivity == 1 else "right")
    lo = np.searchsorted(key_end, prev + start, side="right" if connectivity == 1 else "left")
    counts = np.maximum(hi - lo, 0)
    total = int(counts.sum())
    src = np.repeat(np.arange(n), counts)
    dst = np.repeat(lo, counts) + np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    return _components(n, src, dst)


def _components(n: int, src: np.ndarray, dst: np.ndarray):
    """Connected components of a graph on n nodes, vectorised union-find (hook every edge's
    larger root onto its smaller one, compress paths, repeat): (count, label per node)."""
    parent = np.arange(n)
    while True:
        while True:  # path compression
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
        ra, rb = parent[src], parent[dst]
        differ = ra != rb
        if not differ.any():
            break
        np.minimum.at(parent, np.maximum(ra[differ], rb[differ]),
                      np.minimum(ra[differ], rb[differ]))
    roots, labels = np.unique(parent, return_inverse=True)
    return roots.size, labels


def _regions_2d(heat, index, threshold, mode, min_area, tolerance, mask, connectivity,
                class_id, score) -> list[Region]:
    thr = absolute_threshold(heat, threshold, mode)
    fg = heat >= thr
    if mask is not None:
        fg &= mask
    rows_any = np.flatnonzero(fg.any(1))
    if rows_any.size == 0:
        return []
    cols_any = np.flatnonzero(fg[rows_any[0] : rows_any[-1] + 1].any(0))
    r_off, c_off = int(rows_any[0]), int(cols_any[0])
    crop = (slice(r_off, int(rows_any[-1]) + 1), slice(c_off, int(cols_any[-1]) + 1))
    fg = fg[crop]
    hc = np.ascontiguousarray(heat[crop])
    height, width = fg.shape

    row, start, end = _runs(fg)
    _, label = _link(row, start, end, width, connectivity)

    # per-run heat statistics with reduceat over the flattened crop (runs are contiguous there)
    flat = np.append(hc.ravel(), np.float32(0))
    bounds = np.empty(2 * row.size, dtype=np.intp)
    bounds[0::2] = row * width + start
    bounds[1::2] = row * width + end
    run_max = np.maximum.reduceat(flat, bounds)[0::2]
    run_sum = np.add.reduceat(flat.astype(np.float64), bounds)[0::2]
    length = end - start

    order = np.argsort(label, kind="stable")  # runs grouped by component, still row-sorted
    lab = label[order]
    first = np.flatnonzero(np.concatenate([[True], lab[1:] != lab[:-1]]))
    row, start, end = row[order], start[order], end[order]
    area = np.add.reduceat(length[order], first)
    keep = np.flatnonzero(area >= max(min_area, 1))
    if keep.size == 0:
        return []
    peak = np.maximum.reduceat(run_max[order], first)
    total = np.add.reduceat(run_sum[order], first)
    rmin = np.minimum.reduceat(row, first)
    rmax = np.maximum.reduceat(row, first) + 1
    cmin = np.minimum.reduceat(start, first)
    cmax = np.maximum.reduceat(end, first)
    nruns = np.diff(np.append(first, row.size))

    exact, chamfered = _outlines(row, start, end, first, nruns, rmax - rmin, keep, r_off, c_off,
                                 connectivity)
    polygons = _simplified(exact, chamfered, tolerance)

    regions = []
    for j, comp in enumerate(keep):
        regions.append(Region(
            index=tuple(int(i) for i in index),
            bbox=(int(rmin[comp]) + r_off, int(cmin[comp]) + c_off,
                  int(rmax[comp]) + r_off, int(cmax[comp]) + c_off),
            polygon=polygons[j],
            area=int(area[comp]),
            peak=float(peak[comp]),
            mean=float(total[comp] / area[comp]),
            threshold=thr,
            class_id=class_id,
            score=score,
        ))
    regions.sort(key=lambda r: (r.bbox[0], r.bbox[1]))
    return regions


def _outlines(row, start, end, first, nruns, nrows, keep, r_off, c_off, connectivity):
    """Exact pixel outlines of the kept components, and the same outlines chamfered (the base
    for simplification): two arrays of shapely geometries. A staircase of 4-connected runs is
    a simple polygon by construction; only 8-connected ones (which may touch themselves at a
    corner) and unions are checked and repaired."""
    exact = np.empty(keep.size, dtype=object)
    chamfered = np.empty(keep.size, dtype=object)
    stair = np.flatnonzero(nruns[keep] == nrows[keep])  # one run per row: a staircase
    if stair.size:
        comps = keep[stair]
        coords, ring = _staircase_rings(row, start, end, first[comps], nruns[comps], r_off, c_off)
        exact[stair] = shapely.polygons(shapely.linearrings(coords, indices=ring))
        ccoords, cring = _chamfer_rings(coords, ring)
        chamfered[stair] = shapely.polygons(shapely.linearrings(ccoords, indices=cring))
    for j in np.flatnonzero(nruns[keep] != nrows[keep]):  # concave rows or holes
        sl = slice(first[keep[j]], first[keep[j]] + nruns[keep[j]])
        boxes = shapely.box(start[sl] + c_off, row[sl] + r_off, end[sl] + c_off,
                            row[sl] + r_off + 1)
        # the union leaves vertices on straight edges; tolerance 0 removes exactly those
        exact[j] = _valid(np.array([shapely.simplify(shapely.union_all(boxes), 0.0)]))[0]
        chamfered[j] = _chamfer(exact[j])
    if connectivity == 2 and stair.size:
        exact[stair] = _valid(exact[stair])
    return exact, chamfered


def _staircase_rings(row, start, end, firsts, counts, r_off, c_off):
    """Outline rings of components with one run per row, built from the runs with no
    repeated or collinear vertex: down the left ends, back up the right ends."""
    comp = np.repeat(np.arange(firsts.size), counts)
    pos = np.arange(comp.size) - np.repeat(np.cumsum(counts) - counts, counts)
    idx = np.repeat(firsts, counts) + pos
    r, s, e = row[idx] + r_off, start[idx] + c_off, end[idx] + c_off
    last = pos == counts[comp] - 1
    s_next = np.zeros_like(last)
    e_next = np.zeros_like(last)
    s_next[:-1] = (s[:-1] == s[1:]) & ~last[:-1]  # the left edge runs straight on
    e_next[:-1] = (e[:-1] == e[1:]) & ~last[:-1]
    s_prev = np.concatenate([[False], s_next[:-1]])
    e_prev = np.concatenate([[False], e_next[:-1]])
    n = counts[comp]
    # four corners per run, with their place in the ring: left side downwards, right upwards
    xs = np.concatenate([s, s, e, e])
    ys = np.concatenate([r, r + 1, r + 1, r])
    ids = np.concatenate([comp] * 4)
    order = np.concatenate([2 * pos, 2 * pos + 1, 2 * n + 2 * (n - 1 - pos),
                            2 * n + 2 * (n - 1 - pos) + 1])
    kept = np.concatenate([~s_prev, ~s_next, ~e_next, ~e_prev])
    sort = np.lexsort((order[kept], ids[kept]))
    coords = np.column_stack([xs[kept], ys[kept]]).astype(np.float64)[sort]
    return coords, ids[kept][sort]


def _chamfer_rings(coords: np.ndarray, ring: np.ndarray):
    """Cut every corner of pixel outlines (open rings, grouped by ``ring``) by half a pixel
    along both edges. Unit steps of a staircase become diagonals, long edges stay; no pixel
    centre changes side, so the ring rasterises to the same pixels, but it now follows the
    region's boundary instead of zig-zagging around it, which is what simplification should
    approximate."""
    n = coords.shape[0]
    starts = np.flatnonzero(np.concatenate([[True], ring[1:] != ring[:-1]]))
    ends = np.append(starts[1:], n)
    prev = np.arange(n) - 1
    prev[starts] = ends - 1
    nxt = np.arange(n) + 1
    nxt[ends - 1] = starts
    to_prev = coords[prev] - coords
    to_next = coords[nxt] - coords
    len_prev = np.linalg.norm(to_prev, axis=1, keepdims=True)
    out = np.empty((2 * n, 2))
    out[0::2] = coords + 0.5 * to_prev / len_prev
    out[1::2] = coords + 0.5 * to_next / np.linalg.norm(to_next, axis=1, keepdims=True)
    # after a unit edge, the cut point towards the previous corner is that corner's own cut
    # point towards this one (the edge's midpoint): keep it once
    keep = np.ones(2 * n, dtype=bool)
    keep[0::2] = len_prev[:, 0] != 1
    return out[keep], np.repeat(ring, 2)[keep]


def _chamfer(geom):
    def ring(r):
        return _chamfer_rings(np.asarray(r.coords)[:-1], np.zeros(len(r.coords) - 1, int))[0]

    polys = [shapely.Polygon(ring(p.exterior), [ring(i) for i in p.interiors])
             for p in shapely.get_parts(geom)]
    return polys[0] if len(polys) == 1 else shapely.MultiPolygon(polys)


def _valid(geoms: np.ndarray) -> np.ndarray:
    """make_valid where needed, keeping only the polygonal part."""
    for j in np.flatnonzero(~shapely.is_valid(geoms)):
        fixed = shapely.make_valid(geoms[j])
        parts = [p for p in shapely.get_parts(fixed) if p.geom_type in ("Polygon", "MultiPolygon")]
        geoms[j] = shapely.union_all(parts) if len(parts) > 1 else parts[0]
    return geoms


# Simplification tolerance cap, as a fraction of a region's area / perimeter (its "thickness";
# radius / 2 for a disc): thin and small regions are simplified less. With 0.1, over 1,619
# regions of random smooth heatmaps and ellipses, simplify=1.0 kept raster IoU >= 0.958 with
# the exact region (tests/test_regions.py checks this on a seeded sample).
THICKNESS_FRACTION = 0.1


def _topology(geoms: np.ndarray) -> np.ndarray:
    """(parts, holes) of every geometry, as one (N, 2) integer array."""
    parts, which = shapely.get_parts(geoms, return_index=True)
    n = geoms.size
    return np.column_stack([
        np.bincount(which, minlength=n),
        np.bincount(which, weights=shapely.get_num_interior_rings(parts), minlength=n),
    ])


def _simplified(exact: np.ndarray, chamfered: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker of the chamfered outlines. Where plain Douglas-Peucker breaks validity
    or topology (a ring crossing another, a hole or a part lost), shapely's topology-preserving
    simplification is used instead (it is ~20x slower, so only there), then validity is
    repaired. A result that is empty, has a ring of fewer than three distinct vertices or saves
    no vertex keeps the exact outline."""
    if tolerance <= 0 or exact.size == 0:
        return exact
    tol = np.minimum(tolerance, THICKNESS_FRACTION * shapely.area(exact) / shapely.length(exact))
    simple = shapely.simplify(chamfered, tol, preserve_topology=False)
    broken = ~shapely.is_valid(simple) | shapely.is_empty(simple)
    broken |= (_topology(simple) != _topology(exact)).any(1)
    if broken.any():
        simple[broken] = shapely.simplify(chamfered[broken], tol[broken], preserve_topology=True)
        simple = _valid(simple)
    parts, which = shapely.get_parts(simple, return_index=True)
    thin = shapely.get_num_coordinates(shapely.get_exterior_ring(parts)) < 4
    bad = shapely.is_empty(simple) | (shapely.area(simple) <= 0)
    bad[which[thin]] = True
    # no fewer vertices than the exact outline (a rectangle, a speck): keep the exact one
    bad |= shapely.get_num_coordinates(simple) >= shapely.get_num_coordinates(exact)
    simple[bad] = exact[bad]
    return simple


def rasterize(geometry, shape: tuple[int, int], offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Boolean (H, W) mask of the pixels whose centre lies inside ``geometry`` (pixel-corner
    coordinates; ``offset`` = (row, col) of the array's top-left pixel)."""
    h, w = shape
    ys, xs = np.mgrid[0:h, 0:w]
    return shapely.contains_xy(geometry, xs + 0.5 + offset[1], ys + 0.5 + offset[0])
