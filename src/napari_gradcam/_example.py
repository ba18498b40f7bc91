"""A small built-in example that needs no download and no training.

``blob_detector()`` is a CAM-compatible CNN with hand-set weights: a difference-of-Gaussians
filter that answers bright spots and its negative that answers dark spots, a ReLU, global average
pooling and a Linear head with the classes ``["bright spot", "dark spot"]``. ``example_image()``
draws spots of both kinds on smooth textured noise and returns where they are, so that what the
engine finds can be checked against the truth.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

CLASS_NAMES = ["bright spot", "dark spot"]


def _dog_kernel(size: int = 29, centre: float = 3.5, surround: float = 7.0) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float32) - size // 2
    d2 = r[:, None] ** 2 + r[None, :] ** 2

    def gauss(s):
        g = torch.exp(-d2 / (2 * s * s))
        return g / g.sum()

    return gauss(centre) - gauss(surround)  # sums to zero: flat regions answer 0


class BlobDetector(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 2, 29, padding=14, padding_mode="reflect"), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def blob_detector() -> BlobDetector:
    model = BlobDetector()
    k = _dog_kernel()
    with torch.no_grad():
        model.features[0].weight.copy_(torch.stack([k, -k])[:, None])
        model.features[0].bias.fill_(-0.06)  # ignore the background texture's ripples
        model.fc.weight.copy_(torch.eye(2) * 100.0)
        model.fc.bias.zero_()
    return model.eval()


def example_image(size: int = 128, seed: int = 0):
    """(image float32 (size, size) in [0, 1], list of (class_name, (r0, c0, r1, c1)) boxes)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    img = gaussian_filter(rng.normal(size=(size, size)), 1.5)
    img = 0.4 + 0.05 * img / img.std()
    rr, cc = np.mgrid[:size, :size]
    spots = [("bright spot", 0.3, 0.30, 0.35, 6), ("bright spot", 0.3, 0.72, 0.75, 7),
             ("dark spot", -0.3, 0.70, 0.25, 6)]
    truth = []
    for name, delta, fr, fc, radius in spots:
        r, c = int(fr * size), int(fc * size)
        img[(rr - r) ** 2 + (cc - c) ** 2 <= radius ** 2] += delta
        truth.append((name, (r - radius, c - radius, r + radius + 1, c + radius + 1)))
    return np.clip(img, 0, 1).astype(np.float32), truth


def _boxes(heatmap: np.ndarray, threshold: float = 0.2):
    from skimage.measure import label, regionprops

    return [p.bbox for p in regionprops(label(heatmap >= threshold))]


def _iou(a, b) -> float:
    r0, c0 = max(a[0], b[0]), max(a[1], b[1])
    r1, c1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, r1 - r0) * max(0, c1 - c0)
    area = lambda x: (x[2] - x[0]) * (x[3] - x[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def run_example(methods=None, device="auto", out=print) -> dict:
    """Explain both classes of the example image with every method and report what was found.

    Returns ``{(method, class_name): best box IoU per true spot of that class}``.
    """
    from . import available_methods, explain_batch
    from ._device import describe_device, resolve_device

    dev = resolve_device(device)
    model = blob_detector().to(dev)
    image, truth = example_image()
    batch = torch.from_numpy(image)[None, None].to(dev)
    batch = batch.expand(2, -1, -1, -1)  # one copy per class: both explained in one batch
    out(f"napari-gradcam example: hand-set blob detector on a {image.shape[0]} x "
        f"{image.shape[1]} image with {len(truth)} spots; device: {describe_device(dev)}")
    out("  boxes: connected regions of heat >= 0.2 (the CAM paper's 20 % rule)")
    for name, box in truth:
        out(f"  true {name:<12} box (min_row, min_col, max_row, max_col) = {box}")
    results = {}
    for method in methods or available_methods():
        if method == "eigencam":
            out("  (eigencam is class-agnostic: it maps the activations' dominant pattern)")
        res = explain_batch(model, batch, method, target_layer="features", targets=[0, 1])
        maps = res.heatmaps.cpu().numpy()
        for i, cls in enumerate(CLASS_NAMES):
            found = _boxes(maps[i])
            ious = [max((_iou(t, f) for f in found), default=0.0)
                    for n, t in truth if n == cls]
            peak = tuple(int(v) for v in np.unravel_index(int(maps[i].argmax()), maps[i].shape))
            hit = any(t[0] <= peak[0] < t[2] and t[1] <= peak[1] < t[3]
                      for n, t in truth if n == cls)
            results[(method, cls)] = ious
            out(f"  {method:<9} {cls:<11} score {float(res.scores[i]):6.2f}  peak at {peak}: "
                f"{'on' if hit else 'NOT on'} a {cls}; {len(found)} box(es) at heat >= 0.2, "
                f"best IoU per true {cls}: {', '.join(f'{v:.2f}' for v in ious)}")
    return results
