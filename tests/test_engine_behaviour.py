"""The engine's contract: identities, batch independence, model state, errors, output forms."""

import pytest
import torch
import torchvision
from conftest import GapHead, hooks_left, small_cnn
from torch import nn

import napari_gradcam as ng
from napari_gradcam.cam import find_target_layer, to_heatmaps

GRADIENT_METHODS = ["gradcam", "gradcam++", "hirescam", "xgradcam", "layercam"]
ALL = ng.available_methods()


def test_method_list():
    assert set(ALL) == {"cam", "gradcam", "gradcam++", "hirescam", "xgradcam", "layercam",
                        "scorecam", "eigencam"}


@pytest.mark.parametrize("dims", [2, 3])
def test_gap_linear_identity(dims):
    """On a GAP + Linear head, CAM, Grad-CAM, HiResCAM and XGrad-CAM give the same map."""
    model = small_cnn(in_ch=2, classes=4, dims=dims)
    shape = (3, 2, 24, 20) if dims == 2 else (2, 2, 10, 12, 14)
    x = torch.randn(shape)
    target = "3"  # the ReLU after the last conv: the map that the head averages
    maps = {m: ng.explain_batch(model, x, m, target_layer=target).heatmaps
            for m in ["cam", "gradcam", "hirescam", "xgradcam"]}
    assert maps["cam"].shape == (shape[0], *shape[2:])
    assert maps["cam"].amax() == 1.0
    for m in ["gradcam", "hirescam", "xgradcam"]:
        torch.testing.assert_close(maps[m], maps["cam"], atol=2e-5, rtol=0)


@pytest.mark.parametrize("method", [m for m in ALL if m != "scorecam"])
def test_batch_equals_each_image_alone_resnet(method):
    model = torchvision.models.resnet18(num_classes=5).eval()
    x = torch.randn(4, 3, 96, 96)
    targets = torch.tensor([0, 3, 1, 4])
    whole = ng.explain_batch(model, x, method, targets=targets)
    for i in range(4):
        alone = ng.explain_batch(model, x[i:i + 1], method, targets=targets[i:i + 1])
        torch.testing.assert_close(whole.heatmaps[i], alone.heatmaps[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(whole.scores[i], alone.scores[0], atol=1e-4, rtol=1e-4)
    # predicted classes too
    pred = ng.explain_batch(model, x, method)
    with torch.inference_mode():
        torch.testing.assert_close(pred.class_ids, model(x).argmax(1))


def test_batch_equals_each_image_alone_scorecam():
    model = small_cnn(in_ch=1, classes=3)
    x = torch.randn(3, 1, 32, 32)
    whole = ng.explain_batch(model, x, "scorecam", targets=[2, 0, 1])
    for i, t in enumerate([2, 0, 1]):
        alone = ng.explain_batch(model, x[i:i + 1], "scorecam", targets=[t])
        torch.testing.assert_close(whole.heatmaps[i], alone.heatmaps[0], atol=1e-5, rtol=0)


def _scorecam_reference(model, x, layer, target):
    """Score-CAM written plainly: one masked forward per channel, no shortcuts."""
    acts = {}
    h = layer.register_forward_hook(lambda m, i, o: acts.setdefault("a", o.detach().clone()))
    with torch.no_grad():
        model(x)
    h.remove()
    a = acts["a"][0]
    scores = []
    for k in range(a.shape[0]):
        up = torch.nn.functional.interpolate(a[k][None, None], size=x.shape[2:], mode="bilinear")
        up = (up - up.min()) / (up.max() - up.min() + 1e-8)
        with torch.no_grad():
            scores.append(model(x * up)[0, target])
    w = torch.softmax(torch.stack(scores), 0)
    return to_heatmaps((w[:, None, None] * a).sum(0)[None], x.shape[2:])[0]


@pytest.mark.parametrize("chunk_size", [None, 1, 5])
def test_scorecam_matches_plain_reference_with_constant_channels(chunk_size):
    model = small_cnn(in_ch=1, classes=3, width=8)
    with torch.no_grad():  # channels 0-2 of the last conv: constant (dead) after the ReLU
        model[2].weight[:3] = 0
        model[2].bias[:3] = torch.tensor([-1.0, 0.0, 0.5])
    x = torch.randn(1, 1, 24, 24)
    got = ng.explain_batch(model, x, "scorecam", target_layer="3", targets=[1],
                           chunk_size=chunk_size).heatmaps[0]
    ref = _scorecam_reference(model, x, model[3], 1)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_inplace_relu_after_target_layer():
    x = torch.randn(2, 1, 20, 20)
    plain = small_cnn(inplace=False)
    inplace = small_cnn(inplace=True)
    inplace.load_state_dict(plain.state_dict())
    for method in ALL:
        if method == "cam":
            continue  # layer "0" is not followed by GAP + Linear
        a = ng.explain_batch(plain, x, method, target_layer="0").heatmaps
        b = ng.explain_batch(inplace, x, method, target_layer="0").heatmaps
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        # the activations the engine saw are the conv's own output, not rectified by the next op
        assert torch.isfinite(b).all()


@pytest.mark.parametrize("method", ALL)
def test_3d_model(method):
    model = small_cnn(in_ch=1, classes=2, dims=3)
    x = torch.randn(2, 1, 8, 12, 10)
    out = ng.explain_batch(model, x, method)
    assert out.heatmaps.shape == (2, 8, 12, 10)
    assert out.heatmaps.dtype == torch.float32
    assert torch.isfinite(out.heatmaps).all()
    assert out.heatmaps.min() >= 0 and out.heatmaps.max() <= 1


def test_3d_gradcam_plus_plus_matches_formula():
    """pytorch-grad-cam's Grad-CAM++ crashes on 5-D activations; ours follows the formula."""
    model = small_cnn(in_ch=1, classes=2, dims=3)
    x = torch.randn(1, 1, 6, 8, 8)
    acts = {}
    h = model[3].register_forward_hook(lambda m, i, o: acts.setdefault("a", o))
    xx = x.clone()
    out = model(xx)
    h.remove()
    A = acts["a"]
    (G,) = torch.autograd.grad(out[0, 1], A)
    A, G = A.detach(), G.detach()
    g2 = G ** 2
    s = A.sum(dim=(2, 3, 4), keepdim=True)
    alpha = torch.where(G != 0, g2 / (2 * g2 + s * g2 * G + 1e-6), 0)
    w = (torch.relu(G) * alpha).sum(dim=(2, 3, 4), keepdim=True)
    ref = to_heatmaps((w * A).sum(1), x.shape[2:])
    got = ng.explain_batch(model, x, "gradcam++", target_layer="3", targets=[1]).heatmaps
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_upsampled_map_lands_where_the_activation_is():
    # one hot cell in the top-right of a 4 x 4 map, upsampled to 32 x 32
    a = torch.zeros(1, 1, 4, 4)
    a[0, 0, 0, 3] = 1.0
    model = GapHead(torch.tensor([[1.0]]))
    h = ng.explain_batch(model, a, "cam", target_layer="features").heatmaps
    assert h.shape == (1, 4, 4)
    up = to_heatmaps(a[:, 0], (32, 32))
    r, c = divmod(int(up[0].argmax()), 32)
    assert r < 8 and c >= 24
    assert up.min() == 0 and up.max() == 1


@pytest.mark.parametrize("method", ALL)
def test_flat_maps_are_zeros_not_nan(method):
    model = small_cnn(in_ch=1, classes=2)
    with torch.no_grad():  # every activation at the target layer is 0 after the ReLU
        model[2].weight.zero_()
        model[2].bias.fill_(-1.0)
    out = ng.explain_batch(model, torch.randn(2, 1, 16, 16), method, target_layer="3")
    assert torch.isfinite(out.heatmaps).all()
    assert torch.count_nonzero(out.heatmaps) == 0


def _snapshot(model):
    return (
        [(n, m.training) for n, m in model.named_modules()],
        [(n, p.requires_grad) for n, p in model.named_parameters()],
        {k: v.clone() for k, v in model.state_dict().items()},
    )


@pytest.mark.parametrize("method", ALL)
def test_model_left_exactly_as_found(method):
    model = torchvision.models.resnet18(num_classes=3)
    model.train()
    model.layer1.eval()  # mixed modes must come back mixed
    for p in model.conv1.parameters():
        p.requires_grad_(False)
    before = _snapshot(model)
    hooks_before = hooks_left(model)
    ng.explain_batch(model, torch.randn(2, 3, 64, 64), method)
    after = _snapshot(model)
    assert after[0] == before[0]
    assert after[1] == before[1]
    for k, v in before[2].items():  # BatchNorm running stats untouched (eval during the call)
        torch.testing.assert_close(after[2][k], v, rtol=0, atol=0)
    assert all(p.grad is None for p in model.parameters())
    assert hooks_left(model) == hooks_before


class Explodes(nn.Module):
    def __init__(self, where):
        super().__init__()
        self.where = where
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if self.where == "before":
            raise RuntimeError("boom")
        y = torch.relu(self.conv(x))
        if self.where == "after":
            raise RuntimeError("boom")
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("where", ["before", "after"])
@pytest.mark.parametrize("method", ["gradcam", "scorecam"])
def test_model_that_raises_leaves_no_hooks(where, method):
    model = Explodes(where).train()
    flags = [p.requires_grad for p in model.parameters()]
    grad_mode = torch.is_grad_enabled()
    with pytest.raises(RuntimeError, match="boom"):
        ng.explain_batch(model, torch.randn(1, 1, 8, 8), method, target_layer="conv")
    assert hooks_left(model) == 0
    assert model.training and model.conv.training
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert torch.is_grad_enabled() == grad_mode


def test_no_graph_below_the_target_layer():
    model = small_cnn()
    seen = {}

    def spy(key):
        def hook(_module, _inputs):
            seen[key] = torch.is_grad_enabled()
        return hook

    h1 = model[0].register_forward_pre_hook(spy("below"))
    h2 = model[6].register_forward_pre_hook(spy("above"))
    try:
        ng.explain_batch(model, torch.randn(2, 1, 16, 16), "gradcam", target_layer="2")
    finally:
        h1.remove()
        h2.remove()
    assert seen == {"below": False, "above": True}
    assert torch.is_grad_enabled()


def test_works_inside_inference_mode_and_no_grad():
    model = small_cnn()
    x = torch.randn(2, 1, 16, 16)
    ref = ng.explain_batch(model, x, "gradcam").heatmaps
    with torch.inference_mode():
        xi = x.clone()
        a = ng.explain_batch(model, xi, "gradcam").heatmaps
    with torch.no_grad():
        b = ng.explain_batch(model, x, "gradcam").heatmaps
        assert not torch.is_grad_enabled()
    torch.testing.assert_close(a, ref)
    torch.testing.assert_close(b, ref)


def test_autocast_bf16_cpu():
    model = torchvision.models.resnet18(num_classes=4).eval()
    x = torch.randn(2, 3, 96, 96)
    full = ng.explain_batch(model, x, "gradcam", targets=[1, 2])
    half = ng.explain_batch(model, x, "gradcam", targets=[1, 2], amp="bf16")
    assert half.heatmaps.dtype == torch.float32 and half.scores.dtype == torch.float32
    for a, b in zip(full.heatmaps, half.heatmaps):
        assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.95


def test_automatic_target_layer():
    x = torch.randn(1, 3, 64, 64)
    assert find_target_layer(torchvision.models.resnet18(), x)[0] == "layer4"
    assert find_target_layer(torchvision.models.densenet121(), x)[0] == "features"
    assert find_target_layer(small_cnn(dims=3), torch.randn(1, 1, 8, 8, 8))[0] == "3"


def test_target_layer_as_module_and_name_agree():
    model = small_cnn()
    x = torch.randn(2, 1, 16, 16)
    a = ng.explain_batch(model, x, "gradcam", target_layer=model[3]).heatmaps
    b = ng.explain_batch(model, x, "gradcam", target_layer="3").heatmaps
    torch.testing.assert_close(a, b)


# ---- output forms -------------------------------------------------------------------------------

class Wrapped(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.net = small_cnn(classes=3)
        self.kind = kind

    def forward(self, x):
        y = self.net(x)
        if self.kind == "tuple":
            return (y, torch.zeros(1))
        if self.kind == "list":
            return ["aux", y]
        if self.kind == "dict":
            return {"features": torch.zeros(1), "logits": y}
        if self.kind == "dict1":
            return {"out": y}
        if self.kind == "attr":
            return type("Out", (), {"logits": y})()
        if self.kind == "dict2":
            return {"a": y, "b": y}
        if self.kind == "map":  # rank 3: neither class scores nor a segmentation map
            return y[:, :, None].expand(-1, -1, 4)
        return y


@pytest.mark.parametrize("kind", ["tuple", "list", "dict", "dict1", "attr"])
def test_structured_outputs(kind):
    x = torch.randn(2, 1, 16, 16)
    plain, model = Wrapped("plain"), Wrapped(kind)
    model.load_state_dict(plain.state_dict())
    ref = ng.explain_batch(plain, x, "gradcam", target_layer="net.3")
    got = ng.explain_batch(model, x, "gradcam", target_layer="net.3")
    torch.testing.assert_close(got.heatmaps, ref.heatmaps)
    torch.testing.assert_close(got.class_ids, ref.class_ids)


def test_single_logit_output():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 1), nn.Flatten(0))
    out = ng.explain_batch(model, torch.randn(3, 1, 12, 12), "gradcam", target_layer="1")
    assert out.class_ids.tolist() == [0, 0, 0]


@pytest.mark.parametrize("kind", ["dict2", "map"])
def test_unusable_outputs_say_what_to_return(kind):
    with pytest.raises(ValueError, match="logits|classifier output"):
        ng.explain_batch(Wrapped(kind), torch.randn(2, 1, 16, 16), "gradcam", target_layer="net.3")


# ---- errors a user can cause ----------------------------------------------------------------------

def test_unknown_layer_name_suggests_close_names():
    model = torchvision.models.resnet18()
    with pytest.raises(ValueError, match="'layer4'"):
        ng.explain_batch(model, torch.randn(1, 3, 64, 64), target_layer="layer5")


def test_foreign_module_as_target_layer():
    with pytest.raises(ValueError, match="not a submodule"):
        ng.explain_batch(small_cnn(), torch.randn(1, 1, 16, 16), target_layer=nn.Conv2d(1, 1, 1))


def test_non_spatial_target_layer():
    with pytest.raises(ValueError, match="feature map"):
        ng.explain_batch(small_cnn(), torch.randn(1, 1, 16, 16), target_layer="6")


@pytest.mark.parametrize("targets", [[0, 3], [-1, 0], 7])
def test_out_of_range_targets(targets):
    with pytest.raises(ValueError, match="out of range: this model has 3 classes"):
        ng.explain_batch(small_cnn(), torch.randn(2, 1, 16, 16), targets=targets)


def test_targets_shape_and_type():
    with pytest.raises(ValueError, match="2 indices"):
        ng.explain_batch(small_cnn(), torch.randn(2, 1, 16, 16), targets=[0, 1, 2])
    with pytest.raises(TypeError, match="integer"):
        ng.explain_batch(small_cnn(), torch.randn(2, 1, 16, 16), targets=[0.5, 1.0])


def test_one_target_for_the_whole_batch():
    out = ng.explain_batch(small_cnn(), torch.randn(3, 1, 16, 16), targets=2)
    assert out.class_ids.tolist() == [2, 2, 2]


def test_cam_needs_a_gap_linear_head():
    with pytest.raises(ValueError, match="use method='gradcam'"):  # no Linear with 8 inputs here
        ng.explain_batch(small_cnn(width=8), torch.randn(1, 1, 16, 16), "cam", target_layer="1")
    model = small_cnn()
    model.insert(6, nn.Linear(8, 8))  # a Linear with the right width, but not the whole head
    with pytest.raises(ValueError, match="not Linear"):
        ng.explain_batch(model, torch.randn(1, 1, 16, 16), "cam", target_layer="3")


def test_bad_batches():
    model = small_cnn()
    with pytest.raises(TypeError, match="explain"):
        ng.explain_batch(model, torch.randn(1, 1, 16, 16).numpy())
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        ng.explain_batch(model, torch.randn(1, 16, 16))
    with pytest.raises(TypeError, match="float"):
        ng.explain_batch(model, torch.zeros(1, 1, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="unknown CAM method 'gradkam'"):
        ng.explain_batch(model, torch.randn(1, 1, 16, 16), "gradkam")
    with pytest.raises(ValueError, match="move one"):
        ng.explain_batch(model, torch.randn(1, 1, 16, 16, device="meta"))
    with pytest.raises(ValueError, match="amp"):
        ng.explain_batch(model, torch.randn(1, 1, 16, 16), amp="fp8")


def test_method_names_are_forgiving():
    x = torch.randn(1, 1, 16, 16)
    model = small_cnn()
    ref = ng.explain_batch(model, x, "gradcam++").heatmaps
    for name in ["Grad-CAM++", "gradcam_pp", "GradCAMPlusPlus"]:
        torch.testing.assert_close(ng.explain_batch(model, x, name).heatmaps, ref)


def test_layer_that_runs_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(self.conv(self.conv(x)).mean((2, 3)))

    with pytest.raises(ValueError, match="runs 2 times"):
        ng.explain_batch(Twice(), torch.randn(1, 2, 8, 8), target_layer="conv")


def test_torchscript_is_refused_clearly():
    import warnings

    with warnings.catch_warnings():  # newer torch deprecates torch.jit.script itself
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(small_cnn())
    with pytest.raises(TypeError, match="TorchScript"):
        ng.explain_batch(scripted, torch.randn(1, 1, 16, 16))


def test_no_reference_cycles_keep_the_model_alive():
    import gc
    import weakref

    model = small_cnn()
    ref = weakref.ref(model)
    for method in ALL:
        ng.explain_batch(model, torch.randn(1, 1, 16, 16), method, target_layer="3")
    del model
    gc.collect()
    assert ref() is None


def test_top_eigenpair_by_squaring_matches_eigh():
    """The CUDA path for matrices above 32 x 32 (repeated squaring) against LAPACK's eigh."""
    from napari_gradcam.cam.methods import _top_eigenpair

    x = torch.randn(6, 49, 300).relu()
    x = x - x.mean(1, keepdim=True)
    gram = x @ x.transpose(1, 2)
    lam, v = _top_eigenpair(gram)
    lam2, v2 = _top_eigenpair(gram, squarings=12)
    torch.testing.assert_close(lam2, lam, rtol=1e-9, atol=0)
    assert (v * v2).sum(1).abs().min() > 1 - 1e-9
    zeros = _top_eigenpair(torch.zeros(2, 40, 40), squarings=12)
    assert torch.count_nonzero(zeros[0]) == 0 and torch.isfinite(zeros[1]).all()
