"""napari-gradcam: class activation maps (CAM, Grad-CAM and family) for napari and Python."""

from .annotations import Annotation, annotations_to_shapes, shapes_to_annotations
from .explain_arrays import Explanation, Progress, explain, iter_explain
from .cam import CamBatch, available_methods, explain_batch
from .export import read_geojson, write_coco, write_csv, write_geojson, write_yolo
from .models import ModelSpec, load_model
from .pyramids import Pyramid, open_pyramid, write_heat_pyramid
from .regions import Region, find_regions, label_image, scale_regions, split_planes
from .tiles import Tiling, check_tiling

__version__ = "0.1.0"

__all__ = [
    "Annotation",
    "CamBatch",
    "Explanation",
    "ModelSpec",
    "Progress",
    "Pyramid",
    "Region",
    "Tiling",
    "__version__",
    "annotations_to_shapes",
    "available_methods",
    "check_tiling",
    "explain",
    "explain_batch",
    "find_regions",
    "iter_explain",
    "label_image",
    "load_model",
    "open_pyramid",
    "read_geojson",
    "scale_regions",
    "shapes_to_annotations",
    "split_planes",
    "write_coco",
    "write_csv",
    "write_geojson",
    "write_heat_pyramid",
    "write_yolo",
]
