"""Headless batch processing: files, folders, TIFF stacks and zarr arrays -> heatmaps, regions,
QuPath GeoJSON, one COCO file and a summary table, resumably.

The work is cut into *units*: an image file (PNG, JPEG, BMP, TIFF; a multi-page TIFF is a stack)
or a range of up to ``part_size`` leading indices of a zarr array. Each unit's outputs are written
atomically, its record last, so a unit with a record is done: a second run skips it, an
interrupted run loses nothing that finished. A record counts only for the same source (resolved
path, size, mtime) and the same settings (model file hashes, method, target, regions, mask), and
a run holds the output folder alone (see :func:`claim_output`). ``coco.json`` and
``summary.csv`` are rebuilt from the records and GeoJSON files at the end of every run.

Three stages overlap: a thread pool reads and decodes units ahead of the engine, the engine runs
batches gathered across units of the same shape on the device, and a second pool cuts regions
and writes files. :func:`process_units` is the single-process pipeline; the CLI maps groups of
units over a dask.distributed cluster with the same function (one model per worker process).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import re
import socket
import time
import weakref
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from . import memory
from ._device import describe_device, resolve_device
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
    stem: str = ""  # the name before same-named sources are told apart ("a" for "a-2")
    # what the unit's record must match to count as done: the resolved source, its size and
    # mtime (a zarr array's metadata file), the range, and the mask file's size and mtime
    fingerprint: tuple = ()

    @property
    def key(self) -> str:
        """The unit's output name (a zarr range carries its indices)."""
        if self.kind == "parts":
            return f"{self.name}_{self.start:06d}-{self.stop:06d}"
        return self.name


def _is_zarr(path: Path) -> bool:
    try:
        return path.is_dir() and any((path / m).exists() for m in (".zarray", "zarr.json"))
    except OSError:  # an unreadable folder is not a zarr array; walking it reports why
        return False


def _stem(path: Path, root: Path | None) -> str:
    # (an input folder that can't be listed is its own unit: path == root)
    rel = path.relative_to(root) if root is not None and path != root else Path(path.name)
    parts = list(rel.parts)
    parts[-1] = Path(parts[-1]).stem if path.suffix.lower() != ".zarr" else parts[-1][:-5]
    return "__".join(parts) or path.stem


def _folder_id(path: Path) -> tuple | None:
    try:
        st = os.stat(path)  # follows links: a linked folder is the folder it points to
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _walk(root: Path, exclude: Path | None) -> Iterator[Path]:
    """Image files and zarr arrays below ``root``, sorted, without descending into zarr
    arrays, hidden folders or the output folder. Linked folders are followed, each real folder
    visited once (a link back up the tree would otherwise loop forever). A folder that can't be
    listed is yielded itself: reading it then fails with the reason, so it shows in the summary
    and the rest of the run goes on."""
    unreadable: list[Path] = []
    visited = {_folder_id(root)}
    for folder, dirs, files in os.walk(root, onerror=lambda e: unreadable.append(
            Path(e.filename) if e.filename else root), followlinks=True):
        yield from unreadable
        unreadable.clear()
        here = Path(folder)
        keep = []
        for d in sorted(dirs):
            sub = here / d
            if d.startswith(".") or (exclude is not None and sub.resolve() == exclude):
                continue
            if _is_zarr(sub):
                yield sub
                continue
            fid = _folder_id(sub)
            if fid is not None and fid in visited:
                log.warning("%s leads to a folder already searched (%s); searched once",
                            sub, sub.resolve())
                continue
            if fid is not None:
                visited.add(fid)
            keep.append(d)
        dirs[:] = keep
        for f in sorted(files):
            if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES:
                yield here / f
    yield from unreadable  # the last folder os.walk tried


MASK_FIELDS = ("dir", "name", "stem")


def mask_pattern_problem(pattern: str) -> str | None:
    """What is wrong with a ``--mask`` pattern, or None. Only the bare fields ``{dir}``,
    ``{name}`` and ``{stem}`` are allowed: ``str.format`` would also evaluate attribute access
    and indexing (``{dir.__class__}``, ``{name[0]}``), which has no use here and lets a pattern
    read the program's objects."""
    import string

    try:
        parsed = list(string.Formatter().parse(pattern))
    except ValueError as err:
        return f"{err} (write {{{{ and }}}} for a literal brace)"
    unknown = []
    for _literal, field_name, spec, conversion in parsed:
        if field_name is None:
            continue
        if field_name not in MASK_FIELDS:
            unknown.append("{" + field_name + "}")
        elif spec or conversion:
            return (f"{{{field_name}{'!' + conversion if conversion else ''}"
                    f"{':' + spec if spec else ''}}} has a conversion or format spec; use the "
                    "bare fields {dir}, {name} and {stem}")
    if unknown:
        return (f"unknown field{'s' * (len(unknown) > 1)} {', '.join(unknown)}; the pattern may "
                "use only {dir} (the image's folder), {name} (its file name) and {stem} (the "
                "name without suffix)")
    return None


def format_mask(pattern: str, path: Path) -> str:
    """The mask file for ``path``: the pattern's fields substituted as plain text (never
    through ``str.format``, see :func:`mask_pattern_problem`)."""
    import string

    problem = mask_pattern_problem(pattern)
    if problem:
        raise ValueError(f"mask pattern {pattern!r}: {problem}.")
    path = Path(path)
    values = {"dir": str(path.parent), "name": path.name, "stem": path.stem}
    return str(Path("".join(literal + (values[field] if field is not None else "")
                            for literal, field, _s, _c in string.Formatter().parse(pattern))))


def collect_units(inputs: Iterable, mask: str | None = None, part_size: int = 256,
                  channel_axis=None, exclude=None, claims: dict | None = None) -> list[Unit]:
    """Units for files, folders (searched recursively for images and zarr arrays) and zarr
    arrays. ``mask`` is a pattern for each image's mask file with ``{dir}`` (the image's
    folder), ``{name}`` (file name) and ``{stem}`` (name without suffix), e.g.
    ``"{dir}/../lung-masks/{name}"``. ``exclude``: a folder to leave out (the output folder,
    when it lies inside an input folder). ``claims``: the output folder's names, see
    :func:`name_units`."""
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
        real = _resolved(path)
        if real in seen:  # the same file given twice (a folder and a file in it): once
            continue
        seen.add(real)
        mask_path = None
        if mask:
            mask_path = format_mask(mask, path)
        n = _stack_length(path, channel_axis, part_size)
        if n is not None:  # zarr arrays, and TIFF stacks longer than a part: read in parts
            units += [Unit(str(path), name, "parts", a, min(a + part_size, n), mask_path, name,
                           source_fingerprint(path, a, min(a + part_size, n), mask_path))
                      for a in range(0, n, part_size)]
        else:
            units.append(Unit(str(path), name, "file", mask=mask_path, stem=name,
                              fingerprint=source_fingerprint(path, 0, None, mask_path)))
    if not units:
        raise ValueError(f"no images found in {', '.join(map(str, inputs))}: give image files "
                         f"({', '.join(IMAGE_SUFFIXES)}), folders or zarr arrays.")
    return name_units(units, claims)[0]


def _resolved(path) -> str:
    try:
        return str(Path(path).resolve())
    except (OSError, RuntimeError):  # a symlink loop: the path as given
        return str(Path(path).absolute())


def source_fingerprint(path, start: int = 0, stop: int | None = None,
                       mask: str | None = None) -> tuple:
    """What identifies a source's contents without reading them: its resolved path, size and
    mtime (for a zarr array, those of its metadata file) and the range of a unit read in
    parts, then the mask file's size and mtime. A rerun redoes a unit whose fingerprint
    changed; one ``stat`` per file keeps this cheap for any number of inputs."""
    path = Path(path)
    meta = path
    if _is_zarr(path):
        meta = next(path / m for m in (".zarray", "zarr.json") if (path / m).exists())
    fp: tuple = (_resolved(path), *_stat(meta), int(start), stop)
    if mask is not None:
        fp += (_resolved(mask), *_stat(Path(mask)))
    return fp


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError:  # unreadable or missing: the unit fails when read, and is redone
        return -1, -1
    return st.st_size, st.st_mtime_ns


def name_units(units: list[Unit], claims: dict | None = None) -> tuple[list[Unit], dict]:
    """Output names for units: a source keeps the name ``claims`` (name -> resolved source,
    the output folder's index) gives it; any other source takes the first of ``stem``,
    ``stem-2``, ``stem-3`` ... that no other source holds (compared without case, for
    case-insensitive file systems). So two ``a.png`` from different folders never share
    outputs, in one run or across runs, and a rerun finds each one's own records. Returns the
    renamed units and the claims with the new names added."""
    claims = dict(claims or {})
    owner = {src: name for name, src in claims.items()}
    taken = {name.casefold() for name in claims}
    names: dict[str, str] = {}
    for unit in units:
        src = unit.fingerprint[0] if unit.fingerprint else ""
        if not src or src in names:
            continue
        if src in owner:
            names[src] = owner[src]
            continue
        base = unit.stem or unit.name
        name, k = base, 2
        while name.casefold() in taken:
            name, k = f"{base}-{k}", k + 1
        taken.add(name.casefold())
        names[src], claims[name] = name, src
    renamed = [replace(u, name=names[u.fingerprint[0]]) if u.fingerprint else u for u in units]
    return renamed, claims


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
                note = _series_note(tif)
            if note:
                log.warning("%s: %s", path, note)
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


def _series_note(tif) -> str:
    """'' for a TIFF with one series; else which series are skipped. Only the first series is
    read: series can differ in shape and dtype (a pyramid level, a thumbnail, a label image
    next to the image), so they are neither stacked nor guessed at."""
    series = tif.series
    if len(series) < 2:
        return ""
    def shape(s):
        return " x ".join(map(str, s.shape)) + f" {np.dtype(s.dtype).name}"
    rest = ", ".join(f"{k} ({shape(s)})" for k, s in enumerate(series[1:6], 1))
    more = f" and {len(series) - 6} more" if len(series) > 6 else ""
    return (f"it holds {len(series)} image series; only series 0 ({shape(series[0])}) is "
            f"explained and series {rest}{more} are skipped: save each series as its own file "
            "(or as one stack) to explain them")


def tiff_series_note(path) -> str:
    """:func:`_series_note` of a TIFF file ('' for other files and unreadable ones)."""
    if not str(path).lower().endswith((".tif", ".tiff")):
        return ""
    try:
        import tifffile

        with tifffile.TiffFile(str(path)) as tif:
            return _series_note(tif)
    except Exception:  # noqa: BLE001 - reading it reports the problem
        return ""


def read_unit(unit: Unit, arrays: dict | None = None, channel_axis=None) -> np.ndarray:
    """The unit's pixels as a NumPy array (images along the leading axes)."""
    if unit.kind == "array":
        return np.asarray(arrays[unit.name])
    path = Path(unit.path)
    if path.is_dir() and not _is_zarr(path):  # a folder the search could not list
        try:
            with os.scandir(path):
                pass
            reason = "it could not be listed while searching for images"
        except OSError as err:
            reason = f"{type(err).__name__}: {err.strerror or err}"
        raise ValueError(f"can't read this folder ({reason}); give read access to it, or "
                         "leave it out")
    if unit.kind == "parts":
        array = open_lazy(path)
        lay = layout(array.shape, channel_axis)
        return np.asarray(array[unit.start:unit.stop]) if lay.lead else np.asarray(array)
    try:
        data = np.asarray(_imread(path))
    except Exception as err:  # noqa: BLE001 - any decoder failure: one line for the summary
        raise ValueError(f"can't read it as an image ({_decoder_reason(err)})") from None
    if data.size == 0:
        raise ValueError("the image is empty")
    return data


def _decoder_reason(err: Exception) -> str:
    """A decoder's error in one line, without imageio's advice to install plugins (for a
    damaged PNG or TIFF it suggests video backends such as pyav, which would not help)."""
    first = (str(err).splitlines() or [""])[0][:160]
    if first.startswith("Could not find a backend"):
        return "no decoder recognises its contents: the file is damaged or not an image"
    return f"{type(err).__name__}: {first}"


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
    try:
        m = np.asarray(_imread(Path(unit.mask)))
    except Exception as err:  # noqa: BLE001 - a decoder's own advice (install pyav) misleads
        raise ValueError(f"its mask {unit.mask!r} can't be read as an image "
                         f"({_decoder_reason(err)}); replace it with a PNG or TIFF "
                         "mask, or check the --mask pattern") from None
    if m.size == 0:
        raise ValueError(f"its mask {unit.mask!r} is empty; replace it with a PNG or TIFF mask")
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
    name: str = ""  # the unit's output name (heatmap, overlays)
    fingerprint: list = field(default_factory=list)  # the unit's source when it was done
    settings: str = ""  # digest of the run's settings (see run_settings)

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
    except (OSError, ValueError, TypeError):
        return None  # a foreign or damaged record: redo the unit


def is_done(record: Record | None, unit: Unit, settings: str) -> bool:
    """Whether ``record`` says ``unit`` finished from the same source (path, size, mtime)
    with the same settings: only then is it skipped."""
    return (record is not None and record.status == "ok" and record.settings == settings
            and record.fingerprint == _plain(unit.fingerprint))


def _plain(value):
    """``value`` as it reads back from JSON (tuples as lists)."""
    return json.loads(json.dumps(value))


def count_done(units: list[Unit], out, settings: str) -> int:
    """How many of ``units`` have a record that counts as done."""
    return sum(is_done(load_record(Path(out), u.key), u, settings) for u in units)


def _write_record(out: Path, unit: Unit, record: Record, settings: str) -> Record:
    record.name, record.settings = unit.name, settings
    record.fingerprint = _plain(unit.fingerprint)
    _atomic_write(record_path(out, unit.key), json.dumps(asdict(record), allow_nan=False))
    return record


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
        cause = nan_cause(spec)
        if cause and spec.module not in _NAN_WARNED:
            _NAN_WARNED.add(spec.module)
            log.warning("the model %s: its output will be NaN, so every image will fail; "
                        "fix the model file", cause)

    def size_for(self, spatial, count: int) -> int:
        size = self.runners[0].size_for(spatial, count)
        for r in self.runners[1:]:
            r.batch_size = size
        return size

    def __call__(self, raw: np.ndarray):
        outs = [r(raw) for r in self.runners]
        return tuple(np.stack([o[j] for o in outs], 1) for j in range(3))


_NAN_WARNED: weakref.WeakSet = weakref.WeakSet()  # models nan_cause reported: warned once


def nan_cause(spec) -> str:
    """Where a model's NaN output would come from, found without running it: non-finite
    mean/std or weights (a sidecar can't be trusted to have been validated: a spec may be built
    directly). '' when both are finite."""
    for field_name in ("mean", "std"):
        values = np.asarray(getattr(spec, field_name), dtype=np.float64)
        if not np.all(np.isfinite(values)):
            return f"has a non-finite {field_name} {getattr(spec, field_name)!r}"
    import torch

    bad = []
    with torch.no_grad():
        for name, t in spec.module.state_dict().items():
            if torch.is_tensor(t) and t.is_floating_point():
                n = t.numel() - int(torch.isfinite(t).sum())
                if n:
                    bad.append(f"{name} ({n})")
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        return f"has NaN/inf weights in {', '.join(bad[:3])}{more}"
    return ""


def _nonfinite_images(heat: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Flat indices of images whose scores or heatmaps hold NaN/inf."""
    n = scores.shape[0]
    ok = np.isfinite(scores.reshape(n, -1)).all(1) & np.isfinite(heat.reshape(n, -1)).all(1)
    return np.flatnonzero(~ok)


def finish_unit(unit: Unit, out: Path, pixels: np.ndarray | None, heat: np.ndarray,
                class_ids: np.ndarray, scores: np.ndarray, lead: tuple, mask, opts: Options,
                class_names: list, seconds: float, settings: str = "") -> Record:
    """Regions, heatmap file, GeoJSON, overlays, then the record (last: it marks the unit
    done). ``heat`` is (n, K, *spatial): one map per target (K classes for "found", where only
    classes with a positive logit count). Runs on a writer thread or a dask worker."""
    bad = _nonfinite_images(heat, scores)
    if bad.size:  # pixels were checked finite when read: the model made the NaN
        which = ""
        if lead:
            start = unit.start if unit.kind == "parts" else 0
            idx = [" ".join(str(i + (start if k == 0 else 0)) for k, i in
                            enumerate(np.unravel_index(b, lead))) for b in bad[:5]]
            which = (f" (image{'s' * (bad.size > 1)} {', '.join(idx)}"
                     f"{f' and {bad.size - 5} more' if bad.size > 5 else ''} of {heat.shape[0]})")
        return _failed(unit, out, f"the model's output is NaN/inf for it{which}: check the "
                       "weights (and mean/std)", settings)
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
    note = tiff_series_note(unit.path) if unit.kind != "array" else ""  # skipped series
    record = Record(unit.key, unit.path or unit.name, "ok", note, images, shape,
                    str(geo.relative_to(out)), round(seconds, 4))
    return _write_record(out, unit, record, settings)


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


def _failed(unit: Unit, out: Path, message: str, settings: str = "") -> Record:
    message = " ".join(str(message).split())
    record = _write_record(out, unit, Record(unit.key, unit.path or unit.name, "failed",
                                             message), settings)
    log.warning("%s: %s", unit.path or unit.name, message)
    return record


def prepare_outputs(units: list[Unit], out: Path, channel_axis=None,
                    spatial_dims: int = 2) -> None:
    """Create what units write into together: the heatmap zarr arrays of inputs read in
    parts (made again when the source's shape changed). Only the process holding the output
    folder (see :func:`claim_output`) calls it, before any unit is written."""
    out = Path(out)
    (out / STATE_DIR / "records").mkdir(parents=True, exist_ok=True)
    for unit in {u.name: u for u in units if u.kind == "parts"}.values():
        target = out / "heatmaps" / f"{unit.name}.zarr"
        lay = layout(open_lazy(unit.path).shape, channel_axis, spatial_dims)
        shape = (*lay.lead, *lay.spatial)
        if target.exists():
            try:
                if tuple(_zarr().open(str(target), mode="r").shape) == shape:
                    continue
            except Exception:  # noqa: BLE001 - damaged: made again below
                pass
        _zarr().open(str(target), mode="w", shape=shape, dtype="f4",
                     chunks=(1,) * len(lay.lead) + tuple(lay.spatial), fill_value=0.0)


# ---- the output folder: one run at a time, one set of settings --------------------------------
#
# A run holds an exclusive lock on OUT/.napari-gradcam/lock for as long as it writes, so that two
# runs never interleave their files. OUT/.napari-gradcam/run.json holds the settings that made the
# results; a rerun with other settings is refused before any model runs unless it may redo
# everything (overwrite). OUT/.napari-gradcam/names.json maps each output name to the source it
# belongs to, so that a source keeps its name across runs and same-named sources never share one.

RUN_FILE = "run.json"
NAMES_FILE = "names.json"
LOCK_FILE = "lock"
# what tempfile.mkstemp names the files export.atomic_output and _atomic_write write into
_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)?$")
_HELD: dict[str, "Run"] = {}  # output folders this process holds, by resolved path
_SETTING_NAMES = {
    "model": "--model", "method": "--method", "target": "--target",
    "threshold": "--threshold", "threshold_mode": "--threshold-mode",
    "min_area": "--min-area", "simplify": "--simplify", "mask": "--mask",
    "channel_axis": "channel axis", "overlay": "--overlay",
    "model_input": "the model's input (channels, size, normalisation, classes, layer)",
}


class OutputInUse(ValueError):
    """Another process is writing into the output folder."""


class SettingsChanged(ValueError):
    """The output folder holds results made with other settings."""


@dataclass
class Run:
    """This process's hold on an output folder: the settings digest every record carries and
    the folder's names index."""

    out: Path
    settings: dict
    digest: str
    claims: dict
    _lock_fd: int = -1

    def name(self, units: list[Unit]) -> list[Unit]:
        """``units`` under the names this folder knows their sources by (new sources get
        free names, recorded before any of their files is written)."""
        units, claims = name_units(units, self.claims)
        if claims != self.claims:
            self.claims = claims
            _atomic_write(self.out / STATE_DIR / NAMES_FILE,
                          json.dumps(claims, indent=1, sort_keys=True))
        return units


def _sha256_files(paths) -> str:
    h = hashlib.sha256()
    for role, path in paths:
        h.update(f"{role}\0".encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


_STATE_DIGESTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _state_digest(module) -> str:
    """sha256 of a module's state dict, kept while no tensor of it changed (same storage, same
    in-place version counter): a script that runs the same model again pays the hash once."""
    import torch

    state = module.state_dict()
    key = tuple((k, v.data_ptr(), v._version, str(v.dtype), tuple(v.shape), str(v.device))
                for k, v in state.items())
    known = _STATE_DIGESTS.get(module)
    if known is not None and known[0] == key:
        return known[1]
    h = hashlib.sha256()
    for name, value in state.items():
        value = value.detach().cpu()
        if value.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
            value = value.float()  # NumPy has no such dtypes
        h.update(f"{name}{tuple(value.shape)}{value.dtype}".encode())
        h.update(value.contiguous().numpy().reshape(-1).view(np.uint8))
    _STATE_DIGESTS[module] = (key, h.hexdigest())
    return h.hexdigest()


def model_fingerprint(model) -> dict:
    """What identifies a model's results, cheaply: for files (a weights file, its sidecar,
    the bundled demo) the sha256 of their contents, whatever path they were given by; for an
    architecture name without a file, the name; for a ``ModelSpec`` the sha256 of its state
    dict. ``model`` is ``load_model``'s arguments as a dict (``{"source": ..., "weights":
    ...}``) or a ``ModelSpec``. Returns ``{"sha256": ..., "label": ...}``; only the hash is
    compared."""
    if not isinstance(model, dict):  # a ModelSpec
        return {"sha256": _state_digest(model.module),
                "label": str(getattr(model, "name", "model"))}
    source, weights = model.get("source"), model.get("weights")
    files, named = [], []
    if str(source).lower() == "demo":
        from .models import DEMO_DIR

        files = [("weights", DEMO_DIR / "demo.safetensors"),
                 ("sidecar", DEMO_DIR / "demo.safetensors.json")]
    elif Path(str(source)).is_file():
        path = Path(str(source))
        if path.suffix.lower() == ".json":
            files.append(("sidecar", path))
            if weights is None:
                with contextlib.suppress(OSError, ValueError, TypeError):
                    name = json.loads(path.read_text()).get("weights")
                    weights = path.parent / name if name else None
        else:
            from .models.loader import find_sidecar

            weights, side = path, find_sidecar(path)
            if side is not None:
                files.append(("sidecar", side))
    else:
        named.append(str(source))
    if weights is not None and Path(weights).is_file():
        files.insert(0, ("weights", Path(weights)))
    h = hashlib.sha256("\0".join(named).encode())
    h.update(_sha256_files(files).encode())
    label = f"{source} + {Path(weights).name}" if named and weights else str(source)
    return {"sha256": h.hexdigest(), "label": label}


def run_settings(opts: Options, model, spec=None, mask: str | None = None) -> dict:
    """The settings that change a run's results, as plain JSON values: the model (see
    :func:`model_fingerprint`), method, target, region and mask settings, overlays, and what
    the model is fed (channels, input size, normalisation, classes, target layer). Device,
    batch size and worker counts are left out: they don't change the results."""
    settings = {
        "model": model_fingerprint(model if model is not None else spec),
        "method": opts.method, "target": opts.target,
        "threshold": opts.threshold, "threshold_mode": opts.threshold_mode,
        "min_area": opts.min_area, "simplify": opts.simplify, "mask": mask,
        "channel_axis": opts.channel_axis, "overlay": bool(opts.overlay),
    }
    if spec is not None:
        settings["model_input"] = {
            "in_channels": spec.in_channels, "input_size": spec.input_size,
            "mean": spec.mean, "std": spec.std, "intensity": spec.intensity,
            "class_names": list(spec.class_names), "target_layer": spec.target_layer}
    return _plain(settings)


def _digest(settings: dict) -> str:
    plain = {k: (v["sha256"] if k == "model" else v) for k, v in settings.items()}
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:16]


def _show(key: str, value) -> str:
    if key == "model":
        return f"{value['label']} (sha256 {value['sha256'][:12]})"
    if value is None:
        return "none"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_show(k, v)}" for k, v in value.items())
    return json.dumps(value) if not isinstance(value, str) else value


def settings_changes(old: dict, new: dict) -> list[str]:
    """``"--method gradcam -> scorecam"`` for each setting that differs."""
    changes = []
    for key in dict.fromkeys([*old, *new]):
        a, b = old.get(key), new.get(key)
        if key == "model":
            a, b = (a or {"sha256": "", "label": "none"}), (b or {"sha256": "", "label": "none"})
            if a["sha256"] == b["sha256"]:
                continue
        elif key == "model_input" and isinstance(a, dict) and isinstance(b, dict):
            diff = [k for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]
            if diff:
                changes.append(f"{_SETTING_NAMES[key]}: " + ", ".join(
                    f"{k} {_show(k, a.get(k))} -> {_show(k, b.get(k))}" for k in diff))
            continue
        elif a == b:
            continue
        changes.append(f"{_SETTING_NAMES.get(key, key)} {_show(key, a)} -> {_show(key, b)}")
    return changes


def check_output(out, inputs: Iterable = ()) -> Path:
    """Refuse, before anything is written, an output folder that is a file, can't be created
    or written, or is (or holds) one of the inputs, whose outputs would be read back as
    inputs. An output folder inside an input folder is fine: the search leaves it out."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a folder; give a folder to write "
                         "into (it is created if missing).")
    ancestor = out.absolute()
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"--out {str(out)!r} can't be created: {str(ancestor)!r} is a file, "
                         "not a folder; give a folder path.")
    if not os.access(ancestor, os.W_OK | os.X_OK) or (
            (out / STATE_DIR).is_dir() and not os.access(out / STATE_DIR, os.W_OK | os.X_OK)):
        raise ValueError(f"--out {str(out)!r} is not writable (no write permission on "
                         f"{str(ancestor)!r}); give a folder you can write into.")
    real = Path(_resolved(out))
    for item in inputs:
        src = Path(_resolved(item))
        if src == real or real in src.parents:
            where = "is" if src == real else "lies inside"
            raise ValueError(f"input {str(item)!r} {where} --out {str(out)!r}, so the "
                             "outputs would be read back as inputs; give --out a folder of "
                             "its own (a subfolder of an input folder is fine).")
    return out


def held_run(out) -> Run | None:
    """The hold this process has on ``out``, if any."""
    return _HELD.get(_resolved(out))


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ValueError(f"{str(path)!r} is damaged ({err}); delete it to start the output "
                         "folder afresh, or use a new --out.") from None


def _refuse_changed(out: Path, settings: dict, overwrite: bool) -> bool:
    """Raise SettingsChanged if ``out`` holds results of other settings (unless
    ``overwrite``); True when run.json must be (re)written."""
    old = _read_json(out / STATE_DIR / RUN_FILE)
    if old is None:
        return True
    old_settings = old.get("settings", {}) if isinstance(old, dict) else {}
    if _digest(old_settings) == _digest(settings):
        return False
    if not overwrite:
        changes = settings_changes(old_settings, settings) or ["the settings' format"]
        raise SettingsChanged(
            f"{str(out)!r} holds results made with other settings ({'; '.join(changes)}); "
            "pass --overwrite to redo every input with the new settings, or use a new --out.")
    return True


def _lock(out: Path) -> int:
    """An exclusive, non-blocking lock on OUT/.napari-gradcam/lock, which then names this
    process; OutputInUse naming the holder if another process has it. The lock goes with the
    process: the system releases it when the process ends, however it ends."""
    path = out / STATE_DIR / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        _flock(fd)
    except OSError:
        try:
            holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except (OSError, ValueError):
            holder = {}
        os.close(fd)
        who = (f"process {holder.get('pid', '?')} on {holder.get('host', '?')}, started "
               f"{holder.get('started', '?')}" if holder else "another process")
        raise OutputInUse(f"{str(out)!r} is in use by another napari-gradcam run ({who}); "
                          "wait for it to finish, or use another --out.") from None
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    return fd


def _flock(fd: int) -> None:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _unlock(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)  # while still held: the next holder writes its own name
    with contextlib.suppress(OSError):
        try:
            import fcntl
        except ImportError:
            import msvcrt

            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _remove_stale_temps(out: Path) -> None:
    """Delete the temporary files a killed run of ours left: only while holding the lock (no
    run of ours is writing), only where we write, only files named as ours."""
    ours = {"heatmaps", "geojson", "overlays", f"{STATE_DIR}/records"}
    top = {"summary.csv", "coco.json", f"{STATE_DIR}/{RUN_FILE}", f"{STATE_DIR}/{NAMES_FILE}"}
    for folder in (*ours, ".", STATE_DIR):
        with contextlib.suppress(OSError):
            for stale in (out / folder).iterdir():
                if not _TEMP.match(stale.name) or not stale.is_file() or stale.is_symlink():
                    continue
                if folder not in ours and not any(
                        stale.name.startswith(f".{Path(t).name}.") for t in top
                        if str(Path(t).parent) == folder):
                    continue
                with contextlib.suppress(OSError):
                    stale.unlink()


@contextlib.contextmanager
def claim_output(out, settings: dict, *, overwrite: bool = False) -> Iterator[Run]:
    """Hold the output folder for one run: refuse at once (ValueError, nothing written) when
    it is not a writable folder, holds results of other settings (unless ``overwrite``) or
    another process writes into it; then record the settings, delete our own stale temporary
    files and yield the :class:`Run`. The lock is released when the block ends, however it
    ends (an exception, Ctrl-C)."""
    out = check_output(out)
    key = _resolved(out)
    if key in _HELD:
        raise OutputInUse(f"{str(out)!r} is already being written by this process; use "
                          "another --out.")
    _refuse_changed(out, settings, overwrite)  # before creating or locking anything
    try:
        (out / STATE_DIR / "records").mkdir(parents=True, exist_ok=True)
        fd = _lock(out)
    except OSError as err:
        raise ValueError(f"can't write into --out {str(out)!r} ({err.strerror or err}); give "
                         "a folder you can write into.") from None
    try:
        if _refuse_changed(out, settings, overwrite):  # again, now that no one else writes
            _atomic_write(out / STATE_DIR / RUN_FILE,
                          json.dumps({"settings": settings}, indent=1, sort_keys=True))
        _remove_stale_temps(out)
        claims = _read_json(out / STATE_DIR / NAMES_FILE) or {}
        if not isinstance(claims, dict):
            claims = {}
        run = Run(out, settings, _digest(settings), claims, fd)
        _HELD[key] = run
        yield run
    finally:
        _HELD.pop(key, None)
        _unlock(fd)


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


def _unit_header(unit: Unit, arrays) -> tuple | None:
    """(shape, dtype, already in memory) of what reading ``unit`` decodes, from headers only."""
    if unit.kind == "array":
        a = arrays[unit.name]
        return tuple(a.shape), a.dtype, True
    if unit.kind == "parts":
        a = open_lazy(unit.path)
        return tuple(a.shape), a.dtype, False
    head = memory.image_header(unit.path)
    return None if head is None else (*head, False)


def memory_problem(unit: Unit, spec, opts: Options, dims: int, arrays=None) -> str | None:
    """Why ``unit`` can't fit in the memory available now (one sentence with the numbers), or
    None. Read from headers before decoding: a 20000 x 20000 TIFF, or a model whose
    input_size is huge, is refused instead of growing the process until the system kills it."""
    try:
        head = _unit_header(unit, arrays)
    except Exception:  # noqa: BLE001 - unreadable headers: reading the unit reports why
        return None
    if head is None:
        return None
    shape, dtype, in_memory = head
    try:
        lay = layout(shape, opts.channel_axis, dims)
        if unit.kind == "parts" and lay.lead and unit.stop is not None:  # this part only
            shape = (unit.stop - unit.start, *shape[1:])
            lay = layout(shape, opts.channel_axis, dims)
    except ValueError:
        return None  # reading the unit reports the shape problem
    found = isinstance(opts.target, str) and opts.target.lower() == FOUND
    need = memory.estimate(shape, dtype, lay, spec.in_channels, spec.input_size,
                           already_decoded=in_memory,
                           targets=len(spec.class_names) if found else 1)
    device = resolve_device(opts.device)
    return memory.refusal(need, memory.available_host_memory(),
                          memory.available_device_memory(device),
                          describe_device(device))


def _load(unit: Unit, spec, opts: Options, dims: int, arrays) -> tuple:
    """Reader thread: pixels, raw (n, *spatial, C), leading shape, mask; or the exception."""
    try:
        problem = memory_problem(unit, spec, opts, dims, arrays)
        if problem:
            raise MemoryError(problem)
        pixels = read_unit(unit, arrays, opts.channel_axis)
        lay = layout(pixels.shape, opts.channel_axis, dims)
        check_channels(lay.channels, spec.in_channels)
        if lay.channels == 3 and spec.in_channels == 1:
            data = np.moveaxis(pixels, lay.channel_axis, -1)
            if not (np.array_equal(data[..., 0], data[..., 1])
                    and np.array_equal(data[..., 0], data[..., 2])):
                raise colour_for_grey_model()  # per file, before it joins a batch
        raw = read_batch(pixels, lay, 0, lay.count if lay.lead else 1)
        if raw.dtype.kind in "fc":  # NaN would pass through the model as an empty heatmap
            bad = raw.size - int(np.count_nonzero(np.isfinite(raw)))
            if bad:
                raise ValueError(f"its pixels contain NaN/inf at {bad} position"
                                 f"{'s' * (bad != 1)}; replace them (e.g. with 0) or crop them "
                                 "away before the run")
            if raw.dtype.itemsize > 4:  # the model computes in float32: 1e300 becomes inf
                big = int(np.count_nonzero(np.abs(raw) > np.finfo(np.float32).max))
                if big:
                    raise ValueError(f"its pixels exceed float32's range (about 3.4e38) at {big} "
                                     f"position{'s' * (big != 1)}, where the model would see "
                                     "inf; rescale the image before the run")
        mask = _read_mask(unit)
        if mask is not None and tuple(mask.shape) != tuple(lay.spatial):
            raise ValueError(f"its mask {unit.mask!r} has shape {tuple(mask.shape)}, the image "
                             f"{tuple(lay.spatial)}")
        return pixels, raw, lay.lead, mask
    except Exception as err:  # noqa: BLE001 - reported in the summary, the run goes on
        return err


def process_units(units: list[Unit], spec, out, opts: Options, *,
                  progress: Callable[[int, int, str], None] | None = None,
                  arrays: dict | None = None, clean: bool = True,
                  settings: str | None = None) -> list[Record]:
    """Run the pipeline over ``units`` (skipping those finished from the same source with the
    same settings, unless ``opts.overwrite``); returns a record per unit.
    ``progress(images_done, units_done, unit_key)`` after each unit.

    ``clean``: this process owns ``out``; unless it already holds it, it claims it for the
    call (:func:`claim_output`: the lock, the settings check, the names index, stale temporary
    files), with the settings :func:`run_settings` derives from ``opts`` and ``spec``. Dask
    workers pass ``clean=False`` and the client's ``settings`` digest: the client holds the
    folder for them."""
    out = Path(out)
    runner = Explainer(spec, opts)  # a bad method or target: said before anything is touched
    run = held_run(out)
    if clean and run is None:
        with claim_output(out, run_settings(opts, None, spec),
                          overwrite=opts.overwrite) as run:
            return process_units(run.name(units), spec, out, opts, progress=progress,
                                 arrays=arrays)
    if settings is None:
        settings = run.digest if run is not None else ""
    dims = runner.dims
    if clean:
        prepare_outputs(units, out, opts.channel_axis, dims)
    records: dict[str, Record] = {}
    todo = []
    for unit in units:
        old = None if opts.overwrite else load_record(out, unit.key)
        if is_done(old, unit, settings):
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
                             p.lead, p.mask, opts, class_names, time.perf_counter() - p.t0,
                             settings)
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
                finished(_failed(p.unit, out, f"the model failed on it: {err}", settings))
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
                finished(_failed(unit, out, f"unreadable or unusable: {loaded}", settings))
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
                        finished(_failed(unit, out, f"the model failed on it: {err}",
                                         settings))
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
        return _failed(unit, out, f"writing its results failed: {err}", args[-1])


# ---- the run's summary files ----------------------------------------------------------------

SUMMARY_COLUMNS = ("file", "index", "class", "score", "regions", "status", "message")


def write_summary(records: list[Record], out: Path, class_names: list) -> tuple[Path, Path]:
    """summary.csv (a row per image, a row per failed unit) and coco.json (every image of
    every finished unit, regions read back from the units' GeoJSON)."""
    out = Path(out)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(SUMMARY_COLUMNS)
    entries, file_names, used = [], [], set()
    for rec in records:
        if rec.status != "ok":
            w.writerow([rec.source, "", "", "", "", rec.status, rec.message])
            continue
        for img in rec.images:  # a row per image (per class found, with --target found)
            w.writerow([rec.source, " ".join(map(str, img["index"])), img["class"],
                        f"{img['score']:.6g}", img["regions"], "ok", rec.message])
        annotations, _meta = read_geojson(out / rec.geojson)
        lead = len(rec.shape) - 2
        indices = list(dict.fromkeys(tuple(img["index"]) for img in rec.images))
        base = rec.name or (Path(rec.source).stem if rec.source else rec.unit)
        suffix = Path(rec.source).suffix.lower()
        suffix = Path(rec.source).suffix if suffix in IMAGE_SUFFIXES else ".png"
        for idx in indices:
            stem = base + "".join(f"_{i}" for i in idx) if lead else base
            entries.append((stem, rec.shape[lead:],
                            [replace(a, index=()) for a in annotations
                             if tuple(a.index) == idx or not lead]))
            file_names.append(_unique(stem, suffix, used))
    summary = _atomic_write(out / "summary.csv", buf.getvalue())
    coco = write_coco_dataset(entries, out / "coco.json", class_names=class_names)
    if file_names != [f"{e[0]}.png" for e in entries]:
        _rename_coco_images(coco, file_names)
    return summary, coco


def _unique(stem: str, suffix: str, used: set) -> str:
    """``stem + suffix``, or ``stem-2 + suffix`` ... when another image has that name (a file
    named like a stack's image: ``a_0.tif`` beside frame 0 of ``a.tif``)."""
    name, k = f"{stem}{suffix}", 2
    while name.casefold() in used:
        name, k = f"{stem}-{k}{suffix}", k + 1
    used.add(name.casefold())
    return name


def _rename_coco_images(path: Path, file_names: list[str]) -> None:
    """Give coco.json's images their unique names with the source's real extension (the COCO
    writer names every image ``<name>.png``)."""
    from .export import _dumps

    doc = json.loads(Path(path).read_text())
    if len(doc.get("images", ())) == len(file_names):
        for image, name in zip(doc["images"], file_names):
            image["file_name"] = name
        _atomic_write(path, _dumps(doc))


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


__all__ = ["IMAGE_SUFFIXES", "OutputInUse", "Options", "Record", "Run", "SettingsChanged", "Unit",
           "check_output", "claim_output", "collect_units", "finish_unit", "name_units",
           "overlay_rgb", "process_units", "read_unit", "run_settings", "write_summary"]

