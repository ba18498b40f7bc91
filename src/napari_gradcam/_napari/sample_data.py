"""napari sample data: the demo model's synthetic images (File > Open Sample > napari-gradcam)."""

from __future__ import annotations

from ..models.demo.synthetic import make_image, make_stack


def synthetic_image():
    """One 256 x 256 image with a disc, a square and a triangle."""
    item = make_image(256, seed=6, classes=[0, 1, 2])  # the image `napari-gradcam example` uses
    return [(item.image, {"name": "synthetic shapes", "colormap": "gray",
                          "contrast_limits": (0.0, 1.0)}, "image")]


def synthetic_stack():
    """16 frames of 192 x 192, 0 to 3 objects each."""
    stack, _labels, _objects = make_stack(16, 192, seed=2025)
    return [(stack, {"name": "synthetic stack", "colormap": "gray",
                     "contrast_limits": (0.0, 1.0), "axis_labels": ("t", "y", "x")}, "image")]
