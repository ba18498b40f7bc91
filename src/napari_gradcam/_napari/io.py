"""npe2 readers and writers: Shapes layers as QuPath GeoJSON, COCO JSON, CSV; NIfTI and DICOM
volumes in."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import export
from ..annotations import annotations_to_shapes, class_color, shapes_to_annotations

META_KEY = "napari_gradcam"  # layer.metadata[META_KEY]: class_names, image_shape, image_name


def _layer(data, attributes):
    annotations = shapes_to_annotations(list(data), attributes.get("shape_type", "polygon"),
                                        attributes.get("features"))
    meta = (attributes.get("metadata") or {}).get(META_KEY, {})
    return annotations, meta


def write_geojson_layer(path: str, data, attributes: dict) -> list[str]:
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
    return [path]


def write_coco_layer(path: str, data, attributes: dict) -> list[str]:
    annotations, meta = _layer(data, attributes)
    export.write_coco(annotations, path, class_names=meta.get("class_names"),
                      image_shape=meta.get("image_shape"),
                      image_name=meta.get("image_name") or attributes.get("name") or "image")
    return [path]


def write_csv_layer(path: str, data, attributes: dict) -> list[str]:
    annotations, meta = _layer(data, attributes)
    export.write_csv(annotations, path, class_names=meta.get("class_names"))
    return [path]


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
