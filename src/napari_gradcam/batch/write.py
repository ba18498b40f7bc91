"""Writing a unit's results and the run's summary files.

A unit's files (heatmap TIFF, or its range of the heatmap zarr array; GeoJSON; overlay PNGs)
are each written atomically, its record last. ``summary.csv`` and ``coco.json`` are rebuilt
from the records and the GeoJSON files at the end of every run.

Volumes: a 3D model's regions are 3D. GeoJSON and COCO stay plane-wise (each region's part in
every plane it crosses, carrying the region's ``region_label``); COCO has an image per plane,
named ``<name>[_<t>]_z<k>`` after its plane. Each volume also gets ``regions/<name>_boxes.csv``
(the 3D boxes in voxels, and in world millimetres) and a label map (each region's voxels set
to its label): ``regions/<name>_regions.nii.gz`` beside ``heatmaps/<name>_heatmap.nii.gz``
with the source's affine for NIfTI and DICOM inputs, whose outputs then overlay the scan in
3D Slicer or ITK-SNAP; ``regions/<key>_regions.tif`` for TIFF and zarr volumes, whose world
columns are voxel coordinates. ``--overlay`` draws each image as a PNG: the image in grey
with its heat, each region's box and polygon outline in its class colour and one label per
region (see :mod:`napari_gradcam.render`); a volume as one PNG: the maximum-intensity
projection of image and heat with every region projected (``mip``), or its middle plane with
the regions crossing it (``mid``).

A segmentation model's predicted labels (``--write-segmentation``) go to
``segmentation/<name>_labels.nii.gz`` with the source's affine for NIfTI and DICOM inputs, to
``segmentation/<name>_labels.zarr`` (uint16, shaped as the heatmap zarr, each part filling its
own range) for inputs read in parts, else ``segmentation/<name>_labels.tif`` (0 = background,
as napari's Labels layers show it).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..annotations import regions_to_annotations
from ..explain_arrays import layout
from ..export import read_geojson, write_coco_dataset, write_geojson
from ..files import atomic_output, atomic_write
from ..job import BatchResult, ExplainJob, shift_index
from ..render import draw_regions, overlay_rgb, region_labels, volume_regions
from .discover import Unit
from .read import IMAGE_SUFFIXES, _zarr, open_lazy, tiff_series_note
from .records import STATE_DIR, Record, _failed, _write_record
from .settings import Options


def _nonfinite_images(result: BatchResult) -> np.ndarray:
    """Flat indices of images whose scores or heatmaps (any method's) hold NaN/inf."""
    n = result.scores.shape[0]
    ok = np.isfinite(result.scores.reshape(n, -1)).all(1)
    for heat in result.heatmaps.values():
        ok &= np.isfinite(heat.reshape(n, -1)).all(1)
    return np.flatnonzero(~ok)


def finish_unit(unit: Unit, out: Path, pixels: np.ndarray | None, result: BatchResult,
                lead: tuple, mask, job: ExplainJob, opts: Options, seconds: float,
                settings: str = "", *, volume=None, labels=None,
                notes: list | None = None) -> Record:
    """Regions, heatmap file, GeoJSON, volume files, overlays, then the record (last: it
    marks the unit done). ``result`` holds the unit's n images as ``job`` explained them (one
    map per target; with "found" the classes that count are those with a positive logit), and
    ``job`` turns them into the heatmap to write, the regions and a row per image and class.
    ``volume``: a NIfTI / DICOM input's :class:`~napari_gradcam.volumes.Volume`, whose affine
    its NIfTI outputs take. ``labels``: a segmentation model's predicted labels of the n
    images (n, *spatial), written beside the heatmap when given. ``notes``: the job's sentences
    about targets that explained nothing (:meth:`ExplainJob.notes`), for the record's message
    (None: asked of the job here). Runs on a writer thread or a dask worker."""
    offset = unit_offset(unit, lead)
    bad = _nonfinite_images(result)
    if bad.size:  # pixels were checked finite when read: the model made the NaN
        which = ""
        if lead:
            idx = [" ".join(map(str, shift_index(np.unravel_index(b, lead), offset)))
                   for b in bad[:5]]
            which = (f" (image{'s' * (bad.size > 1)} {', '.join(idx)}"
                     f"{f' and {bad.size - 5} more' if bad.size > 5 else ''} of "
                     f"{result.scores.shape[0]})")
        return _failed(unit, out, f"the model's output is NaN/inf for it{which}: check the "
                       "weights (and mean/std)", settings)
    summary = job.summarise(result, lead, mask, offset=offset)
    heat, regions = summary.heatmaps[job.methods[0]], summary.regions
    class_names = list(job.spec.class_names)
    dims = heat.ndim - len(lead)  # the images' spatial axes: 3 for a 3D model's volumes
    _write_heat(unit, out, heat, bool(lead), volume)
    if labels is not None:
        _write_labels(unit, out, np.asarray(labels).reshape(heat.shape), volume, bool(lead))
    geo = out / "geojson" / f"{unit.key}.geojson"
    write_geojson(regions_to_annotations(regions, class_names), geo, class_names=class_names)
    if dims == 3 or volume is not None:
        _write_volume_regions(unit, out, heat.shape, offset, regions, volume, class_names)
    if opts.overlay and pixels is not None:
        drawn = (regions, summary.rows, class_names)
        if dims == 3:
            _write_volume_overlays(unit, out, pixels, heat, lead, offset, *drawn,
                                   getattr(opts, "volume_overlay", "mip"))
        else:
            _write_overlays(unit, out, pixels, heat, lead, offset, *drawn)
    shape = [*(lead if not offset else (unit.stop,) + tuple(lead[1:])), *heat.shape[len(lead):]]
    note = tiff_series_note(unit.path) if unit.kind not in ("array", "volume") else ""
    # a segmentation class with no pixels in its region: its map is zero; say so in the summary
    if notes is None:
        notes = job.notes(result, lead, offset)
    note = "; ".join([n for n in (note, *notes) if n])
    record = Record(unit.key, unit.path or unit.name, "ok", note, summary.rows, shape,
                    str(geo.relative_to(out)), round(seconds, 4), dims=dims)
    return _write_record(out, unit, record, settings)


def unit_offset(unit: Unit, lead: tuple) -> tuple:
    """What to add to the index of a unit's images: a part of a stack numbers its images from
    its start; a single image stored as zarr has no leading axis to shift."""
    return (unit.start,) if unit.kind == "parts" and lead else ()


def _finish_safely(unit, out, *args, volume=None, labels=None, notes=None) -> Record:
    try:
        return finish_unit(unit, out, *args, volume=volume, labels=labels, notes=notes)
    except Exception as err:  # noqa: BLE001 - reported in the summary, the run goes on
        return _failed(unit, out, f"writing its results failed: {err}", args[-1])


def _write_heat(unit: Unit, out: Path, heat: np.ndarray, stacked: bool, volume=None) -> None:
    if volume is not None:  # NIfTI in the file's voxel order with its affine: overlays the scan
        from ..volumes import write_nifti

        write_nifti(heat.astype(np.float32, copy=False), volume,
                    out / "heatmaps" / f"{unit.name}_heatmap.nii.gz")
        return
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


# the predicted labels of inputs read in parts: one array per input, made before its parts
# know their classes, so of a type that holds any class count a model has
PARTS_LABELS_DTYPE = np.dtype(np.uint16)


def _write_labels(unit: Unit, out: Path, labels: np.ndarray, volume=None,
                  stacked: bool = True) -> None:
    """A segmentation model's predicted labels: NIfTI with the source's affine for a volume
    input (it overlays the scan, as the heatmap does), the part's range of the input's labels
    zarr for an input read in parts (one array beside the heatmap's, not a file per part),
    else a TIFF. The smallest unsigned type that holds the classes keeps them readable as
    label images everywhere."""
    top = int(labels.max()) if labels.size else 0
    if unit.kind == "parts":
        if top > np.iinfo(PARTS_LABELS_DTYPE).max:
            raise ValueError(f"its predicted class {top} does not fit the labels array "
                             f"({PARTS_LABELS_DTYPE.name}); leave out --write-segmentation "
                             "for this model")
        target = _zarr().open(str(out / "segmentation" / f"{unit.name}_labels.zarr"),
                              mode="r+")
        if stacked:
            target[unit.start:unit.stop] = labels
        else:  # a single image stored as zarr
            target[...] = labels
        return
    labels = labels.astype(np.uint8 if top < 256 else np.uint16 if top < 65536 else np.int32,
                           copy=False)
    if volume is not None:
        from ..volumes import write_nifti

        write_nifti(labels, volume, out / "segmentation" / f"{unit.name}_labels.nii.gz")
        return
    import tifffile

    with atomic_output(out / "segmentation" / f"{unit.name}_labels.tif") as tmp:
        tifffile.imwrite(str(tmp), labels, photometric="minisblack")


def _by_image(regions, axes: int) -> dict:
    """Regions grouped by their image's index (its first ``axes`` entries; a plane-wise
    region of a volume carries its plane after them), in order."""
    out: dict = {}
    for r in regions:
        out.setdefault(tuple(int(i) for i in r.index[:axes]), []).append(r)
    return out


def _write_overlays(unit: Unit, out: Path, pixels: np.ndarray, heat: np.ndarray,
                    lead: tuple, offset: tuple, regions: list = (), rows: list = (),
                    class_names=None) -> None:
    """A PNG per image: the image in grey with its heat, and over it each of its regions'
    polygon and box in the class colour with one "<class> <probability>" label
    (:func:`~napari_gradcam.render.draw_regions`)."""
    import imageio.v3 as iio

    by_image = _by_image(regions, max(len(lead), len(offset)))
    for idx in np.ndindex(*lead) if lead else [()]:
        image = pixels[idx] if idx else pixels
        full = shift_index(idx, offset)
        mine = by_image.get(full, [])
        rgb = draw_regions(overlay_rgb(image, heat[idx] if idx else heat), mine,
                           region_labels(mine, rows, class_names))
        suffix = "".join(f"_{i}" for i in full)
        path = out / "overlays" / f"{unit.name}{suffix}.png"
        with atomic_output(path) as tmp:
            iio.imwrite(str(tmp), rgb, extension=".png")


# boxes.csv's columns (volumes.box_rows' keys), for a volume without regions
BOX_COLUMNS = ("label", "index", "class_id", "class", "score", "voxels", "peak", "mean", "z0",
               "row0", "col0", "z1", "row1", "col1", "x_min_mm", "x_max_mm", "y_min_mm",
               "y_max_mm", "z_min_mm", "z_max_mm", "volume_mm3")


def _write_volume_regions(unit: Unit, out: Path, shape: tuple, offset: tuple, regions: list,
                          volume, class_names: list) -> None:
    """The unit's regions as a label map (each region's voxels = its label; plane-wise regions
    of a 2D model: their number in their plane) and a CSV of boxes in voxels and world
    millimetres. With a source volume: NIfTI with its affine; else a TIFF (a part of a stack:
    its own files, the rows indexed in the whole stack) whose world is voxel coordinates."""
    from ..regions import label_image
    from ..volumes import Volume, box_rows, write_nifti

    geometry = volume
    if geometry is None:  # TIFF / zarr: no affine, world = voxel centres
        geometry = Volume(data=np.broadcast_to(np.uint8(0), shape[-3:]), affine=np.eye(4),
                          header=None, kind="array", source=unit.path)
    rows = box_rows(regions, geometry, class_names=class_names)
    seen: dict = {}
    for r, row in zip(regions, rows):  # plane-wise regions: their value in the label map
        seen[tuple(r.index)] = seen.get(tuple(r.index), 0) + 1
        if row.get("label") is None:
            row["label"] = seen[tuple(r.index)]
    buf = io.StringIO()
    columns = list(rows[0]) if rows else list(BOX_COLUMNS)
    w = csv.DictWriter(buf, columns, extrasaction="ignore")
    w.writeheader()
    w.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    atomic_write(out / "regions" / f"{unit.key}_boxes.csv", buf.getvalue())
    local = regions
    if offset:  # a part of a stack: its label map covers its own images
        local = [replace(r, index=(r.index[0] - offset[0], *r.index[1:])) for r in regions]
    labels = label_image(local, tuple(shape))
    if volume is not None:
        write_nifti(labels, volume, out / "regions" / f"{unit.name}_regions.nii.gz")
        return
    import tifffile

    with atomic_output(out / "regions" / f"{unit.key}_regions.tif") as tmp:
        tifffile.imwrite(str(tmp), labels, photometric="minisblack")


def _write_volume_overlays(unit: Unit, out: Path, pixels: np.ndarray, heat: np.ndarray,
                           lead: tuple, offset: tuple, regions: list, rows: list,
                           class_names, mode: str) -> None:
    """One PNG per volume: ``mip`` paints the maximum-intensity projections of image and heat
    along the first spatial axis with every region projected (its box's footprint and the
    union of its outlines: each region shows, wherever it lies); ``mid`` the middle plane
    with the regions that cross it (their box's rows and columns, their outline in that
    plane). Each drawn region gets its class colour and one label
    (:func:`~napari_gradcam.render.volume_regions`, :func:`~napari_gradcam.render.draw_regions`)."""
    import imageio.v3 as iio

    by_image = _by_image(regions, max(len(lead), len(offset)))
    for idx in np.ndindex(*lead) if lead else [()]:
        image = pixels[idx] if idx else pixels  # (D, H, W) or (D, H, W, C)
        h = heat[idx] if idx else heat
        full = shift_index(idx, offset)
        mine = by_image.get(full, [])
        z = h.shape[0] // 2
        if mode == "mid":
            rgb = overlay_rgb(image[z], h[z])
        else:
            rgb = overlay_rgb(image.max(axis=0), h.max(axis=0))
        shown = volume_regions(mine, mode, z)
        rgb = draw_regions(rgb, shown, region_labels(shown, rows, class_names))
        suffix = "".join(f"_{i}" for i in full)
        with atomic_output(out / "overlays" / f"{unit.name}{suffix}.png") as tmp:
            iio.imwrite(str(tmp), rgb, extension=".png")


def prepare_outputs(units: list[Unit], out: Path, channel_axis=None,
                    spatial_dims: int = 2, in_channels: int | None = None, *,
                    segmentation: bool = False) -> None:
    """Create what units write into together: the heatmap zarr arrays of inputs read in
    parts (made again when the source's shape changed), shaped as the reader lays the input
    out for a model of ``in_channels``, and with ``segmentation`` (``--write-segmentation``)
    their predicted labels' zarr arrays of the same shape. Only the process holding the
    output folder (see :func:`claim_output`) calls it, before any unit is written."""
    out = Path(out)
    (out / STATE_DIR / "records").mkdir(parents=True, exist_ok=True)
    for unit in {u.name: u for u in units if u.kind == "parts"}.values():
        target = out / "heatmaps" / f"{unit.name}.zarr"
        try:
            lay = layout(open_lazy(unit.path).shape, channel_axis, spatial_dims, in_channels)
        except ValueError:
            continue  # reading the unit fails it with the same message
        shape = (*lay.lead, *lay.spatial)
        chunks = (1,) * len(lay.lead) + tuple(lay.spatial)
        _shared_array(target, shape, np.dtype("f4"), chunks)
        if segmentation:
            _shared_array(out / "segmentation" / f"{unit.name}_labels.zarr", shape,
                          PARTS_LABELS_DTYPE, chunks)


def _shared_array(target: Path, shape: tuple, dtype: np.dtype, chunks: tuple) -> None:
    """A zarr array the parts of one input fill, kept when it has this shape and type (a
    resumed run keeps the parts already written), else made again, zeros."""
    if target.exists():
        try:
            have = _zarr().open(str(target), mode="r")
            if tuple(have.shape) == shape and np.dtype(have.dtype) == dtype:
                return
        except Exception:  # noqa: BLE001 - damaged: made again below
            pass
    _zarr().open(str(target), mode="w", shape=shape, dtype=dtype, chunks=chunks,
                 fill_value=0)


SUMMARY_COLUMNS = ("file", "index", "class", "score", "regions", "status", "message",
                   "probability")


def write_summary(records: list[Record], out: Path, class_names: list) -> tuple[Path, Path]:
    """summary.csv (a row per image, a row per failed unit) and coco.json (every image of
    every finished unit, regions read back from the units' GeoJSON; a volume explained by a 3D
    model gives an image per plane, ``<name>[_<t>]_z<k>``, holding its regions' parts in that
    plane)."""
    out = Path(out)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(SUMMARY_COLUMNS)
    entries, file_names, used = [], [], set()
    for rec in records:
        if rec.status != "ok":
            w.writerow([rec.source, "", "", "", "", rec.status, rec.message, ""])
            continue
        for img in rec.images:  # a row per image (per class found, with --target found)
            # score: the logit; probability: blank where the model gives none (segmentation)
            prob = img.get("probability")
            w.writerow([rec.source, " ".join(map(str, img["index"])), img["class"],
                        f"{img['score']:.6g}", img["regions"], "ok", rec.message,
                        "" if prob is None else f"{prob:.6g}"])
        annotations, _meta = read_geojson(out / rec.geojson)
        dims = rec.dims if rec.dims in (2, 3) else 2
        lead = len(rec.shape) - dims
        indices = list(dict.fromkeys(tuple(img["index"]) for img in rec.images))
        base = rec.name or (Path(rec.source).stem if rec.source else rec.unit)
        suffix = Path(rec.source).suffix.lower()
        suffix = Path(rec.source).suffix if suffix in IMAGE_SUFFIXES else ".png"
        planes = range(rec.shape[-3]) if dims == 3 else [None]
        for idx in indices:
            stem = base + "".join(f"_{i}" for i in idx) if lead else base
            for z in planes:  # a volume: its planes are COCO's images
                key = idx if z is None else (*idx, z)
                entries.append((stem if z is None else f"{stem}_z{z}", rec.shape[-2:],
                                [replace(a, index=()) for a in annotations
                                 if tuple(a.index) == key or not (lead or dims == 3)]))
                file_names.append(_unique(entries[-1][0], suffix, used))
    summary = atomic_write(out / "summary.csv", buf.getvalue())
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
    from ..export import _dumps

    doc = json.loads(Path(path).read_text())
    if len(doc.get("images", ())) == len(file_names):
        for image, name in zip(doc["images"], file_names):
            image["file_name"] = name
        atomic_write(path, _dumps(doc))
