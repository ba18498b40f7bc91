"""napari-gradcam: class activation maps (CAM, Grad-CAM and family) for napari and Python."""

from .cam import CamBatch, available_methods, explain_batch
from .regions import Region, find_regions

__version__ = "0.1.0"

__all__ = ["CamBatch", "Region", "available_methods", "explain_batch", "find_regions",
           "__version__"]
