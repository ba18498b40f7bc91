"""Parity with pytorch-grad-cam's documented ``reshape_transform`` recipe on timm transformers
with random weights (the oracle is told the layer and the reshape; we find both ourselves):
per-image correlation >= 0.999 on the maps at input size.

The recipe: ViT / DeiT explain ``blocks[-1].norm1`` and reshape its tokens, prefix dropped, to
(N, 14, 14, C) -> (N, C, 14, 14); timm's Swin stages are already (N, H, W, C): permute.
"""

import functools

import numpy as np
import pytest
import torch

import napari_gradcam as ng
from napari_gradcam.cam import find_target_layer, to_heatmaps
from napari_gradcam.cam.methods import eigen_projection

pgc = pytest.importorskip("pytorch_grad_cam")
timm = pytest.importorskip("timm")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

MODELS = [
    # name, the layer peers explain, prefix tokens (None: channels last)
    ("vit_tiny_patch16_224", "blocks.11.norm1", 1),
    ("deit_tiny_distilled_patch16_224", "blocks.11.norm1", 2),
    ("swin_tiny_patch4_window7_224", "layers.3.blocks.1.norm1", None),
]


def _reshape(prefix):
    if prefix is None:
        return lambda t: t.permute(0, 3, 1, 2)

    def reshape_transform(t, height=14, width=14):
        result = t[:, prefix:, :].reshape(t.size(0), height, width, t.size(2))
        return result.transpose(2, 3).transpose(1, 2)

    return reshape_transform


def _corr(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


@functools.cache  # each model is built once for the module's tests
def _build(name):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval()


@pytest.fixture(params=MODELS, ids=[m[0] for m in MODELS])
def transformer(request):
    name, layer, prefix = request.param
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    return _build(name), layer, prefix, x


def _oracle(cls, model, layer, prefix, x, class_ids):
    with cls(model=model, target_layers=[model.get_submodule(layer)],
             reshape_transform=_reshape(prefix)) as oracle:
        return oracle(input_tensor=x, targets=[ClassifierOutputTarget(int(c))
                                               for c in class_ids])


def test_gradcam_parity_with_automatic_layer(transformer):
    model, layer, prefix, x = transformer
    assert find_target_layer(model, x)[0] == layer
    ours = ng.explain_batch(model, x, "gradcam")  # layer and reshape found by the engine
    ref = _oracle(pgc.GradCAM, model, layer, prefix, x, ours.class_ids)
    for i in range(len(x)):
        assert ref[i].std() > 0.01  # the oracle's map is not flat: a real comparison
        assert _corr(ours.heatmaps[i].numpy(), ref[i]) >= 0.999


def test_gradcam_plus_plus_parity_on_vit():
    name, layer, prefix = MODELS[0]
    model, x = _build(name), torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    ours = ng.explain_batch(model, x, "gradcam++", layer)
    ref = _oracle(pgc.GradCAMPlusPlus, model, layer, prefix, x, ours.class_ids)
    for i in range(len(x)):
        assert ref[i].std() > 0.01
        assert _corr(ours.heatmaps[i].numpy(), ref[i]) >= 0.999


@pytest.fixture(scope="module")
def small_vit():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2,
                              embed_dim=32, num_heads=2, num_classes=4).eval()
    return model, torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def test_eigencam_parity_on_a_small_vit(small_vit):
    """Eigen-CAM's SVD sign is arbitrary in the oracle; ours agrees with the channel mean."""
    model, x = small_vit
    ours = ng.explain_batch(model, x, "eigencam").heatmaps.numpy()
    layer = model.get_submodule("blocks.1.norm1")
    with pgc.EigenCAM(model=model, target_layers=[layer],
                      reshape_transform=lambda t: _reshape(1)(t, 4, 4)) as oracle:
        ref = oracle(input_tensor=x, targets=None)
    acts = {}
    h = layer.register_forward_hook(lambda m, i, o: acts.setdefault("a", o.detach().clone()))
    with torch.no_grad():
        model(x)
    h.remove()
    a = _reshape(1)(acts["a"], 4, 4)
    oracle_proj, ours_proj = get_2d_projection(a.numpy()), eigen_projection(a).numpy()
    flipped = to_heatmaps(-eigen_projection(a), x.shape[2:]).numpy()
    for i in range(len(x)):
        assert abs(_corr(oracle_proj[i], ours_proj[i])) > 0.999  # the same component
        expected = flipped[i] if _corr(oracle_proj[i], ours_proj[i]) < 0 else ours[i]
        assert _corr(expected, ref[i]) >= 0.999


def test_scorecam_runs_on_a_small_vit(small_vit):
    model, x = small_vit
    res = ng.explain_batch(model, x, "scorecam", chunk_size=16)
    assert res.heatmaps.shape == (2, 64, 64)
    assert bool(torch.isfinite(res.heatmaps).all()) and float(res.heatmaps.amax()) == 1.0
