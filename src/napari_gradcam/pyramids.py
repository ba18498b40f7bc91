"""Pyramidal images in (OME-TIFF, Aperio SVS, tiled TIFF, OME-Zarr; openslide for the rest) and
heat pyramids out (OME-Zarr), all lazy: a slide of 40,000 x 40,000 pixels is opened without
reading its pixels, and a level is a zarr array (or an array-like) read tile by tile.

Conventions shared with the tiled engine and the front ends:

- ``Pyramid.levels[k]`` is (H, W) or (H, W, C) (channels last; axes of size one other than
  Y, X and the channels are dropped, longer ones stay in front), level 0 the finest.
- ``Pyramid.downsamples[k]`` is the (rows, cols) factor of level k against level 0, so a
  position in level-k pixels times it is a position in level-0 pixels (what QuPath expects).
- ``write_heat_pyramid`` writes a heatmap of level k of a slide as an OME-Zarr whose scale
  transforms put it on the slide's level-0 grid (and in micrometres when the slide's pixel
  size is given), so napari draws the two on top of each other.

The module never imports napari or Qt; zarr is imported when a pyramid is opened or written.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "Pyramid",
    "is_pyramid_file",
    "open_pyramid",
    "pick_level",
    "write_heat_pyramid",
]

# slide formats tifffile reads as pyramids without an OME or plain .tif name
SLIDE_SUFFIXES = (".svs", ".ndpi", ".scn", ".bif", ".qptiff")
# formats only openslide reads (a folder of files, or a vendor container)
OPENSLIDE_SUFFIXES = (".mrxs", ".vms", ".vmu")
TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".tf2")
INSTALL_SLIDES = "pip install 'napari-gradcam[slides]'"

_UNITS_TO_MICRONS = {
    "micrometer": 1.0, "micron": 1.0, "um": 1.0, "\u00b5m": 1.0, "\u03bcm": 1.0,
    "nanometer": 1e-3, "nm": 1e-3, "millimeter": 1e3, "mm": 1e3,
    "centimeter": 1e4, "cm": 1e4, "meter": 1e6, "m": 1e6,
}


# ---- lazy views --------------------------------------------------------------------------

class AxesView:
    """A lazy view of an array with its axes reordered and its length-one axes dropped (what a
    zarr array can't do without reading): ``source_axes`` lists, for each axis of the view, the
    axis of ``array`` it shows; every other axis of ``array`` has length one and is read at 0."""

    def __init__(self, array, source_axes: tuple[int, ...]):
        self.array = array
        self.source_axes = tuple(source_axes)
        self.shape = tuple(int(array.shape[a]) for a in self.source_axes)
        self.dtype = np.dtype(array.dtype)
        self.ndim = len(self.shape)
        chunks = getattr(array, "chunks", None)
        self.chunks = (tuple(chunks[a] for a in self.source_axes)
                       if isinstance(chunks, tuple) else None)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"AxesView(shape={self.shape}, dtype={self.dtype}, of {type(self.array).__name__})"

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            key = (key,)
        if any(k is Ellipsis for k in key):
            i = next(i for i, k in enumerate(key) if k is Ellipsis)
            fill = self.ndim - (len(key) - 1)
            key = key[:i] + (slice(None),) * fill + key[i + 1:]
        if len(key) > self.ndim:
            raise IndexError(f"too many indices: the array has {self.ndim} axes")
        key = key + (slice(None),) * (self.ndim - len(key))
        for k in key:
            if not isinstance(k, (slice, int, np.integer)):
                raise TypeError("a level is indexed with integers and slices")
        src = [0] * self.array.ndim
        for k, a in zip(key, self.source_axes):
            src[a] = k
        out = self.array[tuple(src)]
        # the result's axes are the source's sliced axes in source order; put them in view order
        kept = [a for k, a in zip(key, self.source_axes) if isinstance(k, slice)]
        order = sorted(kept)
        perm = [order.index(a) for a in kept]
        out = np.asarray(out)
        return out.transpose(perm) if perm != sorted(perm) else out

    def __array__(self, dtype=None, copy=None):
        out = self[...]
        return out.astype(dtype) if dtype is not None else out


class OpenSlideLevel:
    """One openslide level as a lazy (H, W, 3) uint8 array: slicing reads that region only."""

    def __init__(self, slide, level: int):
        self.slide = slide
        self.level = level
        w, h = slide.level_dimensions[level]
        self.shape = (int(h), int(w), 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3
        self.downsample = float(slide.level_downsamples[level])
        self.chunks = (512, 512, 3)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            key = (key,)
        key = tuple(k for k in key if k is not Ellipsis)
        key = key + (slice(None),) * (3 - len(key))
        ranges, drop = [], []
        for ax, k in enumerate(key[:2]):
            n = self.shape[ax]
            if isinstance(k, (int, np.integer)):
                i = int(k) + n if k < 0 else int(k)
                if not 0 <= i < n:
                    raise IndexError(f"index {k} is out of bounds for a side of {n}")
                ranges.append((i, i + 1, 1))
                drop.append(ax)
            elif isinstance(k, slice):
                ranges.append(k.indices(n))
            else:
                raise TypeError("a level is indexed with integers and slices")
        (y0, y1, sy), (x0, x1, sx) = ranges
        h, w = max(0, y1 - y0), max(0, x1 - x0)
        if h and w:
            # read_region takes level-0 coordinates for the corner and level pixels for the size
            region = self.slide.read_region(
                (round(x0 * self.downsample), round(y0 * self.downsample)),
                self.level, (w, h))
            out = np.asarray(region.convert("RGB"))
        else:
            out = np.zeros((h, w, 3), np.uint8)
        out = out[::sy, ::sx][..., key[2]]
        for ax in reversed(drop):
            out = out.take(0, axis=ax)
        return out

    def __array__(self, dtype=None, copy=None):
        out = self[...]
        return out.astype(dtype) if dtype is not None else out


# ---- the pyramid -------------------------------------------------------------------------

@dataclass
class Pyramid:
    """An open pyramidal image. ``levels`` are lazy arrays, level 0 (the finest) first, each
    (H, W) or (H, W, C); ``downsamples[k]`` is level k's (rows, cols) factor against level 0;
    ``channel_axis`` is -1 style index of the channels in a level (None: one channel);
    ``mpp`` the (y, x) micrometres per level-0 pixel when the file says. ``scale`` and
    ``translate`` place level 0 in the world (micrometres when ``mpp`` is known, else the
    file's own units or pixels): what a napari layer of it takes."""

    path: Path
    format: str
    levels: list
    downsamples: list[tuple[float, float]]
    channel_axis: int | None = None
    mpp: tuple[float, float] | None = None
    axes: str = "YX"
    scale: tuple[float, float] = (1.0, 1.0)
    translate: tuple[float, float] = (0.0, 0.0)
    metadata: dict = field(default_factory=dict)
    _closers: list = field(default_factory=list, repr=False)

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """(H, W) of every level."""
        return [_spatial(a, self.channel_axis) for a in self.levels]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.levels[0].dtype)

    @property
    def rgb(self) -> bool:
        """Three or four 8-bit channels last: a colour slide napari shows as RGB(A)."""
        a = self.levels[0]
        return (self.channel_axis is not None and a.shape[-1] in (3, 4)
                and np.dtype(a.dtype) == np.uint8)

    def __len__(self) -> int:
        return len(self.levels)

    def level(self, k):
        """Level ``k``'s lazy array; a level that doesn't exist is a ValueError naming those
        that do."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"a pyramid level is a whole number, not {k!r}; {self._which()}")
        if not 0 <= k < len(self.levels):
            raise ValueError(f"level {k} doesn't exist; {self._which()}")
        return self.levels[int(k)]

    def _which(self) -> str:
        sizes = ", ".join(f"{w} x {h}" for h, w in self.shapes)
        n = len(self.levels)
        if n == 1:
            return f"this image has only level 0 ({sizes})"
        return f"this image has levels 0-{n - 1} ({sizes})"

    def close(self) -> None:
        while self._closers:
            with contextlib.suppress(Exception):
                self._closers.pop()()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _spatial(array, channel_axis) -> tuple[int, int]:
    shape = tuple(array.shape)
    if channel_axis is not None:
        shape = shape[:-1]
    return int(shape[-2]), int(shape[-1])


def _check_levels(name: str, shapes: list[tuple[int, int]]) -> None:
    for k in range(1, len(shapes)):
        (h0, w0), (h1, w1) = shapes[k - 1], shapes[k]
        if h1 > h0 or w1 > w0 or (h1, w1) == (h0, w0):
            raise ValueError(
                f"{name} is not a pyramid this can read: level {k} ({w1} x {h1}) is not smaller "
                f"than level {k - 1} ({w0} x {h0}); save it with levels that shrink "
                "(largest first), or open it as a plain image.")


def _downsamples(shapes) -> list[tuple[float, float]]:
    h0, w0 = shapes[0]
    return [(h0 / h, w0 / w) for h, w in shapes]


# ---- recognising files -------------------------------------------------------------------

def _is_ome_zarr_dir(p: Path) -> bool:
    for meta in (".zattrs", "zarr.json"):
        f = p / meta
        if f.is_file():
            try:
                if f.stat().st_size > 16 * 2 ** 20:
                    return False
                attrs = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError, UnicodeDecodeError):
                return False
            if meta == "zarr.json":
                attrs = attrs.get("attributes", {}) if isinstance(attrs, dict) else {}
                attrs = attrs.get("ome", attrs) if isinstance(attrs, dict) else {}
            return isinstance(attrs, dict) and "multiscales" in attrs
    return False


def _tiff_header(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def is_pyramid_file(path) -> bool:
    """Cheap check (name and header, no pixels): an OME-Zarr folder with multiscales metadata,
    a slide file (.svs, .ndpi, ..., or one only openslide reads), an OME-TIFF, or a TIFF whose
    first series has several levels. A plain one-level TIFF is not (napari's own reader keeps
    it), though ``open_pyramid`` opens it as a one-level pyramid."""
    p = Path(path)
    name = p.name.lower()
    if p.is_dir():
        return _is_ome_zarr_dir(p)
    if not p.is_file():
        return False
    if name.endswith(OPENSLIDE_SUFFIXES):
        return True
    if not _tiff_header(p):
        return False
    if name.endswith(SLIDE_SUFFIXES) or name.endswith((".ome.tif", ".ome.tiff", ".ome.btf")):
        return True
    if not name.endswith(TIFF_SUFFIXES):
        return False
    import tifffile

    try:
        with tifffile.TiffFile(p) as tif:
            return len(tif.series[0].levels) > 1
    except Exception:  # noqa: BLE001 - any unreadable TIFF is simply not a pyramid here
        return False


# ---- opening -----------------------------------------------------------------------------

def open_pyramid(path, *, backend: str | None = None) -> Pyramid:
    """Open a pyramidal image lazily: OME-Zarr (NGFF 0.4 / 0.5, zarr v2 or v3), OME-TIFF
    (SubIFDs or series levels), Aperio SVS and any TIFF tifffile reads (one level when it has
    no others), or through openslide when tifffile can't read the file and openslide is
    installed. ``backend`` ("tifffile", "zarr", "openslide") forces one reader.

    Raises FileNotFoundError for a missing path and ValueError with one sentence for a file
    that is truncated, not an image, needs a codec that isn't installed, or whose levels
    don't make a pyramid.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} doesn't exist; check the path.")
    if backend not in (None, "tifffile", "zarr", "openslide"):
        raise ValueError(f"backend {backend!r} is not one of 'tifffile', 'zarr', 'openslide'; "
                         "leave it out to choose by the file.")
    if backend == "zarr" or (backend is None and p.is_dir()
                             and not p.name.lower().endswith(OPENSLIDE_SUFFIXES)):
        return _open_ome_zarr(p)
    if backend == "openslide":
        return _open_openslide(p)
    if backend is None and p.name.lower().endswith(OPENSLIDE_SUFFIXES):
        return _open_openslide(p)
    return _open_tiff(p, fallback=backend is None)


def _openslide_or_none():
    try:
        import openslide
    except (ImportError, OSError):  # OSError: the library is missing under the bindings
        return None
    return openslide


def _open_tiff(p: Path, *, fallback: bool) -> Pyramid:
    import tifffile

    size = p.stat().st_size
    if not _tiff_header(p):
        if fallback and _openslide_or_none() is not None:
            with contextlib.suppress(ValueError):
                return _open_openslide(p)
        raise ValueError(
            f"{p.name} is not a TIFF slide ({'empty' if size == 0 else 'no TIFF header'}): "
            "open a pyramidal OME-TIFF, SVS or OME-Zarr, or install openslide "
            f"({INSTALL_SLIDES}) for other slide formats.")
    try:
        tif = tifffile.TiffFile(p)
    except Exception as err:  # noqa: BLE001 - tifffile raises many kinds for damaged files
        if fallback and _openslide_or_none() is not None:
            with contextlib.suppress(ValueError):
                return _open_openslide(p)
        raise ValueError(f"{p.name} can't be read as a TIFF ({err}): it may be truncated or "
                         "damaged; copy it again.") from None
    try:
        return _tiff_pyramid(p, tif, size)
    except BaseException:
        tif.close()
        raise


_TIFF_FORMATS = (("is_ome", "ome-tiff"), ("is_svs", "svs"), ("is_ndpi", "ndpi"),
                 ("is_scn", "scn"), ("is_bif", "bif"), ("is_qpi", "qptiff"))


def _tiff_pyramid(p: Path, tif, size: int) -> Pyramid:
    import tifffile

    if not tif.series:
        raise ValueError(f"{p.name} holds no image tifffile can read; open another file.")
    series = tif.series[0]
    levels = list(series.levels)
    fmt = next((name for attr, name in _TIFF_FORMATS if getattr(tif, attr, False)), "tiff")

    # a truncated copy: some level's tiles (or strips) lie past the end of the file
    for k, level in enumerate(levels):
        end = 0
        for page in level.pages:
            if page is None:
                continue
            try:
                offsets = np.asarray(page.dataoffsets, np.int64)
                counts = np.asarray(page.databytecounts, np.int64)
            except Exception:  # noqa: BLE001
                raise ValueError(f"{p.name} ends before level {k}'s tile table: it is "
                                 f"truncated ({size} bytes); copy it again.") from None
            if offsets.size:
                end = max(end, int((offsets + counts).max()))
        if end > size:
            total = _expected_size(levels, size)
            raise ValueError(
                f"the file {p.name} ends before level {k}'s tiles: it is truncated ({size} of "
                f"{'at least ' if total is None else ''}{total or end} bytes); copy it again.")

    # compressed tiles that need a codec this environment lacks
    for k, level in enumerate(levels):
        comp = int(level.keyframe.compression)
        if comp != 1 and not _can_decode(comp):
            try:
                name = tifffile.COMPRESSION(comp).name
            except ValueError:
                name = f"compression {comp}"
            raise ValueError(
                f"{p.name} has {name}-compressed tiles and the codec for them is not installed: "
                f"install it with {INSTALL_SLIDES} (imagecodecs).")

    import zarr

    # the series' store at one level is an array (the first level's own store is the group)
    arrays = [zarr.open(series.aszarr(level=k), mode="r") for k in range(len(levels))]
    axes = series.axes.upper()
    arrays, axes, channel_axis = _standard_axes(arrays, axes, channel_letters="SC",
                                                space_letters="YX", name=p.name)
    shapes = [_spatial(a, channel_axis) for a in arrays]
    _check_levels(p.name, shapes)
    mpp = _tiff_mpp(tif, fmt)
    pyr = Pyramid(path=p, format=fmt, levels=arrays, downsamples=_downsamples(shapes),
                  channel_axis=channel_axis, mpp=mpp, axes=axes,
                  scale=mpp if mpp else (1.0, 1.0))
    pyr._closers.append(tif.close)
    return pyr


def _expected_size(levels, size) -> int | None:
    """The file's full size from every level's tile table, or None when a table itself lies
    past the end (then only a lower bound is known)."""
    end = 0
    try:
        for level in levels:
            for page in level.pages:
                offsets = np.asarray(page.dataoffsets, np.int64)
                if offsets.size:
                    end = max(end, int((offsets + np.asarray(page.databytecounts,
                                                              np.int64)).max()))
    except Exception:  # noqa: BLE001
        return None
    return end if end > size else None


def _can_decode(compression: int) -> bool:
    # a fresh codec table, so the check sees which codec modules are importable now
    try:
        from tifffile.tifffile import CompressionCodec

        CompressionCodec(encode=False)[compression]
    except ImportError:
        import tifffile

        try:
            tifffile.TIFF.DECOMPRESSORS[compression]
        except KeyError:
            return False
    except KeyError:
        return False
    return True


def _tiff_mpp(tif, fmt: str) -> tuple[float, float] | None:
    if fmt == "ome-tiff":
        with contextlib.suppress(Exception):
            from xml.etree import ElementTree

            root = ElementTree.fromstring(tif.ome_metadata)
            pixels = next(e for e in root.iter() if e.tag.endswith("}Pixels") or e.tag == "Pixels")
            out = []
            for axis in ("Y", "X"):
                value = pixels.get(f"PhysicalSize{axis}")
                if value is None:
                    return None
                unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
                factor = _UNITS_TO_MICRONS.get(unit)
                if factor is None:
                    return None
                out.append(float(value) * factor)
            if all(v > 0 and math.isfinite(v) for v in out):
                return (out[0], out[1])
        return None
    if fmt == "svs":
        match = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", tif.pages[0].description or "")
        if match:
            with contextlib.suppress(ValueError):
                v = float(match.group(1))
                if v > 0 and math.isfinite(v):
                    return (v, v)
    return None


def _standard_axes(arrays, axes: str, *, channel_letters: str, space_letters: str, name: str):
    """Views of ``arrays`` (all with the axes ``axes``) ordered (..., Y, X[, C]), length-one
    extra axes dropped. Returns (arrays, axes of the views, channel_axis)."""
    y, x = space_letters
    if y not in axes or x not in axes:
        raise ValueError(f"{name} has axes {axes!r} without both {y} and {x}: it is not an "
                         "image this can read as a slide; open a 2D image.")
    chan = next((axes.index(c) for c in channel_letters if c in axes), None)
    shape = arrays[0].shape
    lead = [i for i, a in enumerate(axes)
            if a not in (y, x) and i != chan and shape[i] != 1]
    order = lead + [axes.index(y), axes.index(x)] + ([chan] if chan is not None else [])
    out_axes = "".join(axes[i] for i in order)
    channel_axis = len(order) - 1 if chan is not None else None
    if order == list(range(len(axes))):
        return arrays, out_axes, channel_axis
    return [AxesView(a, tuple(order)) for a in arrays], out_axes, channel_axis


# ---- OME-Zarr ----------------------------------------------------------------------------

def _open_ome_zarr(p: Path) -> Pyramid:
    import zarr

    if not p.is_dir():
        raise ValueError(f"{p.name} is not an OME-Zarr folder; open the folder that holds "
                         ".zattrs or zarr.json.")
    if not ((p / ".zattrs").is_file() or (p / "zarr.json").is_file()
            or (p / ".zgroup").is_file()):
        raise ValueError(f"{p.name} is a folder without zarr metadata (.zattrs / zarr.json): "
                         "it is not an OME-Zarr image; open the image's .zarr folder itself.")
    try:
        group = zarr.open_group(str(p), mode="r")
        attrs = dict(group.attrs)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{p.name} can't be opened as zarr ({err}); copy it again.") from None
    ms = attrs.get("multiscales")
    if ms is None and isinstance(attrs.get("ome"), dict):
        ms = attrs["ome"].get("multiscales")
    bad = (f"{p.name} has no valid OME-Zarr 'multiscales' metadata")
    if not isinstance(ms, list) or not ms or not isinstance(ms[0], dict):
        raise ValueError(f"{bad}: it is not an OME-Zarr image pyramid; write it with ome-zarr "
                         "or open the image folder inside it.")
    ms = ms[0]
    datasets = ms.get("datasets")
    if (not isinstance(datasets, list) or not datasets
            or not all(isinstance(d, dict) and isinstance(d.get("path"), str) for d in datasets)):
        raise ValueError(f"{bad} (its 'datasets' must list each level's 'path'); write it with "
                         "ome-zarr.")
    arrays = []
    for k, d in enumerate(datasets):
        try:
            a = group[d["path"]]
        except (KeyError, FileNotFoundError, ValueError):
            a = None
        if a is None or not hasattr(a, "shape") or not hasattr(a, "dtype"):
            raise ValueError(
                f"{p.name} lists level {k} at '{d['path']}' but that array is missing: the "
                "copy is incomplete; copy the whole folder again.")
        arrays.append(a)
    ndim = arrays[0].ndim
    if any(a.ndim != ndim for a in arrays):
        raise ValueError(f"{p.name}'s levels don't all have {ndim} axes; write the pyramid "
                         "again.")
    names, units = _ngff_axes(ms.get("axes"), ndim, p.name)
    axes = "".join(n.upper() if n in ("t", "c", "z", "y", "x") else "Q" for n in names)
    scales, translations = _ngff_transforms(ms, datasets, ndim, p.name)
    iy, ix = axes.index("Y") if "Y" in axes else -1, axes.index("X") if "X" in axes else -1
    views, out_axes, channel_axis = _standard_axes(arrays, axes, channel_letters="C",
                                                   space_letters="YX", name=p.name)
    shapes = [_spatial(a, channel_axis) for a in views]
    _check_levels(p.name, shapes)
    if scales is not None:
        s0 = scales[0]
        downsamples = [(s[iy] / s0[iy], s[ix] / s0[ix]) for s in scales]
        scale = (s0[iy], s0[ix])
        translate = ((translations[0][iy], translations[0][ix])
                     if translations is not None else (0.0, 0.0))
    else:
        downsamples, scale, translate = _downsamples(shapes), (1.0, 1.0), (0.0, 0.0)
    mpp = None
    fy, fx = _UNITS_TO_MICRONS.get(units[iy] or ""), _UNITS_TO_MICRONS.get(units[ix] or "")
    if fy and fx and scales is not None:
        mpp = (scale[0] * fy, scale[1] * fx)
    return Pyramid(path=p, format="ome-zarr", levels=views, downsamples=downsamples,
                   channel_axis=channel_axis, mpp=mpp, axes=out_axes,
                   scale=tuple(float(v) for v in scale),
                   translate=tuple(float(v) for v in translate),
                   metadata={"name": ms.get("name"), "multiscales": ms})


def _ngff_axes(axes, ndim: int, name: str) -> tuple[list[str], list[str | None]]:
    if axes is None:  # NGFF 0.1 / 0.2: always (t, c, z, y, x), trailing ones when fewer
        names = ["t", "c", "z", "y", "x"][-ndim:]
        return names, [None] * ndim
    if not isinstance(axes, list) or len(axes) != ndim:
        raise ValueError(f"{name}'s multiscales 'axes' don't match its arrays' {ndim} axes; "
                         "write the pyramid again with matching axes.")
    names, units = [], []
    for a in axes:
        if isinstance(a, str):
            names.append(a.lower())
            units.append(None)
        elif isinstance(a, dict) and isinstance(a.get("name"), str):
            names.append(a["name"].lower())
            units.append(a.get("unit"))
        else:
            raise ValueError(  # noqa: TRY004 - a damaged file, not a caller's mistake
                f"{name}'s multiscales 'axes' entry {a!r} has no name; write the "
                             "pyramid again with named axes.")
    return names, units


def _ngff_transforms(ms: dict, datasets: list, ndim: int, name: str):
    """Each level's scale and translation (the dataset's, times / plus the multiscale's own),
    or None when no level has a scale."""
    def parse(transforms):
        scale, translation = [1.0] * ndim, [0.0] * ndim
        found = False
        for t in transforms or ():
            if not isinstance(t, dict):
                continue
            values = t.get(t.get("type"))
            if t.get("type") not in ("scale", "translation"):
                continue
            if (not isinstance(values, list) or len(values) != ndim
                    or not all(isinstance(v, (int, float)) for v in values)):
                raise ValueError(f"{name} has a {t.get('type')} transform {values!r} that is not "
                                 f"{ndim} numbers; write the pyramid again.")
            if t["type"] == "scale":
                if not all(v > 0 for v in values):
                    raise ValueError(f"{name} has a scale {values!r} that is not positive; "
                                     "write the pyramid again.")
                scale, found = [float(v) for v in values], True
            else:
                translation = [float(v) for v in values]
        return scale, translation, found

    gscale, gtrans, gfound = parse(ms.get("coordinateTransformations"))
    scales, translations, any_found = [], [], gfound
    for d in datasets:
        s, t, found = parse(d.get("coordinateTransformations"))
        any_found = any_found or found
        scales.append([a * b for a, b in zip(s, gscale)])
        translations.append([a * gs + b for a, gs, b in zip(t, gscale, gtrans)])
    return (scales, translations) if any_found else (None, None)


# ---- openslide ---------------------------------------------------------------------------

def _open_openslide(p: Path) -> Pyramid:
    openslide = _openslide_or_none()
    if openslide is None:
        raise ValueError(f"{p.name} is not a file tifffile reads, and openslide (which reads "
                         f"more slide formats) is not installed: install it with "
                         f"{INSTALL_SLIDES}, or convert the slide to OME-TIFF.")
    try:
        slide = openslide.OpenSlide(str(p))
    except Exception as err:  # noqa: BLE001 - OpenSlideError / UnsupportedFormat / OSError
        raise ValueError(f"{p.name} is not a slide openslide can read ({err}): it may be "
                         "truncated, damaged or of another format; copy it again or convert it "
                         "to OME-TIFF.") from None
    levels = [OpenSlideLevel(slide, k) for k in range(slide.level_count)]
    shapes = [lv.shape[:2] for lv in levels]
    try:
        _check_levels(p.name, shapes)
    except ValueError:
        slide.close()
        raise
    mpp = None
    with contextlib.suppress(KeyError, ValueError, TypeError):
        mx = float(slide.properties["openslide.mpp-x"])
        my = float(slide.properties["openslide.mpp-y"])
        if mx > 0 and my > 0:
            mpp = (my, mx)
    pyr = Pyramid(path=p, format="openslide", levels=levels,
                  downsamples=[(float(d), float(d)) for d in slide.level_downsamples],
                  channel_axis=2, mpp=mpp, axes="YXC", scale=mpp if mpp else (1.0, 1.0),
                  metadata={"vendor": slide.properties.get("openslide.vendor")})
    pyr._closers.append(slide.close)
    return pyr


# ---- choosing a level --------------------------------------------------------------------

def pick_level(pyramid: Pyramid, *, mpp: float | None = None,
               max_side: int | None = None) -> int:
    """The level to explain. ``mpp``: the coarsest level whose pixels are at most that many
    micrometres (5 % slack), so the model sees the magnification it was trained on (needs the
    slide's pixel size). ``max_side``: the finest level whose longer side fits in it (the
    coarsest when none does). Neither: level 0."""
    if mpp is not None and max_side is not None:
        raise ValueError("give mpp or max_side, not both.")
    if mpp is not None:
        if not (isinstance(mpp, (int, float)) and mpp > 0):
            raise ValueError(f"mpp must be a positive number of micrometres, not {mpp!r}.")
        if pyramid.mpp is None:
            raise ValueError(f"{pyramid.path.name} doesn't say its pixel size, so a level can't "
                             "be chosen by micrometres per pixel; choose the level by number.")
        best = 0
        for k, (dy, dx) in enumerate(pyramid.downsamples):
            if max(pyramid.mpp[0] * dy, pyramid.mpp[1] * dx) <= mpp * 1.05:
                best = k
        return best
    if max_side is not None:
        if not (isinstance(max_side, (int, np.integer)) and max_side > 0):
            raise ValueError(
                f"max_side must be a positive whole number, not {max_side!r}.")
        for k, (h, w) in enumerate(pyramid.shapes):
            if max(h, w) <= max_side:
                return k
        return len(pyramid.levels) - 1
    return 0


# ---- writing heat pyramids ---------------------------------------------------------------

def _zarr_major() -> int:
    import zarr

    return int(str(zarr.__version__).split(".")[0])


def _create_v2_array(group, name: str, shape, chunks):
    """A float32 array in zarr format 2 with '/' chunk keys (NGFF 0.4), with zarr 2 or 3."""
    if _zarr_major() >= 3:
        return group.create_array(name, shape=shape, chunks=chunks, dtype="float32",
                                  fill_value=0.0,
                                  chunk_key_encoding={"name": "v2", "separator": "/"})
    return group.create_dataset(name, shape=shape, chunks=chunks, dtype="float32",
                                fill_value=0.0, dimension_separator="/")


def _pool2(block: np.ndarray) -> np.ndarray:
    """2 x 2 mean; at an odd edge the last pixel is the mean of what lies inside the image."""
    h, w = block.shape
    ph, pw = h % 2, w % 2
    data = np.pad(block, ((0, ph), (0, pw))) if ph or pw else block
    sums = data.reshape(data.shape[0] // 2, 2, data.shape[1] // 2, 2).sum((1, 3), dtype=np.float64)
    if ph or pw:
        ones = np.pad(np.ones(block.shape, np.float32), ((0, ph), (0, pw)))
        counts = ones.reshape(sums.shape[0], 2, sums.shape[1], 2).sum((1, 3))
        return (sums / counts).astype(np.float32)
    return (sums / 4).astype(np.float32)


def _level_shapes(shape, min_side: int) -> list[tuple[int, int]]:
    shapes = [tuple(int(s) for s in shape)]
    while True:
        h, w = shapes[-1]
        nh, nw = -(-h // 2), -(-w // 2)
        if max(nh, nw) < min_side or (nh, nw) == (h, w):
            return shapes
        shapes.append((nh, nw))


def write_heat_pyramid(heat, path, *, downsample_of_heat=(1, 1), min_side: int = 256,
                       chunks: int = 512, name: str | None = None,
                       mpp: tuple[float, float] | float | None = None,
                       translate: tuple[float, float] = (0.0, 0.0)) -> Path:
    """Write a heatmap (H, W) (NumPy, zarr or any array read by slices: it may be larger than
    memory) as an OME-Zarr (NGFF 0.4, zarr format 2) multiscale pyramid at ``path``.

    Level 0 is the heat as float32; each next level is a 2 x 2 mean of the one before, made
    block by block (memory stays within a few ``chunks``-sized blocks), until the longer side
    would drop below ``min_side``. Level k's scale is ``downsample_of_heat * 2**k`` (times
    ``mpp``, in micrometres, when given) with the translation that puts its pixel centres on
    the slide's level-0 grid: the heat of a slide's level k, written with that level's
    downsample, lies on the slide in napari and in any NGFF viewer. ``translate``: where the
    slide's level-0 pixel (0, 0) lies (``Pyramid.translate``: micrometres with ``mpp``, else
    pixels), for slides whose origin is not at zero.

    The pyramid is written under a temporary name beside ``path`` and renamed to it when
    complete (replacing an older one), so an interrupted write never leaves a pyramid that
    looks whole. Returns the path.
    """
    import zarr

    shape = tuple(getattr(heat, "shape", ()))
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"a heat pyramid is written from one 2D heatmap (H, W), not shape "
                         f"{shape}; pass one method's map of one image.")
    ds = downsample_of_heat
    ds = (float(ds), float(ds)) if isinstance(ds, (int, float)) else tuple(float(v) for v in ds)
    if len(ds) != 2 or not all(v > 0 and math.isfinite(v) for v in ds):
        raise ValueError(f"downsample_of_heat must be two positive numbers (rows, cols), not "
                         f"{downsample_of_heat!r}.")
    if mpp is not None:
        mpp = (float(mpp), float(mpp)) if isinstance(mpp, (int, float)) else tuple(
            float(v) for v in mpp)
        if len(mpp) != 2 or not all(v > 0 and math.isfinite(v) for v in mpp):
            raise ValueError(f"mpp must be a positive number of micrometres per pixel (or two, "
                             f"y and x), not {mpp!r}.")
    try:
        origin = tuple(float(v) for v in translate)
    except (TypeError, ValueError):
        origin = ()
    if len(origin) != 2 or not all(math.isfinite(v) for v in origin):
        raise ValueError(f"translate must be two finite numbers (y, x), not {translate!r}.")
    if isinstance(min_side, bool) or not isinstance(min_side, (int, np.integer)) or min_side < 1:
        raise ValueError(f"min_side must be a positive whole number, not {min_side!r}.")
    if isinstance(chunks, bool) or not isinstance(chunks, (int, np.integer)) or chunks < 16:
        raise ValueError(f"chunks must be a whole number of at least 16 pixels, not {chunks!r}.")
    chunks = int(chunks)
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file; an OME-Zarr pyramid is a folder: choose another "
                         "name.")
    path.parent.mkdir(parents=True, exist_ok=True)
    shapes = _level_shapes(shape, int(min_side))
    unit = (mpp or (1.0, 1.0))
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}",
                                dir=path.parent))
    try:
        if _zarr_major() >= 3:
            group = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        else:
            group = zarr.open_group(str(tmp), mode="w")
        prev = None
        datasets = []
        for k, (h, w) in enumerate(shapes):
            c = (min(chunks, h), min(chunks, w))
            arr = _create_v2_array(group, str(k), (h, w), c)
            for y in range(0, h, chunks):
                for x in range(0, w, chunks):
                    if k == 0:
                        block = np.asarray(heat[y:y + chunks, x:x + chunks], dtype=np.float32)
                    else:
                        block = _pool2(np.asarray(
                            prev[2 * y:2 * (y + chunks), 2 * x:2 * (x + chunks)], np.float32))
                    arr[y:y + block.shape[0], x:x + block.shape[1]] = block
            prev = arr
            f = 2 ** k
            s = [ds[0] * f * unit[0], ds[1] * f * unit[1]]
            t = [origin[0] + (ds[0] * f - 1) / 2 * unit[0],
                 origin[1] + (ds[1] * f - 1) / 2 * unit[1]]
            datasets.append({"path": str(k), "coordinateTransformations": [
                {"type": "scale", "scale": s}, {"type": "translation", "translation": t}]})
        axes = [{"name": a, "type": "space", **({"unit": "micrometer"} if mpp else {})}
                for a in ("y", "x")]
        group.attrs["multiscales"] = [{
            "version": "0.4",
            "name": name or path.name.split(".")[0],
            "axes": axes,
            "datasets": datasets,
            "type": "mean",
            "metadata": {"description": "2 x 2 mean of the level before",
                         "downsample_of_heat": list(ds)},
        }]
        with contextlib.suppress(OSError):  # mkdtemp's folder is 0700; give it a plain mode
            from .files import _umask

            os.chmod(tmp, 0o777 & ~_umask())
        _replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _replace_dir(tmp: Path, path: Path) -> None:
    """Rename the finished ``tmp`` folder to ``path``; an older pyramid there is moved aside
    first and removed after, so ``path`` is always either the old pyramid or the new one."""
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=f".old{path.suffix}",
                                    dir=path.parent))
        os.rmdir(old)
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None and not path.exists():
            os.replace(old, path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def describe(pyramid: Pyramid) -> dict[str, Any]:
    """What a front end shows or records about a pyramid: format, levels (W x H), downsamples,
    pixel size."""
    return {
        "format": pyramid.format,
        "levels": [[w, h] for h, w in pyramid.shapes],
        "downsamples": [list(d) for d in pyramid.downsamples],
        "mpp": list(pyramid.mpp) if pyramid.mpp else None,
        "axes": pyramid.axes,
    }
