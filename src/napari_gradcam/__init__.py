"""napari-gradcam: class activation maps (CAM, Grad-CAM and family) for napari and Python."""

from .annotations import Annotation, annotations_to_shapes, shapes_to_annotations
from .explain_arrays import Explanation, Progress, explain, iter_explain
from .cam import CamBatch, available_methods, explain_batch
from .export import read_geojson, write_coco, write_csv, write_geojson, write_yolo
from .models import ModelSpec, load_model
from .regions import Region, find_regions, label_image, split_planes

__version__ = "0.1.0"

__all__ = [
    "Annotation",
    "CamBatch",
    "Explanation",
    "ModelSpec",
    "Progress",
    "Region",
    "__version__",
    "annotations_to_shapes",
    "available_methods",
    "explain",
    "explain_batch",
    "find_regions",
    "iter_explain",
    "label_image",
    "load_model",
    "read_geojson",
    "shapes_to_annotations",
    "split_planes",
    "write_coco",
    "write_csv",
    "write_geojson",
    "write_yolo",
]
