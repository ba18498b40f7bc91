"""The demo model's sample images, for the napari sample menu and ``demo --headless`` alike.

Made on the fly from the synthetic generator the demo model was trained on, so they hold the
three classes it knows (disc, square, triangle) and need no download.
"""

from __future__ import annotations

import numpy as np

from .models.demo.synthetic import make_image, make_stack

IMAGE_NAME = "synthetic shapes"
STACK_NAME = "synthetic stack"
VOLUME_NAME = "synthetic volume"


def sample_image() -> np.ndarray:
    """One 256 x 256 float image in [0, 1] with a disc, a square and a triangle (the image
    ``napari-gradcam example`` uses)."""
    return make_image(256, seed=6, classes=[0, 1, 2]).image


def sample_stack() -> np.ndarray:
    """16 frames of 192 x 192 (t, y, x), float in [0, 1], 0 to 3 objects each."""
    stack, _labels, _objects = make_stack(16, 192, seed=2025)
    return stack


def sample_volume() -> np.ndarray:
    """A 48 x 64 x 64 float volume (z, y, x) in [0, 1] with a sphere, a cube and a cone, from
    the generator the 3D demo model (``load_model("demo3d")``) was trained on."""
    from .models.demo3d.synthetic import sample_volume as make

    return make().volume


__all__ = ["IMAGE_NAME", "STACK_NAME", "VOLUME_NAME", "sample_image", "sample_stack",
           "sample_volume"]
