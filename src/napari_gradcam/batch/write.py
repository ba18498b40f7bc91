"""Writing a unit's results and the run's summary files.

A unit's files (heatmap TIFF, or its range of the heatmap zarr array; GeoJSON; overlay PNGs)
are each written atomically, its record last. ``summary.csv`` and ``coco.json`` are rebuilt
from the records and the GeoJSON files at the end of every run.
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
from ..render import overlay_rgb
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
                settings: str = "") -> Record:
    """Regions, heatmap file, GeoJSON, overlays, then the record (last: it marks the unit
    done). ``result`` holds the unit's n images as ``job`` explained them (one map per target;
    with "found" the classes that count are those with a positive logit), and ``job`` turns
    them into the heatmap to write, the regions and a row per image and class. Runs on a
    writer thread or a dask worker."""
    # a part of a stack numbers its images from its start; a single image stored as zarr has
    # no leading axis to shift
    offset = (unit.start,) if unit.kind == "parts" and lead else ()
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
    _write_heat(unit, out, heat, bool(lead))
    geo = out / "geojson" / f"{unit.key}.geojson"
    write_geojson(regions_to_annotations(regions, class_names), geo, class_names=class_names)
    if opts.overlay and pixels is not None:
        _write_overlays(unit, out, pixels, heat, lead, offset)
    shape = [*(lead if not offset else (unit.stop,) + tuple(lead[1:])), *heat.shape[len(lead):]]
    note = tiff_series_note(unit.path) if unit.kind != "array" else ""  # skipped series
    record = Record(unit.key, unit.path or unit.name, "ok", note, summary.rows, shape,
                    str(geo.relative_to(out)), round(seconds, 4))
    return _write_record(out, unit, record, settings)


def _finish_safely(unit, out, *args) -> Record:
    try:
        return finish_unit(unit, out, *args)
    except Exception as err:  # noqa: BLE001 - reported in the summary, the run goes on
        return _failed(unit, out, f"writing its results failed: {err}", args[-1])


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
                    lead: tuple, offset: tuple) -> None:
    import imageio.v3 as iio

    for idx in np.ndindex(*lead) if lead else [()]:
        image = pixels[idx] if idx else pixels
        suffix = "".join(f"_{i}" for i in shift_index(idx, offset))
        path = out / "overlays" / f"{unit.name}{suffix}.png"
        with atomic_output(path) as tmp:
            iio.imwrite(str(tmp), overlay_rgb(image, heat[idx] if idx else heat),
                        extension=".png")


def prepare_outputs(units: list[Unit], out: Path, channel_axis=None,
                    spatial_dims: int = 2, in_channels: int | None = None) -> None:
    """Create what units write into together: the heatmap zarr arrays of inputs read in
    parts (made again when the source's shape changed), shaped as the reader lays the input
    out for a model of ``in_channels``. Only the process holding the output folder (see
    :func:`claim_output`) calls it, before any unit is written."""
    out = Path(out)
    (out / STATE_DIR / "records").mkdir(parents=True, exist_ok=True)
    for unit in {u.name: u for u in units if u.kind == "parts"}.values():
        target = out / "heatmaps" / f"{unit.name}.zarr"
        try:
            lay = layout(open_lazy(unit.path).shape, channel_axis, spatial_dims, in_channels)
        except ValueError:
            continue  # reading the unit fails it with the same message
        shape = (*lay.lead, *lay.spatial)
        if target.exists():
            try:
                if tuple(_zarr().open(str(target), mode="r").shape) == shape:
                    continue
            except Exception:  # noqa: BLE001 - damaged: made again below
                pass
        _zarr().open(str(target), mode="w", shape=shape, dtype="f4",
                     chunks=(1,) * len(lay.lead) + tuple(lay.spatial), fill_value=0.0)


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
