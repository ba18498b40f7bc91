"""npe2 readers and writers: Shapes layers as QuPath GeoJSON, COCO JSON, CSV; NIfTI and DICOM
volumes in."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import export
from ..annotations import annotations_to_shapes, class_color, shapes_to_annotations

META_KEY = "napari_gradcam"  # layer.metadata[META_KEY]: class_names, image_shape, image_name
PLUGIN = "napari-gradcam"  # the name in napari.yaml


def _layer(data, attributes):
    annotations = shapes_to_annotations(list(data), attributes.get("shape_type", "polygon"),
                                        attributes.get("features"))
    meta = (attributes.get("metadata") or {}).get(META_KEY, {})
    return annotations, meta


def _write_geojson(path: str, data, attributes: dict) -> None:
    annotations, meta = _layer(data, attributes)
    labels = attributes.get("axis_labels") or ()
    lead = max((len(a.index) for a in annotations), default=0)
    axes = None
    if lead and len(labels) >= lead + 2:
        names = [str(x).lower() for x in labels[:lead]]
        if any(n in ("z", "t") for n in names):
            axes = [n if n in ("z", "t") else None for n in names]
    export.write_geojson(annotations, path, class_names=meta.get("class_names"),
                         scale=attributes.get("scale"), plane_axes=axes)


def _write_coco(path: str, data, attributes: dict) -> None:
    annotations, meta = _layer(data, attributes)
    export.write_coco(annotations, path, class_names=meta.get("class_names"),
                      image_shape=meta.get("image_shape"),
                      image_name=meta.get("image_name") or attributes.get("name") or "image")


def _write_csv(path: str, data, attributes: dict) -> None:
    """Our CSV (a row per shape with its features) for a layer of ours; any other Shapes layer
    is written by napari's own Shapes writer, in napari's vertex CSV, exactly as if this plugin
    were not installed: our writers come first once the plugin is used (see :func:`activate`),
    and a user's own layer must still reopen in napari."""
    if META_KEY not in (attributes.get("metadata") or {}):
        from napari_builtins.io import napari_write_shapes

        if napari_write_shapes(path, data, attributes) is not None:
            return
        # napari's writer writes nothing for a layer without shapes: ours writes the header
    annotations, meta = _layer(data, attributes)
    export.write_csv(annotations, path, class_names=meta.get("class_names"))


# file ending -> what gets written; the first ending of each format is the one a bare name gets
FORMATS = {".geojson": _write_geojson, ".json": _write_coco, ".csv": _write_csv}


def _write(path: str, data, attributes: dict, own: str) -> list[str]:
    """Write the format the file name asks for. napari's save dialog calls the writer of the
    file type selected in the dialog with whatever name was typed, so a name ending in another
    of our formats gets that format (``regions.csv`` typed under "QuPath GeoJSON" is CSV, not
    GeoJSON in a .csv file), and a bare name gets this writer's own ending, as napari's own
    writers do."""
    path = str(path)
    name = Path(path).name
    ext = Path(path).suffix.lower()
    if not ext:
        # a bare name gets the ending; a typed trailing dot ("regions.") is not doubled
        stem = name.rstrip(".") or name
        path = str(Path(path).with_name(stem)) + own if name else path + own
        name, ext = Path(path).name, own
    if ext not in FORMATS:
        raise ValueError(
            f"napari-gradcam cannot write {name!r}: a Shapes layer is saved as .geojson "
            f"(QuPath), .json (COCO) or .csv, so end the file name with one of these, or pick "
            f"another plugin's file type in the save dialog.")
    if Path(path).is_dir():
        raise ValueError(f"can't write {name}: a folder of that name is there; choose another "
                         "folder or name.")
    try:
        FORMATS[ext](path, data, attributes)
    except OSError as err:
        raise ValueError(f"can't write {name}: {err.strerror or err}; choose another folder "
                         "or name.") from None
    return [path]


def write_geojson_layer(path: str, data, attributes: dict) -> list[str]:
    return _write(path, data, attributes, ".geojson")


def write_coco_layer(path: str, data, attributes: dict) -> list[str]:
    return _write(path, data, attributes, ".json")


def write_csv_layer(path: str, data, attributes: dict) -> list[str]:
    return _write(path, data, attributes, ".csv")


def activate(context=None) -> None:
    """Put our Shapes writers ahead of the other plugins' (run by npe2 when napari first uses
    any part of this plugin: the widget, a reader, a sample, a writer).

    napari offers writers in npe2's registration order: the save dialog preselects the first
    compatible writer's file type and calls that writer whatever name is typed, and
    ``save_layers("x.csv", ...)`` takes the first writer claiming ``.csv``. The order is the
    order the environment's packages happened to be found in, usually napari's own first, so
    a regions layer went out as napari's vertex CSV (features dropped) and ``regions.geojson``
    typed in the dialog went to napari's CSV writer, which wrote nothing. npe2 has no writer
    priority and napari reads no ``extension2writer`` setting, so we move our entries to the
    front of npe2's writer index: no setting of the user's is changed, it lasts for the
    session, and napari's CSV stays in the dialog's list and behind
    ``plugin="napari.write_shapes"``. If npe2's index looks different from what this expects,
    the order is left alone.
    """
    from npe2 import PluginManager

    index = getattr(PluginManager.instance(), "_contrib", None)
    entries = getattr(index, "_writers", None)
    if not isinstance(entries, list):
        return
    try:
        ours = [e for e in entries if e[3].plugin_name == PLUGIN]
        rest = [e for e in entries if e[3].plugin_name != PLUGIN]
    except (AttributeError, IndexError, TypeError):
        return
    index._writers = ours + rest


def get_reader(path):
    if isinstance(path, (list, tuple)):
        return None
    if not str(path).lower().endswith(".geojson"):
        return None
    return read_geojson_layer


def read_geojson_layer(path) -> list[tuple]:
    annotations, meta = export.read_geojson(path)
    data, shape_types, features = annotations_to_shapes(annotations)
    kwargs = {
        "name": Path(path).stem,
        "shape_type": shape_types,
        "features": features,
        "face_color": "transparent",
        "edge_width": 2,
        "metadata": {META_KEY: {"source": str(path)}},
    }
    if data:
        ids = features.get("class_id", np.full(len(data), np.nan))
        kwargs["edge_color"] = np.array(
            [[*class_color(None if np.isnan(c) else int(c)), 255] for c in ids], float) / 255
    if meta.get("scale"):
        ndim = data[0].shape[1] if data else len(meta["scale"])
        kwargs["scale"] = list(meta["scale"])[-ndim:]
    return [(data, kwargs, "shapes")]


def get_volume_reader(path):
    """NIfTI files and DICOM series (a folder holding DICOM files, or one slice of it)."""
    if isinstance(path, (list, tuple)):
        return None
    from ..volumes import is_volume_path

    return read_volume_layer if is_volume_path(path) else None


def read_volume_layer(path) -> list[tuple]:
    """The scan as one Image layer in display order (..., Z, Y, X), placed in world millimetres.

    ``metadata`` keeps what puts results back in the file: ``affine`` (the file's voxel ->
    world RAS+ matrix), ``header``, ``kind`` ("nifti" / "dicom"), ``source``, and
    ``file_order`` (the file's voxel axes are the layer's axes reversed);
    ``volumes.volume_from_metadata(layer.metadata, heat)`` rebuilds the Volume that
    ``volumes.write_nifti`` takes.
    """
    from ..volumes import read_volume

    vol = read_volume(path)
    p = Path(path)
    if vol.kind == "nifti":
        name = p.name[: -len(".nii.gz")] if p.name.lower().endswith(".nii.gz") else p.stem
    else:
        name = (vol.header.get("SeriesDescription") or Path(vol.source).name or "DICOM").strip()
    kwargs = {
        "name": name,
        "axis_labels": vol.axis_labels,
        "units": ("pixel",) * len(vol.lead_shape) + ("mm",) * 3,
        "metadata": {
            "affine": np.array(vol.affine, float),
            "header": vol.header,
            "kind": vol.kind,
            "source": vol.source,
            "file_order": "reversed",
        },
        **vol.layer_transform(),
    }
    return [(vol.data, kwargs, "image")]


def get_pyramid_reader(path):
    """Pyramidal slides (SVS, OME-TIFF, other slide formats) and OME-Zarr folders, as one
    multiscale Image layer. Anything else (a plain TIFF among them) is left to napari's own
    readers."""
    if isinstance(path, (list, tuple)):
        return None
    from ..pyramids import is_pyramid_file

    return read_pyramid_layer if is_pyramid_file(path) else None


def read_pyramid_layer(path) -> list[tuple]:
    """The pyramid's levels, lazily, as a multiscale Image layer placed in micrometres when the
    file gives its pixel size (else in level-0 pixels, or an OME-Zarr's own units), so a heat
    pyramid written with the slide's downsample and pixel size lies on it. The file stays
    open while the layer reads tiles from it."""
    from ..pyramids import open_pyramid

    pyr = open_pyramid(path)
    p = Path(path)
    name = p.name
    for ending in (".ome.zarr", ".ome.tiff", ".ome.tif", ".zarr"):
        if name.lower().endswith(ending):
            name = name[: -len(ending)]
            break
    else:
        name = p.stem
    levels = pyr.levels
    rgb = pyr.rgb
    lead = len(levels[0].shape) - 2 - (pyr.channel_axis is not None)
    scale, translate = tuple(pyr.scale), tuple(pyr.translate)
    if pyr.mpp is not None:  # an OME-Zarr in mm or nm: its numbers in micrometres, as labelled
        translate = tuple(t * m / s for t, m, s in zip(translate, pyr.mpp, scale))
        scale = tuple(pyr.mpp)
    kwargs = {
        "name": name,
        "multiscale": True,
        "rgb": rgb,
        "scale": (1.0,) * lead + scale,
        "translate": (0.0,) * lead + translate,
        "metadata": {
            "pyramid": str(path),
            "format": pyr.format,
            "downsamples": [tuple(d) for d in pyr.downsamples],
            "mpp": pyr.mpp,
        },
    }
    if pyr.mpp is not None:
        kwargs["units"] = ("pixel",) * lead + ("micrometer", "micrometer")
    if pyr.channel_axis is not None and not rgb:
        kwargs["channel_axis"] = pyr.channel_axis
    return [(levels, kwargs, "image")]
