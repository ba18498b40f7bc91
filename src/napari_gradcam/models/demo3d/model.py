"""The 3D demo model: a small U-shaped Conv3d network whose class evidence stays at 1/2 resolution.

The 2D demo model's design in three dimensions, for the same reasons. An encoder gathers context
down to 1/8 resolution (enough to tell a sphere from a cube or a cone), a decoder brings it back
to 1/2 resolution with skip connections, and ``features`` (the explained layer) is a map of class
evidence at 1/2 resolution followed only by global average pooling and a Linear layer, so CAM
works and Grad-CAM's map is exactly where the classifier found each class.

Volume labels alone give no reason to keep evidence *on* an object rather than around it, so
``features`` multiplies the class evidence (clamped to [0, 1]: every object of a class reaches
the same height, and one threshold finds them all) by a class-agnostic foreground gate that
training fits to the generator's object masks (train.py). The first layer is a Conv3d: that is
how the package knows the model explains the last three axes of a volume.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .synthetic import CLASS_NAMES


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        _conv(cin, cout), nn.BatchNorm3d(cout), nn.ReLU(inplace=True),
        _conv(cout, cout), nn.BatchNorm3d(cout), nn.ReLU(inplace=True),
    )


class GatedEvidence3d(nn.Module):
    """clamp(evidence, 0, 1) x gate / mean(gate): per-voxel class evidence on the foreground.

    Dividing by the volume's mean gate makes the global average of this map the share of the
    foreground that carries each channel's evidence, the same for an object in a 32^3 volume and
    in a 96^3 one (a plain average shrinks with the volume, and a classifier trained at one size
    would miss objects at another). The divisor is floored at FLOOR, below the smallest object's
    share of the largest volume, so a volume without foreground stays quiet. It is one constant
    per volume, so CAM maps are unchanged by it.
    """

    FLOOR = 5e-5

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.evidence = nn.Conv3d(cin, cout, 1)
        self.gate = nn.Conv3d(cin, 1, 1)
        self.gate_logits: torch.Tensor | None = None  # kept in training only, for the gate loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x)
        self.gate_logits = logits if self.training else None
        g = torch.sigmoid(logits)
        share = g.mean(dim=(2, 3, 4), keepdim=True).clamp(min=self.FLOOR)
        return torch.clamp(self.evidence(x), 0, 1) * (g / share)


class Demo3dNet(nn.Module):
    def __init__(self, width: int = 8, classes: int = len(CLASS_NAMES)):
        super().__init__()
        w = width
        self.stem = nn.Sequential(  # 1/2
            _conv(1, w, stride=2), nn.BatchNorm3d(w), nn.ReLU(inplace=True), _block(w, w))
        self.down1 = _block(w, 2 * w)  # 1/4
        self.down2 = _block(2 * w, 4 * w)  # 1/8
        self.up1 = _block(6 * w, 2 * w)  # 1/4
        self.up0 = _block(3 * w, 2 * w)  # 1/2
        self.features = GatedEvidence3d(2 * w, 2 * w)  # the explained layer
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(2 * w, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Volumes are reflect-padded at the far end of each axis to a multiple of 8 and the
        # evidence cropped back to the volume: the network always sees the size parity it was
        # trained on, and every voxel of the volume, and only those, is pooled.
        d, h, w = x.shape[2:]
        pd, ph, pw = -d % 8, -h % 8, -w % 8
        if pd or ph or pw:
            x = F.pad(x, (0, pw, 0, ph, 0, pd), mode="reflect")
        s0 = self.stem(x)
        s1 = self.down1(F.max_pool3d(s0, 2))
        s2 = self.down2(F.max_pool3d(s1, 2))
        u1 = self.up1(torch.cat([F.interpolate(s2, size=s1.shape[2:], mode="trilinear",
                                               align_corners=False), s1], 1))
        u0 = self.up0(torch.cat([F.interpolate(u1, size=s0.shape[2:], mode="trilinear",
                                               align_corners=False), s0], 1))
        u0 = u0[:, :, : (d + 1) // 2, : (h + 1) // 2, : (w + 1) // 2]
        return self.fc(self.pool(self.features(u0)).flatten(1))
