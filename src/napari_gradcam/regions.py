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
5. the exact pixel outline of each (component, plane): one run per row, consecutive runs
   overlapping (blobs, the usual heatmap region) is a staircase polygon built directly from
   its runs; any other (concave rows, holes, a plane of a 3D region whose parts join in
   another plane) is the union of its run rectangles. Rasterised back, it is the thresholded
   region exactly;
6. simplification: the outline's corners are cut by half a pixel (it then runs along the
   region's boundary instead of zig-zagging around it, and still rasterises to the same pixels),
   then Douglas-Peucker (``shapely.simplify``) at the requested tolerance, capped at a tenth of
   the region's area / perimeter so that thin and small regions keep their shape (raster IoU
   >= 0.95 with the exact region); where plain Douglas-Peucker would break validity or
   topology, the topology-preserving variant instead, and validity repaired with
   ``make_valid``.

Each region keeps its runs (a small integer array), so that :func:`split_planes` and
:func:`label_image` give its exact pixels without the heatmap. Chunks of a large stack run in
a thread pool.
"""

from __future__ import annotations

import math
import numbers
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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
    fg2 = fg.reshape(-1, width)
    rows_any = np.flatnonzero(fg2.any(1))
    if rows_any.size == 0:
        return []
    sel = fg2[rows_any]
    cols_any = np.flatnonzero(sel.any(0))
    c_off = int(cols_any[0])
    r, start, end = _runs(sel[:, c_off : int(cols_any[-1]) + 1])
    flatrow = rows_any[r]
    start += c_off
    end += c_off
    _, label = _link(flatrow, start, end, height, depth, width,
                     _neighbours(connectivity, ndim))

    # every run's start and end, sorted: where outlines of unions need their vertices
    breaks = np.empty(2 * flatrow.size, dtype=np.int64)
    breaks[0::2] = flatrow * (width + 1) + start
    breaks[1::2] = flatrow * (width + 1) + end

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
    # consecutive runs of a group: a staircase needs them to share columns or a corner; a
    # corner only (8-connected 2D regions, planes of 18- / 26-connected 3D ones) may make the
    # staircase touch itself, so those are checked and repaired
    same = ~new_group[1:]
    touch = (start[1:] <= end[:-1]) & (start[:-1] <= end[1:])
    overlap = (start[1:] < end[:-1]) & (start[:-1] < end[1:])
    group_of = np.cumsum(new_group) - 1
    apart = np.bincount(group_of[1:][same & ~touch], minlength=gfirst.size)
    corner = np.bincount(group_of[1:][same & touch & ~overlap], minlength=gfirst.size)
    g = kept_groups
    stair = (gnruns[g] == grmax[g] - grmin[g]) & (apart[g] == 0)
    exact, chamfered = _outlines(row, start, end, gfirst[g], gnruns[g], stair,
                                 stair & (corner[g] > 0), (flatrow, breaks, height, width + 1))
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


def _outlines(row, start, end, first, nruns, stair, repair, rows):
    """Exact pixel outlines of groups of runs (a region in one plane), and the same outlines
    chamfered (the base for simplification): two arrays of shapely geometries. ``stair``: one
    run per row, consecutive runs sharing columns or a corner; such a staircase is a simple
    polygon by construction, unless two runs meet only at a corner (``repair``: checked and
    made valid). Any other group is the union of its run rectangles (``rows``: see
    :func:`_run_rectangles`)."""
    exact = np.empty(first.size, dtype=object)
    chamfered = np.empty(first.size, dtype=object)
    steps = np.flatnonzero(stair)
    if steps.size:
        coords, ring = _staircase_rings(row, start, end, first[steps], nruns[steps], 0, 0)
        exact[steps] = shapely.polygons(shapely.linearrings(coords, indices=ring))
        ccoords, cring = _chamfer_rings(coords, ring)
        chamfered[steps] = shapely.polygons(shapely.linearrings(ccoords, indices=cring))
    other = np.flatnonzero(~stair)  # concave rows, holes, parts joined in another plane
    if other.size:
        boxes, owner = _run_rectangles(row, start, end, first[other], nruns[other], *rows)
        cuts = np.flatnonzero(np.diff(owner)) + 1
        unions = np.array([shapely.coverage_union_all(b) for b in np.split(boxes, cuts)],
                          dtype=object)
        # the union leaves vertices on straight edges: removed
        exact[other] = _valid(_map_rings(unions, _corners_only))
        chamfered[other] = _map_rings(exact[other], _chamfer_rings)
    fix = np.flatnonzero(repair)
    if fix.size:
        exact[fix] = _valid(exact[fix])
    return exact, chamfered


def _run_rectangles(row, start, end, first, nruns, flatrow, breaks, height, w1):
    """The rectangles of the runs of several groups (and which group each belongs to), with a
    vertex on their top and bottom edges wherever a run of the row above / below starts or
    ends: rectangles that share an edge then share its vertices, which makes them a coverage,
    united exactly by ``coverage_union_all`` (linear, unlike a general union of boxes)."""
    counts = nruns
    owner = np.repeat(np.arange(first.size), counts)
    idx = np.repeat(first, counts) + np.arange(counts.sum()) - np.repeat(
        np.cumsum(counts) - counts, counts)
    r, s, e, f = row[idx], start[idx], end[idx], flatrow[idx]
    n = idx.size
    # breakpoints strictly inside (s, e) of the row above (dy=-1) and below (dy=+1)
    pieces = []
    for dy, at in ((-1, r), (1, r + 1)):
        lo = np.searchsorted(breaks, (f + dy) * w1 + s, side="right")
        hi = np.searchsorted(breaks, (f + dy) * w1 + e, side="left")
        inside = (r + dy >= 0) & (r + dy < height)
        k = np.where(inside, np.maximum(hi - lo, 0), 0)
        which = np.repeat(np.arange(n), k)
        pos = np.repeat(lo, k) + np.arange(k.sum()) - np.repeat(np.cumsum(k) - k, k)
        x = breaks[pos] - (f[which] + dy) * w1
        # ring order: top edge left to right (between corners 0 and 1), bottom edge right to
        # left (between corners 2 and 3)
        frac = x / (e[which] + 1.0)  # in (0, 1), increasing with x
        pieces.append((which, x, at[which], frac if dy < 0 else 3.0 - frac))
    ids = [np.arange(n)] * 4
    xs = [s, e, e, s]
    ys = [r, r, r + 1, r + 1]
    orders = [np.full(n, 0.0), np.full(n, 1.0), np.full(n, 2.0), np.full(n, 3.0)]
    for which, x, y, order in pieces:
        ids.append(which)
        xs.append(x)
        ys.append(y)
        orders.append(order)
    ids, xs, ys, orders = (np.concatenate(a) for a in (ids, xs, ys, orders))
    sort = np.lexsort((orders, ids))
    coords = np.column_stack([xs[sort], ys[sort]]).astype(np.float64)
    return shapely.polygons(shapely.linearrings(coords, indices=ids[sort])), owner


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


def _corners_only(coords: np.ndarray, ring: np.ndarray):
    """Pixel outlines (open rings, grouped by ``ring``) without the vertices that lie on a
    straight edge (same x or same y as both neighbours)."""
    n = coords.shape[0]
    starts = np.flatnonzero(np.concatenate([[True], ring[1:] != ring[:-1]]))
    ends = np.append(starts[1:], n)
    prev = np.arange(n) - 1
    prev[starts] = ends - 1
    nxt = np.arange(n) + 1
    nxt[ends - 1] = starts
    x, y = coords[:, 0], coords[:, 1]
    straight = ((x[prev] == x) & (x == x[nxt])) | ((y[prev] == y) & (y == y[nxt]))
    return coords[~straight], ring[~straight]


def _map_rings(geoms: np.ndarray, fn) -> np.ndarray:
    """``fn(coords, ring)`` (open rings, grouped by ring) applied to every ring (shells and
    holes) of an array of (Multi)Polygons, which are rebuilt from the results."""
    parts, part_of = shapely.get_parts(geoms, return_index=True)
    rings, ring_of = shapely.get_rings(parts, return_index=True)  # the shell first
    coords, which = shapely.get_coordinates(rings, return_index=True)
    last = np.append(which[1:] != which[:-1], True)  # the closing repeat of each ring
    new, new_ring = fn(coords[~last], which[~last])
    parts = shapely.polygons(shapely.linearrings(new, indices=new_ring), indices=ring_of)
    out = np.empty(geoms.size, dtype=object)
    nparts = np.bincount(part_of, minlength=geoms.size)
    single = nparts[part_of] == 1
    out[part_of[single]] = parts[single]
    multi = np.flatnonzero(nparts > 1)
    if multi.size:
        out[multi] = shapely.multipolygons(parts[~single], indices=np.searchsorted(
            multi, part_of[~single]))
    return out


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
