"""The Qt-free CAM engine: hooks, one backward to the target layer, the method formulas."""

from .engine import CamBatch, explain_batch, to_heatmaps
from .layers import find_target_layer, module_names, resolve_target_layer
from .methods import METHODS, CamContext, available_methods, get_method, register_method
from .segmentation import EmptyTargetWarning, is_segmentation_output, segmentation_labels

__all__ = [
    "METHODS",
    "CamBatch",
    "CamContext",
    "EmptyTargetWarning",
    "available_methods",
    "explain_batch",
    "find_target_layer",
    "get_method",
    "is_segmentation_output",
    "module_names",
    "register_method",
    "resolve_target_layer",
    "segmentation_labels",
    "to_heatmaps",
]
