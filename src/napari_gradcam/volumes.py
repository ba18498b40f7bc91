"""Radiology volumes in and out: NIfTI (nibabel) and DICOM series (pydicom).

A ``Volume`` holds the voxels in *display order*, the file's voxel axes reversed:
NIfTI stores voxel (i, j, k) with i fastest, nibabel returns arrays of shape (X, Y, Z[, T]),
and napari shows the first axis on the slider, so ``.data`` is (Z, Y, X), or (T, Z, Y, X) for a
4D file (the extra axes lead). ``.affine`` stays the file's own voxel (i, j, k) -> world
millimetre matrix (RAS+, as nibabel reports it), so whatever comes back from a model is written
in the file's own voxel order with that matrix (``write_nifti``) and overlays the scan in
3D Slicer, ITK-SNAP or nibabel. DICOM series get the same treatment: i = column, j = row,
k = slice along the sorted positions, and DICOM's LPS world turned into RAS+ as dcm2niix does,
so a series and its NIfTI conversion give the same ``Volume``.

nibabel and pydicom are optional (the ``radiology`` extra) and imported only when a volume is
read or written.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .files import atomic_output

__all__ = [
    "Volume",
    "box_rows",
    "is_volume_path",
    "read_volume",
    "volume_array",
    "volume_from_metadata",
    "write_nifti",
]

_INSTALL = "pip install napari-gradcam[radiology]"
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_DICOM_SUFFIXES = (".dcm", ".dicom")
# A folder is looked at this far to decide whether it holds DICOM: a few hundred 132-byte reads.
_DICOM_PROBE_FILES = 256
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_GEOMETRY_FIELDS = ("sform_code", "qform_code", "srow_x", "srow_y", "srow_z", "quatern_b",
                    "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z", "pixdim")


def _nibabel():
    try:
        import nibabel
    except ImportError as err:
        raise ImportError(f"Reading and writing NIfTI needs nibabel: {_INSTALL}") from err
    return nibabel


def _pydicom():
    try:
        import pydicom
    except ImportError as err:
        raise ImportError(f"Reading DICOM series needs pydicom: {_INSTALL}") from err
    return pydicom


# ---------------------------------------------------------------------------------------------
# The volume


@dataclasses.dataclass(frozen=True, eq=False)
class Volume:
    """A scan in display order with the geometry of its file.

    data : array (..., Z, Y, X), the file's voxel axes reversed; extra NIfTI axes (time) lead.
    affine : 4x4, the file's voxel (i, j, k) -> world millimetres (RAS+; a NIfTI file's
        matrix converted from the unit its header states). Display index
        (z, y, x) is voxel (i, j, k) = (x, y, z); the voxel's *centre* sits at ``affine @
        (i, j, k, 1)``.
    header : the nibabel header of a NIfTI file (reused when writing results back), or for a
        DICOM series a dict of its non-identifying series fields (patient fields are left out).
    kind : "nifti" or "dicom".
    source : the path read (for DICOM, the folder).
    """

    data: Any
    affine: np.ndarray
    header: Any
    kind: str
    source: str = ""

    def __repr__(self) -> str:
        return (f"Volume(kind={self.kind!r}, shape={tuple(self.data.shape)}, "
                f"dtype={self.data.dtype}, spacing={tuple(round(v, 4) for v in self.spacing)}, "
                f"source={self.source!r})")

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        """(Z, Y, X) in display order."""
        return tuple(int(n) for n in self.data.shape[-3:])

    @property
    def lead_shape(self) -> tuple[int, ...]:
        """The extra axes in front of (Z, Y, X): (T,) for a 4D NIfTI, () otherwise."""
        return tuple(int(n) for n in self.data.shape[:-3])

    @property
    def napari_affine(self) -> np.ndarray:
        """4x4 from display index (z, y, x) to world millimetres in the same reversed order
        (S, A, R): the file affine with its voxel axes and its world axes both reversed. Exact
        for rotated and sheared affines; a layer with more axes (4D) puts it in the bottom-right
        corner of an identity (``layer_transform``)."""
        a = np.asarray(self.affine, float)
        out = np.eye(4)
        out[:3, :3] = a[:3, :3][::-1, ::-1]
        out[:3, 3] = a[:3, 3][::-1]
        return out

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in millimetres along the display axes (z, y, x): the lengths of the
        affine's columns k, j, i."""
        norms = np.linalg.norm(np.asarray(self.affine, float)[:3, :3], axis=0)
        return tuple(float(v) for v in norms[::-1])

    @property
    def origin(self) -> tuple[float, float, float]:
        """World position (mm) of the centre of voxel 0, in the display order of the world axes
        (S, A, R), i.e. ``affine[:3, 3]`` reversed: the layer's translate when the affine is
        diagonal."""
        return tuple(float(v) for v in np.asarray(self.affine, float)[2::-1, 3])

    @property
    def axis_labels(self) -> tuple[str, ...]:
        lead = ("t",) if len(self.lead_shape) == 1 else tuple(
            f"axis{n}" for n in range(len(self.lead_shape)))
        return (*lead, "z", "y", "x")

    @property
    def voxel_volume(self) -> float:
        """Cubic millimetres per voxel."""
        a = np.asarray(self.affine, float)[:3, :3]
        # the triple product, exact for axis-aligned voxels (a determinant by LU is not)
        return float(abs(np.dot(a[:, 0], np.cross(a[:, 1], a[:, 2]))))

    def layer_transform(self) -> dict:
        """Keywords that place a napari layer of this volume's full shape in world millimetres:
        ``scale`` and ``translate`` when the affine is axis-aligned with positive steps (the
        easy case for other layers to copy), else ``affine``. Leading axes get scale 1."""
        lead = len(self.lead_shape)
        m = self.napari_affine
        linear = m[:3, :3]
        if np.allclose(linear, np.diag(np.diag(linear)), rtol=0, atol=1e-9 * np.abs(linear).max()) \
                and np.all(np.diag(linear) > 0):
            return {"scale": [1.0] * lead + [float(v) for v in np.diag(linear)],
                    "translate": [0.0] * lead + [float(v) for v in m[:3, 3]]}
        full = np.eye(lead + 4)
        full[lead:, lead:] = m
        return {"affine": full}

    def to_file_order(self, array) -> np.ndarray:
        """An array in display order -> the file's voxel order, ready for nibabel.

        Takes the volume's own shape (..., Z, Y, X) or its spatial shape (Z, Y, X) alone (one
        map for a 4D scan); the result is a view with every axis reversed: (X, Y, Z[, T])."""
        arr = np.asarray(array)
        full, spatial = tuple(self.data.shape), self.spatial_shape
        if arr.shape != full and arr.shape != spatial:
            want = f"{full} or {spatial}" if full != spatial else f"{full}"
            raise ValueError(f"the array has shape {arr.shape} but the volume's display shape is "
                             f"{want}; pass an array in display order (..., Z, Y, X) of that shape")
        return arr.T


def volume_from_metadata(metadata: dict, data) -> Volume:
    """Rebuild a Volume from a layer's metadata (as the napari reader writes it) and an array of
    its display shape, so results on that layer can go back to file order with
    ``write_nifti``."""
    try:
        affine = np.asarray(metadata["affine"], float)
        kind = metadata["kind"]
    except (KeyError, TypeError) as err:
        raise ValueError("the layer's metadata holds no volume geometry ('affine', 'kind'); open "
                         "the scan with the napari-gradcam reader (NIfTI or DICOM)") from err
    if affine.shape != (4, 4):
        raise ValueError(f"the layer's metadata 'affine' has shape {affine.shape}, not (4, 4); "
                         "open the scan again with the napari-gradcam reader")
    return Volume(data=data, affine=affine, header=metadata.get("header"), kind=kind,
                  source=str(metadata.get("source", "")))


def volume_array(source, *, series=None, nan: float | None = None) -> np.ndarray:
    """A volume as a plain array where the rest of the package takes images: display order
    (..., Z, Y, X), native byte order, C-contiguous (memory-mapped file data is read here).

    source : a Volume or a path for ``read_volume`` (``series`` as there).
    nan : replace NaN and infinite voxels by this value. By default they stay: ``read_volume``
        keeps what the file holds, and the batch command refuses an image with NaN pixels
        (it would give an empty heatmap), naming the count; pass e.g. ``nan=0.0`` to run anyway.
    """
    vol = source if isinstance(source, Volume) else read_volume(source, series=series)
    arr = np.asarray(vol.data)
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    arr = np.ascontiguousarray(arr)
    if nan is not None and arr.dtype.kind in "fc":
        bad = ~np.isfinite(arr)
        if bad.any():
            arr = arr.copy() if np.may_share_memory(arr, np.asarray(vol.data)) else arr
            arr[bad] = nan
    return arr


# ---------------------------------------------------------------------------------------------
# What is a volume


def _is_nifti_name(path) -> bool:
    return str(path).lower().endswith(_NIFTI_SUFFIXES)


def _has_dicom_magic(path) -> bool:
    """The DICOM Part 10 signature: a 128-byte preamble, then "DICM"."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


# Files that never hold a series' slices, told by name without opening them: images and NIfTI
# files (a folder of PNGs costs no reads when folders are searched for DICOM), and DICOMDIR,
# the index a CD or export writes above its series folders (a DICOM file without pixels).
_NOT_SLICE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".nii", ".nii.gz",
                       ".gif", ".txt", ".json", ".csv", ".xml", ".zip", ".geojson")


def _maybe_slice(name: str) -> bool:
    """Whether a file name may be a DICOM slice: not hidden (macOS writes ``._im000.dcm``
    AppleDouble companions next to every file on shared drives), not a DICOMDIR, not an
    image or NIfTI file by its suffix."""
    low = name.lower()
    return not (name.startswith(".") or low == "dicomdir" or low.endswith(_NOT_SLICE_SUFFIXES))


def _is_image_dicom(path) -> bool:
    """Whether a file with the DICOM signature holds an image (it has Rows), read from its
    header only. A report, presentation state or index beside the series is not a slice; a
    file that can't be parsed counts, so that reading the folder names it."""
    try:
        ds = _pydicom().dcmread(str(path), stop_before_pixels=True, specific_tags=["Rows"])
    except ImportError:
        return True  # reading says what to install
    except Exception:  # noqa: BLE001 - damaged: reading reports it with the file's name
        return True
    return "Rows" in ds


def _folder_has_dicom(folder: Path) -> bool:
    """Whether a folder holds DICOM image slices, by the signature of its first files (and the
    header of the first one with it). Files named as anything else are not opened, so a
    folder of images is told apart by names alone."""
    try:
        with os.scandir(folder) as it:
            probed = 0
            for entry in it:
                if not _maybe_slice(entry.name) or not entry.is_file():
                    continue
                if probed >= _DICOM_PROBE_FILES:
                    return False
                probed += 1
                if _has_dicom_magic(entry.path) and _is_image_dicom(entry.path):
                    return True
    except OSError:
        return False
    return False


def is_volume_path(path) -> bool:
    """True for a NIfTI file, a DICOM file, or a folder holding DICOM files (checked cheaply by
    the DICOM signature of its first files), without reading any voxels."""
    p = Path(path)
    if p.is_dir():
        return _folder_has_dicom(p)
    if not p.is_file():
        return False
    if _is_nifti_name(p):
        return True
    return p.suffix.lower() in _DICOM_SUFFIXES or _has_dicom_magic(p)


def read_volume(path, *, series: str | int | None = None) -> Volume:
    """Read a NIfTI file (``.nii``, ``.nii.gz``) or a DICOM series as a ``Volume``.

    DICOM: a folder of slices, or one slice file (its folder is read and the file's series
    kept). A folder holding several series is refused with their list unless ``series`` names
    one (its SeriesInstanceUID, or its SeriesNumber). Files without the DICOM signature are
    skipped unless named ``.dcm``; a DICOM file pydicom cannot parse is an error naming it.

    NIfTI data of an uncompressed, unscaled file in native byte order is memory-mapped (read
    when touched); otherwise it is read once, scaled by scl_slope / scl_inter (to float32, or
    float64 for float64 files) and in native byte order. NaN voxels are kept as the file has
    them (see ``volume_array``). The affine is converted to millimetres from the header's
    spatial unit (micron, meter); 'unknown' counts as millimetres, as nibabel and the common
    viewers take it. ``write_nifti`` writes the file's own unit and matrices back.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{str(p)!r} does not exist; pass a NIfTI file or a DICOM "
                                "folder or file")
    if p.is_dir():
        return _read_dicom(p, series=series, only_file=None)
    if _is_nifti_name(p):
        if series is not None:
            raise ValueError(f"series={series!r} applies to DICOM folders, and {p.name!r} is "
                             "NIfTI; leave series out")
        return _read_nifti(p)
    if p.suffix.lower() in _DICOM_SUFFIXES or _has_dicom_magic(p):
        return _read_dicom(p.parent, series=series, only_file=p)
    raise ValueError(f"{p.name!r} is neither NIfTI (.nii, .nii.gz) nor DICOM; pass a .nii / "
                     ".nii.gz file, a DICOM file or a folder of DICOM slices")


# ---------------------------------------------------------------------------------------------
# NIfTI


def _read_nifti(p: Path) -> Volume:
    nib = _nibabel()
    try:
        img = nib.load(str(p))
    except Exception as err:  # nibabel raises many types for a bad header
        raise ValueError(f"{p.name!r} is not a readable NIfTI file ({type(err).__name__}: "
                         f"{err}); check that it is a .nii / .nii.gz image and not truncated"
                         ) from err
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):  # a file's content, not a type
        raise ValueError(f"{p.name!r} opens as {type(img).__name__}, not NIfTI; "  # noqa: TRY004
                         "convert it to .nii / .nii.gz")
    proxy = img.dataobj
    raw_dtype = np.dtype(img.get_data_dtype())
    if raw_dtype.fields is not None or raw_dtype.kind not in "biuf":
        raise ValueError(f"{p.name!r} holds {raw_dtype} voxels (RGB or complex); napari-gradcam "
                         "reads grey scalar volumes: save one channel as a scalar NIfTI")
    shape = tuple(int(n) for n in img.shape)
    if not shape or min(shape) <= 0:
        raise ValueError(f"{p.name!r} has no voxels: its header gives the shape {shape} (an axis "
                         "of length 0 or less, or no axes); export the image again")
    # nibabel moves scl_slope / scl_inter from the header into the array proxy when loading
    slope, inter = float(getattr(proxy, "slope", 1.0)), float(getattr(proxy, "inter", 0.0))
    if not (math.isfinite(slope) and slope != 0 and math.isfinite(inter)):
        slope, inter = 1.0, 0.0  # NIfTI: a slope of 0 or NaN means "no scaling"
    scaled = not (slope == 1.0 and inter == 0.0)
    compressed = str(p).lower().endswith(".gz")
    if not compressed:
        offset = int(img.header.get_data_offset())
        need = offset + int(np.prod(shape, dtype=np.int64)) * raw_dtype.itemsize
        have = p.stat().st_size
        if have < need:
            raise ValueError(f"{p.name!r} is truncated: its header promises {need} bytes, the "
                             f"file has {have}; copy or export it again")
    else:  # decompressed into memory: a damaged header can promise terabytes
        itemsize = max(raw_dtype.itemsize, 8 if raw_dtype == np.float64 else 4) if scaled \
            else raw_dtype.itemsize
        need = int(np.prod(shape, dtype=np.float64)) * itemsize
        if need > 1 << 30:
            _check_fits(p, shape, need)
    try:
        if not compressed and not scaled and raw_dtype.isnative:
            data = np.asanyarray(proxy)  # a copy-on-write memory map: read when touched
        else:
            out = np.float64 if raw_dtype == np.float64 else np.float32
            if scaled:  # in the output type: no float64 copy of a large scan on the way
                data = np.asarray(proxy.get_unscaled()).astype(out)
                data *= out(slope)
                data += out(inter)
            else:
                data = np.asarray(proxy)
            if not data.dtype.isnative:
                data = data.astype(data.dtype.newbyteorder("="))
    except MemoryError:
        raise ValueError(f"{p.name!r} is too large to read: its {' x '.join(map(str, shape))} "
                         "voxels do not fit in the memory available; crop or downsample it, "
                         "or read it on a machine with more memory") from None
    except Exception as err:  # gzip / zlib / EOF errors of a damaged file
        raise ValueError(f"{p.name!r} could not be read completely ({type(err).__name__}: "
                         f"{err}); the file is truncated or damaged: copy or export it again"
                         ) from err
    # Trailing length-1 axes beyond the third (a 3D scan saved as X x Y x Z x 1) are dropped;
    # a 2D image gets a k axis of length 1, so every volume has three spatial axes.
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    while data.ndim < 3:
        data = data[..., np.newaxis]
    # Volume.affine is in millimetres whatever unit the file states (micron for microscopy
    # and preclinical scans); the header keeps the file's own, which write_nifti writes back.
    affine = np.diag([*[_unit_factor(img.header)] * 3, 1.0]) @ np.array(img.affine, float)
    return Volume(data=data.T, affine=affine, header=img.header.copy(), kind="nifti",
                  source=str(p))


_MM_PER_UNIT = {"meter": 1000.0, "mm": 1.0, "micron": 1e-3}


def _unit_factor(header) -> float:
    """Millimetres per world unit of a NIfTI header's xyzt_units. 'unknown' (the code 0 most
    writers leave) counts as millimetres, as nibabel, ITK and the common viewers take it."""
    try:
        unit = header.get_xyzt_units()[0]
    except Exception:  # noqa: BLE001 - a header without the field: NIfTI's default
        return 1.0
    return _MM_PER_UNIT.get(unit, 1.0)


def _check_fits(p: Path, shape: tuple, need: int) -> None:
    """Refuse a NIfTI whose decoded voxels can't fit in memory before decompressing it."""
    try:
        from .memory import available_host_memory

        have = available_host_memory()
    except Exception:  # noqa: BLE001 - unknown: try to read it
        return
    if have is not None and need > have:
        raise ValueError(f"{p.name!r} is too large to read: its header promises "
                         f"{' x '.join(map(str, shape))} voxels ({need / 2**30:.1f} GiB), more "
                         f"than the {have / 2**30:.1f} GiB of memory available; crop or "
                         "downsample it, or read it on a machine with more memory")


# ---------------------------------------------------------------------------------------------
# DICOM


@dataclasses.dataclass
class _Slice:
    path: Path
    ds: Any
    series: str


def _dicom_candidates(folder: Path, only_file: Path | None) -> list[Path]:
    try:
        entries = sorted(e for e in folder.iterdir() if e.is_file())
    except OSError as err:
        raise ValueError(f"the DICOM folder {str(folder)!r} cannot be listed ({err}); check its "
                         "permissions") from err
    files = [e for e in entries if _maybe_slice(e.name)
             and (e.suffix.lower() in _DICOM_SUFFIXES or _has_dicom_magic(e))]
    if only_file is not None and only_file not in files:
        files.append(only_file)
    return files


def _read_headers(files: list[Path]) -> list[_Slice]:
    pydicom = _pydicom()
    out = []
    for f in files:
        try:
            # Large values (the pixels) stay in the file until the chosen series is stacked.
            ds = pydicom.dcmread(str(f), defer_size="1 KB")
        except Exception as err:  # pydicom raises many types for a bad file
            raise ValueError(f"{f.name!r} in {str(f.parent)!r} is not a readable DICOM file "
                             f"({type(err).__name__}: {err}); remove it from the folder or "
                             "replace it with a good copy") from err
        if not len(ds) and "SOPClassUID" not in getattr(ds, "file_meta", ()):
            raise ValueError(f"{f.name!r} in {str(f.parent)!r} is not a readable DICOM file "
                             "(nothing could be parsed after its DICOM signature); remove it "
                             "from the folder or replace it with a good copy")
        if "PixelData" not in ds:
            continue  # DICOMDIR, structured reports, presentation states: not slices
        out.append(_Slice(f, ds, str(ds.get("SeriesInstanceUID", ""))))
    return out


def _series_list(groups: dict[str, list[_Slice]]) -> str:
    parts = []
    for uid, slices in groups.items():
        ds = slices[0].ds
        desc = str(ds.get("SeriesDescription", "") or "").strip()
        num = ds.get("SeriesNumber", None)
        parts.append(f"{uid or '(no UID)'} (number {num}, {len(slices)} slice"
                     f"{'s' * (len(slices) != 1)}{', ' + repr(desc) if desc else ''})")
    return "; ".join(parts)


def _choose_series(slices: list[_Slice], folder: Path, series, only_file) -> list[_Slice]:
    groups: dict[str, list[_Slice]] = {}
    for s in slices:
        groups.setdefault(s.series, []).append(s)
    if series is not None:
        if isinstance(series, int) and not isinstance(series, bool):
            chosen = [u for u, ss in groups.items()
                      if str(ss[0].ds.get("SeriesNumber", "")) == str(series)]
        else:
            chosen = [u for u in groups if u == str(series)]
        if len(chosen) != 1:
            raise ValueError(f"series={series!r} matches {len(chosen)} of the series in "
                             f"{str(folder)!r}: {_series_list(groups)}; pass one "
                             "SeriesInstanceUID from that list")
        return groups[chosen[0]]
    if only_file is not None:
        for s in slices:
            if s.path == only_file:
                return groups[s.series]
    if len(groups) > 1:
        raise ValueError(f"{str(folder)!r} holds {len(groups)} DICOM series: "
                         f"{_series_list(groups)}; pass series=<SeriesInstanceUID> to choose "
                         "one, or open one of its slice files")
    return next(iter(groups.values()))


def _tag(s: _Slice, name: str, convert=int, default=None):
    """A slice's tag through ``convert``, or ``default`` when it is absent or empty. Exported
    series carry hand-edited or damaged tags ("abc" as a number); a value that does not convert
    (TypeError / ValueError / AttributeError from pydicom or ``convert``) becomes one sentence
    naming the file and the tag, instead of a bare conversion error."""
    try:
        value = s.ds.get(name, None)
        if value is None or value == "":
            return default
        return convert(value)
    except (TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"{s.path.name!r} in {str(s.path.parent)!r} has an unusable {name} "
                         f"({type(err).__name__}: {err}); fix that tag in the file or re-export "
                         "the series") from None


def _required(s: _Slice, name: str) -> int:
    value = _tag(s, name, int)
    if value is None:
        raise ValueError(f"{s.path.name!r} in {str(s.path.parent)!r} has no {name} tag, so its "
                         "pixels can't be laid out; re-export the series or remove that file")
    return value


def _vec(ds, name: str, n: int) -> np.ndarray | None:
    v = ds.get(name, None)
    if v is None:
        return None
    try:
        arr = np.array([float(x) for x in v], float)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) and np.all(np.isfinite(arr)) else None


def _read_dicom(folder: Path, *, series, only_file: Path | None) -> Volume:
    files = _dicom_candidates(folder, only_file)
    slices = _read_headers(files)
    if not slices:
        raise ValueError(f"{str(folder)!r} holds no DICOM image slices; pass a folder of DICOM "
                         "files (.dcm, or files with the DICOM signature)")
    slices = _choose_series(slices, folder, series, only_file)
    first = slices[0].ds

    for s in slices:
        frames = _tag(s, "NumberOfFrames", int, 1) or 1
        if frames > 1:
            raise ValueError(f"{s.path.name!r} is a multi-frame DICOM file ({frames} frames); "
                             "convert the series to NIfTI (e.g. with dcm2niix) and open that")
        if (_tag(s, "SamplesPerPixel", int, 1) or 1) != 1:
            raise ValueError(f"{s.path.name!r} holds colour pixels; napari-gradcam reads grey "
                             "DICOM series (CT, MR, PET): convert it to grey first")
    sizes = {(_required(s, "Rows"), _required(s, "Columns")) for s in slices}
    if len(sizes) > 1:
        listing = ", ".join(f"{r} x {c}" for r, c in sorted(sizes))
        raise ValueError(f"the slices of the series in {str(folder)!r} have different sizes "
                         f"({listing}); keep the slices of one acquisition in the folder, or "
                         "choose the series with series=")

    iops = [_vec(s.ds, "ImageOrientationPatient", 6) for s in slices]
    ipps = [_vec(s.ds, "ImagePositionPatient", 3) for s in slices]
    first_ps = _vec(first, "PixelSpacing", 2)
    for s in slices[1:]:  # compared as the files hold them, before any fallback
        ps = _vec(s.ds, "PixelSpacing", 2)
        if (ps is None) != (first_ps is None) or (
                ps is not None and not np.allclose(ps, first_ps, rtol=1e-4)):
            raise ValueError(f"{s.path.name!r} has PixelSpacing "
                             f"{None if ps is None else ps.tolist()}, the first slice "
                             f"{None if first_ps is None else first_ps.tolist()}; keep one "
                             "acquisition per folder")
    spacing_rc = first_ps
    if spacing_rc is None or np.any(spacing_rc <= 0):
        spacing_rc = np.array([1.0, 1.0])
        warnings.warn(f"the series in {str(folder)!r} has no usable PixelSpacing: voxels are "
                      "taken as 1 mm in-plane", UserWarning, stacklevel=3)

    geometric = all(v is not None for v in iops) and all(v is not None for v in ipps)
    if geometric:
        iop = iops[0]
        for s, v in zip(slices, iops):
            if not np.allclose(v, iop, atol=1e-4):
                raise ValueError(f"{s.path.name!r} has another ImageOrientationPatient than the "
                                 "first slice; the series mixes orientations (a localiser?): "
                                 "move those slices out of the folder")
        row_dir, col_dir = iop[:3], iop[3:]
        normal = np.cross(row_dir, col_dir)
        if np.linalg.norm(normal) < 0.5:  # unit, perpendicular vectors give a normal of length 1
            raise ValueError(f"{slices[0].path.name!r} has a degenerate ImageOrientationPatient "
                             f"{iop.tolist()} (its row and column directions are not two "
                             "perpendicular unit vectors), so the slices can't be placed; fix "
                             "that tag or re-export the series")
        dist = np.array([float(np.dot(v, normal)) for v in ipps])
        order = np.argsort(dist, kind="stable")
        slices = [slices[n] for n in order]
        ipps = [ipps[n] for n in order]
        dist = dist[order]
        gaps = np.diff(dist)
        if len(gaps) and np.min(gaps) < 1e-3:
            n = int(np.argmin(gaps))
            raise ValueError(f"{slices[n].path.name!r} and {slices[n + 1].path.name!r} lie at "
                             "the same position: the folder holds several acquisitions (echoes, "
                             "phases) of one series; put each in its own folder")
        if len(slices) > 1:
            step = (ipps[-1] - ipps[0]) / (len(slices) - 1)
            if gaps.max() - gaps.min() > max(0.01 * gaps.mean(), 1e-3):
                warnings.warn(f"the slice spacing of the series in {str(folder)!r} is uneven "
                              f"({gaps.min():.4g} to {gaps.max():.4g} mm, a missing slice?): "
                              "the affine uses the mean spacing", UserWarning, stacklevel=3)
        else:
            step = normal * _slice_spacing(first)
        origin = ipps[0]
    else:
        numbers = [_tag(s, "InstanceNumber", int) for s in slices]
        if any(n is None for n in numbers) or len(set(numbers)) != len(numbers):
            raise ValueError(f"the slices in {str(folder)!r} lack ImagePositionPatient / "
                             "ImageOrientationPatient and unique InstanceNumbers, so their "
                             "order is unknown; export the series with its geometry")
        warnings.warn(f"the slices in {str(folder)!r} lack ImagePositionPatient or "
                      "ImageOrientationPatient: ordered by InstanceNumber, placed at the world "
                      "origin with the default orientation (world positions are not the "
                      "scanner's)", UserWarning, stacklevel=3)
        order = np.argsort(numbers, kind="stable")
        slices = [slices[n] for n in order]
        iop = iops[0] if iops[0] is not None else np.array([1.0, 0, 0, 0, 1.0, 0])
        if np.linalg.norm(np.cross(iop[:3], iop[3:])) < 0.5:
            iop = np.array([1.0, 0, 0, 0, 1.0, 0])  # placed at a default anyway (warned above)
        row_dir, col_dir = iop[:3], iop[3:]
        step = np.cross(row_dir, col_dir) * _slice_spacing(first)
        origin = np.zeros(3)

    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing_rc[1]  # i = column: along the row direction
    lps[:3, 1] = col_dir * spacing_rc[0]  # j = row: along the column direction
    lps[:3, 2] = step
    lps[:3, 3] = origin
    affine = _LPS_TO_RAS @ lps

    data = _stack_pixels(slices)
    header = {
        "Modality": str(first.get("Modality", "")),
        "SeriesInstanceUID": slices[0].series,
        "SeriesNumber": _int_or_none(first.get("SeriesNumber", None)),
        "SeriesDescription": str(first.get("SeriesDescription", "") or ""),
        "files": [str(s.path) for s in slices],
    }
    return Volume(data=data, affine=affine, header=header, kind="dicom", source=str(folder))


def _int_or_none(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _slice_spacing(ds) -> float:
    """The only spacing a lone slice (or a series without positions) has to offer."""
    for name in ("SpacingBetweenSlices", "SliceThickness"):
        try:
            v = float(ds.get(name, None))
        except (TypeError, ValueError):
            continue
        if math.isfinite(v) and v > 0:
            return v
    return 1.0


def _stack_pixels(slices: list[_Slice]) -> np.ndarray:
    planes, slopes, inters = [], [], []
    for s in slices:
        try:
            planes.append(np.asarray(s.ds.pixel_array))
        except Exception as err:  # a missing codec, damaged pixel data
            raise ValueError(f"the pixels of {s.path.name!r} cannot be decoded "
                             f"({type(err).__name__}: {err}); for compressed transfer syntaxes "
                             "install pylibjpeg (pip install pylibjpeg pylibjpeg-libjpeg) or "
                             "re-export the series uncompressed") from err
        slopes.append(_tag(s, "RescaleSlope", float, 1.0) or 1.0)
        inters.append(_tag(s, "RescaleIntercept", float, 0.0) or 0.0)
    raw = np.stack(planes)
    if all(a == 1.0 for a in slopes) and all(b == 0.0 for b in inters):
        return raw
    # CT: Hounsfield units = stored value * slope + intercept, each slice with its own pair.
    out = raw.astype(np.float32)
    out *= np.asarray(slopes, np.float32)[:, None, None]
    out += np.asarray(inters, np.float32)[:, None, None]
    return out


# ---------------------------------------------------------------------------------------------
# NIfTI out


def _nifti_dtype(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype.kind in "iu" and arr.dtype.itemsize == 8:
        # NIfTI readers widely lack 64-bit integers; labels and counts fit 32 bits.
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        info = np.iinfo(np.int32)
        if lo < info.min or hi > info.max:
            raise ValueError(f"the array's values ({lo} to {hi}) do not fit the 32-bit integers "
                             "NIfTI readers take; rescale them or write a float array")
        return arr.astype(np.int32)
    if arr.dtype == np.float16:
        return arr.astype(np.float32)
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"write_nifti writes integer or float arrays, not {arr.dtype}; convert "
                         "the array (e.g. .astype(np.float32))")
    return arr if arr.dtype.isnative else arr.astype(arr.dtype.newbyteorder("="))


def write_nifti(array, volume: Volume, path) -> Path:
    """Write ``array`` (display order: the volume's (..., Z, Y, X) or (Z, Y, X) alone) as NIfTI
    in the file's own voxel order with the volume's affine, so it overlays the scan.

    A NIfTI source lends its header: sform and qform with their codes, units, pixdim; the data
    type follows the array (float32 heatmaps, int32 / int16 label maps; bool -> uint8, int64 ->
    int32, float16 -> float32), unscaled, display window cleared, integer arrays marked with
    the NIfTI "label" intent. A DICOM source gets a fresh header with its affine as sform and
    qform (scanner coordinates). ``.nii.gz`` is gzip-compressed. The file is written atomically:
    an interrupted write leaves no partial file.
    """
    nib = _nibabel()
    from nibabel.volumeutils import native_code

    path = Path(path)
    name = path.name.lower()
    if not name.endswith(_NIFTI_SUFFIXES):
        raise ValueError(f"write_nifti writes .nii or .nii.gz files, not {path.name!r}; end the "
                         "name with .nii or .nii.gz")
    arr = _nifti_dtype(np.asarray(array))
    file_order = volume.to_file_order(arr)
    affine = np.asarray(volume.affine, float)
    src = volume.header
    if volume.kind == "nifti" and isinstance(src, (nib.Nifti1Header, nib.Nifti2Header)):
        # back in the file's own world unit: the header's units are written with it
        affine = np.diag([*[1.0 / _unit_factor(src)] * 3, 1.0]) @ affine
        header = src.copy()
        # A result needs the geometry, not what else the scan's header carries: extensions
        # (DICOM headers with patient data, code 2) and the free-text fields are dropped.
        header.extensions.clear()
        for key in ("descrip", "aux_file", "db_name"):
            if key in header:
                header[key] = b""
        if header.endianness != native_code:  # big-endian sources: write native, as readers expect
            header = header.as_byteswapped(native_code)
        cls = nib.Nifti2Image if isinstance(src, nib.Nifti2Header) else nib.Nifti1Image
        geometry = {key: header[key].copy() for key in _GEOMETRY_FIELDS}
    else:
        header, cls = nib.Nifti1Header(), nib.Nifti1Image
        header.set_xyzt_units("mm", "sec")
        header.set_sform(affine, code=1)  # scanner coordinates
        header.set_qform(affine, code=1)
        geometry = {key: header[key].copy() for key in _GEOMETRY_FIELDS}
    img = cls(file_order, affine, header=header)
    img.set_data_dtype(arr.dtype)
    hdr = img.header
    # The codes tell viewers which space the matrices are in, and the quaternion is kept as
    # stored (rebuilding it from the matrix adds rounding): the source's fields, not nibabel's
    # defaults for a new image.
    for key, value in geometry.items():
        if key == "pixdim":
            hdr["pixdim"][0] = value[0]  # qfac; the voxel sizes follow the data's shape
        else:
            hdr[key] = value
    hdr.set_slope_inter(None, None)
    hdr["cal_min"] = 0
    hdr["cal_max"] = 0
    hdr.set_intent("label" if arr.dtype.kind in "iu" else "none")
    compressed = name.endswith(".gz")
    with atomic_output(path) as tmp, open(tmp, "wb") as raw:
        stream = gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0) \
            if compressed else raw
        try:
            img.to_file_map({"image": nib.FileHolder(fileobj=stream)})
        finally:
            if compressed:
                stream.close()
    return path


# ---------------------------------------------------------------------------------------------
# 3D boxes as table rows


def box_rows(regions, volume: Volume, *, class_names=None) -> list[dict]:
    """One row per region: its voxel box and its box in world millimetres.

    3D regions (bbox (z0, row0, col0, z1, row1, col1), max exclusive, display order) are
    taken as they are; a 2D region found plane by plane on the volume counts as a one-plane
    box whose plane is the last entry of its index.

    Columns: label, index (the leading indices, e.g. the time point, as a string), class_id,
    class (when ``class_names`` is given), score, voxels, peak, mean, z0, row0, col0, z1, row1,
    col1 (voxels, display order), x_min_mm ... z_max_mm (world RAS+: x to the right, y to the
    front, z up) and volume_mm3 (the region's voxels times the voxel volume, not the box's).

    Voxel corner convention: a voxel's centre sits at its integer index (NIfTI), so voxel v
    covers v - 0.5 to v + 0.5; the world box is the min / max per world axis of the 8 corners
    (z0 - 0.5 ... z1 - 0.5, likewise per axis) sent through the affine. It encloses every voxel
    of the region whole; for an oblique affine it is the axis-aligned box around the rotated one.
    """
    affine = np.asarray(volume.affine, float)
    nz = volume.spatial_shape[0]
    rows = []
    for r in regions:
        bbox = tuple(int(v) for v in r.bbox)
        index = tuple(int(v) for v in getattr(r, "index", ()) or ())
        if len(bbox) == 6:
            z0, r0, c0, z1, r1, c1 = bbox
        elif len(bbox) == 4 and index:
            z0, z1 = index[-1], index[-1] + 1
            r0, c0, r1, c1 = bbox
            index = index[:-1]
            if not 0 <= z0 < nz:
                raise ValueError(f"a 2D region's plane {z0} lies outside the volume's {nz} "
                                 "planes; pass regions found on this volume's heatmaps")
        else:
            raise ValueError(f"box_rows takes 3D regions (bbox of 6 numbers) or plane-wise 2D "
                             f"regions with their plane in the index, not bbox {bbox} with "
                             f"index {index}; use find_regions(..., ndim=3)")
        # display (z, row, col) = voxel (k, j, i); corners at index - 0.5
        ks, js, is_ = (z0 - 0.5, z1 - 0.5), (r0 - 0.5, r1 - 0.5), (c0 - 0.5, c1 - 0.5)
        corners = np.array([[i, j, k, 1.0] for i in is_ for j in js for k in ks]).T
        world = (affine @ corners)[:3]
        lo, hi = world.min(axis=1), world.max(axis=1)
        class_id = getattr(r, "class_id", None)
        row = {
            "label": getattr(r, "label", None),
            "index": " ".join(str(v) for v in index),
            "class_id": None if class_id is None else int(class_id),
        }
        if class_names is not None:
            row["class"] = (str(class_names[class_id])
                            if class_id is not None and 0 <= class_id < len(class_names)
                            else None)
        score = getattr(r, "score", None)
        row.update({
            "score": None if score is None else float(score),
            "voxels": int(r.area),
            "peak": float(r.peak),
            "mean": float(r.mean),
            "z0": z0, "row0": r0, "col0": c0, "z1": z1, "row1": r1, "col1": c1,
        })
        for n, axis in enumerate("xyz"):
            row[f"{axis}_min_mm"] = float(lo[n])
            row[f"{axis}_max_mm"] = float(hi[n])
        row["volume_mm3"] = float(r.area) * volume.voxel_volume
        rows.append(row)
    return rows
