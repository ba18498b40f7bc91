"""Volumes through the models: a Conv3d model explains the last three axes (leading axes are
volumes of a batch), a 2D model explains a volume slice by slice along its first axis, and a
three-value ``input_size`` resizes in 3D with the heatmap back at the volume's own size."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import small_cnn
from safetensors.torch import save_file

import napari_gradcam as ng
from napari_gradcam.models import ModelSpec


def volumes(*shape, seed=0):
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def reference(model, x: torch.Tensor, size=None):
    """Grad-CAM of ``x`` (N, 1, *spatial) done by hand: resized to ``size`` first, the maps
    resized back as the package does."""
    spatial = tuple(x.shape[2:])
    mode = "trilinear" if x.ndim == 5 else "bilinear"
    if size is not None:
        x = F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=x.ndim == 4)
    out = ng.explain_batch(model, x, "gradcam")
    maps = out.heatmaps
    if size is not None:
        maps = F.interpolate(maps[:, None], size=spatial, mode=mode,
                             align_corners=False).clamp(0, 1)[:, 0]
    return maps.numpy(), out.class_ids.numpy()


def test_a_3d_model_explains_the_last_three_axes_leading_axes_are_volumes():
    model = small_cnn(dims=3)
    spec = ng.load_model(model)
    batch = volumes(2, 24, 32, 32)
    exp = ng.explain(batch, spec, device="cpu")
    assert exp.heatmaps.shape == (2, 24, 32, 32) and exp.class_ids.shape == (2,)
    maps, ids = reference(model, torch.from_numpy(batch)[:, None])
    np.testing.assert_allclose(exp.heatmaps, maps, atol=1e-5)
    np.testing.assert_array_equal(exp.class_ids, ids)
    one = ng.explain(batch[1], spec, device="cpu")  # one volume: no leading axis
    assert one.heatmaps.shape == (24, 32, 32) and one.class_ids.shape == ()
    np.testing.assert_allclose(one.heatmaps, exp.heatmaps[1], atol=1e-5)


def test_a_2d_model_explains_a_volume_slice_by_slice_along_its_first_axis():
    model = small_cnn(dims=2)
    spec = ng.load_model(model)
    volume = volumes(6, 20, 24)
    exp = ng.explain(volume, spec, device="cpu")
    assert exp.heatmaps.shape == (6, 20, 24) and exp.class_ids.shape == (6,)
    maps, ids = reference(model, torch.from_numpy(volume)[:, None])
    np.testing.assert_allclose(exp.heatmaps, maps, atol=1e-5)
    np.testing.assert_array_equal(exp.class_ids, ids)
    # a 2D input_size resizes each slice; the maps come back at the slices' size
    sized = ng.explain(volume, ng.load_model(model, input_size=(16, 16)), device="cpu")
    maps, _ = reference(model, torch.from_numpy(volume)[:, None], (16, 16))
    assert sized.heatmaps.shape == (6, 20, 24)
    np.testing.assert_allclose(sized.heatmaps, maps, atol=1e-5)


def test_a_three_value_input_size_resizes_volumes_in_3d():
    model = small_cnn(dims=3)
    spec = ng.load_model(model, input_size=(16, 16, 16))
    assert spec.input_size == (16, 16, 16)
    batch = volumes(2, 24, 32, 20)
    exp = ng.explain(batch, spec, device="cpu")
    assert exp.heatmaps.shape == (2, 24, 32, 20)  # the volumes' own size
    maps, ids = reference(model, torch.from_numpy(batch)[:, None], (16, 16, 16))
    np.testing.assert_allclose(exp.heatmaps, maps, atol=1e-5)
    np.testing.assert_array_equal(exp.class_ids, ids)
    assert exp.heatmaps.std() > 0.05


def test_a_sidecar_input_size_resizes_in_3d(tmp_path):
    model = small_cnn(dims=3)
    weights = tmp_path / "net.safetensors"
    save_file(model.state_dict(), str(weights))
    (tmp_path / "net.safetensors.json").write_text(json.dumps(
        {"architecture": "conftest:small_cnn", "arguments": {"dims": 3},
         "input_size": [16, 16, 16]}))
    spec = ng.load_model(weights, trust_code=True)
    assert spec.input_size == (16, 16, 16)
    volume = volumes(24, 32, 20)
    exp = ng.explain(volume, spec, device="cpu")
    maps, _ = reference(model, torch.from_numpy(volume)[None, None], (16, 16, 16))
    assert exp.heatmaps.shape == (24, 32, 20)
    np.testing.assert_allclose(exp.heatmaps, maps[0], atol=1e-5)


@pytest.mark.parametrize("dims, size, give", [(3, (32, 32), "give three, .D, H, W."),
                                              (2, (8, 32, 32), "give two, .H, W.")])
def test_an_input_size_of_the_wrong_rank_is_refused(tmp_path, dims, size, give):
    model = small_cnn(dims=dims)
    with pytest.raises(ValueError, match=f"has {len(size)} values but the model is {dims}D.*"
                                         f"{give}"):
        ng.load_model(model, input_size=size)
    weights = tmp_path / "net.safetensors"
    save_file(model.state_dict(), str(weights))
    side = tmp_path / "net.safetensors.json"
    side.write_text(json.dumps({"architecture": "conftest:small_cnn",
                                "arguments": {"dims": dims}, "input_size": list(size)}))
    with pytest.raises(ValueError, match=f"has {len(size)} values but the model is {dims}D"):
        ng.load_model(weights, trust_code=True)
    # a spec built by hand reaches explain: refused there, before any work
    spec = ModelSpec(model, ["a", "b", "c"], 1, tuple(size))
    with pytest.raises(ValueError, match=f"{give}"):
        ng.explain(volumes(8, 32, 32), spec, device="cpu")
    assert side.read_text().count("input_size") == 1  # the description is left as it was
