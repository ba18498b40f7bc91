"""npe2 reader and writers for Shapes layers: QuPath GeoJSON, COCO JSON, CSV."""

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
