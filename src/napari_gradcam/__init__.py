"""napari-gradcam: class activation maps (CAM, Grad-CAM and family) for napari and Python."""

from .cam import CamBatch, available_methods, explain_batch
from .annotations import Annotation, annotations_to_shapes, shapes_to_annotations
from .export import read_geojson, write_coco, write_csv, write_geojson, write_yolo
from .regions import Region, find_regions

__version__ = "0.1.0"

__all__ = [
    "Annotation",
    "CamBatch",
    "Region",
    "__version__",
    "annotations_to_shapes",
    "available_methods",
    "explain_batch",
    "find_regions",
    "read_geojson",
    "shapes_to_annotations",
    "write_coco",
    "write_csv",
    "write_geojson",
    "write_yolo",
]
