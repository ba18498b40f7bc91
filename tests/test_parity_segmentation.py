"""Parity with pytorch-grad-cam's ``SemanticSegmentationTarget(category, mask)`` (the score
``(output[category] * mask).sum()``) on a random segmentation_models_pytorch U-Net: per-image
correlation >= 0.999 with the oracle's map, at the last decoder block (full resolution, where
the gradient only crosses the head) and at a deeper block (maps upsampled 4x).

The oracle min-max scales at the layer's resolution and then resizes with OpenCV; we upsample
first and scale after. Both are bilinear with half-pixel centres and min-max scaling is affine,
so the maps agree up to interpolation rounding.
"""

import numpy as np
import pytest
import torch

import napari_gradcam as ng

pgc = pytest.importorskip("pytorch_grad_cam")
smp = pytest.importorskip("segmentation_models_pytorch")
from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

from test_parity_pytorch_grad_cam import ORACLES as ALL_ORACLES  # noqa: E402

# the gradient methods: Eigen-CAM ignores the target, so it has no segmentation parity to check
ORACLES = {m: o for m, o in ALL_ORACLES.items() if m != "eigencam"}
# every method at the last decoder block; the upsampling path once, at a block 4x smaller
CASES = [(m, "decoder.blocks.4") for m in ORACLES] + [("gradcam++", "decoder.blocks.2")]


def _corr(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(2)
    model = smp.Unet(encoder_name="resnet18", encoder_weights=None, classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
    pred = logits.argmax(1)  # (2, 32, 32)
    # explained per image: its most frequent foreground class, over its predicted region
    counts = torch.stack([torch.bincount(p.flatten(), minlength=3) for p in pred])
    classes = (counts[:, 1:].argmax(1) + 1).tolist()
    assert all(int(counts[i, c]) > 0 for i, c in enumerate(classes))
    return model, x, logits, classes


def _oracle(model, layer_name, x, method, classes, masks):
    layer = model.get_submodule(layer_name)
    targets = [SemanticSegmentationTarget(c, m.astype(np.float32)) for c, m in
               zip(classes, masks)]
    # the oracle's loss.backward() fills every parameter's .grad: the encoder's (below each
    # target layer here) would only cost time, so it is frozen while the oracle runs
    encoder = list(model.encoder.parameters())
    try:
        for p in encoder:
            p.requires_grad_(False)
        with ORACLES[method](model=model, target_layers=[layer]) as cam:
            return cam(input_tensor=x, targets=targets)
    finally:
        for p in encoder:
            p.requires_grad_(True)


def _check(ours, theirs):
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, theirs):
        assert np.ptp(b) > 1e-6  # nothing here explains a flat map: every image is compared
        assert _corr(a, b) >= 0.999


@pytest.mark.parametrize("method, layer", CASES)
def test_parity_predicted_regions(unet, method, layer):
    model, x, logits, classes = unet
    masks = [(p == c).numpy() for p, c in zip(logits.argmax(1), classes)]
    theirs = _oracle(model, layer, x, method, classes, masks)
    out = ng.explain_batch(model, x, method, target_layer=layer, targets=classes)
    _check(out.heatmaps.numpy(), theirs)
    expected = [float((logits[i, c] * torch.from_numpy(m)).sum())
                for i, (c, m) in enumerate(zip(classes, masks))]
    np.testing.assert_allclose(out.scores.numpy(), expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("method", ["gradcam"])
def test_parity_given_masks(unet, method):
    """A caller's mask (a weighted box) for a class, the same class in both images."""
    model, x, _logits, _classes = unet
    masks = np.zeros((2, 32, 32), np.float32)
    masks[0, 5:15, 10:25] = 1.0
    masks[1, 20:30, 3:12] = 0.5
    layer = "decoder.blocks.3"
    theirs = _oracle(model, layer, x, method, [2, 2], list(masks))
    out = ng.explain_batch(model, x, method, target_layer=layer, targets=[2, 2],
                           target_masks=torch.from_numpy(masks))
    _check(out.heatmaps.numpy(), theirs)
