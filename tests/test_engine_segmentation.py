"""Segmentation targets (Seg-Grad-CAM): hand-computed maps on tiny 2D and 3D networks, predicted
regions (softmax and multi-label), slots with their own masks, Score-CAM / Eigen-CAM, and every
bad input the caller can give.

The 2D network: an identity target layer ``features`` (so the activations A are the input) and a
1 x 1 convolution head ``head`` with weights H and bias b:

    A0 = [[1, 2],    A1 = [[0, 1],     H = [[ 1, -1],    b = [0.2, 0, 0]
          [0, 1]]          [2, 0]]          [-1,  1],
                                            [0.5, 0.5]]

    logits0 = A0 - A1 + 0.2 = [[1.2, 1.2], [-1.8, 1.2]]
    logits1 = A1 - A0       = [[-1, -1],   [2, -1]]
    logits2 = (A0 + A1) / 2 = [[0.5, 1.5], [1, 0.5]]

so the argmax is [[0, 2], [1, 0]]: class 0 (background) predicted at two pixels, classes 1 and
2 at one each. For a region M the score is S = sum M * logits_c, its gradient G_k = H[c, k] * M,
so Grad-CAM's weights are w_k = H[c, k] * mean(M) and HiResCAM's map is M * (logits_c - b_c).
"""

import warnings

import numpy as np
import pytest
import torch
from conftest import hooks_left, small_cnn
from torch import nn

import napari_gradcam as ng
from napari_gradcam.cam import (
    EmptyTargetWarning,
    is_segmentation_output,
    segmentation_labels,
    to_heatmaps,
)
from napari_gradcam.cam.methods import eigen_projection

A = torch.tensor([[[1.0, 2.0], [0.0, 1.0]], [[0.0, 1.0], [2.0, 0.0]]])
H = torch.tensor([[1.0, -1.0], [-1.0, 1.0], [0.5, 0.5]])
B = torch.tensor([0.2, 0.0, 0.0])
GRADIENT_METHODS = ["gradcam", "gradcam++", "hirescam", "xgradcam", "layercam"]
SEG_METHODS = GRADIENT_METHODS + ["scorecam", "eigencam"]


class Head(nn.Module):
    """Identity ``features`` -> 1 x 1 convolution ``head`` (2D or 3D), then ``post``."""

    def __init__(self, weight, bias=None, dims=2, post=None):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.features = nn.Identity()
        self.head = conv(weight.shape[1], weight.shape[0], 1, bias=bias is not None)
        with torch.no_grad():
            self.head.weight.copy_(weight.view(*weight.shape, *([1] * dims)))
            if bias is not None:
                self.head.bias.copy_(bias)
        self.post = post if post is not None else nn.Identity()

    def forward(self, x):
        return self.post(self.head(self.features(x)))


def golden(**kw):
    return Head(H, B, **kw).eval()


def run(method="gradcam", model=None, x=None, **kw):
    model = golden() if model is None else model
    x = A[None] if x is None else x
    return ng.explain_batch(model, x, method, target_layer="features", **kw)


def close(got, expected, atol=1e-5):
    torch.testing.assert_close(got, torch.as_tensor(expected, dtype=torch.float32), atol=atol,
                               rtol=0)


def tiny_unet(dims=2, classes=3):
    """A small conv encoder / decoder with a skip, 2D or 3D, random weights."""
    conv = nn.Conv2d if dims == 2 else nn.Conv3d

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.down = nn.Sequential(conv(1, 6, 3, padding=1), nn.ReLU())
            self.mid = nn.Sequential(conv(6, 8, 3, padding=1, stride=2), nn.ReLU())
            self.up = nn.Upsample(scale_factor=2, mode="nearest")
            self.dec = nn.Sequential(conv(14, 8, 3, padding=1), nn.ReLU())
            self.head = conv(8, classes, 1)

        def forward(self, x):
            d = self.down(x)
            return self.head(self.dec(torch.cat([self.up(self.mid(d)), d], 1)))

    return Net().eval()


# ---- hand-computed values -----------------------------------------------------------------------

def test_gradcam_predicted_region_golden():
    # class 2: region {(0, 1)}, mean M = 1/4, w = [0.125, 0.125]: map (A0 + A1) / 8 =
    # [[1, 3], [2, 1]] / 8 -> min-max [[0, 1], [0.5, 0]]; score = logits2[0, 1] = 1.5
    out = run(targets=[2])
    close(out.heatmaps[0], [[0.0, 1.0], [0.5, 0.0]])
    assert out.class_ids.tolist() == [2]
    close(out.scores, [1.5])
    # class 1: region {(1, 0)}, w = [-1, 1] / 4: map (A1 - A0) / 4, only (1, 0) positive
    out = run(targets=[1])
    close(out.heatmaps[0], [[0.0, 0.0], [1.0, 0.0]])
    close(out.scores, [2.0])


def test_gradcam_and_hirescam_with_a_weighted_mask_golden():
    # class 0 over M = [[1, 0.5], [0, 0]]: mean M = 0.375, w = [0.375, -0.375]: map
    # 0.375 (A0 - A1) = 0.375 [[1, 1], [-2, 1]] -> [[1, 1], [0, 1]];
    # score = 1 * 1.2 + 0.5 * 1.2 = 1.8 (the bias counts, weighted like the logits)
    m = torch.tensor([[[1.0, 0.5], [0.0, 0.0]]])
    out = run(targets=[0], target_masks=m)
    close(out.heatmaps[0], [[1.0, 1.0], [0.0, 1.0]])
    close(out.scores, [1.8])
    # HiResCAM: sum_k G_k A_k = M * (A0 - A1) = [[1, 0.5], [0, 0]]
    close(run("hirescam", targets=[0], target_masks=m).heatmaps[0], [[1.0, 0.5], [0.0, 0.0]])
    # a boolean mask is weights 0 / 1; at (1, 0) class 0's logits are negative:
    # M = [[0, 0], [1, 1]], w = [0.5, -0.5] -> 0.5 (A0 - A1) -> [[1, 1], [0, 1]], score -0.6
    out = run(targets=[0], target_masks=torch.tensor([[[False, False], [True, True]]]))
    close(out.heatmaps[0], [[1.0, 1.0], [0.0, 1.0]])
    close(out.scores, [-0.6])


def test_targets_none_takes_the_largest_foreground_region():
    # argmax [[0, 2], [1, 0]]: background (2 pixels) is skipped, 1 and 2 tie at one pixel and
    # the lower class wins the tie
    out = run()
    assert out.class_ids.tolist() == [1]
    close(out.scores, [2.0])
    # background only: then class 0 is explained (its region is the whole image)
    flat = Head(H, torch.tensor([10.0, 0.0, 0.0])).eval()
    out = run(model=flat)
    assert out.class_ids.tolist() == [0]
    # with a target mask: the largest predicted class inside it
    inside = torch.tensor([[[0, 1], [0, 0]]], dtype=torch.bool)
    assert run(target_masks=inside).class_ids.tolist() == [2]


def test_callable_targets_get_pooled_scores():
    # each class's logits over its own region: class 0: 1.2 + 1.2, class 1: 2, class 2: 1.5
    seen = []

    def two_best(pooled):
        seen.append(pooled)
        return pooled.argsort(1, descending=True)[:, :2]

    out = run(targets=two_best)
    close(seen[0], [[2.4, 2.0, 1.5]])
    assert out.class_ids.tolist() == [[0, 1]]
    close(out.scores, [[2.4, 2.0]])
    # one region per sample: every class pooled over its predicted pixels inside it
    seen.clear()
    run(targets=two_best, target_masks=torch.tensor([[[1.0, 1.0], [0.0, 0.0]]]))
    close(seen[0], [[1.2, 0.0, 1.5]])


def test_3d_golden_multilabel_and_softmax():
    # one output channel, head [1, -1]: logits = A0 - A1 = [[[1, -1], [2, 0]], [[-2, 3], [1, -1]]]
    a0 = torch.tensor([[[1.0, 0.0], [2.0, 0.0]], [[0.0, 3.0], [1.0, 0.0]]])
    a1 = torch.tensor([[[0.0, 1.0], [0.0, 0.0]], [[2.0, 0.0], [0.0, 1.0]]])
    x = torch.stack([a0, a1])[None]
    model = Head(torch.tensor([[1.0, -1.0]]), dims=3).eval()
    # multi-label (the default for one channel): region logits > 0, 4 of 8 voxels, mean 0.5,
    # w = [0.5, -0.5]: map 0.5 * relu(logits) / max -> relu(logits) / 3; score 1 + 2 + 3 + 1
    out = run(model=model, x=x)
    relu = torch.tensor([[[1.0, 0.0], [2.0, 0.0]], [[0.0, 3.0], [1.0, 0.0]]])
    assert out.class_ids.tolist() == [0]
    close(out.heatmaps[0], relu / 3)
    close(out.scores, [7.0])
    # softmax of one channel: the argmax is class 0 everywhere, the score the sum of logits
    out = run(model=model, x=x, multilabel=False)
    close(out.heatmaps[0], relu / 3)
    close(out.scores, [3.0])
    # a mask over the first plane only: score 1 - 1 + 2 + 0
    m = torch.zeros(1, 2, 2, 2)
    m[0, 0] = 1
    close(run(model=model, x=x, target_masks=m).scores, [2.0])


def test_multilabel_regions_several_channels():
    # two sigmoid channels: channel 0 = A0 (positive at 3 pixels), channel 1 = A1 - 0.5
    # (positive at 2): targets None takes the larger region, with no background skipped
    model = Head(torch.eye(2), torch.tensor([0.0, -0.5])).eval()
    out = run(model=model, multilabel=True)
    assert out.class_ids.tolist() == [0]
    close(out.scores, [4.0])  # 1 + 2 + 1
    # the same model read as softmax: argmax [[0, 0], [1, 0]] -> class 1 (one pixel) wins
    out = run(model=model, multilabel=False)
    assert out.class_ids.tolist() == [1]
    close(out.scores, [1.5])


def test_eigencam_is_the_activations_principal_component():
    out = run("eigencam", targets=[2])
    close(out.heatmaps[0], to_heatmaps(eigen_projection(A[None]), (2, 2))[0])


def test_scorecam_golden():
    # class 2, region {(0, 1)}. Each channel, min-max scaled, masks the input:
    # channel 0: A0 / 2 -> masked inputs (A0 * A0 / 2, A1 * A0 / 2), class 2 at (0, 1) =
    # 0.5 * (4 / 2 + 2 / 2) = 1.5; channel 1: A1 / 2 -> 0.5 * (2 / 2 + 1 / 2) = 0.75.
    # softmax([1.5, 0.75]) weights the channels
    w = torch.softmax(torch.tensor([1.5, 0.75]), 0)
    expected = to_heatmaps((w[:, None, None] * A).sum(0)[None], (2, 2))[0]
    close(run("scorecam", targets=[2]).heatmaps[0], expected)


# ---- resizing the masks to the output -------------------------------------------------------------

def test_masks_at_the_input_size_are_area_averaged_onto_a_smaller_output():
    model = golden(post=nn.AvgPool2d(2))
    x = torch.randn(1, 2, 4, 4)
    m = (torch.rand(1, 4, 4) > 0.5).float()
    at_output = torch.nn.functional.avg_pool2d(m[:, None], 2)[:, 0]
    a = run(model=model, x=x, targets=[1], target_masks=m)
    b = run(model=model, x=x, targets=[1], target_masks=at_output)
    torch.testing.assert_close(a.heatmaps, b.heatmaps)
    torch.testing.assert_close(a.scores, b.scores)


def test_masks_at_the_input_size_grow_by_nearest_onto_a_larger_output():
    model = golden(post=nn.Upsample(scale_factor=2, mode="bilinear"))
    m = torch.tensor([[[1.0, 0.0], [0.0, 0.5]]])
    a = run(model=model, targets=[0], target_masks=m)
    b = run(model=model, targets=[0],
            target_masks=m.repeat_interleave(2, 1).repeat_interleave(2, 2))
    torch.testing.assert_close(a.heatmaps, b.heatmaps)
    torch.testing.assert_close(a.scores, b.scores)


# ---- slots ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["gradcam", "hirescam", "scorecam"])
def test_one_class_twice_with_two_masks(method):
    """(N, K) targets with (N, K, *S) masks: each slot explains its own region, also when the
    same class appears in two slots, and equals explaining that one region alone."""
    torch.manual_seed(3)
    model = tiny_unet()
    x = torch.randn(2, 1, 12, 12)
    masks = (torch.rand(2, 2, 12, 12) > 0.6)
    ids = torch.tensor([[1, 1], [2, 0]])
    # below the head (at "dec", Grad-CAM's weights are the head's row times mean(M): the
    # normalised map would not depend on the mask)
    out = ng.explain_batch(model, x, method, "mid", targets=ids, target_masks=masks)
    assert out.heatmaps.shape == (2, 2, 12, 12)
    for n in range(2):
        for k in range(2):
            alone = ng.explain_batch(model, x[n:n + 1], method, "mid", targets=[int(ids[n, k])],
                                     target_masks=masks[n:n + 1, k])
            torch.testing.assert_close(out.heatmaps[n, k], alone.heatmaps[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(out.scores[n, k], alone.scores[0], atol=1e-4, rtol=1e-5)
    assert not torch.allclose(out.heatmaps[0, 0], out.heatmaps[0, 1])


@pytest.mark.parametrize("method", ["gradcam", "scorecam"])
def test_batch_equals_each_image_alone_with_predicted_regions(method):
    model = tiny_unet()
    x = torch.randn(3, 1, 12, 12)
    whole = ng.explain_batch(model, x, method, "mid")  # each sample's largest region
    for i in range(3):
        alone = ng.explain_batch(model, x[i:i + 1], method, "mid")
        assert alone.class_ids[0] == whole.class_ids[i]
        torch.testing.assert_close(whole.heatmaps[i], alone.heatmaps[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(whole.scores[i], alone.scores[0], atol=1e-4, rtol=1e-5)
    assert float(whole.heatmaps.amax()) == 1.0


def test_slots_with_one_region_per_sample_and_empty_slots():
    model = tiny_unet()
    x = torch.randn(2, 1, 12, 12)
    m = torch.ones(2, 12, 12)
    out = ng.explain_batch(model, x, "gradcam", "dec", targets=[[0, 2], [-1, 1]], target_masks=m)
    assert out.valid.tolist() == [[True, True], [False, True]]
    assert torch.isnan(out.scores[1, 0]) and torch.count_nonzero(out.heatmaps[1, 0]) == 0
    with torch.no_grad():
        logits = model(x)
    close(out.scores[0], logits[0, [0, 2]].sum((1, 2)), atol=1e-4)


def test_scorecam_matches_a_plain_reference():
    """Score-CAM written plainly: one masked forward per channel, each scored with the fixed
    region of the unmasked prediction."""
    torch.manual_seed(5)
    model = tiny_unet()
    x = torch.randn(1, 1, 10, 10)
    acts = {}
    h = model.dec.register_forward_hook(lambda m, i, o: acts.setdefault("a", o.detach()))
    with torch.no_grad():
        region = model(x).argmax(1)[0] == 2
    h.remove()
    a = acts["a"][0]
    scores = []
    for k in range(a.shape[0]):
        up = a[k]
        up = (up - up.min()) / (up.max() - up.min() + 1e-8)
        with torch.no_grad():
            scores.append((model(x * up)[0, 2] * region).sum())
    w = torch.softmax(torch.stack(scores), 0)
    expected = to_heatmaps((w[:, None, None] * a).sum(0)[None], x.shape[2:])[0]
    got = ng.explain_batch(model, x, "scorecam", "dec", targets=[2], chunk_size=3)
    torch.testing.assert_close(got.heatmaps[0], expected, atol=1e-5, rtol=0)


# ---- all methods, 2D and 3D ------------------------------------------------------------------------

@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("method", SEG_METHODS)
def test_every_method_runs_on_a_segmentation_net(method, dims):
    model = tiny_unet(dims=dims)
    x = torch.randn(2, 1, *([8] * dims))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmptyTargetWarning)
        out = ng.explain_batch(model, x, method, "dec", targets=[[0, 1], [2, 1]])
    assert out.heatmaps.shape == (2, 2, *([8] * dims))
    assert torch.isfinite(out.heatmaps).all() and torch.isfinite(out.scores).all()
    assert float(out.heatmaps.amax()) == 1.0


def test_cam_is_refused_with_a_reason():
    with pytest.raises(ValueError, match=r"method 'cam' needs a classifier.*gradcam"):
        run("cam")


# ---- empty regions --------------------------------------------------------------------------------

@pytest.mark.parametrize("method", SEG_METHODS)
def test_empty_predicted_region_is_a_zero_map_with_a_warning(method):
    # class 1 predicted nowhere in samples 0 and 2 (a large bias for class 0 there)
    x = A[None].repeat(3, 1, 1, 1)
    x[[0, 2]] = 0.0  # logits0 = 0.2, logits1 = 0, logits2 = 0: class 0 everywhere
    with pytest.warns(EmptyTargetWarning, match=r"class 1 has no predicted pixels in "
                                                 r"sample\(s\) 0, 2, so its map is zero"):
        out = run(method, x=x, targets=[1, 1, 1])
    assert out.scores.tolist() == [0.0, 2.0, 0.0]
    assert torch.count_nonzero(out.heatmaps[[0, 2]]) == 0
    assert torch.isfinite(out.heatmaps).all()
    if method not in ("eigencam",):  # sample 1's region is not empty: its map is not zero
        assert float(out.heatmaps[1].amax()) == 1.0


def test_empty_target_mask_says_so():
    with pytest.warns(EmptyTargetWarning, match=r"class 2 .*zero weight in sample\(s\) 0"):
        out = run(targets=[2], target_masks=torch.zeros(1, 2, 2))
    assert out.scores.tolist() == [0.0] and torch.count_nonzero(out.heatmaps) == 0


def test_non_empty_regions_warn_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error", EmptyTargetWarning)
        run(targets=[2])


# ---- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("masks, targets, error, words", [
    (torch.ones(1, 3, 3), [0], ValueError, r"shape \(1, 3, 3\), expected \(1, 2, 2\)"),
    (torch.ones(2, 2, 2), [0], ValueError, r"shape \(2, 2, 2\), expected \(1, 2, 2\)"),
    (torch.ones(1, 2, 2, 2), [0], ValueError, r"need \(N, K\) targets"),
    (torch.ones(1, 3, 2, 2), [[0, 1]], ValueError, r"expected \(1, 2, 2\) or \(1, 2, 2, 2\)"),
    (-torch.ones(1, 2, 2), [0], ValueError, "negative weights"),
    (torch.full((1, 2, 2), float("nan")), [0], ValueError, "NaN"),
    (torch.full((1, 2, 2), float("inf")), [0], ValueError, "infinite"),
    (torch.full((1, 2, 2), 1e38), [0], ValueError, r"weights up to 1e\+38.*overflow.*scale"),
    (torch.full((1, 2, 2), 1e300, dtype=torch.float64), [0], ValueError, "infinite"),
    (torch.ones(1, 2, 2, dtype=torch.complex64), [0], TypeError, "booleans or non-negative"),
    ("everywhere", [0], TypeError, "target_masks must be a tensor or array"),
])
def test_bad_target_masks_say_what_to_give(masks, targets, error, words):
    model = golden()
    with pytest.raises(error, match=words):
        run(model=model, targets=targets, target_masks=masks)
    assert hooks_left(model) == 0


def test_multilabel_must_be_a_bool():
    with pytest.raises(TypeError, match="multilabel must be True, False or None"):
        run(multilabel="softmax")


def test_numpy_masks_are_accepted():
    m = np.array([[[1.0, 0.5], [0.0, 0.0]]])
    close(run(targets=[0], target_masks=m).scores, [1.8])


def test_large_weights_below_the_limit_keep_the_raw_weighted_sum():
    # the score stays sum(logits * W): the map of weights 1e30 is the map of weights 1
    m = np.array([[[1.0, 0.5], [0.0, 0.0]]])
    big, one = run(targets=[0], target_masks=m * 1e30), run(targets=[0], target_masks=m)
    torch.testing.assert_close(big.scores, one.scores * 1e30, rtol=1e-5, atol=0)
    close(big.heatmaps, one.heatmaps)


def test_target_masks_on_a_classifier_are_refused():
    with pytest.raises(ValueError, match=r"need a segmentation model.*shape \(2, 3\)"):
        ng.explain_batch(small_cnn(), torch.randn(2, 1, 16, 16), target_masks=torch.ones(2, 16, 16))


@pytest.mark.parametrize("targets", [[3], [-1], [[0, 5]]])
def test_class_index_out_of_range(targets):
    with pytest.raises(ValueError, match="out of range: this model has 3 classes"):
        run(targets=targets)


def test_callable_whose_slots_do_not_match_the_masks():
    with pytest.raises(ValueError, match="2 regions per sample but the targets have 3 slots"):
        run(targets=lambda p: torch.tensor([[0, 1, 2]]), target_masks=torch.ones(1, 2, 2, 2))


# ---- the model is left as found --------------------------------------------------------------------

def _state(model):
    return ([(n, m.training) for n, m in model.named_modules()],
            [(n, p.requires_grad) for n, p in model.named_parameters()])


@pytest.mark.parametrize("method", SEG_METHODS)
def test_model_left_exactly_as_found(method):
    model = tiny_unet().train()
    model.down.eval()
    for p in model.down.parameters():
        p.requires_grad_(False)
    before = _state(model)
    ng.explain_batch(model, torch.randn(2, 1, 8, 8), method, "dec",
                     target_masks=torch.ones(2, 8, 8))
    assert _state(model) == before
    assert all(p.grad is None for p in model.parameters()) and hooks_left(model) == 0


class ExplodesAfter(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x):
        self.conv(x)
        raise RuntimeError("boom")


@pytest.mark.parametrize("case", ["model", "mask", "callable"])
def test_model_left_as_found_when_something_raises(case):
    model = ExplodesAfter() if case == "model" else tiny_unet()
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    grad_mode = torch.is_grad_enabled()
    kw = {"mask": {"target_masks": torch.ones(1, 5, 5)},
          "callable": {"targets": lambda p: 1 / 0}}.get(case, {})
    layer = "conv" if case == "model" else "dec"
    with pytest.raises((RuntimeError, ValueError, ZeroDivisionError)):
        ng.explain_batch(model, torch.randn(1, 1, 8, 8), "gradcam", layer, **kw)
    assert hooks_left(model) == 0 and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert torch.is_grad_enabled() == grad_mode


# ---- labels and detection ---------------------------------------------------------------------------

def test_segmentation_labels():
    logits = torch.tensor([[[[3.0, -1.0]], [[1.0, 2.0]], [[0.0, -5.0]]]])  # (1, 3, 1, 2)
    assert segmentation_labels(logits).tolist() == [[[0, 1]]]
    # multi-label: 0 = nothing above sigmoid 0.5, else 1 + the most confident class
    ml = torch.tensor([[[[-1.0, 0.5, 2.0]], [[-2.0, 1.5, -1.0]]]])  # (1, 2, 1, 3)
    assert segmentation_labels(ml, multilabel=True).tolist() == [[[0, 2, 1]]]
    # one channel defaults to multi-label
    assert segmentation_labels(torch.tensor([[[[-1.0, 1.0]]]])).tolist() == [[[0, 1]]]
    assert segmentation_labels(logits).dtype == torch.int64
    with pytest.raises(ValueError, match=r"shape \(2, 3\)"):
        segmentation_labels(torch.zeros(2, 3))


def test_is_segmentation_output():
    x = torch.zeros(2, 1, 8, 8)
    assert is_segmentation_output(torch.zeros(2, 3, 4, 4), x)
    assert is_segmentation_output({"logits": torch.zeros(2, 3, 8, 8)}, x)
    assert not is_segmentation_output(torch.zeros(2, 3), x)
    assert not is_segmentation_output({"a": x, "b": x}, x)
    assert is_segmentation_output(torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 1, 8, 8, 8))


def test_torchvision_segmentation_models_dict_output_and_automatic_layer():
    """torchvision's segmentation networks return {"out": ..., "aux": ...} and upsample their
    class maps in the forward: the "out" entry is explained, and the automatic layer is the
    head's last feature map, not its low-resolution logits."""
    seg_models = pytest.importorskip("torchvision.models.segmentation")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    lraspp = seg_models.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                  num_classes=3).eval()
    assert ng.cam.find_target_layer(lraspp, x)[0] == "classifier.cbr"
    deeplab = seg_models.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                      num_classes=3, aux_loss=True).eval()
    out = ng.explain_batch(deeplab, x, "gradcam", target_layer="classifier.3", targets=1,
                           target_masks=torch.ones(2, 64, 64))
    with torch.no_grad():
        logits = deeplab(x)["out"]
    np.testing.assert_allclose(out.scores.numpy(), logits[:, 1].sum((1, 2)).numpy(), rtol=1e-4)
    assert out.heatmaps.shape == (2, 64, 64) and torch.isfinite(out.heatmaps).all()
