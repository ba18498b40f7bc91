"""Finding the work: files, folders (searched recursively) and zarr arrays -> units.

A unit is an image file (PNG, JPEG, BMP, TIFF; a multi-page TIFF is a stack), a radiology
volume (a NIfTI file, or a folder of DICOM slices: one input, read whole with its affine), or a
range of up to ``part_size`` leading indices of a zarr array or a long TIFF stack. Only leading
axes are cut: the images a model explains are its spatial axes, so a 3D model's (D, H, W)
volume is never cut, a (T, D, H, W) stack is cut along T, and for a 2D model a volume's planes
are its images. Each unit carries the fingerprint of its source (resolved path, size, mtime,
range, mask; a DICOM folder's slice files), which its record must match to count as done, and
an output name no other source holds.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from .read import (
    IMAGE_SUFFIXES, SLIDE_SUFFIXES, VOLUME_SUFFIXES, _is_zarr, _stack_length, is_slide,
    is_volume_input, slide_stem, volume_stem,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Unit:
    """One piece of work: a whole image file or volume, or images ``start:stop`` of a zarr
    array or TIFF stack."""

    path: str  # the file or zarr array ('' for an in-memory array)
    name: str  # output stem, unique in the run
    # "file" (read whole, or lazily in tiles when large), "volume" (NIfTI / DICOM, read whole
    # with its affine), "parts" (zarr / large TIFF, read lazily), "slide" (a pyramid: SVS,
    # OME-TIFF, pyramidal TIFF or OME-Zarr, one level read lazily in tiles) or "array"
    kind: str
    start: int = 0
    stop: int | None = None  # zarr: end of the range (exclusive)
    mask: str | None = None  # mask file for this unit
    stem: str = ""  # the name before same-named sources are told apart ("a" for "a-2")
    # what the unit's record must match to count as done: the resolved source, its size and
    # mtime (a zarr array's metadata file), the range, and the mask files' sizes and mtimes
    fingerprint: tuple = ()
    # a segmentation model's region to explain for this unit (``--target-mask``): the score
    # explained is each class's logits summed over it
    target_mask: str | None = None

    @property
    def key(self) -> str:
        """The unit's output name (a zarr range carries its indices)."""
        if self.kind == "parts":
            return f"{self.name}_{self.start:06d}-{self.stop:06d}"
        return self.name


def _is_dicom_file(path: Path) -> bool:
    """One slice file given for its DICOM series (read whole from its folder)."""
    return path.is_file() and not path.name.lower().endswith(VOLUME_SUFFIXES) and \
        path.suffix.lower() not in IMAGE_SUFFIXES and is_volume_input(path)


def _stem(path: Path, root: Path | None) -> str:
    # (an input folder that can't be listed is its own unit: path == root)
    if root is None and _is_dicom_file(path):  # its series, named as its folder would be
        path = path.parent
    rel = path.relative_to(root) if root is not None and path != root else Path(path.name)
    parts = list(rel.parts)
    if is_slide(path):  # slide.ome.tif, slide.ome.zarr -> slide
        parts[-1] = slide_stem(Path(parts[-1]))
    elif path.name.lower().endswith(VOLUME_SUFFIXES) or (path.is_dir() and not _is_zarr(path)):
        parts[-1] = volume_stem(Path(parts[-1]))
    else:
        parts[-1] = Path(parts[-1]).stem if path.suffix.lower() != ".zarr" else parts[-1][:-5]
    return "__".join(parts) or path.stem


def _folder_id(path: Path) -> tuple | None:
    try:
        st = os.stat(path)  # follows links: a linked folder is the folder it points to
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _walk(root: Path, exclude: Path | None) -> Iterator[Path]:
    """Image files, NIfTI files, DICOM series folders and zarr arrays below ``root``, sorted,
    without descending into zarr arrays, hidden folders or the output folder. A DICOM series
    folder is yielded and still searched: a CD's layout nests series below folders that hold
    only a DICOMDIR, and a folder may hold a series and further series below it.
    Linked folders are followed, each real folder visited once (a link back up the tree
    would otherwise loop forever). A folder that can't be
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
            if _is_zarr(sub) or is_slide(sub):  # one input (an OME-Zarr pyramid is a group)
                yield sub
                continue
            if is_volume_input(sub):  # one input, and maybe more series below
                yield sub
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
            if not f.startswith(".") and (Path(f).suffix.lower() in IMAGE_SUFFIXES
                                          or f.lower().endswith(VOLUME_SUFFIXES)
                                          or Path(f).suffix.lower() in SLIDE_SUFFIXES):
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


def format_mask(pattern: str, path: Path, flag: str = "mask") -> str:
    """The mask file for ``path``: the pattern's fields substituted as plain text (never
    through ``str.format``, see :func:`mask_pattern_problem`). ``flag`` names the pattern in
    errors ("mask", "target mask")."""
    import string

    problem = mask_pattern_problem(pattern)
    if problem:
        raise ValueError(f"{flag} pattern {pattern!r}: {problem}.")
    path = Path(path)
    values = {"dir": str(path.parent), "name": path.name, "stem": path.stem}
    return str(Path("".join(literal + (values[field] if field is not None else "")
                            for literal, field, _s, _c in string.Formatter().parse(pattern))))


def collect_units(inputs: Iterable, mask: str | None = None, part_size: int = 256,
                  channel_axis=None, exclude=None, claims: dict | None = None,
                  in_channels: int | None = None, spatial_dims: int = 2,
                  target_mask: str | None = None, companions: Iterable[str] = ()
                  ) -> list[Unit]:
    """Units for files, folders (searched recursively for images and zarr arrays) and zarr
    arrays. ``mask`` is a pattern for each image's mask file with ``{dir}`` (the image's
    folder), ``{name}`` (file name) and ``{stem}`` (name without suffix), e.g.
    ``"{dir}/../lung-masks/{name}"``. ``exclude``: a folder to leave out (the output folder,
    when it lies inside an input folder). ``claims``: the output folder's names, see
    :func:`name_units`. ``in_channels``: the model's (``spec.in_channels``), so that a stack
    is split along the same axes the reader sees (a small last axis of that many entries
    holds channels, not pixels). ``spatial_dims``: the model's (3 for a Conv3d model), so
    that only leading axes are cut into parts. A folder of DICOM slices, given or found, is
    one volume. ``target_mask``: a pattern of the same form for each input's segmentation
    target region (a segmentation model explains why it gave the pixels inside it their
    class); found, read, checked and fingerprinted exactly as masks are. ``companions``: more
    patterns of the same form naming each input's side files (evaluate's annotations).

    A file found in a folder that is another input's mask, target mask or companion (an
    ``img0_mask.png`` beside ``img0.png`` with ``--mask '{dir}/{stem}_mask.png'``) is that
    input's side file, not an image of its own, and is left out; a file named on the command
    line is always an input."""
    inputs = list(inputs)
    exclude = Path(exclude).resolve() if exclude is not None else None
    found: list[tuple[Path, Path | None]] = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise ValueError(f"input {str(path)!r} does not exist.")
        if path.is_dir() and not _is_zarr(path) and not is_slide(path):
            if is_volume_input(path):  # a series folder given: it, and any series below it
                found.append((path, None))
            found += [(p, path) for p in sorted(_walk(path, exclude))]
        else:
            found.append((path, None))
    found = _without_side_files(found, [(p, flag) for p, flag in (
        (mask, "mask"), (target_mask, "target mask"),
        *((c, "annotations") for c in companions)) if p])
    units, seen = [], set()
    for path, root in found:
        name = _stem(path, root)
        real = _resolved(path)
        if real in seen:  # the same file given twice (a folder and a file in it): once
            continue
        seen.add(real)
        masks = (format_mask(mask, path) if mask else None,
                 format_mask(target_mask, path, "target mask") if target_mask else None)
        if is_slide(path):  # a pyramid: one unit, read a level at a time, never a stack
            units.append(_unit(path, name, "slide", masks))
            continue
        if is_volume_input(path):
            units.append(_unit(path, name, "volume", masks))
            continue
        n = _stack_length(path, channel_axis, part_size, in_channels, spatial_dims)
        if n is not None:  # zarr arrays, and TIFF stacks longer than a part: read in parts
            units += [_unit(path, name, "parts", masks, a, min(a + part_size, n))
                      for a in range(0, n, part_size)]
        else:
            units.append(_unit(path, name, "file", masks))
    if not units:
        raise ValueError(f"no images found in {', '.join(map(str, inputs))}: give image files "
                         f"({', '.join(IMAGE_SUFFIXES)}), slides ({', '.join(SLIDE_SUFFIXES)}, "
                         f"OME-TIFF, OME-Zarr), NIfTI volumes "
                         f"({', '.join(VOLUME_SUFFIXES)}), DICOM series folders, folders or "
                         "zarr arrays.")
    return name_units(units, claims)[0]


def _without_side_files(found: list, patterns: list) -> list:
    """``found`` less the files found in folders that a pattern ((pattern, flag) pairs) names
    for another input."""
    if not patterns:
        return found
    side: dict[str, set] = {}
    for path, _root in found:
        mine = _resolved(path)
        for pattern, flag in patterns:
            side.setdefault(_resolved(format_mask(pattern, path, flag)), set()).add(mine)
    return [(path, root) for path, root in found
            if root is None or not (side.get(_resolved(path), set()) - {_resolved(path)})]


def _unit(path: Path, name: str, kind: str, masks: tuple, start: int = 0,
          stop: int | None = None) -> Unit:
    """A unit of ``path`` with its (mask, target mask) files, fingerprinted with them."""
    mask, target = masks
    return Unit(str(path), name, kind, start, stop, mask, name,
                source_fingerprint(path, start, stop, mask, target), target)


def _resolved(path) -> str:
    try:
        return str(Path(path).resolve())
    except (OSError, RuntimeError):  # a symlink loop: the path as given
        return str(Path(path).absolute())


def source_fingerprint(path, start: int = 0, stop: int | None = None,
                       mask: str | None = None, target_mask: str | None = None) -> tuple:
    """What identifies a source's contents without reading them: its resolved path, size and
    mtime (for a zarr array, those of its metadata file) and the range of a unit read in
    parts, then the mask file's size and mtime, then the target mask's (tagged, so that a
    file given as one kind of mask never matches it given as the other). For a DICOM series folder, its files: their
    total size and a digest of every file's name, size and mtime (a slice replaced, added or
    removed changes it). A rerun redoes a unit whose fingerprint changed; one ``stat`` per
    file keeps this cheap for any number of inputs."""
    path = Path(path)
    meta = path
    if _is_zarr(path):
        meta = next(path / m for m in (".zarray", "zarr.json") if (path / m).exists())
    fp: tuple = (_resolved(path), *_source_stat(path, meta), int(start), stop)
    if mask is not None:
        fp += (_resolved(mask), *_source_stat(Path(mask)))
    if target_mask is not None:
        fp += ("target mask", _resolved(target_mask), *_source_stat(Path(target_mask)))
    return fp


def _source_stat(path: Path, meta: Path | None = None) -> tuple:
    """What stands for a source's (or a mask's) contents: a DICOM series folder's files, or,
    for one slice file, those of its folder (the whole series is read, so a slice added or
    removed beside it changes what is read); a file's (a zarr array's ``meta``) size and
    mtime otherwise."""
    if path.is_dir() and not _is_zarr(path):
        return _folder_stat(path)
    if _is_dicom_file(path):
        return (*_stat(path), *_folder_stat(path.parent))
    return _stat(meta if meta is not None else path)


def _folder_stat(folder: Path) -> tuple[int, str]:
    """(total size, digest of name, size and mtime per file) of a folder's files: a DICOM
    series' slices. (-1, '') when it can't be listed: reading it fails, and it is redone."""
    import hashlib

    h, total = hashlib.sha256(), 0
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return -1, ""
    for entry in entries:
        if entry.name.startswith(".") or not entry.is_file():
            continue
        size, mtime = _stat(Path(entry.path))
        total += max(size, 0)
        h.update(f"{entry.name}\0{size}\0{mtime}\0".encode())
    return total, h.hexdigest()[:32]


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


def units_for_array(array, name: str) -> tuple[list[Unit], dict]:
    """An in-memory array as a unit (``napari-gradcam demo --headless``)."""
    return [Unit("", name, "array")], {name: array}
