"""Headless batch processing: files, folders, TIFF stacks and zarr arrays -> heatmaps, regions,
QuPath GeoJSON, one COCO file and a summary table, resumably.

The work is cut into *units*: an image file (PNG, JPEG, BMP, TIFF; a multi-page TIFF is a stack)
or a range of up to ``part_size`` leading indices of a zarr array. Each unit's outputs are written
atomically, its record last, so a unit with a record is done: a second run skips it, an
interrupted run loses nothing that finished. ``coco.json`` and ``summary.csv`` are rebuilt from
the records and GeoJSON files at the end of every run.

Three stages overlap: a thread pool reads and decodes units ahead of the engine, the engine runs
batches gathered across units of the same shape on the device, and a second pool cuts regions
and writes files. :func:`process_units` is the single-process pipeline; the CLI maps groups of
units over a dask.distributed cluster with the same function (one model per worker process).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .annotations import regions_to_annotations
from .batch import (
    Runner, check_channels, colour_for_grey_model, combine_targets, layout, read_batch,
)
from .export import _atomic_write, atomic_output, read_geojson, write_coco_dataset, write_geojson

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
STATE_DIR = ".napari-gradcam"  # records of finished units, inside the output folder
FOUND = "found"  # target: every class with a positive logit (multi-label models)


# ---- what to process ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Unit:
    """One piece of work: a whole image file, or images ``start:stop`` of a zarr array."""

    path: str  # the file or zarr array ('' for an in-memory array)
    name: str  # output stem, unique in the run
    kind: str  # "file" (read whole), "parts" (zarr / large TIFF, read lazily) or "array"
    start: int = 0
    stop: int | None = None  # zarr: end of the range (exclusive)
    mask: str | None = None  # mask file for this unit

    @property
    def key(self) -> str:
        """The unit's output name (a zarr range carries its indices)."""
        if self.kind == "parts":
            return f"{self.name}_{self.start:06d}-{self.stop:06d}"
        return self.name


def _is_zarr(path: Path) -> bool:
    return path.is_dir() and any((path / m).exists() for m in (".zarray", "zarr.json"))


def _stem(path: Path, root: Path | None) -> str:
    rel = path.relative_to(root) if root is not None else Path(path.name)
    parts = list(rel.parts)
    parts[-1] = Path(parts[-1]).stem if path.suffix.lower() != ".zarr" else parts[-1][:-5]
    return "__".join(parts) or path.stem


def _walk(root: Path, exclude: Path | None) -> Iterator[Path]:
    """Image files and zarr arrays below ``root``, sorted, without descending into zarr
    arrays, hidden folders or the output folder."""
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        keep = []
        for d in sorted(dirs):
            sub = here / d
            if d.startswith(".") or (exclude is not None and sub.resolve() == exclude):
                continue
            if _is_zarr(sub):
                yield sub
            else:
                keep.append(d)
        dirs[:] = keep
        for f in sorted(files):
            if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES:
                yield here / f


def collect_units(inputs: Iterable, mask: str | None = None, part_size: int = 256,
                  channel_axis=None, exclude=None) -> list[Unit]:
    """Units for files, folders (searched recursively for images and zarr arrays) and zarr
    arrays. ``mask`` is a pattern for each image's mask file with ``{dir}`` (the image's
    folder), ``{name}`` (file name) and ``{stem}`` (name without suffix), e.g.
    ``"{dir}/../lung-masks/{name}"``. ``exclude``: a folder to leave out (the output folder,
    when it lies inside an input folder)."""
    inputs = list(inputs)
    exclude = Path(exclude).resolve() if exclude is not None else None
    found: list[tuple[Path, Path | None]] = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise ValueError(f"input {str(path)!r} does not exist.")
        if path.is_dir() and not _is_zarr(path):
            found += [(p, path) for p in sorted(_walk(path, exclude))]
        else:
            found.append((path, None))
    units, seen = [], set()
    for path, root in found:
        name = _stem(path, root)
        base, k = name, 2
        while name in seen:
            name, k = f"{base}-{k}", k + 1
        seen.add(name)
        mask_path = None
        if mask:
            mask_path = str(Path(mask.format(dir=path.parent, name=path.name, stem=path.stem)))
        n = _stack_length(path, channel_axis, part_size)
        if n is not None:  # zarr arrays, and TIFF stacks longer than a part: read in parts
            units += [Unit(str(path), name, "parts", a, min(a + part_size, n), mask_path)
                      for a in range(0, n, part_size)]
        else:
            units.append(Unit(str(path), name, "file", mask=mask_path))
    if not units:
        raise ValueError(f"no images found in {', '.join(map(str, inputs))}: give image files "
                         f"({', '.join(IMAGE_SUFFIXES)}), folders or zarr arrays.")
    return units


def _zarr():
    try:
        import zarr
    except ImportError:
        raise ValueError("zarr inputs need the optional package 'zarr': pip install zarr "
                         "(or napari-gradcam[dask]).") from None
    return zarr


def open_lazy(path):
    """A zarr array, or a TIFF file's first series as a lazily read zarr array."""
    zarr = _zarr()
    if str(path).lower().endswith((".tif", ".tiff")):
        import tifffile

        return zarr.open(tifffile.imread(str(path), aszarr=True), mode="r")
    return zarr.open(str(path), mode="r")


def _stack_length(path: Path, channel_axis, part_size: int) -> int | None:
    """The length of the first leading axis for inputs read in parts (zarr arrays, TIFF stacks
    longer than ``part_size``), else None (read whole)."""
    if _is_zarr(path):
        shape = open_lazy(path).shape
    elif path.suffix.lower() in (".tif", ".tiff"):
        try:
            import tifffile

            with tifffile.TiffFile(str(path)) as tif:
                shape = tif.series[0].shape
        except Exception:  # noqa: BLE001 - unreadable: read whole, fail there with a message
            return None
    else:
        return None
    try:
        lay = layout(shape, channel_axis)
    except ValueError:
        return None
    if not lay.lead:
        return None if not _is_zarr(path) else 1
    n = lay.lead[0]
    return n if _is_zarr(path) or n > part_size else None


def read_unit(unit: Unit, arrays: dict | None = None, channel_axis=None) -> np.ndarray:
    """The unit's pixels as a NumPy array (images along the leading axes)."""
    if unit.kind == "array":
        return np.asarray(arrays[unit.name])
    path = Path(unit.path)
    if unit.kind == "parts":
        array = open_lazy(path)
        lay = layout(array.shape, channel_axis)
        return np.asarray(array[unit.start:unit.stop]) if lay.lead else np.asarray(array)
    try:
        data = np.asarray(_imread(path))
    except Exception as err:  # noqa: BLE001 - any decoder failure: one line for the summary
        first = (str(err).splitlines() or [""])[0][:160]
        raise ValueError(f"can't read it as an image ({type(err).__name__}: {first})") from None
    if data.size == 0:
        raise ValueError("the image is empty")
    return data


def _imread(path: Path):
    """TIFF (multi-page = a stack, 16-bit kept) with tifffile, others with imageio (palette
    PNGs decoded to their RGB intensities, not their palette indices)."""
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        return tifffile.imread(str(path))
    import imageio.v3 as iio

    return iio.imread(str(path))


def _read_mask(unit: Unit) -> np.ndarray | None:
    if unit.mask is None:
        return None
    if not Path(unit.mask).is_file():
        raise ValueError(f"its mask {unit.mask!r} does not exist (check the --mask pattern)")
    m = np.asarray(_imread(Path(unit.mask)))
    if m.ndim == 3 and m.shape[-1] in (3, 4):
        m = m[..., 0]
    return m > 0


# ---- options and records ------------------------------------------------------------------

@dataclass
class Options:
    method: str = "gradcam"
    target: object = None
    threshold: float | str = 0.5
    threshold_mode: str = "absolute"
    min_area: int = 16
    simplify: float = 1.0
    device: str = "auto"
    batch_size: int | None = None
    overlay: bool = False
    overwrite: bool = False
    channel_axis: object = None
    workers: int = 2  # threads for reading and for writing
    prefetch: int = 4  # units read ahead of the engine


@dataclass
class Record:
    """What happened to one unit (the summary's rows)."""

    unit: str
    source: str
    status: str  # "ok" or "failed"
    message: str = ""
    images: list = field(default_factory=list)  # per image: index, class, score, regions
    shape: list = field(default_factory=list)  # the unit's image shape (leading..., H, W)
    geojson: str = ""
    seconds: float = 0.0

    @property
    def image_count(self) -> int:
        """Images in the unit (``images`` has a row per class found with target "found")."""
        return len({tuple(img["index"]) for img in self.images})


def record_path(out: Path, key: str) -> Path:
    return Path(out) / STATE_DIR / "records" / f"{key}.json"


def load_record(out: Path, key: str) -> Record | None:
    path = record_path(out, key)
    if not path.is_file():
        return None
    try:
        return Record(**json.loads(path.read_text()))
    except (ValueError, TypeError):
        return None  # a foreign or damaged record: redo the unit


# ---- writing one unit -------------------------------------------------------------------------

def _turbo(v: np.ndarray) -> np.ndarray:
    """Google's polynomial approximation of the turbo colormap; v in [0, 1] -> RGB in [0, 1]."""
    v = np.clip(v, 0, 1)[..., None]
    r = np.array([0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943])
    g = np.array([0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604])
    b = np.array([0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973])
    powers = v ** np.arange(6)
    return np.clip(np.stack([powers @ r, powers @ g, powers @ b], -1), 0, 1)


def overlay_rgb(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """The image in grey with the heat painted over it (transparent where cold), uint8 RGB."""
    grey = image.astype(np.float32)
    if grey.ndim == 3:
        grey = grey[..., :3].mean(-1)
    lo, hi = np.percentile(grey, [0.5, 99.5]) if grey.size else (0, 1)
    grey = np.clip((grey - lo) / (hi - lo if hi > lo else 1), 0, 1)[..., None]
    alpha = np.clip((heat - 0.08) / 0.45, 0, 1)[..., None] * 0.7
    rgb = grey * (1 - alpha) + _turbo(heat * 0.88) * alpha
    return (rgb * 255 + 0.5).astype(np.uint8)


class Explainer:
    """The model over raw batches for one target, or for every class (``target="found"``):
    returns heatmaps (n, K, *spatial), class ids (n, K) and scores (n, K); K = 1 for one
    target."""

    def __init__(self, spec, opts: Options):
        self.found = isinstance(opts.target, str) and opts.target.lower() == FOUND
        if self.found and not spec.class_names:
            raise ValueError("target 'found' explains every class, and this model has no class "
                             "names; give class_names, or a class or none as the target.")
        targets = range(len(spec.class_names)) if self.found else [opts.target]
        self.runners = [Runner(spec, opts.method, t, opts.device, opts.batch_size)
                        for t in targets]
        self.dims = self.runners[0].dims

    def size_for(self, spatial, count: int) -> int:
        size = self.runners[0].size_for(spatial, count)
        for r in self.runners[1:]:
            r.batch_size = size
        return size

    def __call__(self, raw: np.ndarray):
        outs = [r(raw) for r in self.runners]
        return tuple(np.stack([o[j] for o in outs], 1) for j in range(3))


def finish_unit(unit: Unit, out: Path, pixels: np.ndarray | None, heat: np.ndarray,
                class_ids: np.ndarray, scores: np.ndarray, lead: tuple, mask, opts: Options,
                class_names: list, seconds: float) -> Record:
    """Regions, heatmap file, GeoJSON, overlays, then the record (last: it marks the unit
    done). ``heat`` is (n, K, *spatial): one map per target (K classes for "found", where only
    classes with a positive logit count). Runs on a writer thread or a dask worker."""
    found = isinstance(opts.target, str) and opts.target.lower() == FOUND
    k_axis = len(lead)
    heat = heat.reshape((*lead, *heat.shape[1:]))
    ids = class_ids.reshape((*lead, -1))
    sc = scores.reshape((*lead, -1))
    k = range(heat.shape[k_axis])
    heat, regions = combine_targets(
        [np.take(heat, i, axis=k_axis) for i in k], [ids[..., i] for i in k],
        [sc[..., i] for i in k], found=found, mask=mask,
        regions={"threshold": opts.threshold, "min_area": opts.min_area,
                 "simplify": opts.simplify, "threshold_mode": opts.threshold_mode,
                 "workers": 1})
    keep = (sc > 0) if found else np.ones(sc.shape, bool)
    offset = (unit.start,) if unit.kind == "parts" and lead else ()
    if offset:
        regions = [replace(r, index=(r.index[0] + unit.start, *r.index[1:])) for r in regions]
    _write_heat(unit, out, heat, bool(lead))
    geo = out / "geojson" / f"{unit.key}.geojson"
    write_geojson(regions_to_annotations(regions, class_names), geo, class_names=class_names)
    if opts.overlay and pixels is not None:
        _write_overlays(unit, out, pixels, heat, lead)
    counts: dict = {}
    for r in regions:
        counts[(tuple(r.index), r.class_id)] = counts.get((tuple(r.index), r.class_id), 0) + 1
    images = []
    for idx in np.ndindex(*lead) if lead else [()]:
        full = tuple(i + o for i, o in zip(idx, offset)) + tuple(idx[len(offset):])
        rows = [k for k in range(ids.shape[-1]) if keep[idx][k]]
        for k in rows:
            cid = int(ids[idx][k])
            images.append({"index": list(full),
                           "class": class_names[cid] if 0 <= cid < len(class_names)
                           else str(cid), "class_id": cid, "score": float(sc[idx][k]),
                           "regions": counts.get((full, cid), 0)})
        if not rows:  # "found" and nothing was: the image still gets its row
            images.append({"index": list(full), "class": "", "class_id": -1,
                           "score": float(sc[idx].max()), "regions": 0})
    shape = [*(lead if not offset else (unit.stop,) + tuple(lead[1:])), *heat.shape[len(lead):]]
    record = Record(unit.key, unit.path or unit.name, "ok", "", images, shape,
                    str(geo.relative_to(out)), round(seconds, 4))
    _atomic_write(record_path(out, unit.key), json.dumps(asdict(record)))
    return record


def _write_heat(unit: Unit, out: Path, heat: np.ndarray, stacked: bool) -> None:
    if unit.kind == "parts":
        target = _zarr().open(str(out / "heatmaps" / f"{unit.name}.zarr"), mode="r+")
        if stacked:
            target[unit.start:unit.stop] = heat
        else:  # a single image stored as zarr
            target[...] = heat
        return
    import tifffile

    path = out / "heatmaps" / f"{unit.name}.tif"
    with atomic_output(path) as tmp:
        tifffile.imwrite(str(tmp), heat.astype(np.float32, copy=False),
                         photometric="minisblack")


def _write_overlays(unit: Unit, out: Path, pixels: np.ndarray, heat: np.ndarray,
                    lead: tuple) -> None:
    import imageio.v3 as iio

    for idx in np.ndindex(*lead) if lead else [()]:
        image = pixels[idx] if idx else pixels
        suffix = "".join(f"_{i + (unit.start if k == 0 and unit.kind == 'parts' else 0)}"
                         for k, i in enumerate(idx))
        path = out / "overlays" / f"{unit.name}{suffix}.png"
        with atomic_output(path) as tmp:
            iio.imwrite(str(tmp), overlay_rgb(image, heat[idx] if idx else heat),
                        extension=".png")


def _failed(unit: Unit, out: Path, message: str) -> Record:
    message = " ".join(str(message).split())
    record = Record(unit.key, unit.path or unit.name, "failed", message)
    _atomic_write(record_path(out, unit.key), json.dumps(asdict(record)))
    log.warning("%s: %s", unit.path or unit.name, message)
    return record


def prepare_outputs(units: list[Unit], out: Path, channel_axis=None, spatial_dims: int = 2,
                    clean: bool = True) -> None:
    """Create what units write into together (the heatmap zarr arrays of zarr inputs) and,
    with ``clean``, delete the temporary files a killed run left (not while other processes
    write into the folder)."""
    out = Path(out)
    (out / STATE_DIR / "records").mkdir(parents=True, exist_ok=True)
    folders = ("heatmaps", "geojson", "overlays", f"{STATE_DIR}/records", ".") if clean else ()
    for folder in folders:
        for stale in (out / folder).glob(".*.tmp*"):  # a killed run's unfinished temp files
            if stale.is_file():
                stale.unlink()
    for unit in {u.name: u for u in units if u.kind == "parts"}.values():
        target = out / "heatmaps" / f"{unit.name}.zarr"
        if target.exists():
            continue
        lay = layout(open_lazy(unit.path).shape, channel_axis, spatial_dims)
        _zarr().open(str(target), mode="w", shape=(*lay.lead, *lay.spatial), dtype="f4",
                     chunks=(1,) * len(lay.lead) + tuple(lay.spatial), fill_value=0.0)


# ---- the pipeline -----------------------------------------------------------------------------------

@dataclass
class _Pending:
    unit: Unit
    pixels: np.ndarray
    raw: np.ndarray  # (n, *spatial, channels)
    lead: tuple
    mask: np.ndarray | None
    t0: float
    heat: np.ndarray = None
    ids: np.ndarray = None
    scores: np.ndarray = None
    done: int = 0


def _load(unit: Unit, spec, opts: Options, dims: int, arrays) -> tuple:
    """Reader thread: pixels, raw (n, *spatial, C), leading shape, mask; or the exception."""
    try:
        pixels = read_unit(unit, arrays, opts.channel_axis)
        lay = layout(pixels.shape, opts.channel_axis, dims)
        check_channels(lay.channels, spec.in_channels)
        if lay.channels == 3 and spec.in_channels == 1:
            data = np.moveaxis(pixels, lay.channel_axis, -1)
            if not (np.array_equal(data[..., 0], data[..., 1])
                    and np.array_equal(data[..., 0], data[..., 2])):
                raise colour_for_grey_model()  # per file, before it joins a batch
        raw = read_batch(pixels, lay, 0, lay.count if lay.lead else 1)
        mask = _read_mask(unit)
        if mask is not None and tuple(mask.shape) != tuple(lay.spatial):
            raise ValueError(f"its mask {unit.mask!r} has shape {tuple(mask.shape)}, the image "
                             f"{tuple(lay.spatial)}")
        return pixels, raw, lay.lead, mask
    except Exception as err:  # noqa: BLE001 - reported in the summary, the run goes on
        return err


def process_units(units: list[Unit], spec, out, opts: Options, *,
                  progress: Callable[[int, int, str], None] | None = None,
                  arrays: dict | None = None, clean: bool = True) -> list[Record]:
    """Run the pipeline over ``units`` (skipping finished ones unless ``opts.overwrite``);
    returns a record per unit. ``progress(images_done, units_done, unit_key)`` after each
    unit."""
    out = Path(out)
    runner = Explainer(spec, opts)
    dims = runner.dims
    prepare_outputs(units, out, opts.channel_axis, dims, clean)
    records: dict[str, Record] = {}
    todo = []
    for unit in units:
        old = None if opts.overwrite else load_record(out, unit.key)
        if old is not None and old.status == "ok":
            records[unit.key] = old
        else:
            todo.append(unit)
    readers = ThreadPoolExecutor(max(1, opts.workers), thread_name_prefix="gradcam-read")
    writers = ThreadPoolExecutor(max(1, opts.workers), thread_name_prefix="gradcam-write")
    reads: deque[tuple[Unit, Future]] = deque()
    writes: list[Future] = []
    queue = iter(todo)
    images_done = 0
    class_names = list(spec.class_names)

    def fill():
        while len(reads) < max(1, opts.prefetch):
            unit = next(queue, None)
            if unit is None:
                return
            reads.append((unit, readers.submit(_load, unit, spec, opts, dims, arrays)))

    def finished(rec: Record):
        nonlocal images_done
        records[rec.unit] = rec
        images_done += rec.image_count
        if progress is not None:
            progress(images_done, len(records), rec.unit)

    def submit_finish(p: _Pending):
        fut = writers.submit(_finish_safely, p.unit, out, p.pixels, p.heat, p.ids, p.scores,
                             p.lead, p.mask, opts, class_names, time.perf_counter() - p.t0)
        writes.append(fut)

    def flush(batch: list[_Pending]):
        """One forward over the gathered images; results scattered back to their units."""
        if not batch:
            return
        raw = np.concatenate([p.raw[p.done:] for p in batch]) if len(batch) > 1 else \
            batch[0].raw[batch[0].done:]
        try:
            heat, ids, scores = runner(raw)
        except Exception as err:  # noqa: BLE001 - the units in this batch fail, the run goes on
            for p in batch:
                finished(_failed(p.unit, out, f"the model failed on it: {err}"))
            return
        pos = 0
        for p in batch:
            n = p.raw.shape[0] - p.done
            p.heat[p.done:] = heat[pos:pos + n]
            p.ids[p.done:] = ids[pos:pos + n]
            p.scores[p.done:] = scores[pos:pos + n]
            p.done += n
            pos += n
            submit_finish(p)

    try:
        fill()
        batch: list[_Pending] = []
        gathered = 0
        while reads:
            # collect finished writes (their records) without waiting
            for fut in [f for f in writes if f.done()]:
                writes.remove(fut)
                finished(fut.result())
            unit, fut = reads.popleft()
            fill()
            loaded = fut.result()
            if isinstance(loaded, Exception):  # the batch being gathered goes on without it
                finished(_failed(unit, out, f"unreadable or unusable: {loaded}"))
                continue
            pixels, raw, lead, mask = loaded
            n = raw.shape[0]
            k = len(runner.runners)
            p = _Pending(unit, pixels, raw, lead, mask, time.perf_counter(),
                         np.zeros((n, k, *raw.shape[1:-1]), np.float32),
                         np.zeros((n, k), np.int64), np.zeros((n, k), np.float32))
            size = runner.size_for(raw.shape[1:-1], n)
            same = batch and batch[0].raw.shape[1:] == raw.shape[1:] and \
                batch[0].raw.dtype == raw.dtype
            if batch and (not same or gathered + n > size):
                flush(batch)
                batch, gathered = [], 0
            if n >= size:  # a stack: its own batches
                while p.done < n:
                    stop = min(p.done + size, n)
                    try:
                        h, i, s = runner(raw[p.done:stop])
                    except Exception as err:  # noqa: BLE001
                        finished(_failed(unit, out, f"the model failed on it: {err}"))
                        break
                    p.heat[p.done:stop], p.ids[p.done:stop], p.scores[p.done:stop] = h, i, s
                    p.done = stop
                else:
                    submit_finish(p)
                continue
            batch.append(p)
            gathered += n
        flush(batch)
        for fut in writes:
            finished(fut.result())
    finally:
        readers.shutdown(wait=False, cancel_futures=True)
        writers.shutdown(wait=True)
    return [records[u.key] for u in units if u.key in records]


def _finish_safely(unit, out, *args) -> Record:
    try:
        return finish_unit(unit, out, *args)
    except Exception as err:  # noqa: BLE001 - reported in the summary, the run goes on
        return _failed(unit, out, f"writing its results failed: {err}")


# ---- the run's summary files ----------------------------------------------------------------

SUMMARY_COLUMNS = ("file", "index", "class", "score", "regions", "status", "message")


def write_summary(records: list[Record], out: Path, class_names: list) -> tuple[Path, Path]:
    """summary.csv (a row per image, a row per failed unit) and coco.json (every image of
    every finished unit, regions read back from the units' GeoJSON)."""
    out = Path(out)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(SUMMARY_COLUMNS)
    entries = []
    for rec in records:
        if rec.status != "ok":
            w.writerow([rec.source, "", "", "", "", rec.status, rec.message])
            continue
        for img in rec.images:  # a row per image (per class found, with --target found)
            w.writerow([rec.source, " ".join(map(str, img["index"])), img["class"],
                        f"{img['score']:.6g}", img["regions"], "ok", ""])
        annotations, _meta = read_geojson(out / rec.geojson)
        lead = len(rec.shape) - 2
        indices = list(dict.fromkeys(tuple(img["index"]) for img in rec.images))
        base = Path(rec.source).stem if rec.source else rec.unit
        for idx in indices:
            entries.append((base + "".join(f"_{i}" for i in idx) if lead else base,
                            rec.shape[lead:],
                            [replace(a, index=()) for a in annotations
                             if tuple(a.index) == idx or not lead]))
    summary = _atomic_write(out / "summary.csv", buf.getvalue())
    coco = write_coco_dataset(entries, out / "coco.json", class_names=class_names)
    return summary, coco


def iter_progress(total_units: int, quiet: bool) -> Callable:
    """A progress callback: a tqdm bar with images per second, or log lines when quiet."""
    t0 = time.perf_counter()
    if quiet:
        def report(images, units, key):
            log.info("%d/%d units, %d images, %.1f img/s (%s)", units, total_units, images,
                     images / max(time.perf_counter() - t0, 1e-9), key)
        return report
    from tqdm import tqdm

    bar = tqdm(total=total_units, unit="unit", dynamic_ncols=True)

    def report(images, units, key):
        bar.n = units
        bar.set_postfix_str(f"{images} images, "
                            f"{images / max(time.perf_counter() - t0, 1e-9):.1f} img/s")
        if units >= total_units:
            bar.close()

    return report


def units_for_array(array, name: str) -> tuple[list[Unit], dict]:
    """An in-memory array as a unit (``napari-gradcam demo --headless``)."""
    return [Unit("", name, "array")], {name: array}


__all__ = ["IMAGE_SUFFIXES", "Options", "Record", "Unit", "collect_units", "finish_unit",
           "overlay_rgb", "process_units", "read_unit", "write_summary"]

