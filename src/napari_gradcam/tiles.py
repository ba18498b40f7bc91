"""Large images explained tile by tile, with bounded memory.

A slide or a large image (H, W[, C]) is cut into tiles of ``tile`` pixels stepping
``tile - overlap``; the last tile of a row or column lies flush with the image's edge (MONAI's
sliding window), and a side smaller than the tile is one tile of the image's size. Tiles are
read from the (lazy) image on a helper thread while the previous batch runs, and go through the
job's :class:`~napari_gradcam.explain_arrays.Runner` in its batch size (halved on out-of-memory
errors, as for whole images).

Why the heat of a tiled image is comparable across the image:

- every tile is explained for the same class: the one given, or (target None) the class the
  model predicts for the whole image, the argmax of the tiles' logits averaged with each tile's
  area as weight (a forward-only pass over the tiles first, which costs one inference; giving
  the class skips it). A segmentation model's class is the one predicted over the largest area;
- a tile's map is the method's map *before* the engine's per-map min-max scaling (ReLU'd and
  upsampled to the tile), weighted by a Gaussian window (sigma 0.125 x the tile's side, floored
  so that the image's own edges still count), blended as sum of weighted maps / sum of weights,
  and scaled to [0, 1] once over the whole image, never per tile.

Memory: only one band of tile rows (tile rows x the image's width) is accumulated, on the
model's device; rows that no later tile touches are written to the output (NumPy or zarr) as
soon as their band is done, the blended map's minimum and maximum kept on the way, and a last
pass scales the output in chunks of rows. The window is separable and the tiles lie on a grid,
so the sum of weights is an outer product of two 1-D sums and needs no accumulator of its own.

A model with a fixed ``input_size`` sees every tile resized to it by the usual preprocessing
(its default tile is then its input size, so nothing is resized); a native-size model sees the
tiles as they are, and a tile smaller than it can take is refused with the smallest tile that
works. Tiles are 2-D: a 3D model explains its volumes whole.

With an ``out`` that keeps attributes (a zarr group or array) and a ``resume_key``, the progress
(bands done, running minimum and maximum, class, scores, phase) is stored in its attributes
after every band written, and a rerun with the same key continues after the last band written
(the band before it is run again, without being written, for the rows it shares with the next).
"""

from __future__ import annotations

import contextlib
import math
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch

from .cam._state import explaining
from .cam.engine import _model_output
from .cam.segmentation import resolve_multilabel
from .explain_arrays import _SKIP_SIZES, Progress, pad_sides, size_multiple

DEFAULT_TILE = 512
DEFAULT_OVERLAP = 64
_WINDOW_FLOOR = 1e-3  # per axis: a tile's edge keeps this weight, so the image's edges count
_PROGRESS = "napari_gradcam_tiles"  # the attribute that holds a resumable run's progress
_MAX_PROBE_SIDE = 4096


class Tiling(NamedTuple):
    """Tile and overlap in pixels, (rows, cols) each."""

    tile: tuple[int, int]
    overlap: tuple[int, int]


def _pair(value, name: str) -> tuple[int, int]:
    def whole(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))

    if whole(value):
        return int(value), int(value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(whole(v) for v in value):
        return int(value[0]), int(value[1])
    raise TypeError(f"{name}={value!r}: give a whole number of pixels, or (rows, cols) of them, "
                    f"e.g. {name}={DEFAULT_TILE if name == 'tile' else DEFAULT_OVERLAP}.")


def check_tiling(tile, overlap=DEFAULT_OVERLAP) -> Tiling:
    """``tile`` and ``overlap`` (a whole number, or (rows, cols)) as a :class:`Tiling`;
    TypeError for non-integers, ValueError for a tile under 1 pixel, a negative overlap or an
    overlap not smaller than the tile (the tiles would not advance)."""
    t, o = _pair(tile, "tile"), _pair(overlap, "overlap")
    if min(t) < 1:
        raise ValueError(f"tile={tile!r}: a tile needs at least 1 pixel per side; give a "
                         f"positive size, e.g. tile={DEFAULT_TILE}.")
    if min(o) < 0:
        raise ValueError(f"overlap={overlap!r}: an overlap can't be negative; give 0 or more "
                         f"pixels, e.g. overlap={DEFAULT_OVERLAP}.")
    if o[0] >= t[0] or o[1] >= t[1]:
        raise ValueError(f"overlap={overlap!r} is not smaller than tile={tile!r}, so the tiles "
                         f"would not advance; give an overlap below the tile, e.g. "
                         f"overlap={min(t) // 8}.")
    return Tiling(t, o)


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    step = tile - overlap
    return list(range(0, size - tile, step)) + [size - tile]


def tile_size(spatial, tiling: Tiling) -> tuple[int, int]:
    """The tiles' size in an image of ``spatial`` (H, W): the tile, or the image's side where
    the image is smaller."""
    return min(int(spatial[0]), tiling.tile[0]), min(int(spatial[1]), tiling.tile[1])


def tile_origins(spatial, tiling: Tiling) -> list[tuple[int, int]]:
    """Top-left corners of the tiles covering an image of ``spatial`` (H, W), row by row: the
    tiles step ``tile - overlap``, the last of a row / column lies flush with the edge, and a
    side smaller than the tile is one tile of that side."""
    rows = _starts(int(spatial[0]), *_axis(tiling, 0))
    cols = _starts(int(spatial[1]), *_axis(tiling, 1))
    return [(r, c) for r in rows for c in cols]


def _axis(tiling: Tiling, axis: int) -> tuple[int, int]:
    return tiling.tile[axis], tiling.overlap[axis]


def _window_1d(n: int, sigma_scale: float) -> np.ndarray:
    sigma = max(sigma_scale * n, 1e-3)
    x = np.arange(n, dtype=np.float64) - (n - 1) / 2
    return np.maximum(np.exp(-0.5 * (x / sigma) ** 2), _WINDOW_FLOOR)


def blend_window(tile, sigma_scale: float = 0.125) -> np.ndarray:
    """The weight of each pixel of a tile (rows, cols) when tiles are blended, float32: a
    Gaussian centred on the tile, sigma ``sigma_scale`` x each side (MONAI's default), floored
    at a small positive value so that pixels at a tile's edge (the image's edge has no other
    tile) still count. Separable: the outer product of two 1-D windows."""
    rows, cols = _pair(tile, "tile")
    return np.outer(_window_1d(rows, sigma_scale),
                    _window_1d(cols, sigma_scale)).astype(np.float32)


def _weight_sum(size: int, tile: int, starts: list[int]) -> np.ndarray:
    """Sum of the 1-D windows of every tile over one axis of the image."""
    w = _window_1d(tile, 0.125)
    total = np.zeros(size, np.float64)
    for s in starts:
        total[s:s + tile] += w
    return total


def default_tile(spec) -> tuple[int, int]:
    """A model's tile: its input size when it has a 2-D one (tiles then go in unresized),
    else :data:`DEFAULT_TILE`."""
    size = getattr(spec, "input_size", None)
    if size is not None and len(size) == 2:
        return int(size[0]), int(size[1])
    return DEFAULT_TILE, DEFAULT_TILE


def _default_overlap(tile) -> tuple[int, int]:
    return tuple(min(DEFAULT_OVERLAP, t // 4) for t in tile)


def auto_tiling(spatial, channels, dtype, spec, device, *, whole_slide=False,
                overlap=None) -> Tiling | None:
    """The default rule ("auto"): a :class:`Tiling` when the image of ``spatial`` (H, W) should
    be tiled, else None. Tiled when the whole image would not fit in memory (the host's, or a
    CUDA device's for the model), or, for a pyramid level / multiscale layer
    (``whole_slide=True``), when it is larger than the model's input size along a side
    (native-size models: than :data:`DEFAULT_TILE`). 3D models are never tiled."""
    from .explain_arrays import model_spatial_dims
    from .memory import available_device_memory, available_host_memory, estimate, refusal

    if len(spatial) != 2 or model_spatial_dims(spec.module) != 2:
        return None
    tile = default_tile(spec)
    over = _default_overlap(tile) if overlap is None else _pair(overlap, "overlap")
    if any(o >= t for o, t in zip(over, tile)):  # clamped, the tiles would step 1 pixel
        raise ValueError(f"overlap={overlap!r} is not smaller than the tile chosen for this "
                         f"model ({tile[0]} x {tile[1]} pixels); give an overlap below it, "
                         f"e.g. overlap={min(tile) // 8}, or a tile size.")
    if whole_slide and (spatial[0] > tile[0] or spatial[1] > tile[1]):
        return Tiling(tile, over)
    from .explain_arrays import Layout

    shape = (*spatial, int(channels))
    lay = Layout(shape, 2, 2)
    need = estimate(shape, dtype, lay, spec.in_channels, spec.input_size)
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if refusal(need, available_host_memory(), available_device_memory(dev)) is None:
        return None
    if spatial[0] <= tile[0] and spatial[1] <= tile[1]:
        return None  # one tile would be the whole image: nothing to gain
    return Tiling(tile, over)


def _is_auto(tile) -> bool:
    """Whether ``tile`` is the word "auto"; any other word is refused."""
    if not isinstance(tile, str):
        return False
    if tile.strip().lower() != "auto":
        raise ValueError(f"tile={tile!r}: give 'auto', None (never tile), or a size in "
                         "pixels such as 512.")
    return True


def resolve_tiling(tile, overlap, spatial, channels, dtype, spec, device,
                   whole_slide=False) -> Tiling | None:
    """The tiling an image gets: ``tile`` None never tiles, "auto" follows
    :func:`auto_tiling`, a size tiles images larger than one tile (an image that fits in one
    tile is explained whole, which is the same)."""
    if tile is None:
        return None
    if _is_auto(tile):
        return auto_tiling(spatial, channels, dtype, spec, device, whole_slide=whole_slide,
                           overlap=None if overlap == DEFAULT_OVERLAP else overlap)
    tiling = check_tiling(tile, overlap)
    if len(spatial) != 2 or (spatial[0] <= tiling.tile[0] and spatial[1] <= tiling.tile[1]):
        return None
    return tiling


def check_tile_option(tile, overlap, dims: int, found: bool = False):
    """Fail on a bad ``tile`` / ``overlap`` before any image is read: a size checked with
    :func:`check_tiling`, refused for a 3D model (tiles are 2-D) and for the target "found"
    (tiles need one class for the whole image)."""
    if tile is None:
        return None
    if _is_auto(tile):
        if min(_pair(overlap, "overlap")) < 0:
            check_tiling(DEFAULT_TILE, overlap)
        return "auto"
    if dims != 2:
        raise ValueError(f"tile={tile!r}: tiles are 2-D and this model explains 3-D volumes "
                         "whole; leave tile out (tile=None), or use a 2-D model.")
    tiling = check_tiling(tile, overlap)
    if found:
        raise ValueError("target 'found' explains every class found in each image, but a tiled "
                         "image needs one class for all its tiles; give one class (or None for "
                         "the class predicted over the whole image), or tile=None.")
    return tiling


def check_tile_mask(mask, lead: tuple, spatial: tuple) -> None:
    """Refuse a segmentation target mask that can't be cut into the tiles: it must have the
    images' spatial shape or their whole shape (it is cut per tile, never resized)."""
    if mask is None or tuple(mask.shape) in (spatial, lead + spatial):
        return
    raise ValueError(f"the target mask has shape {tuple(mask.shape)}; give the images' spatial "
                     f"shape {spatial}" + (f" or their whole shape {lead + spatial}." if lead
                                           else "."))


# ---- reading ------------------------------------------------------------------------------------

def _read_slab(images, lay, index: tuple, rows: slice, cols: slice) -> np.ndarray:
    """Pixels rows x cols of the image at leading ``index`` as (h, w, channels)."""
    key = list(index) + [rows, cols]
    ca = lay.channel_axis
    if ca is not None:
        key.insert(ca, slice(None))
    a = np.asarray(images[tuple(key)])
    if ca is None:
        return a[..., None]
    return np.moveaxis(a, ca - len(index), -1)


def read_tiles(images, lay, index: tuple, origins, size) -> np.ndarray:
    """Tiles of ``size`` (rows, cols) at ``origins`` of the image at leading ``index``, as
    (n, rows, cols, channels); the tiles of one row of origins are cut from one read."""
    th, tw = size
    out = None
    by_row: dict = {}
    for i, (r, c) in enumerate(origins):
        by_row.setdefault(r, []).append((i, c))
    for r, items in by_row.items():
        c0 = min(c for _i, c in items)
        c1 = max(c for _i, c in items) + tw
        slab = _read_slab(images, lay, index, slice(r, r + th), slice(c0, c1))
        if out is None:
            out = np.empty((len(origins), th, tw, slab.shape[-1]), slab.dtype)
        for i, c in items:
            out[i] = slab[:, c - c0:c - c0 + tw]
    return out


def _intensity_limits(images, lay, index, spec, rows: int) -> tuple[float, float] | None:
    """The whole image's (low, high) for a model whose intensity is "minmax", read in bands of
    ``rows`` rows (bounded memory); None for other models. Each tile scaled by its own range
    would see a faint tile as bright as the brightest, and its heat would not compare with its
    neighbours'. NaN pixels are left out; the channels kept are the ones the model is fed."""
    from .models.spec import normalise_intensity

    if normalise_intensity(spec.intensity) != "minmax":
        return None
    height, width = (int(s) for s in lay.spatial)
    lo, hi = math.inf, -math.inf
    for r0 in range(0, height, max(1, rows)):
        slab = _read_slab(images, lay, index, slice(r0, min(height, r0 + rows)),
                          slice(0, width))
        c, m = slab.shape[-1], spec.in_channels
        if c == 3 and m == 1:
            slab = slab[..., :1]
        elif c == 4 and m == 3:
            slab = slab[..., :3]
        slab = slab.astype(np.float64) if slab.dtype == np.bool_ else slab
        finite = slab[np.isfinite(slab)] if slab.dtype.kind == "f" else slab
        if finite.size:
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
    return (lo, hi) if lo <= hi else None


def _batches(images, lay, index, origins, size, runner, first: int = 0):
    """(position, origins, raw tiles) batch by batch from ``first`` on, the next batch read on a
    helper thread; the batch size follows the runner's (it may shrink after out-of-memory)."""
    n = len(origins)
    pool = ThreadPoolExecutor(1, thread_name_prefix="napari-gradcam-tiles")
    try:
        pos = first
        step = runner.size_for(size, n)
        pending = pool.submit(read_tiles, images, lay, index, origins[pos:pos + step], size)
        while pos < n:
            raw = pending.result()
            stop = pos + raw.shape[0]
            if stop < n:
                pending = pool.submit(read_tiles, images, lay, index,
                                      origins[stop:stop + runner.batch_size], size)
            yield pos, origins[pos:stop], raw
            pos = stop
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


# ---- the model on tiles -------------------------------------------------------------------------

def check_tile_fits(runner, size) -> None:
    """Raise a ValueError when tiles of ``size`` are smaller than the (native-size) model can
    take, naming the smallest square tile that works: found by blank forwards at the tile
    size, then doubling. Models with an input size see every tile resized, so they pass."""
    spec = runner.spec
    if spec.input_size is not None:
        return
    size = tuple(int(s) for s in size)
    seen = runner.__dict__.setdefault("_tiles_ok", set())
    if size in seen:
        return
    module = spec.module
    ref = next(iter(module.parameters()), None)
    dev = ref.device if ref is not None else runner.device

    def runs(shape) -> bool:
        x = torch.zeros((int(runner.fixed or 1), spec.in_channels, *shape), device=dev)
        try:
            with torch.inference_mode(), explaining(module):
                module(pad_sides(x, runner.multiple))
        except Exception as err:  # noqa: BLE001 - any failure: maybe a U-Net needing padding
            return bool(_SKIP_SIZES.search(str(err))) and size_multiple(module, x) is not None
        return True

    if runs(size):
        seen.add(size)
        return
    side = max(size)
    while side <= _MAX_PROBE_SIDE and not runs((side, side)):
        side *= 2
    if side > _MAX_PROBE_SIDE:
        raise ValueError(f"this model fails on blank tiles of {size[0]} x {size[1]} pixels and "
                         f"on larger ones up to {_MAX_PROBE_SIDE}; check that the model runs "
                         "on images of that size, or explain the image with tile=None.")
    raise ValueError(f"tiles of {size[0]} x {size[1]} pixels are smaller than this model can "
                     f"take (it runs on tiles of {side} x {side}); give tile={side} or larger "
                     "(and an overlap below it).")


def tile_logits(runner, batch: torch.Tensor) -> torch.Tensor:
    """The model's output for a prepared batch without a graph, in the runner's parts (its
    out-of-memory back-off): (n, classes) for a classifier, (n, classes, *spatial) for a
    segmentation model. The forward-only work that the tiles' class is decided from."""

    def work(pos: int, n: int):
        part, module, _layer = runner._input(batch[pos:pos + n])
        with torch.inference_mode(), explaining(module):
            out = _model_output(module(part))
        if out is None:
            raise ValueError("can't find the class scores in the model's output; return a "
                             "tensor (N, classes), or a dict with a 'logits' entry.")
        return (out[:, None] if out.ndim == 1 else out)[:n].float()

    return torch.cat(runner._each_part(batch, runner.size_for(batch.shape[2:], batch.shape[0]),
                                       work))


def _class_evidence(runner, logits: torch.Tensor) -> torch.Tensor:
    """What the whole image's class is decided from, summed over a batch of tiles: a
    classifier's logits (every tile has the same area), a segmentation model's predicted
    pixels of each class (each class on its own for a multi-label head; the argmax otherwise,
    the background then not counting)."""
    logits = logits[torch.isfinite(logits.flatten(1)).all(1)]  # tiles with NaN pixels: no say
    if logits.ndim == 2:
        return logits.sum(0).double()
    classes = logits.shape[1]
    if resolve_multilabel(logits, runner.multilabel):
        return (logits > 0).flatten(2).sum((0, 2)).double()
    counts = torch.bincount(logits.argmax(1).flatten(), minlength=classes).double()
    if classes > 1:
        counts[0] = 0  # the background (class 0 of a softmax head) is no answer
    return counts


class TiledImage(NamedTuple):
    """One image explained in tiles."""

    class_id: int
    score: float  # the first method's area-weighted mean tile score
    logits: np.ndarray | None  # a classifier's area-weighted mean tile logits
    tiles_run: int  # tiles put through the model (a resumed run counts only its own)


class _Writer:
    """Rows written to the output on a helper thread (a zarr write compresses and stores while
    the next band runs), at most one write pending; progress is stored after the rows."""

    def __init__(self, threaded: bool):
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="napari-gradcam-write") \
            if threaded else None
        self.pending = None

    def submit(self, fn, *args):
        if self.pool is None:
            fn(*args)
            return
        self.wait()
        self.pending = self.pool.submit(fn, *args)

    def wait(self):
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def close(self):
        try:
            self.wait()
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True)


def _store_of(outs: dict):
    """Where a resumable run keeps its progress: the zarr group holding the outputs, else the
    first output's own attributes; None when the outputs keep none (NumPy)."""
    first = next(iter(outs.values()))
    store = getattr(first, "_napari_gradcam_group", None)
    if store is not None:
        return store
    return first if hasattr(first, "attrs") else None


def _write_rows(out, index, r0, r1, rows):
    out[tuple(index) + (slice(r0, r1), slice(None))] = rows


def iter_tiled(runner, methods, images, lay, tiling: Tiling, outs: dict, *, target=None,
               segmentation=False, target_mask=None, resume_key=None, store=None):
    """Explain every image of ``images`` (layout ``lay``) in tiles, writing each method's
    blended heat, scaled to [0, 1] over the image, into ``outs[method]`` ((*lead, H, W),
    NumPy or zarr). Yields a :class:`Progress` per batch of tiles (``done`` counts the tile
    forwards of both passes where the class is decided first); returns a list of
    :class:`TiledImage`, one per image in flat order. ``target``: a class index, or None for
    the class predicted over each whole image. ``target_mask``: a segmentation model's region
    (H, W) or (*lead, H, W), cut per tile. ``store``: where a resumable run keeps its progress
    (default: the outputs' zarr group, or the first output's attributes)."""
    spatial = tuple(int(s) for s in lay.spatial)
    size = tile_size(spatial, tiling)
    check_tile_fits(runner, size)
    origins = tile_origins(spatial, tiling)
    row_starts = sorted({r for r, _c in origins})
    col_starts = sorted({c for _r, c in origins})
    n_images = lay.count if lay.lead else 1
    passes = 1 if target is not None else 2
    total = passes * len(origins) * n_images
    label = "+".join(methods)
    store = _store_of(outs) if store is None and resume_key is not None else store
    state = _load_progress(store, resume_key, tiling, spatial, methods, n_images)
    wr = torch.as_tensor(_weight_sum(spatial[0], size[0], row_starts), dtype=torch.float32,
                         device=runner.device)
    wc = torch.as_tensor(_weight_sum(spatial[1], size[1], col_starts), dtype=torch.float32,
                         device=runner.device)
    window = torch.as_tensor(blend_window(size), device=runner.device)
    zarr_like = any(not isinstance(o, np.ndarray) for o in outs.values())
    results = []
    done = 0
    for k in range(n_images):
        index = tuple(int(i) for i in np.unravel_index(k, lay.lead)) if lay.lead else ()
        mine = state["images"].setdefault(str(k), {"phase": "class"})
        if mine["phase"] == "finished":
            results.append(TiledImage(mine["class"], mine["score"],
                                      None if mine.get("logits") is None
                                      else np.asarray(mine["logits"], np.float32), 0))
            done += passes * len(origins)
            continue
        ran = 0
        if "limits" not in mine:
            limits = _intensity_limits(images, lay, index, runner.spec, size[0])
            mine["limits"] = None if limits is None else list(limits)
        limits = mine["limits"]
        # pass 1: the class for the whole image
        if mine["phase"] == "class":
            if target is None:
                evidence = None
                with contextlib.closing(_batches(images, lay, index, origins, size,
                                                 runner)) as batches:
                    for _pos, _org, raw in batches:
                        batch = runner.prepare(raw, limits)
                        ev = _class_evidence(runner, tile_logits(runner, batch))
                        evidence = ev if evidence is None else evidence + ev
                        ran += raw.shape[0]
                        done += raw.shape[0]
                        yield Progress(done, total, "class", runner.batch_size)
                mine["class"] = int(torch.argmax(evidence).item())
            else:
                mine["class"] = int(target)
            mine.update(phase="explain", bands=0, lo=math.inf, hi=-math.inf, score_sum=0.0,
                        logit_sum=None, logit_tiles=0, tiles=0)
            _save_progress(store, resume_key, state)
        elif target is None:
            done += len(origins)
        class_id = int(mine["class"])
        # pass 2: the methods' maps, blended band by band
        if mine["phase"] == "explain":
            writer = _Writer(zarr_like)
            try:
                for info in _explain_bands(runner, methods, images, lay, index, origins, size,
                                           row_starts, spatial, class_id, segmentation,
                                           target_mask, outs, writer, mine, wr, wc, window,
                                           store, resume_key, state):
                    ran += info
                    done += info
                    yield Progress(done, total, label, runner.batch_size)
                writer.wait()
            finally:
                writer.close()
            mine["phase"] = "normalise"
            mine["rows"] = 0
            _save_progress(store, resume_key, state)
        else:
            done += len(origins)
        if mine["phase"] == "normalise":
            _normalise(outs, index, spatial, mine, store, resume_key, state, size[0])
            mine["phase"] = "finished"
            tiles = max(1, mine["tiles"])
            mine["score"] = float(mine["score_sum"] / tiles)
            if mine.get("logit_sum") is not None and mine["logit_tiles"]:
                mine["logits"] = [float(v) / mine["logit_tiles"] for v in mine["logit_sum"]]
            _save_progress(store, resume_key, state)
        logits = mine.get("logits")
        results.append(TiledImage(class_id, float(mine["score"]),
                                  None if logits is None else np.asarray(logits, np.float32),
                                  ran))
    return results


def _explain_bands(runner, methods, images, lay, index, origins, size, row_starts, spatial,
                   class_id, segmentation, target_mask, outs, writer, mine, wr, wc, window,
                   store, resume_key, state):
    """The explain pass over one image: yields the tiles done per batch. The accumulator holds
    rows [base, base + tile rows) of every method on the device; moving to the next band
    writes the rows before it (no later tile reaches them)."""
    th, tw = size
    height, width = spatial
    dev = runner.device
    bands_done = int(mine["bands"])
    # a resumed run starts early: the tiles of every written band that reach the first row
    # still to write are needed again (not written, not counted) for the rows they share with
    # it; with an overlap over half the tile, or a last band flush with the edge close to the
    # one before, that is more than one band
    first_band = _first_band_to_rerun(row_starts, bands_done, th)
    first = next(i for i, (r, _c) in enumerate(origins) if r == row_starts[first_band])
    acc = torch.zeros((len(methods), th, width), dtype=torch.float32, device=dev)
    band = first_band
    base = row_starts[band]
    window = window.to(dev)

    def flush(upto: int, write: bool):
        """Rows [base, upto) are final: blend, write (when ``write``), shift the rest up."""
        nonlocal acc, base
        d = upto - base
        if d <= 0:
            return
        if write:
            heat = acc[:, :d] / (wr[base:upto, None] * wc[None, :])
            mine["lo"] = min(mine["lo"], float(heat.amin()))
            mine["hi"] = max(mine["hi"], float(heat.amax()))
            rows = heat.cpu().numpy()
            for m, method in enumerate(methods):
                writer.submit(_write_rows, outs[method], index, base, upto, rows[m])
        acc = torch.cat([acc[:, d:], torch.zeros((len(methods), d, width), dtype=acc.dtype,
                                                 device=dev)], 1)
        base = upto

    def finish_band(next_base: int):
        nonlocal band
        write = band >= bands_done
        flush(next_base, write)
        band += 1
        if write:
            mine["bands"] = band
            snapshot = _snapshot(state)
            writer.submit(_save_progress, store, resume_key, snapshot)

    with contextlib.closing(_batches(images, lay, index, origins, size, runner, first)) as it:
        for _pos, org, raw in it:
            batch = runner.prepare(raw, mine.get("limits"))
            count = [r >= row_starts[bands_done] if bands_done < len(row_starts) else False
                     for r, _c in org]
            masks = None
            if target_mask is not None:
                tm = np.asarray(target_mask)
                tm = tm[index] if tm.ndim > 2 else tm
                masks = np.stack([tm[r:r + th, c:c + tw] for r, c in org])
            store_logits: list = []
            maps = []
            for m, method in enumerate(methods):
                chosen = class_id
                if m == 0 and not segmentation:
                    def chosen(logits, _store=store_logits):
                        _store.append(logits.detach().float())
                        return class_id
                heat, _ids, scores = runner.explain(batch, size, method, chosen, masks,
                                                    normalize=False, as_tensor=True)
                maps.append(heat)
                if m == 0:
                    tile_scores = scores
                    every = torch.cat(store_logits) if store_logits else None
                    every = (every.double().cpu().numpy()
                             if every is not None and every.shape[0] == len(org) else None)
            # a tile with NaN pixels has no finite map (as a whole image with NaN has none):
            # it adds no heat, instead of making the image's range NaN and so all its heat 0
            stacked = torch.nan_to_num(torch.stack(maps, 1), nan=0.0, posinf=0.0,
                                       neginf=0.0) * window  # (n, methods, th, tw)
            for i, (r, c) in enumerate(org):
                while r > base:  # a new band: the rows above it are final
                    finish_band(r)
                acc[:, r - base:r - base + th, c:c + tw] += stacked[i]
                # counted with its band, so a stored band holds its own tiles; a tile without
                # a finite score (NaN pixels) counts towards neither mean
                if count[i] and np.isfinite(tile_scores[i]):
                    mine["score_sum"] += float(tile_scores[i])
                    mine["tiles"] += 1
                    if every is not None and np.isfinite(every[i]).all():
                        prev = mine.get("logit_sum")
                        mine["logit_sum"] = (every[i] if prev is None
                                             else np.asarray(prev) + every[i]).tolist()
                        mine["logit_tiles"] += 1
            yield len(org)
    finish_band(height)


def _first_band_to_rerun(row_starts, bands_done: int, tile_rows: int) -> int:
    """The first band a run resumed after ``bands_done`` written bands starts from: the
    earliest band whose tiles reach the first unwritten row."""
    if bands_done <= 0:
        return 0
    if bands_done >= len(row_starts):
        return len(row_starts) - 1  # every band written: only the last flush is left
    first_row = row_starts[bands_done]
    return next(b for b in range(bands_done + 1) if row_starts[b] + tile_rows > first_row)


def _snapshot(state: dict) -> dict:
    import copy

    return copy.deepcopy(state)


def _normalise(outs, index, spatial, mine, store, resume_key, state, chunk_rows):
    """Scale the written heat to [0, 1] with the image's minimum and maximum, in chunks of
    rows (bounded memory); a flat map becomes zeros. Progress kept per chunk."""
    lo, hi = float(mine["lo"]), float(mine["hi"])
    span = hi - lo
    flat = not (math.isfinite(span) and span > max(abs(hi), abs(lo)) * 1e-6)
    height = spatial[0]
    step = max(1, chunk_rows)
    for out in outs.values():
        chunks = getattr(out, "chunks", None)
        if chunks:
            step = max(step, int(chunks[-2]))
    resumable = store is not None and resume_key is not None
    # scaling rows in place is not repeatable: a run stopped while writing a chunk (Ctrl-C)
    # would scale part of it twice when resumed. A resumable run in a zarr group keeps each
    # chunk's unscaled rows in a scratch array first, and a resumed run scales from there.
    scratch = _scratch(store, outs, step, spatial[1]) if resumable and not flat else None
    r0 = int(mine.get("rows", 0))
    while r0 < height:
        r1 = min(height, r0 + step)
        keep = scratch is not None and mine.get("scaling") != r0
        for method, out in outs.items():
            key = tuple(index) + (slice(r0, r1), slice(None))
            if flat:
                out[key] = 0
            elif scratch is None:
                rows = np.asarray(out[key], np.float32)
                out[key] = np.clip((rows - lo) / span, 0, 1)
            elif keep:
                scratch[method][:r1 - r0] = out[key]
        if keep:
            mine["scaling"] = r0  # the chunk's unscaled rows are in the scratch arrays
            _save_progress(store, resume_key, state)
        if scratch is not None:
            for method, out in outs.items():
                rows = np.asarray(scratch[method][:r1 - r0], np.float32)
                out[tuple(index) + (slice(r0, r1), slice(None))] = np.clip((rows - lo) / span,
                                                                         0, 1)
        r0 = r1
        mine["rows"] = r0
        mine["scaling"] = None
        if resumable:
            _save_progress(store, resume_key, state)
    if scratch is not None:
        with contextlib.suppress(Exception):
            del store[_SCRATCH]


_SCRATCH = "napari_gradcam_unscaled"  # a resumable run's scratch rows while it scales


def _scratch(store, outs, rows: int, width: int):
    """Arrays (rows, width) per method in a group ``_SCRATCH`` of the zarr group ``store``
    (kept as they are when they exist, for a resumed run); None when ``store`` is not a
    group."""
    if not _is_zarr_group(store):
        return None
    group = store.require_group(_SCRATCH)
    arrays = {}
    for method in outs:
        a = group.get(method) if method in group else None
        if a is None or tuple(a.shape) != (rows, width):
            a = _new_heat_array(group, method, (rows, width), (rows, min(width, 4 * rows)))
        arrays[method] = a
    return arrays


def _load_progress(store, resume_key, tiling, spatial, methods, n_images) -> dict:
    """The stored progress of a run with the same key and settings, else a fresh one."""
    fresh = {"key": resume_key, "tiling": [list(tiling.tile), list(tiling.overlap)],
             "shape": list(spatial), "methods": list(methods), "count": n_images,
             "images": {}}
    if store is None or resume_key is None:
        return fresh
    try:
        old = dict(store.attrs).get(_PROGRESS)
    except Exception:  # noqa: BLE001 - unreadable attributes: start over
        return fresh
    same = (isinstance(old, dict) and
            all(old.get(k) == v for k, v in fresh.items() if k != "images"))
    return _revive(old) if same else fresh


def _revive(old: dict) -> dict:
    state = dict(old)
    state["images"] = {k: dict(v) for k, v in old.get("images", {}).items()}
    for v in state["images"].values():
        for key in ("lo", "hi"):
            if key in v and v[key] is None:
                v[key] = math.inf if key == "lo" else -math.inf
    return state


def _jsonable(state: dict) -> dict:
    out = dict(state)
    images = {}
    for k, v in state["images"].items():
        v = dict(v)
        for key in ("lo", "hi"):
            if key in v and not math.isfinite(v[key]):
                v[key] = None
        images[k] = v
    out["images"] = images
    return out


def _save_progress(store, resume_key, state) -> None:
    if store is None or resume_key is None:
        return
    store.attrs[_PROGRESS] = _jsonable(state)


def clear_progress(store) -> None:
    """Forget a resumable run's progress (the outputs stay)."""
    with contextlib.suppress(Exception):
        del store.attrs[_PROGRESS]


# ---- outputs ------------------------------------------------------------------------------------

def open_outputs(out, methods, shape, tile_rows: int = DEFAULT_TILE):
    """Writable float32 arrays of ``shape`` (*lead, H, W), one per method, from ``out``: None
    (NumPy when it fits in memory, else zarr arrays in a temporary folder), a path of a zarr
    group (arrays named by the method, made or replaced when their shape differs), a zarr
    group, a dict method -> array, or (one method) one array. Returns (arrays, group or None,
    keep-alive object or None)."""
    shape = tuple(int(s) for s in shape)
    if out is None:
        from .memory import available_host_memory

        need = 4 * math.prod(shape) * len(methods) * 2  # the heat, and the regions' copy
        room = available_host_memory()
        if room is None or need < room // 2:
            return {m: np.zeros(shape, np.float32) for m in methods}, None, None
        import tempfile

        folder = tempfile.TemporaryDirectory(prefix="napari-gradcam-heat-")
        arrays, group, _ = open_outputs(folder.name, methods, shape, tile_rows)
        return arrays, group, folder
    if isinstance(out, dict):
        missing = [m for m in methods if m not in out]
        if missing:
            raise ValueError(f"out has no array for {missing}; give one per method "
                             f"({methods}).")
        for m in methods:
            _check_out_shape(out[m], shape, m)
        return {m: out[m] for m in methods}, None, None
    import os

    if isinstance(out, (str, os.PathLike)) or _is_zarr_group(out):
        import zarr

        group = zarr.open_group(str(out), mode="a") if not _is_zarr_group(out) else out
        chunks = (1,) * (len(shape) - 2) + (min(shape[-2], tile_rows),
                                            min(shape[-1], 4 * tile_rows))
        arrays = {}
        for m in methods:
            a = group.get(m) if m in group else None
            if a is None or tuple(a.shape) != shape or a.dtype != np.float32:
                a = _new_heat_array(group, m, shape, chunks)
            arrays[m] = a
        return arrays, group, None
    if len(methods) == 1 and hasattr(out, "shape") and hasattr(out, "__setitem__"):
        _check_out_shape(out, shape, methods[0])
        return {methods[0]: out}, None, None
    raise TypeError(f"out={type(out).__name__}: give None, a zarr group or its path, a "
                    "dict method -> array, or (one method) an array of the heat's shape.")


def _new_heat_array(group, name: str, shape, chunks):
    """A float32 heat array in ``group``, compressed with Blosc-LZ4 (level 1, bit shuffle):
    the heat is written once band by band and read back once to scale it, and beside the
    model that I/O is the tiled run's main extra cost; zarr's default codec (zstd) takes
    about twice as long both ways on a 20,000^2 slide."""
    import numcodecs

    fast = numcodecs.Blosc(cname="lz4", clevel=1, shuffle=numcodecs.Blosc.BITSHUFFLE)
    if not hasattr(group, "create_array"):  # zarr 2
        return group.create(name, shape=shape, dtype="float32", chunks=chunks,
                            fill_value=0.0, overwrite=True, compressor=fast)
    if getattr(getattr(group, "metadata", None), "zarr_format", 3) == 2:
        codec = fast
    else:
        from zarr.codecs import BloscCodec

        codec = BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle")
    return group.create_array(name, shape=shape, dtype="float32", chunks=chunks,
                              fill_value=0.0, overwrite=True, compressors=codec)


def _is_zarr_group(obj) -> bool:
    try:
        import zarr
    except ImportError:  # pragma: no cover - zarr is a dependency
        return False
    return isinstance(obj, zarr.Group)


def _check_out_shape(a, shape, method) -> None:
    if tuple(getattr(a, "shape", ())) != shape:
        raise ValueError(f"out for {method!r} has shape {tuple(getattr(a, 'shape', ()))}; it "
                         f"must be the heat's shape {shape} (float32).")


# ---- lazy views for results ---------------------------------------------------------------------

class SlotAxis:
    """An array (*lead, H, W) seen as (*lead, 1, H, W) without reading it: a tiled result's
    one-target maps in the per-target layout. ``base`` is the array itself."""

    def __init__(self, base, lead: int):
        self.base, self.lead = base, lead
        s = tuple(base.shape)
        self.shape = s[:lead] + (1,) + s[lead:]
        self.dtype = np.dtype(base.dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        if len(key) > self.lead and isinstance(key[self.lead], (int, np.integer)):
            if int(key[self.lead]) not in (0, -1):
                raise IndexError(f"index {key[self.lead]} is out of range for one target")
            return self.base[key[:self.lead] + key[self.lead + 1:]]
        return np.asarray(self)[key]

    def __array__(self, dtype=None, copy=None):
        a = np.expand_dims(np.asarray(self.base), self.lead)
        return a if dtype is None else a.astype(dtype)


class MaskedHeat:
    """A heat array times a mask (> 0), read band by band: a tiled result's heat shown with a
    mask (mask_mode "multiply") without reading the whole heat."""

    def __init__(self, heat, mask):
        self.heat = heat
        self.mask = np.asarray(mask) > 0
        self.shape = tuple(heat.shape)
        self.dtype = np.dtype(np.float32)
        self.ndim = len(self.shape)

    def __getitem__(self, key):
        full = np.broadcast_to(self.mask, self.shape)
        return np.asarray(self.heat[key], np.float32) * full[key]

    def __array__(self, dtype=None, copy=None):
        a = np.asarray(self.heat, np.float32) * self.mask
        return a if dtype is None else a.astype(dtype)


__all__ = ["DEFAULT_OVERLAP", "DEFAULT_TILE", "TiledImage", "Tiling", "auto_tiling",
           "blend_window", "check_tile_fits", "check_tiling", "default_tile", "iter_tiled",
           "open_outputs", "read_tiles", "resolve_tiling", "tile_logits", "tile_origins",
           "tile_size"]
