"""The Qt-free CAM engine: hooks, one backward to the target layer, the method formulas."""

from .engine import CamBatch, explain_batch, to_heatmaps
from .layers import find_target_layer, module_names, resolve_target_layer
from .methods import METHODS, CamContext, available_methods, get_method, register_method

__all__ = [
    "METHODS",
    "CamBatch",
    "CamContext",
    "available_methods",
    "explain_batch",
    "find_target_layer",
    "get_method",
    "module_names",
    "register_method",
    "resolve_target_layer",
    "to_heatmaps",
]
