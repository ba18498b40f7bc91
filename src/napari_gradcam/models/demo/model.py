"""The demo model: a small U-shaped CNN whose class evidence stays at half resolution.

Why this shape: a plain strided CNN explained at its last conv
layer gives a blob the size of the object grown by half the receptive field (a 10 px disc in a
~38 px blob). Here an encoder gathers context (receptive field ~65 px at 1/8 resolution, enough
to tell a square from a disc), a decoder brings it back to 1/2 resolution with skip
connections, and ``features`` (the explained layer) is a map of class evidence at 1/2
resolution, followed only by global average pooling and a Linear layer: CAM works.

Image labels alone give no reason to keep evidence *on* an object rather than around it (evidence
next to a disc raises the disc logit just as well), so ``features`` multiplies the class evidence
(clamped to [0, 1], so that every object of a class reaches the same height) by a class-agnostic
foreground gate, and training adds a loss on that gate against the generator's object masks
(train.py). The class evidence itself is learnt from the image labels only; what CAM explains is
the classifier's own output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .synthetic import CLASS_NAMES


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        _conv(cin, cout), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        _conv(cout, cout), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class GatedEvidence(nn.Module):
    """clamp(evidence, 0, 1) x gate / mean(gate): per-pixel class evidence on the foreground.

    Dividing by the image's mean gate makes the global average of this map the share of the
    foreground that carries each channel's evidence: the same for an object in a 96 px image and
    in a 512 px one (a plain global average shrinks with the image's area, and a classifier
    trained at one size misses objects at another). The divisor is floored at FLOOR, below the
    smallest object's share of the largest image, so an image with no foreground stays quiet.
    It is a per-image constant, so CAM maps are unchanged by it.
    """

    FLOOR = 1e-4

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.evidence = nn.Conv2d(cin, cout, 1)
        self.gate = nn.Conv2d(cin, 1, 1)
        self.gate_logits: torch.Tensor | None = None  # kept in training only, for the gate loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x)
        self.gate_logits = logits if self.training else None
        g = torch.sigmoid(logits)
        share = g.mean(dim=(2, 3), keepdim=True).clamp(min=self.FLOOR)
        return torch.clamp(self.evidence(x), 0, 1) * (g / share)


class DemoNet(nn.Module):
    def __init__(self, width: int = 16, classes: int = len(CLASS_NAMES)):
        super().__init__()
        w = width
        self.stem = nn.Sequential(  # 1/2
            _conv(1, w, stride=2), nn.BatchNorm2d(w),
            nn.ReLU(inplace=True), _block(w, w))
        self.down1 = _block(w, 2 * w)  # 1/4
        self.down2 = _block(2 * w, 4 * w)  # 1/8
        self.up1 = _block(6 * w, 2 * w)  # 1/4
        self.up0 = _block(3 * w, 2 * w)  # 1/2
        self.features = GatedEvidence(2 * w, 2 * w)  # the explained layer
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * w, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Inputs are reflect-padded at the bottom and right to a multiple of 8 and the evidence
        # cropped back to the image: the network then always sees the size parity it was
        # trained on (with zero padding, a stride-2 convolution on an odd width sees a false
        # edge along the right border that training never showed it), and every image pixel,
        # and only those, is pooled.
        h, w = x.shape[2:]
        ph, pw = -h % 8, -w % 8
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect")
        s0 = self.stem(x)
        s1 = self.down1(F.max_pool2d(s0, 2))
        s2 = self.down2(F.max_pool2d(s1, 2))
        u1 = self.up1(torch.cat([F.interpolate(s2, size=s1.shape[2:], mode="bilinear",
                                               align_corners=False), s1], 1))
        u0 = self.up0(torch.cat([F.interpolate(u1, size=s0.shape[2:], mode="bilinear",
                                               align_corners=False), s0], 1))
        u0 = u0[:, :, : (h + 1) // 2, : (w + 1) // 2]
        return self.fc(self.pool(self.features(u0)).flatten(1))
