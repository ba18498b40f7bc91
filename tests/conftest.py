import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class FlatHead(nn.Module):
    """``features`` passes the input through (so the activations A are the input itself) and the
    head is a Linear layer over the flattened map, so the gradient of class c is V[c]: A and G are
    both chosen by the test."""

    def __init__(self, V: torch.Tensor):
        super().__init__()
        self.features = nn.Identity()
        self.head = nn.Linear(V[0].numel(), V.shape[0], bias=False)
        with torch.no_grad():
            self.head.weight.copy_(V.reshape(V.shape[0], -1))

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


class GapHead(nn.Module):
    """``features`` (identity) -> global average pooling -> Linear(W, b): the CAM architecture."""

    def __init__(self, W: torch.Tensor, b: torch.Tensor | None = None):
        super().__init__()
        self.features = nn.Identity()
        self.fc = nn.Linear(W.shape[1], W.shape[0], bias=b is not None)
        with torch.no_grad():
            self.fc.weight.copy_(W)
            if b is not None:
                self.fc.bias.copy_(b)

    def forward(self, x):
        return self.fc(self.features(x).flatten(2).mean(-1))


def small_cnn(in_ch=1, classes=3, dims=2, inplace=False, width=8):
    """conv-relu-conv-relu-GAP-Linear, 2D or 3D."""
    Conv = nn.Conv2d if dims == 2 else nn.Conv3d
    Pool = nn.AdaptiveAvgPool2d if dims == 2 else nn.AdaptiveAvgPool3d
    return nn.Sequential(
        Conv(in_ch, width, 3, padding=1),
        nn.ReLU(inplace=inplace),
        Conv(width, width, 3, padding=1, stride=2),
        nn.ReLU(inplace=inplace),
        Pool(1),
        nn.Flatten(),
        nn.Linear(width, classes),
    ).eval()


def hooks_left(module: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in module.modules()
    )


class _Sleepy(nn.Module):
    def __init__(self, delay: float, **kw):
        super().__init__()
        self.net = small_cnn(**kw)
        self.delay = delay

    def forward(self, x):
        import time

        time.sleep(self.delay)
        return self.net(x)


def sleepy_cnn(delay: float = 0.1, **kw):
    """small_cnn that sleeps ``delay`` seconds per forward pass: a slow model for the tests
    that interrupt runs (a factory for load_model's 'conftest:sleepy_cnn')."""
    torch.manual_seed(0)
    return _Sleepy(delay, **kw).eval()


# ---- napari tests --------------------------------------------------------------------------

@pytest.fixture
def our_plugin():
    """napari's test fixtures start from an empty npe2 registry: register ours (test modules
    that need it say ``pytestmark = pytest.mark.usefixtures("our_plugin")``)."""
    from npe2 import PluginManager

    pm = PluginManager.instance()
    if "napari-gradcam" not in pm._manifests:
        pm.discover(include_npe1=False)
    assert "napari-gradcam" in pm._manifests


@pytest.fixture
def errors(monkeypatch):
    """Messages the widget shows as napari error notifications."""
    from napari_gradcam._napari import widget as widget_mod

    seen = []
    monkeypatch.setattr(widget_mod, "show_error", seen.append)
    return seen


@pytest.fixture
def viewer(make_napari_viewer_proxy):
    # the widget gets the same public-only proxy that napari hands plugins, with attribute
    # writes from a non-main thread turned into errors
    return make_napari_viewer_proxy()
