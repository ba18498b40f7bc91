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


# ---- pyramidal slides (small: 2048 x 1536 RGB, tiles of 256) -------------------------------

def slide_image(h: int = 1536, w: int = 2048):
    """scikit-image's bundled immunohistochemistry image (512 x 512 RGB) tiled to (h, w), every
    7th row darkened so no two tiles are the same."""
    import numpy as np
    from skimage import data

    ihc = data.immunohistochemistry()
    big = np.tile(ihc, (-(-h // 512), -(-w // 512), 1))[:h, :w].copy()
    big[::7] = big[::7] // 2 + 10
    return big


def slide_levels(image, n: int = 3):
    """Level 0 and n - 1 levels of 2 x 2 means."""
    out = [image]
    for _ in range(1, n):
        a = out[-1]
        h, w = a.shape[0] // 2, a.shape[1] // 2
        out.append(a[:2 * h, :2 * w].reshape(h, 2, w, 2, -1).mean((1, 3)).astype(a.dtype))
    return out


def write_pyramid_tiff(path, levels, *, compression="zlib", mpp=0.25):
    """A pyramidal OME-TIFF: level 0 with the others in its SubIFDs."""
    import tifffile

    opts = {"tile": (256, 256), "compression": compression, "photometric": "rgb"}
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(levels[0], subifds=len(levels) - 1,
                 metadata={"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp}, **opts)
        for lv in levels[1:]:
            tw.write(lv, subfiletype=1, **opts)
    return path


def write_svs(path, levels, *, compression="zlib", mpp=0.252):
    """An Aperio-like SVS: baseline, thumbnail, then the lower levels, each page described as
    the Aperio Image Library does (what tifffile and openslide recognise)."""
    import tifffile

    h, w = levels[0].shape[:2]
    head = "Aperio Image Library v12.0.0\n"
    opts = {"tile": (256, 256), "compression": compression, "photometric": "rgb",
            "metadata": None}
    with tifffile.TiffWriter(path) as tw:
        tw.write(levels[0], description=f"{head}{w}x{h} [0,0 {w}x{h}] (256x256) "
                 f"|AppMag = 40|MPP = {mpp}", **opts)
        tw.write(levels[-1], description=f"{head}thumbnail", photometric="rgb", metadata=None)
        for lv in levels[1:]:
            tw.write(lv, description=f"{head}level", **opts)
    return path


@pytest.fixture(scope="session")
def slide_pixels():
    return slide_levels(slide_image())


@pytest.fixture(scope="session")
def pyramid_tiff(tmp_path_factory, slide_pixels):
    """A 3-level pyramidal OME-TIFF (zlib tiles, 0.25 µm per pixel); don't modify it."""
    return write_pyramid_tiff(tmp_path_factory.mktemp("slides") / "slide.ome.tif", slide_pixels)


@pytest.fixture(scope="session")
def svs_file(tmp_path_factory, slide_pixels):
    """A 3-level Aperio SVS (zlib tiles, MPP 0.252); don't modify it."""
    return write_svs(tmp_path_factory.mktemp("slides") / "slide.svs", slide_pixels)


@pytest.fixture(scope="session")
def ome_zarr_slide(tmp_path_factory, slide_pixels):
    """The slide as an NGFF 0.4 OME-Zarr (zarr format 2, axes c y x as NGFF orders them, 0.5 µm
    per pixel) written with ome-zarr's own writer; don't modify it."""
    pytest.importorskip("ome_zarr")
    import warnings

    import zarr

    with warnings.catch_warnings():  # importing ome-zarr's writer warns of its own Scaler
        warnings.simplefilter("ignore", DeprecationWarning)
        from ome_zarr.writer import write_multiscale

    path = tmp_path_factory.mktemp("slides") / "slide.ome.zarr"
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    transforms = [[{"type": "scale", "scale": [1.0, 0.5 * 2 ** k, 0.5 * 2 ** k]}]
                  for k in range(len(slide_pixels))]
    with warnings.catch_warnings():  # newer ome-zarr prefers its `scale` argument
        warnings.simplefilter("ignore", DeprecationWarning)
        write_multiscale([lv.transpose(2, 0, 1) for lv in slide_pixels], group, fmt=_ngff04(),
                         axes=[{"name": "c", "type": "channel"},
                               {"name": "y", "type": "space", "unit": "micrometer"},
                               {"name": "x", "type": "space", "unit": "micrometer"}],
                         coordinate_transformations=transforms,
                         storage_options={"chunks": (3, 256, 256)})
    return path


def _ngff04():
    from ome_zarr.format import FormatV04

    return FormatV04()
