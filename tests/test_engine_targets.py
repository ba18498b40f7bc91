"""Several targets per sample from one forward pass: (N, K) class indices, or a callable that
picks them from the logits of that same pass."""

import pytest
import torch
from conftest import hooks_left, small_cnn
from torch import nn

import napari_gradcam as ng
from napari_gradcam.cam import available_methods

ALL = available_methods()
LAYER = "3"  # small_cnn's last ReLU: global average pooling + Linear follow (CAM applies)


class Counting(nn.Module):
    """small_cnn that counts its forward passes."""

    def __init__(self, classes=4):
        super().__init__()
        self.net = small_cnn(classes=classes)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


def _separately(model, x, method, ids):
    """Slot by slot, one explain_batch call each: the reference."""
    outs = [ng.explain_batch(model, x, method, LAYER, targets=ids[:, k])
            for k in range(ids.shape[1])]
    return (torch.stack([o.heatmaps for o in outs], 1), torch.stack([o.class_ids for o in outs], 1),
            torch.stack([o.scores for o in outs], 1))


@pytest.mark.parametrize("method", ALL)
def test_slots_equal_separate_calls(method):
    model = small_cnn(classes=4)
    x = torch.randn(3, 1, 20, 20)
    ids = torch.tensor([[0, 2, 3], [1, 1, 0], [3, 2, 1]])
    out = ng.explain_batch(model, x, method, LAYER, targets=ids)
    ref = _separately(model, x, method, ids)
    assert out.heatmaps.shape == (3, 3, 20, 20) and out.class_ids.shape == (3, 3)
    torch.testing.assert_close(out.heatmaps, ref[0], rtol=1e-4, atol=1e-5)
    assert torch.equal(out.class_ids, ids)
    torch.testing.assert_close(out.scores, ref[2])
    assert bool(out.valid.all())


@pytest.mark.parametrize("method", ["gradcam", "scorecam", "hirescam"])
def test_batch_equals_each_image_alone(method):
    model = small_cnn(classes=4)
    x = torch.randn(3, 1, 20, 20)
    ids = torch.tensor([[0, 2], [1, 3], [3, 0]])
    out = ng.explain_batch(model, x, method, LAYER, targets=ids)
    for i in range(3):
        one = ng.explain_batch(model, x[i:i + 1], method, LAYER, targets=ids[i:i + 1])
        torch.testing.assert_close(out.heatmaps[i:i + 1], one.heatmaps, rtol=1e-4, atol=1e-5)


def test_callable_picks_classes_per_image_from_the_same_logits():
    model = small_cnn(classes=4)
    x = torch.randn(3, 1, 20, 20)
    logits = model(x).detach()
    seen = []

    def top_and_another(lg):  # the top class, and one that differs from image to image
        seen.append(lg)
        top = lg.argmax(1)
        return torch.stack([top, (top + 1 + torch.arange(lg.shape[0])) % lg.shape[1]], 1)

    out = ng.explain_batch(model, x, "gradcam", LAYER, targets=top_and_another)
    top = logits.argmax(1)
    expected = torch.stack([top, (top + 1 + torch.arange(3)) % 4], 1)
    assert torch.equal(out.class_ids, expected)
    assert len({tuple(r) for r in expected.tolist()}) > 1  # images differ
    torch.testing.assert_close(seen[0], logits)
    torch.testing.assert_close(out.heatmaps, _separately(model, x, "gradcam", expected)[0],
                               rtol=1e-4, atol=1e-5)
    # a callable returning one class per image keeps the 1-D shapes
    one = ng.explain_batch(model, x, "gradcam", LAYER, targets=lambda lg: lg.argmin(1))
    assert one.heatmaps.shape == (3, 20, 20) and torch.equal(one.class_ids, logits.argmin(1))


@pytest.mark.parametrize("method", ["gradcam", "scorecam", "eigencam"])
def test_empty_slots_are_zero_maps_with_nan_scores(method):
    model = small_cnn(classes=4)
    x = torch.randn(2, 1, 20, 20)
    ids = torch.tensor([[1, -1], [-1, -1]])  # slot 1 empty everywhere
    out = ng.explain_batch(model, x, method, LAYER, targets=ids)
    assert out.valid.tolist() == [[True, False], [False, False]]
    assert torch.count_nonzero(out.heatmaps[~out.valid]) == 0
    assert torch.isnan(out.scores[~out.valid]).all() and torch.isfinite(out.scores[0, 0])
    ref = ng.explain_batch(model, x[:1], method, LAYER, targets=[1])
    torch.testing.assert_close(out.heatmaps[0, 0], ref.heatmaps[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ALL)
def test_one_forward_for_all_slots(method):
    model = Counting(classes=4)
    x = torch.randn(2, 1, 20, 20)
    ng.explain_batch(model, x, method, "net.3", targets=torch.tensor([[0, 1, 2, 3]] * 2))
    several = model.calls
    model.calls = 0
    ng.explain_batch(model, x, method, "net.3", targets=0)
    # Score-CAM's masked forwards score every slot at once: the same count as for one target
    assert several == model.calls
    if method != "scorecam":
        assert several == 1


@pytest.mark.parametrize("method", ["gradcam", "scorecam"])
def test_model_left_as_found_with_slots(method):
    model = small_cnn(classes=4).train()
    flags = [p.requires_grad for p in model.parameters()]
    ng.explain_batch(model, torch.randn(2, 1, 20, 20), method, LAYER,
                     targets=lambda lg: lg.topk(3, dim=1).indices)
    assert hooks_left(model) == 0 and model.training
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_callable_that_raises_leaves_the_model_as_found():
    model = small_cnn(classes=4).train()
    grad_mode = torch.is_grad_enabled()

    def broken(_logits):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        ng.explain_batch(model, torch.randn(2, 1, 20, 20), "gradcam", LAYER, targets=broken)
    assert hooks_left(model) == 0 and model.training
    assert all(p.grad is None for p in model.parameters())
    assert torch.is_grad_enabled() == grad_mode


@pytest.mark.parametrize("targets, error, words", [
    (torch.tensor([[0, 4]] * 2), ValueError, "out of range: this model has 4 classes"),
    (torch.tensor([[0, -2]] * 2), ValueError, "-1 marks an empty slot"),
    (torch.zeros(3, 2, dtype=torch.long), ValueError, "(2, K) indices"),
    (torch.zeros(2, 2, 2, dtype=torch.long), ValueError, "(2, K) indices"),
    (lambda lg: lg > 0, TypeError, "integer class indices"),
])
def test_bad_slot_targets_say_what_to_give(targets, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        ng.explain_batch(small_cnn(classes=4), torch.randn(2, 1, 20, 20), targets=targets)
