"""The demo models: small U-shaped CNNs whose class evidence stays at half resolution.

One network serves both bundled demos: ``DemoNet(dims=2)`` (``load_model("demo")``, Conv2d, discs,
squares and triangles in grey images) and ``DemoNet(dims=3)`` (``Demo3dNet`` in demo3d/model.py,
``load_model("demo3d")``, Conv3d, spheres, cubes and cones in grey volumes). The two differ only
in the layers' dimensionality, the default width (16 in 2D, 8 in 3D) and the gate's floor; the
first layer's type is how the package knows that a model explains the last three axes of a
volume.

Why this shape: a plain strided CNN explained at its last conv layer gives a blob the size of
the object grown by half the receptive field (a 10 px disc in a ~38 px blob). Here an encoder
gathers context (receptive field ~65 px at 1/8 resolution, enough to tell a square from a disc
or a sphere from a cube or a cone), a decoder brings it back to 1/2 resolution with skip
connections, and ``features`` (the explained layer) is a map of class evidence at 1/2
resolution, followed only by global average pooling and a Linear layer: CAM works, and
Grad-CAM's map is exactly where the classifier found each class.

Image labels alone give no reason to keep evidence *on* an object rather than around it (evidence
next to a disc raises the disc logit just as well), so ``features`` multiplies the class evidence
(clamped to [0, 1], so that every object of a class reaches the same height and one threshold
finds them all) by a class-agnostic foreground gate, and training adds a loss on that gate against
the generator's object masks (recipe.py). The class evidence itself is learnt from the image
labels only; what CAM explains is the classifier's own output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .synthetic import CLASS_NAMES

# The gate's floor per dimensionality: below the smallest object's share of the largest input
# (a 5 px disc in 512 x 512 px, a 5 voxel sphere in 96^3 voxels).
FLOORS = {2: 1e-4, 3: 5e-5}


def _check_dims(dims: int) -> int:
    if dims not in (2, 3):
        raise ValueError(f"dims={dims!r}: the demo network is built for images (2) or volumes (3); "
                         "give 2 or 3.")
    return dims


def _conv(cin: int, cout: int, stride: int = 1, dims: int = 2) -> nn.Module:
    conv = nn.Conv2d if _check_dims(dims) == 2 else nn.Conv3d
    return conv(cin, cout, 3, stride=stride, padding=1, bias=False)


def _norm(c: int, dims: int = 2) -> nn.Module:
    return (nn.BatchNorm2d if _check_dims(dims) == 2 else nn.BatchNorm3d)(c)


def _block(cin: int, cout: int, dims: int = 2) -> nn.Sequential:
    return nn.Sequential(
        _conv(cin, cout, dims=dims), _norm(cout, dims), nn.ReLU(inplace=True),
        _conv(cout, cout, dims=dims), _norm(cout, dims), nn.ReLU(inplace=True),
    )


class GatedEvidence(nn.Module):
    """clamp(evidence, 0, 1) x gate: per-pixel (per-voxel) class evidence on the foreground.

    The network divides the pooled evidence by the input's mean gate (:meth:`share`), so
    that the global average becomes the share of the foreground that carries each channel's
    evidence: the same for an object in a 96 px image and in a 512 px one, or in a 32^3
    volume and a 96^3 one (a plain global average shrinks with the input's size, and a
    classifier trained at one size misses objects at another). The divisor is floored at
    ``floor`` (``FLOORS``), below the smallest object's share of the largest input, so an
    input with no foreground stays quiet. It is one constant per input, applied after the
    pooling rather than here: this map then depends on the pixels around each position only,
    so the maps of an image's tiles match the whole image's (a divisor inside it would give
    every tile its own scale).
    """

    FLOOR = FLOORS[2]

    def __init__(self, cin: int, cout: int, dims: int = 2, floor: float | None = None):
        super().__init__()
        conv = nn.Conv2d if _check_dims(dims) == 2 else nn.Conv3d
        self.dims = dims
        self.floor = FLOORS[dims] if floor is None else float(floor)
        self.evidence = conv(cin, cout, 1)
        self.gate = conv(cin, 1, 1)
        self.gate_logits: torch.Tensor | None = None  # kept in training only, for the gate loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x)
        self.gate_logits = logits if self.training else None
        return torch.clamp(self.evidence(x), 0, 1) * torch.sigmoid(logits)

    def share(self, x: torch.Tensor) -> torch.Tensor:
        """The input's mean gate (N, 1), floored: what the pooled evidence is divided by."""
        g = torch.sigmoid(self.gate(x))
        return g.mean(dim=tuple(range(2, 2 + self.dims))).clamp(min=self.floor)


class DemoNet(nn.Module):
    """The demo network for images (``dims=2``, input (N, 1, H, W)) or volumes (``dims=3``,
    input (N, 1, D, H, W)); any size, logits (N, classes)."""

    def __init__(self, width: int = 16, classes: int = len(CLASS_NAMES), dims: int = 2):
        super().__init__()
        self.dims = d = _check_dims(dims)
        w = width
        self.stem = nn.Sequential(  # 1/2
            _conv(1, w, stride=2, dims=d), _norm(w, d),
            nn.ReLU(inplace=True), _block(w, w, d))
        self.down1 = _block(w, 2 * w, d)  # 1/4
        self.down2 = _block(2 * w, 4 * w, d)  # 1/8
        self.up1 = _block(6 * w, 2 * w, d)  # 1/4
        self.up0 = _block(3 * w, 2 * w, d)  # 1/2
        self.features = GatedEvidence(2 * w, 2 * w, d)  # the explained layer
        self.pool = nn.AdaptiveAvgPool2d(1) if d == 2 else nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(2 * w, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Inputs are reflect-padded at the far end of each spatial axis (bottom and right of an
        # image) to a multiple of 8 and the evidence cropped back to the input: the network then
        # always sees the size parity it was trained on (with zero padding, a stride-2
        # convolution on an odd width sees a false edge along the right border that training
        # never showed it), and every pixel (voxel) of the input, and only those, is pooled.
        sizes = x.shape[2:]
        pads = [-s % 8 for s in sizes]
        if any(pads):
            x = F.pad(x, [v for p in reversed(pads) for v in (0, p)], mode="reflect")
        pool = F.max_pool2d if self.dims == 2 else F.max_pool3d
        mode = "bilinear" if self.dims == 2 else "trilinear"
        s0 = self.stem(x)
        s1 = self.down1(pool(s0, 2))
        s2 = self.down2(pool(s1, 2))
        u1 = self.up1(torch.cat([F.interpolate(s2, size=s1.shape[2:], mode=mode,
                                               align_corners=False), s1], 1))
        u0 = self.up0(torch.cat([F.interpolate(u1, size=s0.shape[2:], mode=mode,
                                               align_corners=False), s0], 1))
        u0 = u0[(slice(None), slice(None)) + tuple(slice((s + 1) // 2) for s in sizes)]
        return self.fc(self.pool(self.features(u0)).flatten(1) / self.features.share(u0))
