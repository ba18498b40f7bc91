"""Slides and large images: one input explained in tiles, with bounded memory, resumably.

A slide (SVS, OME-TIFF, a pyramidal TIFF, an OME-Zarr folder) is explained at one pyramid
level (``--level``), read lazily through :func:`napari_gradcam.pyramids.open_pyramid`; a large
single-level TIFF is read lazily through tifffile's zarr store, and other large images whole.
The job (:meth:`~napari_gradcam.job.ExplainJob.iter_run`) explains the level tile by tile and
blends the tiles' heat into a zarr group inside the output folder
(``.napari-gradcam/partial/<name>.zarr``), band of tile rows by band, recording how far it
got under a key made of the run's settings digest and the source's fingerprint: a run
interrupted (Ctrl-C, a killed process) and started again with the same command goes on from
the last finished band, while changed settings or a changed source start over. When the input
is done its heat is written as an OME-Zarr pyramid on the slide's level-0 grid
(``heatmaps/<name>.ome.zarr``), its regions as GeoJSON in level-0 pixels (what QuPath
expects, whatever level was explained; each feature records the level and its downsample),
its overlay (``--overlay``) from a reduced copy of the heat at most :data:`OVERLAY_SIDE`
pixels on a side, its record last, and the partial heat is deleted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np

from .. import memory
from .._device import describe_device, resolve_device
from ..annotations import regions_to_annotations
from ..explain_arrays import colour_for_grey_model, is_grey_rgb, layout, run_generator
from ..export import write_geojson
from ..files import atomic_output
from .discover import Unit
from .read import open_lazy, read_unit
from .records import STATE_DIR, Record, _failed, _write_record
from .settings import Options, _plain

log = logging.getLogger(__name__)

PARTIAL_DIR = "partial"  # inside STATE_DIR: the heat of tiled inputs not finished yet
OVERLAY_SIDE = 2048  # the longest side of a tiled input's overlay PNG


def partial_path(out, unit: Unit) -> Path:
    """Where ``unit``'s heat accumulates until it is done."""
    return Path(out) / STATE_DIR / PARTIAL_DIR / f"{unit.key}.zarr"


def level_problem(unit: Unit, opts: Options) -> str | None:
    """Why ``--level`` can't apply to ``unit`` (an input that is no pyramid has level 0
    only), or None."""
    if not opts.level or unit.kind == "slide":
        return None
    return (f"--level {opts.level} asks for a pyramid level, but this input is not a pyramid "
            "(it has level 0 only); leave --level out for it, or give the slide as SVS, "
            "OME-TIFF, a pyramidal TIFF or OME-Zarr")


def is_tiled(unit: Unit, spec, opts: Options, job) -> bool:
    """Whether ``unit`` is explained in tiles, one input at a time (slides always: their
    level is read lazily, and the job tiles it unless ``--tile none``), rather than in
    batches with others: a single 2D image larger than ``--tile`` along a side, or with
    ``--tile auto`` one that the job's rule (:func:`napari_gradcam.tiles.auto_tiling`) would
    tile, because it would not fit in memory whole. Read from the file's header only."""
    if unit.kind == "slide":
        return True
    if unit.kind != "file" or opts.tile is None or job.runner.dims != 2:
        return False
    head = memory.image_header(unit.path)
    if head is None:
        return False
    shape, dtype = head
    try:
        lay = layout(shape, opts.channel_axis, 2, spec.in_channels)
    except ValueError:
        return False  # reading the unit reports the shape problem
    if lay.lead:
        return False  # a stack: its images are batched
    if opts.tile != "auto":
        side = opts.tile if isinstance(opts.tile, int) else min(opts.tile)
        return max(lay.spatial) > side
    from ..tiles import auto_tiling

    return auto_tiling(tuple(lay.spatial), lay.channels, dtype, spec, job.runner.device,
                       whole_slide=False) is not None


def resume_key(unit: Unit, settings: str, level: int) -> str:
    """What a partial heat must have been made with to be continued: the run's settings,
    the source as it is now, and the level."""
    return json.dumps({"settings": settings, "source": _plain(unit.fingerprint),
                       "level": int(level)}, sort_keys=True)


class _Source:
    """A tiled input opened lazily: the array to explain (the level), its downsample against
    level 0, level 0's shape, and what the overlay is drawn from."""

    def __init__(self, unit: Unit, spec, opts: Options, arrays=None):
        self.pyramid = None
        self.level = int(opts.level or 0)
        if unit.kind == "slide":
            from ..pyramids import open_pyramid

            self.pyramid = open_pyramid(unit.path)  # ValueError: truncated, unreadable
            self.array = self.pyramid.level(self.level)  # ValueError naming the levels
            self.downsample = tuple(float(d) for d in self.pyramid.downsamples[self.level])
            self.full = tuple(int(s) for s in self.pyramid.levels[0].shape[:2])
            self.channel_axis = self.pyramid.channel_axis
            self.levels = len(self.pyramid.levels)
            self._check_colour(spec)
        else:
            path = Path(unit.path)
            if unit.kind == "file" and path.suffix.lower() in (".tif", ".tiff"):
                self.array = open_lazy(path)  # tifffile's zarr store: read a tile at a time
            else:  # PNG, JPEG: no lazy decoder; decoded whole, explained in tiles
                self.array = read_unit(unit, arrays, opts.channel_axis, spec.in_channels)
            self.downsample = (1.0, 1.0)
            self.channel_axis = opts.channel_axis
            self.levels = 1
            lay = layout(self.array.shape, self.channel_axis, 2, spec.in_channels)
            self.full = tuple(int(s) for s in lay.spatial)

    def _check_colour(self, spec) -> None:
        """A colour slide given to a 1-channel model is refused before its first tile, from
        its smallest level: tile by tile it would only fail at the first coloured tile, which
        can come after minutes of grey background."""
        smallest = self.pyramid.levels[-1]
        if spec.in_channels != 1 or self.channel_axis is None or math.prod(
                smallest.shape) > 3 * 4096 ** 2:
            return
        pixels = np.asarray(smallest)
        if pixels.shape[self.channel_axis] >= 3 and not is_grey_rgb(pixels, self.channel_axis):
            raise colour_for_grey_model()

    def close(self) -> None:
        if self.pyramid is not None:
            self.pyramid.close()

    def reduced(self, step_of_level0: float, shape: tuple) -> np.ndarray:
        """The image at ``shape``, sampled every ``step_of_level0`` level-0 pixels from the
        smallest level that still has that detail (memory: about the result's size)."""
        levels = self.pyramid.levels if self.pyramid is not None else [self.array]
        downs = self.pyramid.downsamples if self.pyramid is not None else [(1.0, 1.0)]
        best = max((k for k, d in enumerate(downs) if max(d) <= step_of_level0 + 1e-9),
                   key=lambda k: max(downs[k]), default=0)
        arr, down = levels[best], max(downs[best])
        stride = max(1, int(step_of_level0 / down))
        axis = layout(arr.shape, self.channel_axis, 2, None).channel_axis
        small = np.asarray(arr[tuple(slice(None) if k == axis else slice(None, None, stride)
                                     for k in range(len(arr.shape)))])
        if axis is not None:
            small = np.moveaxis(small, axis, -1)
        rows = np.minimum((np.arange(shape[0]) * step_of_level0 / (down * stride)).astype(int),
                          small.shape[0] - 1)
        cols = np.minimum((np.arange(shape[1]) * step_of_level0 / (down * stride)).astype(int),
                          small.shape[1] - 1)
        return small[rows][:, cols]


def _untiled_problem(src: _Source, spec, opts: Options) -> str | None:
    """With ``--tile none`` a level is explained whole: refused, as any input is, when it
    can't fit in memory."""
    shape = tuple(src.array.shape)
    try:
        lay = layout(shape, src.channel_axis, 2, spec.in_channels)
    except ValueError:
        return None  # the job reports the shape problem
    need = memory.estimate(shape, np.dtype(src.array.dtype), lay, spec.in_channels,
                           spec.input_size)
    device = resolve_device(opts.device)
    problem = memory.refusal(need, memory.available_host_memory(),
                             memory.available_device_memory(device), describe_device(device))
    return None if problem is None else f"{problem}, or leave out --tile none"


def run_tiled(unit: Unit, spec, out: Path, opts: Options, job, settings: str, *,
              arrays=None, on_tiles=None) -> Record:
    """Explain one slide or large image in tiles and write its files and record; a failure
    (an unreadable or truncated file, a level that doesn't exist, the model) is the unit's
    failed record, with one sentence. ``on_tiles(progress)`` is called after each batch of
    tiles. KeyboardInterrupt leaves the partial heat for the next run to go on from."""
    t0 = time.perf_counter()
    for flag, given in (("--mask", unit.mask), ("--target-mask", unit.target_mask),
                        ("--write-segmentation", opts.write_segmentation)):
        if given:
            return _failed(unit, out, f"{flag} is not used for slides and images explained "
                           f"in tiles; leave {flag} out for it, or pass --tile none to "
                           "explain it whole", settings)
    try:
        src = _Source(unit, spec, opts, arrays)
    except Exception as err:  # noqa: BLE001 - the reader's sentence, for the summary
        return _failed(unit, out, f"unreadable or unusable: {err}", settings)
    try:
        if opts.tile is None:
            problem = _untiled_problem(src, spec, opts)
            if problem:
                return _failed(unit, out, f"unreadable or unusable: {problem}", settings)
        partial = partial_path(out, unit)
        partial.parent.mkdir(parents=True, exist_ok=True)
        try:
            gen = job.iter_run(src.array, channel_axis=src.channel_axis, out=str(partial),
                               whole_slide=unit.kind == "slide",
                               resume_key=resume_key(unit, settings, src.level))
            result = _drive(gen, on_tiles)
        except ValueError as err:  # the job's sentence: channels, "found" with tiles, ...
            return _failed(unit, out, f"can't be explained: {err}", settings)
        except Exception as err:  # noqa: BLE001 - this unit fails, the run goes on
            return _failed(unit, out, f"the model failed on it: {err}", settings)
        try:
            record = _finish(unit, out, src, result, job, opts, settings,
                             time.perf_counter() - t0)
        except Exception as err:  # noqa: BLE001 - reported in the summary, the run goes on
            return _failed(unit, out, f"writing its results failed: {err}", settings)
    finally:
        src.close()
    remove_partial(out, unit)
    return record


def _drive(gen, on_tiles):
    """The job's generator to its end, ``on_tiles`` told of each batch of tiles; closed when
    interrupted, so the job's zarr progress is left consistent."""
    with contextlib.closing(gen):
        return run_generator(gen, on_tiles)


def remove_partial(out, unit: Unit) -> None:
    """Delete ``unit``'s partial heat (it is done, or has none)."""
    path = partial_path(out, unit)
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)


def _finish(unit: Unit, out: Path, src: _Source, result, job, opts: Options, settings: str,
            seconds: float) -> Record:
    """The heat pyramid, the GeoJSON in level-0 pixels, the overlay, then the record."""
    from ..pyramids import write_heat_pyramid
    from ..regions import scale_regions

    if not np.all(np.isfinite(np.asarray(result.scores, dtype=np.float64))):
        raise ValueError("the model's output is NaN/inf for it: check the weights (and "
                         "mean/std)")
    method = job.methods[0]
    heat = result.heatmaps[method]
    # written under a temporary name and renamed when whole (replacing an older one); in
    # micrometres when the slide gives its pixel size, as the slide itself is opened in
    # napari, so the two layers lie on each other
    mpp = src.pyramid.mpp if src.pyramid is not None else None
    origin = src.pyramid.translate if src.pyramid is not None else (0.0, 0.0)
    write_heat_pyramid(heat, out / "heatmaps" / f"{unit.name}.ome.zarr",
                       downsample_of_heat=src.downsample, mpp=mpp, translate=origin)
    class_names = list(job.spec.class_names)
    full = scale_regions(result.regions, src.downsample)  # level-k -> level-0 pixels
    annotations = regions_to_annotations(full, class_names)
    where = {"level": src.level, "downsample": list(src.downsample)}
    for a in annotations:
        a.properties.update(where)
    geo = out / "geojson" / f"{unit.key}.geojson"
    # coordinates stay level-0 pixels (QuPath); the pixel size is recorded beside them, so
    # our reader puts the shapes on the slide opened in micrometres
    write_geojson(annotations, geo, class_names=class_names, scale=mpp)
    if opts.overlay:
        _write_overlay(unit, out, src, heat, result, class_names)
    tiling = getattr(result, "tiling", None)
    how = "whole" if tiling is None else (
        f"in {tiling.tile[0]} x {tiling.tile[1]} tiles overlapping by "
        f"{tiling.overlap[0]} x {tiling.overlap[1]}")
    note = ""
    if unit.kind == "slide":
        down = " x ".join(f"{d:g}" for d in dict.fromkeys(src.downsample))
        note = (f"level {src.level} of {src.levels} (downsample {down}) explained {how}; "
                "GeoJSON in level-0 pixels")
    notes = [n for n in (note, *getattr(result, "notes", ())) if n]
    record = Record(unit.key, unit.path or unit.name, "ok", "; ".join(notes),
                    list(result.rows), list(src.full), str(geo.relative_to(out)),
                    round(seconds, 4), dims=2)
    return _write_record(out, unit, record, settings)


def _write_overlay(unit: Unit, out: Path, src: _Source, heat, result,
                   class_names: list) -> None:
    """The overlay PNG of a tiled input from a reduced copy of its heat (at most
    :data:`OVERLAY_SIDE` pixels on a side) and of the slide, sampled from the smallest level
    that has that detail: never the whole slide in memory."""
    import imageio.v3 as iio

    from ..regions import scale_regions
    from ..render import draw_regions, overlay_rgb, region_labels

    step = max(1, math.ceil(max(heat.shape[-2:]) / OVERLAY_SIDE))
    small_heat = np.asarray(heat[::step, ::step], dtype=np.float32)
    image = src.reduced(step * max(src.downsample), small_heat.shape)
    regions = scale_regions(result.regions, 1.0 / step) if step > 1 else list(result.regions)
    rgb = draw_regions(overlay_rgb(image, small_heat), regions,
                       region_labels(regions, result.rows, class_names))
    with atomic_output(out / "overlays" / f"{unit.name}.png") as tmp:
        iio.imwrite(str(tmp), rgb, extension=".png")
