"""The 3D demo model: the 2D demo's network (demo/model.py) with Conv3d layers.

``Demo3dNet`` is ``DemoNet(dims=3)`` at width 8: an encoder down to 1/8 resolution (enough to tell
a sphere from a cube or a cone), a decoder back to 1/2 resolution, and ``features``, gated class
evidence at 1/2 resolution followed only by global average pooling and a Linear layer, for the
reasons given there. The first layer is a Conv3d: that is how the package knows the model
explains the last three axes of a volume. Its own name keeps the weights' sidecar
(``napari_gradcam.models.demo3d.model:Demo3dNet``) loadable.
"""

from __future__ import annotations

from ..demo.model import DemoNet, GatedEvidence
from .synthetic import CLASS_NAMES


class Demo3dNet(DemoNet):
    """``DemoNet`` for volumes (N, 1, D, H, W), 8 channels wide by default."""

    def __init__(self, width: int = 8, classes: int = len(CLASS_NAMES)):
        super().__init__(width, classes, dims=3)


__all__ = ["Demo3dNet", "GatedEvidence"]
