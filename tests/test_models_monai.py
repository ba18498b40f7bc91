"""MONAI networks by name: ``load_model("monai:DenseNet121", weights=..., arguments={...})`` and
the same through a sidecar, 2D and 3D, with random weights saved at test time; the automatic
target layer of MONAI's classifiers; arguments and names that would fetch files are refused."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import napari_gradcam as ng
from napari_gradcam.cam import resolve_target_layer
from napari_gradcam.models import _optional, build_architecture, loader

monai = pytest.importorskip("monai")
nets = pytest.importorskip("monai.networks.nets")

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning",
                                        "ignore::DeprecationWarning")

D121 = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2}
# the DenseNet family's layout (features.denseblockN, class_layers) in a few kilobytes
SMALL_DENSENET = {"init_features": 8, "growth_rate": 8, "block_config": [1, 1, 1, 1]}
SMALL_RESNET = {"block": "basic", "layers": [1, 1, 1, 1], "block_inplanes": [8, 16, 32, 64]}


def save(model: nn.Module, path):
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if str(path).endswith(".safetensors"):
        save_file(state, str(path))
    else:
        torch.save(state, str(path))
    return path


def same_outputs(a: nn.Module, b: nn.Module, shape) -> bool:
    x = torch.rand(shape)
    with torch.no_grad():
        return torch.allclose(a.eval()(x), b.eval()(x), atol=1e-5)


@pytest.fixture(scope="module")
def densenet121_3d(tmp_path_factory):
    """MONAI DenseNet121, 3D, random weights, saved once for the module (45 MB, slow to build)."""
    torch.manual_seed(0)
    model = nets.DenseNet121(**D121).eval()
    path = save(model, tmp_path_factory.mktemp("d121") / "d121.safetensors")
    return model, path


def test_densenet121_3d_random_weights_through_explain(densenet121_3d):
    model, path = densenet121_3d
    spec = ng.load_model("monai:DenseNet121", weights=path, arguments=D121)
    assert spec.class_names == ["class 0", "class 1"] and spec.in_channels == 1
    assert isinstance(spec.module.features.conv0, nn.Conv3d)
    assert spec.extra["architecture"] == "monai:DenseNet121"
    assert same_outputs(spec.module, model, (1, 1, 32, 32, 32))

    volume = np.random.default_rng(0).random((32, 32, 32), dtype=np.float32)
    exp = ng.explain(volume, spec, device="cpu")
    heat = exp.heatmaps
    assert heat.shape == (32, 32, 32) and heat.dtype == np.float32
    assert np.isfinite(heat).all() and heat.min() >= 0 and heat.max() <= 1
    assert heat.std() > 0.05 and 0 < (heat > 0.5).mean() < 1  # a map, not a constant
    with torch.no_grad():
        logits = model(torch.from_numpy(volume)[None, None])
    assert int(exp.class_ids) == int(logits.argmax())
    assert float(exp.scores) == pytest.approx(float(logits.max()), abs=1e-4)
    # 32^3 leaves the last dense block 1 voxel wide: the last layer with a map is explained
    assert exp.target_layer == "features.transition3.conv"


def test_densenet121_shapes_come_from_the_weights_through_a_sidecar(densenet121_3d, tmp_path):
    _model, path = densenet121_3d
    weights = tmp_path / "scan.safetensors"
    os.symlink(path, weights)
    (tmp_path / "scan.safetensors.json").write_text(json.dumps(
        {"architecture": "monai:DenseNet121", "class_names": ["healthy", "lesion"]}))
    spec = ng.load_model(weights)  # spatial_dims, in_channels, out_channels from the weights
    assert spec.class_names == ["healthy", "lesion"] and spec.name == "scan"
    assert isinstance(spec.module.features.conv0, nn.Conv3d)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("dims", [2, 3])
def test_state_dicts_load_in_2d_and_3d_by_keyword_and_sidecar(tmp_path, suffix, dims):
    model = nets.DenseNet(spatial_dims=dims, in_channels=2, out_channels=3, **SMALL_DENSENET)
    path = save(model, tmp_path / f"net{suffix}")
    shape = (1, 2, *[32] * dims)
    spec = ng.load_model("monai:DenseNet", weights=path, arguments=SMALL_DENSENET)
    assert spec.in_channels == 2 and len(spec.class_names) == 3
    assert same_outputs(spec.module, model, shape)
    (tmp_path / f"net{suffix}.json").write_text(json.dumps(
        {"architecture": "monai:DenseNet", "arguments": SMALL_DENSENET,
         "class_names": ["a", "b", "c"]}))
    spec = ng.load_model(path)
    assert spec.class_names == ["a", "b", "c"] and same_outputs(spec.module, model, shape)
    conv = nn.Conv3d if dims == 3 else nn.Conv2d
    assert isinstance(spec.module.features.conv0, conv)
    # the description opened itself; a keyword's arguments go over its own
    (tmp_path / f"net{suffix}.json").unlink()
    (tmp_path / "model.json").write_text(json.dumps(
        {"architecture": "monai:DenseNet", "weights": f"net{suffix}",
         "arguments": dict(SMALL_DENSENET, out_channels=4, spatial_dims=dims)}))
    with pytest.raises(ValueError, match="don't fit 'monai:DenseNet'.*wrong shapes"):
        ng.load_model(tmp_path / "model.json")
    spec = ng.load_model(tmp_path / "model.json", arguments={"out_channels": 3})
    assert len(spec.class_names) == 3 and same_outputs(spec.module, model, shape)


def test_resnet_names_its_channels_differently_and_depth_functions_load(tmp_path):
    model = nets.resnet10(spatial_dims=3, n_input_channels=1, num_classes=4)
    path = save(model, tmp_path / "r10.safetensors")
    spec = ng.load_model("monai:resnet10", weights=path)
    assert len(spec.class_names) == 4 and isinstance(spec.module.conv1, nn.Conv3d)
    assert same_outputs(spec.module, model, (1, 1, 32, 32, 32))
    spec = ng.load_model("monai:ResNet", weights=path,
                         arguments={"block": "basic", "layers": [1, 1, 1, 1],
                                    "block_inplanes": [64, 128, 256, 512]})
    assert same_outputs(spec.module, model, (1, 1, 32, 32, 32))


NETWORKS = {
    "DenseNet": (lambda d: nets.DenseNet(spatial_dims=d, in_channels=1, out_channels=2,
                                         **SMALL_DENSENET), "class_layers.relu"),
    "ResNet": (lambda d: nets.ResNet(spatial_dims=d, n_input_channels=1, num_classes=2,
                                     **SMALL_RESNET), "layer4"),
    # one _swish module runs after the stem and after the head: the head's _bn1 is chosen
    "EfficientNetBN": (lambda d: nets.EfficientNetBN("efficientnet-b0", pretrained=False,
                                                     spatial_dims=d, in_channels=1,
                                                     num_classes=2), "_bn1"),
}


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("family", list(NETWORKS))
def test_the_automatic_layer_is_the_last_feature_map(family, dims):
    build, expected = NETWORKS[family]
    model = build(dims).eval()
    batch = torch.rand(3, 1, *[64] * dims)  # the last map is 2 x 2 (x 2)
    maps = {}
    for method in ("gradcam", "cam"):  # CAM needs the map right before the pooling + Linear
        heat = maps[method] = ng.explain_batch(model, batch, method).heatmaps
        assert heat.shape == batch[:, 0].shape and torch.isfinite(heat).all()
        # random weights may leave a map all negative (0 after the ReLU), not every one; a
        # 1-voxel map, or a layer whose gradient doesn't reach the output, would
        assert any(float(h.std()) > 0.05 for h in heat), (family, dims, method)
    assert resolve_target_layer(model, None, batch)[0] == expected
    if family != "EfficientNetBN":  # the pooled map itself: Grad-CAM is CAM
        assert torch.allclose(maps["gradcam"], maps["cam"], atol=1e-4)


# ---- refusals -----------------------------------------------------------------------------------

def test_sidecar_arguments_that_fetch_or_name_files_are_refused(tmp_path):
    model = nets.DenseNet(spatial_dims=2, in_channels=1, out_channels=2, **SMALL_DENSENET)
    path = save(model, tmp_path / "w.safetensors")
    side = tmp_path / "w.safetensors.json"
    data = path.read_bytes()
    for arguments, named in (({"pretrained": True}, "'pretrained'"),
                             ({"act": str(tmp_path / "evil.pt")}, "'act'"),
                             ({"norm": ["batch", {"x": "https://example.org/w.pth"}]}, "'norm'"),
                             ({"act": "weights.pth"}, "'act'"),
                             ({"pretrained_url": None}, "'pretrained_url'")):
        side.write_text(json.dumps({"architecture": "monai:DenseNet121",
                                    "arguments": arguments}))
        with pytest.raises(ValueError, match=f"{named}.*another file.*trust_code=True"):
            ng.load_model(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, side.name]  # no evil.pt
    assert path.read_bytes() == data


def test_pretrained_weights_are_never_downloaded(tmp_path):
    model = nets.DenseNet(spatial_dims=2, in_channels=1, out_channels=2, **SMALL_DENSENET)
    path = save(model, tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="pretrained would download weights.*leave it out"):
        ng.load_model("monai:DenseNet121", weights=path, arguments={"pretrained": True})
    (tmp_path / "w.safetensors.json").write_text(json.dumps(
        {"architecture": "monai:DenseNet121", "arguments": {"pretrained": True}}))
    with pytest.raises(ValueError, match="pretrained would download weights"):
        ng.load_model(path, trust_code=True)  # trusting the file doesn't reach the network
    # EfficientNetBN downloads by default: pretrained is set to False
    built, _ = build_architecture(
        "monai:EfficientNetBN", 2, 1, {"model_name": "efficientnet-b0", "spatial_dims": 2})
    assert isinstance(built, nets.EfficientNetBN)
    with pytest.raises(ValueError, match="Transchex reads or downloads files.*own code"):
        build_architecture("monai:Transchex", 2, 1, {})
    with pytest.raises(ValueError, match="weights would download weights"):  # torchvision's
        build_architecture("monai:TorchVisionFCModel", 2, 3, {"weights": "IMAGENET1K_V1"})
    # gradient checkpointing is no file
    built, _ = build_architecture("monai:SwinUNETR", None, None,
                                  {"in_channels": 1, "out_channels": 2, "spatial_dims": 2,
                                   "feature_size": 12, "use_checkpoint": True})
    assert isinstance(built, nets.SwinUNETR)


def test_a_builder_that_downloads_through_its_arguments_is_stopped(tmp_path, monkeypatch):
    """TorchVisionFCModel passes unknown arguments to a torchvision builder; a detection
    builder's default backbone weights would be fetched while it is built. No argument name
    says so, so the download itself is refused (and nothing reaches the network)."""
    import socket

    import torchvision.models._api as api

    fetched = []

    def record(url, *args, **kwargs):
        fetched.append(url)
        raise RuntimeError("the test's stand-in for a download ran")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", record)
    monkeypatch.setattr(api, "load_state_dict_from_url", record)
    from safetensors.torch import save_file

    save_file({"fc.weight": torch.zeros(2, 4)}, str(tmp_path / "m.safetensors"))
    (tmp_path / "m.safetensors.json").write_text(json.dumps({
        "architecture": "monai:TorchVisionFCModel", "class_names": ["a", "b"],
        "arguments": {"model_name": "get_model", "name": "fasterrcnn_resnet50_fpn",
                      "num_classes": 2}}))
    with pytest.raises(ValueError, match="tried to download files while being built"):
        ng.load_model(tmp_path / "m.safetensors")
    assert fetched == []
    # the guard is gone afterwards, and other threads were never concerned
    assert torch.hub.load_state_dict_from_url is record
    assert socket.socket.connect.__name__ == "connect"
    with pytest.raises(ValueError, match="weights_backbone would download weights"):
        build_architecture("monai:TorchVisionFCModel", 2, 3,
                           {"model_name": "get_model", "weights_backbone": "DEFAULT"})


def test_unknown_names_helpers_and_bad_arguments_say_what_to_give(tmp_path):
    model = nets.DenseNet(spatial_dims=2, in_channels=1, out_channels=2, **SMALL_DENSENET)
    path = save(model, tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="no network class 'DenseNet12'.*'monai:DenseNet121'"):
        ng.load_model("monai:DenseNet12", weights=path)
    with pytest.raises(ValueError, match="'get_pretrained_resnet_medicalnet'.*e.g. 'monai:Dense"):
        ng.load_model("monai:get_pretrained_resnet_medicalnet", weights=path)
    with pytest.raises(ValueError, match="no network class '_Private'"):
        ng.load_model("monai:_Private", weights=path)
    with pytest.raises(ValueError, match="no argument 'growth_rat' .did you mean 'growth_rate'"):
        ng.load_model("monai:DenseNet", weights=path, arguments={"growth_rat": 8})
    with pytest.raises(ValueError, match="UNet needs the argument.*out_channels.*arguments"):
        build_architecture("monai:UNet", None, 1, {"spatial_dims": 2})
    with pytest.raises(ValueError, match="can't build monai:DenseNet.*spatial_dims.*trained"):
        build_architecture("monai:DenseNet", 2, 1, {"spatial_dims": 7})
    with pytest.raises(ValueError, match="wrong shapes"):  # 2D weights for a 3D network
        ng.load_model("monai:DenseNet", weights=path,
                      arguments=dict(SMALL_DENSENET, spatial_dims=3))
    with pytest.raises(ValueError, match="arguments= is for building an architecture"):
        ng.load_model(model, arguments={"spatial_dims": 2})
    with pytest.raises(ValueError, match="arguments must"):
        ng.load_model("monai:DenseNet", weights=path, arguments=["spatial_dims", 2])
    assert "monai:DenseNet121" in loader._known_names(monai=True)


def test_without_monai_the_error_says_how_to_install_it(monkeypatch, tmp_path):
    real = _optional.import_library

    def missing(name):
        if name.split(".")[0] == "monai":
            raise ImportError(f"No module named {name!r}")
        return real(name)

    monkeypatch.setattr(_optional, "import_library", missing)
    with pytest.raises(ValueError, match="optional package 'monai'.*pip install monai"):
        ng.load_model("monai:DenseNet121", weights=tmp_path / "absent.safetensors")


def test_monai_is_imported_only_for_monai_names(tmp_path):
    code = ("import sys, torch, napari_gradcam as ng\n"
            "from torch import nn\n"
            "ng.load_model(nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(1),\n"
            "                            nn.Flatten(), nn.Linear(2, 2)))\n"
            "try:\n    ng.load_model('resnet9999', weights='x.pt')\nexcept ValueError:\n    pass\n"
            "print('monai' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
