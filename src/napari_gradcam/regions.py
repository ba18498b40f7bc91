"""Heatmap -> regions: bounding boxes and (simplified) polygons of the thresholded heat, in 2D
(every map on its own) or in 3D (connected components of a volume).

Coordinates: boxes are (min_row, min_col, max_row, max_col) with the max exclusive, as
scikit-image's regionprops; polygons are shapely geometries with pixel *corners* on integers,
x = column and y = row: pixel (r, c) covers [c, c + 1] x [r, r + 1], the convention of QuPath,
GeoJSON and COCO. A 3D region's box is (min_z, min_row, min_col, max_z, max_row, max_col), z
being the plane along the volume's first axis; its outline is one such polygon per plane.

How it works, all in NumPy / SciPy / shapely vectorised calls, for many maps at once (a chunk
of the stack: one pass over all its maps instead of a call per map):

1. threshold (absolute, relative to the map's maximum, or Otsu; with a mask multiplied in,
   computed on the heat inside the mask) and restrict to the mask;
2. run-length encode every row of every plane of every map (start and end column of each run
   of foreground pixels), after cropping to the rows and columns that hold any foreground;
3. link the runs into components with ``searchsorted`` over the runs sorted by (plane, row,
   start): within a plane, runs of consecutive rows that overlap (connectivity 1: share an
   edge; 2: share an edge or a corner); in 3D also across planes, the runs of the same row in
   the previous plane (and, for 18- and 26-connectivity, of the rows above and below, which
   share an edge or a corner with it). A 2D map is a volume of one plane: the same links
   without the cross-plane ones. Components of that run graph are SciPy's
   ``connected_components``;
4. per component and per plane it crosses: area, bounding box, peak and mean heat from
   ``reduceat`` over the runs;
5. the exact pixel outline of each (component, plane), traced from its boundary edges (run
   ends, and the stretches between rows where only one of them is foreground) linked corner
   to corner into rings, with no geometric union: rasterised back, it is the thresholded
   region exactly, and it is valid by construction;
6. simplification: the outline's corners are cut by half a pixel (it then runs along the
   region's boundary instead of zig-zagging around it, and still rasterises to the same pixels),
   then Douglas-Peucker (``shapely.simplify``) at the requested tolerance, capped at a tenth of
   the region's area / perimeter so that thin and small regions keep their shape (raster IoU
   >= 0.95 with the exact region), ring by ring: a ring it would collapse keeps its
   chamfered shape, so every part and hole stays; where simplified rings would cross, the
   topology-preserving variant instead, and validity repaired with ``make_valid``.

Each region keeps its runs (a small integer array), so that :func:`split_planes` and
:func:`label_image` give its exact pixels without the heatmap. Chunks of a large stack run in
a thread pool.

A 2D map too large to hold (a slide's heat in a zarr array, a memmap) is processed band by
band of rows, with the same result as on the whole map: each band's runs are linked within
the band, then to the components still open above it through the seam row; a component is
measured, filtered by ``min_area``, outlined and simplified only once no band can add to it
(see :func:`_banded_regions`). :func:`scale_regions` takes regions of a pyramid level to
level-0 pixels.
"""

from __future__ import annotations

import math
import numbers
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from itertools import pairwise
from typing import Any

import numpy as np
import shapely


@dataclass(frozen=True, eq=False)
class Region:
    """One connected region of a thresholded heatmap: a 2D region of one map, or a 3D
    connected component of one volume (``ndim``)."""

    index: tuple[int, ...]  # leading indices of its map, () for a single heatmap / volume
    # 2D: min_row, min_col, max_row, max_col; 3D: min_z, min_row, min_col, max_z, max_row,
    # max_col (max exclusive)
    bbox: tuple[int, ...]
    # shapely Polygon / MultiPolygon, pixel-corner coordinates (x = col, y = row); 3D: the
    # outline in the plane where the region has the most pixels
    polygon: Any
    area: int  # pixels (2D) or voxels (3D) in the thresholded region
    peak: float  # highest heat inside
    mean: float  # mean heat inside
    threshold: float  # the absolute threshold used on its map
    class_id: int | None = None  # the explained class, when the caller passes class_ids
    score: float | None = None  # the model's score for that class, when passed
    polygons: dict | None = None  # 3D: {z: outline in plane z} for every plane it crosses
    label: int | None = None  # 3D: its value in its volume's label map (1..n, returned order)
    # its exact pixels as runs, (row, start, end) or (z, row, start, end) per row, end
    # exclusive: what split_planes and label_image read; None for hand-made regions (their
    # polygons are rasterised instead)
    _runs: Any = field(default=None, repr=False)

    @property
    def ndim(self) -> int:
        """2 for a region of one map, 3 for a connected component of a volume."""
        return len(self.bbox) // 2

    @property
    def box(self):
        """The bounding box as a shapely rectangle in pixel-corner coordinates (for a 3D region,
        its extent in rows and columns, the same in every plane)."""
        r0, c0, r1, c1 = self.bbox[1:3] + self.bbox[4:] if self.ndim == 3 else self.bbox
        return shapely.box(c0, r0, c1, r1)


# Voxels per chunk of maps processed in one pass: large enough that the per-call overhead
# vanishes, small enough that a chunk's float32 heat and its masks stay well within memory.
CHUNK_VOXELS = 1 << 24


def find_regions(
    heatmaps,
    threshold: float | str = 0.5,
    min_area: int = 16,
    simplify: float = 1.0,
    mask=None,
    *,
    ndim: int = 2,
    mask_mode: str = "multiply",
    threshold_mode: str = "absolute",
    connectivity: int = 1,
    class_ids=None,
    scores=None,
    workers: int | None = None,
    band_rows: int | None = None,
) -> list[Region]:
    """Connected regions of every heatmap, as boxes and polygons, in 2D or in 3D.

    Parameters
    ----------
    heatmaps : array (NumPy, dask, zarr or a torch tensor), heat in [0, 1]. With ``ndim=2``,
        (H, W) or (..., H, W): every leading index is one map (a stack, or the planes of a
        volume explained plane by plane). With ``ndim=3``, (Z, H, W) or (..., Z, H, W): the
        last three axes are one volume, every leading index is a separate volume.
        NaN or infinite heat is refused (ValueError naming the map): it comes from a broken
        model or input, and would otherwise give silently empty or unbounded regions.
    threshold : a number, or ``"otsu"`` (Otsu's threshold of each map's own histogram).
        Pixels with heat >= threshold belong to a region.
    min_area : regions with fewer pixels (3D: voxels) are dropped; a whole number >= 0 (an
        integer-valued float such as 16.0 is accepted).
    simplify : tolerance in pixels (finite, >= 0) for the topology-preserving simplification
        of the polygons; 0 keeps the exact pixel outline.
    mask : optional boolean or label array, the map's spatial shape ((H, W), or (Z, H, W) with
        ``ndim=3``) for every map, or the heatmaps' full shape: regions only where mask > 0
        (e.g. the lungs on a chest X-ray, a brain mask on an MRI).
    ndim : 2 (default) finds the regions of every 2D map on its own; 3 finds 3D connected
        components of every volume: each :class:`Region` then has a 3D ``bbox``, ``area`` in
        voxels, ``polygons`` (its outline in every plane it crosses), and ``label``.
    mask_mode : ``"multiply"`` (default, as heat x mask: a relative or Otsu threshold is
        computed on the heat inside the mask only, so a hot spot outside it cannot raise the
        threshold) or ``"restrict"`` (the threshold is computed on the whole map, then regions
        are kept inside the mask only). Both find regions only inside the mask; with an
        absolute threshold they give the same regions.
    threshold_mode : ``"absolute"`` (threshold is a heat value) or ``"relative"`` (a fraction of
        each map's own maximum, as in the CAM (0.2) and Grad-CAM (0.15) papers).
    connectivity : which pixels belong together. 2D: 1 = sharing an edge (default; every
        region's polygon is then a single Polygon, possibly with holes), 2 = sharing an edge
        or a corner (a region whose parts touch only at corners is a MultiPolygon). 3D: 1 =
        sharing a face (6 neighbours, default), 2 = a face or an edge (18), 3 = a face, an
        edge or a corner (26) -- ``scipy.ndimage.generate_binary_structure(3, connectivity)``.
        A plane of a 3D region is a MultiPolygon where its parts join only in other planes.
    class_ids, scores : optional per-map values (shape of the leading axes, or scalars) copied
        into each region.
    workers : threads for a large stack (default: all CPUs); 1 runs in the calling thread.
    band_rows : 2D maps only: rows read and labelled at a time. A 2D map larger than
        :data:`BAND_PIXELS` that is not in memory (zarr, dask, ``np.memmap``, a tifffile zarr
        store), or a NumPy map larger than :data:`BANDED_ABOVE`, is processed band by band
        with memory bounded by a few bands plus the regions themselves; None (default)
        chooses the band from the map's width (:data:`BAND_PIXELS` pixels, whole chunks of
        a chunked array), an integer >= 1 forces banded processing with that many rows.
        The regions are the same as on the whole map: components are joined across the
        band seams before ``min_area`` and the simplification apply, and a relative or Otsu
        threshold comes from the whole map (a first pass over its bands: its maximum, or
        its histogram, binned exactly as on the whole map).

    Arguments of the wrong type (None, booleans, text where a number belongs) raise
    ``TypeError``, values out of range (NaN, infinity, negative) ``ValueError``.

    Returns
    -------
    list of :class:`Region`, ordered by map index, then by position (top to bottom; in 3D
    first plane first). A 3D region's ``label`` is its place in its volume in that order.
    """
    if isinstance(ndim, bool) or ndim not in (2, 3):
        raise ValueError(f"ndim={ndim!r}: use 2 (regions of every 2D map) or 3 (3D connected "
                         "components of every volume).")
    threshold, min_area, simplify = _check_options(threshold, threshold_mode, min_area,
                                                   simplify, connectivity, workers, ndim)
    band_rows = _check_band_rows(band_rows, ndim)
    if not isinstance(mask_mode, str) or mask_mode not in ("multiply", "restrict"):
        raise ValueError(
            f"mask_mode={mask_mode!r}: use 'multiply' (thresholds computed on the heat inside "
            "the mask) or 'restrict' (thresholds from the whole map, regions inside the mask)."
        )
    heatmaps = _as_array(heatmaps)
    _check_dtype(heatmaps, "heatmaps", "heat values (floats in [0, 1])")
    if heatmaps.ndim < ndim:
        want = "(H, W) or (..., H, W)" if ndim == 2 else (
            "(Z, H, W) or (..., Z, H, W) (a 2D map takes ndim=2)")
        raise ValueError(f"heatmaps has shape {tuple(heatmaps.shape)}; with ndim={ndim} give "
                         f"{want}.")
    shape = tuple(int(s) for s in heatmaps.shape)
    lead, spatial = shape[:-ndim], shape[-ndim:]
    if mask is not None:
        mask = _as_array(mask)
        _check_dtype(mask, "mask", "booleans or labels (True / > 0 = regions allowed)")
        if tuple(mask.shape) not in (spatial, shape):
            raise ValueError(
                f"mask has shape {tuple(mask.shape)}; it must be the heatmap's spatial shape "
                f"{spatial} or its full shape {shape}."
            )
    per_map_ids = _per_map(class_ids, lead, "class_ids", int)
    per_map_scores = _per_map(scores, lead, "scores", float)

    indices = list(np.ndindex(*lead))
    if not indices or 0 in spatial:
        return []
    if ndim == 2 and _banded(heatmaps, spatial, band_rows):
        rows = band_rows or _auto_band_rows(heatmaps, spatial)
        workers = workers or os.cpu_count() or 1
        return [region for i in indices for region in _banded_regions(
            heatmaps, i, mask, rows, threshold, threshold_mode, mask_mode, min_area, simplify,
            connectivity, per_map_ids(i), per_map_scores(i), workers)]
    volume = (1,) * (3 - ndim) + spatial  # a 2D map is a volume of one plane
    voxels = math.prod(volume)
    flat = heatmaps.reshape((-1, *volume)) if isinstance(heatmaps, np.ndarray) else None
    if mask is not None:
        mask = np.asarray(mask) > 0
        mask = mask.reshape((-1 if mask.ndim > ndim else 1, *volume))
    workers = workers or os.cpu_count() or 1
    per_chunk = max(1, min(-(-len(indices) // workers), CHUNK_VOXELS // max(voxels, 1)))
    starts = range(0, len(indices), per_chunk)

    def chunk(a):
        names = indices[a : a + per_chunk]
        if flat is not None:
            heat = np.ascontiguousarray(flat[a : a + len(names)], dtype=np.float32)
        else:
            heat = np.empty((len(names), *volume), np.float32)
            for k, i in enumerate(names):
                heat[k] = np.asarray(heatmaps[i], dtype=np.float32).reshape(volume)
        m = None if mask is None else (mask if mask.shape[0] == 1 else
                                       mask[a : a + len(names)])
        return _chunk_regions(
            heat, names, m, threshold, threshold_mode, mask_mode, min_area, simplify,
            connectivity, ndim, [per_map_ids(i) for i in names],
            [per_map_scores(i) for i in names],
        )

    if workers == 1 or len(starts) == 1:
        results = [chunk(a) for a in starts]
    else:
        with ThreadPoolExecutor(max_workers=min(workers, len(starts))) as pool:
            results = list(pool.map(chunk, starts))
    return [r for regions in results for r in regions]


def _check_options(threshold, threshold_mode, min_area, simplify, connectivity, workers,
                   ndim=2):
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
    if isinstance(connectivity, bool) or connectivity not in ((1, 2) if ndim == 2 else (1, 2, 3)):
        raise ValueError(
            f"connectivity={connectivity!r} with ndim={ndim}: use 1 (edges) or 2 (edges and "
            "corners) in 2D, 1 (faces, 6 neighbours), 2 (faces and edges, 18) or 3 (faces, "
            "edges and corners, 26) in 3D."
        )
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


def _neighbours(conn: int, ndim: int):
    """The earlier rows a run links to, as (planes back, rows back, touch): runs in that row
    that share columns with it belong to its component, or (touch) that share columns or meet
    it at a corner. Rows back -1 is the next row of the previous plane."""
    if ndim == 2:
        return [(0, 1, conn == 2)]
    if conn == 1:  # faces: 6 neighbours
        return [(0, 1, False), (1, 0, False)]
    edges = conn == 3  # 18: diagonal neighbours across an edge; 26: also across a corner
    return [(0, 1, True), (1, 0, True), (1, 1, edges), (1, -1, edges)]


def _link(flatrow, start, end, height, depth, width, neighbours):
    """Component label of every run. Runs are sorted by flat row (map, plane, row), then by
    start; for each neighbour row, the runs overlapping run j form an index range [lo, hi)
    of that order, found with two searchsorted calls."""
    n = flatrow.size
    w1 = width + 1
    key_start = flatrow * w1 + start
    key_end = flatrow * w1 + end
    row = flatrow % height
    plane = (flatrow // height) % depth
    src, dst = [], []
    for dz, dy, touch in neighbours:
        valid = np.ones(n, bool) if dz == 0 else plane >= dz
        if dy > 0:
            valid &= row >= dy
        elif dy < 0:
            valid &= row < height + dy
        base = (flatrow - dz * height - dy) * w1
        hi = np.searchsorted(key_start, base + end, side="right" if touch else "left")
        lo = np.searchsorted(key_end, base + start, side="left" if touch else "right")
        counts = np.where(valid, np.maximum(hi - lo, 0), 0)
        total = int(counts.sum())
        if total == 0:
            continue
        src.append(np.repeat(np.arange(n), counts))
        dst.append(np.repeat(lo, counts) + np.arange(total)
                   - np.repeat(np.cumsum(counts) - counts, counts))
    return _components(n, np.concatenate(src) if src else np.zeros(0, np.intp),
                       np.concatenate(dst) if dst else np.zeros(0, np.intp))


def _components(n: int, src: np.ndarray, dst: np.ndarray):
    """Connected components of a graph on n nodes: (count, label per node), labels numbered
    in the order of each component's first node."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(src.size, np.int8), (src, dst)), shape=(n, n))
    return connected_components(graph, directed=False)


def _chunk_regions(heat, names, mask, threshold, mode, mask_mode, min_area, tolerance,
                   connectivity, ndim, class_ids, scores) -> list[Region]:
    """The regions of a chunk of maps in one pass. heat: (maps, Z, H, W) float32, C order
    (Z = 1 for 2D maps); mask: None or booleans broadcasting to it."""
    nmaps, depth, height, width = heat.shape
    # one fast reduction per map; the exact check only where it is not finite (or overflowed)
    sums = heat.reshape(nmaps, -1).sum(1)
    for k in np.flatnonzero(~np.isfinite(sums)):
        if not np.isfinite(heat[k]).all():
            where = f"heatmaps[{', '.join(map(str, names[k]))}]" if names[k] else "the heatmap"
            raise ValueError(f"{where} holds NaN or infinite values; heat must be finite "
                             "numbers in [0, 1]: fix what produced them, or replace them "
                             "(np.nan_to_num) before finding regions.")
    inside = mask is not None and mask_mode == "multiply" and (
        threshold == "otsu" or mode == "relative")
    thr = [absolute_threshold(heat[k][mask[k if mask.shape[0] > 1 else 0]] if inside
                              else heat[k], threshold, mode) for k in range(nmaps)]
    # compared in float32, the heat's own precision
    fg = heat >= np.array(thr, np.float32)[:, None, None, None]
    if mask is not None:
        fg &= mask
    runs = _foreground_runs(fg.reshape(-1, width))
    if runs is None:
        return []
    flatrow, start, end = runs
    _, label = _link(flatrow, start, end, height, depth, width,
                     _neighbours(connectivity, ndim))

    # per-run heat statistics: reduceat over the heat of the runs' pixels only, gathered
    length = end - start
    offset = np.cumsum(length) - length
    pixels = np.repeat(flatrow * width + start - offset, length) + np.arange(int(length.sum()))
    values = heat.reshape(-1)[pixels]
    run_max = np.maximum.reduceat(values, offset)
    run_sum = np.add.reduceat(values, offset, dtype=np.float64)

    # runs grouped by component, then by plane (still row-sorted): one group per plane of a
    # component, the unit of outlines
    order = np.argsort(label, kind="stable")
    lab, flatrow, start, end = label[order], flatrow[order], start[order], end[order]
    length, run_max, run_sum = length[order], run_max[order], run_sum[order]
    gplane = flatrow // height  # map * depth + z
    row = flatrow % height
    new_comp = np.concatenate([[True], lab[1:] != lab[:-1]])
    new_group = new_comp | np.concatenate([[False], gplane[1:] != gplane[:-1]])
    gfirst = np.flatnonzero(new_group)
    glast = np.append(gfirst[1:], lab.size) - 1
    gnruns = glast - gfirst + 1
    garea = np.add.reduceat(length, gfirst)
    gpeak = np.maximum.reduceat(run_max, gfirst)
    gsum = np.add.reduceat(run_sum, gfirst)
    grmin, grmax = row[gfirst], row[glast] + 1
    gcmin = np.minimum.reduceat(start, gfirst)
    gcmax = np.maximum.reduceat(end, gfirst)
    gz = gplane[gfirst]
    # components, from their groups
    gcomp = np.cumsum(new_comp)[gfirst] - 1
    cfirst = np.flatnonzero(np.concatenate([[True], gcomp[1:] != gcomp[:-1]]))
    cglast = np.append(cfirst[1:], gfirst.size) - 1
    area = np.add.reduceat(garea, cfirst)
    keep = np.flatnonzero(area >= max(min_area, 1))
    if keep.size == 0:
        return []
    peak = np.maximum.reduceat(gpeak, cfirst)
    total = np.add.reduceat(gsum, cfirst)
    rmin = np.minimum.reduceat(grmin, cfirst)
    rmax = np.maximum.reduceat(grmax, cfirst)
    cmin = np.minimum.reduceat(gcmin, cfirst)
    cmax = np.maximum.reduceat(gcmax, cfirst)
    zmin, zmax = gz[cfirst] % depth, gz[cglast] % depth + 1
    cmap = gz[cfirst] // depth

    # outlines of the groups of kept components
    ngroups = np.diff(np.append(cfirst, gfirst.size))
    kept_groups = np.repeat(cfirst[keep], ngroups[keep]) + (
        np.arange(ngroups[keep].sum()) - np.repeat(np.cumsum(ngroups[keep]) - ngroups[keep],
                                                   ngroups[keep]))
    g = kept_groups
    exact, chamfered = _outlines(row, start, end, gfirst[g], gnruns[g], chamfer=tolerance > 0)
    polygons = _simplified(exact, chamfered, tolerance)

    # regions in map order, then top to bottom (first plane first), then first run
    if ndim == 2:
        sort = np.lexsort((keep, cmin[keep], rmin[keep], cmap[keep]))
    else:
        sort = np.lexsort((keep, cmin[keep], rmin[keep], zmin[keep], cmap[keep]))
    runs = np.column_stack([row, start, end] if ndim == 2 else
                           [gplane % depth, row, start, end]).astype(np.int32)
    gpos = np.cumsum(np.append(0, ngroups[keep]))  # each kept component's groups in `g`
    regions = []
    count = {}
    for j in sort:
        comp = keep[j]
        k = int(cmap[comp])
        index = tuple(int(i) for i in names[k])
        runs_c = runs[gfirst[cfirst[comp]] : glast[cglast[comp]] + 1]
        common = {
            "index": index, "area": int(area[comp]), "peak": float(peak[comp]),
            "mean": float(total[comp] / area[comp]), "threshold": thr[k],
            "class_id": class_ids[k], "score": scores[k], "_runs": runs_c,
        }
        if ndim == 2:
            regions.append(Region(
                bbox=(int(rmin[comp]), int(cmin[comp]), int(rmax[comp]), int(cmax[comp])),
                polygon=polygons[gpos[j]], **common))
            continue
        planes = slice(gpos[j], gpos[j + 1])
        zs = (gz[g[planes]] % depth).tolist()
        best = int(np.argmax(garea[g[planes]]))
        count[k] = count.get(k, 0) + 1
        regions.append(Region(
            bbox=(int(zmin[comp]), int(rmin[comp]), int(cmin[comp]), int(zmax[comp]),
                  int(rmax[comp]), int(cmax[comp])),
            polygon=polygons[planes][best], polygons=dict(zip(zs, polygons[planes])),
            label=count[k], **common))
    return regions


# Pixels of one band of a 2D map processed band by band: its float32 heat (4 MiB), the
# boolean arrays made from it and the reader's buffers (a band costs about 15 bytes per pixel
# at its peak) stay small next to any map worth banding, while the per-band overhead (a few
# NumPy and SciPy calls, a read) stays small.
BAND_PIXELS = 1 << 20
# NumPy maps above this many pixels (64 Mpx) are processed band by band too: already in
# memory, but thresholding and run-length encoding all of it at once would take a few more
# bytes per pixel on top.
BANDED_ABOVE = 1 << 26
# Bands read and labelled at the same time (in worker threads) ahead of the one being joined
# to the regions above it: bounds the memory at a few bands whatever the number of CPUs.
BANDS_AHEAD = 4


def _check_band_rows(band_rows, ndim):
    if band_rows is None:
        return None
    if isinstance(band_rows, bool) or not isinstance(band_rows, numbers.Integral):
        raise TypeError(f"band_rows={band_rows!r} ({type(band_rows).__name__}): give a whole "
                        "number of rows >= 1 per band, or None to choose it from the map's "
                        "width.")
    if band_rows < 1:
        raise ValueError(f"band_rows={band_rows}: give a number of rows >= 1 per band, or None "
                         "to choose it from the map's width.")
    if ndim != 2:
        raise ValueError(f"band_rows={band_rows} with ndim={ndim}: bands apply to 2D maps; "
                         "leave band_rows None for 3D components (found on the whole volume).")
    return int(band_rows)


def _banded(heatmaps, spatial, band_rows) -> bool:
    """Whether the 2D maps are processed band by band: when forced, or when a map is larger
    than a band and not in memory (a memmap is not: its pages are read as they are touched),
    or larger than :data:`BANDED_ABOVE` in memory."""
    if band_rows is not None:
        return True
    in_memory = isinstance(heatmaps, np.ndarray) and not isinstance(heatmaps, np.memmap)
    return spatial[0] * spatial[1] > (BANDED_ABOVE if in_memory else BAND_PIXELS)


def _auto_band_rows(heatmaps, spatial) -> int:
    """About :data:`BAND_PIXELS` pixels of rows; for a chunked array (zarr, dask, a tifffile
    store) whole chunk rows, so that every chunk is read and decompressed once."""
    height, width = spatial
    rows = max(1, BAND_PIXELS // max(width, 1))
    try:
        step = getattr(heatmaps, "chunks", None)[-2]
        step = int(step[0] if isinstance(step, tuple) else step)  # dask: sizes per chunk
    except (TypeError, IndexError, ValueError):
        step = 0
    if step > rows and step * width <= 4 * BAND_PIXELS:
        rows = step
    elif 0 < step <= rows:
        rows -= rows % step
    return max(1, min(rows, height))


def _ahead(func, items, workers):
    """``func`` of every item, yielded in order; with several workers computed in threads up
    to :data:`BANDS_AHEAD` items ahead of the consumer (so at most that many bands are held)."""
    items = list(items)
    if workers == 1 or len(items) <= 1:
        for item in items:
            yield func(item)
        return
    ahead = min(workers, BANDS_AHEAD)
    pending = deque()
    with ThreadPoolExecutor(max_workers=ahead) as pool:
        try:
            for item in items:
                pending.append(pool.submit(func, item))
                if len(pending) > ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # a failed band, or the consumer gave up: drop what was not started
            for future in pending:
                future.cancel()


def _foreground_runs(fg2: np.ndarray):
    """The runs of a 2-D foreground (rows, width) as (row, start, end), sorted by row then
    start, found only within the rows and columns that hold any; None when none does."""
    rows_any = np.flatnonzero(fg2.any(1))
    if rows_any.size == 0:
        return None
    sel = fg2[rows_any]
    cols_any = np.flatnonzero(sel.any(0))
    c_off = int(cols_any[0])
    r, start, end = _runs(sel[:, c_off : int(cols_any[-1]) + 1])
    return rows_any[r], start + c_off, end + c_off


def _band_runs(heat: np.ndarray, fg: np.ndarray, r0: int, connectivity: int):
    """Runs of one band's foreground (rows in map coordinates, sorted by row then start),
    their heat maximum and sum, and their components within the band: (row, start, end,
    run_max, run_sum, label, number of labels)."""
    height, width = fg.shape
    runs = _foreground_runs(fg)
    if runs is None:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty, np.zeros(0, np.float32), np.zeros(0), empty, 0
    row, start, end = runs
    count, label = _link(row, start, end, height, 1, width, _neighbours(connectivity, 2))
    run_max, run_sum = _run_stats(heat, row, start, end)
    return row + r0, start, end, run_max, run_sum, label, count


# Pixels of a block of rows whose heat is summed in float64 at a time (2 MiB).
STATS_PIXELS = 1 << 18


def _run_stats(heat: np.ndarray, row, start, end):
    """Heat maximum (float32) and sum (float64) of every run (sorted by row, then start),
    read straight from the heat rather than from a gathered copy of the foreground's heat
    and its int64 pixel indices (several bytes per pixel of the band): ``reduceat`` over
    every run's start and end, the even slots being the runs, the odd ones the gaps between
    them (dropped). Sums are taken over float64 copies of a few rows at a time (the same
    float64 sums as on the whole map, without a float64 copy of the band)."""
    height, width = heat.shape
    run_max = np.empty(row.size, np.float32)
    run_sum = np.empty(row.size, np.float64)
    step = max(1, STATS_PIXELS // max(width, 1))
    cuts = np.searchsorted(row, np.arange(0, height + step, step)).tolist()
    for k, (a, b) in enumerate(pairwise(cuts)):
        if a == b:
            continue
        block = heat[k * step : (k + 1) * step].reshape(-1)
        line = (row[a:b] - k * step) * width
        bounds = np.column_stack([line + start[a:b], line + end[a:b]]).reshape(-1)
        if bounds[-1] == block.size:  # (reduceat then sums the last run to the block's end)
            bounds = bounds[:-1]
        run_max[a:b] = np.maximum.reduceat(block, bounds)[::2]
        run_sum[a:b] = np.add.reduceat(block.astype(np.float64), bounds)[::2]
    return run_max, run_sum


def _band_threshold(read, starts, threshold, mode, inside, workers) -> float:
    """The absolute threshold of a map read band by band (``read(r0)`` -> (heat, mask)): a
    relative one needs the map's maximum, Otsu's its histogram, computed as
    :func:`absolute_threshold` does on the whole map: the same 256 bins between the same
    minimum and maximum (bin edges are computed from those alone, and every value falls in
    its bin on its own), so the summed band histograms are the whole map's, exactly."""
    if threshold != "otsu" and mode != "relative":
        return float(threshold)

    def values(r0):
        heat, m = read(r0)
        return heat[m] if inside else heat

    def extremes(r0):
        v = values(r0)
        return (v.min(), v.max()) if v.size else None

    found = [e for e in _ahead(extremes, starts, workers) if e is not None]
    if not found:
        return float("inf")  # nothing inside the mask: no foreground
    lo = min(e[0] for e in found)
    hi = max(e[1] for e in found)
    if threshold != "otsu":
        return float(threshold) * float(hi) if hi > 0 else float("inf")
    if lo == hi:
        return float("inf")  # a flat map has no foreground
    from skimage.filters import threshold_otsu

    counts = None
    for part in _ahead(lambda r0: np.histogram(values(r0), bins=256, range=(lo, hi))[0],
                       starts, workers):
        counts = part if counts is None else counts + part
    edges = np.histogram(np.zeros(0, np.float32), bins=256, range=(lo, hi))[1]
    return float(threshold_otsu(hist=(counts, (edges[:-1] + edges[1:]) / 2.0)))


def _banded_regions(heatmaps, index, mask, rows, threshold, mode, mask_mode, min_area,
                    tolerance, connectivity, class_id, score, workers) -> list[Region]:
    """The regions of the 2D map ``heatmaps[index]``, read ``rows`` rows at a time.

    Each band's runs are labelled within the band (in worker threads, a few bands ahead),
    then joined to the components still open from the bands above through the seam: the
    runs of their last row that touch runs of the band's first row (edges, or also corners
    with connectivity 2) put both in one component, which chains merges (a U whose arms meet
    only further down is one component from the band where they meet). A component with no
    run in the band's last row can grow no further: it is closed, and only then measured
    against ``min_area``, outlined from all its runs (the same runs as on the whole map, so
    the same exact outline, then simplified) and kept with its statistics. Memory: the bands
    in flight, the runs of the open components, and the regions found."""
    height = int(heatmaps.shape[-2])
    where = f"heatmaps[{', '.join(map(str, index))}]" if index else "the heatmap"
    full_mask = mask is not None and mask.ndim > 2
    starts = range(0, height, rows)

    def read(r0):
        r1 = min(r0 + rows, height)
        heat = np.ascontiguousarray(heatmaps[(*index, slice(r0, r1))], dtype=np.float32)
        # one fast reduction per band; the exact check only where it is not finite
        if not np.isfinite(heat.sum()):
            bad = np.flatnonzero(~np.isfinite(heat).all(1))
            if bad.size:
                raise ValueError(
                    f"{where} holds NaN or infinite values in rows {r0} to {r1 - 1} (first "
                    f"at row {r0 + int(bad[0])}); heat must be finite numbers in [0, 1]: fix "
                    "what produced them, or replace them (np.nan_to_num) before finding "
                    "regions.")
        m = None
        if mask is not None:
            m = np.asarray(mask[(*index, slice(r0, r1)) if full_mask else slice(r0, r1)]) > 0
        return heat, m

    inside = mask is not None and mask_mode == "multiply" and (
        threshold == "otsu" or mode == "relative")
    thr = _band_threshold(read, starts, threshold, mode, inside, workers)
    if not math.isfinite(thr):
        return []  # (every band was read, so a NaN anywhere was already refused)
    thr32 = np.float32(thr)  # compared in float32, the heat's own precision

    def local(r0):
        heat, m = read(r0)
        fg = heat >= thr32
        if m is not None:
            fg &= m
        return r0, _band_runs(heat, fg, r0, connectivity)

    found = []
    nopen = 0  # open components, with their runs (row, start, end, max, sum) and labels
    open_runs = (np.zeros(0, np.int64),) * 3 + (np.zeros(0, np.float32), np.zeros(0))
    open_label = np.zeros(0, np.int64)
    # runs of the open components in the last row read, by start: what the next band touches
    seam_start = seam_end = seam_label = np.zeros(0, np.int64)
    touch = connectivity == 2
    for r0, (row, start, end, run_max, run_sum, label, count) in _ahead(local, starts, workers):
        r1 = min(r0 + rows, height)
        src = dst = np.zeros(0, np.int64)
        first = int(np.searchsorted(row, r0, side="right"))  # runs in the band's first row
        if seam_start.size and first:
            hi = np.searchsorted(seam_start, end[:first], side="right" if touch else "left")
            lo = np.searchsorted(seam_end, start[:first], side="left" if touch else "right")
            links = np.maximum(hi - lo, 0)
            total = int(links.sum())
            src = np.repeat(nopen + label[:first], links)
            dst = seam_label[np.repeat(lo, links) + np.arange(total)
                             - np.repeat(np.cumsum(links) - links, links)]
        if nopen + count == 0:
            continue
        ncomp, comp = _components(nopen + count, src, dst)
        stays_open = np.zeros(ncomp, bool)
        last_row = row == r1 - 1
        if r1 < height:
            stays_open[comp[nopen + label[last_row]]] = True
        runs = [np.concatenate([a, b]) for a, b in zip(open_runs, (row, start, end, run_max,
                                                                   run_sum))]
        labels = np.concatenate([comp[open_label], comp[nopen + label]])
        is_open = stays_open[labels]
        closed = ~is_open
        if closed.any():
            found.extend(_closed_regions(*(a[closed] for a in runs), labels[closed],
                                         min_area, tolerance, index, thr, class_id, score))
        renumber = np.cumsum(stays_open) - 1
        seam_start, seam_end = start[last_row], end[last_row]
        seam_label = renumber[comp[nopen + label[last_row]]]
        open_runs = tuple(a[is_open] for a in runs)
        open_label = renumber[labels[is_open]]
        nopen = int(stays_open.sum())
    return [region for _, region in sorted(found, key=lambda kr: kr[0])]


def _closed_regions(row, start, end, run_max, run_sum, label, min_area, tolerance, index,
                    thr, class_id, score):
    """Regions of closed components (runs in any order, ``label`` = component): those with
    at least ``min_area`` pixels, measured and outlined as on the whole map, each with its
    sort key (top row, left column, start of its first run: the whole map's order)."""
    length = end - start
    keep = np.bincount(label, weights=length) >= max(min_area, 1)
    sel = keep[label]
    if not sel.any():
        return []
    order = np.lexsort((start[sel], row[sel], label[sel]))  # by component, then row-major
    row, start, end = row[sel][order], start[sel][order], end[sel][order]
    run_max, run_sum, label = run_max[sel][order], run_sum[sel][order], label[sel][order]
    length = end - start
    cfirst = np.flatnonzero(np.concatenate([[True], label[1:] != label[:-1]]))
    clast = np.append(cfirst[1:], label.size) - 1
    area = np.add.reduceat(length, cfirst)
    peak = np.maximum.reduceat(run_max, cfirst)
    total = np.add.reduceat(run_sum, cfirst)
    cmin = np.minimum.reduceat(start, cfirst)
    cmax = np.maximum.reduceat(end, cfirst)
    exact, chamfered = _outlines(row, start, end, cfirst, clast - cfirst + 1,
                                 chamfer=tolerance > 0)
    polygons = _simplified(exact, chamfered, tolerance)
    runs = np.column_stack([row, start, end]).astype(np.int32)
    out = []
    for j, (a, b) in enumerate(zip(cfirst.tolist(), clast.tolist())):
        r0, c0 = int(row[a]), int(cmin[j])
        out.append(((r0, c0, int(start[a])), Region(
            index=tuple(int(i) for i in index), bbox=(r0, c0, int(row[b]) + 1, int(cmax[j])),
            polygon=polygons[j], area=int(area[j]), peak=float(peak[j]),
            mean=float(total[j] / area[j]), threshold=thr, class_id=class_id, score=score,
            _runs=runs[a : b + 1])))
    return out


def _outlines(row, start, end, first, nruns, chamfer=True):
    """Exact pixel outlines of groups of runs (a region in one plane), traced from their
    boundary edges (:func:`_traced_rings`): an array of shapely geometries, valid by
    construction (so no validity check is needed); and the same outlines chamfered, the base
    for simplification, as (rings, part of every ring, group of every part, groups), or None
    without ``chamfer`` (no simplification follows)."""
    coords, ring, ring_part, part_group, groups = _traced_rings(row, start, end, first, nruns)
    exact = _rings_to_geoms(shapely.linearrings(coords, indices=ring), ring_part, part_group,
                            groups)
    chamfered = None
    if chamfer:
        ccoords, cring = _chamfer_rings(coords, ring)
        chamfered = (shapely.linearrings(ccoords, indices=cring), ring_part, part_group, groups)
    return exact, chamfered


def _traced_rings(row, start, end, first, nruns):
    """Exact pixel outlines of groups of runs (each group: the runs of one region in one plane,
    sorted by row, then start), traced from their boundary edges with no geometric union.

    Edges: the vertical ones are the runs' left and right ends (one pixel high); the horizontal
    ones lie on the line between two rows, where exactly one of them is foreground (a sweep
    over both rows' run ends). Every edge is oriented with the foreground on its right (x =
    column, y = row downwards), so that linking each edge to the edge leaving its end corner
    closes rings: clockwise shells, anticlockwise holes. A corner with two leaving edges is
    where two foreground pixels touch diagonally: if they belong to the same 4-connected part
    of the plane, the ring turns to stay on the far side (the two pixels are joined through the
    corner), otherwise it turns back around its own pixel (the parts are separated). Either
    way no ring passes a corner twice, and each ring separates one 4-connected part from one
    background region: rings are simple, every part has exactly one shell (the others are its
    holes), and the parts of a group touch one another at corners only, which is what makes
    the polygons valid without checking.

    Returns (coords, ring, ring_part, part_group, groups): the open rings' corners (no
    collinear vertex) grouped by ring, rings ordered by part with the shell first, the part
    of every ring, the group of every part (parts rise with the group), the number of groups.
    """
    groups = first.size
    counts = nruns
    gk = np.repeat(np.arange(groups), counts)
    idx = np.repeat(first, counts) + np.arange(counts.sum()) - np.repeat(
        np.cumsum(counts) - counts, counts)
    r = row[idx].astype(np.int64)
    s = start[idx].astype(np.int64)
    e = end[idx].astype(np.int64)
    n = idx.size
    h1 = int(r.max()) + 2  # lines between rows: 0 .. last row + 1
    w1 = int(e.max()) + 1
    line = gk * h1 + r  # the line on top of every run, per group
    # corner keys ((group * h1 + line) * w1 + x) of every run's top left and top right corners;
    # those of its bottom corners are w1 more
    key_start = line * w1 + s
    key_end = line * w1 + e

    # 4-connected parts of every group (runs of consecutive rows sharing columns)
    _, part = _link(gk * h1 + r, s, e, h1, 1, w1, [(0, 1, False)])
    part_group = np.zeros(int(part.max()) + 1, np.int64)
    part_group[part] = gk  # labels follow the runs' order, so they rise with the group

    # horizontal edges: sweep over the run ends of the rows above (+1 in, -1 out) and below
    # (-1 in, +1 out) every line; where the sum is +1 only the row above is foreground
    # (edge leads west), -1 only the row below (leads east). Both event streams are sorted,
    # so the stable sort merges them in linear time.
    above = np.column_stack([key_start, key_end]).ravel()
    keys = np.concatenate([above, above + w1])
    delta = np.concatenate([np.tile(np.array([-1, 1], np.int8), n),
                            np.tile(np.array([1, -1], np.int8), n)])
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    f = np.cumsum(delta[order], dtype=np.int64)
    last = np.append(keys[1:] != keys[:-1], True)  # the sum after every distinct key
    ukey, uf = keys[last], f[last]
    open_ = np.flatnonzero(uf[:-1] != 0)
    hkey = ukey[open_]
    x0 = hkey % w1
    x1 = ukey[open_ + 1] % w1
    west = uf[open_] > 0
    hy = (hkey // w1) % h1
    hbase = hkey - x0  # the key of the line's x = 0

    # edges: (start vertex, end vertex, direction 0 E / 1 S / 2 W / 3 N, run or -1)
    sv = np.concatenate([key_start + w1, key_end, hbase + np.where(west, x1, x0)])
    ev = np.concatenate([key_start, key_end + w1, hbase + np.where(west, x0, x1)])
    direction = np.concatenate([np.full(n, 3, np.int8), np.full(n, 1, np.int8),
                                np.where(west, 2, 0).astype(np.int8)])
    edge_part = np.concatenate([part, part, np.full(open_.size, -1, part.dtype)])
    total = sv.size
    # start corner of every edge, and its term of the ring's shoelace sum (x * y_end - x_end *
    # y: -x going north, x going south, y * length going west, -y * length going east), read
    # here rather than decoded from the vertex keys after the walk
    sx = np.concatenate([s, e, np.where(west, x1, x0)])
    sy = np.concatenate([r + 1, r, hy])
    shoelace = np.concatenate([-s, e, np.where(west, hy, -hy) * (x1 - x0)])
    by_start = np.argsort(sv * 4 + direction, kind="stable")
    sv_sorted = sv[by_start] * 4 + direction[by_start]

    # diagonal corners: a run ending where the next row's run starts (or the reverse), in
    # the same group; joined when both runs are in the same 4-connected part
    diag_keys, diag_join = [], []
    for mine, theirs in ((key_start, key_end), (key_end, key_start)):
        target = mine - w1
        pos = np.minimum(np.searchsorted(theirs, target), n - 1)
        hit = (theirs[pos] == target) & (r > 0)
        diag_keys.append(mine[hit])
        diag_join.append(part[pos[hit]] == part[hit])
    diag_keys = np.concatenate(diag_keys)
    diag_join = np.concatenate(diag_join)
    dsort = np.argsort(diag_keys)
    diag_keys, diag_join = diag_keys[dsort], diag_join[dsort]

    # successor of every edge: the edge leaving its end corner; at a diagonal corner, the
    # right turn (around its own pixel) or the left turn (joined). Every corner has as many
    # edges arriving as leaving, so the end corners sorted are the start corners sorted: the
    # first edge leaving an edge's end corner is at that edge's place in the end order (the
    # first of the two places at a diagonal corner), found without a search (the end keys are
    # three sorted blocks, which the stable sort merges in linear time)
    by_end = np.argsort(ev, kind="stable")
    end_sorted = ev[by_end]
    first_out = np.arange(total)
    first_out[np.flatnonzero(end_sorted[1:] == end_sorted[:-1]) + 1] -= 1
    lo = np.empty(total, np.int64)
    lo[by_end] = first_out
    succ = by_start[lo]
    two = (lo + 1 < total) & (sv_sorted[np.minimum(lo + 1, total - 1)] < (ev + 1) * 4)
    if two.any():
        w = np.flatnonzero(two)
        join = diag_join[np.searchsorted(diag_keys, ev[w])]
        want = np.where(join, (direction[w] + 3) % 4, (direction[w] + 1) % 4)
        pick = np.searchsorted(sv_sorted, ev[w] * 4 + want)
        succ[w] = by_start[pick]

    walk, head = _cycle_order(succ)
    ring = np.cumsum(head) - 1
    nrings = int(ring[-1]) + 1
    # collinear corners dropped: an edge going on in the direction of the one before it
    d = direction[walk]
    ring_start = np.flatnonzero(head)
    ring_last = np.append(ring_start[1:], walk.size) - 1
    prev_d = np.empty_like(d)
    prev_d[1:] = d[:-1]
    prev_d[ring_start] = d[ring_last]
    corner = d != prev_d
    area = np.bincount(ring, weights=shoelace[walk], minlength=nrings)  # 2x, shells > 0
    ring_part = np.zeros(nrings, np.int64)
    vert = edge_part[walk] >= 0
    ring_part[ring[vert]] = edge_part[walk][vert]
    # rings by part, the shell (positive area) first
    rorder = np.lexsort((area < 0, ring_part))
    at = walk[corner]
    coords = np.column_stack([sx[at], sy[at]]).astype(np.float64)
    rid = ring[corner]
    new_of_old = np.empty(nrings, np.int64)
    new_of_old[rorder] = np.arange(nrings)
    rid = new_of_old[rid]
    sort = np.argsort(rid, kind="stable")
    coords, rid = coords[sort], rid[sort]
    return coords[_top_left_first(coords, rid)], rid, ring_part[rorder], part_group, groups


def _top_left_first(coords: np.ndarray, rid: np.ndarray) -> np.ndarray:
    """The order that starts every ring (corners grouped by ``rid``) at its top-left corner,
    keeping the direction. Where the walk enters a ring depends on the other rings traced in
    the same call; the simplification depends on the start, so without this a region's
    simplified polygon would depend on which other regions (a chunk of a stack, a band of a
    large map) were outlined with it."""
    n = rid.size
    if n == 0:
        return np.arange(0)
    starts = np.flatnonzero(np.concatenate([[True], rid[1:] != rid[:-1]]))
    length = np.diff(np.append(starts, n))
    x, y = coords[:, 0], coords[:, 1]
    first = np.lexsort((x, y, rid))[starts]  # each ring's top row, then left-most corner
    shift = first - starts
    pos = np.arange(n) - np.repeat(starts, length)
    return np.repeat(starts, length) + (pos + np.repeat(shift, length)) % np.repeat(length,
                                                                                   length)


def _cycle_order(succ: np.ndarray, depth: int = 0):
    """The cycles of a permutation (``succ``: the next element of every element) one after
    the other, each in its order: (order, True where a cycle starts).

    A list ranking in a few vectorised passes: the elements whose pseudo-random priority is
    no higher than both neighbours' (every cycle has at least one: its minimum) are "rulers";
    each walks forward to the next ruler (a few steps: gaps between local minima of random
    values are short), which leaves a permutation of the rulers alone, about a third as
    long, ordered the same way; each element's place is then its ruler's plus its steps
    from it. Small permutations are left to SciPy's depth-first walk."""
    n = succ.size
    if n <= 30_000 or depth > 40:  # (the depth bound: a safety net, never reached)
        from scipy.sparse import csr_matrix
        from scipy.sparse.csgraph import depth_first_order

        # a virtual root linked to every element: the walk follows each cycle from its
        # first element until it closes, then starts the next
        graph = csr_matrix((np.ones(2 * n, np.int8),
                            (np.concatenate([np.arange(n), np.full(n, n)]),
                             np.concatenate([succ, np.arange(n)]))), shape=(n + 1, n + 1))
        walk, pred = depth_first_order(graph, n, directed=True, return_predecessors=True)
        return walk[1:], pred[walk[1:]] == n
    idx = np.arange(n)
    # a bijection of 0 .. 2**32 - 1 (odd multiplier): distinct, deterministic priorities
    prio = (idx.astype(np.uint64) * np.uint64(0x9E3779B1)) & np.uint64(0xFFFFFFFF)
    pred = np.empty(n, np.int64)
    pred[succ] = idx
    # (<=: an element that is its own successor is a ruler too)
    ruler = (prio <= prio[succ]) & (prio <= prio[pred])
    rulers = np.flatnonzero(ruler)
    m = rulers.size
    rank = np.full(n, -1, np.int64)
    rank[rulers] = np.arange(m)
    owner = np.empty(n, np.int64)
    owner[rulers] = np.arange(m)
    offset = np.zeros(n, np.int64)
    gap = np.zeros(m, np.int64)
    nxt = np.zeros(m, np.int64)
    active = np.arange(m)
    cur = succ[rulers]
    step = 1
    while active.size:
        stop = ruler[cur]
        nxt[active[stop]] = rank[cur[stop]]
        gap[active[stop]] = step
        go = ~stop
        active, cur = active[go], cur[go]
        owner[cur] = active
        offset[cur] = step
        cur = succ[cur]
        step += 1
    # cycles with one ruler are done; the others' rulers are ordered the same way
    alone = nxt == np.arange(m)
    rest = np.flatnonzero(~alone)
    walk_r = np.flatnonzero(alone)
    head_r = np.ones(m, bool)
    if rest.size:
        renum = np.empty(m, np.int64)
        renum[rest] = np.arange(rest.size)
        walk_rest, head_r[walk_r.size :] = _cycle_order(renum[nxt[rest]], depth + 1)
        walk_r = np.concatenate([walk_r, rest[walk_rest]])
    gaps = gap[walk_r]
    begin = np.cumsum(gaps) - gaps
    place = np.empty(m, np.int64)
    place[walk_r] = begin
    walk = np.empty(n, np.int64)
    walk[place[owner] + offset] = idx
    head = np.zeros(n, bool)
    head[begin[head_r]] = True
    return walk, head


def _rings_to_geoms(rings, ring_part, part_group, groups):
    """Polygons of every part from its rings (``rings``: linear rings, shell then holes, in
    part order), and one (Multi)Polygon per group."""
    parts = shapely.polygons(rings, indices=ring_part)
    out = np.empty(groups, dtype=object)
    nparts = np.bincount(part_group, minlength=groups)
    single = nparts[part_group] == 1
    out[part_group[single]] = parts[single]
    multi = np.flatnonzero(nparts > 1)
    if multi.size:
        out[multi] = shapely.multipolygons(parts[~single], indices=np.searchsorted(
            multi, part_group[~single]))
    return out


def _chamfer_rings(coords: np.ndarray, ring: np.ndarray):
    """Cut every corner of pixel outlines (open rings, grouped by ``ring``) by half a pixel
    along both edges. Unit steps of a staircase become diagonals, long edges stay; no pixel
    centre changes side, so the ring rasterises to the same pixels, but it now follows the
    region's boundary instead of zig-zagging around it, which is what simplification should
    approximate."""
    n = coords.shape[0]
    starts = np.flatnonzero(np.concatenate([[True], ring[1:] != ring[:-1]]))
    ends = np.append(starts[1:], n)
    # the edges are axis-parallel: each corner's vector to the next one, computed once, gives
    # both cut directions (its sign) and the edge length (the sum of its absolute values)
    to_next = np.empty_like(coords)
    np.subtract(coords[1:], coords[:-1], out=to_next[:-1])
    to_next[ends - 1] = coords[starts] - coords[ends - 1]
    to_prev = np.empty_like(coords)
    to_prev[1:] = -to_next[:-1]
    to_prev[starts] = -to_next[ends - 1]
    out = np.empty((n, 2, 2))
    out[:, 0] = coords + 0.5 * np.sign(to_prev)
    out[:, 1] = coords + 0.5 * np.sign(to_next)
    # after a unit edge, the cut point towards the previous corner is that corner's own cut
    # point towards this one (the edge's midpoint): keep it once
    keep = np.ones((n, 2), dtype=bool)
    keep[:, 0] = np.abs(to_prev).sum(axis=1) != 1
    keep = keep.ravel()
    return out.reshape(-1, 2)[keep], np.repeat(ring, 2)[keep]


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


def _simplified(exact: np.ndarray, chamfered, tolerance: float) -> np.ndarray:
    """Douglas-Peucker of the chamfered outlines (``chamfered``: see :func:`_outlines`), ring
    by ring: a ring that it collapses (a small hole or part) keeps its chamfered shape, so no
    hole or part is lost and the topology is that of the exact outline by construction (no
    check needed). Where the simplified rings cross one another (invalid), shapely's
    topology-preserving simplification of the whole outline is used instead (it is ~20x
    slower, so only there), then validity is repaired. A result that is empty, has a ring of
    fewer than three distinct vertices or saves no vertex keeps the exact outline."""
    if tolerance <= 0 or exact.size == 0:
        return exact
    tol = np.minimum(tolerance, THICKNESS_FRACTION * shapely.area(exact) / shapely.length(exact))
    rings, ring_part, part_group, groups = chamfered
    simple_rings = shapely.simplify(rings, tol[part_group[ring_part]], preserve_topology=False)
    collapsed = (shapely.get_type_id(simple_rings) != shapely.GeometryType.LINEARRING) | (
        shapely.get_num_coordinates(simple_rings) < 4)
    simple_rings[collapsed] = rings[collapsed]
    simple = _rings_to_geoms(simple_rings, ring_part, part_group, groups)
    broken = ~shapely.is_valid(simple)
    if broken.any():
        chamfered = _rings_to_geoms(rings, ring_part, part_group, groups)
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


def _pixel_runs(region: Region) -> np.ndarray:
    """The region's exact pixels as runs: (row, start, end) rows for a 2D region, (z, row,
    start, end) for a 3D one. Regions made by hand (no runs kept) are rasterised from their
    polygon(s) inside their box: exact for exact (simplify=0) outlines."""
    if region._runs is not None:
        return np.asarray(region._runs)
    if region.ndim == 2:
        planes = {None: region.polygon}
        r0, c0, r1, c1 = region.bbox
    else:
        planes = region.polygons or {}
        _, r0, c0, _, r1, c1 = region.bbox
    out = []
    for z, geom in planes.items():
        row, start, end = _runs(rasterize(geom, (r1 - r0, c1 - c0), (r0, c0)))
        cols = [row + r0, start + c0, end + c0]
        out.append(np.column_stack(cols if z is None else [np.full(row.size, z)] + cols))
    return (np.concatenate(out) if out else np.zeros((0, region.ndim + 1))).astype(np.int32)


def split_planes(regions) -> list[Region]:
    """Each 3D region as one 2D :class:`Region` per plane it crosses, in plane order: index =
    its index + (z,), the exact box and pixel count of that plane, the outline of that plane,
    and the 3D region's class, score, peak, mean, threshold and label (so that the planes stay
    recognisable as one region). 2D regions pass through unchanged."""
    out = []
    for region in regions:
        if region.ndim == 2:
            out.append(region)
            continue
        runs = _pixel_runs(region)
        polygons = region.polygons or {}
        cuts = np.flatnonzero(np.diff(runs[:, 0])) + 1
        for plane in np.split(runs, cuts) if runs.size else []:
            z = int(plane[0, 0])
            row, start, end = plane[:, 1], plane[:, 2], plane[:, 3]
            out.append(Region(
                index=tuple(region.index) + (z,),
                bbox=(int(row.min()), int(start.min()), int(row.max()) + 1, int(end.max())),
                polygon=polygons.get(z, region.polygon if len(polygons) <= 1 else None),
                area=int((end - start).sum()), peak=region.peak, mean=region.mean,
                threshold=region.threshold, class_id=region.class_id, score=region.score,
                label=region.label, _runs=plane[:, 1:],
            ))
    return out


def label_image(regions, shape) -> np.ndarray:
    """An int32 label map of ``shape``: every region's exact pixels set to its label (3D
    regions and the planes of :func:`split_planes`: ``label``; other 2D regions: their
    1-based place among the regions of their map). ``shape`` is the spatial shape ((H, W) or
    (Z, H, W)) for the regions of one map, or the leading + spatial shape of the heatmaps
    they were found in (a region goes to its ``index``)."""
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"shape={shape!r}: give the label map's shape as a tuple of "
                        "integers, e.g. heatmaps.shape.") from None
    if any(s < 0 for s in shape):
        raise ValueError(f"shape={shape}: sizes must be >= 0.")
    out = np.zeros(shape, np.int32)
    regions = list(regions)
    maps = {tuple(r.index) for r in regions if len(shape) == r.ndim}
    if len(maps) > 1:
        raise ValueError(f"the regions come from {len(maps)} maps but shape={shape} has room "
                         "for one: give the heatmaps' full shape (leading + spatial axes).")
    count = {}
    for region in regions:
        nd = region.ndim
        if len(shape) == nd:
            where = ()
        elif len(shape) == len(region.index) + nd:
            where = tuple(region.index)
        else:
            raise ValueError(
                f"shape={shape} fits neither the {nd}D region's spatial axes nor its index "
                f"{tuple(region.index)} + {nd} spatial axes: give the heatmaps' shape.")
        spatial = shape[len(where):]
        lo, hi = region.bbox[:nd], region.bbox[nd:]
        if any(v < 0 for v in lo) or any(h > s for h, s in zip(hi, spatial)) or any(
                not 0 <= i < s for i, s in zip(where, shape)):
            raise ValueError(f"a region at {tuple(region.index)} with box {region.bbox} lies "
                             f"outside shape={shape}: give the shape of the heatmaps the "
                             "regions were found in.")
        count[where] = count.get(where, 0) + 1
        label = region.label if region.label is not None else count[where]
        runs = _pixel_runs(region).astype(np.intp)
        if not runs.size:
            continue
        line = runs[:, -3] if nd == 2 else runs[:, 0] * spatial[1] + runs[:, 1]
        first = line * spatial[-1] + runs[:, -2]
        length = runs[:, -1] - runs[:, -2]
        pixels = np.repeat(first - (np.cumsum(length) - length), length) + np.arange(length.sum())
        out[where].reshape(-1)[pixels] = label
    return out


def _scale_factor(factor) -> tuple[float, float]:
    expected = ("a number > 0 or a (rows, cols) pair of numbers > 0 (e.g. a pyramid level's "
                "downsample)")
    pair = isinstance(factor, (tuple, list)) or (isinstance(factor, np.ndarray)
                                                and factor.ndim == 1)
    if pair and len(factor) != 2:
        raise ValueError(f"factor={factor!r} has {len(factor)} values; give {expected}.")
    values = [_real(v, "factor", expected) for v in (factor if pair else (factor, factor))]
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"factor={factor!r}: give {expected}; every factor must be finite "
                         "and > 0.")
    return values[0], values[1]


def _snapped(value: float) -> float:
    """A product that is a whole number up to rounding noise (3 x 1.1), as that number, so
    that the box's floor / ceil do not grow it by a pixel."""
    near = round(value)
    return float(near) if abs(value - near) < 1e-6 else value


def scale_regions(regions, factor) -> list[Region]:
    """The regions with their coordinates multiplied by ``factor`` (a number, or (rows, cols)):
    regions found on a pyramid level k, in level-k pixels, to level-0 pixels (``factor`` =
    the level's downsample), as QuPath and the slide's other annotations expect.

    New :class:`Region` objects (the given ones are unchanged): polygon(s) scaled about the
    origin (pixel corners, so pixel (r, c) of level k covers [c, c + 1] x [r, r + 1] times the
    factors); box = the level-0 pixels covering the scaled box (min rounded down, max up,
    exact for whole-number factors); area = pixels x rows factor x cols factor, rounded. A
    3D region's planes are not scaled (the factor is in rows and columns). Heat statistics,
    threshold, class, score and label are kept. The scaled regions keep no pixel runs:
    :func:`label_image` rasterises their polygons (exact for exact outlines and whole-number
    factors).

    ``factor``: finite and > 0 (``TypeError`` for what is not a number, ``ValueError`` for
    zero, negative or infinite factors, or a tuple of other than two)."""
    fr, fc = _scale_factor(factor)
    regions = list(regions)
    for region in regions:
        if not isinstance(region, Region):
            raise TypeError(f"scale_regions got {type(region).__name__}; give Region objects "
                            "(from find_regions or a JobResult).")
    scale = np.array([fc, fr])  # polygons are (x = col, y = row)

    def scaled(geom):
        return None if geom is None else shapely.transform(geom, lambda xy: xy * scale)

    out = []
    for region in regions:
        nd = region.ndim
        lo, hi = list(region.bbox[:nd]), list(region.bbox[nd:])
        for axis, f in ((nd - 2, fr), (nd - 1, fc)):
            lo[axis] = math.floor(_snapped(lo[axis] * f))
            hi[axis] = math.ceil(_snapped(hi[axis] * f))
        out.append(replace(
            region, bbox=tuple(lo + hi), polygon=scaled(region.polygon),
            polygons=None if region.polygons is None else {
                z: scaled(g) for z, g in region.polygons.items()},
            area=round(region.area * fr * fc), _runs=None))
    return out
