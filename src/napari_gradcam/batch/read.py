"""Reading one unit: image files (multi-page TIFF = a stack), radiology volumes (NIfTI, DICOM
series: read whole, in display order, with their affine), zarr arrays and long TIFF stacks
read lazily in parts, masks, and the checks a unit passes before it joins a batch (its size
against the memory available, its channels, finite pixels).

Everything here fails with a ValueError (or MemoryError) whose message is one line for the
summary: a bad input fails its own unit, and the run goes on.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .. import memory
from .._device import describe_device, resolve_device
from ..explain_arrays import (
    check_channels, colour_for_grey_model, is_grey_rgb, layout, read_batch,
)
from ..job import is_found
from ..pyramids import OPENSLIDE_SUFFIXES as _OPENSLIDES
from ..pyramids import SLIDE_SUFFIXES as _SLIDES
from ..pyramids import TIFF_SUFFIXES as _TIFFS
from .settings import Options

if TYPE_CHECKING:
    from .discover import Unit

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
VOLUME_SUFFIXES = (".nii", ".nii.gz")  # NIfTI; DICOM series are folders (or one .dcm file)
# whole-slide files found in folders besides TIFF (which may be pyramids too) and OME-Zarr
SLIDE_SUFFIXES = (*_SLIDES, *_OPENSLIDES)


def is_slide(path) -> bool:
    """A pyramid (SVS, OME-TIFF, a TIFF with reduced levels, an OME-Zarr folder): one input
    explained a level at a time in tiles, never a stack of its levels. Asked from the file's
    header (:func:`napari_gradcam.pyramids.is_pyramid_file`), once per file version."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return False
    if path.is_file() and path.suffix.lower() not in (*SLIDE_SUFFIXES, *_TIFFS):
        return False
    return _is_slide(str(path.absolute()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _is_slide(path: str, _size: int, _mtime: int) -> bool:
    from ..pyramids import is_pyramid_file

    try:
        return bool(is_pyramid_file(path))
    except Exception:  # noqa: BLE001 - not readable as a pyramid: read as an image, or fail
        return False


def slide_stem(path: Path) -> str:
    """A slide's name without its suffixes: ``a.ome.tif``, ``a.ome.zarr``, ``a.svs`` -> ``a``."""
    name = Path(path).name
    low = name.lower()
    for suffix in (".ome.tiff", ".ome.tif", ".ome.btf", ".ome.zarr", ".zarr", *_TIFFS,
                   *SLIDE_SUFFIXES):
        if low.endswith(suffix) and len(name) > len(suffix):
            return name[:-len(suffix)]
    return name


def _is_zarr(path: Path) -> bool:
    try:
        return path.is_dir() and any((path / m).exists() for m in (".zarray", "zarr.json"))
    except OSError:  # an unreadable folder is not a zarr array; walking it reports why
        return False


def is_volume_input(path: Path) -> bool:
    """A radiology volume, read whole with its affine (:func:`napari_gradcam.volumes.
    read_volume`): a NIfTI file (``.nii``, ``.nii.gz``), a folder whose files are the slices
    of a DICOM series, or one DICOM file of a series. Such a folder is one input: its slices
    are never explained one by one."""
    path = Path(path)
    if path.name.lower().endswith(VOLUME_SUFFIXES):
        return True
    if path.suffix.lower() in IMAGE_SUFFIXES or _is_zarr(path):
        return False
    try:
        from ..volumes import is_volume_path

        if not is_volume_path(path):
            return False
        if path.is_dir() and _holds_images(path):  # a folder of images with a stray slice
            log.warning("%s holds image files and DICOM files: its images are explained and "
                        "its DICOM files skipped; put a DICOM series in a folder of its own",
                        path)
            return False
        return True
    except Exception:  # noqa: BLE001 - not recognisable as a volume: an image, or nothing
        return False


def _holds_images(folder: Path) -> bool:
    with os.scandir(folder) as entries:
        return any(Path(e.name).suffix.lower() in IMAGE_SUFFIXES for e in entries
                   if not e.name.startswith(".") and e.is_file())


def volume_stem(path: Path) -> str:
    """The name of a volume input without its suffix: ``brain.nii.gz`` -> ``brain``; a DICOM
    folder keeps its whole name (``CT.1.2`` is not ``CT.1`` with a suffix)."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".dcm"):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[:-len(suffix)]
    return name


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


def _stack_length(path: Path, channel_axis, part_size: int,
                  in_channels: int | None = None, spatial_dims: int = 2) -> int | None:
    """The length of the first leading axis for inputs read in parts (zarr arrays, TIFF stacks
    longer than ``part_size``), else None (read whole). ``in_channels``: the model's, as the
    reader's :func:`layout` sees the axes (a small last axis of that many entries holds
    channels); ``spatial_dims``: the model's, so that a 3D model's volume, which has no
    leading axis, is never cut."""
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
        lay = layout(shape, channel_axis, spatial_dims, in_channels=in_channels)
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


def read_volume_unit(unit: Unit):
    """A volume unit's :class:`~napari_gradcam.volumes.Volume` (pixels in display order, the
    affine): any failure as one line for the summary."""
    from ..volumes import read_volume

    try:
        return read_volume(unit.path)
    except ValueError as err:  # the reader's own sentence
        hint = ""
        if "series=" in str(err):  # the library's choice; here each folder is one input
            hint = ("; for the batch command, move each series into a folder of its own "
                    "(each folder is one input) or give one slice file of the series wanted")
        raise ValueError(f"can't read it as a volume: {err}{hint}") from None
    except Exception as err:  # noqa: BLE001 - a damaged or truncated file
        raise ValueError(f"can't read it as a volume ({_decoder_reason(err)}); the file is "
                         "damaged or incomplete: copy or export it again") from None


def read_unit(unit: Unit, arrays: dict | None = None, channel_axis=None,
              in_channels: int | None = None, spatial_dims: int = 2) -> np.ndarray:
    """The unit's pixels as a NumPy array (images along the leading axes). ``in_channels``,
    ``spatial_dims``: the model's, for :func:`layout` (which axes of a part's array are
    leading)."""
    if unit.kind == "array":
        return np.asarray(arrays[unit.name])
    if unit.kind == "volume":
        return np.asarray(read_volume_unit(unit).data)
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
        lay = layout(array.shape, channel_axis, spatial_dims, in_channels=in_channels)
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


def _read_mask(unit: Unit, volume=None) -> np.ndarray | None:
    """The unit's mask as booleans; a NIfTI / DICOM mask of a volume on the volume's voxel
    grid (see :func:`_mask_on_grid`)."""
    if unit.mask is None:
        return None
    return _read_mask_file(unit.mask, volume, "mask", "--mask") > 0


def _read_target_mask(unit: Unit, volume=None) -> np.ndarray | None:
    """The unit's segmentation target region, found and read as its mask is: booleans from an
    integer or boolean file (> 0 = inside), float weights from a float file (a probability
    map), which must be finite and non-negative (the score explained is a weighted sum of
    logits; a negative weight would explain the opposite of the class)."""
    if unit.target_mask is None:
        return None
    m = _read_mask_file(unit.target_mask, volume, "target mask", "--target-mask")
    if m.dtype.kind != "f":
        return m > 0
    m = m.astype(np.float32, copy=False)
    bad = int(np.count_nonzero(~np.isfinite(m))), int(np.count_nonzero(m < 0))
    if any(bad):
        what = "NaN/inf" if bad[0] else "negative values"
        raise ValueError(f"its target mask {unit.target_mask!r} holds {what} at "
                         f"{bad[0] or bad[1]} position{'s' * ((bad[0] or bad[1]) != 1)}; give "
                         "weights >= 0 (or an integer mask, > 0 = inside)")
    return m


def _read_mask_file(path: str, volume, what: str, flag: str) -> np.ndarray:
    """A mask file's values, for ``--mask`` and ``--target-mask`` alike: an image (RGB: its
    first channel), or a NIfTI / DICOM volume in display order, on ``volume``'s voxel grid
    (see :func:`_mask_on_grid`) when the input is a volume. Each failure is one line naming
    the file and the option whose pattern made its name."""
    if not Path(path).exists():
        raise ValueError(f"its {what} {path!r} does not exist (check the {flag} pattern)")
    if is_volume_input(Path(path)):  # a brain mask as NIfTI / DICOM: in display order
        from ..volumes import read_volume

        try:
            mvol = read_volume(path)
        except Exception as err:  # noqa: BLE001 - one line for the summary
            raise ValueError(f"its {what} {path!r} can't be read as a volume "
                             f"({_decoder_reason(err)}); replace it, or check the {flag} "
                             "pattern") from None
        data = np.asarray(mvol.data)
        return data if volume is None else _mask_on_grid(data, mvol, volume, path, what)
    if not Path(path).is_file():
        raise ValueError(f"its {what} {path!r} is a folder, not an image or volume; check "
                         f"the {flag} pattern")
    try:
        m = np.asarray(_imread(Path(path)))
    except Exception as err:  # noqa: BLE001 - a decoder's own advice (install pyav) misleads
        raise ValueError(f"its {what} {path!r} can't be read as an image "
                         f"({_decoder_reason(err)}); replace it with a PNG or TIFF "
                         f"{what}, or check the {flag} pattern") from None
    if m.size == 0:
        raise ValueError(f"its {what} {path!r} is empty; replace it with a PNG or TIFF {what}")
    if m.ndim == 3 and m.shape[-1] in (3, 4):
        m = m[..., 0]
    return m


def _mask_on_grid(mask: np.ndarray, mvol, volume, name: str, what: str = "mask") -> np.ndarray:
    """A volume mask in the scan's display order. Same shape alone is not enough: another
    tool may store the same voxels with an axis flipped or swapped (LAS against RAS), which
    only the affines tell. Equal affines: as stored; affines that differ by axis flips and
    permutations only: reoriented onto the scan's voxel grid; anything else (another grid,
    spacing or field of view) is refused rather than applied mirrored or shifted."""
    import nibabel.orientations as no

    a_img = np.asarray(volume.affine, float)
    a_mask = np.asarray(mvol.affine, float)
    spatial = tuple(volume.spatial_shape)
    tol = 1e-3 * max(1.0, float(np.abs(a_img[:3, :3]).max()))
    if np.allclose(a_mask, a_img, rtol=0, atol=tol):
        return mask
    off = (f"its {what} {name!r} is not on the scan's voxel grid (its affine differs from the "
           f"scan's by more than axis flips); resample the {what} onto the scan (e.g. with "
           "nibabel.processing.resample_from_to or your segmentation tool) and run again")
    try:
        img_ornt = no.io_orientation(a_img)
        mask_ornt = no.io_orientation(a_mask)
        change = no.ornt_transform(mask_ornt, img_ornt)
        file_order = mask.T  # (i, j, k, ...) as nibabel's functions take it
        moved = no.apply_orientation(file_order, change)
        new_affine = a_mask @ no.inv_ornt_aff(change, file_order.shape[:3])
    except Exception:  # noqa: BLE001 - degenerate affines: not the same grid
        raise ValueError(off) from None
    if tuple(moved.shape[:3])[::-1] != spatial or \
            not np.allclose(new_affine, a_img, rtol=0, atol=tol):
        raise ValueError(off)
    return np.ascontiguousarray(moved.T)


def _unit_header(unit: Unit, arrays) -> tuple | None:
    """(shape, dtype, already in memory) of what reading ``unit`` decodes, from headers only."""
    if unit.kind == "array":
        a = arrays[unit.name]
        return tuple(a.shape), a.dtype, True
    if unit.kind == "parts":
        a = open_lazy(unit.path)
        return tuple(a.shape), a.dtype, False
    if unit.kind == "volume":
        head = volume_header(unit.path)
        return None if head is None else (*head, False)
    head = memory.image_header(unit.path)
    return None if head is None else (*head, False)


def volume_header(path) -> tuple[tuple, np.dtype] | None:
    """(shape in display order, dtype) of what reading a volume decodes, from headers only: a
    NIfTI header (nibabel reads no voxels to give it), or a DICOM series' first slice and its
    number of files. None when that can't be told cheaply (reading reports any problem).
    Voxels are counted as float32 when the file scales them (slope / intercept)."""
    path = Path(path)
    try:
        if path.name.lower().endswith(VOLUME_SUFFIXES):
            import nibabel as nib

            img = nib.load(str(path))
            shape = tuple(int(s) for s in img.shape)
            display = (*reversed(shape[3:]), *reversed(shape[:3]))
            dtype = np.dtype(img.get_data_dtype())
            slope, inter = img.header.get_slope_inter()
            if (slope not in (None, 1.0) or inter not in (None, 0.0)) or dtype.kind == "f":
                dtype = np.promote_types(dtype, np.float32)
            return display, dtype
        if path.is_dir():
            import pydicom

            from ..volumes import _maybe_slice

            files = sorted(e.path for e in os.scandir(path)
                           if e.is_file() and _maybe_slice(e.name))
            if not files:
                return None
            first = pydicom.dcmread(files[0], stop_before_pixels=True)
            return (len(files), int(first.Rows), int(first.Columns)), np.dtype(np.float32)
    except Exception:  # noqa: BLE001 - not readable as a header: reading says why
        return None
    return None


def memory_problem(unit: Unit, spec, opts: Options, dims: int, arrays=None) -> str | None:
    """Why ``unit`` can't fit in the memory available now (one sentence with the numbers), or
    None. Read from headers before decoding: a 20000 x 20000 TIFF, or a model whose
    input_size is huge, is refused instead of growing the process until the system kills it.
    A slide is never refused here: it is read a level at a time, in tiles (see
    :mod:`.tiled`, which also decides which large images are tiled rather than refused)."""
    if unit.kind == "slide":
        return None
    try:
        head = _unit_header(unit, arrays)
    except Exception:  # noqa: BLE001 - unreadable headers: reading the unit reports why
        return None
    if head is None:
        return None
    shape, dtype, in_memory = head
    try:
        lay = layout(shape, opts.channel_axis, dims, spec.in_channels)
        if unit.kind == "parts" and lay.lead and unit.stop is not None:  # this part only
            shape = (unit.stop - unit.start, *shape[1:])
            lay = layout(shape, opts.channel_axis, dims, spec.in_channels)
    except ValueError:
        return None  # reading the unit reports the shape problem
    need = memory.estimate(shape, dtype, lay, spec.in_channels, spec.input_size,
                           already_decoded=in_memory,
                           targets=len(spec.class_names) if is_found(opts.target) else 1)
    device = resolve_device(opts.device)
    problem = memory.refusal(need, memory.available_host_memory(),
                             memory.available_device_memory(device),
                             describe_device(device))
    if problem and getattr(opts, "tile", "auto") is None and dims == 2 and not lay.lead \
            and unit.kind == "file":
        problem += ", or leave out --tile none so that it is explained in tiles"
    return problem


def _load(unit: Unit, spec, opts: Options, dims: int, arrays) -> tuple:
    """Reader thread: pixels, raw (n, *spatial, C), leading shape, mask, the volume (its
    affine, for the NIfTI outputs; None for other inputs) and the target mask; or the
    exception."""
    try:
        problem = memory_problem(unit, spec, opts, dims, arrays)
        if problem:
            raise MemoryError(problem)
        volume = None
        if unit.kind == "volume":
            volume = read_volume_unit(unit)
            pixels = np.asarray(volume.data)
        else:
            pixels = read_unit(unit, arrays, opts.channel_axis, spec.in_channels, dims)
        lay = layout(pixels.shape, opts.channel_axis, dims, spec.in_channels)
        check_channels(lay.channels, spec.in_channels)
        if lay.channels == 3 and spec.in_channels == 1 and \
                not is_grey_rgb(pixels, lay.channel_axis):
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
        masks = [_mask_for_unit(unit, what, read(unit, volume), path, lay)
                 for what, path, read in (("mask", unit.mask, _read_mask),
                                          ("target mask", unit.target_mask,
                                           _read_target_mask))]
        return pixels, raw, lay.lead, masks[0], volume, masks[1]
    except Exception as err:  # noqa: BLE001 - reported in the summary, the run goes on
        return err


def _mask_for_unit(unit: Unit, what: str, m: np.ndarray | None, path, lay) -> np.ndarray | None:
    """A mask or target mask cut to what ``unit`` explains: one mask for every image, or
    (a volume's 3D mask for a 2D model explaining it plane by plane) one per image. A stack
    read in parts takes the same mask file as when read whole, one frame per frame of the
    whole stack, and each part uses its own frames of it: a mask as long as one part is
    refused, as every part would otherwise read its regions from the stack's first frames."""
    if m is None:
        return None
    shape, spatial = tuple(m.shape), tuple(lay.spatial)
    if shape == spatial:
        return m
    if unit.kind == "parts" and lay.lead and unit.stop is not None:
        total = int(open_lazy(unit.path).shape[0])
        whole = (total, *lay.lead[1:], *spatial)
        if shape == whole:
            return m[unit.start:unit.stop]
        raise ValueError(f"its {what} {path!r} has shape {shape}, but the stack is read in "
                         f"parts and has {total} frames of {(*lay.lead[1:], *spatial)}; give "
                         f"a {what} with one frame per frame of the whole stack {whole}, or "
                         f"one image {spatial} for every frame")
    if shape == (*lay.lead, *spatial):
        return m
    shapes = " or ".join(map(str, dict.fromkeys((spatial, (*lay.lead, *spatial)))))
    raise ValueError(f"its {what} {path!r} has shape {shape}, the image {shapes}; give a "
                     f"{what} of the image's shape")
