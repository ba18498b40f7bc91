"""napari sample data: the demo model's synthetic images (File > Open Sample > napari-gradcam)."""

from __future__ import annotations

from ..samples import IMAGE_NAME, STACK_NAME, VOLUME_NAME, sample_image, sample_stack, sample_volume


def synthetic_image():
    """One 256 x 256 image with a disc, a square and a triangle."""
    return [(sample_image(), {"name": IMAGE_NAME, "colormap": "gray",
                              "contrast_limits": (0.0, 1.0)}, "image")]


def synthetic_stack():
    """16 frames of 192 x 192, 0 to 3 objects each."""
    return [(sample_stack(), {"name": STACK_NAME, "colormap": "gray",
                              "contrast_limits": (0.0, 1.0), "axis_labels": ("t", "y", "x")},
             "image")]


def synthetic_volume():
    """A 48 x 64 x 64 volume with a sphere, a cube and a cone, for the 3D demo model."""
    return [(sample_volume(), {"name": VOLUME_NAME, "colormap": "gray",
                               "contrast_limits": (0.0, 1.0), "axis_labels": ("z", "y", "x")},
             "image")]
