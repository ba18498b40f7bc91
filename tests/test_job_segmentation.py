"""The one explain job with segmentation networks: a class and a region per target."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import napari_gradcam as ng
from napari_gradcam.job import ExplainJob, background_class, is_segmentation
from napari_gradcam.models import ModelSpec


class TinySeg(nn.Module):
    """Class 1 where the image is bright on the left half, class 2 where it is bright on the
    right half, background (0) elsewhere; a 1x1 body and head with identity weights, so the
    automatic target layer is the body and every class grows with its own feature."""

    def __init__(self, dims: int = 2):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.body, self.head = conv(3, 3, 1), conv(3, 3, 1)
        with torch.no_grad():
            for layer in (self.body, self.head):
                layer.weight.copy_(torch.eye(3).view(3, 3, *([1] * dims)))
                layer.bias.zero_()

    def forward(self, x):
        side = torch.zeros_like(x[:, :1])
        side[..., : x.shape[-1] // 2] = 1.0
        bright = x[:, :1]
        feats = torch.cat([1 - bright, bright * side, bright * (1 - side)], 1) * 4
        return self.head(torch.relu(self.body(feats)))


def _spec(dims=2, output=None):
    torch.manual_seed(0)
    return ModelSpec(TinySeg(dims).eval(), ["background", "left", "right"], 1,
                     intensity="none", output=output)


def _image(shape=(32, 32)):
    img = np.zeros(shape, np.float32)
    img[..., 4:12, 4:12] = 1.0  # a left object (class 1)
    img[..., 20:28, 20:30] = 1.0  # a right object (class 2)
    return img


def test_segmentation_is_probed_once_per_model():
    assert is_segmentation(_spec())
    assert not is_segmentation(ng.load_model("demo"))
    spec = _spec()
    assert ExplainJob(spec).segmentation


def test_predicted_class_is_explained_over_its_predicted_region():
    spec = _spec()
    job = ExplainJob(spec, target="left", device="cpu", regions={"min_area": 4})
    result = job.run(_image())
    heat = result.heatmaps["gradcam"]
    assert heat.shape == (32, 32) and np.isfinite(heat).all()
    assert result.class_ids.ravel().tolist() == [1]
    assert result.rows[0]["class"] == "left" and result.scores.ravel()[0] > 0
    assert result.notes == []


def test_target_mask_selects_the_region_explained():
    spec = _spec()
    img = _image()
    inside = np.zeros((32, 32), bool)
    inside[20:24, 20:25] = True  # a part of the right object
    whole = ExplainJob(spec, target="right", device="cpu").run(img)
    masked = ExplainJob(spec, target="right", target_mask=inside, device="cpu").run(img)
    # the score is the class's logits summed over the region: the mask's pixels only
    assert masked.scores.ravel()[0] != pytest.approx(whole.scores.ravel()[0])
    empty = ExplainJob(spec, target="right", target_mask=np.zeros((32, 32), bool),
                       device="cpu").run(img)
    assert not empty.heatmaps["gradcam"].any() and np.isfinite(empty.scores).all()
    assert empty.notes and "'right'" in empty.notes[0] and "no pixels" in empty.notes[0]


def test_target_mask_per_image_of_a_stack_and_the_explain_function():
    spec = _spec()
    stack = np.stack([_image(), _image()])
    masks = np.zeros((2, 32, 32), bool)
    masks[0, 20:28, 20:30] = True  # image 1 has an empty region: its map is zero
    result = ExplainJob(spec, target="right", target_mask=masks, device="cpu",
                        batch_size=1).run(stack)
    heat = result.heatmaps["gradcam"]
    assert heat[0].any() and not heat[1].any()
    assert "[1]" in result.notes[0]
    exp = ng.explain(stack, spec, target="right", target_mask=masks, device="cpu")
    np.testing.assert_allclose(exp.heatmaps, heat, atol=1e-6)


def test_found_counts_predicted_classes_without_the_background():
    spec = _spec()
    img = np.zeros((32, 32), np.float32)
    img[4:12, 4:12] = 1.0  # only the left class is present
    result = ExplainJob(spec, target="found", device="cpu", regions={"min_area": 4}).run(img)
    assert [r["class"] for r in result.rows] == ["left"]
    assert result.kept.ravel().tolist() == [False, True, False]
    assert background_class(spec, 3) == 0
    assert background_class(_spec(output="multilabel"), 3) is None


def test_segment_gives_the_predicted_labels_at_the_image_size():
    spec = _spec()
    job = ExplainJob(spec, device="cpu")
    labels = job.segment(np.stack([_image(), _image()]))
    assert labels.shape == (2, 32, 32) and labels.dtype == np.int32
    assert (labels[:, 6, 6] == 1).all() and (labels[:, 24, 24] == 2).all()
    assert (labels[:, 0, 0] == 0).all()
    resized = ModelSpec(spec.module, spec.class_names, 1, input_size=(16, 16),
                        intensity="none")
    assert ExplainJob(resized, device="cpu").segment(_image()).shape == (32, 32)


def test_volume_segmentation_model():
    spec = _spec(dims=3)
    vol = _image((8, 32, 32))
    result = ExplainJob(spec, target="left", device="cpu",
                        regions={"min_area": 4}).run(vol)
    assert result.heatmaps["gradcam"].shape == (8, 32, 32)
    assert all(r.ndim == 3 for r in result.regions)
    assert ExplainJob(spec, device="cpu").segment(vol).shape == (8, 32, 32)


def test_bad_target_masks_say_what_to_change():
    with pytest.raises(ValueError, match="classifier"):
        ExplainJob(ng.load_model("demo"), target_mask=np.ones((64, 64), bool))
    with pytest.raises(ValueError, match="classifier"):
        ExplainJob(ng.load_model("demo")).segment(np.zeros((64, 64), np.float32))
    job = ExplainJob(_spec(), target="left", target_mask=np.ones((16, 16), bool), device="cpu")
    with pytest.raises(ValueError, match=r"target mask has shape \(16, 16\).*\(32, 32\)"):
        job.run(_image())


def test_a_unet_that_needs_even_sides_is_padded_and_cropped_back():
    monai = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    net = monai.UNet(spatial_dims=2, in_channels=1, out_channels=3, channels=(4, 8, 16),
                     strides=(2, 2), num_res_units=0).eval()
    spec = ModelSpec(net, ["background", "a", "b"], 1, intensity="none")
    img = np.random.default_rng(0).random((30, 30)).astype(np.float32)  # 30 = 2 * 15: odd
    with pytest.raises(RuntimeError, match="Sizes of tensors"):
        net(torch.as_tensor(img)[None, None])
    job = ExplainJob(spec, target=1, device="cpu", target_mask=np.ones((30, 30), bool))
    result = job.run(img)
    heat = result.heatmaps["gradcam"]
    assert heat.shape == (30, 30) and np.isfinite(heat).all() and heat.max() == pytest.approx(1)
    assert job.runner.multiple == 4
    assert job.segment(img).shape == (30, 30)


def test_found_inside_a_target_mask_counts_only_classes_predicted_there():
    spec = _spec()
    inside = np.zeros((32, 32), bool)
    inside[2:14, 2:14] = True  # around the left object only
    result = ExplainJob(spec, target="found", target_mask=inside, device="cpu",
                        regions={"min_area": 4}).run(_image())
    assert [r["class"] for r in result.rows] == ["left"]
    assert result.class_ids.ravel().tolist() == [0, 1, 2]  # slot k is class k
    assert np.isfinite(result.scores).all() and result.scores.ravel()[2] == 0
    nothing = ExplainJob(spec, target="found", device="cpu").run(np.zeros((32, 32), np.float32))
    assert [r["class"] for r in nothing.rows] == [""] and np.isfinite(nothing.scores).all()


def test_padding_adds_no_pixels_to_a_class_region_and_segment_learns_it_too():
    monai = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    net = monai.UNet(spatial_dims=2, in_channels=1, out_channels=3, channels=(4, 8, 16),
                     strides=(2, 2), num_res_units=0).eval()
    spec = ModelSpec(net, ["background", "a", "b"], 1, intensity="none",
                     target_layer="model.1")  # named: no automatic probe learns the padding
    img = np.random.default_rng(1).random((17, 17)).astype(np.float32)
    job = ExplainJob(spec, target=1, device="cpu")
    labels = job.segment(img)  # the first call: learns the multiple itself
    assert labels.shape == (17, 17) and job.runner.multiple == 4
    padded = np.pad(img, ((0, 3), (0, 3)), mode="edge")
    with torch.inference_mode():
        logits = net(torch.as_tensor(padded)[None, None])[0, :, :17, :17]
    np.testing.assert_array_equal(labels, logits.argmax(0).numpy())
    # the score sums class 1's logits over its predicted pixels inside the image only
    expected = float((logits[1] * (logits.argmax(0) == 1)).sum())
    assert job.run(img).scores.ravel()[0] == pytest.approx(expected, rel=1e-4)


def test_unsigned_and_weighted_target_masks():
    spec = _spec()
    labels = np.zeros((32, 32), np.uint16)
    labels[20:28, 20:30] = 7
    a = ExplainJob(spec, target="right", target_mask=labels, device="cpu").run(_image())
    b = ExplainJob(spec, target="right", target_mask=labels > 0, device="cpu").run(_image())
    np.testing.assert_allclose(a.heatmaps["gradcam"], b.heatmaps["gradcam"])
    for bad in (np.full((32, 32), np.nan), np.full((32, 32), -1.0)):
        with pytest.raises(ValueError, match="NaN, infinite or negative"):
            ExplainJob(spec, target="right", target_mask=bad)
    huge = np.where(labels > 0, 1e38, 0).astype(np.float32)
    c = ExplainJob(spec, target="right", target_mask=huge, device="cpu").run(_image())
    assert np.isfinite(c.scores).all()
    np.testing.assert_allclose(c.heatmaps["gradcam"], b.heatmaps["gradcam"], atol=1e-6)
